"""AlphaTuner: window arithmetic with a fake replay, and two end-to-end tunings
with the real replay (``tuning.replay_alphas``) on the real cache."""

from __future__ import annotations

import threading

import pytest

from sglang_marconi.policy.config import parse_config
from sglang_marconi.policy.tuner import AlphaTuner, best_alpha

GRID = [0.0, 0.5, 1.0, 2.0]


class FakeReplay:
    """Records calls; returns ``scores`` (a dict, or a callable of the call number)."""

    def __init__(self, scores=None, *, gate: threading.Event | None = None, fail: bool = False):
        self.scores = scores if scores is not None else {0.0: 1.0, 0.5: 3.0, 1.0: 2.0, 2.0: 0.0}
        self.calls = []
        self.gate = gate
        self.fail = fail
        self.started = threading.Event()

    def __call__(self, spec, warmup, window, alphas):
        self.calls.append({"spec": spec, "warmup": list(warmup), "window": list(window), "alphas": list(alphas)})
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(timeout=60), "test gate never opened"
        if self.fail:
            raise RuntimeError("replay failed")
        s = self.scores(len(self.calls)) if callable(self.scores) else self.scores
        return {a: s[a] for a in alphas if a in s}  # like the real replay: the α values asked for


def req(i):
    return ((i, i + 1, i + 2), (i + 3,))


#: The paper's tuner mechanics (cold first window, no memory, no hold-out);
#: the window arithmetic below is written against them. The default's extra
#: rules have their own tests at the end of this file.
PAPER_MECHANICS = {"warm_start": False, "confirm": False, "switch_margin": 0.0, "score_decay": 0.0}


def make_tuner(replay, **cfg):
    cfg.setdefault("alpha", "auto")
    cfg.setdefault("tuner", "inline")
    cfg.setdefault("alpha_grid", GRID)
    for k, v in PAPER_MECHANICS.items():
        cfg.setdefault(k, v)
    return AlphaTuner(parse_config(cfg), replay, spec="SPEC")


def feed(tuner, start, n):
    for i in range(start, start + n):
        tuner.on_request_finished(*req(i))
    return start + n


# ------------------------------------------------------------------ best_alpha


def test_best_alpha_max_flops_and_ties_to_smaller():
    assert best_alpha({0.0: 1.0, 0.5: 3.0, 1.0: 2.0}) == 0.5
    assert best_alpha({0.0: 5.0, 0.5: 5.0, 1.0: 5.0}) == 0.0
    assert best_alpha({2.0: 7.0, 0.3: 7.0, 1.0: 6.0}) == 0.3
    assert best_alpha({1.5: 0.0}) == 1.5


# ------------------------------------------------------------------ window arithmetic


def test_alpha_zero_until_first_eviction_then_window_of_m_n0():
    fake = FakeReplay()
    t = make_tuner(fake, window_multiplier=5)
    assert t.alpha == 0.0 and t.window is None
    nxt = feed(t, 0, 50)
    assert fake.calls == [] and t.alpha == 0.0 and t.n0 is None
    # first eviction after 50 requests: N0 = 50 -> W = 250
    t.on_eviction()
    assert t.n0 == 50 and t.window == 250 and t.next_tune_at == 250
    t.on_eviction()  # later evictions change nothing
    assert t.n0 == 50 and t.next_tune_at == 250
    nxt = feed(t, nxt, 199)
    assert fake.calls == [] and t.requests_seen == 249 and t.alpha == 0.0
    nxt = feed(t, nxt, 1)  # request 250
    assert len(fake.calls) == 1
    call = fake.calls[0]
    # the first window is the whole trace so far, replayed from an empty cache
    assert call["window"] == [req(i) for i in range(250)]
    assert call["warmup"] == []
    assert call["alphas"] == GRID
    assert call["spec"] == "SPEC"
    assert t.alpha == 0.5
    ev = t.events[0]
    assert (ev.at_request, ev.window, ev.alpha) == (250, 250, 0.5)
    assert ev.scores == fake.scores


