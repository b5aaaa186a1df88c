"""Triton kernel that moves SSM states between Mamba pool slots.

One launch copies every (src, dst) slot pair, in every Mamba layer, of every
state tensor (all conv tensors *and* the temporal tensor), whatever their
dtypes. The copy is byte-exact: each per-slot row is moved as raw machine
words (int64 / int32 / int16 / int8 -- the widest width that divides every
address, row size and stride), so bf16 / fp16 / fp32 (including NaN payloads
and signed zeros) round-trip bit for bit.

Flattened work layout. Each state tensor ``t`` of shape
``[layers, slots, *block]`` is a *job*: a per-(layer, slot) row of
``row_words`` contiguous words at ``base + layer*layer_stride +
slot*slot_stride``. A job needs ``chunks = cdiv(row_words, BLOCK)`` programs
per (layer, pair). The 1-D grid is the concatenation over jobs of
``layers * pairs * chunks`` programs; a small int64 table (one row per job)
carries base addresses, strides and each job's first program id, and each
program finds its job by comparing its id with those starts.

Direction. "Gather" (cache slot -> request slot, on a prefix-cache hit) and
"scatter" (request slot -> cache slot, on a checkpoint) are the same
primitive with the index arrays swapped: :func:`gather_states` and
:func:`scatter_states` only name the direction.

Overlap. Semantics are "read every source, then write every destination"
(like ``t[:, dst] = t[:, src]``). A single pass would race if a slot written
by one pair is read by another, so in that case (detected on the host from the
validated indices) the copy is staged: launch 1 gathers the sources into a
scratch buffer, launch 2 scatters them. Self-copies (``src[i] == dst[i]``) are
no-ops and are dropped before launching.

On CPU tensors the kernel only runs under the Triton interpreter
(``TRITON_INTERPRET=1`` set before this module is imported); that is how the
tests exercise it. Production CPU code should use ``copy_states`` which
routes CPU tensors to the torch reference.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from .state_copy_validate import CopyPlan, StateCopyError, validate_copy_args

__all__ = [
    "copy_states_triton",
    "gather_states",
    "scatter_states",
    "DEFAULT_MAX_BLOCK",
]

# Words per program (upper bound). 1024 int64 words = 8 KiB per program.
DEFAULT_MAX_BLOCK = 1024
_MIN_BLOCK = 16
_MAX_GRID = 2**31 - 1

# job-table row (int64), one per state tensor; addresses in bytes, row length
# and strides in words of WORD_BYTES, then two program counts:
#   0 src_base_addr  1 dst_base_addr  2 row_words
#   3 src_layer_stride  4 src_slot_stride  5 dst_layer_stride  6 dst_slot_stride
#   7 chunks_per_row  8 first_program_id
_NCOL = 9


@triton.jit
def _word_ptr(addr, WORD_BYTES: tl.constexpr):
    if WORD_BYTES == 8:
        p = addr.to(tl.pointer_type(tl.int64))
    elif WORD_BYTES == 4:
        p = addr.to(tl.pointer_type(tl.int32))
    elif WORD_BYTES == 2:
        p = addr.to(tl.pointer_type(tl.int16))
    else:
        p = addr.to(tl.pointer_type(tl.int8))
    return p


@triton.jit
def _copy_slot_rows_kernel(
    job_table,  # int64 [NUM_JOBS, NCOL]
    src_idx,  # int64 [num_pairs]
    dst_idx,  # int64 [num_pairs]
    num_pairs,
    NUM_JOBS: tl.constexpr,
    NCOL: tl.constexpr,
    WORD_BYTES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)

    # Which job (state tensor) does this program belong to?
    job = pid * 0
    for k in tl.static_range(1, NUM_JOBS):
        job += (pid >= tl.load(job_table + k * NCOL + 8)).to(tl.int64)
    row = job_table + job * NCOL

    src_base = tl.load(row + 0)
    dst_base = tl.load(row + 1)
    row_words = tl.load(row + 2)
    src_layer_stride = tl.load(row + 3)
    src_slot_stride = tl.load(row + 4)
    dst_layer_stride = tl.load(row + 5)
    dst_slot_stride = tl.load(row + 6)
    chunks = tl.load(row + 7)
    prog_start = tl.load(row + 8)

    # program -> (layer, pair, chunk); chunk varies fastest.
    rem = pid - prog_start
    chunk = rem % chunks
    rest = rem // chunks
    pair = rest % num_pairs
    layer = rest // num_pairs

    s = tl.load(src_idx + pair)
    d = tl.load(dst_idx + pair)

    offs = chunk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < row_words
    src_row = _word_ptr(src_base, WORD_BYTES) + (layer * src_layer_stride + s * src_slot_stride)
    dst_row = _word_ptr(dst_base, WORD_BYTES) + (layer * dst_layer_stride + d * dst_slot_stride)
    vals = tl.load(src_row + offs, mask=mask)
    tl.store(dst_row + offs, vals, mask=mask)


class _Job(NamedTuple):
    """One state tensor's rows, all quantities in BYTES."""

    src_base: int
    dst_base: int
    row_bytes: int
    src_layer_stride: int
    src_slot_stride: int
    dst_layer_stride: int
    dst_slot_stride: int


