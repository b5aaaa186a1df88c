"""Causal depthwise conv1d for the Mamba2 mixer on CPU (plain torch).

SGLang 0.5.23's ``MambaMixer2.forward`` calls two conv entry points, bound only
for CUDA/NPU/XPU in ``srt/layers/attention/mamba/mamba.py``:

* prefill: ``causal_conv1d_fn(x, weight, bias, activation=..., conv_states=...,
  has_initial_state=..., cache_indices=..., query_start_loc=..., seq_lens_cpu=...)``
  with ``x`` of shape ``(dim, total_tokens)`` (the varlen sequences packed along
  the token axis, ``query_start_loc = [0, l0, l0+l1, ...]``). It returns a new
  ``(dim, total_tokens)`` tensor and updates ``conv_states[cache_indices[i]]`` in
  place with the last ``width - 1`` inputs of sequence ``i``;
* decode: ``causal_conv1d_update(x, conv_state, weight, bias, activation,
  conv_state_indices=...)`` with ``x`` of shape ``(batch, dim)`` or
  ``(batch, dim, seqlen)``; it shifts ``conv_state[conv_state_indices[b]]`` left
  by ``seqlen`` and appends ``x[b]``.

Semantics follow SGLang's Triton kernels (``kernels/ops/mamba/causal_conv1d_triton.py``):

* the window of sequence ``i`` is ``conv_states[slot, :, :width-1]`` when
  ``has_initial_state[i]`` is true, zeros otherwise (zeros also when
  ``has_initial_state`` or ``conv_states`` is ``None``);
* ``out[:, t] = act(bias + sum_j weight[:, j] * window[:, t + j])`` over the
  sequence's tokens appended to that window, ``act`` = SiLU for ``"silu"``,
  ``"swish"`` or ``True``, identity for ``None``/``False``;
* the new conv state is the last ``width - 1`` columns of
  ``[initial window | sequence tokens]`` (zero padded on the left when the
  sequence is shorter than ``width - 1`` and has no initial state);
* a sequence whose slot equals ``pad_slot_id`` is skipped (its output columns
  are zero here; the Triton kernel leaves them unwritten) and its state is not
  touched.

Accumulation is float32 (float64 for float64 inputs); the output has ``x``'s
dtype and the stored state has ``conv_states``' dtype.

``*_ref`` twins compute the same thing token by token in float64 with Python
loops: the test oracle.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

PAD_SLOT_ID = -1

__all__ = [
    "PAD_SLOT_ID",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "causal_conv1d_states_at",
    "causal_conv1d_fn_ref",
    "causal_conv1d_update_ref",
    "causal_conv1d_states_at_ref",
]


# --------------------------------------------------------------------------- helpers


def _use_silu(activation: Union[str, bool, None]) -> bool:
    if activation is None or activation is False:
        return False
    if activation is True or activation in ("silu", "swish"):
        return True
    raise NotImplementedError(f"activation must be None, 'silu' or 'swish', got {activation!r}")


def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _seq_bounds(
    query_start_loc: Optional[torch.Tensor],
    seq_lens_cpu: Optional[Sequence[int]],
    total: int,
) -> List[Tuple[int, int]]:
    """[(start, end)] per sequence from query_start_loc (preferred) or lengths."""
    if query_start_loc is not None:
        qsl = [int(v) for v in query_start_loc.detach().to("cpu").tolist()]
        bounds = list(zip(qsl[:-1], qsl[1:]))
    elif seq_lens_cpu is not None:
        bounds, s = [], 0
        for n in seq_lens_cpu:
            bounds.append((s, s + int(n)))
            s += int(n)
    else:
        bounds = [(0, total)]
    for s, e in bounds:
        if s < 0 or e < s or e > total:
            raise ValueError(f"sequence bounds ({s}, {e}) do not fit x with {total} tokens")
    return bounds


def _slots(
    n: int,
    cache_indices: Optional[torch.Tensor],
    conv_states: Optional[torch.Tensor],
) -> List[Optional[int]]:
    """Conv-state slot per sequence (None: no cache)."""
    if cache_indices is not None:
        idx = [int(v) for v in cache_indices.detach().to("cpu").tolist()]
        if len(idx) < n:
            raise ValueError(f"cache_indices has {len(idx)} entries for {n} sequences")
        return idx[:n]
    if conv_states is None:
        return [None] * n
    return list(range(n))


def _has_init(n: int, has_initial_state: Optional[torch.Tensor]) -> List[bool]:
    if has_initial_state is None:
        return [False] * n
    flags = [bool(v) for v in has_initial_state.detach().to("cpu").reshape(-1).tolist()]
    if len(flags) < n:
        raise ValueError(f"has_initial_state has {len(flags)} entries for {n} sequences")
    return flags[:n]


# --------------------------------------------------------------------------- prefill (varlen)


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    conv_states: Optional[torch.Tensor] = None,
    query_start_loc: Optional[torch.Tensor] = None,
    seq_lens_cpu: Optional[Sequence[int]] = None,
    cache_indices: Optional[torch.Tensor] = None,
    has_initial_state: Optional[torch.Tensor] = None,
    activation: Union[str, bool, None] = "silu",
    pad_slot_id: int = PAD_SLOT_ID,
    validate_data: bool = False,
    block_table: Optional[torch.Tensor] = None,
    **kwargs,
) -> torch.Tensor:
    """Varlen causal conv1d over ``x`` ``(dim, total_tokens)``; returns a new tensor.

    Matches SGLang's ``causal_conv1d_fn`` (Triton and CUDA wrappers) when called
    with keywords, as ``MambaMixer2`` does. ``conv_states`` ``(cache_lines, dim,
    >= width-1)`` is updated in place. ``block_table`` (a CUDA launch layout) is
    not needed on CPU and is ignored.
    """
    silu = _use_silu(activation)
    if x.dim() != 2:
        raise ValueError(f"x must be (dim, total_tokens), got shape {tuple(x.shape)}")
    dim, total = x.shape
    if weight.dim() == 3:  # (dim, 1, width), as stored by the conv1d layer
        weight = weight.reshape(weight.shape[0], weight.shape[-1])
    if weight.shape[0] != dim:
        raise ValueError(f"weight has {weight.shape[0]} channels, x has {dim}")
    width = weight.shape[1]
    sl = width - 1
    if conv_states is not None and (conv_states.shape[1] != dim or conv_states.shape[2] < sl):
        raise ValueError(
            f"conv_states shape {tuple(conv_states.shape)} does not fit dim={dim}, width={width}"
        )
    bounds = _seq_bounds(query_start_loc, seq_lens_cpu, total)
    n = len(bounds)
    slots = _slots(n, cache_indices, conv_states)
    init = _has_init(n, has_initial_state)

    cdt = _compute_dtype(x, weight, conv_states)
    out = torch.zeros_like(x)
    active = [i for i in range(n) if slots[i] != pad_slot_id and bounds[i][1] > bounds[i][0]]
    if not active:
        return out

    # One depthwise conv over a buffer holding, per sequence, its initial window
    # followed by its tokens: [w_0 | x_0 | w_1 | x_1 | ...]. The output column at
    # offset o uses buffer columns [o, o + width); sequence i's token t sits at
    # off_i + sl + t, so its output is column off_i + t. Columns whose window
    # crosses into the next sequence are computed and discarded.
    lens = [bounds[i][1] - bounds[i][0] for i in active]
    offs, o = [], 0
    for L in lens:
        offs.append(o)
        o += sl + L
    buf = torch.zeros((dim, o), dtype=cdt, device=x.device)
    xc = x.to(cdt)
    for k, i in enumerate(active):
        s, e = bounds[i]
        buf[:, offs[k] + sl : offs[k] + sl + lens[k]] = xc[:, s:e]
        if sl and conv_states is not None and init[i] and slots[i] is not None:
            buf[:, offs[k] : offs[k] + sl] = conv_states[slots[i], :, :sl].to(cdt)

    w = weight.to(cdt).reshape(dim, 1, width)
    b = bias.to(cdt) if bias is not None else None
    y = F.conv1d(buf.unsqueeze(0), w, b, groups=dim).squeeze(0)  # (dim, o - sl)
    if silu:
        y = F.silu(y)
    for k, i in enumerate(active):
        s, e = bounds[i]
        out[:, s:e] = y[:, offs[k] : offs[k] + lens[k]].to(x.dtype)

    if conv_states is not None and sl:
        for k, i in enumerate(active):
            if slots[i] is None:
                continue
            end = offs[k] + sl + lens[k]
            conv_states[slots[i], :, :sl] = buf[:, end - sl : end].to(conv_states.dtype)
    return out


# --------------------------------------------------------------------------- decode


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Union[str, bool, None] = None,
    cache_seqlens: Optional[torch.Tensor] = None,
    conv_state_indices: Optional[torch.Tensor] = None,
    num_accept_tokens: Optional[torch.Tensor] = None,
    intermediate_conv_window: Optional[torch.Tensor] = None,
    intermediate_state_indices: Optional[torch.Tensor] = None,
    retrieve_next_token: Optional[torch.Tensor] = None,
    retrieve_next_sibling: Optional[torch.Tensor] = None,
    retrieve_parent_token: Optional[torch.Tensor] = None,
    pad_slot_id: int = PAD_SLOT_ID,
    metadata=None,
    validate_data: bool = False,
) -> torch.Tensor:
    """One (or a few) decode steps: ``x`` ``(batch, dim)`` or ``(batch, dim, seqlen)``.

    Signature of SGLang's ``causal_conv1d_update`` (Triton). The speculative
    decoding extras (``num_accept_tokens``, ``intermediate_conv_window``, the
    EAGLE tree ``retrieve_*``) and the circular buffer ``cache_seqlens`` are
    not implemented on CPU and raise ``NotImplementedError``.
    """
    unsupported = {
        "cache_seqlens": cache_seqlens,
        "num_accept_tokens": num_accept_tokens,
        "intermediate_conv_window": intermediate_conv_window,
        "retrieve_next_token": retrieve_next_token,
        "retrieve_next_sibling": retrieve_next_sibling,
        "retrieve_parent_token": retrieve_parent_token,
    }
    for name, val in unsupported.items():
        if val is not None:
            raise NotImplementedError(
                f"causal_conv1d_update on CPU: {name} (speculative decoding / circular "
                "buffer) is not supported"
            )
    silu = _use_silu(activation)
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(-1) if squeeze else x
    batch, dim, seqlen = x3.shape
    if weight.dim() == 3:
        weight = weight.reshape(weight.shape[0], weight.shape[-1])
    width = weight.shape[1]
    sl = width - 1
    if conv_state.shape[1] != dim or conv_state.shape[2] < sl:
        raise ValueError(
            f"conv_state shape {tuple(conv_state.shape)} does not fit dim={dim}, width={width}"
        )
    if conv_state_indices is not None:
        slots = conv_state_indices.to(device=conv_state.device, dtype=torch.long).reshape(-1)
        if slots.numel() != batch:
            raise ValueError(f"conv_state_indices has {slots.numel()} entries for batch {batch}")
    else:
        slots = torch.arange(batch, device=conv_state.device)
    valid = slots != pad_slot_id
    cdt = _compute_dtype(x, weight, conv_state)

    safe = torch.where(valid, slots, torch.zeros_like(slots))
    window = torch.cat([conv_state[safe, :, :sl].to(cdt), x3.to(cdt)], dim=-1)  # (b, dim, sl+seqlen)
    # out[b, c, t] = sum_j w[c, j] * window[b, c, t + j]
    win = window.unfold(-1, width, 1)  # (b, dim, seqlen, width)
    y = (win * weight.to(cdt)[None, :, None, :]).sum(-1)
    if bias is not None:
        y = y + bias.to(cdt)[None, :, None]
    if silu:
        y = F.silu(y)
    y = torch.where(valid[:, None, None], y, torch.zeros_like(y))
    if sl:
        new_state = window[:, :, -sl:]
        if bool(valid.all()):
            conv_state[slots, :, :sl] = new_state.to(conv_state.dtype)
        elif bool(valid.any()):
            conv_state[slots[valid], :, :sl] = new_state[valid].to(conv_state.dtype)
    out = y.to(x.dtype)
    return out.squeeze(-1) if squeeze else out


# --------------------------------------------------------------------------- conv state mid-sequence


def causal_conv1d_states_at(
    x: torch.Tensor,
    width: int,
    query_start_loc: torch.Tensor,
    offsets: Union[torch.Tensor, Sequence[int]],
    conv_states: Optional[torch.Tensor] = None,
    cache_indices: Optional[torch.Tensor] = None,
    has_initial_state: Optional[torch.Tensor] = None,
    seq_ids: Optional[Union[torch.Tensor, Sequence[int]]] = None,
) -> torch.Tensor:
    """Conv state of sequences after ``offsets[k]`` of their tokens.

    ``x`` is the conv *input* ``(dim, total_tokens)`` packed as in
    :func:`causal_conv1d_fn` and read-only here (``conv_states`` are not written).
    Snapshot ``k`` belongs to sequence ``seq_ids[k]`` (default: ``k``) and is the
    state :func:`causal_conv1d_fn` would leave if that sequence stopped after
    ``offsets[k]`` tokens (``0 <= offsets[k] <= length``): the last ``width - 1``
    columns of ``[initial window | first offsets[k] tokens]``. Returns
    ``(num_snapshots, dim, width - 1)`` in ``x``'s dtype.
    """
    dim, total = x.shape
    sl = width - 1
    bounds = _seq_bounds(query_start_loc, None, total)
    n = len(bounds)
    offs = [int(v) for v in (offsets.tolist() if torch.is_tensor(offsets) else offsets)]
    sids = list(range(len(offs))) if seq_ids is None else [
        int(v) for v in (seq_ids.tolist() if torch.is_tensor(seq_ids) else seq_ids)
    ]
    if len(sids) != len(offs):
        raise ValueError(f"{len(sids)} seq_ids for {len(offs)} offsets")
    slots = _slots(n, cache_indices, conv_states)
    init = _has_init(n, has_initial_state)
    res = torch.zeros((len(offs), dim, sl), dtype=x.dtype, device=x.device)
    for k, (i, off) in enumerate(zip(sids, offs)):
        s, e = bounds[i]
        if not 0 <= off <= e - s:
            raise ValueError(f"offset {off} outside sequence {i} of length {e - s}")
        if conv_states is not None and init[i] and slots[i] is not None and slots[i] != PAD_SLOT_ID:
            head = conv_states[slots[i], :, :sl].to(x.dtype)
        else:
            head = torch.zeros((dim, sl), dtype=x.dtype, device=x.device)
        seq = torch.cat([head, x[:, s : s + off]], dim=-1)
        res[k] = seq[:, seq.shape[1] - sl :]
    return res


# --------------------------------------------------------------------------- float64 references


def causal_conv1d_fn_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    conv_states: Optional[torch.Tensor],
    query_start_loc: torch.Tensor,
    cache_indices: Optional[torch.Tensor] = None,
    has_initial_state: Optional[torch.Tensor] = None,
    activation: Union[str, bool, None] = "silu",
    pad_slot_id: int = PAD_SLOT_ID,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token-by-token float64 oracle. Returns ``(out, new_conv_states)``.

    Nothing is modified in place: ``new_conv_states`` is a float64 copy of
    ``conv_states`` with the sequences' slots updated.
    """
    silu = _use_silu(activation)
    dim, total = x.shape
    if weight.dim() == 3:
        weight = weight.reshape(weight.shape[0], weight.shape[-1])
    width = weight.shape[1]
    sl = width - 1
    xd = x.double()
    wd = weight.double()
    bd = bias.double() if bias is not None else None
    states = conv_states.double().clone() if conv_states is not None else None
    bounds = _seq_bounds(query_start_loc, None, total)
    slots = _slots(len(bounds), cache_indices, conv_states)
    init = _has_init(len(bounds), has_initial_state)
    out = torch.zeros((dim, total), dtype=torch.float64)
    for i, (s, e) in enumerate(bounds):
        if slots[i] == pad_slot_id:
            continue
        hist = [torch.zeros(dim, dtype=torch.float64) for _ in range(sl)]
        if states is not None and init[i] and slots[i] is not None:
            hist = [states[slots[i], :, j].clone() for j in range(sl)]
        for t in range(s, e):
            hist.append(xd[:, t])
            acc = torch.zeros(dim, dtype=torch.float64)
            for j in range(width):
                acc = acc + wd[:, j] * hist[len(hist) - width + j]
            if bd is not None:
                acc = acc + bd
            if silu:
                acc = acc / (1.0 + torch.exp(-acc))
            out[:, t] = acc
        if states is not None and slots[i] is not None and sl:
            for j in range(sl):
                states[slots[i], :, j] = hist[len(hist) - sl + j]
    return out, states


