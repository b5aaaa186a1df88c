"""Mamba2 selective state space ops on CPU (plain torch): chunked scan and decode step.

The recurrence, per head ``h`` (group ``g = h // (nheads / ngroups)``) and token ``t``::

    dt_t  = clamp(softplus?(dt[t, h] + dt_bias[h]), *dt_limit)
    S_t   = exp(dt_t * A[h]) * S_{t-1} + dt_t * x[t, h, :, None] * B[t, g, None, :]   # (headdim, dstate)
    y_t   = S_t @ C[t, g] + D[h] * x[t, h]          (then * silu(z[t, h]) when z is given)

* :func:`mamba_chunk_scan_combined` - prefill, SGLang's signature
  (``kernels/ops/mamba/triton_ops/ssd_combined.py``): varlen sequences packed
  in one row with ``cu_seqlens``, per-sequence initial states, the output
  written into ``out``, and the same return tuples (chunk states, final /
  varlen states, "track" states at given token positions). The work is the SSD
  chunked algorithm: quadratic inside a chunk, a recurrence over chunk states.
  Chunks are aligned to the packed stream, as in the Triton kernels, so the
  chunk-boundary states (``return_intermediate_states`` / ``return_track_states``)
  come out of the recurrence for free.
* :func:`mamba_chunk_scan_with_snapshots` - the same scan, returning for each
  sequence its final state *and* its state after any requested token offsets
  (Marconi's exact branch checkpoints mid-prefill).
* :func:`selective_state_update` - decode, SGLang's signature
  (``triton_ops/mamba_ssm.py``): state ``(slots, nheads, headdim, dstate)``
  updated in place at ``state_batch_indices``; ``out`` written in place.

All arithmetic is float32 (float64 when the inputs are float64); states are
stored in their tensor's dtype. ``*_ref`` twins run the recurrence token by token
in float64: the test oracles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

PAD_SLOT_ID = -1

__all__ = [
    "PAD_SLOT_ID",
    "ScanResult",
    "ssd_scan",
    "mamba_chunk_scan_combined",
    "mamba_chunk_scan_with_snapshots",
    "selective_state_update",
    "ssd_scan_ref",
    "selective_state_update_ref",
]


def _cdt(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _process_dt(
    dt: torch.Tensor,
    dt_bias: Optional[torch.Tensor],
    dt_softplus: bool,
    dt_limit: Tuple[float, float],
    cdt: torch.dtype,
    clamp: bool = True,
) -> torch.Tensor:
    dt = dt.to(cdt)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cdt)
    if dt_softplus:
        # softplus(x) for x <= 20, x above (the Triton kernels' threshold)
        dt = F.softplus(dt, beta=1.0, threshold=20.0)
    if clamp:  # the chunked kernels always clamp (also without softplus)
        lo, hi = dt_limit
        dt = dt.clamp(min=lo, max=hi)
    return dt


def _heads_of_groups(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """(..., ngroups, d) -> (..., nheads, d): head h reads group h // (nheads/ngroups)."""
    ngroups = t.shape[-2]
    if nheads % ngroups:
        raise ValueError(f"nheads={nheads} is not a multiple of ngroups={ngroups}")
    return t.repeat_interleave(nheads // ngroups, dim=-2) if ngroups != nheads else t


# --------------------------------------------------------------------------- one sequence


def _scan_segment(
    x: torch.Tensor,  # (L, H, P) cdt
    dt: torch.Tensor,  # (L, H) cdt, processed
    A: torch.Tensor,  # (H,) cdt
    B: torch.Tensor,  # (L, H, N) cdt
    C: torch.Tensor,  # (L, H, N) cdt
    h0: Optional[torch.Tensor],  # (H, P, N) cdt
    chunk_size: int,
    lead: int,
    snap_offsets: Sequence[int],
) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """SSD over one sequence.

    ``lead`` dummy tokens (dt = 0: no decay, no input) are put in front so the
    chunk boundaries fall where the packed stream's do. Returns ``(y (L, H, P)
    without the D/z terms, boundaries, snapshots)``: ``boundaries[j]`` is the
    state at padded position ``j * chunk_size`` (``boundaries[-1]`` the final
    state); ``snapshots[k]`` the state after ``snap_offsets[k]`` real tokens.
    """
    L, H, P = x.shape
    N = B.shape[-1]
    Q = chunk_size
    dev, cdt = x.device, x.dtype
    tot = lead + L
    nc = max(1, math.ceil(tot / Q))
    pad_end = nc * Q - tot

    def pad(t: torch.Tensor) -> torch.Tensor:
        if lead == 0 and pad_end == 0:
            return t
        shape = list(t.shape)
        parts = []
        if lead:
            shape[0] = lead
            parts.append(t.new_zeros(shape))
        parts.append(t)
        if pad_end:
            shape[0] = pad_end
            parts.append(t.new_zeros(shape))
        return torch.cat(parts, 0)

    xq = pad(x).view(nc, Q, H, P)
    dtq = pad(dt).view(nc, Q, H)
    Bq = pad(B).view(nc, Q, H, N)
    Cq = pad(C).view(nc, Q, H, N)

    cs = torch.cumsum(dtq * A, dim=1)  # (nc, Q, H)

    # intra-chunk (diagonal blocks): y_i += sum_{j<=i} (C_i.B_j) exp(cs_i - cs_j) dt_j x_j
    seg = cs[:, :, None, :] - cs[:, None, :, :]  # (nc, Qi, Qj, H)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=dev).tril()
    seg = seg.masked_fill(~causal[None, :, :, None], float("-inf"))
    CB = torch.einsum("cihn,cjhn->cijh", Cq, Bq)
    M = CB * torch.exp(seg) * dtq[:, None, :, :]
    y = torch.einsum("cijh,cjhp->cihp", M, xq)

    # chunk-local states (from zero) and the recurrence over chunks
    decay_to_end = torch.exp(cs[:, -1:, :] - cs) * dtq  # (nc, Q, H)
    S = torch.einsum("cjh,cjhp,cjhn->chpn", decay_to_end, xq, Bq)
    chunk_decay = torch.exp(cs[:, -1, :])  # (nc, H)
    h = h0 if h0 is not None else torch.zeros((H, P, N), dtype=cdt, device=dev)
    bounds = [h]
    for c in range(nc):
        h = chunk_decay[c][:, None, None] * h + S[c]
        bounds.append(h)
    starts = torch.stack(bounds[:-1])  # (nc, H, P, N)

    # off-diagonal blocks: contribution of the state entering each chunk
    y = y + torch.einsum("cihn,chpn->cihp", Cq, starts) * torch.exp(cs)[..., None]
    y = y.reshape(nc * Q, H, P)[lead : lead + L]

    snaps = []
    for k in snap_offsets:
        if not 0 <= k <= L:
            raise ValueError(f"snapshot offset {k} outside a sequence of length {L}")
        pos = lead + k  # padded position: state after `pos` padded tokens
        c, r = divmod(pos, Q)
        if r == 0:
            snaps.append(bounds[c])
            continue
        # state after r tokens of chunk c
        w = torch.exp(cs[c, r - 1][None, :] - cs[c, :r]) * dtq[c, :r]  # (r, H)
        part = torch.einsum("jh,jhp,jhn->hpn", w, xq[c, :r], Bq[c, :r])
        snaps.append(torch.exp(cs[c, r - 1])[:, None, None] * bounds[c] + part)
    return y, bounds, snaps


# --------------------------------------------------------------------------- batch / varlen driver


@dataclass
class ScanResult:
    """Everything the scan can produce (tensors in the documented dtypes)."""

    out: torch.Tensor  # (batch, seqlen, nheads, headdim), out dtype
    final_states: torch.Tensor  # (batch, nheads, headdim, dstate) float32: end of each row
    varlen_states: Optional[torch.Tensor]  # (num_seqs, nheads, headdim, dstate): end of each sequence
    chunk_states: Optional[torch.Tensor]  # (batch, nchunks, nheads, headdim, dstate): stream chunk starts
    snapshots: Optional[torch.Tensor]  # (num_snapshots, nheads, headdim, dstate)


def _segments(
    batch: int,
    seqlen: int,
    cu_seqlens: Optional[torch.Tensor],
    seq_idx: Optional[torch.Tensor],
) -> List[Tuple[int, int, int, int]]:
    """(row, start, end, init_index) per sequence; init_index -1: zero initial state."""
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError("cu_seqlens needs batch == 1 (sequences packed in one row)")
        cu = [int(v) for v in cu_seqlens.detach().to("cpu").tolist()]
        if cu[0] < 0 or any(b < a for a, b in zip(cu, cu[1:])) or cu[-1] > seqlen:
            raise ValueError(f"cu_seqlens {cu} is not a non-decreasing split of {seqlen} tokens")
        return [(0, s, e, i) for i, (s, e) in enumerate(zip(cu[:-1], cu[1:]))]
    if seq_idx is not None:
        segs = []
        si = seq_idx.detach().to("cpu")
        for b in range(batch):
            row = si[b].tolist()
            start = 0
            for t in range(1, seqlen + 1):
                if t == seqlen or row[t] != row[start]:
                    segs.append((b, start, t, b if start == 0 else -1))
                    start = t
        return segs
    return [(b, 0, seqlen, b) for b in range(batch)]


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Tuple[float, float] = (0.0, float("inf")),
    out: Optional[torch.Tensor] = None,
    state_dtype: Optional[torch.dtype] = None,
    want_chunk_states: bool = False,
    snapshot_seq: Optional[Sequence[int]] = None,
    snapshot_offsets: Optional[Sequence[int]] = None,
) -> ScanResult:
    """The chunked scan with every output (see :class:`ScanResult`).

    Shapes as SGLang: ``x`` (batch, seqlen, nheads, headdim), ``dt`` (batch,
    seqlen, nheads), ``A`` (nheads,), ``B``/``C`` (batch, seqlen, ngroups,
    dstate), ``D`` (nheads,) or (nheads, headdim), ``z`` like ``x``,
    ``dt_bias`` (nheads,). Sequences: with ``cu_seqlens`` (batch 1) each
    ``[cu[i], cu[i+1])`` is one, ``initial_states`` is per sequence; otherwise
    each row (or each run of equal ``seq_idx`` in a row) is one and
    ``initial_states`` is per row (first run only). Snapshot ``k`` is the state of
    sequence ``snapshot_seq[k]`` after its first ``snapshot_offsets[k]`` tokens.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    batch, seqlen, H, P = x.shape
    G, N = B.shape[-2], B.shape[-1]
    if B.shape != (batch, seqlen, G, N) or C.shape != B.shape:
        raise ValueError(f"B {tuple(B.shape)} / C {tuple(C.shape)} do not match x {tuple(x.shape)}")
    if dt.shape != (batch, seqlen, H):
        raise ValueError(f"dt shape {tuple(dt.shape)} != {(batch, seqlen, H)}")
    if A.shape != (H,):
        raise ValueError(f"A shape {tuple(A.shape)} != ({H},)")
    cdt = _cdt(x, B, C, initial_states)
    dev = x.device
    segs = _segments(batch, seqlen, cu_seqlens, seq_idx)
    if initial_states is not None:
        need = len(segs) if cu_seqlens is not None else batch
        if initial_states.shape != (need, H, P, N):
            raise ValueError(
                f"initial_states shape {tuple(initial_states.shape)} != {(need, H, P, N)}"
            )

    dtp = _process_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)
    Af = A.to(cdt)
    xf = x.to(cdt)
    Bh = _heads_of_groups(B.to(cdt), H)
    Ch = _heads_of_groups(C.to(cdt), H)

    if out is None:
        out = torch.zeros_like(x)
    elif out.shape != x.shape:
        raise ValueError(f"out shape {tuple(out.shape)} != x shape {tuple(x.shape)}")
    y_full = torch.zeros((batch, seqlen, H, P), dtype=cdt, device=dev)

    snap_seq = list(snapshot_seq or [])
    snap_off = list(snapshot_offsets or [])
    if len(snap_seq) != len(snap_off):
        raise ValueError(f"{len(snap_seq)} snapshot sequences for {len(snap_off)} offsets")
    for s in snap_seq:
        if not 0 <= s < len(segs):
            raise ValueError(f"snapshot sequence {s} out of range [0, {len(segs)})")
    snaps: List[Optional[torch.Tensor]] = [None] * len(snap_seq)

    Q = chunk_size
    nchunks = max(1, math.ceil(seqlen / Q))
    sdt = state_dtype if state_dtype is not None else C.dtype
    chunk_states = (
        torch.zeros((batch, nchunks, H, P, N), dtype=cdt, device=dev) if want_chunk_states else None
    )
    final_states = torch.zeros((batch, H, P, N), dtype=torch.float32, device=dev)
    varlen = torch.zeros((len(segs), H, P, N), dtype=cdt, device=dev)

    for si, (b, s, e, ii) in enumerate(segs):
        h0 = initial_states[ii].to(cdt) if (initial_states is not None and ii >= 0) else None
        want = [k for k, q in enumerate(snap_seq) if q == si]
        if e == s:  # empty sequence: its state is its initial state
            h = h0 if h0 is not None else torch.zeros((H, P, N), dtype=cdt, device=dev)
            varlen[si] = h
            for k in want:
                if snap_off[k] != 0:
                    raise ValueError(f"snapshot offset {snap_off[k]} outside an empty sequence")
                snaps[k] = h
            continue
        lead = s % Q
        y, bounds, sn = _scan_segment(
            xf[b, s:e], dtp[b, s:e], Af, Bh[b, s:e], Ch[b, s:e], h0, Q, lead,
            [snap_off[k] for k in want],
        )
        y_full[b, s:e] = y
        varlen[si] = bounds[-1]
        final_states[b] = bounds[-1].to(torch.float32)
        for k, st in zip(want, sn):
            snaps[k] = st
        if chunk_states is not None:
            if s == 0:
                chunk_states[b, 0] = h0 if h0 is not None else 0.0
            # stream chunk c (c >= 1) starts after token c*Q - 1; it belongs here
            # when s < c*Q <= e, at local boundary c - s // Q
            c_lo = s // Q + 1
            c_hi = min(e // Q, nchunks - 1)
            for c in range(c_lo, c_hi + 1):
                chunk_states[b, c] = bounds[c - s // Q]

    if D is not None:
        Df = D.to(cdt)
        y_full = y_full + xf * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y_full = y_full * F.silu(z.to(cdt))
    covered = torch.zeros((batch, seqlen), dtype=torch.bool, device=dev)
    for b, s, e, _ in segs:
        covered[b, s:e] = True
    y_full = torch.where(covered[..., None, None], y_full, torch.zeros_like(y_full))
    out.copy_(y_full.to(out.dtype))

    return ScanResult(
        out=out,
        final_states=final_states,
        varlen_states=varlen.to(sdt) if cu_seqlens is not None else None,
        chunk_states=chunk_states.to(sdt) if chunk_states is not None else None,
        snapshots=(
            torch.stack(snaps).to(sdt) if snaps else torch.zeros((0, H, P, N), dtype=sdt, device=dev)
        ),
    )


def mamba_chunk_scan_combined(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    seq_idx=None,
    chunk_indices=None,
    chunk_offsets=None,
    cu_seqlens=None,
    dt_softplus=False,
    dt_limit=(0.0, float("inf")),
    out=None,
    return_final_states=False,
    return_varlen_states=False,
    return_intermediate_states=False,
    state_dtype=None,
    return_track_states=False,
    track_seq_idx=None,
    track_end_locs=None,
):
    """Drop-in for SGLang's ``mamba_chunk_scan_combined`` (same arguments, same returns).

    The output goes into ``out`` (required, as in SGLang, whose Triton path
    also discards the returned activations). ``chunk_indices``/``chunk_offsets``
    are the Triton kernels' pseudo-chunk layout and are not needed here.
    ``track_seq_idx``/``track_end_locs``: state of sequence ``track_seq_idx[k]``
    after the packed token position ``track_end_locs[k]`` (exclusive end).
    """
    if out is None:
        raise ValueError("mamba_chunk_scan_combined needs `out` (the output buffer)")
    if not return_varlen_states:
        cu_seqlens = None
    elif cu_seqlens is None:
        raise ValueError("cu_seqlens must be provided if return_varlen_states is True")
    if return_track_states and not return_varlen_states:
        raise ValueError("return_track_states requires return_varlen_states (cu_seqlens mode)")

    snap_seq, snap_off = None, None
    tracking = (
        return_track_states
        and track_seq_idx is not None
        and track_end_locs is not None
        and track_end_locs.numel() > 0
    )
    if tracking:
        cu = [int(v) for v in cu_seqlens.detach().to("cpu").tolist()]
        snap_seq = [int(v) for v in track_seq_idx.detach().to("cpu").reshape(-1).tolist()]
        ends = [int(v) for v in track_end_locs.detach().to("cpu").reshape(-1).tolist()]
        snap_off = [e - cu[s] for s, e in zip(snap_seq, ends)]

    res = ssd_scan(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
        initial_states=initial_states, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
        dt_softplus=dt_softplus, dt_limit=dt_limit, out=out, state_dtype=state_dtype,
        want_chunk_states=return_track_states or return_intermediate_states,
        snapshot_seq=snap_seq, snapshot_offsets=snap_off,
    )
    states = res.chunk_states
    final_states = res.final_states
    if return_track_states:
        track = res.snapshots.unsqueeze(0) if tracking else None
        return states, res.varlen_states, track
    if return_intermediate_states:
        if return_varlen_states:
            if return_final_states:
                return states, final_states, res.varlen_states
            return states, res.varlen_states
        if return_final_states:
            return states, final_states
        return states
    if not return_varlen_states:
        return final_states if return_final_states else None
    if return_final_states:
        return final_states, res.varlen_states
    return res.varlen_states


def mamba_chunk_scan_with_snapshots(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    cu_seqlens: torch.Tensor,
    snapshot_offsets: Union[torch.Tensor, Sequence[int]],
    chunk_size: int = 256,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Tuple[float, float] = (0.0, float("inf")),
    out: Optional[torch.Tensor] = None,
    state_dtype: Optional[torch.dtype] = None,
    snapshot_seq: Optional[Union[torch.Tensor, Sequence[int]]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Varlen scan returning ``(out, final_states, snapshots)``.

    ``final_states[i]`` is sequence ``i``'s state after its last token;
    ``snapshots[k]`` its state after its first ``snapshot_offsets[k]`` tokens
    (sequence ``snapshot_seq[k]``, default ``k``: one offset per sequence). Equal
    to running the scan on the prefix ``[0, offset)`` alone, in the same pass.
    Offsets may be 0 (the initial state) up to the sequence length.
    """
    offs = [int(v) for v in (snapshot_offsets.tolist() if torch.is_tensor(snapshot_offsets) else snapshot_offsets)]
    if snapshot_seq is None:
        seqs = list(range(len(offs)))
    else:
        seqs = [int(v) for v in (snapshot_seq.tolist() if torch.is_tensor(snapshot_seq) else snapshot_seq)]
    res = ssd_scan(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
        initial_states=initial_states, cu_seqlens=cu_seqlens, dt_softplus=dt_softplus,
        dt_limit=dt_limit, out=out, state_dtype=state_dtype,
        snapshot_seq=seqs, snapshot_offsets=offs,
    )
    return res.out, res.varlen_states, res.snapshots