def _tensor_name(i: int, n: int) -> str:
    return "temporal" if i == n - 1 else f"conv[{i}]"


def _slot_block_is_contiguous(t: torch.Tensor) -> bool:
    expected = 1
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _pool_geometry(plan: CopyPlan):
    """(name, tensor, row_bytes, layer_stride_bytes, slot_stride_bytes) for
    every non-empty state tensor; raises before any write if a tensor's
    per-slot block is not contiguous (the kernel moves each row as one run)."""
    out = []
    n = len(plan.tensors)
    for i, t in enumerate(plan.tensors):
        if t.numel() == 0:
            continue
        name = _tensor_name(i, n)
        if not _slot_block_is_contiguous(t):
            raise StateCopyError(
                f"{name} per-slot block is not contiguous (shape {tuple(t.shape)}, "
                f"strides {tuple(t.stride())}); the Triton path needs it contiguous"
            )
        es = t.element_size()
        row_bytes = math.prod(t.shape[2:]) * es
        out.append((name, t, row_bytes, t.stride(0) * es, t.stride(1) * es))
    return out


def _word_bytes(jobs: Sequence[_Job]) -> int:
    for w in (8, 4, 2):
        if all(v % w == 0 for j in jobs for v in j):
            return w
    return 1


def _interpreting() -> bool:
    """True when the kernel was built by the Triton interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_copy_slot_rows_kernel, InterpretedFunction)


def _launch(
    jobs: List[_Job],
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    num_layers: int,
    device: torch.device,
    max_block: int,
) -> int:
    """Launch the kernel over ``jobs``; returns the number of launches."""
    num_pairs = int(src_idx.numel())
    if not jobs or num_pairs == 0 or num_layers == 0:
        return 0
    w = _word_bytes(jobs)
    row_words = [j.row_bytes // w for j in jobs]
    block = min(max_block, max(_MIN_BLOCK, triton.next_power_of_2(max(row_words))))
    chunks = [triton.cdiv(r, block) for r in row_words]

    # Respect the 1-D grid limit by splitting the pair list if ever needed.
    per_pair = num_layers * sum(chunks)
    pairs_per_launch = max(1, min(num_pairs, _MAX_GRID // per_pair))

    launches = 0
    for p0 in range(0, num_pairs, pairs_per_launch):
        sl = slice(p0, min(num_pairs, p0 + pairs_per_launch))
        n = sl.stop - sl.start
        rows, start = [], 0
        for j, rw, c in zip(jobs, row_words, chunks):
            rows.append(
                [
                    j.src_base,
                    j.dst_base,
                    rw,
                    j.src_layer_stride // w,
                    j.src_slot_stride // w,
                    j.dst_layer_stride // w,
                    j.dst_slot_stride // w,
                    c,
                    start,
                ]
            )
            start += num_layers * n * c
        # Addresses may have the top bit set on some platforms: build unsigned,
        # reinterpret as int64 (the kernel only does wrap-around arithmetic).
        table = torch.tensor(rows, dtype=torch.uint64).view(torch.int64).to(device)
        s = src_idx[sl].to(device=device, dtype=torch.int64)
        d = dst_idx[sl].to(device=device, dtype=torch.int64)
        _copy_slot_rows_kernel[(start,)](
            table,
            s,
            d,
            n,
            NUM_JOBS=len(jobs),
            NCOL=_NCOL,
            WORD_BYTES=w,
            BLOCK=block,
        )
        launches += 1
    return launches


def _run_plan(plan: CopyPlan, max_block: Optional[int] = None) -> int:
    """Execute a validated plan on the Triton kernel; returns launch count."""
    max_block = DEFAULT_MAX_BLOCK if max_block is None else int(max_block)
    if max_block < 1 or max_block & (max_block - 1):
        raise StateCopyError(f"max_block {max_block} must be a power of two")
    device = plan.device
    if device.type == "cpu" and not _interpreting():
        raise RuntimeError(
            "the Triton state-copy kernel got CPU tensors but is not running in "
            "the interpreter: set TRITON_INTERPRET=1 before importing "
            "sglang_marconi.kernels.state_copy_triton, or use copy_states_ref"
        )

    geo = _pool_geometry(plan)  # may raise; nothing written yet

    keep = plan.src != plan.dst  # self-copies are no-ops
    src, dst = plan.src[keep], plan.dst[keep]
    n = int(src.numel())
    if n == 0 or not geo or plan.num_layers == 0:
        return 0

    guard = torch.cuda.device(device) if device.type == "cuda" else _nullctx()
    with guard:
        hazard = bool(torch.isin(dst, src).any())
        if not hazard:
            jobs = [
                _Job(t.data_ptr(), t.data_ptr(), rb, ls, ss, ls, ss)
                for _, t, rb, ls, ss in geo
            ]
            return _launch(jobs, src, dst, plan.num_layers, device, max_block)

        # Staged: gather every source row into scratch, then scatter.
        offsets, total = [], 0
        for _, _, rb, _, _ in geo:
            offsets.append(total)
            total += -(-(plan.num_layers * n * rb) // 8) * 8  # keep 8-byte aligned
        scratch = torch.empty(total // 8, dtype=torch.int64, device=device)
        base = scratch.data_ptr()
        gather_jobs, scatter_jobs = [], []
        for (_, t, rb, ls, ss), off in zip(geo, offsets):
            sp = base + off
            gather_jobs.append(_Job(t.data_ptr(), sp, rb, ls, ss, n * rb, rb))
            scatter_jobs.append(_Job(sp, t.data_ptr(), rb, n * rb, rb, ls, ss))
        ar = torch.arange(n, dtype=torch.int64)
        launches = _launch(gather_jobs, src, ar, plan.num_layers, device, max_block)
        launches += _launch(scatter_jobs, ar, dst, plan.num_layers, device, max_block)
        del scratch  # stream-ordered free on CUDA; interpreter is synchronous
        return launches


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def copy_states_triton(
    conv: Sequence[torch.Tensor],
    temporal: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    *,
    max_block: Optional[int] = None,
) -> int:
    """Validate, then copy slot ``src[i]`` -> ``dst[i]`` for every pair, layer
    and state tensor with the Triton kernel. Returns the number of kernel
    launches (0 when there is nothing to move, 1 normally, 2 when a written
    slot is also read by another pair)."""
    plan = validate_copy_args(conv, temporal, src, dst)
    return _run_plan(plan, max_block)


def gather_states(
    conv: Sequence[torch.Tensor],
    temporal: torch.Tensor,
    cache_slots: torch.Tensor,
    req_slots: torch.Tensor,
    *,
    max_block: Optional[int] = None,
) -> int:
    """Cache hit: load the cached SSM state of ``cache_slots[i]`` into the
    request's Mamba slot ``req_slots[i]`` (pool -> request)."""
    return copy_states_triton(conv, temporal, cache_slots, req_slots, max_block=max_block)


def scatter_states(
    conv: Sequence[torch.Tensor],
    temporal: torch.Tensor,
    req_slots: torch.Tensor,
    cache_slots: torch.Tensor,
    *,
    max_block: Optional[int] = None,
) -> int:
    """Checkpoint: store the SSM state of request slot ``req_slots[i]`` into
    cache slot ``cache_slots[i]`` (request -> pool)."""
    return copy_states_triton(conv, temporal, req_slots, cache_slots, max_block=max_block)
