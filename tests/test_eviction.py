"""Eviction order on small hand-computed cases through the real SGLang cache.

Logical clock (MarconiState): +1 per match, per insert commit and per eviction
call. A request through the driver with no branch point is one match and one
insert, so with nothing else happening the k-th such request's leaf is stamped
2k. An eviction call ticks once and scores candidates at ``now = clock + 1``.
"""

from __future__ import annotations

import pytest
import torch

from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.unified_cache.components.base import ComponentType

from sglang_marconi.policy.utility import utilities, Candidate

MAMBA = ComponentType.MAMBA
FULL = ComponentType.FULL
BIG = 10**9


def toks(start, n):
    return list(range(start, start + n))


def walk(node):
    for c in node.children.values():
        yield c
        yield from walk(c)


def nodes(built):
    return list(walk(built.cache.tree_core.root_node))


def has_state(node):
    return node.component_data[MAMBA].value is not None


def live(built, node):
    """Is ``node`` still attached to the tree?"""
    cur = node
    root = built.cache.tree_core.root_node
    while cur is not None and cur is not root:
        p = cur.parent
        if p is None or p.children.get(cur.key.child_key(built.cache.tree_core.page_size)) is not cur:
            return False
        cur = p
    return cur is root


def node_ending_at(built, end, tokens_prefix=None):
    st = built.cache.marconi
    found = [n for n in nodes(built) if st.node_end(n) == end]
    if tokens_prefix is not None:
        found = [n for n in found if list(path_tokens(built, n)) == list(tokens_prefix[:end])]
    assert len(found) == 1, (end, found)
    return found[0]


def path_tokens(built, node):
    parts = []
    root = built.cache.tree_core.root_node
    while node is not root:
        parts.append(list(node.key.token_ids))
        node = node.parent
    return [t for p in reversed(parts) for t in p]


def evict_states(built, k=1):
    return built.cache.evict(EvictParams(num_tokens=0, mamba_num=k))


def evict_tokens(built, k):
    return built.cache.evict(EvictParams(num_tokens=k))


def evict_all(built):
    return built.cache.evict(EvictParams(num_tokens=BIG, mamba_num=BIG))


def tree_kv_tokens(built):
    return sum(len(n.component_data[FULL].value) for n in nodes(built) if n.component_data[FULL].value is not None)


# ------------------------------------------------------------------ α = 0: recency


def test_alpha0_evicts_least_recent_state_first(make_marconi):
    built, drv = make_marconi(alpha=0.0)
    st = built.cache.marconi
    reqs = [toks(1000 * (i + 1), 10 + i) for i in range(4)]
    for r in reqs:
        drv.run(r, [1])  # committed = len(r)
    leaves = [node_ending_at(built, len(r), r) for r in reqs]
    assert [n.marconi_t for n in leaves] == [2.0, 4.0, 6.0, 8.0]
    for i in range(4):
        res = evict_states(built, 1)
        assert res.mamba_num_evicted == 1
        # the least recent remaining leaf is deleted, with its KV
        assert not live(built, leaves[i])
        assert all(live(built, n) for n in leaves[i + 1 :])
    assert nodes(built) == []
    assert st.counters.state_evictions == 4 and st.counters.leaf_evictions == 4


def test_alpha0_kv_eviction_deletes_least_recent_leaf(make_marconi):
    built, drv = make_marconi(alpha=0.0)
    reqs = [toks(1000 * (i + 1), 10 + 5 * i) for i in range(4)]
    for r in reqs:
        drv.run(r, [1])
    leaves = [node_ending_at(built, len(r), r) for r in reqs]
    kv0, st0 = drv.free_counts()
    res = evict_tokens(built, 1)
    assert res.num_tokens_evicted == 10  # the whole oldest leaf
    assert res.mamba_num_evicted == 1  # with its state
    assert not live(built, leaves[0]) and all(live(built, n) for n in leaves[1:])
    assert drv.free_counts() == (kv0 + 10, st0 + 1)
    # 16 tokens more: leaf 2 (15 tokens) is not enough, leaf 3 goes too
    res = evict_tokens(built, 16)
    assert res.num_tokens_evicted == 15 + 20
    assert [live(built, n) for n in leaves] == [False, False, False, True]


def test_hit_refreshes_only_the_deepest_matched_node(make_marconi):
    """A request hitting a long path stamps its end node, not the shared
    ancestor states along the path (SGLang's stock policy refreshes the path)."""
    built, drv = make_marconi(alpha=0.0)
    st = built.cache.marconi
    t1 = toks(100, 20)
    o1 = [200, 201]
    drv.run(t1, o1)  # L1 at 21
    t2 = t1 + o1 + toks(300, 5)
    o2 = [400, 401]
    drv.run(t2, o2)  # hits L1, L2 at 28
    u = toks(5000, 30)
    drv.run(u, [1])  # unrelated U at 30
    drv.run(toks(6000, 8), [1])  # unrelated V at 8 (more recent than U)
    t3 = t2 + o2 + toks(500, 4)
    r3 = drv.run(t3, [600])  # hits L2 (the deepest state), L3 at 33
    assert r3.hit_len == 28
    L1 = node_ending_at(built, 21)
    L2 = node_ending_at(built, 28)
    U = node_ending_at(built, 30)
    # L1 was last used by turn 2's match; turn 3's hit did not touch it.
    assert L1.marconi_t < U.marconi_t < L2.marconi_t
    evict_states(built, 1)
    # The shared ancestor's state goes first; its KV stays (internal node).
    assert live(built, L1) and not has_state(L1)
    assert L1.component_data[FULL].value is not None and len(L1.component_data[FULL].value) == 21
    assert has_state(U) and has_state(L2)
    evict_states(built, 1)
    assert not live(built, U) and has_state(L2)
    # turn 3's history is still reusable from L2 even though L1 is gone
    r4 = drv.run(t3 + [600, 7, 8], [9])
    assert r4.hit_len == len(t3)


def test_refresh_path_mode_refreshes_ancestors(make_marconi):
    """Same trace with ``refresh="path"`` (LRU-style): the hit on L2 also
    refreshes L1, so the unrelated U is now the least recent state."""
    built, drv = make_marconi(alpha=0.0, refresh="path")
    t1, o1 = toks(100, 20), [200, 201]
    drv.run(t1, o1)
    t2, o2 = t1 + o1 + toks(300, 5), [400, 401]
    drv.run(t2, o2)
    drv.run(toks(5000, 30), [1])
    drv.run(toks(6000, 8), [1])
    drv.run(t2 + o2 + toks(500, 4), [600])
    L1, U = node_ending_at(built, 21), node_ending_at(built, 30)
    assert L1.marconi_t > U.marconi_t
    evict_states(built, 1)
    assert not live(built, U) and has_state(L1)


