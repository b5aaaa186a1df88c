"""Build SGLang 0.5.23's real pools and ``UnifiedRadixCache`` outside a server.

The trace replay, the α tuner, the demo and the tests all need a hybrid
(FULL + MAMBA) radix cache without a model runner. This module builds exactly
what ``kv_cache_builder`` builds in the scheduler — ``HybridReqToTokenPool``
(with its ``MambaPool``), ``HybridLinearKVPool`` and a
``TokenToKVPoolAllocator`` (with frees queued until an alloc needs them, see
``DeferredFreeAllocator``) — on any device, CPU included.

Slot *counts* are what decide caching behaviour; slot *sizes* only decide how
many slots a byte budget buys. So the pools are sized by slot count and given
tiny per-slot shapes (``PoolShape``): a replay of a 7B model's 40 GB budget
allocates a few MB. ``slots_for_budget`` converts a byte budget into slot
counts with a cost profile's real per-slot sizes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

_SERVER_ARGS_SET = False


@dataclasses.dataclass(frozen=True)
class PoolShape:
    """Per-slot tensor shapes of the pools (tiny by default: only counts matter)."""

    num_layers: int = 4
    full_attention_layer_ids: tuple[int, ...] = (3,)
    head_num: int = 1
    head_dim: int = 8
    mamba_intermediate_size: int = 16
    mamba_n_groups: int = 1
    mamba_num_heads: int = 2
    mamba_head_dim: int = 8
    mamba_state_size: int = 4
    mamba_conv_kernel: int = 4

    @property
    def mamba_layer_ids(self) -> list[int]:
        full = set(self.full_attention_layer_ids)
        return [i for i in range(self.num_layers) if i not in full]


def _ensure_server_args(page_size: int) -> None:
    """Pool and cache code read a few fields of the global ServerArgs."""
    global _SERVER_ARGS_SET
    if _SERVER_ARGS_SET:
        return
    from sglang.srt.runtime_context import publish_role
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    if publish_role() is not None:  # a server (or a test) already published its args
        _SERVER_ARGS_SET = True
        return

    server_args = ServerArgs(model_path="dummy", page_size=page_size)
    server_args._mamba_cache_chunk_size = 64
    set_global_server_args_for_scheduler(server_args)
    _SERVER_ARGS_SET = True


@functools.lru_cache(maxsize=None)
def _deferred_free_allocator_class():
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator

    class DeferredFreeAllocator(TokenToKVPoolAllocator):
        """SGLang's ``TokenToKVPoolAllocator`` with frees queued until an alloc needs them.

        ``TokenToKVPoolAllocator.free`` appends with ``torch.cat``, which copies the
        whole free list on every free: nothing on a GPU, but O(pool) per free on a CPU
        replay whose infinite-cache pool holds tens of millions of slots (quadratic in
        the trace). Here a free queues a copy of the indices (the caller may reuse its
        view, as the ``free_group`` path also guards against) and the queue is joined,
        in order, only when the free list's front runs short — so every alloc returns
        exactly the slots SGLang's allocator would, in the same order.
        """

        def clear(self):
            super().clear()
            self._queued: list = []
            self._queued_n = 0

        def available_size(self):
            return super().available_size() + self._queued_n

        def free(self, free_index):
            if free_index.numel() == 0:
                return
            if self.free_group is not None or self.need_sort:
                super().free(free_index)
                return
            self._queued.append(self._copy_for_free_group(free_index))
            self._queued_n += free_index.numel()

        def _join_queued(self) -> None:
            if self._queued:
                import torch

                self.free_pages = torch.cat((self.free_pages, *self._queued))
                self._queued, self._queued_n = [], 0

        def alloc(self, need_size: int):
            if need_size > len(self.free_pages):
                self._join_queued()
            return super().alloc(need_size)

        def get_all_free_pages(self):
            self._join_queued()
            return super().get_all_free_pages()

        def merge_and_sort_free(self):
            self._join_queued()
            super().merge_and_sort_free()

    return DeferredFreeAllocator


@dataclasses.dataclass
class BuiltCache:
    cache: object  # UnifiedRadixCache (or a subclass)
    kv_allocator: object  # TokenToKVPoolAllocator
    req_to_token_pool: object  # HybridReqToTokenPool

    @property
    def mamba_allocator(self):
        return self.req_to_token_pool.mamba_allocator


#: requests in flight a built cache's pools hold working SSM states for (beyond ``mamba_slots``)
MAX_RUNNING_REQS = 4


def build_hybrid_cache(
    *,
    kv_slots: int,
    mamba_slots: int,
    max_running_reqs: int = MAX_RUNNING_REQS,
    max_context_len: int = 4096,
    page_size: int = 1,
    device: str = "cpu",
    shape: PoolShape = PoolShape(),
    cache_class: Optional[type] = None,
    component_registry_override: Optional[dict] = None,
    tree_core_backend: str = "python",
    enable_mamba_extra_buffer: bool = False,
    deferred_frees: bool = True,
    enable_kv_cache_events: bool = False,
) -> BuiltCache:
    """Build a FULL + MAMBA ``UnifiedRadixCache`` (or ``cache_class``) with real pools.

    ``mamba_slots`` counts the slots the tree may hold; one more slot per running
    request is added, as SGLang's ``HybridReqToTokenPool`` sizing does for the
    requests' own working states. ``enable_kv_cache_events``: the tree records KV events
    (``take_events``), as with a server's ``--kv-events-config``. ``deferred_frees=False`` keeps SGLang's stock KV
    allocator (what a live server's cache runs on; the bookkeeping benchmark uses it).
    """
    import torch

    from sglang.srt.configs.mamba_utils import Mamba2CacheParams, Mamba2StateShape
    from sglang.srt.environ import envs
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import HybridLinearKVPool, HybridReqToTokenPool
    from sglang.srt.mem_cache.unified_cache.components.base import ComponentType
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    if kv_slots < 1 or mamba_slots < 1:
        raise ValueError(f"pools need at least one slot each, got kv_slots={kv_slots} mamba_slots={mamba_slots}")
    _ensure_server_args(page_size)
    with envs.SGLANG_MAMBA_SSM_DTYPE.override("float32"):
        state_shape = Mamba2StateShape.create(
            tp_world_size=1,
            intermediate_size=shape.mamba_intermediate_size,
            n_groups=shape.mamba_n_groups,
            num_heads=shape.mamba_num_heads,
            head_dim=shape.mamba_head_dim,
            state_size=shape.mamba_state_size,
            conv_kernel=shape.mamba_conv_kernel,
        )
        cache_params = Mamba2CacheParams(shape=state_shape, layers=shape.mamba_layer_ids)
        req_to_token_pool = HybridReqToTokenPool(
            size=max_running_reqs,
            mamba_size=mamba_slots + max_running_reqs,
            mamba_spec_state_size=max_running_reqs,
            max_context_len=max_context_len,
            device=device,
            enable_memory_saver=False,
            cache_params=cache_params,
            mamba_layer_ids=shape.mamba_layer_ids,
            enable_mamba_extra_buffer=enable_mamba_extra_buffer,
        )
    kv_pool = HybridLinearKVPool(
        size=kv_slots,
        dtype=torch.float16,
        page_size=page_size,
        head_num=shape.head_num,
        head_dim=shape.head_dim,
        full_attention_layer_ids=list(shape.full_attention_layer_ids),
        device=device,
        enable_memory_saver=False,
        mamba_pool=req_to_token_pool.mamba_pool,
    )
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator

    allocator_class = _deferred_free_allocator_class() if deferred_frees else TokenToKVPoolAllocator
    allocator = allocator_class(
        size=kv_slots,
        dtype=torch.float16,
        device=device,
        kvcache=kv_pool,
        need_sort=False,
    )
    params = CacheInitParams(
        req_to_token_pool=req_to_token_pool,
        token_to_kv_pool_allocator=allocator,
        page_size=page_size,
        disable=False,
        tree_components=(ComponentType.FULL, ComponentType.MAMBA),
        enable_mamba_extra_buffer=enable_mamba_extra_buffer,
        component_registry_override=component_registry_override,
        enable_kv_cache_events=enable_kv_cache_events,
    )
    with envs.SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND.override(tree_core_backend):
        cache = (cache_class or UnifiedRadixCache)(params)
    return BuiltCache(cache=cache, kv_allocator=allocator, req_to_token_pool=req_to_token_pool)
