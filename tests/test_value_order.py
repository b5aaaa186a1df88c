"""The default eviction rule, value per byte (GreedyDual-Size-Frequency), on hand-computed cases.

Priority of a candidate: H = L_stamp + f · c / s, with c the prefill FLOPs a hit saves (from the
nearest ancestor state), s the bytes its eviction frees (its exclusive path's KV when it deletes
the node, plus its state), f its hit evidence and L_stamp the pool's inflation value when the node
was last used. The lowest H goes; the pool's inflation value rises to it. With SGLang's two pools
the KV pool keeps recency (SGLang's least recently used leaf).
"""

from __future__ import annotations

import dataclasses

import pytest

from test_eviction import _mp, evict_states, evict_tokens, has_state, live, node_ending_at, toks


def value(prof, start, end, replay_from, kv_tokens, state=True):
    """f = 1 value per byte of a node [start, end) that frees ``kv_tokens`` of KV."""
    return prof.flops_saved(start, end, replay_from=replay_from) / (
        prof.kv_bytes(kv_tokens) + (prof.ssm_state_bytes() if state else 0))


def order(st):
    return [end for _, end, _, _ in st.counters.eviction_log]


def scores(st):
    return [u for _, _, _, u in st.counters.eviction_log]


def test_state_pool_evicts_lowest_value_per_byte_first_and_inflates(make_marconi):
    built, drv = make_marconi(utility_form="value")
    st = built.cache.marconi
    st.log_evictions = True
    prof = st.profile
    lengths = [1200, 10, 50, 300]  # the longest is the least recent: recency would evict it first
    for i, n in enumerate(lengths):
        drv.run(toks(10000 * (i + 1), n), [1])
    h = {n: value(prof, 0, n, 0, n) for n in lengths}  # f = 1, stamped with L = 0
    expected = sorted(lengths, key=lambda n: h[n])
    assert expected == [10, 50, 300, 1200]  # FLOPs per byte grow with the context
    for k in range(4):
        evict_states(built, 1)
        assert st.inflation["state"] == pytest.approx(h[expected[k]])
    assert order(st) == expected
    assert scores(st) == pytest.approx([h[n] for n in expected])


def test_a_hit_restamps_with_the_inflation_value_and_counts_as_frequency(make_marconi):
    built, drv = make_marconi(utility_form="value")
    st = built.cache.marconi
    st.log_evictions = True
    prof = st.profile
    a, b, c = toks(10000, 300), toks(20000, 50), toks(30000, 10)
    for r in (a, b, c):
        drv.run(r, [1])
    v = {n: value(prof, 0, n, 0, n) for n in (300, 50, 10)}
    evict_states(built, 1)  # c: the lowest value per byte
    assert order(st) == [10] and st.inflation["state"] == pytest.approx(v[10])
    L = v[10]
    # a hit on a's leaf: stamped with L, two hits of evidence (its admission and this hit)
    assert drv.cache.match_prefix(_mp(a + [7])).device_prefix_len == 300
    node_a = node_ending_at(built, 300, a)
    assert node_a.marconi_L == pytest.approx(L) and st.frequency(node_a) == 2
    d = toks(40000, 50)
    drv.run(d, [1])  # a new leaf of b's length, stamped with L
    h = {"b": v[50], "d": L + v[50], "a": L + 2 * v[300]}
    assert h["b"] < h["d"] < h["a"]
    evict_states(built, 3)
    assert order(st) == [10, 50, 50, 300]
    assert scores(st)[1:] == pytest.approx([h["b"], h["d"], h["a"]])
    assert st.inflation["state"] == pytest.approx(h["a"])


def test_an_internal_state_no_request_resumed_from_goes_first(make_marconi):
    """x's state was hit as a leaf, then the request went on past it: that hit was a
    continuation, which the new leaf's state now serves. As an internal node with no hit
    since, and no branch admitted there, its evidence is 0: H = its stamp, below every leaf."""
    built, drv = make_marconi(utility_form="value")
    st = built.cache.marconi
    st.log_evictions = True
    prof = st.profile
    x = toks(10000, 100)
    drv.run(x, [1])
    ext = x + toks(50000, 50)
    drv.run(ext, [1])  # hits x's leaf (100 tokens), then extends it to 150
    y = toks(20000, 20)
    drv.run(y, [1])
    node_x, leaf = node_ending_at(built, 100, x), node_ending_at(built, 150, ext)
    assert node_x.children and node_x.marconi_hits == 1 and st.frequency(node_x) == 0
    assert st.frequency(leaf) == 1
    # the leaf replays from x's state: it saves the last 50 tokens' FLOPs, and its eviction frees them
    cand = st.candidate(leaf, frees_kv=True)
    assert cand.flops_saved == pytest.approx(prof.flops_saved(100, 150, replay_from=100))
    evict_states(built, 1)
    assert order(st) == [100] and live(built, node_x) and not has_state(node_x)  # a tombstone: KV kept
    assert scores(st) == [pytest.approx(0.0)]
    # with x's state gone the leaf replays from the root and frees the whole unshared path
    cand = st.candidate(leaf, frees_kv=True)
    assert cand.flops_saved == pytest.approx(prof.flops_saved(100, 150, replay_from=0))
    assert cand.nbytes == prof.kv_bytes(150) + prof.ssm_state_bytes()