def test_hit_is_strictly_more_recent_than_earlier_inserts(make_marconi):
    built, drv = make_marconi(alpha=0.0)
    a = toks(1, 10)
    drv.run(a, [11, 12])  # A: leaf at 11, stamped 2
    drv.run(toks(50, 11), [61])  # B: leaf at 11, stamped 4
    drv.run(a + [11, 13, 14], [15])  # hits A (at clock 4 -> 5), new leaf C
    A = node_ending_at(built, 11, a + [11])
    B = node_ending_at(built, 11, toks(50, 11))
    assert has_state(A) and has_state(B)
    # A was used by the third request, after B was inserted by the second.
    evict_states(built, 1)
    assert not live(built, B), "LRU must evict B (last used by request 2) before A (hit by request 3)"
    assert has_state(A)


# ------------------------------------------------------------------ α large: efficiency


def _leaf_candidate(profile, end, t):
    """Expected Candidate of a leaf [0, end) under root (marconi variant, deleting it)."""
    flops = profile.flops_saved(0, end, replay_from=0)
    nbytes = profile.kv_bytes(end) + profile.ssm_state_bytes()
    return Candidate(key=end, last_access=t, flops_saved=flops, nbytes=nbytes)


@pytest.mark.parametrize("pool", ["mamba", "kv"])
def test_large_alpha_evicts_low_efficiency_first(make_marconi, pool):
    built, drv = make_marconi(alpha=10.0, kv_slots=4096)
    st = built.cache.marconi
    prof = st.profile
    st.log_evictions = True
    lengths = [1200, 10, 50, 300]  # the long-context node is the least recent
    for i, n in enumerate(lengths):
        drv.run(toks(10000 * (i + 1), n), [1])
    ends = lengths
    effs = [prof.flops_saved(0, n, replay_from=0) / (prof.kv_bytes(n) + prof.ssm_state_bytes()) for n in ends]
    # FLOPs saved per byte grows with context: the 10-token node is the least efficient
    assert sorted(range(4), key=lambda i: effs[i]) == [1, 2, 3, 0]
    assert st.clock == 8.0
    now = st.clock + 2  # the eviction call ticks once, then scores at clock + 1
    cands = [_leaf_candidate(prof, n, 2.0 * (i + 1)) for i, n in enumerate(ends)]
    for c in cands:
        node = node_ending_at(built, c.key)
        got = st.candidate(node, frees_kv=True)
        assert got.flops_saved == pytest.approx(c.flops_saved)
        assert got.nbytes == c.nbytes
        assert got.last_access == c.last_access
    scores = utilities(cands, 10.0, now)
    expected = [ends[i] for i in sorted(range(4), key=lambda i: (scores[i], cands[i].last_access))]
    assert expected[0] == 10 and expected[-1] == 1200
    if pool == "mamba":
        evict_states(built, 4)
    else:
        evict_tokens(built, sum(lengths))
    order = [end for _, end, _, _ in st.counters.eviction_log]
    assert order == expected
    logged = [u for _, _, _, u in st.counters.eviction_log]
    assert logged == pytest.approx(sorted(scores))


def test_alpha_zero_vs_large_on_same_tree(make_marconi):
    """Same tree, same clock: α = 0 evicts the oldest (long) node, α = 10 the short one."""
    firsts = {}
    for alpha in (0.0, 10.0):
        built, drv = make_marconi(alpha=alpha, kv_slots=4096)
        drv.run(toks(10000, 1500), [1])
        drv.run(toks(20000, 12), [1])
        drv.run(toks(30000, 14), [1])
        st = built.cache.marconi
        st.log_evictions = True
        evict_states(built, 1)
        firsts[alpha] = st.counters.eviction_log[0][1]
    assert firsts == {0.0: 1500, 10.0: 12}


# ------------------------------------------------------------------ tombstones


def _chain(drv, base, lens):
    """A multi-turn session whose turns commit exactly at the cumulative ``lens``."""
    inp = toks(base, lens[0])
    seq = []
    for k, end in enumerate(lens):
        out = [base + 900000 + k]
        need = end - len(inp)  # committed = len(inp) + len(out) - 1 = len(inp)
        assert need >= 0
        inp = inp + toks(base + 1000 * (k + 1), need)
        drv.run(inp, out)
        seq = inp
        inp = inp + out
    return seq


@pytest.mark.parametrize("variant", ["marconi", "paper"])
def test_tombstoned_ancestor_changes_replay_distance(make_marconi, variant):
    built, drv = make_marconi(alpha=0.0, variant=variant)
    st = built.cache.marconi
    prof = st.profile
    S = prof.ssm_state_bytes()
    _chain(drv, 10**6, [100, 201, 302])
    # turn k+1's input includes turn k's output token: states at 100, 201, 302
    A, B, C = (node_ending_at(built, e) for e in (100, 201, 302))
    assert [len(n.key) for n in (A, B, C)] == [100, 101, 101]
    assert st.replay_from(B) == 100 and st.replay_from(C) == 201
    cb = st.candidate(B, frees_kv=False)
    assert cb.flops_saved == pytest.approx(prof.flops_saved(100, 201))
    if variant == "marconi":
        assert cb.nbytes == S
    else:
        assert cb.nbytes == prof.kv_bytes(201) + S

    # Evict the oldest state: A (an internal node) loses its state, keeps its KV.
    kv_before, st_before = drv.free_counts()
    evict_states(built, 1)
    assert live(built, A) and not has_state(A)
    assert len(A.component_data[FULL].value) == 100
    assert drv.free_counts() == (kv_before, st_before + 1)
    assert st.replay_from(B) == 0 and st.replay_from(C) == 201

    cb = st.candidate(B, frees_kv=False)
    if variant == "marconi":
        # a miss on B now replays from the root
        assert cb.flops_saved == pytest.approx(prof.flops_saved(100, 201, replay_from=0))
        assert cb.flops_saved == pytest.approx(prof.prefill_flops(0, 201))
    else:
        # the paper's formula: saved FLOPs from the parent, whatever holds a state
        assert cb.flops_saved == pytest.approx(prof.flops_saved(100, 201))
    # a node without a state saves nothing
    assert st.candidate(A, frees_kv=False).flops_saved == 0.0

    # Tombstone B too: C now replays from 0 in the marconi variant.
    B_t = B.marconi_t
    evict_states(built, 1)
    assert not has_state(B) and live(built, B) and B.marconi_t == B_t
    cc = st.candidate(C, frees_kv=True)
    if variant == "marconi":
        assert st.replay_from(C) == 0
        assert cc.flops_saved == pytest.approx(prof.prefill_flops(0, 302))
        assert cc.nbytes == prof.kv_bytes(101) + S
    else:
        assert cc.flops_saved == pytest.approx(prof.prefill_flops(201, 302))
        assert cc.nbytes == prof.kv_bytes(302) + S
    # hits now only come from C (the whole history) or nothing
    r = drv.run(path_tokens(built, C) + [5, 6], [7])
    assert r.hit_len == 302


