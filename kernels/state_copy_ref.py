"""Plain-torch reference for moving SSM states between Mamba pool slots.

This is both the test oracle for the Triton kernel and the CPU path used by
:func:`sglang_marconi.kernels.copy_states` for non-CUDA tensors.

It does **no validation**: call it through ``copy_states`` (or run
``validate_copy_args`` first) unless the arguments are known to be good.
With a repeated ``dst`` slot, for example, the result would depend on which
write lands last.
"""

from __future__ import annotations

from typing import Sequence

import torch


def copy_states_ref(
    conv: Sequence[torch.Tensor],
    temporal: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
) -> None:
    """For every pair ``i`` copy slot ``src[i]`` into slot ``dst[i]``, in place,
    in every layer of every conv tensor and of the temporal tensor.

    ``conv``: list of ``[layers, slots, ...]`` tensors; ``temporal``:
    ``[layers, slots, heads, head_dim, state]``. Slots are dim 1.

    All source slots are read before any destination is written (same as
    SGLang's ``t[:, dst] = t[:, src]``), so chains and swaps are well defined.
    """
    if src.numel() == 0:
        return
    for state in (*conv, temporal):
        if state.numel() == 0:
            continue
        src_d = src.to(device=state.device, dtype=torch.int64)
        dst_d = dst.to(device=state.device, dtype=torch.int64)
        # 1) snapshot the source slots of every layer: [layers, N, ...]
        rows = state.index_select(1, src_d)
        # 2) write them into the destination slots
        state.index_copy_(1, dst_d, rows)
