"""SSM-state copy kernels for Marconi prefix caching.

``copy_states(conv, temporal, src, dst)`` copies Mamba pool slot ``src[i]``
into slot ``dst[i]`` for every pair, in every layer of every conv tensor and
of the temporal tensor (SGLang ``MambaPool.State`` layout, slots on dim 1).
``gather_states`` (cache slot -> request slot, on a cache hit) and
``scatter_states`` (request slot -> cache slot, on a checkpoint) are the same
primitive with the direction spelled out.

Dispatch: arguments are validated first (nothing is written on error); then
CUDA tensors go to the single-launch Triton kernel and everything else to the
plain-torch reference. ``SGLANG_MARCONI_FORCE_TRITON=1`` sends CPU tensors to
the Triton kernel too (needs ``TRITON_INTERPRET=1``; used by the tests).

Triton is imported lazily, only when the Triton path is taken.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .state_copy_ref import copy_states_ref
from .state_copy_validate import (
    SUPPORTED_STATE_DTYPES,
    CopyPlan,
    StateCopyError,
    validate_copy_args,
)

__all__ = [
    "copy_states",
    "gather_states",
    "scatter_states",
    "copy_states_ref",
    "validate_copy_args",
    "StateCopyError",
    "CopyPlan",
    "SUPPORTED_STATE_DTYPES",
    "FORCE_TRITON_ENV",
    "uses_triton",
]

FORCE_TRITON_ENV = "SGLANG_MARCONI_FORCE_TRITON"


def _force_triton() -> bool:
    return os.environ.get(FORCE_TRITON_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def uses_triton(device: torch.device) -> bool:
    """Whether ``copy_states`` would take the Triton path for ``device``."""
    return torch.device(device).type == "cuda" or _force_triton()


def copy_states(
    conv: Sequence[torch.Tensor],
    temporal: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
) -> None:
    """Validate, then copy slot ``src[i]`` -> slot ``dst[i]`` for every pair in
    every Mamba layer, conv tensors and temporal tensor alike, in place.

    Sources are all read before any destination is written (chains and swaps
    are well defined). Raises :class:`StateCopyError` (a ``ValueError``) on a
    repeated dst slot, an index outside ``[0, slots)``, a src/dst length
    mismatch, a non-integer index dtype, or tensors whose layer count, slot
    count, device or dtype disagree -- always before writing anything.
    """
    plan = validate_copy_args(conv, temporal, src, dst)
    if uses_triton(plan.device):
        from .state_copy_triton import _run_plan

        _run_plan(plan)
    else:
        copy_states_ref(conv, temporal, plan.src, plan.dst)


def gather_states(
    conv: Sequence[torch.Tensor],
    temporal: torch.Tensor,
    cache_slots: torch.Tensor,
    req_slots: torch.Tensor,
) -> None:
    """Cache hit: copy the cached state in ``cache_slots[i]`` into the
    request's slot ``req_slots[i]`` (pool -> request)."""
    copy_states(conv, temporal, cache_slots, req_slots)


def scatter_states(
    conv: Sequence[torch.Tensor],
    temporal: torch.Tensor,
    req_slots: torch.Tensor,
    cache_slots: torch.Tensor,
) -> None:
    """Checkpoint: copy request slot ``req_slots[i]`` into cache slot
    ``cache_slots[i]`` (request -> pool)."""
    copy_states(conv, temporal, req_slots, cache_slots)