@pytest.mark.parametrize("variant", ["marconi", "paper"])
def test_tombstone_raises_descendant_priority_only_in_marconi_variant(make_marconi, variant):
    """Two identical sessions X (older) and Y. X's first state is tombstoned.
    With α large, the marconi variant keeps X's middle state (a miss there
    would now replay from the root) and evicts Y's; the paper variant scores
    both middles equally and falls back to recency (X's goes first)."""
    built, drv = make_marconi(alpha=10.0, variant=variant)
    st = built.cache.marconi
    _chain(drv, 10**6, [100, 201, 302])
    _chain(drv, 2 * 10**6, [100, 201, 302])
    xs = [n for n in nodes(built) if path_tokens(built, n)[0] == 10**6]
    ys = [n for n in nodes(built) if path_tokens(built, n)[0] == 2 * 10**6]
    by_end = lambda ns: {st.node_end(n): n for n in ns}  # noqa: E731
    X, Y = by_end(xs), by_end(ys)
    built.cache._tombstone_state(X[100])
    assert not has_state(X[100])
    # Pin the leaves (and Y's first state) so the only candidates are the two middles.
    locks = []
    for n in (X[302], Y[302], Y[100]):
        locks.append((n, built.cache.inc_lock_ref(n.id).to_dec_params()))
    ex, ey = (st.candidate(n, frees_kv=False).efficiency for n in (X[201], Y[201]))
    if variant == "marconi":
        assert ex > ey
    else:
        assert ex == pytest.approx(ey)
    assert X[201].marconi_t < Y[201].marconi_t
    evict_states(built, 1)
    if variant == "marconi":
        assert has_state(X[201]) and not has_state(Y[201])
    else:
        assert not has_state(X[201]) and has_state(Y[201])
    for n, rec in locks:
        built.cache.dec_lock_ref(n.id, rec)


# ------------------------------------------------------------------ locks


def test_locked_nodes_are_never_evicted(make_marconi):
    built, drv = make_marconi(alpha=1.0)
    kv0, st0 = drv.initial_free
    system = toks(100, 40)
    drv.run(system + [1, 2, 3], [4, 5])
    drv.run(system + [6, 7, 8], [9])  # branch state at 40
    drv.run(toks(9000, 25), [1])
    leaf = node_ending_at(built, 43, system + [6, 7, 8])
    branch = node_ending_at(built, 40)
    assert has_state(branch) and len(branch.children) == 2
    leaf_kv = leaf.component_data[FULL].value.clone()
    leaf_state = leaf.component_data[MAMBA].value.clone()
    branch_state = branch.component_data[MAMBA].value.clone()
    rl = built.cache.inc_lock_ref(leaf.id).to_dec_params()
    rb = built.cache.inc_lock_ref(branch.id).to_dec_params()
    evict_all(built)
    # locked: still in the tree with their KV and states; the path to root keeps its KV
    assert live(built, leaf) and live(built, branch)
    assert torch.equal(leaf.component_data[FULL].value, leaf_kv)
    assert torch.equal(leaf.component_data[MAMBA].value, leaf_state)
    assert torch.equal(branch.component_data[MAMBA].value, branch_state)
    assert set(nodes(built)) == {branch, leaf}
    assert built.cache.full_protected_size() == 43 and built.cache.full_evictable_size() == 0
    assert built.cache.mamba_protected_size() == 2 and built.cache.mamba_evictable_size() == 0
    # Unlock the leaf only: it goes, the locked branch node (now a leaf) stays.
    built.cache.dec_lock_ref(leaf.id, rl)
    evict_all(built)
    assert not live(built, leaf) and live(built, branch) and has_state(branch)
    assert set(nodes(built)) == {branch}
    built.cache.dec_lock_ref(branch.id, rb)
    evict_all(built)
    assert nodes(built) == []
    assert drv.free_counts() == (kv0, st0)


def test_locked_internal_state_survives_state_eviction(make_marconi):
    built, drv = make_marconi(alpha=0.0)
    _chain(drv, 10**6, [100, 201, 302])
    A, B, C = (node_ending_at(built, e) for e in (100, 201, 302))
    rec = built.cache.inc_lock_ref(A.id).to_dec_params()
    res = evict_states(built, 3)
    # A is the least recent but locked: B and C go instead.
    assert has_state(A)
    assert res.mamba_num_evicted == 2
    assert live(built, B) and not has_state(B)  # tombstoned internal node
    assert not live(built, C)  # the leaf went with its state
    assert [n for n in nodes(built) if has_state(n)] == [A]
    built.cache.dec_lock_ref(A.id, rec)
    evict_states(built, 1)
    assert not has_state(A)


# ------------------------------------------------------------------ two pools


def test_state_eviction_keeps_internal_kv_and_kv_eviction_deletes_leaf_with_state(make_marconi):
    built, drv = make_marconi(alpha=0.0)
    seq = _chain(drv, 10**6, [100, 201, 302])
    A, B, C = (node_ending_at(built, e) for e in (100, 201, 302))
    kv0, st0 = drv.free_counts()
    res = evict_states(built, 2)  # A then B: both internal -> tombstones
    assert res.mamba_num_evicted == 2 and res.num_tokens_evicted == 0
    assert all(live(built, n) for n in (A, B, C))
    assert not has_state(A) and not has_state(B) and has_state(C)
    assert tree_kv_tokens(built) == 302
    assert drv.free_counts() == (kv0, st0 + 2)
    # KV eviction: the leaf goes with its state, then the state-less ancestors
    res = evict_tokens(built, 1)
    assert not live(built, C) and live(built, B)
    assert res.num_tokens_evicted == 101 and res.mamba_num_evicted == 1
    assert drv.free_counts() == (kv0 + 101, st0 + 3)
    # B is now a state-less leaf: KV-only, evicted by the KV pool
    res = evict_tokens(built, 150)
    assert res.num_tokens_evicted == 201 and res.mamba_num_evicted == 0
    assert nodes(built) == []
    assert drv.free_counts() == drv.initial_free
    # nothing hits any more
    assert drv.run(seq + [1, 2], [3]).hit_len == 0


def idle_match(built):
    """A miss: ticks the logical clock, stamps nothing (keeps stamps distinct)."""
    from array import array

    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    r = built.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", [987654321]))))
    assert r.device_prefix_len == 0


