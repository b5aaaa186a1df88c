"""utility_form "leader": the selector by hand, and its shadow caches against standalone caches."""

from __future__ import annotations

import dataclasses
import random

import pytest

from sglang_marconi.policy.leader import DENSITY, DENSITY_REUSE, RECENCY, LeaderSelector

POOLS = dict(kv_slots=900, mamba_slots=12, kv_budget=160, state_budget=5)
BASE = dict(input_state=True, tombstones_first=True, density_period=4)


def test_selector_by_hand():
    s = LeaderSelector(horizon=2.0, margin=0.2, guard=0.1, hold=0)  # scores keep half of themselves per request
    assert s.observe({RECENCY: 10, DENSITY: 10}, 10) is None
    assert s.scores == {RECENCY: 10.0, DENSITY: 10.0} and s.live == 10.0
    # density 5 + 13 = 18 vs 1.2 * max(recency 5 + 10 = 15, live 5 + 10 = 15) = 18: not more, stay
    assert s.observe({RECENCY: 10, DENSITY: 13}, 10) is None
    # density 9 + 14 = 23 > 1.2 * max(7.5 + 10, 7.5 + 10) = 21
    assert s.observe({RECENCY: 10, DENSITY: 14}, 10) == DENSITY
    assert s.current == DENSITY and s.switches == 1
    # on density: recency 8.75 + 10 = 18.75, density 11.5 + 10 = 21.5, live 8.75 + 9 = 17.75 >= 0.9 * 18.75
    assert s.observe({RECENCY: 10, DENSITY: 10}, 9) is None
    # live 8.875 + 0 = 8.875 < 0.9 * (9.375 + 10): the lead did not carry over -> recency,
    # and density's score restarts from recency's
    assert s.observe({RECENCY: 10, DENSITY: 10}, 0) == RECENCY
    assert s.scores[DENSITY] == s.scores[RECENCY] == 19.375
    assert s.switches == 2 and s.observed == 5


def test_the_guard_waits_its_grace_after_a_takeover():
    """``guard_grace``: the live cache falling below recency's shadow hands back
    only after that many requests on the challenger; a lead of recency's shadow
    by the margin hands back at once."""
    s = LeaderSelector(horizon=1.0, margin=0.5, guard=0.1, hold=0, guard_grace=2)  # horizon 1: the last request alone
    assert s.observe({RECENCY: 10, DENSITY: 20}, 10) == DENSITY
    assert s.observe({RECENCY: 10, DENSITY: 10}, 0) is None      # 1st request on density: live 0 < 9, in grace
    assert s.observe({RECENCY: 10, DENSITY: 10}, 0) is None      # 2nd: still in grace
    assert s.observe({RECENCY: 10, DENSITY: 10}, 0) == RECENCY   # 3rd: the guard applies
    s = LeaderSelector(horizon=1.0, margin=0.5, guard=0.1, hold=0, guard_grace=2)
    assert s.observe({RECENCY: 10, DENSITY: 20}, 10) == DENSITY
    assert s.observe({RECENCY: 16, DENSITY: 10}, 16) == RECENCY  # recency's shadow leads: no grace
    assert s.since_switch == 0
    s = LeaderSelector(horizon=1.0, margin=0.5, guard=0.1, hold=0)  # no grace: the first such request hands back
    assert s.observe({RECENCY: 10, DENSITY: 20}, 10) == DENSITY
    assert s.observe({RECENCY: 10, DENSITY: 10}, 0) == RECENCY


def test_selector_hands_back_when_recency_leads():
    s = LeaderSelector(horizon=1.0, margin=0.5, guard=0.0, hold=0)  # horizon 1: the last request alone
    assert s.observe({RECENCY: 1, DENSITY: 2}, 1) == DENSITY
    assert s.observe({RECENCY: 3, DENSITY: 2}, 3) is None  # 3 is not > 1.5 * 2
    assert s.observe({RECENCY: 4, DENSITY: 2}, 4) == RECENCY  # 4 > 3
    assert s.scores[DENSITY] == 2  # handed back on the margin: no reset


def test_selector_waits_for_a_lead_that_holds():
    s = LeaderSelector(horizon=1.0, margin=0.0, guard=0.0, hold=2)
    lead, even = {RECENCY: 1, DENSITY: 2}, {RECENCY: 1, DENSITY: 1}
    assert [s.observe(lead, 1), s.observe(lead, 1), s.observe(even, 1)] == [None, None, None]  # run broken
    assert [s.observe(lead, 1), s.observe(lead, 1), s.observe(lead, 1)] == [None, None, DENSITY]  # 3 > hold