def test_eviction_before_any_request_gives_n0_one():
    fake = FakeReplay()
    t = make_tuner(fake, window_multiplier=3)
    t.on_eviction()
    assert t.n0 == 1 and t.window == 3
    feed(t, 0, 2)
    assert fake.calls == []
    feed(t, 2, 1)
    assert len(fake.calls) == 1 and fake.calls[0]["window"] == [req(0), req(1), req(2)]


def test_retune_every_window_with_previous_window_as_warmup():
    fake = FakeReplay(scores=lambda k: {0.0: 0.0, 0.5: float(k == 1), 1.0: float(k == 2), 2.0: float(k >= 3)})
    t = make_tuner(fake, window_multiplier=2)
    feed(t, 0, 4)
    t.on_eviction()  # N0 = 4, W = 8
    assert t.next_tune_at == 8
    feed(t, 4, 4)  # request 8 -> tune #1
    assert len(fake.calls) == 1 and t.alpha == 0.5 and t.next_tune_at == 16
    feed(t, 8, 7)
    assert len(fake.calls) == 1
    feed(t, 15, 1)  # request 16 -> tune #2
    assert len(fake.calls) == 2 and t.alpha == 1.0
    c2 = fake.calls[1]
    assert c2["window"] == [req(i) for i in range(8, 16)]
    assert c2["warmup"] == [req(i) for i in range(0, 8)]
    feed(t, 16, 8)  # request 24 -> tune #3
    assert len(fake.calls) == 3 and t.alpha == 2.0
    assert fake.calls[2]["window"] == [req(i) for i in range(16, 24)]
    assert [e.at_request for e in t.events] == [8, 16, 24]
    assert [e.alpha for e in t.events] == [0.5, 1.0, 2.0]


def test_tune_once_when_retune_false():
    fake = FakeReplay()
    t = make_tuner(fake, window_multiplier=2, retune=False)
    feed(t, 0, 3)
    t.on_eviction()  # W = 6
    feed(t, 3, 100)
    assert len(fake.calls) == 1 and t.next_tune_at is None
    assert t.events[0].at_request == 6 and t.alpha == 0.5


def test_window_bounded_by_tuner_max_requests():
    fake = FakeReplay()
    t = make_tuner(fake, window_multiplier=5, tuner_max_requests=7)
    feed(t, 0, 4)
    t.on_eviction()  # W = 20 > 7
    feed(t, 4, 16)
    assert len(fake.calls) == 1
    assert fake.calls[0]["window"] == [req(i) for i in range(13, 20)]
    assert fake.calls[0]["warmup"] == []
    assert t.events[0].window == 7
    feed(t, 20, 20)  # next window at 40: warm-up = the 7 before the last 7
    assert len(fake.calls) == 2
    assert fake.calls[1]["window"] == [req(i) for i in range(33, 40)]
    assert fake.calls[1]["warmup"] == [req(i) for i in range(26, 33)]


def test_ties_go_to_smaller_alpha():
    fake = FakeReplay(scores={0.0: 2.0, 0.5: 9.0, 1.0: 9.0, 2.0: 9.0})
    t = make_tuner(fake, window_multiplier=1)
    feed(t, 0, 1)
    t.on_eviction()
    feed(t, 1, 1)
    assert t.alpha == 0.5
    fake2 = FakeReplay(scores={a: 0.0 for a in GRID})
    t2 = make_tuner(fake2, window_multiplier=1)
    feed(t2, 0, 1)
    t2.on_eviction()
    feed(t2, 1, 1)
    assert t2.alpha == 0.0


def test_fixed_alpha_never_tunes():
    fake = FakeReplay()
    t = make_tuner(fake, alpha=0.7, window_multiplier=1)
    assert t.fixed and t.alpha == 0.7
    feed(t, 0, 3)
    t.on_eviction()
    feed(t, 3, 50)
    assert fake.calls == [] and t.alpha == 0.7 and t.n0 is None
    assert t.requests_seen == 53