def test_state_eviction_prefers_narrow_nodes(make_marconi):
    """State candidates are holders with at most one child: a branch state with
    two children is kept while narrower holders exist, even if it is older."""
    built, drv = make_marconi(alpha=0.0)
    system = toks(100, 40)
    drv.run(system + [1, 2, 3], [4])  # leaf1 at 43
    drv.run(system + [5, 6, 7], [8])  # branch state at 40, leaf2 at 43
    idle_match(built)
    drv.run(system + [1, 2, 3, 4, 9, 10], [11])  # hits leaf1 (refreshing it), leaf1' at 46
    branch = node_ending_at(built, 40)
    leaf1 = node_ending_at(built, 43, system + [1, 2, 3])
    leaf2 = node_ending_at(built, 43, system + [5, 6, 7])
    assert has_state(branch) and len(branch.children) == 2
    assert branch.marconi_t < leaf2.marconi_t < leaf1.marconi_t
    evict_states(built, 1)
    # the branch state is the least recent, but it has two children: leaf2 goes
    assert has_state(branch) and not live(built, leaf2)
    # now the branch node is narrow (one child) and the least recent
    evict_states(built, 1)
    assert live(built, branch) and not has_state(branch) and has_state(leaf1)


def test_wide_holders_are_candidates_when_no_narrow_one_is_left(make_marconi):
    built, drv = make_marconi(alpha=0.0)
    system = toks(100, 40)
    drv.run(system + [1, 2, 3], [4])
    drv.run(system + [5, 6, 7], [8])  # branch state at 40
    leaves = [n for n in nodes(built) if not n.children]
    branch = node_ending_at(built, 40)
    # pin both leaves: the only unlocked holder is the wide branch node
    recs = [(n, built.cache.inc_lock_ref(n.id).to_dec_params()) for n in leaves]
    res = evict_states(built, 1)
    assert res.mamba_num_evicted == 1
    assert live(built, branch) and not has_state(branch)
    assert all(has_state(n) for n in leaves)
    for n, rec in recs:
        built.cache.dec_lock_ref(n.id, rec)


# ------------------------------------------------------------------ single budget (paper)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_single_byte_budget_evicts_until_tree_fits(make_marconi, alpha):
    from sglang_marconi.policy import builtin_profile

    prof = builtin_profile("paper-7b")
    budget = 4 * prof.ssm_state_bytes() + prof.kv_bytes(300)
    built, drv = make_marconi(alpha=alpha, byte_budget=budget, kv_slots=4096, mamba_slots=64, variant="paper")
    st = built.cache.marconi
    system = toks(100, 60)
    import random

    rng = random.Random(5)
    for i in range(40):
        inp = (system if rng.random() < 0.6 else toks(7000 + 100 * i, 30)) + [rng.randint(1, 9) for _ in range(5)]
        drv.run(inp, [rng.randint(10, 20) for _ in range(3)])
        assert built.cache.tree_bytes() <= budget
        kv = built.cache.full_evictable_size() + built.cache.full_protected_size()
        ns = built.cache.mamba_evictable_size() + built.cache.mamba_protected_size()
        assert built.cache.tree_bytes() == prof.kv_bytes(kv) + ns * prof.ssm_state_bytes()
    assert st.counters.state_evictions > 0 and st.counters.leaf_evictions > 0
    # evict_to_bytes(0) empties the tree
    n = built.cache.evict_to_bytes(0)
    assert n > 0 and nodes(built) == [] and built.cache.tree_bytes() == 0
    assert drv.free_counts() == drv.initial_free


def test_single_budget_direct_call_counts_and_stops_at_budget(make_marconi):
    built, drv = make_marconi(alpha=0.0)
    st = built.cache.marconi
    prof = st.profile
    reqs = [toks(1000 * (i + 1), 20) for i in range(5)]
    for r in reqs:
        drv.run(r, [1])
    per = prof.kv_bytes(20) + prof.ssm_state_bytes()
    assert built.cache.tree_bytes() == 5 * per
    assert built.cache.evict_to_bytes(5 * per) == 0
    assert built.cache.evict_to_bytes(3 * per) == 2
    assert built.cache.tree_bytes() == 3 * per
    # α = 0: the two oldest requests went
    alive = [any(path_tokens(built, n)[:1] == r[:1] for n in nodes(built)) for r in reqs]
    assert alive == [False, False, True, True, True]
    assert built.cache.evict_to_bytes(3 * per - 1) == 1


def test_reset_after_evictions(make_marconi):
    built, drv = make_marconi(alpha=0.5, kv_budget=200, state_budget=3)
    for i in range(30):
        drv.run(toks(1000 * (i % 7 + 1), 40) + [i], [1, 2])
        assert drv.tree_kv_tokens() <= 200 and drv.tree_states() <= 3
    evict_all(built)
    assert drv.free_counts() == drv.initial_free
    built.cache.reset()
    assert nodes(built) == []
    r = drv.run(toks(1, 10), [2])
    assert r.hit_len == 0 and r.states_admitted == 1


# ------------------------------------------------------------------ the default config (issue 6)


def test_recency_with_input_end_state_hand_computed(make_marconi):
    """The recency experiment (α = 0, input_state, tombstones_first; round 14's order without the
    leader around it): a request without a branch point leaves
    two states, the end of its input (an internal node once the output's KV
    follows) and its last token. Eviction goes by recency of the state stamps:
    the input-end state is older than the last-token state, so it goes first as
    a tombstone (KV kept, the whole-sequence hit survives); a hit refreshes only
    the deepest matched node; a KV-only leaf left behind is the first KV victim
    (it saves nothing)."""
    built, drv = make_marconi(input_state="auto", tombstones_first=True, tombstones_spare_fork_hits="two_pools",
                              utility_form="sum")
    st = built.cache.marconi
    assert st.recency_only
    r1_in, r1_out = toks(1000, 20), toks(5000, 5)
    r2_in, r2_out = toks(2000, 10), toks(6000, 3)
    drv.run(r1_in, r1_out)  # committed 24: states at 20 (input end) and 24 (last token)
    drv.run(r2_in, r2_out)  # committed 12: states at 10 and 12
    seq1 = r1_in + r1_out[:-1]
    in1, last1 = node_ending_at(built, 20, seq1), node_ending_at(built, 24, seq1)
    seq2 = r2_in + r2_out[:-1]
    in2, last2 = node_ending_at(built, 10, seq2), node_ending_at(built, 12, seq2)
    assert all(has_state(n) for n in (in1, last1, in2, last2))
    assert in1.marconi_t < last1.marconi_t < in2.marconi_t < last2.marconi_t
    assert st.counters.as_dict()["admitted_input_end"] == 2

    evict_states(built, 1)  # the oldest state: r1's input end, a tombstone
    assert live(built, in1) and not has_state(in1) and live(built, last1)
    # the next turn of r1 still hits the whole sequence, which refreshes last1
    assert drv.cache.match_prefix(_mp(seq1 + [1])).device_prefix_len == 24
    assert last1.marconi_t > last2.marconi_t
    evict_states(built, 1)  # now the oldest: r2's input end (tombstone)
    assert live(built, in2) and not has_state(in2) and has_state(last2)
    evict_states(built, 1)  # r2's last-token leaf, deleted with its KV
    assert not live(built, last2) and live(built, in2) and has_state(last1)
    # r2's KV-only leaf saves nothing (no state on it or below): the first KV victim
    res = evict_tokens(built, 1)
    assert res.num_tokens_evicted == 10 and not live(built, in2)
    assert live(built, last1) and has_state(last1)


