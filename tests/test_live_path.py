"""Marconi admission on SGLang's own scheduler path (``Req`` + ``checkpoint``),
the path a live server takes: chunk checkpoints publish KV without states
except at the request's branch point, whose state is copied (by the
state-copy kernels) into a cache slot; the finished request donates its
last-token state."""

from __future__ import annotations

from array import array

import pytest
import torch


def _req(built, rid, tokens):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    req = Req(
        rid=rid,
        origin_input_text="",
        origin_input_ids=array("q", tokens),
        sampling_params=SamplingParams(temperature=0, max_new_tokens=1),
    )
    built.req_to_token_pool.alloc([req])
    req.output_ids = array("q")
    req.full_untruncated_fill_ids = array("q", tokens)
    req.extend_end = len(tokens)
    kv = built.kv_allocator.alloc(len(tokens))
    built.req_to_token_pool.write((req.kv.req_pool_idx, slice(0, len(tokens))), kv)
    req.kv.kv_committed_len = len(tokens)
    req.kv.kv_allocated_len = len(tokens)
    req.last_node = built.cache.root_node_handle()
    req.kv.cache_protected_len = 0
    req.lock = None
    req.extra_key = None
    return req


def _decode(built, req, out):
    """The request decoded ``out`` (KV for all but the last sampled token)."""
    n = len(req.origin_input_ids)
    kv = built.kv_allocator.alloc(len(out) - 1)
    built.req_to_token_pool.write((req.kv.req_pool_idx, slice(n, n + len(out) - 1)), kv)
    req.output_ids = array("q", out)
    req.kv.kv_committed_len = req.kv.kv_allocated_len = n + len(out) - 1


def _fill_state(built, slot, seed):
    state = built.req_to_token_pool.mamba_pool.mamba_cache
    g = torch.Generator().manual_seed(seed)
    for conv in state.conv:
        conv[:, slot] = torch.randn(conv[:, slot].shape, generator=g).to(conv.dtype)
    state.temporal[:, slot] = torch.randn(state.temporal[:, slot].shape, generator=g).to(state.temporal.dtype)


def _state_of(built, slot):
    state = built.req_to_token_pool.mamba_pool.mamba_cache
    return [c[:, slot].clone() for c in state.conv] + [state.temporal[:, slot].clone()]


def _req_with_state(built, rid, tokens, seed):
    """A request whose live SSM slot holds random values: (req, live slot, those values)."""
    req = _req(built, rid, tokens)
    live = int(req.kv.mamba_pool_idx)
    _fill_state(built, live, seed=seed)
    return req, live, _state_of(built, live)


def _assert_cached_copy(built, match, live, expected):
    """The state the match resumes from is a copy of ``expected`` in a cache slot (not ``live``)."""
    from sglang.srt.mem_cache.unified_cache.components.base import ComponentType

    node = built.cache.tree_core.node_by_id(match.best_match_node)
    slot = int(node.component_data[ComponentType.MAMBA].value[0])
    assert slot != live
    for got, want in zip(_state_of(built, slot), expected):
        assert torch.equal(got, want)


def _match(built, tokens):
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    return built.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))


def test_chunk_checkpoints_admit_only_the_branch_point(make_marconi):
    from sglang.test.mem_cache_utils import finish_req

    from sglang_marconi.policy import AdmissionReason

    built, _ = make_marconi(kv_slots=512, mamba_slots=8)
    cache = built.cache
    tokens = list(range(100, 160))
    req, live, expected = _req_with_state(built, "r0", tokens, seed=1)

    # Chunk 1 ends at 20: not the branch point -> KV published, no state.
    req.mamba_branching_seqlen = 35
    cache.checkpoint(req, up_to=20)
    assert _match(built, tokens[:20]).full_kv_hit_length == 20
    assert cache.mamba_evictable_size() + cache.mamba_protected_size() == 0

    # Chunk 2 ends exactly at the branch point -> its state is copied into a cache slot.
    cache.checkpoint(req, up_to=35)
    assert cache.mamba_evictable_size() + cache.mamba_protected_size() == 1
    m = _match(built, tokens[:36])
    assert m.device_prefix_len == 35
    _assert_cached_copy(built, m, live, expected)

    # Another checkpoint at 35 (e.g. a retry) does not admit a second state.
    cache.checkpoint(req, up_to=50)
    assert cache.mamba_evictable_size() + cache.mamba_protected_size() == 1

    # Finish: the last-token state is donated.
    finish_req(cache, req, len(tokens))
    assert cache.mamba_evictable_size() + cache.mamba_protected_size() == 2
    assert _match(built, tokens + [1]).device_prefix_len == len(tokens)
    counters = cache.marconi.counters
    assert counters.admitted[AdmissionReason.BRANCH_POINT] == 1
    assert counters.admitted[AdmissionReason.LAST_TOKEN] == 1
    # The finished request was handed to the α tuner's log (fixed α: counted only).
    assert cache.marconi.tuner is None or cache.marconi.tuner.requests_seen == 1