def test_selector_with_two_challengers_by_hand():
    s = LeaderSelector(horizon=1.0, margin=0.5, guard=0.0, hold=0, challengers=(DENSITY, DENSITY_REUSE))
    assert s.scores == {RECENCY: 0.0, DENSITY: 0.0, DENSITY_REUSE: 0.0}
    # both lead recency by more than 50%: the higher score takes over
    assert s.observe({RECENCY: 2, DENSITY: 4, DENSITY_REUSE: 5}, 2) == DENSITY_REUSE
    # on density-reuse, plain density must beat it (and recency, and the live cache) by the margin
    assert s.observe({RECENCY: 2, DENSITY: 7, DENSITY_REUSE: 5}, 5) is None  # 7 is not > 1.5 * 5
    assert s.observe({RECENCY: 2, DENSITY: 8, DENSITY_REUSE: 5}, 5) == DENSITY  # 8 > 7.5
    # ... and a challenger hands back to recency as before
    assert s.observe({RECENCY: 9, DENSITY: 6, DENSITY_REUSE: 5}, 6) == RECENCY  # 9 > 1.5 * 6
    assert s.switches == 3
    with pytest.raises(ValueError, match="challengers"):
        LeaderSelector(challengers=(RECENCY,))
    with pytest.raises(ValueError, match="challengers"):
        LeaderSelector(challengers=())


def _requests(seed, n=60):
    """Multi-turn sessions with shared system prompts: turns extend, sessions interleave."""
    rng = random.Random(seed)
    systems = [list(range(1000 * k + 1, 1000 * k + 1 + rng.randint(8, 20))) for k in range(2)]
    ctx = {}
    out = []
    for _ in range(n):
        s = rng.randrange(7)
        base = ctx.get(s) or (systems[s % 2] + [50_000 + s])
        inp = base + [rng.randrange(3, 30_000) for _ in range(rng.randint(2, 25))]
        gen = [rng.randrange(3, 30_000) for _ in range(rng.randint(1, 12))]
        ctx[s] = inp + gen
        out.append((inp, gen))
    return out


def _hits(drv, reqs):
    return [drv.run(i, o).hit_len for i, o in reqs]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shadows_match_standalone_caches(make_marconi, seed):
    reqs = _requests(seed)
    built, drv = make_marconi(**POOLS, **BASE, utility_form="leader")
    _hits(drv, reqs)
    st = built.cache.marconi
    shadows = st.shadows._inline.drivers
    _, rec = make_marconi(**POOLS, **BASE)
    _, den = make_marconi(**POOLS, **BASE, utility_form="density")
    _, reu = make_marconi(**POOLS, **BASE, utility_form="density", density_reuse=True)
    rec_hits, den_hits, reu_hits = _hits(rec, reqs), _hits(den, reqs), _hits(reu, reqs)
    assert set(shadows) == {RECENCY, DENSITY, DENSITY_REUSE}
    assert shadows[RECENCY].cache.marconi.counters.hit_tokens == sum(rec_hits)
    assert shadows[DENSITY].cache.marconi.counters.hit_tokens == sum(den_hits)
    assert shadows[DENSITY_REUSE].cache.marconi.counters.hit_tokens == sum(reu_hits)
    assert st.leader.observed == len(reqs)
    assert rec_hits != den_hits  # the two orders really differ on these requests


@pytest.mark.parametrize("seed", [0, 3])
def test_live_cache_evicts_like_the_order_it_follows(make_marconi, seed):
    reqs = _requests(seed)
    _, rec = make_marconi(**POOLS, **BASE)
    _, den = make_marconi(**POOLS, **BASE, utility_form="density")
    # never leaves recency (no lead is infinite): the live cache is the default order, hit for hit
    _, stay = make_marconi(**POOLS, **BASE, utility_form="leader", leader_margin=1e9)
    assert _hits(stay, reqs) == _hits(rec, reqs)
    # put on density before the first request and left there: hit for hit the density cache
    built, dens = make_marconi(**POOLS, **BASE, utility_form="leader")
    st = built.cache.marconi
    st.use_order(DENSITY)
    st.shadows = None
    assert _hits(dens, reqs) == _hits(den, reqs)
    # the same on density with the reuse classes
    _, reu = make_marconi(**POOLS, **BASE, utility_form="density", density_reuse=True)
    built, on_reuse = make_marconi(**POOLS, **BASE, utility_form="leader")
    built.cache.marconi.use_order(DENSITY_REUSE)
    built.cache.marconi.shadows = None
    assert _hits(on_reuse, reqs) == _hits(reu, reqs)
    # without the third order the leader runs two shadows
    built, _ = make_marconi(**POOLS, **BASE, utility_form="leader", leader_density_reuse=False)
    assert built.cache.marconi.leader.challengers == (DENSITY,)