def _mp(tokens):
    from array import array

    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    return MatchPrefixParams(key=RadixKey(array("q", tokens)))


def test_recency_only_candidates_keep_the_same_eviction_order(make_marconi):
    """With α fixed at 0 the eviction candidates skip the cost terms; the order
    must equal the one computed with them (a tiny α scores efficiency too little
    to reorder distinct stamps, so it serves as the with-costs reference)."""
    orders = []
    for a in (0.0, 1e-12):
        built, drv = make_marconi(alpha=a, kv_slots=4096, mamba_slots=32)
        assert built.cache.marconi.recency_only == (a == 0.0)
        for i, n in enumerate([120, 10, 50, 300, 7, 64]):
            drv.run(toks(10000 * (i + 1), n), [1, 2])
        built.cache.marconi.log_evictions = True
        evict_all(built)
        orders.append([end for _, end, _, _ in built.cache.marconi.counters.eviction_log])
    assert orders[0] == orders[1] and len(orders[0]) >= 6


def test_tombstones_first_evicts_internal_states_before_any_leaf_state(make_marconi):
    """``tombstones_first`` (α = 0): r2's input-end state (internal, newer) goes
    before r1's last-token leaf (older); without it, plain recency takes r1's
    input end, then r1's leaf."""
    def fill(**cfg):
        built, drv = make_marconi(input_state=True, **cfg)
        drv.run(toks(1000, 20), toks(5000, 5))
        drv.run(toks(2000, 10), toks(6000, 3))
        built.cache.marconi.log_evictions = True
        evict_states(built, 3)
        return [(end, tokens) for _, end, tokens, _ in built.cache.marconi.counters.eviction_log]

    # (node end, KV tokens freed): a tombstone frees no KV, a leaf its own tokens
    assert fill(tombstones_first=True) == [(20, 0), (10, 0), (24, 4)]
    assert fill() == [(20, 0), (24, 4), (10, 0)]


def test_tombstones_spare_branches_keeps_a_fresh_branch_state_in_the_recency_order(make_marconi):
    """``tombstones_spare_branches``: r2 branches off r1 at 20 (a branch state, never
    hit) and r3 hits it; r4 branches off r1 at 30 later. With tombstones-first
    every internal state goes before any leaf (20, then 30); sparing branches,
    only the branch state already hit (20) goes first, then the leaves by age
    (r1's at 44, r2's at 30) while the fresh branch state at 30 keeps its place
    among them (it is newer than both)."""
    p = toks(1000, 40)

    def fill(**cfg):
        built, drv = make_marconi(tombstones_first=True, state_candidates="all", kv_slots=4096, mamba_slots=32, **cfg)
        drv.run(p, toks(5000, 5))                    # r1: last-token state at 44
        drv.run(p[:20] + toks(2000, 10), [7])        # r2: branch state at 20, leaf at 30
        drv.run(p[:20] + toks(3000, 10), [8])        # r3: hits the state at 20, leaf at 30
        drv.run(p[:30] + toks(4000, 10), [9])        # r4: branch state at 30 (on r1's path), leaf at 40
        built.cache.marconi.log_evictions = True
        evict_states(built, 3)
        return [(end, tokens) for _, end, tokens, _ in built.cache.marconi.counters.eviction_log]

    # (node end, KV tokens freed): a tombstone frees no KV, a leaf its own tokens
    assert fill(tombstones_spare_branches=False) == [(20, 0), (30, 0), (44, 14)]
    assert fill(tombstones_spare_branches=True) == [(20, 0), (44, 14), (30, 10)]


def _fork_run(make_marconi, **cfg):
    """r1 (prefix p, last-token state at 44); r2 branches off it at 20 (a branch
    state); r3 diverges right at that state (its token 20 starts neither child):
    a fork hit; r4 hits it too but runs on along r1's path to 30: no fork hit."""
    p = toks(1000, 40)
    built, drv = make_marconi(tombstones_first=True, state_candidates="all", kv_slots=4096, mamba_slots=32, **cfg)
    drv.run(p, toks(5000, 5))                    # r1: last-token state at 44
    drv.run(p[:20] + toks(2000, 10), [7])        # r2: branch state at 20, leaf at 30
    drv.run(p[:20] + toks(3000, 10), [8])        # r3: a fork hit at 20, leaf at 30
    drv.run(p[:30] + toks(4000, 10), [9])        # r4: hits 20, branch state at 30, leaf at 40
    fork = node_ending_at(built, 20, p)
    assert fork.marconi_hits == 2 and fork.marconi_fork_hits == 1
    assert built.cache.marconi.counters.as_dict()["fork_hits"] == 1
    built.cache.marconi.log_evictions = True
    return built, fork


@pytest.mark.parametrize("mode,spared", [("off", False), ("two_pools", True), ("both", True), (None, True)])
def test_tombstones_spare_fork_hits_keeps_a_shared_fork_state_in_the_state_pool_order(make_marconi, mode, spared):
    """``tombstones_spare_fork_hits`` (``None``: the default, "two_pools"): the
    state at 20 served a fork, so the state pool keeps it in the recency order,
    where r4's hit made it newer than r1's, r2's and r3's leaves: they go first,
    by age. "off": it is a tombstone hit before, the first to go."""
    from sglang_marconi.policy.config import MarconiConfig

    built, fork = _fork_run(make_marconi, tombstones_spare_fork_hits=(
        MarconiConfig().tombstones_spare_fork_hits if mode is None else mode))
    evict_states(built, 3)
    log = [(end, tokens) for _, end, tokens, _ in built.cache.marconi.counters.eviction_log]
    assert log == ([(44, 14), (30, 10), (30, 10)] if spared else [(20, 0), (44, 14), (30, 10)])
    assert has_state(fork) is spared


@pytest.mark.parametrize("mode,spared", [("two_pools", False), ("both", True)])
def test_tombstones_spare_fork_hits_in_the_single_queue_only_with_both(make_marconi, mode, spared):
    """One byte budget's queue (``single_budget_marks: "all"``): the fork state's
    key is its own stamp only with "both"; with "two_pools" it is a tombstone's,
    below every leaf's (the queue takes it once it holds at most one child).
    The state pool spares it in both modes."""
    from sglang_marconi.sglang_backend.state import TOMBSTONE_FIRST_SHIFT

    built, fork = _fork_run(make_marconi, tombstones_spare_fork_hits=mode)
    st = built.cache.marconi
    assert st.state_pool_candidate(fork, frees_kv=False).last_access == fork.marconi_t
    key = st.single_budget_candidate(fork, frees_kv=False).last_access
    assert key == (fork.marconi_t if spared else fork.marconi_t - TOMBSTONE_FIRST_SHIFT)