# ------------------------------------------------------------------ background modes


def test_thread_mode_swaps_alpha_on_wait():
    gate = threading.Event()
    fake = FakeReplay(gate=gate)
    t = make_tuner(fake, window_multiplier=1, tuner="thread")
    try:
        feed(t, 0, 2)
        t.on_eviction()  # N0 = 2, W = 2: the window is already complete
        feed(t, 2, 1)  # request 3 launches a job
        assert fake.started.wait(timeout=60)
        feed(t, 3, 1)  # request 4: nothing due, the job is still running
        # the job is blocked: α unchanged, nothing applied by poll
        t.poll()
        assert t.alpha == 0.0 and t.events == []
        gate.set()
        t.wait(timeout=60)
        assert t.alpha == 0.5 and len(t.events) == 1
        assert t.events[0].at_request == 3 and t.events[0].window == 2
    finally:
        gate.set()
        t.close()


def test_thread_mode_swaps_alpha_on_poll():
    fake = FakeReplay(scores={0.0: 0.0, 0.5: 0.0, 1.0: 0.0, 2.0: 4.0})
    t = make_tuner(fake, window_multiplier=1, tuner="thread")
    try:
        feed(t, 0, 1)
        t.on_eviction()
        feed(t, 1, 1)
        fut = t._future
        assert fut is not None
        fut.result(timeout=60)  # the job is done but not applied yet
        assert t.alpha == 0.0
        t.poll()
        assert t.alpha == 2.0 and t._future is None
        t.poll()  # idempotent
        assert t.alpha == 2.0 and len(t.events) == 1
    finally:
        t.close()


def test_failing_replay_keeps_alpha():
    fake = FakeReplay(fail=True)
    t = make_tuner(fake, window_multiplier=1, tuner="thread", alpha_grid=GRID)
    try:
        feed(t, 0, 1)
        t.on_eviction()
        feed(t, 1, 1)
        t.wait(timeout=60)
        assert t.alpha == 0.0 and t.events == [] and t._future is None
        # it keeps serving and tunes again at the next window
        fake.fail = False
        feed(t, 2, 1)
        t.wait(timeout=60)
        assert t.alpha == 0.5 and len(t.events) == 1
    finally:
        t.close()


def test_failing_replay_keeps_previously_tuned_alpha():
    outcomes = iter([{0.0: 0.0, 0.5: 0.0, 1.0: 5.0, 2.0: 0.0}, RuntimeError("boom")])

    def replay(spec, warmup, window, alphas):
        o = next(outcomes)
        if isinstance(o, Exception):
            raise o
        return o

    t = make_tuner(replay, window_multiplier=1, tuner="thread")
    try:
        feed(t, 0, 1)
        t.on_eviction()
        feed(t, 1, 1)
        t.wait(timeout=60)
        assert t.alpha == 1.0
        feed(t, 2, 1)
        t.wait(timeout=60)
        assert t.alpha == 1.0 and len(t.events) == 1
    finally:
        t.close()


def test_inline_failing_replay_keeps_alpha():
    fake = FakeReplay(fail=True)
    t = make_tuner(fake, window_multiplier=1)  # inline
    feed(t, 0, 1)
    t.on_eviction()
    feed(t, 1, 1)  # the window is due: the replay fails; serving must go on
    assert t.alpha == 0.0 and t.events == []
    assert t.next_tune_at == 3
    feed(t, 2, 1)
    assert len(fake.calls) == 2