def causal_conv1d_update_ref(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Union[str, bool, None] = None,
    conv_state_indices: Optional[torch.Tensor] = None,
    pad_slot_id: int = PAD_SLOT_ID,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float64 oracle of :func:`causal_conv1d_update`: ``(out, new_conv_state)``.

    Padded rows give zero output and leave their slot alone.
    """
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(-1) if squeeze else x
    batch, dim, seqlen = x3.shape
    if weight.dim() == 3:
        weight = weight.reshape(weight.shape[0], weight.shape[-1])
    width = weight.shape[1]
    sl = width - 1
    silu = _use_silu(activation)
    state = conv_state.double().clone()
    out = torch.zeros((batch, dim, seqlen), dtype=torch.float64)
    for b in range(batch):
        slot = int(conv_state_indices[b]) if conv_state_indices is not None else b
        if slot == pad_slot_id:
            continue
        hist = [state[slot, :, j].clone() for j in range(sl)]
        for t in range(seqlen):
            hist.append(x3[b, :, t].double())
            acc = torch.zeros(dim, dtype=torch.float64)
            for j in range(width):
                acc = acc + weight[:, j].double() * hist[len(hist) - width + j]
            if bias is not None:
                acc = acc + bias.double()
            if silu:
                acc = acc / (1.0 + torch.exp(-acc))
            out[b, :, t] = acc
        for j in range(sl):
            state[slot, :, j] = hist[len(hist) - sl + j]
    return (out.squeeze(-1) if squeeze else out), state


def causal_conv1d_states_at_ref(
    x: torch.Tensor,
    width: int,
    query_start_loc: torch.Tensor,
    offsets: Sequence[int],
    conv_states: Optional[torch.Tensor] = None,
    cache_indices: Optional[torch.Tensor] = None,
    has_initial_state: Optional[torch.Tensor] = None,
    seq_ids: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Oracle: run :func:`causal_conv1d_fn_ref` on each truncated sequence alone."""
    dim, _ = x.shape
    qsl = [int(v) for v in query_start_loc.tolist()]
    sids = list(range(len(offsets))) if seq_ids is None else list(seq_ids)
    res = []
    w = torch.ones(dim, width, dtype=torch.float64)
    for i, off in zip(sids, offsets):
        s = qsl[i]
        one_x = x[:, s : s + off].double()
        if conv_states is not None:
            slot = int(cache_indices[i]) if cache_indices is not None else i
            st = conv_states[slot : slot + 1].double().clone()
            hi = has_initial_state[i : i + 1] if has_initial_state is not None else None
        else:
            st = torch.zeros(1, dim, width - 1, dtype=torch.float64)
            hi = None
        _, new = causal_conv1d_fn_ref(
            one_x, w, None, st, torch.tensor([0, off]), None, hi, None
        )
        res.append(new[0, :, : width - 1])
    return torch.stack(res) if res else torch.zeros(0, dim, width - 1, dtype=torch.float64)