def test_a_hit_that_extends_a_leaf_is_no_fork_hit(make_marconi):
    """The next turn of one sequence hits its last-token state, a leaf, and
    extends it: not a fork, so the state stays a tombstone-first candidate."""
    built, drv = make_marconi(tombstones_first=True, tombstones_spare_fork_hits="two_pools")
    r1 = toks(1000, 20) + toks(5000, 5)
    drv.run(toks(1000, 20), toks(5000, 5))       # last-token state at 24 (a leaf)
    drv.run(r1[:24] + toks(6000, 6), [3])        # hits it and extends it
    leaf = node_ending_at(built, 24, r1[:24])
    assert leaf.marconi_hits == 1 and getattr(leaf, "marconi_fork_hits", 0) == 0


def test_tombstones_spare_fork_hits_config_error():
    from sglang_marconi.policy import parse_config
    from sglang_marconi.policy.config import MarconiConfigError

    with pytest.raises(MarconiConfigError, match="tombstones_spare_fork_hits=True"):
        parse_config({"tombstones_spare_fork_hits": True})


def _superseded_run(make_marconi, extend_r1=False, **cfg):
    """r2 (its own path) and r1 (prefix p, last-token state at 44) are cached, r1
    the newer; r3 then branches off inside r1's path at 30 (a branch state there):
    r1's tail 30..44 is the sequence r3 left. With ``extend_r1`` a fourth request
    continues r1 (hits its state at 44) before anything is evicted."""
    p = toks(1000, 40)
    built, drv = make_marconi(kv_slots=4096, mamba_slots=32, state_candidates="all", **cfg)
    drv.run(toks(2000, 20), toks(6000, 5))        # r2: leaf 0..24, state at 24
    drv.run(p, toks(5000, 5))                     # r1: leaf 0..44, state at 44
    drv.run(p[:30] + toks(4000, 10), [9])         # r3: branch state at 30, leaf 30..40
    if extend_r1:
        drv.run(p + toks(5000, 4) + toks(7000, 6), [3])  # r4: hits 44, leaf 44..54
    built.cache.marconi.log_evictions = True
    return built


@pytest.mark.parametrize("flag", [False, True])
def test_superseded_first_evicts_the_path_a_branch_left_first(make_marconi, flag):
    """``superseded_first``: r3 branched off r1's path at 30, so r1's tail (30..44:
    its KV and its last-token state) goes before r2's older leaf in both pools;
    without it, plain recency takes r2's leaf first."""
    built = _superseded_run(make_marconi, superseded_first=flag)
    st = built.cache.marconi
    tail = node_ending_at(built, 44)
    assert getattr(tail, "marconi_superseded", False) is flag and st.counters.superseded_marks == int(flag)
    assert not getattr(node_ending_at(built, 30, toks(1000, 40)), "marconi_superseded", False)
    evict_tokens(built, 1)  # one KV leaf, with its state
    assert [(end, tokens) for _, end, tokens, _ in st.counters.eviction_log] == ([(44, 14)] if flag else [(24, 24)])

    built = _superseded_run(make_marconi, superseded_first=flag)
    evict_states(built, 1)  # one state (a leaf's: the branch state at 30 is internal with two children)
    assert [(end, tokens) for _, end, tokens, _ in built.cache.marconi.counters.eviction_log] == (
        [(44, 14)] if flag else [(24, 24)])


def test_superseded_path_is_ordinary_again_once_extended(make_marconi):
    """r4 continues r1 (a hit on its state at 44): r1's path is in use again, so
    the KV pool evicts by plain recency (r2's leaf, the oldest, first)."""
    built = _superseded_run(make_marconi, extend_r1=True, superseded_first=True)
    st = built.cache.marconi
    assert st.counters.superseded_marks == 1
    assert not any(getattr(n, "marconi_superseded", False) for n in nodes(built))
    evict_tokens(built, 1)
    assert [(end, tokens) for _, end, tokens, _ in st.counters.eviction_log] == [(24, 24)]


@pytest.mark.parametrize("shared, min_shared, marked", [(30, 0.5, True), (5, 0.5, False), (5, 0.1, True), (30, 0.7, False)])
def test_superseded_needs_the_request_to_share_most_of_the_sequence(make_marconi, shared, min_shared, marked):
    """A branch at ``shared`` inside r1's 44-token sequence marks r1's tail only when
    shared / 44 >= ``superseded_min_shared`` (30/44 = 0.68, 5/44 = 0.11): another
    conversation after a short common prefix is not a revision of r1."""
    p = toks(1000, 40)
    built, drv = make_marconi(kv_slots=4096, mamba_slots=32, superseded_first=True, superseded_min_shared=min_shared)
    drv.run(p, toks(5000, 5))
    drv.run(p[:shared] + toks(4000, 10), [9])
    tail = node_ending_at(built, 44)
    assert getattr(tail, "marconi_superseded", False) is marked
    assert built.cache.marconi.counters.superseded_marks == int(marked)


@pytest.mark.parametrize("state_above", [False, True])
def test_superseded_needs_state_on_the_path(make_marconi, state_above):
    """``superseded_needs_state``: r3's branch at 30 marks r1's tail only when a
    state sits above it on the same unbranched path (r0 made r1 branch at 20 and
    checkpoint there); with no state above (a new conversation after an
    uncheckpointed common prefix) nothing is marked."""
    p = toks(1000, 40)
    built, drv = make_marconi(kv_slots=4096, mamba_slots=32, superseded_first=True, superseded_needs_state=True)
    if state_above:
        drv.run(p[:20] + toks(8000, 10), [1])     # r0: r1 will branch off it at 20 (a state there)
    drv.run(p, toks(5000, 5))                     # r1: tail to 44
    drv.run(p[:30] + toks(4000, 10), [9])         # r3: branches inside r1's path at 30
    tail = node_ending_at(built, 44)
    assert getattr(tail, "marconi_superseded", False) is state_above


@pytest.mark.parametrize("share_from, others, past, marked", [
    ("root", 2, 10, True), ("fork", 2, 10, False), ("fork", 2, 80, True), ("fork", 1, 10, True)])