# --------------------------------------------------------------------------- decode step


def selective_state_update(
    state,
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    state_batch_indices=None,
    pad_slot_id=PAD_SLOT_ID,
    out=None,
    disable_state_update=False,
    intermediate_states_buffer=None,
    cache_steps=None,
    retrieve_parent_token=None,
    intermediate_state_indices=None,
    enable_stochastic_rounding=False,
    cache_philox_rounds=0,
):
    """Drop-in for SGLang's ``selective_state_update`` (Triton semantics).

    ``state`` ``(slots, nheads, headdim, dstate)`` (or without the heads dim);
    ``x``/``dt``/``z``/``out`` ``(batch, [T,] nheads, headdim)``; ``A``
    ``(nheads, headdim, dstate)``; ``B``/``C`` ``(batch, [T,] ngroups, dstate)``;
    ``D``/``dt_bias`` ``(nheads, headdim)``. ``T > 1`` steps run in order.
    A row whose slot is ``pad_slot_id`` starts from a zero state and is not
    written back (as in the kernel). ``intermediate_states_buffer`` receives the
    state after each step (speculative verify). EAGLE trees
    (``retrieve_parent_token``) and stochastic rounding are not supported.
    Returns ``out``.
    """
    if retrieve_parent_token is not None:
        raise NotImplementedError("selective_state_update on CPU: EAGLE tree (retrieve_parent_token)")
    if enable_stochastic_rounding:
        raise NotImplementedError("selective_state_update on CPU: stochastic rounding")
    if out is None:
        raise ValueError("selective_state_update needs `out`")
    st = state.unsqueeze(1) if state.dim() == 3 else state

    def seq4(t):
        if t is None:
            return None
        if t.dim() == 2:
            t = t.unsqueeze(1)
        if t.dim() == 3:
            t = t.unsqueeze(1)
        return t

    x4, dt4, B4, C4, z4, out4 = (seq4(t) for t in (x, dt, B, C, z, out))
    A3 = A.unsqueeze(0) if A.dim() == 2 else A
    D2 = D.unsqueeze(0) if (D is not None and D.dim() == 1) else D
    db2 = dt_bias.unsqueeze(0) if (dt_bias is not None and dt_bias.dim() == 1) else dt_bias
    _, H, P, N = st.shape
    batch, T = x4.shape[:2]
    if x4.shape != (batch, T, H, P) or dt4.shape != x4.shape or out4.shape != x4.shape:
        raise ValueError(
            f"x {tuple(x4.shape)} / dt {tuple(dt4.shape)} / out {tuple(out4.shape)} do not match state {tuple(st.shape)}"
        )
    G = B4.shape[2]
    if A3.shape != (H, P, N) or B4.shape != (batch, T, G, N) or C4.shape != B4.shape:
        raise ValueError(f"A {tuple(A3.shape)} / B {tuple(B4.shape)} / C {tuple(C4.shape)} do not match")
    cdt = _cdt(st, x4)
    dev = st.device

    if state_batch_indices is not None:
        idx = state_batch_indices.to(device=dev, dtype=torch.long).reshape(-1)
        if idx.numel() != batch:
            raise ValueError(f"state_batch_indices has {idx.numel()} entries for batch {batch}")
    else:
        idx = torch.arange(batch, device=dev)
    valid = idx != pad_slot_id
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    h = st[safe].to(cdt)
    h = torch.where(valid[:, None, None, None], h, torch.zeros_like(h))

    Af = A3.to(cdt)
    Bh = _heads_of_groups(B4.to(cdt), H)
    Ch = _heads_of_groups(C4.to(cdt), H)
    buf = None
    if intermediate_states_buffer is not None:
        if not cache_steps:
            raise ValueError("intermediate_states_buffer needs cache_steps")
        buf = intermediate_states_buffer.view(-1, cache_steps, H, P, N)
        if intermediate_state_indices is not None:
            cidx = intermediate_state_indices.to(device=dev, dtype=torch.long).reshape(-1)
        else:
            cidx = idx
    for t in range(T):
        dtt = _process_dt(dt4[:, t], db2, dt_softplus, (0.0, float("inf")), cdt, clamp=False)  # (b, H, P)
        dA = torch.exp(Af[None] * dtt[..., None])  # (b, H, P, N)
        xt = x4[:, t].to(cdt)
        h = h * dA + (Bh[:, t, :, None, :] * dtt[..., None]) * xt[..., None]
        if buf is not None:
            ok = valid if state_batch_indices is not None else torch.ones_like(valid)
            if bool(ok.any()):
                buf[cidx[ok], t] = h[ok].to(buf.dtype)
        y = (h * Ch[:, t, :, None, :]).sum(-1)
        if D2 is not None:
            y = y + xt * D2.to(cdt)
        if z4 is not None:
            y = y * F.silu(z4[:, t].to(cdt))
        out4[:, t] = y.to(out4.dtype)
    if not disable_state_update and bool(valid.any()):
        st[idx[valid]] = h[valid].to(st.dtype)
    return out