def test_window_skipped_while_a_job_is_in_flight():
    gate = threading.Event()
    fake = FakeReplay(gate=gate)
    t = make_tuner(fake, window_multiplier=1, tuner="thread")
    try:
        feed(t, 0, 2)
        t.on_eviction()  # W = 2, due at once
        feed(t, 2, 2)  # request 3: job 1 launched (next due at 5)
        assert fake.started.wait(timeout=60)
        feed(t, 4, 2)  # request 5: job 1 still running -> skipped (next due at 7)
        assert t.skipped_windows == 1
        feed(t, 6, 2)  # request 7: skipped again (next due at 9)
        assert t.skipped_windows == 2
        assert len(fake.calls) == 1
        gate.set()
        t.wait(timeout=60)
        assert t.alpha == 0.5 and len(t.events) == 1
        # next window launches normally, with the previous window as warm-up
        feed(t, 8, 2)  # request 9 launches, request 10 is not due
        t.wait(timeout=60)
        assert len(fake.calls) == 2 and len(t.events) == 2
        assert fake.calls[1]["window"] == [req(7), req(8)]
        assert fake.calls[1]["warmup"] == [req(5), req(6)]
        assert t.events[1].at_request == 9
    finally:
        gate.set()
        t.close()


def test_close_is_idempotent_and_inline_needs_no_executor():
    fake = FakeReplay()
    t = make_tuner(fake, window_multiplier=1)
    feed(t, 0, 1)
    t.on_eviction()
    feed(t, 1, 1)
    assert t._executor is None and t.alpha == 0.5
    t.close()
    t.close()


# ------------------------------------------------------------------ end-to-end (real replay)


def _fresh_counter(start=10**6):
    nxt = [start]

    def fresh(n):
        out = list(range(nxt[0], nxt[0] + n))
        nxt[0] += n
        return out

    return fresh


def long_context_workload(rounds=6, n_sessions=3, doc=2000, shorts=6):
    """Sessions over a long private document (thousands of tokens), each
    re-queried once per round as the next turn of its conversation, interleaved
    with floods of short one-off requests that are recent but never reused.

    Under a tight state budget pure recency (α = 0) evicts each session's
    state while the shorts pour in, so no session ever hits. Any α > 0 sees
    that a session state saves thousands of tokens of prefill per byte while a
    short one-off's state is mostly state bytes for a few tokens, and keeps the
    sessions."""
    fresh = _fresh_counter()
    hist = {s: fresh(doc) for s in range(n_sessions)}
    reqs = []
    for _ in range(rounds):
        for s in range(n_sessions):
            inp = hist[s] + fresh(10)
            out = fresh(5)
            reqs.append((tuple(inp), tuple(out)))
            hist[s] = inp + out
            for _ in range(shorts):
                reqs.append((tuple(fresh(20)), tuple(fresh(3))))
    return reqs


def recency_workload(n_pairs=4, turns=6):
    """Two conversations at a time, strictly alternating, then never seen again:
    the state reused next is always one of the two most recent leaves. Every
    turn has the same shape (10 new input tokens, 10 output tokens).

    Efficiency cannot help: the older states in a conversation's chain (internal
    nodes: their eviction frees only a state, so their FLOPs per byte are the
    highest) are never reused, and any α > 0 keeps them at the expense of the
    other conversation's newest leaf, which is exactly the one reused next."""
    fresh = _fresh_counter()
    reqs = []
    for _ in range(n_pairs):
        h = {0: fresh(50), 1: fresh(50)}
        for _ in range(turns):
            for s in (0, 1):
                inp = h[s] + fresh(10)
                out = fresh(10)
                reqs.append((tuple(inp), tuple(out)))
                h[s] = inp + out
    return reqs


LONG = dict(kv_slots=9000, mamba_slots=16, kv_budget=7000, state_budget=4)
RECENT = dict(kv_slots=4000, mamba_slots=16, kv_budget=3000, state_budget=3)


def _spec(built):
    return built.cache.marconi.tuner.spec


def _run_auto(make_marconi, pools, reqs, m):
    built, drv = make_marconi(alpha="auto", tuner="inline", alpha_grid=GRID, window_multiplier=m, **PAPER_MECHANICS,
                              **pools)
    tuner = built.cache.marconi.tuner
    assert tuner is not None and tuner.alpha == 0.0
    total = 0.0
    for inp, out in reqs:
        total += drv.run(inp, out).flops_saved
    return built, tuner, total


