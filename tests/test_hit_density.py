"""Hit-density eviction (``utility_form: "density"``): the learned tables by hand,
the queue's order, and the events the real SGLang cache feeds it."""

from __future__ import annotations

import random

import pytest

from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from sglang_marconi.policy.config import MarconiConfigError, parse_config
from sglang_marconi.policy.hit_density import (
    BIN_MID,
    BIN_WIDTH,
    MIN_EVENTS,
    N_BINS,
    HitDensity,
    _bin_lo,
    age_bin,
    density_table,
    state_class,
)
from sglang_marconi.policy.utility import Candidate, EvictionQueue


def test_age_bins_are_log_spaced_and_cover_every_age():
    assert age_bin(0) == 0 and age_bin(-3) == 0
    assert [age_bin(a) for a in (1, 3, 7, 15)] == [4, 8, 12, 16]  # 4 bins per doubling
    assert age_bin(10**12) == N_BINS - 1
    for a in (0.5, 1, 2.5, 9, 100, 12345):
        b = age_bin(a)
        assert _bin_lo(b) <= a < _bin_lo(b + 1)
        assert BIN_WIDTH[b] > 0 and _bin_lo(b) < BIN_MID[b] < _bin_lo(b + 1)


def test_state_class_separates_length_buckets_and_children():
    assert state_class(1, False) == 0 and state_class(1, True) == 1
    assert state_class(1000, False) == 2 * 9  # 512 <= 1000 < 1024
    assert state_class(1023, True) == state_class(1000, True) != state_class(1024, True)
    assert state_class(10**12, False) == state_class(10**13, False)  # capped


def test_density_table_hand_computed():
    hits = [0.0] * N_BINS
    evictions = [0.0] * N_BINS
    hb, eb = age_bin(7), age_bin(100)
    hits[hb] = 3.0
    evictions[eb] = 1.0
    t = density_table(hits, evictions)
    # at the hit bin's lower edge: 3 hits ahead; expected remaining life sums
    # (mid - lo) over the 4 events ahead
    lo = _bin_lo(hb)
    assert t[hb] == pytest.approx(3.0 / (3 * (BIN_MID[hb] - lo) + (BIN_MID[eb] - lo)))
    # past the last hit only an eviction is ahead: density 0
    assert t[hb + 1] == 0.0 and t[eb] == 0.0 and t[-1] == 0.0
    # younger than the hits: same hits, longer life ahead -> lower density
    assert 0 < t[0] < t[hb]
    lo0 = _bin_lo(0)
    assert t[0] == pytest.approx(3.0 / (3 * (BIN_MID[hb] - lo0) + (BIN_MID[eb] - lo0)))


def test_density_rises_toward_a_known_reuse_age_then_falls():
    """States reused at age ~20 or never: the rank prefers those about to be reused
    over fresh ones (not LRU), and both over ones past the reuse age."""
    hd = HitDensity(period=1000, decay=1.0)
    for _ in range(50):
        hd.record(0, 20, hit=True)
        hd.record(0, 300, hit=False)
    hd.recompute()
    assert hd.density(0, 18) > hd.density(0, 1) > hd.density(0, 40) == 0.0


def test_before_learning_density_is_recency():
    hd = HitDensity()
    assert not hd.learned
    assert hd.density(5, 0) > hd.density(5, 3) > hd.density(5, 100)
    assert hd.density(5, 3) == pytest.approx(1 / 4)


def test_sparse_class_uses_the_pooled_table_and_periodic_rebuild_with_decay():
    hd = HitDensity(period=10, decay=0.5)
    for i in range(10):
        hd.record(2, 5, hit=True) if i % 2 else hd.record(2, 50, hit=False)
    assert hd.learned and hd.events == 10  # rebuilt at the 10th event
    assert sum(hd._hits[2]) == pytest.approx(5 * 0.5)  # then the counts decayed
    assert hd.density(2, 5) > 0 and hd.density(2, 60) == 0.0
    # class 4 has no events: the pooled table answers
    assert hd.density(4, 5) == hd.density(2, 5)
    for _ in range(int(MIN_EVENTS)):
        hd.record(4, 100, hit=True)
    hd.recompute()
    # class 4 has its own table now; class 2 (5 events of weight 0.5 < MIN_EVENTS)
    # falls back to the pooled one, which now sees class 4's late hits
    assert hd.density(4, 90) > 0 and hd.density(4, 5) < hd.density(4, 90)
    assert hd.density(2, 60) > 0