def test_finished_request_feeds_the_tuner(make_marconi):
    from sglang.test.mem_cache_utils import finish_req

    built, _ = make_marconi(kv_slots=512, mamba_slots=8, alpha="auto", window_multiplier=1)
    tuner = built.cache.marconi.tuner
    req = _req(built, "r1", list(range(30)))
    finish_req(built.cache, req, 30)
    assert tuner.requests_seen == 1
    assert tuner._log[-1][0] == tuple(range(30))


@pytest.mark.parametrize("input_state", [True, False, "auto", "auto-single"])
def test_input_end_checkpoint_on_the_scheduler_path(make_marconi, input_state):
    """``input_state``: with no branch point, the checkpoint SGLang takes when the
    prefill ends (up_to = the input's length) admits the state there, once; the
    finished request still donates its last-token state (2 states). Without the
    option that checkpoint publishes KV only."""
    from sglang.test.mem_cache_utils import finish_req

    from sglang_marconi.policy import AdmissionReason

    extra = {}
    if input_state == "auto-single":  # "auto" under one byte budget: off
        input_state, extra = "auto", {"single_budget_gb": 1000.0}
    built, _ = make_marconi(kv_slots=512, mamba_slots=8, input_state=input_state, **extra)
    input_state = built.cache.marconi.config.input_state_on(bool(extra))
    cache = built.cache
    tokens = list(range(300, 340))
    req, live, expected = _req_with_state(built, "r1", tokens, seed=2)
    req.mamba_branching_seqlen = None
    cache.checkpoint(req, up_to=25)  # a middle chunk: never a state
    assert cache.mamba_evictable_size() + cache.mamba_protected_size() == 0
    cache.checkpoint(req, up_to=len(tokens))  # the prefill's end
    cache.checkpoint(req, up_to=len(tokens))  # again (a retry): no second state
    states = cache.mamba_evictable_size() + cache.mamba_protected_size()
    assert states == (1 if input_state else 0)
    m = _match(built, tokens + [7])
    assert m.device_prefix_len == (len(tokens) if input_state else 0)
    if input_state:
        _assert_cached_copy(built, m, live, expected)
    _decode(built, req, [901, 902, 903, 904])
    finish_req(cache, req, len(tokens) + 3)  # input + output - 1
    counters = cache.marconi.counters
    assert counters.admitted[AdmissionReason.INPUT_END] == (1 if input_state else 0)
    assert counters.admitted[AdmissionReason.LAST_TOKEN] == 1
    assert cache.mamba_evictable_size() + cache.mamba_protected_size() == (2 if input_state else 1)


def test_no_input_end_checkpoint_when_a_branch_point_is_planned(make_marconi):
    from sglang.test.mem_cache_utils import finish_req

    built, _ = make_marconi(kv_slots=512, mamba_slots=8, input_state=True)
    cache = built.cache
    tokens = list(range(500, 530))
    req = _req(built, "r2", tokens)
    req.mamba_branching_seqlen = 12
    cache.checkpoint(req, up_to=12)  # the branch point
    cache.checkpoint(req, up_to=len(tokens))  # the prefill's end: not a third state
    _decode(built, req, [901, 902])
    finish_req(cache, req, len(tokens) + 1)
    c = cache.marconi.counters.as_dict()
    assert (c["admitted_branch_point"], c["admitted_input_end"], c["admitted_last_token"]) == (1, 0, 1)