def test_e2e_long_context_tunes_alpha_above_zero(make_marconi):
    from sglang_marconi.sglang_backend.tuning import replay_alphas

    reqs = long_context_workload()
    m = 5
    built, tuner, total_auto = _run_auto(make_marconi, LONG, reqs, m)
    assert tuner.n0 is not None and tuner.n0 < 10
    W = m * tuner.n0
    assert len(tuner.events) >= 2
    first = tuner.events[0]
    assert first.at_request == W and first.window == W
    # Direct replay of the first window: some α > 0 saves strictly more than α = 0.
    spec = _spec(built)
    assert spec.kv_budget == LONG["kv_budget"] and spec.state_budget == LONG["state_budget"]
    direct = replay_alphas(spec, [], reqs[:W], GRID)
    assert max(v for a, v in direct.items() if a > 0) > direct[0.0]
    # The tuner ran exactly that replay and picked α > 0.
    assert first.scores == pytest.approx(direct)
    assert first.alpha > 0
    assert first.alpha == best_alpha(direct)
    assert tuner.alpha > 0 and built.cache.marconi.alpha == tuner.alpha
    # And the tuned run saved more than pure recency on the same trace.
    built0, drv0 = make_marconi(alpha=0.0, **LONG)
    total0 = sum(drv0.run(i, o).flops_saved for i, o in reqs)
    assert total_auto > total0


def test_e2e_recency_workload_keeps_alpha_zero(make_marconi):
    from sglang_marconi.sglang_backend.tuning import replay_alphas

    reqs = recency_workload()
    m = 5
    built, tuner, _ = _run_auto(make_marconi, RECENT, reqs, m)
    assert tuner.n0 is not None
    W = m * tuner.n0
    assert len(tuner.events) >= 2
    direct = replay_alphas(_spec(built), [], reqs[:W], GRID)
    # α = 0 is best (ties, if any, also go to 0)
    assert direct[0.0] > 0
    assert all(direct[0.0] >= v for v in direct.values())
    assert tuner.events[0].scores == pytest.approx(direct)
    assert [e.alpha for e in tuner.events] == [0.0] * len(tuner.events)
    assert tuner.alpha == 0.0


def test_e2e_all_alphas_tie_gives_zero(make_marconi):
    """No reuse at all: every α saves 0 FLOPs -> the tie goes to α = 0."""
    fresh = _fresh_counter()
    reqs = [(tuple(fresh(30)), tuple(fresh(3))) for _ in range(40)]
    built, tuner, total = _run_auto(make_marconi, RECENT, reqs, 2)
    assert total == 0.0
    assert tuner.events and all(e.alpha == 0.0 for e in tuner.events)
    assert all(v == 0.0 for v in tuner.events[0].scores.values())
    assert set(tuner.events[0].scores) == set(GRID)


# ------------------------------------------------- the default's extra rules


def _default_tuner(replay, **cfg):
    cfg.setdefault("alpha", "auto")
    cfg.setdefault("tuner", "inline")
    cfg.setdefault("alpha_grid", GRID)
    return AlphaTuner(parse_config(cfg), replay, spec="SPEC")


def test_warm_start_scores_the_second_window_with_the_first_as_warmup():
    fake = FakeReplay()
    t = _default_tuner(fake, window_multiplier=2)
    i = feed(t, 0, 3)
    t.on_eviction()  # N0 = 3, W = 6: the cold window [0, 6) is warm-up only
    assert t.next_tune_at == 12
    i = feed(t, i, 8)  # 11 requests: not yet
    assert fake.calls == []
    feed(t, i, 1)
    assert len(fake.calls) == 1
    call = fake.calls[0]
    assert call["warmup"] == [req(k) for k in range(0, 6)]
    assert call["window"] == [req(k) for k in range(6, 12)]