# --------------------------------------------------------------------------- float64 references


def ssd_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor] = None,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Tuple[float, float] = (0.0, float("inf")),
) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """Token-by-token float64 recurrence.

    ``x`` etc. in SGLang's layout with batch 1 and ``cu_seqlens`` (or batch rows
    as sequences when ``cu_seqlens`` is None). Returns ``(out (batch, seqlen, H, P),
    final_states (num_seqs, H, P, N), history)`` where ``history[i][k]`` is
    sequence ``i``'s state after ``k`` tokens (``k = 0 .. length``).
    """
    batch, seqlen, H, P = x.shape
    N = B.shape[-1]
    G = B.shape[-2]
    rep = H // G
    if cu_seqlens is not None:
        cu = [int(v) for v in cu_seqlens.tolist()]
        segs = [(0, s, e) for s, e in zip(cu[:-1], cu[1:])]
    else:
        segs = [(b, 0, seqlen) for b in range(batch)]
    out = torch.zeros((batch, seqlen, H, P), dtype=torch.float64)
    finals, hist = [], []
    Ad = A.double()
    for i, (b, s, e) in enumerate(segs):
        h = (
            initial_states[i].double().clone()
            if initial_states is not None
            else torch.zeros((H, P, N), dtype=torch.float64)
        )
        seq_hist = [h.clone()]
        for t in range(s, e):
            for hd in range(H):
                g = hd // rep
                d = float(dt[b, t, hd])
                if dt_bias is not None:
                    d += float(dt_bias[hd])
                if dt_softplus and d <= 20.0:
                    d = math.log1p(math.exp(d))
                d = min(max(d, dt_limit[0]), dt_limit[1])
                xv = x[b, t, hd].double()
                h[hd] = math.exp(d * float(Ad[hd])) * h[hd] + d * torch.outer(xv, B[b, t, g].double())
                yv = h[hd] @ C[b, t, g].double()
                if D is not None:
                    yv = yv + xv * (D[hd].double() if D.dim() == 2 else float(D[hd]))
                if z is not None:
                    zv = z[b, t, hd].double()
                    yv = yv * zv / (1.0 + torch.exp(-zv))
                out[b, t, hd] = yv
            seq_hist.append(h.clone())
        finals.append(h.clone())
        hist.append(seq_hist)
    return out, torch.stack(finals), hist


