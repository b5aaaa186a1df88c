"""The replay's KV allocator queues frees; it must hand out exactly SGLang's slots.

``DeferredFreeAllocator`` (sglang_backend/pools.py) is SGLang 0.5.23's
``TokenToKVPoolAllocator`` with ``free`` queued instead of ``torch.cat``-ed onto the
free list every time. Random alloc / free sequences run on both side by side:
every alloc returns the same indices in the same order, ``available_size`` agrees
after every step, and a caller overwriting the view it freed (the driver does: the
tree frees the request's duplicate slots, then the request's row is overwritten
with the tree's own) changes nothing.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator

from sglang_marconi.sglang_backend.pools import _deferred_free_allocator_class, build_hybrid_cache

POOL = 97

OP = st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 40)),
    st.tuples(st.just("free"), st.integers(0, 10_000), st.integers(1, 30), st.booleans()),
    st.tuples(st.just("all_free"), st.just(0)),
)


def _pair():
    kw = dict(size=POOL, dtype=torch.float16, device="cpu", kvcache=None, need_sort=False)
    return TokenToKVPoolAllocator(**kw), _deferred_free_allocator_class()(**kw)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(OP, min_size=1, max_size=80))
def test_deferred_frees_hand_out_sglangs_slots_in_order(ops):
    ref, ours = _pair()
    held: list[torch.Tensor] = []  # allocated, not yet freed (same indices on both sides)
    for op in ops:
        if op[0] == "alloc":
            a, b = ref.alloc(op[1]), ours.alloc(op[1])
            assert (a is None) == (b is None), op
            if a is not None:
                assert torch.equal(a, b), (op, a, b)
                if len(a):
                    held.append(a.clone())
        elif op[0] == "free" and held:
            chunk = held.pop(op[1] % len(held))
            n = min(op[2], len(chunk))
            row_ref, row_ours = chunk.clone(), chunk.clone()
            ref.free(row_ref[:n])
            ours.free(row_ours[:n])
            if op[3]:  # the caller reuses its row after the free
                row_ref[:n] = -1
                row_ours[:n] = -1
            if n < len(chunk):
                held.append(chunk[n:])
        elif op[0] == "all_free":
            assert torch.equal(torch.sort(ref.get_all_free_pages()).values,
                               torch.sort(ours.get_all_free_pages()).values)
        assert ref.available_size() == ours.available_size(), op
    # hand everything back: both pools are whole again, with the same slots
    for chunk in held:
        ref.free(chunk)
        ours.free(chunk)
    assert ref.available_size() == ours.available_size() == POOL
    assert torch.equal(ref.alloc(POOL), ours.alloc(POOL))


def test_built_cache_uses_the_deferred_allocator_and_free_group_still_works():
    built = build_hybrid_cache(kv_slots=50, mamba_slots=4)
    alloc = built.kv_allocator
    assert isinstance(alloc, TokenToKVPoolAllocator)
    assert type(alloc).__name__ == "DeferredFreeAllocator"
    got = alloc.alloc(50)
    assert alloc.available_size() == 0 and alloc.alloc(1) is None
    alloc.free(got[:10])
    assert alloc.available_size() == 10
    alloc.free_group_begin()  # SGLang's grouped frees bypass the queue, as before
    alloc.free(got[10:20])
    alloc.free_group_end()
    assert alloc.available_size() == 20
    assert torch.equal(alloc.alloc(20), got[:20])


def test_stock_allocator_on_request():
    built = build_hybrid_cache(kv_slots=50, mamba_slots=4, deferred_frees=False)
    assert type(built.kv_allocator) is TokenToKVPoolAllocator