def test_new_alpha_needs_confirmation_on_the_next_window():
    # window 1: 0.5 wins by far -> candidate only; window 2: it wins again -> adopted
    fake = FakeReplay(lambda n: {0.0: 1.0, 0.5: 3.0, 1.0: 2.0, 2.0: 0.0})
    t = _default_tuner(fake, window_multiplier=1, warm_start=False)
    i = feed(t, 0, 2)
    t.on_eviction()  # W = 2
    assert t.alpha == 0.0
    i = feed(t, i, 2)
    assert len(t.events) == 1 and t.alpha == 0.0 and t.pending == 0.5
    feed(t, i, 2)
    assert len(t.events) == 2 and t.alpha == 0.5 and t.pending is None


def test_candidate_that_fails_on_the_hold_out_window_is_dropped():
    seq = {1: {0.0: 1.0, 0.5: 3.0, 1.0: 0.0, 2.0: 0.0}, 2: {0.0: 5.0, 0.5: 1.0, 1.0: 0.0, 2.0: 0.0}}
    fake = FakeReplay(lambda n: seq.get(n, {0.0: 5.0, 0.5: 1.0, 1.0: 0.0, 2.0: 0.0}))
    t = _default_tuner(fake, window_multiplier=1, warm_start=False)
    i = feed(t, 0, 2)
    t.on_eviction()
    i = feed(t, i, 2)
    assert t.pending == 0.5 and t.alpha == 0.0
    feed(t, i, 2)  # on the hold-out window 0.5 loses to the current α = 0
    assert t.alpha == 0.0 and t.pending is None


def test_switch_margin_keeps_current_alpha_on_a_small_gain():
    fake = FakeReplay({0.0: 100.0, 0.5: 101.0, 1.0: 50.0, 2.0: 0.0})  # +1% < 2% margin
    t = _default_tuner(fake, window_multiplier=1, warm_start=False)
    i = feed(t, 0, 2)
    t.on_eviction()
    for _ in range(4):
        i = feed(t, i, 2)
    assert len(t.events) == 4 and t.alpha == 0.0 and t.pending is None
    fake2 = FakeReplay({0.0: 100.0, 0.5: 101.0, 1.0: 50.0, 2.0: 0.0})
    t2 = _default_tuner(fake2, window_multiplier=1, warm_start=False, switch_margin=0.0, confirm=False)
    i = feed(t2, 0, 2)
    t2.on_eviction()
    feed(t2, i, 2)
    assert t2.alpha == 0.5


def test_score_memory_outvotes_one_noisy_window():
    # 0 wins windows 1-3 clearly; window 4 alone favours 1.0 by 30%, which the memory outweighs
    seq = {n: {0.0: 10.0, 0.5: 5.0, 1.0: 5.0, 2.0: 0.0} for n in (1, 2, 3)}
    seq[4] = {0.0: 10.0, 0.5: 5.0, 1.0: 13.0, 2.0: 0.0}
    fake = FakeReplay(lambda n: seq.get(n, seq[4]))
    t = _default_tuner(fake, window_multiplier=1, warm_start=False, confirm=False)
    i = feed(t, 0, 2)
    t.on_eviction()
    for _ in range(4):
        i = feed(t, i, 2)
    assert t.alpha == 0.0
    # with no memory (the paper's rule) the same window flips α
    fake0 = FakeReplay(lambda n: seq.get(n, seq[4]))
    t0 = _default_tuner(fake0, window_multiplier=1, warm_start=False, confirm=False, score_decay=0.0)
    i = feed(t0, 0, 2)
    t0.on_eviction()
    for _ in range(4):
        i = feed(t0, i, 2)
    assert t0.alpha == 1.0


def test_grid_top_that_wins_is_extended():
    fake = FakeReplay(lambda n: {a: a for a in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)})  # bigger α always better
    t = _default_tuner(fake, window_multiplier=1, warm_start=False, confirm=False)
    i = feed(t, 0, 2)
    t.on_eviction()
    i = feed(t, i, 2)
    assert t.alpha == 2.0 and t.grid[-1] == 4.0
    feed(t, i, 2)
    assert fake.calls[-1]["alphas"] == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert t.alpha == 4.0 and t.grid[-1] == 8.0