@pytest.mark.parametrize("period, decay", [(0, 0.9), (4, 0.0), (4, 1.5)])
def test_hit_density_rejects_bad_rates(period, decay):
    with pytest.raises(ValueError):
        HitDensity(period, decay)


@pytest.mark.parametrize("raw, key", [({"utility_form": "lhd"}, "utility_form"), ({"density_period": 0}, "density_period"),
                                      ({"density_decay": 0}, "density_decay"), ({"density_decay": 1.5}, "density_decay"),
                                      ({"density_value": "bytes"}, "density_value")])
def test_density_config_errors_name_the_key(raw, key):
    with pytest.raises(MarconiConfigError, match=key):
        parse_config(raw)


def _hot_and_cold_classes() -> HitDensity:
    """Class 0: always hit at age 10; class 1: always evicted at age 10."""
    hd = HitDensity(period=1000, decay=1.0)
    for _ in range(20):
        hd.record(0, 10, hit=True)
        hd.record(1, 10, hit=False)
    hd.recompute()
    return hd


def test_density_queue_orders_by_density_times_value_per_byte():
    hd = _hot_and_cold_classes()
    now = 100.0
    cands = [
        Candidate("young-hot", now - 3, flops_saved=100.0, nbytes=10, cls=0, tokens_saved=5),
        Candidate("young-cold-class", now - 3, flops_saved=1000.0, nbytes=10, cls=1, tokens_saved=50),
        Candidate("stale", now - 50, flops_saved=1000.0, nbytes=10, cls=0, tokens_saved=50),
        Candidate("young-hot-cheap", now - 3, flops_saved=10.0, nbytes=10, cls=0, tokens_saved=1),
    ]
    q = EvictionQueue(cands, 0.0, now, "density", density=hd)
    order = [q.pop().key for _ in range(4)]
    # density 0 first (no hits ever seen past age 10, or in class 1), older first on ties
    assert order == ["stale", "young-cold-class", "young-hot-cheap", "young-hot"]
    assert q.score(cands[0]) == pytest.approx(hd.density(0, 3) * 100.0 / 10)
    qt = EvictionQueue(cands, 0.0, now, "density", density=hd, value="tokens")
    assert qt.score(cands[0]) == pytest.approx(hd.density(0, 3) * 5 / 10)
    with pytest.raises(ValueError, match="density"):
        EvictionQueue(cands, 0.0, now, "density")


def test_density_queue_ranks_a_dead_candidate_first():
    """``Candidate.dead`` (``ended_in_density``: a conversation's likely last
    sequence): before every candidate the density rank scores, even one with
    density 0, and older first among the dead."""
    hd = _hot_and_cold_classes()
    now = 100.0
    cands = [
        Candidate("stale", now - 50, flops_saved=1000.0, nbytes=10, cls=0, tokens_saved=50),
        Candidate("young-hot-dead", now - 3, flops_saved=100.0, nbytes=10, cls=0, tokens_saved=5, dead=True),
        Candidate("young-hot", now - 3, flops_saved=100.0, nbytes=10, cls=0, tokens_saved=5),
        Candidate("older-dead", now - 4, flops_saved=100.0, nbytes=10, cls=0, tokens_saved=5, dead=True),
    ]
    q = EvictionQueue(cands, 0.0, now, "density", density=hd)
    assert [q.pop().key for _ in range(4)] == ["older-dead", "young-hot-dead", "stale", "young-hot"]
    # the recency forms do not read the flag (the state shifts the stamps there)
    q = EvictionQueue(cands, 0.0, now, "sum")
    assert [q.pop().key for _ in range(4)] == ["stale", "older-dead", "young-hot-dead", "young-hot"]


@pytest.mark.parametrize("flag", [False, True])
def test_ended_in_density_evicts_a_marked_sequence_first(make_marconi, flag):
    """Evicting by density (nothing learned yet: density ranks like recency),
    r1's sequence — newer, its ending (8, 9) taught final — goes before r2's
    only with ``ended_in_density``."""
    built, drv = make_marconi(kv_slots=4096, mamba_slots=32, utility_form="density", density_period=1000,
                              ended_first=True, end_tail_tokens=2, ended_in_density=flag)
    st = built.cache.marconi
    for _ in range(8):
        st.end_predictor.unanswered((8, 9))
    drv.run(toks(2000, 20), toks(6000, 5))   # r2: 0..24
    drv.run(toks(1000, 40), [7, 8, 9])       # r1: 0..42, marked
    assert st.counters.ended_marks == 1
    st.log_evictions = True
    built.cache.evict(EvictParams(num_tokens=1))
    assert [end for _, end, _, _ in st.counters.eviction_log] == ([42] if flag else [24])


