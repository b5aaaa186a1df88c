"""Argument validation shared by every SSM-state copy path.

Everything here runs *before* any tensor is written, so a rejected call leaves
the pool untouched. Each failure raises :class:`StateCopyError` (a
``ValueError``) with a one-line message naming the offending value.

Layout (SGLang 0.5.23 ``MambaPool.State``, non-envelope):

* ``conv``: list of tensors ``[num_layers, num_slots, *conv_shape]``; SGLang
  uses ``conv_shape = (conv_dim, conv_kernel - 1)`` and allows several conv
  streams with different ``conv_shape``. All conv tensors share one dtype
  (``Mamba2StateDType.conv``).
* ``temporal``: ``[num_layers, num_slots, heads, head_dim, state]`` with its own
  dtype (``Mamba2StateDType.temporal``; SGLang's default is bf16 conv with fp32
  temporal, so the two groups may legitimately differ).

Copy semantics (identical for every backend): *all* source slots are read
before *any* destination slot is written, exactly like
``t[:, dst] = t[:, src]`` in ``MambaPool.copy_from``. So chains (1->2, 2->3)
and swaps (1->2, 2->1) are well defined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch

SUPPORTED_STATE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class StateCopyError(ValueError):
    """Invalid arguments to an SSM-state copy. Raised before anything is written."""


@dataclass(frozen=True)
class CopyPlan:
    """Validated, normalised arguments.

    ``tensors`` is ``(*conv, temporal)``; ``src``/``dst`` are int64 CPU tensors.
    """

    tensors: Tuple[torch.Tensor, ...]
    src: torch.Tensor
    dst: torch.Tensor
    num_layers: int
    num_slots: int
    device: torch.device

    @property
    def num_pairs(self) -> int:
        return int(self.src.numel())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_index(name: str, idx, state_device: torch.device) -> None:
    if not isinstance(idx, torch.Tensor):
        raise StateCopyError(
            f"{name} must be a torch.Tensor of slot indices, got {type(idx).__name__}"
        )
    dt = idx.dtype
    if dt == torch.bool or dt.is_floating_point or dt.is_complex:
        raise StateCopyError(
            f"{name} index dtype {_dtype_name(dt)} is not an integer dtype"
        )
    if idx.dim() != 1:
        raise StateCopyError(
            f"{name} must be 1-D, got shape {tuple(idx.shape)}"
        )
    if idx.device.type != "cpu" and idx.device != state_device:
        raise StateCopyError(
            f"{name} is on {idx.device} but the states are on {state_device}"
        )


def _first_out_of_range(name: str, idx: torch.Tensor, num_slots: int) -> None:
    bad = ((idx < 0) | (idx >= num_slots)).nonzero()
    if bad.numel():
        pos = int(bad[0, 0])
        raise StateCopyError(
            f"{name}[{pos}] = {int(idx[pos])} is out of range [0, {num_slots})"
        )


def _first_repeated_dst(dst: torch.Tensor) -> None:
    if dst.numel() < 2:
        return
    sorted_vals, order = torch.sort(dst, stable=True)
    same = (sorted_vals[1:] == sorted_vals[:-1]).nonzero()
    if same.numel():
        k = int(same[0, 0])
        slot = int(sorted_vals[k])
        first, second = sorted((int(order[k]), int(order[k + 1])))
        raise StateCopyError(
            f"dst slot {slot} appears more than once (positions {first} and {second})"
        )


def validate_copy_args(
    conv: Sequence[torch.Tensor],
    temporal: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
) -> CopyPlan:
    """Check every argument; return a :class:`CopyPlan` or raise ``StateCopyError``.

    Costs one device->host copy of ``src`` and ``dst`` when they live on a GPU
    (the range / duplicate checks need their values).
    """
    if not isinstance(temporal, torch.Tensor):
        raise StateCopyError(
            f"temporal must be a torch.Tensor, got {type(temporal).__name__}"
        )
    if isinstance(conv, torch.Tensor) or not isinstance(conv, (list, tuple)):
        raise StateCopyError(
            f"conv must be a list of tensors, got {type(conv).__name__}"
        )
    for i, c in enumerate(conv):
        if not isinstance(c, torch.Tensor):
            raise StateCopyError(
                f"conv[{i}] must be a torch.Tensor, got {type(c).__name__}"
            )

    # --- shapes -----------------------------------------------------------
    if temporal.dim() != 5:
        raise StateCopyError(
            "temporal must be [layers, slots, heads, head_dim, state], "
            f"got shape {tuple(temporal.shape)}"
        )
    num_layers, num_slots = int(temporal.shape[0]), int(temporal.shape[1])
    for i, c in enumerate(conv):
        if c.dim() < 3:
            raise StateCopyError(
                f"conv[{i}] must be [layers, slots, ...] with at least 3 dims, "
                f"got shape {tuple(c.shape)}"
            )
        if int(c.shape[0]) != num_layers:
            raise StateCopyError(
                f"conv[{i}] has {int(c.shape[0])} layers but temporal has {num_layers}"
            )
        if int(c.shape[1]) != num_slots:
            raise StateCopyError(
                f"conv[{i}] has {int(c.shape[1])} slots but temporal has {num_slots}"
            )

    # --- devices ----------------------------------------------------------
    device = temporal.device
    for i, c in enumerate(conv):
        if c.device != device:
            raise StateCopyError(
                f"conv[{i}] is on {c.device} but temporal is on {device}"
            )

    # --- dtypes -----------------------------------------------------------
    supported = ", ".join(_dtype_name(d) for d in SUPPORTED_STATE_DTYPES)
    if temporal.dtype not in SUPPORTED_STATE_DTYPES:
        raise StateCopyError(
            f"temporal dtype {_dtype_name(temporal.dtype)} is not supported "
            f"(expected one of {supported})"
        )
    for i, c in enumerate(conv):
        if c.dtype not in SUPPORTED_STATE_DTYPES:
            raise StateCopyError(
                f"conv[{i}] dtype {_dtype_name(c.dtype)} is not supported "
                f"(expected one of {supported})"
            )
        if c.dtype != conv[0].dtype:
            raise StateCopyError(
                f"conv[{i}] dtype {_dtype_name(c.dtype)} differs from "
                f"conv[0] dtype {_dtype_name(conv[0].dtype)}"
            )

    # --- indices ----------------------------------------------------------
    _check_index("src", src, device)
    _check_index("dst", dst, device)
    if src.numel() != dst.numel():
        raise StateCopyError(
            f"src has {src.numel()} entries but dst has {dst.numel()}"
        )
    src_h = src.detach().to("cpu", torch.int64)
    dst_h = dst.detach().to("cpu", torch.int64)
    _first_out_of_range("src", src_h, num_slots)
    _first_out_of_range("dst", dst_h, num_slots)
    _first_repeated_dst(dst_h)

    return CopyPlan(
        tensors=(*conv, temporal),
        src=src_h,
        dst=dst_h,
        num_layers=num_layers,
        num_slots=num_slots,
        device=device,
    )