def test_warmup_windows_and_alpha_max():
    fake = FakeReplay(lambda n: {a: a for a in (0.0, 0.5, 1.0, 2.0, 4.0)})
    t = _default_tuner(fake, window_multiplier=1, warm_start=False, confirm=False, warmup_windows=2, alpha_max=1.0)
    assert t.grid == [0.0, 0.5, 1.0]
    i = feed(t, 0, 2)
    t.on_eviction()  # W = 2
    i = feed(t, i, 2)  # first tuning: no history before the window
    i = feed(t, i, 2)  # second: up to two windows of warm-up exist
    i = feed(t, i, 2)
    assert fake.calls[-1]["warmup"] == [req(k) for k in range(1, 5)]  # tunings at requests 3, 5, 7
    assert fake.calls[-1]["window"] == [req(k) for k in range(5, 7)]
    assert t.alpha == 1.0 and max(t.grid) == 1.0  # the top never grows past alpha_max


# ------------------------------------------------- replays from a tree snapshot


def _branchy_requests(seed, n):
    import random

    rng = random.Random(seed)
    sessions = {}
    out = []
    for _ in range(n):
        s = rng.randrange(12)
        h = sessions.get(s, [1000 + s % 4] * rng.randrange(5, 40))  # 4 shared system prompts
        inp = h + [rng.randrange(2, 900) for _ in range(rng.randrange(1, 30))]
        o = [rng.randrange(2, 900) for _ in range(rng.randrange(1, 20))]
        sessions[s] = inp + o
        out.append((inp, o))
    return out


def test_tree_snapshot_round_trip_replays_identically(make_marconi):
    pools = dict(kv_slots=4000, mamba_slots=40, kv_budget=2800, state_budget=30)
    reqs = _branchy_requests(0, 300)
    b1, d1 = make_marconi(alpha=0.5, **pools)
    for inp, o in reqs[:200]:
        d1.run(inp, o)
    snap = b1.cache.export_tree()
    assert len(snap.nodes) > 3 and any(n[2] for n in snap.nodes) and any(n[0] >= 0 for n in snap.nodes)
    b2, d2 = make_marconi(alpha=0.5, **pools)
    d2.load_snapshot(snap)
    assert b2.cache.export_tree() == snap  # shape, states, stamps and clock
    assert (d2.tree_kv_tokens(), d2.tree_states()) == (d1.tree_kv_tokens(), d1.tree_states())
    for inp, o in reqs[200:]:
        assert d1.run(inp, o).hit_len == d2.run(inp, o).hit_len


def test_snapshot_replay_start_passes_the_tree_of_the_window_start(make_marconi):
    from sglang_marconi.sglang_backend.tuning import replay_alphas

    pools = dict(kv_slots=4000, mamba_slots=40, kv_budget=1500, state_budget=12)
    built, drv = make_marconi(alpha="auto", alpha_grid=GRID, window_multiplier=2, replay_start="snapshot", **pools)
    tuner = built.cache.marconi.tuner
    assert tuner.snapshot_fn is not None
    calls = []
    real = tuner.replay_fn

    def spy(spec, warmup, window, alphas, snapshot=None):
        calls.append((len(warmup), len(window), snapshot))
        return real(spec, warmup, window, alphas, snapshot)

    tuner.replay_fn = spy
    for inp, o in _branchy_requests(1, 200):
        drv.run(inp, o)
    assert tuner.n0 is not None and len(calls) >= 2
    # every tuning after the first snapshot starts from a tree, with no warm-up requests
    assert all(w == 0 and snap is not None for w, _, snap in calls)
    assert replay_alphas is real


