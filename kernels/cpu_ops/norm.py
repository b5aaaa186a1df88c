"""Gated RMSNorm of the Mamba2 mixer (``Mixer2RMSNormGated``), plain torch.

``rms_norm_gated`` has the signature of SGLang's
``kernels/ops/attention/fla/layernorm_gated.rms_norm_gated`` (keyword-only):

* ``norm_before_gate=False`` (what the Mamba2 mixer uses):
  ``out = rmsnorm_grouped(x * silu(z)) * weight (+ bias)``;
* ``norm_before_gate=True``: ``out = (rmsnorm_grouped(x) * weight (+ bias)) * silu(z)``;
* ``is_rms_norm=False`` gives a grouped LayerNorm (mean subtracted) instead.

The statistics are taken over groups of ``group_size`` consecutive channels
(``None``: the whole last dim). Arithmetic in float32 (float64 for float64
input); the result has ``x``'s dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["rms_norm_gated", "rms_norm_gated_ref"]


def rms_norm_gated(
    *,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    group_size: Optional[int] = None,
    norm_before_gate: bool = True,
    is_rms_norm: bool = False,
    activation: str = "swish",
) -> torch.Tensor:
    if activation not in ("swish", "silu", "sigmoid"):
        raise NotImplementedError(f"rms_norm_gated: activation {activation!r}")
    shape, dtype = x.shape, x.dtype
    hidden = shape[-1]
    gs = hidden if group_size is None else int(group_size)
    if gs <= 0 or hidden % gs:
        raise ValueError(f"group_size {group_size} does not divide hidden size {hidden}")
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    xf = x.to(cdt)
    gate = None
    if z is not None:
        zf = z.reshape(shape).to(cdt)
        gate = F.silu(zf) if activation in ("swish", "silu") else torch.sigmoid(zf)
    if gate is not None and not norm_before_gate:
        xf = xf * gate
    xg = xf.reshape(*shape[:-1], hidden // gs, gs)
    if not is_rms_norm:
        xg = xg - xg.mean(-1, keepdim=True)
    xg = xg * torch.rsqrt(xg.square().mean(-1, keepdim=True) + eps)
    y = xg.reshape(shape)
    if weight is not None:
        y = y * weight.to(cdt)
    if bias is not None:
        y = y + bias.to(cdt)
    if gate is not None and norm_before_gate:
        y = y * gate
    return y.to(dtype)


def rms_norm_gated_ref(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    z: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    group_size: Optional[int] = None,
    norm_before_gate: bool = False,
    bias: Optional[torch.Tensor] = None,
    is_rms_norm: bool = True,
) -> torch.Tensor:
    """Row-by-row, group-by-group float64 oracle (returns float64)."""
    xd = x.double().reshape(-1, x.shape[-1])
    zd = z.double().reshape(-1, x.shape[-1]) if z is not None else None
    hidden = xd.shape[-1]
    gs = hidden if group_size is None else group_size
    out = torch.empty_like(xd)
    for r in range(xd.shape[0]):
        row = xd[r].clone()
        g = zd[r] / (1.0 + torch.exp(-zd[r])) if zd is not None else None
        if g is not None and not norm_before_gate:
            row = row * g
        for s in range(0, hidden, gs):
            seg = row[s : s + gs]
            if not is_rms_norm:
                seg = seg - seg.sum() / gs
            ms = float((seg * seg).sum()) / gs
            row[s : s + gs] = seg / (ms + eps) ** 0.5
        if weight is not None:
            row = row * weight.double()
        if bias is not None:
            row = row + bias.double()
        if g is not None and norm_before_gate:
            row = row * g
        out[r] = row
    return out.reshape(x.shape)