def selective_state_update_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    state_batch_indices: Optional[torch.Tensor] = None,
    pad_slot_id: int = PAD_SLOT_ID,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float64 oracle, one token per row: ``x`` (batch, H, P), ``dt`` (batch, H, P),
    ``A`` (H, P, N), ``B``/``C`` (batch, G, N), ``D``/``dt_bias`` (H, P).
    Returns ``(out (batch, H, P), new_state)`` without modifying ``state``."""
    st = state.double().clone()
    batch, H, P = x.shape
    G = B.shape[1]
    rep = H // G
    out = torch.zeros((batch, H, P), dtype=torch.float64)
    for b in range(batch):
        slot = int(state_batch_indices[b]) if state_batch_indices is not None else b
        h = st[slot].clone() if slot != pad_slot_id else torch.zeros_like(st[0])
        for hd in range(H):
            g = hd // rep
            for p in range(P):
                d = float(dt[b, hd, p])
                if dt_bias is not None:
                    d += float(dt_bias[hd, p])
                if dt_softplus and d <= 20.0:
                    d = math.log1p(math.exp(d))
                xv = float(x[b, hd, p])
                for n in range(A.shape[-1]):
                    h[hd, p, n] = math.exp(float(A[hd, p, n]) * d) * h[hd, p, n] + d * float(B[b, g, n]) * xv
                yv = float((h[hd, p] * C[b, g].double()).sum())
                if D is not None:
                    yv += xv * float(D[hd, p])
                if z is not None:
                    zv = float(z[b, hd, p])
                    yv *= zv / (1.0 + math.exp(-zv))
                out[b, hd, p] = yv
        if slot != pad_slot_id:
            st[slot] = h
    return out, st