def test_score_windows_replays_several_recent_windows_in_one_run():
    fake = FakeReplay()
    t = _default_tuner(fake, window_multiplier=1, warm_start=False, confirm=False, score_windows=2)
    i = feed(t, 0, 2)
    t.on_eviction()  # W = 2
    for _ in range(3):
        i = feed(t, i, 2)
    # tunings at requests 3, 5, 7; the last scores the last 2 windows after 1 window of warm-up
    assert fake.calls[-1]["window"] == [req(k) for k in range(3, 7)]
    assert fake.calls[-1]["warmup"] == [req(k) for k in range(1, 3)]
    assert len(fake.calls[0]["window"]) == 2  # not enough history yet: the last window only


def _sleepy_replay(spec, warmup, window, alphas):  # module level: pickled into the tuner's process
    import time

    time.sleep(float(spec))
    return {a: float(a == 0.5) for a in alphas}


@pytest.mark.parametrize("busy", [True, False], ids=["killed-mid-replay", "killed-while-idle"])
def test_killed_tuner_process_keeps_alpha_and_logs_one_line(busy, caplog):
    """The tuner's worker process is SIGKILLed (mid-replay or between replays): the current
    α stays, tuning stops, one warning line, and the caller (the scheduler) never raises."""
    import logging
    import os
    import signal
    import time

    t = AlphaTuner(parse_config({"alpha": "auto", "tuner": "process", "alpha_grid": GRID, "window_multiplier": 1,
                                 **PAPER_MECHANICS}), _sleepy_replay, spec="60" if busy else "0")
    try:
        with caplog.at_level(logging.INFO, logger="sglang_marconi.policy.tuner"):
            feed(t, 0, 1)
            t.on_eviction()
            feed(t, 1, 1)  # the window is due: the replay starts in the tuner's process
            if not busy:
                t.wait(timeout=120)
                assert t.alpha == 0.5
            pids = list(t._executor._processes)
            assert len(pids) == 1
            os.kill(pids[0], signal.SIGKILL)
            deadline = time.monotonic() + 60
            n = 2
            while t._executor is not None and time.monotonic() < deadline:
                n = feed(t, n, 1)  # requests keep finishing; each polls
                time.sleep(0.1)
            n = feed(t, n, 5)  # windows come due again: no new job, no exception
        died = [r for r in caplog.records if "tuner process died" in r.getMessage()]
        assert len(died) == 1 and died[0].levelno == logging.WARNING and not died[0].exc_info
        assert t._executor is None and t.next_tune_at is None
        assert t.alpha == (0.0 if busy else 0.5)
    finally:
        t.close()


SLOW_MAIN = '''
import sys, time
if __name__ == "__mp_main__":
    time.sleep(120)  # like a server's main module: slow to re-import in a worker
if __name__ == "__main__":
    from sglang_marconi.policy.tuner import one_worker_executor
    one_worker_executor("process", "t").submit(int)
    print("submitted", flush=True)
    time.sleep(600)
'''


def test_tuner_worker_exits_with_its_parent_even_while_starting(tmp_path):
    """The parent (standing in for the scheduler, whose main module is slow to re-import)
    is SIGKILLed while the tuner's worker is still re-importing it: the worker, the
    forkserver and the resource tracker are all gone long before that import would end."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from sglang_marconi.cpu_serving.soak import _cmdline, _group_pids

    script = tmp_path / "slow_main.py"
    script.write_text(SLOW_MAIN)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "submitted"
        deadline = time.monotonic() + 60
        workers = []
        while len(workers) < 2 and time.monotonic() < deadline:  # the forkserver and its worker
            workers = [p for p in _group_pids(proc.pid) if "multiprocessing.forkserver" in _cmdline(p)]
            time.sleep(0.2)
        assert len(workers) == 2, [_cmdline(p) for p in _group_pids(proc.pid)]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30  # the worker's start-up alone takes 120 s
        left = _group_pids(proc.pid)
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = _group_pids(proc.pid)
        assert left == [], [_cmdline(p) for p in left]
    finally:
        for p in _group_pids(proc.pid):
            os.kill(p, signal.SIGKILL)