def test_evidence_of_internal_states_counts_hits_while_internal_and_branch_points(make_marconi):
    built, drv = make_marconi(utility_form="value")
    st = built.cache.marconi
    prompt = toks(10000, 64)
    drv.run(prompt + toks(20000, 10), [1])
    drv.run(prompt + toks(30000, 10), [1])  # diverges at 64: a branch point admitted there
    fork = node_ending_at(built, 64, prompt)
    assert has_state(fork) and fork.marconi_branch and len(fork.children) == 2
    assert st.frequency(fork) == 1
    drv.run(prompt + toks(40000, 10), [1])  # resumes at the fork and goes another way: a hit while internal
    assert st.frequency(fork) == 2 and fork.marconi_ihits == 1


def test_two_pools_kv_pool_keeps_recency(make_marconi):
    built, drv = make_marconi(utility_form="value")
    st = built.cache.marconi
    st.log_evictions = True
    lengths = [1200, 10, 50, 300]
    for i, n in enumerate(lengths):
        drv.run(toks(10000 * (i + 1), n), [1])
    evict_tokens(built, 1)  # the least recently used leaf, whatever its value
    assert order(st) == [1200]


def test_single_byte_budget_queue_ranks_kv_leaves_and_states_by_value(make_marconi):
    """One byte budget: one queue over leaves and internal states, by value per byte: the
    budget is cut to just below the tree, so exactly one eviction runs, and it takes the
    leaf with the lowest value per byte, not the oldest."""
    built, drv = make_marconi(utility_form="value", kv_slots=4096)
    st = built.cache.marconi
    st.log_evictions = True
    prof = st.profile
    lengths = [1200, 10, 300]
    for i, n in enumerate(lengths):
        drv.run(toks(10000 * (i + 1), n), [1])
    total = built.cache.tree_bytes()
    assert total == prof.kv_bytes(sum(lengths)) + 3 * prof.ssm_state_bytes()
    assert built.cache.evict_to_bytes(total - 1) == 1
    assert order(st) == [10] and st.inflation["state"] == pytest.approx(value(prof, 0, 10, 0, 10))


def test_an_unhit_anchor_counts_the_share_of_anchors_hit_as_its_evidence(make_marconi):
    """An anchor state (no branch point, the largest power of two within the input) is
    internal from its admission on (the request's last state lies past it): as an internal
    state nobody resumed from, its evidence would be 0 and it would go first. It counts
    the share of anchors hit so far instead, Laplace-smoothed: (hit + 1) / (admitted + 2)
    (``anchor_prior``, on by default; off: 0, the ``no-anchor-prior`` experiment)."""
    built, drv = make_marconi(utility_form="value", anchor_state=True)
    st = built.cache.marconi
    x, y = toks(10000, 100), toks(20000, 40)
    drv.run(x, [1])  # anchor at 64, its last state at 100
    ax = node_ending_at(built, 64, x)
    assert has_state(ax) and ax.marconi_anchor and ax.children
    assert st.frequency(ax) == pytest.approx(1 / 3)
    drv.run(y, [1])  # anchor at 32
    ay = node_ending_at(built, 32, y)
    assert st.frequency(ax) == st.frequency(ay) == pytest.approx(1 / 4)
    drv.run(x[:64] + toks(30000, 20), [1])  # resumes at x's anchor (no new anchor: 64 is its hit)
    assert st.anchors_admitted == 2 and st.anchors_hit == 1
    assert st.frequency(ax) == 1  # a hit while internal: evidence, the prior no longer applies
    assert st.frequency(ay) == pytest.approx(2 / 4)
    st.config = dataclasses.replace(st.config, anchor_prior=False)
    assert st.frequency(ay) == 0 and st.frequency(ax) == 1


def test_internal_prior_experiment_counts_the_share_of_unproven_internal_states_hit(make_marconi):
    """The ``internal-prior`` experiment (off by default; rejected on the choice half): an
    internal state with no evidence of its own (not a branch point, not an anchor, never
    resumed from while internal) counts (hit + 1) / (hit + evicted unhit + 2) over such
    states instead of 0."""
    built, drv = make_marconi(utility_form="value", internal_prior=True)
    st = built.cache.marconi
    x, y = toks(10000, 100), toks(20000, 60)
    drv.run(x, [1])
    drv.run(x + [1] + toks(30000, 400), [1])  # continues x: x's last state becomes internal
    drv.run(y, [1])
    drv.run(y + [1] + toks(40000, 400), [1])
    ax, ay = (node_ending_at(built, len(s), s) for s in (x, y))
    assert has_state(ax) and ax.children and has_state(ay) and ay.children
    assert st.frequency(ax) == st.frequency(ay) == pytest.approx(1 / 2)  # no evidence yet
    st.config = dataclasses.replace(st.config, internal_prior=False)
    assert st.frequency(ax) == st.frequency(ay) == 0  # the default: an internal state nobody resumed from
    st.config = dataclasses.replace(st.config, internal_prior=True)
    drv.run(x + [1] + toks(50000, 400), [1])  # resumes at ax and goes another way: a hit while internal
    assert (st.internal_hit, st.internal_lost) == (1, 0) and st.frequency(ax) == 1
    assert st.frequency(ay) == pytest.approx(2 / 3)
    evict_states(built, 1)  # ay: 2/3 of a 60-token prefill per state; each leaf saves 400 tokens' worth
    assert not has_state(ay) and ay.children and (st.internal_hit, st.internal_lost) == (1, 1)