def test_leader_switches_and_reports(make_marconi):
    from sglang_marconi.sglang_backend import metrics

    reqs = _requests(5, n=80)
    built, drv = make_marconi(**POOLS, **BASE, utility_form="leader", leader_horizon=3, leader_margin=0.0, leader_hold=0,
                              leader_guard=0.0)
    _hits(drv, reqs)
    st = built.cache.marconi
    assert st.counters.leader_switches == st.leader.switches > 0
    vals = metrics.snapshot(built.cache)
    assert vals["marconi_leader_switches"] == st.leader.switches
    assert vals["marconi_leader_density"] == float(st.leader.current != RECENCY)
    assert vals["marconi_leader_replayed"] == len(reqs)


def test_switching_to_density_adopts_the_shadows_tables(make_marconi):
    reqs = _requests(5, n=80)
    built, drv = make_marconi(**POOLS, **BASE, utility_form="leader", leader_horizon=3, leader_margin=0.0,
                              leader_hold=0)
    st = built.cache.marconi
    observe = st.observe_shadows
    adopted = []

    def watch(results):
        before = st.leader.current
        observe(results)
        if before == RECENCY and st.leader.current != RECENCY:  # right at the switch
            shadow = st.shadows._inline.drivers[st.leader.current].cache.marconi.hit_density
            assert st.hit_density is not shadow
            assert (st.hit_density.events, st.hit_density._tables) == (shadow.events, shadow._tables)
            adopted.append(st.hit_density.events)

    st.observe_shadows = watch
    for i, o in reqs:
        drv.run(i, o)
    assert adopted and all(n > 0 for n in adopted)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_off_thread_shadows_give_the_inline_results(make_marconi, mode):
    from sglang_marconi.sglang_backend import shadow
    from sglang_marconi.sglang_backend.shadow import ShadowRunner

    reqs = _requests(7, n=30)
    built, _ = make_marconi(**POOLS, **BASE, utility_form="leader")
    inline = built.cache.marconi.shadows
    spec = inline.spec
    off = ShadowRunner(dataclasses.replace(spec, config=dataclasses.replace(spec.config, tuner=mode)))
    try:
        want, got = [], []
        for k, (i, o) in enumerate(reqs):
            want += inline.submit(i, o, k)
            got += off.submit(i, o, k)
        got += off.wait(timeout=120)
        assert got == want and len(got) == len(reqs)
    finally:
        off.close()
    assert off.key not in shadow._WORKER_SHADOWS  # nothing left behind in this process


def test_a_slow_worker_skips_requests_instead_of_queueing_without_bound(make_marconi, monkeypatch, caplog):
    from sglang_marconi.sglang_backend import shadow

    monkeypatch.setattr(shadow, "MAX_PENDING", 3)
    built, _ = make_marconi(**POOLS, **BASE, utility_form="leader", tuner="thread")
    runner = built.cache.marconi.shadows
    gate = __import__("threading").Event()
    monkeypatch.setattr(shadow, "_feed_batch", lambda key, spec, batch: (gate.wait(30), ([], None))[1])
    reqs = _requests(4, n=6)
    for k, (i, o) in enumerate(reqs):  # the first goes to the (blocked) worker, 3 queue, 2 are skipped
        runner.submit(i, o, k)
    assert runner.dropped == 2 and len(runner._pending) == 3
    assert "fell 3 requests behind" in caplog.text
    gate.set()
    runner.wait(timeout=30)
    assert not runner._pending


def test_a_failing_shadow_job_keeps_serving(make_marconi, monkeypatch, caplog):
    from sglang_marconi.sglang_backend import shadow

    built, drv = make_marconi(**POOLS, **BASE, utility_form="leader", tuner="thread")
    st = built.cache.marconi
    calls = []

    def boom(self, i, o):
        calls.append(1)
        raise RuntimeError("shadow replay broke")

    monkeypatch.setattr(shadow.ShadowCaches, "feed", boom)
    reqs = _requests(2, n=6)
    for i, o in reqs:
        drv.run(i, o)
    st.drain_shadows(timeout=60)
    assert calls and st.shadows.failures >= 1
    assert "shadow caches failed" in caplog.text
    assert st.leader.current == RECENCY and st.leader.observed == 0
    monkeypatch.undo()
    drv.run(*reqs[0])  # rebuilt empty, fed again
    st.drain_shadows(timeout=60)
    assert st.leader.observed >= 1