# ------------------------------------------------------------------ through the real cache


def toks(start, n):
    return list(range(start, start + n))


def test_cache_feeds_hits_and_evictions_to_the_density_model(make_marconi):
    built, drv = make_marconi(utility_form="density", density_period=1000)
    st = built.cache.marconi
    assert st.tuner is None and st.hit_density is not None
    a = toks(1000, 40)
    drv.run(a, [1])
    t0 = st.clock
    drv.run(a + toks(5000, 10), [1])  # hits a's last-token state
    hd = st.hit_density
    assert hd.events == 1
    cls = state_class(40, False)
    assert sum(hd._hits[cls]) == 1.0
    # the hit was recorded at the age the state had when the match ticked the clock
    assert hd._hits[cls][age_bin(t0 + 1 - t0)] == 1.0
    drv.run(toks(9000, 30), [1])
    res = built.cache.evict(EvictParams(num_tokens=0, mamba_num=3))
    assert res.mamba_num_evicted == 3
    assert st.counters.state_evictions == 3 and hd.events == 4
    assert sum(sum(r) for r in hd._evictions.values()) == 3.0


def test_density_keeps_the_class_that_gets_reused(make_marconi):
    """Sessions of one length are always continued, one-shot prompts of another
    never are: once learned, the density rank evicts a fresh one-shot state before
    an older session state (LRU would evict the older one)."""
    built, drv = make_marconi(kv_slots=1 << 16, mamba_slots=256, utility_form="density", density_period=8)
    st = built.cache.marconi
    rng = random.Random(0)
    base = 10_000
    for i in range(12):
        sess = toks(base * (i + 1), 300)  # 256..511 tokens
        drv.run(sess, [1])
        for j in range(rng.randint(1, 3)):  # the session's state is hit at ages 3, 5 or 7
            drv.run(toks(base * (i + 1) + 1000 * (j + 1), 40), [1])  # 32..63 tokens, never reused
        drv.run(sess + [rng.randrange(1, 100)], [1])  # the session continues: a hit on its state
        built.cache.evict(EvictParams(num_tokens=0, mamba_num=3))
    assert st.hit_density.learned
    built.cache.evict(EvictParams(num_tokens=10**9, mamba_num=10**9))
    assert _state_nodes(built) == []
    old_session = toks(base * 20, 300)
    drv.run(old_session, [1])
    fresh_one_shot = toks(base * 21, 40)
    drv.run(fresh_one_shot, [1])
    assert sorted(st.node_end(n) for n in _state_nodes(built)) == [40, 300]
    built.cache.evict(EvictParams(num_tokens=0, mamba_num=1))
    assert [_path(built, n) for n in _state_nodes(built)] == [old_session]


def _walk(node):
    for c in node.children.values():
        yield c
        yield from _walk(c)


def _path(built, node):
    parts = []
    root = built.cache.tree_core.root_node
    while node is not root:
        parts.append(list(node.key.token_ids))
        node = node.parent
    return [t for p in reversed(parts) for t in p]


def _state_nodes(built):
    from sglang.srt.mem_cache.unified_cache.components.base import ComponentType

    return [n for n in _walk(built.cache.tree_core.root_node) if n.component_data[ComponentType.MAMBA].value is not None]


def test_dead_first_rank_is_recency_among_live_states():
    """dead_first: predicted-dead states first, then oldest first whatever their
    value; full: by density x value per byte, so a cheap young state can go
    before a valuable old one."""
    hd = _hot_and_cold_classes()
    now = 100.0
    cands = [
        Candidate("live-old-valuable", now - 8, flops_saved=1e6, nbytes=10, cls=0),
        Candidate("live-young-cheap", now - 2, flops_saved=1.0, nbytes=10, cls=0),
        Candidate("dead-young", now - 1, flops_saved=1e6, nbytes=10, cls=1),
    ]
    q = EvictionQueue(cands, 0.0, now, "density", density=hd, density_rank="dead_first")
    assert [q.pop().key for _ in range(3)] == ["dead-young", "live-old-valuable", "live-young-cheap"]
    q = EvictionQueue(cands, 0.0, now, "density", density=hd, density_rank="full")
    assert [q.pop().key for _ in range(3)] == ["dead-young", "live-young-cheap", "live-old-valuable"]


