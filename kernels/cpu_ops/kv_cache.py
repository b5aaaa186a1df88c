"""``sgl_kernel`` CPU ops of SGLang's KV / request-to-token pools, in plain torch.

``copy_all_layer_kv_cache_cpu`` (below) and ``assign_req_to_token_pool_cpu``
(end of file, imported by ``srt/mem_cache/allocation.py``).

``sglang/kernels/ops/kvcache/cache_move.py`` imports ``copy_all_layer_kv_cache_cpu`` from ``sgl_kernel`` when
``SGLANG_USE_CPU_ENGINE=1`` and calls it (once at pool start-up with a dummy
``0 -> 0`` move, then from ``move_kv_cache``) as::

    copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc)

* ``data_ptrs``: uint64 tensor, the base address of every K and V buffer of
  every layer (``MHATokenToKVPool._init_data_ptrs_and_strides``);
* ``strides``: int64 tensor, bytes per token row of each buffer;
* for each buffer, row ``src_loc[i]`` is copied to row ``tgt_loc[i]``. All sources
  are read before any target is written (the Triton kernel's "safe for in-place
  copy"), so overlapping moves behave like ``rows[tgt] = rows[src]``.

The buffers are reached through their addresses (that is the op's contract):
a zero-copy uint8 view of ``(max_loc + 1) * stride`` bytes is made over each,
then one indexed copy moves the rows. Locations must be non-negative and lie
inside the buffers, exactly as for the native op (nothing can check the latter
from a bare address).
"""

from __future__ import annotations

import ctypes

import torch

__all__ = [
    "copy_all_layer_kv_cache_cpu",
    "copy_all_layer_kv_cache_cpu_ref",
    "assign_req_to_token_pool_cpu",
    "assign_req_to_token_pool_cpu_ref",
]


def _as_ints(t: torch.Tensor) -> list:
    if t.dtype == torch.uint64:  # limited uint64 op support: reinterpret as int64
        t = t.view(torch.int64)
    return [int(v) & 0xFFFFFFFFFFFFFFFF for v in t.detach().to("cpu").reshape(-1).tolist()]


def _check(data_ptrs, strides, tgt_loc, src_loc):
    if data_ptrs.numel() != strides.numel():
        raise ValueError(f"{data_ptrs.numel()} buffers but {strides.numel()} strides")
    if tgt_loc.numel() != src_loc.numel():
        raise ValueError(f"tgt_loc has {tgt_loc.numel()} entries, src_loc {src_loc.numel()}")
    for name, t in (("tgt_loc", tgt_loc), ("src_loc", src_loc)):
        if t.numel() and int(t.min()) < 0:
            raise ValueError(f"{name} has a negative location {int(t.min())}")


def _row_view(ptr: int, stride: int, rows: int) -> torch.Tensor:
    if ptr == 0:
        raise ValueError("null buffer address")
    arr = (ctypes.c_uint8 * (rows * stride)).from_address(ptr)
    return torch.frombuffer(arr, dtype=torch.uint8).view(rows, stride)


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor,
    strides: torch.Tensor,
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    _check(data_ptrs, strides, tgt_loc, src_loc)
    if tgt_loc.numel() == 0 or data_ptrs.numel() == 0:
        return
    tgt = tgt_loc.detach().to("cpu", torch.long).reshape(-1)
    src = src_loc.detach().to("cpu", torch.long).reshape(-1)
    keep = tgt != src
    if not bool(keep.any()):
        return
    tgt, src = tgt[keep], src[keep]
    rows = int(torch.maximum(tgt.max(), src.max())) + 1
    for ptr, stride in zip(_as_ints(data_ptrs), _as_ints(strides)):
        if stride <= 0:
            continue
        view = _row_view(ptr, stride, rows)
        view[tgt] = view[src]  # the right side is gathered first


def copy_all_layer_kv_cache_cpu_ref(
    data_ptrs: torch.Tensor,
    strides: torch.Tensor,
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """Oracle: gather every source row with ``ctypes.string_at``, then ``memmove`` each."""
    _check(data_ptrs, strides, tgt_loc, src_loc)
    tgt = [int(v) for v in tgt_loc.reshape(-1).tolist()]
    src = [int(v) for v in src_loc.reshape(-1).tolist()]
    for ptr, stride in zip(_as_ints(data_ptrs), _as_ints(strides)):
        saved = [ctypes.string_at(ptr + s * stride, stride) for s in src]
        for t, data in zip(tgt, saved):
            ctypes.memmove(ptr + t * stride, data, stride)


# --------------------------------------------------------------------------- req_to_token


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """The ``sgl_kernel`` CPU op behind ``allocation.assign_req_to_token_pool_func``.

    Request ``i`` gets ``req_to_token[req_pool_indices[i], start[i]:end[i]] =
    out_cache_loc[o_i : o_i + end[i] - start[i]]`` where ``o_i`` is the sum of
    the earlier requests' lengths (the Triton kernel's layout). ``pool_len`` is
    ``req_to_token.shape[1]``.
    """
    n = req_pool_indices.numel()
    if start_offset.numel() != n or end_offset.numel() != n:
        raise ValueError(
            f"{n} requests but {start_offset.numel()} start and {end_offset.numel()} end offsets"
        )
    if pool_len != req_to_token.shape[1]:
        raise ValueError(f"pool_len {pool_len} != req_to_token.shape[1] {req_to_token.shape[1]}")
    if n == 0:
        return
    starts = start_offset.detach().to("cpu", torch.long).reshape(-1)
    ends = end_offset.detach().to("cpu", torch.long).reshape(-1)
    lens = ends - starts
    if bool((lens < 0).any()) or bool((starts < 0).any()) or bool((ends > pool_len).any()):
        raise ValueError("each request needs 0 <= start <= end <= pool_len")
    total = int(lens.sum())
    if total > out_cache_loc.numel():
        raise ValueError(f"requests need {total} locations, out_cache_loc has {out_cache_loc.numel()}")
    if total == 0:
        return
    rows = req_pool_indices.detach().to("cpu", torch.long).reshape(-1)
    # flat destination index of every written element, in out_cache_loc order
    req_of = torch.repeat_interleave(torch.arange(n), lens)
    first = torch.cumsum(lens, 0) - lens
    col = starts[req_of] + (torch.arange(total) - first[req_of])
    flat = rows[req_of] * pool_len + col
    req_to_token.view(-1)[flat.to(req_to_token.device)] = out_cache_loc.reshape(-1)[:total].to(
        req_to_token.dtype
    )


def assign_req_to_token_pool_cpu_ref(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Oracle: one element at a time."""
    o = 0
    for i in range(req_pool_indices.numel()):
        r = int(req_pool_indices[i])
        for c in range(int(start_offset[i]), int(end_offset[i])):
            req_to_token[r, c] = out_cache_loc[o]
            o += 1