def test_superseded_share_counted_from_the_prompt_fork(make_marconi, share_from, others, past, marked):
    """``superseded_share_from`` (``superseded_min_shared`` 0.25): ``others``
    conversations and then r1 (100 tokens, 3 out: committed 0..302) follow a
    200-token system prompt; r3 shares r1's first ``past`` tokens and branches at
    200 + past. From the root, 210 of r1's 302 tokens are shared: a revision, r1's
    tail marked. From the prompt's fork (the system prompt node, where two other
    sequences split off) 10 tokens are shared, under one 64-token block: another
    conversation, nothing marked; 80 tokens (80 / 102 of the part past the fork)
    are a revision. With one other conversation the prompt node is no fork (an
    agent's own revision forks in two) and the share counts from the root."""
    p = toks(1000, 200)
    built, drv = make_marconi(kv_slots=4096, mamba_slots=32, superseded_first=True,
                              superseded_share_from=share_from, superseded_min_shared=0.25)
    for i in range(others):
        drv.run(p + toks(2000 + 100 * i, 8), [7])
    drv.run(p + toks(5000, 100), toks(6000, 3))        # r1: committed 0..302
    drv.run(p + toks(5000, past) + toks(4000, 10), [9])  # r3: branches at 200 + past
    tail = node_ending_at(built, 302)
    assert getattr(tail, "marconi_superseded", False) is marked
    # the second conversation after the prompt marks the first either way: nothing forks there yet
    first = node_ending_at(built, 208, p + toks(2000, 8))
    assert getattr(first, "marconi_superseded", False)
    assert built.cache.marconi.counters.superseded_marks == 1 + int(marked)


FINAL = (8, 9)  #: an ending the tests teach as final (``end_tail_tokens=2``)


def _ended_run(make_marconi, continue_r1=False, **cfg):
    """r2 (ending (6003, 6004)) and then r1 (ending 8, 9: taught final by eight
    unanswered sequences) are cached, r1 the newer: committed 0..24 and 0..42.
    With ``continue_r1`` a third request continues r1 (hits its state at 42)."""
    built, drv = make_marconi(kv_slots=4096, mamba_slots=32, state_candidates="all", end_tail_tokens=2, **cfg)
    st = built.cache.marconi
    if st.end_predictor is not None:
        for _ in range(8):
            st.end_predictor.unanswered(FINAL)
    drv.run(toks(2000, 20), toks(6000, 5))          # r2: leaf 0..24
    drv.run(toks(1000, 40), [7, 8, 9])               # r1: leaf 0..42, ending (8, 9)
    if continue_r1:
        drv.run(toks(1000, 40) + [7, 8, 9] + toks(3000, 5), [1, 2])  # r3: hits 42, leaf 42..49
    st.log_evictions = True
    return built


@pytest.mark.parametrize("flag", [False, True])
def test_ended_first_evicts_a_likely_last_answer_first(make_marconi, flag):
    """``ended_first``: r1's ending is final (0 continued, 8 unanswered: P = 1/10
    <= 0.1), so r1's sequence (its KV and its last-token state) goes before r2's
    older leaf in both pools; without it, plain recency takes r2's leaf first."""
    built = _ended_run(make_marconi, ended_first=flag)
    st = built.cache.marconi
    assert getattr(node_ending_at(built, 42), "marconi_ended", False) is flag
    assert st.counters.ended_marks == int(flag)
    assert not getattr(node_ending_at(built, 24), "marconi_ended", False)
    evict_tokens(built, 1)
    assert [(end, tokens) for _, end, tokens, _ in st.counters.eviction_log] == ([(42, 42)] if flag else [(24, 24)])
    if flag:  # the mark made it go first: no evidence either way
        assert st.end_predictor._stats[FINAL] == [0, 8]

    built = _ended_run(make_marconi, ended_first=flag)
    evict_states(built, 1)
    assert [(end, tokens) for _, end, tokens, _ in built.cache.marconi.counters.eviction_log] == (
        [(42, 42)] if flag else [(24, 24)])


def test_ended_sequence_hit_is_ordinary_again_and_teaches_continued(make_marconi):
    """r3 continues r1 (a hit on its state at 42): r1's path is in use again and
    the ending (8, 9) counts one continuation; the KV pool evicts by plain
    recency (r2's leaf, the oldest, first)."""
    built = _ended_run(make_marconi, continue_r1=True, ended_first=True)
    st = built.cache.marconi
    assert st.counters.ended_marks == 1
    assert not any(getattr(n, "marconi_ended", False) for n in nodes(built))
    assert st.end_predictor._stats[FINAL] == [1, 8]
    assert st.end_predictor.p_continue(FINAL) == pytest.approx(2 / 11)  # no longer final
    evict_tokens(built, 1)
    assert [(end, tokens) for _, end, tokens, _ in st.counters.eviction_log] == [(24, 24)]


def test_ended_first_marks_the_unbranched_path_above_and_learns_from_evictions(make_marconi):
    """A final ending marks its leaf and the unbranched path above it, up to the
    first node other requests share: rB continues rA (a hit at 31: rA's ending
    (1, 2) continued), checkpoints its input end (37) and ends at 39 with the
    final ending; marked are 37..39, 31..37 and rA's 10..31, not 0..10 (shared
    with r0). Evicted unanswered and unmarked, r0's ending counts against it."""
    built, drv = make_marconi(kv_slots=4096, mamba_slots=32, state_candidates="all", input_state=True,
                              ended_first=True, end_tail_tokens=2)
    st = built.cache.marconi
    q = toks(1000, 30)
    drv.run(q[:10] + toks(8000, 10), [5, 6, 4])       # r0: ending (6, 4), leaf 0..22
    drv.run(q, [1, 2])                                 # rA: branch at 10, ending (1, 2) at 31
    for _ in range(8):
        st.end_predictor.unanswered(FINAL)
    drv.run(q + [1, 2] + toks(3000, 5), [7, 8, 9])     # rB: hits 31, input end 37, ending (8, 9) at 39
    assert st.counters.ended_marks == 1
    for end in (39, 37, 31):
        assert getattr(node_ending_at(built, end), "marconi_ended", False), end
    assert not getattr(node_ending_at(built, 10), "marconi_ended", False)  # two children: shared
    assert not getattr(node_ending_at(built, 22), "marconi_ended", False)
    assert st.end_predictor._stats[(1, 2)] == [1, 0]
    evict_all(built)
    assert st.end_predictor._stats[(6, 4)] == [0, 1]   # r0's, evicted unanswered
    assert st.end_predictor._stats[FINAL] == [0, 8]    # rB's went first because of the mark


@pytest.mark.parametrize("shared, continued", [(30, True), (5, False)])
def test_a_revision_of_a_finished_sequence_counts_its_ending_as_continued(make_marconi, shared, continued):
    """r3 branches inside r1's sequence (0..42, ending (8, 9)) at ``shared``: sharing
    30/42 it revises r1 (an agent that dropped part of its history), so the
    conversation went on and r1's ending counts as continued; sharing 5 tokens
    it is another conversation and r1's ending stays open."""
    built, drv = make_marconi(kv_slots=4096, mamba_slots=32, ended_first=True, end_tail_tokens=2)
    st = built.cache.marconi
    p = toks(1000, 40)
    drv.run(p, [7, 8, 9])
    drv.run(p[:shared] + toks(4000, 10), [1, 2])
    assert st.end_predictor._stats.get(FINAL, [0, 0]) == ([1, 0] if continued else [0, 0])
    assert (getattr(node_ending_at(built, 42), "marconi_ending", None) is None) is continued