def _edit_history_session(drv, base, fillers=0):
    """An agent turn that edits its history: three requests on one 300-token
    prefix. The 2nd branches off the 1st there (a new state at 300, never hit
    yet); the 3rd, after ``fillers`` one-shot requests, hits that state once.
    Returns the three inputs."""
    prefix = toks(base, 300)
    reqs = [prefix + toks(base + 1000 * (k + 1), 40) for k in range(3)]
    for k, r in enumerate(reqs):
        if k == 2:
            for f in range(fillers):
                drv.run(toks(base + 5000 + 100 * f, 20), [1])
        drv.run(r, [1])
    return reqs


def test_density_reuse_class_evicts_a_branch_state_once_hit(make_marconi):
    """Branch states that are hit once and never again (history edits): with
    ``density_reuse`` the learned rank evicts the young, already-hit branch state
    before an older branch state that was not hit yet (LRU and the rank without
    the reuse split keep both in one class, ordered by age)."""
    built, drv = make_marconi(kv_slots=1 << 16, mamba_slots=256, utility_form="density", density_period=8,
                              density_reuse=True)
    st = built.cache.marconi
    for i in range(24):
        _edit_history_session(drv, 10_000 * (i + 1), fillers=6)
        built.cache.evict(EvictParams(num_tokens=0, mamba_num=6))
    assert st.hit_density.learned
    built.cache.evict(EvictParams(num_tokens=10**9, mamba_num=10**9))
    assert _state_nodes(built) == []
    not_hit_yet = toks(10_000 * 40, 300)
    drv.run(not_hit_yet + toks(10_000 * 40 + 1000, 40), [1])
    drv.run(not_hit_yet + toks(10_000 * 40 + 2000, 40), [1])  # a branch state at 300, not hit
    hit_once = _edit_history_session(drv, 10_000 * 41)[0][:300]  # its branch state hit once, just now
    branch = {tuple(_path(built, n)): n for n in _state_nodes(built) if st.node_end(n) == 300}
    assert set(branch) == {tuple(not_hit_yet), tuple(hit_once)}
    assert st.state_class(branch[tuple(hit_once)]) == state_class(300, True, reused=True)
    assert st.state_class(branch[tuple(not_hit_yet)]) == state_class(300, True, reused=False)
    # the state pool's rank of the two branch states (as an eviction call scores them)
    nodes = [branch[tuple(hit_once)], branch[tuple(not_hit_yet)]]
    q = st.eviction_queue([st.candidate(n, frees_kv=False) for n in nodes])
    assert q.pop().key is branch[tuple(hit_once)]
    # LRU order (and one merged class, ranked by age) would evict the older one first
    assert branch[tuple(not_hit_yet)].marconi_t < branch[tuple(hit_once)].marconi_t


def test_density_reuse_bookkeeping_through_the_cache(make_marconi):
    """A hit is recorded under the class the state had (never hit), then the state
    moves to the reused class; a state re-admitted at the same node starts fresh;
    without ``density_reuse`` the class never changes."""
    for reuse in (True, False):
        built, drv = make_marconi(kv_slots=1 << 16, mamba_slots=256, utility_form="density", density_period=1000,
                                  density_reuse=reuse, state_candidates="all")
        st = built.cache.marconi
        hd = st.hit_density
        prefix = toks(50_000, 300)
        drv.run(prefix + toks(60_000, 40), [1])
        drv.run(prefix + toks(61_000, 40), [1])  # branch state at 300
        (node,) = [n for n in _state_nodes(built) if st.node_end(n) == 300]
        fresh = state_class(300, True, reused=False)
        assert st.state_class(node) == fresh
        drv.run(prefix + toks(62_000, 40), [1])  # hits it
        assert sum(hd._hits[fresh]) == 1.0
        assert st.state_class(node) == state_class(300, True, reused=reuse)
        # free only that state (the leaves locked), then re-admit one there
        leaves = [n for n in _state_nodes(built) if n is not node]
        locks = [(n, built.cache.inc_lock_ref(n.id).to_dec_params()) for n in leaves]
        built.cache.evict(EvictParams(num_tokens=0, mamba_num=1))
        assert node not in _state_nodes(built) and node.parent is not None  # a tombstone, still in the tree
        for n, lock in locks:
            built.cache.dec_lock_ref(n.id, lock)
        drv.run(prefix + toks(63_000, 40), [1])  # branch point at 300 again: a new state there
        (again,) = [n for n in _state_nodes(built) if st.node_end(n) == 300]
        assert again is node and st.state_class(again) == fresh


def test_state_class_reuse_adds_classes_and_keeps_the_others():
    assert state_class(300, True, reused=False) == state_class(300, True)
    ids = {state_class(e, c, r) for e in (1, 300, 10**9) for c in (False, True) for r in (False, True)}
    assert len(ids) == 12