@pytest.mark.parametrize("final", [False, True])
def test_finished_request_hands_its_ending_to_ended_first(make_marconi, final):
    """SGLang's finish path gives ``ended_first`` the request's output: the node the
    finished sequence ends at keeps its ending (the last 2 output tokens here),
    and when that ending has been taught final the sequence is marked to go first."""
    from sglang.test.mem_cache_utils import finish_req

    built, _ = make_marconi(kv_slots=512, mamba_slots=8, ended_first=True, end_tail_tokens=2)
    cache = built.cache
    st = cache.marconi
    if final:
        for _ in range(8):
            st.end_predictor.unanswered((903, 904))
    tokens = list(range(600, 630))
    req = _req(built, "r3", tokens)
    req.mamba_branching_seqlen = None
    _decode(built, req, [901, 902, 903, 904])
    finish_req(cache, req, len(tokens) + 3)
    (node,) = [n for n in cache.tree_core.root_node.children.values()]  # one sequence, one leaf
    assert st.node_end(node) == len(tokens) + 3 and not node.children
    assert node.marconi_ending == (903, 904)
    assert getattr(node, "marconi_ended", False) is final
    assert st.counters.ended_marks == int(final)
    assert _match(built, tokens + [901, 902, 903, 7]).device_prefix_len == len(tokens) + 3
    # the match above hit the sequence's end: the ending counted as continued, the mark lifted
    assert st.end_predictor._stats[(903, 904)] == [1, 8 if final else 0]
    assert not getattr(node, "marconi_ended", False)


def test_anchor_on_the_scheduler_path(make_marconi):
    """The default's anchor state, live: a request whose match has no branch point gets
    its anchor (the largest power of two within its input, past its hit) as
    ``mamba_branching_seqlen``; the chunk checkpoint there admits the live state as an
    anchor (a copy in a cache slot), once; a later match that finds a real branch point
    replaces it."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from sglang.test.mem_cache_utils import finish_req

    from sglang_marconi.policy import AdmissionReason

    built, _ = make_marconi(kv_slots=512, mamba_slots=8, anchor_state=True)
    cache = built.cache
    tokens = list(range(300, 345))  # 45 tokens: anchor 32
    req, live, expected = _req_with_state(built, "r1", tokens, seed=3)
    m = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens[:-1])), req=req))
    assert m.mamba_branching_seqlen == 32 and req.marconi_anchor == 32
    req.mamba_branching_seqlen = m.mamba_branching_seqlen  # what SGLang's scheduler copies
    cache.checkpoint(req, up_to=20)  # a chunk that ends elsewhere: KV only
    assert cache.mamba_evictable_size() + cache.mamba_protected_size() == 0
    cache.checkpoint(req, up_to=32)
    cache.checkpoint(req, up_to=32)  # a retry: not a second state
    assert cache.mamba_evictable_size() + cache.mamba_protected_size() == 1
    hit = _match(built, tokens[:40])
    assert hit.device_prefix_len == 32
    _assert_cached_copy(built, hit, live, expected)
    _decode(built, req, [901, 902])
    finish_req(cache, req, len(tokens) + 1)
    c = cache.marconi.counters.as_dict()
    assert (c["admitted_anchor"], c["admitted_branch_point"], c["admitted_last_token"]) == (1, 0, 1)

    # a sibling diverging at 40: a real branch point, no anchor
    sib = _req(built, "r2", tokens[:40] + list(range(700, 710)))
    m2 = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", sib.origin_input_ids[:-1])), req=sib))
    assert m2.device_prefix_len == 32 and m2.mamba_branching_seqlen == 40 and sib.marconi_anchor is None


@pytest.mark.parametrize("config", [{"anchor_state": False}, {"anchor_state": True, "input_state": True}])
def test_no_anchor_when_off_or_the_input_end_takes_its_slot(make_marconi, config):
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    built, _ = make_marconi(kv_slots=512, mamba_slots=8, **config)
    req = _req(built, "r1", list(range(300, 345)))
    m = built.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", req.origin_input_ids[:-1])), req=req))
    assert m.mamba_branching_seqlen is None and getattr(req, "marconi_anchor", None) is None