def test_sequence_labels_take_back_an_unanswered_label_when_the_conversation_continues(make_marconi):
    """``end_labels: "sequence"``: r1 (128 + 2 tokens, ending (8, 9)) is evicted before
    r2 continues it, so its ending is first counted unanswered; r2's input holds
    r1's first two 64-token blocks (at least half of r1), so the label is taken
    back: one continuation, no unanswered. A continuation r1 is still cached for
    counts once (the hit itself is not counted again)."""
    p = toks(1000, 128)
    built, drv = make_marconi(kv_slots=4096, mamba_slots=32, ended_first=True, end_tail_tokens=2,
                              end_labels="sequence")
    st = built.cache.marconi
    drv.run(p, [7, 8, 9])
    evict_all(built)
    assert st.end_predictor._stats[FINAL] == [0, 1]
    drv.run(toks(5000, 70), [1, 2, 3])               # another conversation: no label moves
    assert st.end_predictor._stats[FINAL] == [0, 1]
    drv.run(p + [7, 8] + toks(3000, 5), [4, 5, 6])   # r2 continues r1 (a miss: r1 is gone)
    assert st.end_predictor._stats[FINAL] == [1, 0]

    built, drv = make_marconi(kv_slots=4096, mamba_slots=32, ended_first=True, end_tail_tokens=2,
                              end_labels="sequence")
    st = built.cache.marconi
    drv.run(p, [7, 8, 9])
    res = drv.run(p + [7, 8] + toks(3000, 5), [4, 5, 6])  # a hit on r1's end
    assert res.hit_len == 130
    assert st.end_predictor._stats[FINAL] == [1, 0]
    evict_all(built)  # r1's ending is resolved: its eviction is not counted
    assert st.end_predictor._stats[FINAL] == [1, 0]


def test_sequence_labels_a_sequence_mostly_output_is_keyed_past_its_input(make_marconi):
    """r1's input (40 tokens) holds no full block, its sequence (40 + 99 committed
    tokens) is keyed by its first two blocks, hashed on from the input's chain
    into the output: r2, whose input starts with all of r1, continues it; r3,
    which shares only r1's input, would not have."""
    p, out = toks(1000, 40), toks(2000, 100)
    for follow, continued in ((p + out[:-1] + toks(3000, 5), True), (p + toks(4000, 120), False)):
        built, drv = make_marconi(kv_slots=4096, mamba_slots=32, ended_first=True, end_tail_tokens=2,
                                  end_labels="sequence")
        st = built.cache.marconi
        drv.run(p, out)
        evict_all(built)
        drv.run(follow, [1, 2, 3])
        ending = tuple(out[-2:])
        assert st.end_predictor._stats[ending] == ([1, 0] if continued else [0, 1])


def test_block_hashes_extend_a_prefix_chain():
    """Hashing on from a prefix's chain gives the chain of the whole sequence."""
    from hypothesis import given, settings, strategies as stn
    from sglang_marconi.sglang_backend.state import SEQUENCE_BLOCK, _block_hashes

    @settings(max_examples=60, deadline=None)
    @given(stn.lists(stn.integers(0, 5), max_size=5 * SEQUENCE_BLOCK + 7), stn.integers(0, 6), stn.integers(0, 6))
    def check(tokens, prefix_blocks, blocks):
        full = len(tokens) // SEQUENCE_BLOCK
        prefix_blocks, blocks = min(prefix_blocks, full), min(blocks, full)
        chain = _block_hashes(tokens[: prefix_blocks * SEQUENCE_BLOCK], prefix_blocks)
        assert _block_hashes(tokens, blocks, chain) == _block_hashes(tokens, blocks)

    check()


@pytest.mark.parametrize("byte_budget", [None, 10**12])
def test_input_state_auto_follows_the_budget_layout(make_marconi, byte_budget):
    """``input_state: "auto"`` (an experiment; the default has none): a request that creates no branch point
    also leaves a state at its input's end with SGLang's two pools (2 states),
    not under one byte budget, where that state costs the bytes of hundreds of
    KV tokens (1 state: the last decoded token's)."""
    built, drv = make_marconi(kv_slots=4096, mamba_slots=64, input_state="auto", byte_budget=byte_budget)
    res = drv.run(list(range(100, 160)), [7, 8, 9])
    assert res.states_admitted == (2 if byte_budget is None else 1)
    assert drv.tree_states() == res.states_admitted


# ------------------------------------------------- one byte budget: the recency marks


def _evict_one_by_one(built, k):
    """``k`` evictions from the single byte budget's queue, one per call."""
    built.cache.marconi.log_evictions = True
    for _ in range(k):
        assert built.cache.evict_to_bytes(built.cache.tree_bytes() - 1) == 1
    return [(end, tokens) for _, end, tokens, _ in built.cache.marconi.counters.eviction_log]


@pytest.mark.parametrize("mode,first", [("off", (24, 24)), ("marks", (44, 14)), ("all", (44, 14)), (None, (44, 14))])
def test_single_budget_marks_superseded_path_goes_first(make_marconi, mode, first):
    """One byte budget, ``superseded_first``: with ``single_budget_marks`` "marks"
    or "all" (the default, ``None`` here) the single queue evicts the tail r3
    branched away from (r1's 30..44, KV and state) before r2's older leaf;
    "off" is plain recency."""
    cfg = {} if mode is None else {"single_budget_marks": mode}
    built = _superseded_run(make_marconi, superseded_first=True, **cfg)
    assert _evict_one_by_one(built, 1) == [first]


@pytest.mark.parametrize("mode,order", [
    ("off", [(20, 0), (24, 4), (20, 20)]),
    ("marks", [(20, 0), (24, 4), (20, 20)]),
    ("all", [(20, 0), (10, 0), (24, 4)]),
    (None, [(20, 0), (10, 0), (24, 4)]),
])
def test_single_budget_marks_all_evicts_internal_states_before_leaves(make_marconi, mode, order):
    """``tombstones_first`` acts in the single queue only with "all" (the default,
    ``None`` here): r2's
    input-end state (internal, newer) goes before r1's last-token leaf (older).
    Without it the queue goes by age alone: r1's input-end state, r1's output
    leaf, then r1's input KV, a leaf with no state left (20 tokens freed)."""
    cfg = {} if mode is None else {"single_budget_marks": mode}
    built, drv = make_marconi(input_state=True, tombstones_first=True, **cfg)
    drv.run(toks(1000, 20), toks(5000, 5))
    drv.run(toks(2000, 10), toks(6000, 3))
    assert _evict_one_by_one(built, 3) == order


def test_single_budget_marks_config_error():
    from sglang_marconi.policy import parse_config
    from sglang_marconi.policy.config import MarconiConfigError

    with pytest.raises(MarconiConfigError, match="single_budget_marks='tombstones'"):
        parse_config({"single_budget_marks": "tombstones"})
