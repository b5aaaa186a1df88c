"""Marconi's FLOP / byte cost model for hybrid attention + SSM LLMs.

Plain Python (stdlib only): this module is imported by every driver, including the
subprocess that tunes alpha, so it must not import torch or sglang.

A :class:`CostProfile` answers, for one model:

* ``prefill_flops(start, end)``: the FLOPs to compute tokens ``[start, end)`` when
  tokens ``[0, start)`` are already cached (attention attends over all ``end``
  tokens, every other layer is per token).
* ``flops_saved(parent_len, end, replay_from)``: what a cache hit on a radix node
  covering ``[parent_len, end)`` saves. Without the node's SSM state, a request
  needing ``end`` tokens would fall back to the nearest ancestor holding a state
  (position ``replay_from``) and recompute every layer over ``[replay_from, end)``,
  so the saving is ``prefill_flops(replay_from, end)``; Marconi's paper uses
  ``replay_from == parent_len``.
* ``kv_bytes(n)``, ``ssm_state_bytes()``, ``node_bytes(n, has_state)`` and
  ``efficiency(...) = flops_saved / node_bytes``.

Two families of formulas
------------------------
``ssm_kind == "paper"``: exactly the Marconi paper's per-layer formulas (fp16,
``D`` = d_model, ``N`` = d_state, ``l`` = tokens)::

    attention(l) = 8 l D^2 + 4 l^2 D        MLP(l) = 16 l D^2
    Mamba(l)     = 12 l D^2 + 16 l D N + 10 l D
    KV bytes     = 2 * l * D * 2 per attention layer
    state bytes  = 2 D N + 2 * 4 * (2 D + 2 N) per SSM layer

and, prefix-aware, ``prefill(P, T) = L_ssm Mamba(T - P) + L_attn (attention(T) -
attention(P)) + L_mlp (MLP(T) - MLP(P))``. (The authors' code subtracts
``attention(P)`` in the MLP term, which makes efficiency negative for long parents;
this module uses the intended ``MLP(P)``.) Note the paper's attention term counts
the full ``l^2`` score matrix (no causal halving) and its state uses ``D * N``,
not ``expand * D * N``.

``ssm_kind in ("mamba2", "gdn")``: matmul counting, ``2 * m * n * k`` FLOPs per
``(m x k) @ (k x n)`` product, over the shapes SGLang 0.5.23 builds (tp = 1). The
per-layer formulas are in the docstrings of :meth:`CostProfile.attention_layer_flops`,
:meth:`CostProfile.mlp_layer_flops`, :meth:`CostProfile.moe_layer_flops` and
:meth:`CostProfile.ssm_layer_flops`. Embeddings, the LM head (prefill computes logits
for the last token only, hit or miss), norms, residual adds, rotary embeddings and
softmax are left out: they are not dominant, or do not depend on the cache hit.
State bytes use the exact shapes and dtypes of SGLang's ``MambaPool`` (one slot:
``conv`` + ``temporal`` for every SSM layer); see :meth:`CostProfile.ssm_state_bytes`.

All FLOP arithmetic is done on Python ints (exact) and converted to float at the
end, so ``prefill_flops(R, P) + prefill_flops(P, T) == prefill_flops(R, T)`` up to
float rounding.

Built-in profiles are config dicts in ``profiles/*.json`` (package data), written
from the models' published ``config.json`` files; :func:`builtin_profile` loads them
through :func:`from_hf_config`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Union

__all__ = [
    "BUILTIN_PROFILES",
    "SSM_KINDS",
    "CostProfile",
    "builtin_profile",
    "dtype_bytes",
    "from_hf_config",
    "load_config_dict",
]

SSM_KINDS: tuple[str, ...] = ("mamba2", "gdn", "paper")

#: Names accepted by :func:`builtin_profile`; each has ``profiles/<name>.json``.
BUILTIN_PROFILES: tuple[str, ...] = (
    "paper-7b",
    "nemotron-h-8b",
    "falcon-h1-7b",
    "qwen3-next-80b-a3b",
    "qwen3.5-9b",
)

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"

#: Chunk length of the chunked scan kernels when a config does not say:
#: SGLang's Mamba2 default (``mamba_chunk_size``) and FLA's gated-delta-rule chunk.
DEFAULT_MAMBA2_CHUNK = 256
DEFAULT_GDN_CHUNK = 64

_DTYPE_BYTES = {
    "float32": 4,
    "fp32": 4,
    "float": 4,
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "fp16": 2,
    "half": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}


def dtype_bytes(dtype: Union[str, int], *, field: str = "dtype") -> int:
    """Bytes per element of a dtype name (``"bfloat16"``, ``"torch.float32"``, ``"fp8_e4m3"``...)
    or an int byte count. Unknown names raise ``ValueError`` naming ``field``."""
    if isinstance(dtype, bool):
        raise ValueError(f"{field}: expected a dtype name or byte count, got {dtype!r}")
    if isinstance(dtype, int):
        if dtype not in (1, 2, 4, 8):
            raise ValueError(f"{field}: byte count must be 1, 2, 4 or 8, got {dtype!r}")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower()
        if key.startswith("torch."):
            key = key[len("torch."):]
        if key in _DTYPE_BYTES:
            return _DTYPE_BYTES[key]
    raise ValueError(
        f"{field}: unknown dtype {dtype!r} (known: {', '.join(sorted(_DTYPE_BYTES))})"
    )


def _tri(n: int) -> int:
    """sum_{p=0}^{n-1} (p + 1): keys attended by the first ``n`` causal queries."""
    return n * (n + 1) // 2


@dataclass(frozen=True)
class CostProfile:
    """FLOP and byte costs of one hybrid model (see the module docstring).

    Layer counts are per kind of sublayer: a Falcon-H1 decoder layer (attention,
    Mamba2 and MLP in parallel) counts once in each of ``n_attn``, ``n_ssm`` and
    ``n_mlp``; a Nemotron-H layer is exactly one of them.
    """

    name: str
    d_model: int
    n_attn: int  #: full-attention layers holding KV
    n_ssm: int  #: Mamba2 / Gated DeltaNet layers holding one state each
    ssm_kind: str  #: "mamba2" | "gdn" | "paper"

    # --- dense MLP layers -------------------------------------------------------
    n_mlp: int = 0
    d_ff: int = 0
    #: gated MLP (gate, up, down: SwiGLU) vs two matrices (up, down: Nemotron-H relu2);
    #: applies to routed and shared experts too.
    mlp_gated: bool = True

    # --- MoE layers ---------------------------------------------------------------
    n_moe: int = 0
    n_experts: int = 0  #: routed experts (router width)
    experts_per_tok: int = 0  #: routed experts active per token
    moe_d_ff: int = 0
    n_shared_experts: int = 0
    shared_d_ff: int = 0
    shared_expert_gate: bool = False  #: Qwen's sigmoid gate on the shared expert (D -> 1)
    moe_latent_size: int = 0  #: Nemotron-H latent MoE: experts run in this width

    # --- attention ----------------------------------------------------------------
    attn_heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    attn_output_gate: bool = False  #: Qwen3-Next / 3.5 gated attention (q_proj doubled)

    # --- SSM (Mamba2: heads / head_dim / d_state / n_groups;
    #          GDN: value heads / value head dim / key head dim / key heads) ---------
    ssm_heads: int = 0
    ssm_head_dim: int = 0
    d_state: int = 0
    n_groups: int = 0
    conv_kernel: int = 4
    chunk_size: int = 0  #: scan chunk length (0 = the kind's default)
    ssm_expand: int = 0  #: informational (paper kind / configs that state it)

    # --- dtypes (bytes per element) --------------------------------------------------
    kv_dtype_bytes: int = 2
    conv_dtype_bytes: int = 2  #: SGLang default: bfloat16 (SGLANG_MAMBA_CONV_DTYPE)
    ssm_dtype_bytes: int = 4  #: SGLang default: float32 (SGLANG_MAMBA_SSM_DTYPE / mamba_ssm_dtype)

    n_layers: int = 0  #: decoder layers in the model (informational)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: expected a non-empty string, got {self.name!r}")
        if self.ssm_kind not in SSM_KINDS:
            raise ValueError(f"ssm_kind: expected one of {SSM_KINDS}, got {self.ssm_kind!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("name", "ssm_kind"):
                continue
            if f.type in ("bool", bool):
                if not isinstance(v, bool):
                    raise ValueError(f"{f.name}: expected a bool, got {v!r}")
            elif isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{f.name}: expected a non-negative int, got {v!r}")
        if self.d_model <= 0:
            raise ValueError(f"d_model: must be positive, got {self.d_model}")
        for b in ("kv_dtype_bytes", "conv_dtype_bytes", "ssm_dtype_bytes"):
            if getattr(self, b) not in (1, 2, 4, 8):
                raise ValueError(f"{b}: must be 1, 2, 4 or 8, got {getattr(self, b)}")
        if self.n_attn and (self.kv_heads <= 0 or self.head_dim <= 0 or self.attn_heads <= 0):
            raise ValueError("attn_heads/kv_heads/head_dim: must be positive when n_attn > 0")
        if self.n_mlp and self.d_ff <= 0:
            raise ValueError("d_ff: must be positive when n_mlp > 0")
        if self.n_moe:
            if self.ssm_kind == "paper":
                raise ValueError("n_moe: the paper's formulas have no MoE layers")
            if self.experts_per_tok <= 0 or self.moe_d_ff <= 0 or self.n_experts < self.experts_per_tok:
                raise ValueError(
                    "experts_per_tok/moe_d_ff/n_experts: need 0 < experts_per_tok <= n_experts "
                    "and moe_d_ff > 0 when n_moe > 0"
                )
            if self.n_shared_experts and self.shared_d_ff <= 0:
                raise ValueError("shared_d_ff: must be positive when n_shared_experts > 0")
        if self.n_ssm:
            if self.ssm_kind == "paper":
                if self.d_state <= 0:
                    raise ValueError("d_state: must be positive when n_ssm > 0")
            else:
                for f in ("ssm_heads", "ssm_head_dim", "d_state", "n_groups", "conv_kernel"):
                    if getattr(self, f) <= 0:
                        raise ValueError(f"{f}: must be positive when n_ssm > 0")
                if self.ssm_kind == "gdn" and self.ssm_heads % self.n_groups:
                    raise ValueError(
                        f"n_groups: GDN key heads ({self.n_groups}) must divide value heads "
                        f"({self.ssm_heads})"
                    )

    # ------------------------------------------------------------------ derived sizes
    @property
    def ssm_inner(self) -> int:
        """Mamba2 ``d_inner`` (= heads * head_dim) or GDN ``value_dim``."""
        return self.ssm_heads * self.ssm_head_dim

    @property
    def ssm_conv_dim(self) -> int:
        """Channels of the causal conv (and of its cached state).

        Mamba2: ``d_inner + 2 * n_groups * d_state`` (x, B, C);
        GDN: ``value_dim + 2 * key_heads * key_head_dim`` (q, k, v)."""
        return self.ssm_inner + 2 * self.n_groups * self.d_state

    @property
    def effective_chunk_size(self) -> int:
        if self.chunk_size:
            return self.chunk_size
        return DEFAULT_GDN_CHUNK if self.ssm_kind == "gdn" else DEFAULT_MAMBA2_CHUNK

    @property
    def kv_bytes_per_token(self) -> int:
        """``n_attn * 2 (K, V) * kv_heads * head_dim * kv_dtype_bytes``."""
        return self.n_attn * 2 * self.kv_heads * self.head_dim * self.kv_dtype_bytes

    def kv_bytes(self, n_tokens: int) -> int:
        """KV bytes of ``n_tokens`` tokens over all attention layers (K and V)."""
        _check_count("n_tokens", n_tokens)
        return n_tokens * self.kv_bytes_per_token

    def ssm_state_layer_bytes(self) -> int:
        """Bytes of one SSM layer's state (one checkpoint, one layer)."""
        if self.ssm_kind == "paper":
            d, n = self.d_model, self.d_state
            return 2 * d * n + 2 * 4 * (2 * d + 2 * n)
        # SGLang Mamba2StateShape.create (tp=1), also used for GDN:
        #   conv     = (conv_dim, conv_kernel - 1)       at the conv dtype
        #   temporal = (heads, head_dim, state_size)     at the SSM dtype
        # GDN: heads = value heads, head_dim = value head dim, state = key head dim.
        conv = self.ssm_conv_dim * (self.conv_kernel - 1) * self.conv_dtype_bytes
        temporal = self.ssm_heads * self.ssm_head_dim * self.d_state * self.ssm_dtype_bytes
        return conv + temporal

    def ssm_state_bytes(self) -> int:
        """Bytes of one SSM checkpoint: temporal + conv state over all SSM layers.

        For "mamba2"/"gdn" this is what SGLang's ``MambaPool`` allocates per slot
        (``Mamba2CacheParams.mamba_cache_per_req`` at tp = 1); for "paper" it is
        the paper's ``L_ssm * (2 D N + 2 * 4 * (2 D + 2 N))``."""
        return self.n_ssm * self.ssm_state_layer_bytes()

    def state_kv_equivalent_tokens(self) -> float:
        """How many tokens of KV one SSM checkpoint weighs (inf without attention)."""
        per_tok = self.kv_bytes_per_token
        if per_tok == 0:
            return float("inf") if self.ssm_state_bytes() else 0.0
        return self.ssm_state_bytes() / per_tok

    def node_bytes(self, n_tokens: int, has_state: bool) -> int:
        """Bytes a radix node of ``n_tokens`` tokens holds: their KV, plus one
        SSM checkpoint if ``has_state``."""
        return self.kv_bytes(n_tokens) + (self.ssm_state_bytes() if has_state else 0)

    # --------------------------------------------------------------- per-layer FLOPs
    def attention_layer_flops(self, start: int, end: int) -> int:
        """FLOPs of one full-attention layer for tokens ``[start, end)`` (prefix cached).

        paper: ``8 c D^2 + 4 (end^2 - start^2) D`` with ``c = end - start``.

        real (GQA, ``H`` query heads, ``K`` KV heads, ``d`` head dim, ``g`` = 2 with an
        output gate else 1)::

            projections = 2 c D (g H d + 2 K d)  +  2 c (H d) D          (q|gate, k, v; o)
            scores      = 4 H d * sum_{p=start}^{end-1} (p + 1)          (QK^T and AV,
                        = 4 H d (T(end) - T(start)),  T(n) = n (n+1) / 2  causal)
        """
        c = end - start
        if self.ssm_kind == "paper":
            d = self.d_model
            return 8 * c * d * d + 4 * (end * end - start * start) * d
        hd = self.attn_heads * self.head_dim
        gate = 2 if self.attn_output_gate else 1
        proj = 2 * c * self.d_model * (gate * hd + 2 * self.kv_heads * self.head_dim)
        proj += 2 * c * hd * self.d_model
        scores = 4 * hd * (_tri(end) - _tri(start))
        return proj + scores

    def mlp_layer_flops(self, n_tokens: int) -> int:
        """FLOPs of one dense MLP layer over ``n_tokens`` tokens.

        paper: ``16 l D^2``; real: ``2 * m * l * D * d_ff`` with ``m`` = 3 matrices
        (gated: gate, up, down) or 2 (up, down)."""
        if self.ssm_kind == "paper":
            return 16 * n_tokens * self.d_model * self.d_model
        m = 3 if self.mlp_gated else 2
        return 2 * m * n_tokens * self.d_model * self.d_ff

    def moe_layer_flops(self, n_tokens: int) -> int:
        """FLOPs of one MoE layer over ``n_tokens`` tokens (per token, times ``l``)::

            router  = 2 D E
            routed  = k * 2 m D_in f          (k active experts, f = moe_d_ff, m = 3 or 2,
                      + 4 D r if latent        D_in = latent width r if set, else D)
            shared  = s * 2 m D f_s  (+ 2 D for Qwen's shared-expert gate)
        """
        if not self.n_moe:
            return 0
        d = self.d_model
        m = 3 if self.mlp_gated else 2
        per_tok = 2 * d * self.n_experts
        d_in = self.moe_latent_size or d
        per_tok += self.experts_per_tok * 2 * m * d_in * self.moe_d_ff
        if self.moe_latent_size:
            per_tok += 2 * 2 * d * self.moe_latent_size
        per_tok += self.n_shared_experts * 2 * m * d * self.shared_d_ff
        if self.shared_expert_gate:
            per_tok += 2 * d
        return n_tokens * per_tok

    def ssm_layer_flops(self, n_tokens: int) -> int:
        """FLOPs of one SSM layer over ``n_tokens`` tokens (linear in ``l``).

        paper: ``12 l D^2 + 16 l D N + 10 l D``.

        Mamba2 (``H`` heads of ``P`` dims, ``d_in = H P``, ``G`` groups, ``N`` d_state,
        conv kernel ``W``, scan chunk ``Q``), per token::

            in_proj  = 2 D (2 d_in + 2 G N + H)       (z, x, B, C, dt)
            conv     = 2 (d_in + 2 G N) W             (depthwise over x, B, C)
            SSD scan = 4 H P N                        (chunk states B^T x; state->output C h)
                     + 2 Q (G N + H P)                (intra-chunk C B^T and its mix with x)
            misc     = 10 d_in                        (dt softplus, D skip, gate, norm; approx.)
            out_proj = 2 d_in D

        Gated DeltaNet (``Hv`` value heads of ``dv``, ``Hk`` key heads of ``dk``,
        ``key_dim = Hk dk``, ``value_dim = Hv dv``), per token::

            in_proj  = 2 D (2 key_dim + 2 value_dim) + 2 D (2 Hv)    (q, k, v, z; b, a)
            conv     = 2 (2 key_dim + value_dim) W
            delta    = Hv (6 dk dv + 4 Q (dk + dv))   (chunked delta rule: state update,
                                                        state->output, W S correction;
                                                        intra-chunk q k^T, k k^T, mixes)
            misc     = 10 value_dim
            out_proj = 2 value_dim D
        """
        l = n_tokens
        d = self.d_model
        if self.ssm_kind == "paper":
            n = self.d_state
            return 12 * l * d * d + 16 * l * d * n + 10 * l * d
        q = self.effective_chunk_size
        inner = self.ssm_inner
        conv_dim = self.ssm_conv_dim
        if self.ssm_kind == "mamba2":
            h, p, g, n = self.ssm_heads, self.ssm_head_dim, self.n_groups, self.d_state
            per_tok = 2 * d * (2 * inner + 2 * g * n + h)
            per_tok += 2 * conv_dim * self.conv_kernel
            per_tok += 4 * h * p * n + 2 * q * (g * n + h * p)
            per_tok += 10 * inner
            per_tok += 2 * inner * d
        else:  # gdn
            hv, dv, hk, dk = self.ssm_heads, self.ssm_head_dim, self.n_groups, self.d_state
            key_dim = hk * dk
            per_tok = 2 * d * (2 * key_dim + 2 * inner) + 2 * d * (2 * hv)
            per_tok += 2 * conv_dim * self.conv_kernel
            per_tok += hv * (6 * dk * dv + 4 * q * (dk + dv))
            per_tok += 10 * inner
            per_tok += 2 * inner * d
        return l * per_tok

    # -------------------------------------------------------------- model-level FLOPs
    def prefill_flops_int(self, start: int, end: int) -> int:
        """:meth:`prefill_flops` as an exact int."""
        _check_count("start", start)
        _check_count("end", end)
        if start > end:
            raise ValueError(f"start: must be <= end, got start={start}, end={end}")
        c = end - start
        total = 0
        if self.n_attn:
            total += self.n_attn * self.attention_layer_flops(start, end)
        if self.n_mlp:
            total += self.n_mlp * self.mlp_layer_flops(c)
        if self.n_moe:
            total += self.n_moe * self.moe_layer_flops(c)
        if self.n_ssm:
            total += self.n_ssm * self.ssm_layer_flops(c)
        return total

    def prefill_flops(self, start: int, end: int) -> float:
        """FLOPs to compute tokens ``[start, end)`` when ``[0, start)`` are cached:
        ``L_attn attn(start, end) + L_mlp MLP(c) + L_moe MoE(c) + L_ssm SSM(c)``."""
        return float(self.prefill_flops_int(start, end))

    def flops_saved(self, parent_len: int, end: int, replay_from: int | None = None) -> float:
        """FLOPs a hit on a node covering ``[parent_len, end)`` saves.

        ``replay_from`` (``<= parent_len``, default ``parent_len``) is the position of
        the nearest ancestor still holding an SSM state: without this node a request
        would recompute ``[replay_from, end)``. Equals
        ``prefill_flops(replay_from, end) = prefill_flops(replay_from, parent_len) +
        prefill_flops(parent_len, end)``."""
        r = parent_len if replay_from is None else replay_from
        _check_count("replay_from", r)
        if r > parent_len:
            raise ValueError(
                f"replay_from: must be <= parent_len, got replay_from={r}, parent_len={parent_len}"
            )
        if parent_len > end:
            raise ValueError(f"parent_len: must be <= end, got parent_len={parent_len}, end={end}")
        return self.prefill_flops(r, end)

    def efficiency(
        self,
        parent_len: int,
        end: int,
        has_state: bool = True,
        replay_from: int | None = None,
    ) -> float:
        """``flops_saved(parent_len, end, replay_from) / node_bytes(end - parent_len, has_state)``
        (0.0 when the node holds no bytes). Bytes are the node's own: the KV of its
        ``end - parent_len`` tokens plus its state, i.e. what evicting it frees."""
        nbytes = self.node_bytes(end - parent_len, has_state)
        if nbytes <= 0:
            return 0.0
        return self.flops_saved(parent_len, end, replay_from) / nbytes

    # ---------------------------------------------------------------- serialization
    def to_dict(self) -> dict:
        """All fields as a JSON-able dict (``CostProfile.from_dict`` inverts it)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CostProfile":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown CostProfile field")
        return cls(**dict(data))

    def summary(self) -> dict:
        """A few derived numbers, for logs and reports."""
        return {
            "name": self.name,
            "ssm_kind": self.ssm_kind,
            "n_attn": self.n_attn,
            "n_ssm": self.n_ssm,
            "n_mlp": self.n_mlp,
            "n_moe": self.n_moe,
            "ssm_state_bytes": self.ssm_state_bytes(),
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "state_kv_equivalent_tokens": self.state_kv_equivalent_tokens(),
            "prefill_flops_per_token_at_0": self.prefill_flops(0, 1),
        }


def _check_count(field: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{field}: expected a non-negative int, got {v!r}")


# =========================================================================== configs

_MISSING = object()


class _Cfg:
    """Reads fields of one config dict; every error names the offending field."""

    def __init__(self, data: Mapping[str, Any], family: str):
        self.d = data
        self.family = family

    def has(self, key: str) -> bool:
        return self.d.get(key) is not None

    def err(self, key: str, msg: str) -> ValueError:
        return ValueError(f"{key}: {msg} ({self.family} config)")

    def raw(self, *keys: str, default: Any = _MISSING) -> Any:
        for k in keys:
            if self.d.get(k) is not None:
                return self.d[k]
        if default is _MISSING:
            raise self.err(keys[0], "missing required field")
        return default

    def int(self, *keys: str, default: Any = _MISSING, minimum: int = 1) -> int:
        for k in keys:
            v = self.d.get(k)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                if isinstance(v, float) and v.is_integer():
                    v = int(v)
                else:
                    raise self.err(k, f"expected an integer, got {v!r}")
            if v < minimum:
                raise self.err(k, f"must be >= {minimum}, got {v}")
            return v
        if default is _MISSING:
            raise self.err(keys[0], "missing required field")
        return default

    def bool(self, key: str, default: bool) -> bool:
        v = self.d.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.err(key, f"expected a bool, got {v!r}")
        return v

    def one_int(self, keys: tuple[str, ...], default: Any = _MISSING, minimum: int = 1) -> int:
        """Like :meth:`int`, but aliases present together must agree."""
        vals = {k: self.int(k, minimum=minimum) for k in keys if self.d.get(k) is not None}
        if len(set(vals.values())) > 1:
            k = sorted(vals)[0]
            raise self.err(k, f"conflicting values {vals}")
        if vals:
            return next(iter(vals.values()))
        if default is _MISSING:
            raise self.err(keys[0], "missing required field")
        return default


def _resolve_dtypes(
    c: _Cfg,
    *,
    kv_dtype: Union[str, int, None],
    conv_dtype: Union[str, int, None],
    ssm_dtype: Union[str, int, None],
    read_config_ssm_dtype: bool = True,
) -> dict:
    """Dtype bytes as SGLang resolves them (explicit arguments win):

    * conv state: ``SGLANG_MAMBA_CONV_DTYPE`` (default bfloat16);
    * temporal state: ``SGLANG_MAMBA_SSM_DTYPE``, else the config's ``mamba_ssm_dtype``,
      else float32 (``mamba_utils.mamba2_state_dtype``);
    * KV: ``kv_cache_dtype=auto`` is the model dtype, which SGLang serves as a 16-bit
      type (float32 checkpoints run in bfloat16): 2 bytes.
    """
    out = {}
    if kv_dtype is not None:
        out["kv_dtype_bytes"] = dtype_bytes(kv_dtype, field="kv_dtype")
    else:
        out["kv_dtype_bytes"] = 2
    if conv_dtype is not None:
        out["conv_dtype_bytes"] = dtype_bytes(conv_dtype, field="conv_dtype")
    else:
        env = os.environ.get("SGLANG_MAMBA_CONV_DTYPE")
        out["conv_dtype_bytes"] = _DTYPE_BYTES.get((env or "bfloat16").lower(), 2)
    if ssm_dtype is not None:
        out["ssm_dtype_bytes"] = dtype_bytes(ssm_dtype, field="ssm_dtype")
    else:
        nbytes = 4
        cfg_dtype = c.d.get("mamba_ssm_dtype") if read_config_ssm_dtype else None
        if cfg_dtype is not None and cfg_dtype in ("float32", "bfloat16", "float16"):
            nbytes = _DTYPE_BYTES[cfg_dtype]
        env = os.environ.get("SGLANG_MAMBA_SSM_DTYPE")
        if env in ("float32", "bfloat16", "float16"):
            nbytes = _DTYPE_BYTES[env]
        out["ssm_dtype_bytes"] = nbytes
    return out


def _attention_fields(c: _Cfg, d_model: int, head_dim_keys=("head_dim",)) -> dict:
    heads = c.int("num_attention_heads")
    kv = c.int("num_key_value_heads", default=heads)
    if heads % kv:
        raise c.err("num_key_value_heads", f"must divide num_attention_heads ({heads}), got {kv}")
    hd = c.int(*head_dim_keys, default=None)
    if hd is None:
        if d_model % heads:
            raise c.err("head_dim", f"missing and hidden_size {d_model} is not divisible by {heads} heads")
        hd = d_model // heads
    return {"attn_heads": heads, "kv_heads": kv, "head_dim": hd}


_LAYER_KIND = {
    "mamba": "ssm",
    "linear_attention": "ssm",
    "M": "ssm",
    "attention": "attn",
    "full_attention": "attn",
    "*": "attn",
    "mlp": "mlp",
    "-": "mlp",
    "moe": "moe",
    "E": "moe",
}


def _nemotron_layers(c: _Cfg) -> list[str]:
    for key in ("layers_block_type", "layer_types"):
        if c.has(key):
            lst = c.d[key]
            if not isinstance(lst, list) or not lst:
                raise c.err(key, f"expected a non-empty list of layer types, got {lst!r}")
            kinds = []
            for i, t in enumerate(lst):
                if not isinstance(t, str) or len(t) == 1 or t not in _LAYER_KIND:
                    raise c.err(
                        f"{key}[{i}]",
                        f"unknown layer type {t!r} (expected mamba/attention/mlp/moe or "
                        "linear_attention/full_attention)",
                    )
                kinds.append(_LAYER_KIND[t])
            return kinds
    if c.has("hybrid_override_pattern"):
        pat = c.d["hybrid_override_pattern"]
        if not isinstance(pat, str) or not pat:
            raise c.err("hybrid_override_pattern", f"expected a non-empty string, got {pat!r}")
        kinds = []
        for i, ch in enumerate(pat):
            if ch not in ("M", "*", "-", "E"):
                raise c.err(f"hybrid_override_pattern[{i}]", f"unknown layer character {ch!r} (expected M * - E)")
            kinds.append(_LAYER_KIND[ch])
        return kinds
    raise c.err("hybrid_override_pattern", "missing (need hybrid_override_pattern or layers_block_type)")


def _from_nemotron_h(c: _Cfg, dt: dict) -> dict:
    kinds = _nemotron_layers(c)
    d = c.int("hidden_size")
    n_attn, n_ssm = kinds.count("attn"), kinds.count("ssm")
    n_mlp, n_moe = kinds.count("mlp"), kinds.count("moe")
    out: dict = {"d_model": d, "n_attn": n_attn, "n_ssm": n_ssm, "n_mlp": n_mlp, "n_moe": n_moe}
    out["ssm_kind"] = "mamba2"
    out["mlp_gated"] = False  # NemotronHMLP: up_proj, relu2, down_proj (experts too)
    out["n_layers"] = len(kinds)
    if n_attn:
        out.update(_attention_fields(c, d, head_dim_keys=("head_dim", "attention_head_dim")))
    if n_mlp:
        out["d_ff"] = c.int("intermediate_size")
    if n_moe:
        out["n_experts"] = c.int("n_routed_experts", "num_local_experts")
        out["experts_per_tok"] = c.int("num_experts_per_tok")
        out["moe_d_ff"] = c.int("moe_intermediate_size")
        out["n_shared_experts"] = c.int("n_shared_experts", default=0, minimum=0)
        if out["n_shared_experts"]:
            out["shared_d_ff"] = c.int("moe_shared_expert_intermediate_size")
        out["moe_latent_size"] = c.int("moe_latent_size", default=0, minimum=0)
    if n_ssm:
        heads = c.int("mamba_num_heads")
        hd = c.int("mamba_head_dim")
        out.update(
            ssm_heads=heads,
            ssm_head_dim=hd,
            d_state=c.int("ssm_state_size"),
            n_groups=c.one_int(("n_groups", "mamba_n_groups")),
            conv_kernel=c.one_int(("conv_kernel", "mamba_d_conv"), default=4),
            chunk_size=c.one_int(("mamba_chunk_size", "chunk_size"), default=DEFAULT_MAMBA2_CHUNK),
            ssm_expand=c.one_int(("expand", "mamba_expand"), default=0, minimum=0),
        )
    return out


def _from_falcon_h1(c: _Cfg, dt: dict) -> dict:
    d = c.int("hidden_size")
    n = c.int("num_hidden_layers")
    out: dict = {"d_model": d, "n_attn": n, "n_ssm": n, "n_mlp": n, "ssm_kind": "mamba2", "n_layers": n}
    out.update(_attention_fields(c, d))
    out["d_ff"] = c.int("intermediate_size")
    out["mlp_gated"] = True
    expand = c.int("mamba_expand", default=2)
    d_ssm = c.int("mamba_d_ssm", default=expand * d)
    heads = c.int("mamba_n_heads")
    if d_ssm % heads:
        raise c.err("mamba_n_heads", f"must divide mamba_d_ssm ({d_ssm}), got {heads}")
    d_head = c.d.get("mamba_d_head", "auto")
    if d_head in (None, "auto"):
        d_head = d_ssm // heads
    else:
        d_head = c.int("mamba_d_head")
    if d_head * heads != d_ssm:
        raise c.err("mamba_d_head", f"mamba_d_head * mamba_n_heads must equal mamba_d_ssm ({d_ssm}), got {d_head} * {heads}")
    out.update(
        ssm_heads=heads,
        ssm_head_dim=d_head,
        d_state=c.int("mamba_d_state"),
        n_groups=c.int("mamba_n_groups", default=1),
        conv_kernel=c.int("mamba_d_conv", default=4),
        chunk_size=c.int("mamba_chunk_size", default=DEFAULT_MAMBA2_CHUNK),
        ssm_expand=expand,
    )
    return out


def _qwen_hybrid_layers(c: _Cfg) -> list[str]:
    n = c.int("num_hidden_layers")
    from_interval = None
    if c.has("full_attention_interval"):
        k = c.int("full_attention_interval")
        from_interval = ["attn" if (i + 1) % k == 0 else "ssm" for i in range(n)]
    if c.has("layer_types"):
        lst = c.d["layer_types"]
        if not isinstance(lst, list):
            raise c.err("layer_types", f"expected a list, got {type(lst).__name__}")
        if len(lst) != n:
            raise c.err("layer_types", f"has {len(lst)} entries but num_hidden_layers is {n}")
        kinds = []
        for i, t in enumerate(lst):
            if t == "linear_attention":
                kinds.append("ssm")
            elif t == "full_attention":
                kinds.append("attn")
            else:
                raise c.err(f"layer_types[{i}]", f"unknown layer type {t!r} (expected linear_attention/full_attention)")
        if from_interval is not None and kinds != from_interval:
            # SGLang 0.5.23 derives the layout from full_attention_interval only.
            raise c.err("layer_types", "disagrees with full_attention_interval (SGLang uses the interval)")
        return kinds
    if from_interval is None:
        raise c.err("full_attention_interval", "missing (need full_attention_interval or layer_types)")
    return from_interval


def _from_qwen_gdn(c: _Cfg, dt: dict, *, moe: bool) -> dict:
    kinds = _qwen_hybrid_layers(c)
    d = c.int("hidden_size")
    n = len(kinds)
    out: dict = {
        "d_model": d,
        "n_attn": kinds.count("attn"),
        "n_ssm": kinds.count("ssm"),
        "ssm_kind": "gdn",
        "n_layers": n,
        "mlp_gated": True,
    }
    if out["n_attn"]:
        out.update(_attention_fields(c, d))
        out["attn_output_gate"] = c.bool("attn_output_gate", True)
    if moe:
        # SGLang runs a sparse MoE block in every Qwen3-Next / Qwen3.5-MoE layer.
        out["n_moe"] = n
        out["n_experts"] = c.int("num_experts", default=512)
        out["experts_per_tok"] = c.int("num_experts_per_tok", default=10)
        out["moe_d_ff"] = c.int("moe_intermediate_size", default=512)
        shared = c.int("shared_expert_intermediate_size", default=0, minimum=0)
        if shared:
            out.update(n_shared_experts=1, shared_d_ff=shared, shared_expert_gate=True)
    else:
        out["n_mlp"] = n
        out["d_ff"] = c.int("intermediate_size")
    if out["n_ssm"]:
        hk = c.int("linear_num_key_heads")
        hv = c.int("linear_num_value_heads")
        if hv % hk:
            raise c.err("linear_num_key_heads", f"must divide linear_num_value_heads ({hv}), got {hk}")
        out.update(
            ssm_heads=hv,
            ssm_head_dim=c.int("linear_value_head_dim"),
            d_state=c.int("linear_key_head_dim"),
            n_groups=hk,
            conv_kernel=c.int("linear_conv_kernel_dim", default=4),
            chunk_size=DEFAULT_GDN_CHUNK,
        )
    return out


def _from_mamba2(c: _Cfg, dt: dict) -> dict:
    """HF ``Mamba2Config`` (pure Mamba2: no attention, no MLP)."""
    d = c.int("hidden_size")
    n = c.int("num_hidden_layers")
    heads = c.int("num_heads")
    hd = c.int("head_dim")
    expand = c.int("expand", default=2)
    if c.has("intermediate_size") and c.int("intermediate_size") != heads * hd:
        raise c.err("intermediate_size", f"must equal num_heads * head_dim ({heads * hd})")
    return {
        "d_model": d,
        "n_attn": 0,
        "n_ssm": n,
        "ssm_kind": "mamba2",
        "n_layers": n,
        "ssm_heads": heads,
        "ssm_head_dim": hd,
        "d_state": c.int("state_size"),
        "n_groups": c.int("n_groups", default=8),
        "conv_kernel": c.int("conv_kernel", default=4),
        "chunk_size": c.int("chunk_size", default=DEFAULT_MAMBA2_CHUNK),
        "ssm_expand": expand,
    }


def _from_mamba_ssm(c: _Cfg, dt: dict) -> dict:
    """state-spaces ``mamba_ssm`` MambaConfig (``d_model``, ``n_layer``, ``ssm_cfg``,
    optional ``attn_layer_idx`` / ``attn_cfg`` and ``d_intermediate`` MLPs)."""
    d = c.int("d_model")
    n = c.int("n_layer")
    ssm_cfg = c.raw("ssm_cfg", default={}) or {}
    if not isinstance(ssm_cfg, dict):
        raise c.err("ssm_cfg", f"expected a dict, got {type(ssm_cfg).__name__}")
    if ssm_cfg.get("layer", "Mamba1") != "Mamba2":
        raise c.err("ssm_cfg.layer", f"only Mamba2 is supported, got {ssm_cfg.get('layer', 'Mamba1')!r}")
    s = _Cfg(ssm_cfg, "ssm_cfg")
    expand = s.int("expand", default=2)
    p = s.int("headdim", default=64)
    inner = expand * d
    if inner % p:
        raise c.err("ssm_cfg.headdim", f"must divide expand * d_model ({inner}), got {p}")
    attn_idx = c.raw("attn_layer_idx", default=[]) or []
    if not isinstance(attn_idx, list) or any(not isinstance(i, int) or not 0 <= i < n for i in attn_idx):
        raise c.err("attn_layer_idx", f"expected a list of layer indices in [0, {n}), got {attn_idx!r}")
    n_attn = len(set(attn_idx))
    d_ff = c.int("d_intermediate", default=0, minimum=0)
    out = {
        "d_model": d,
        "n_attn": n_attn,
        "n_ssm": n - n_attn,
        "n_mlp": n if d_ff else 0,
        "d_ff": d_ff,
        "mlp_gated": True,
        "ssm_kind": "mamba2",
        "n_layers": n,
        "ssm_heads": inner // p,
        "ssm_head_dim": p,
        "d_state": s.int("d_state", default=128),
        "n_groups": s.int("ngroups", default=1),
        "conv_kernel": s.int("d_conv", default=4),
        "chunk_size": s.int("chunk_size", default=DEFAULT_MAMBA2_CHUNK),
        "ssm_expand": expand,
    }
    if n_attn:
        a = _Cfg(c.raw("attn_cfg", default={}) or {}, "attn_cfg")
        heads = a.int("num_heads")
        hd = a.int("head_dim", default=d // heads)
        out.update(attn_heads=heads, kv_heads=a.int("num_heads_kv", default=heads), head_dim=hd)
    return out


def _from_paper(c: _Cfg, dt: dict) -> dict:
    """``model_type: marconi_paper``: the paper's simplified model (fp16 everywhere)."""
    d = c.int("hidden_size", "d_model")
    n_ssm = c.int("n_ssm_layers", minimum=0)
    n_attn = c.int("n_attn_layers", minimum=0)
    n_mlp = c.int("n_mlp_layers", default=n_ssm + n_attn, minimum=0)
    out = {
        "d_model": d,
        "n_attn": n_attn,
        "n_ssm": n_ssm,
        "n_mlp": n_mlp,
        "d_ff": 4 * d,  # 16 l D^2 = 2 matrices * 2 l D (4 D): informational
        "mlp_gated": False,
        "ssm_kind": "paper",
        "n_layers": max(n_mlp, n_ssm + n_attn),
        "d_state": c.int("d_state", "ssm_state_size"),
        "ssm_expand": c.int("expand", default=1),
        "conv_kernel": 4,
    }
    if n_attn:
        # KV per layer = 2 l D * 2 bytes: kv_heads * head_dim = D.
        hd = 128 if d % 128 == 0 else d
        out.update(attn_heads=d // hd, kv_heads=d // hd, head_dim=hd)
    return out


_DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo2", "phi3", "gemma")
_MOE_ATTN_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")


def _from_dense(c: _Cfg, dt: dict, model_type: str) -> dict:
    d = c.int("hidden_size")
    n = c.int("num_hidden_layers")
    out: dict = {"d_model": d, "n_attn": n, "n_ssm": 0, "ssm_kind": "mamba2", "n_layers": n, "mlp_gated": True}
    out.update(_attention_fields(c, d))
    if model_type in _MOE_ATTN_TYPES:
        if model_type == "mixtral":
            n_moe = n
            out.update(
                n_experts=c.int("num_local_experts"),
                experts_per_tok=c.int("num_experts_per_tok"),
                moe_d_ff=c.int("intermediate_size"),
            )
        else:
            step = c.int("decoder_sparse_step", default=1)
            only = c.raw("mlp_only_layers", default=[]) or []
            if not isinstance(only, list):
                raise c.err("mlp_only_layers", f"expected a list, got {only!r}")
            experts = c.int("num_experts")
            moe_ids = [i for i in range(n) if i not in only and (i + 1) % step == 0]
            n_moe = len(moe_ids)
            out.update(
                n_experts=experts,
                experts_per_tok=c.int("num_experts_per_tok"),
                moe_d_ff=c.int("moe_intermediate_size"),
            )
            shared = c.int("shared_expert_intermediate_size", default=0, minimum=0)
            if shared:
                out.update(n_shared_experts=1, shared_d_ff=shared, shared_expert_gate=True)
            if n - n_moe:
                out.update(n_mlp=n - n_moe, d_ff=c.int("intermediate_size"))
        out["n_moe"] = n_moe
    else:
        out.update(n_mlp=n, d_ff=c.int("intermediate_size"))
    return out


_ARCH_TO_TYPE = {
    "NemotronHForCausalLM": "nemotron_h",
    "FalconH1ForCausalLM": "falcon_h1",
    "Qwen3NextForCausalLM": "qwen3_next",
    "Qwen3_5ForConditionalGeneration": "qwen3_5",
    "Qwen3_5ForCausalLM": "qwen3_5_text",
    "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe",
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe_text",
    "Mamba2ForCausalLM": "mamba2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = (
    "nemotron_h",
    "falcon_h1",
    "qwen3_next",
    "qwen3_5",
    "qwen3_5_text",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
    "mamba2",
    "marconi_paper",
) + _DENSE_TYPES + _MOE_ATTN_TYPES


def load_config_dict(config: Union[Mapping[str, Any], str, os.PathLike]) -> dict:
    """A config.json as a dict, from a dict, a path to a config.json, or a model dir."""
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        p = Path(config)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise ValueError(f"config: no config.json at {str(p)!r}")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"config: cannot read {str(p)!r} as JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config: {str(p)!r} does not hold a JSON object")
        return data
    raise ValueError(f"config: expected a dict or a path, got {type(config).__name__}")


def _model_type(cfg: Mapping[str, Any]) -> str:
    mt = cfg.get("model_type")
    if mt is not None and not isinstance(mt, str):
        raise ValueError(f"model_type: expected a string, got {mt!r}")
    if mt:
        return mt
    archs = cfg.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ValueError(f"architectures: expected a list of strings, got {archs!r}")
        for a in archs:
            if a in _ARCH_TO_TYPE:
                return _ARCH_TO_TYPE[a]
        raise ValueError(
            f"architectures: unsupported {archs!r} (supported: {', '.join(sorted(_ARCH_TO_TYPE))})"
        )
    if "d_model" in cfg and "n_layer" in cfg:
        return "mamba_ssm"
    raise ValueError("model_type: missing (and no architectures to infer it from)")


def from_hf_config(
    config: Union[Mapping[str, Any], str, os.PathLike],
    *,
    name: str | None = None,
    kv_dtype: Union[str, int, None] = None,
    conv_dtype: Union[str, int, None] = None,
    ssm_dtype: Union[str, int, None] = None,
) -> CostProfile:
    """Build a :class:`CostProfile` from a HuggingFace ``config.json``.

    ``config`` is a dict, a path to a config.json, or a model directory. Supported
    (by ``model_type``, else ``architectures``): ``nemotron_h`` (hybrid_override_pattern
    or layers_block_type / layer_types, with mamba/attention/mlp/moe or the transformers
    5.x linear_attention/full_attention names), ``falcon_h1`` (attention + Mamba2 + MLP
    in every layer), ``qwen3_next``, ``qwen3_5`` / ``qwen3_5_moe`` (and their ``_text``
    configs; a top-level ``text_config`` is used), ``mamba2`` (HF) and state-spaces
    ``mamba_ssm`` configs, dense Llama-like models (``llama``, ``mistral``, ``qwen2``,
    ``qwen3``, ``granite``, ``olmo2``, ``phi3``, ``gemma``), attention MoE models
    (``mixtral``, ``qwen2_moe``, ``qwen3_moe``), and ``marconi_paper`` (the paper's
    simplified model: ``hidden_size``, ``d_state``, ``n_ssm_layers``, ``n_attn_layers``,
    ``n_mlp_layers``). Keys starting with ``_`` are ignored.

    ``kv_dtype`` / ``conv_dtype`` / ``ssm_dtype`` override the dtypes, which otherwise
    follow SGLang: KV 2 bytes (kv_cache_dtype=auto), conv ``SGLANG_MAMBA_CONV_DTYPE``
    or bfloat16, temporal ``SGLANG_MAMBA_SSM_DTYPE``, else the config's
    ``mamba_ssm_dtype``, else float32.

    Models without SSM layers get ``n_ssm = 0`` (their ``ssm_kind`` is "mamba2" and
    unused). The profile's name defaults to the config's ``_name_or_path``, else its
    ``model_type``.

    Raises ``ValueError`` (one line, naming the offending field) for anything it
    cannot cost.
    """
    cfg = load_config_dict(config)
    top_name = cfg.get("_name_or_path")
    cfg = {k: v for k, v in cfg.items() if not (isinstance(k, str) and k.startswith("_"))}
    mt = _model_type(cfg)
    if isinstance(cfg.get("text_config"), Mapping) and mt in ("qwen3_5", "qwen3_5_moe"):
        text = dict(cfg["text_config"])
        inner_mt = text.get("model_type") or mt + "_text"
        if inner_mt not in (mt + "_text",):
            raise ValueError(f"text_config.model_type: expected {mt + '_text'!r}, got {inner_mt!r}")
        cfg, mt = text, inner_mt
    elif mt in ("qwen3_5", "qwen3_5_moe") and "text_config" in cfg:
        raise ValueError(f"text_config: expected a dict, got {type(cfg['text_config']).__name__}")
    c = _Cfg(cfg, mt)
    dt = _resolve_dtypes(
        c,
        kv_dtype=kv_dtype,
        conv_dtype=conv_dtype,
        ssm_dtype=ssm_dtype,
        # SGLang's Mamba2Config passes no config to mamba2_state_dtype.
        read_config_ssm_dtype=mt not in ("mamba2", "mamba_ssm"),
    )
    if mt == "nemotron_h":
        body = _from_nemotron_h(c, dt)
    elif mt == "falcon_h1":
        body = _from_falcon_h1(c, dt)
    elif mt == "qwen3_next":
        body = _from_qwen_gdn(c, dt, moe=True)
    elif mt in ("qwen3_5", "qwen3_5_text"):
        body = _from_qwen_gdn(c, dt, moe=False)
    elif mt in ("qwen3_5_moe", "qwen3_5_moe_text"):
        body = _from_qwen_gdn(c, dt, moe=True)
    elif mt == "mamba2":
        body = _from_mamba2(c, dt)
    elif mt == "mamba_ssm":
        body = _from_mamba_ssm(c, dt)
    elif mt == "marconi_paper":
        body = _from_paper(c, dt)
        dt = {"kv_dtype_bytes": 2, "conv_dtype_bytes": 2, "ssm_dtype_bytes": 2}
    elif mt in _DENSE_TYPES or mt in _MOE_ATTN_TYPES:
        body = _from_dense(c, dt, mt)
    else:
        raise ValueError(
            f"model_type: unsupported {mt!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if name is None:
        name = top_name if isinstance(top_name, str) and top_name else mt
    try:
        return CostProfile(name=name, **body, **dt)
    except ValueError as e:  # a derived field failed validation: still one line
        raise ValueError(f"{e} ({mt} config)") from None


def builtin_profile(name: str) -> CostProfile:
    """A built-in profile by name (see :data:`BUILTIN_PROFILES`), loaded from
    ``profiles/<name>.json``. Unknown names raise ``ValueError`` listing the known ones.
    Dtypes follow :func:`from_hf_config` (so ``SGLANG_MAMBA_*_DTYPE`` apply)."""
    if name not in BUILTIN_PROFILES:
        raise ValueError(f"name: unknown built-in cost profile {name!r} (known: {', '.join(BUILTIN_PROFILES)})")
    return _builtin_profile(
        name, os.environ.get("SGLANG_MAMBA_CONV_DTYPE"), os.environ.get("SGLANG_MAMBA_SSM_DTYPE")
    )


@lru_cache(maxsize=None)
def _builtin_profile(name: str, _conv_env: str | None, _ssm_env: str | None) -> CostProfile:
    return from_hf_config(PROFILES_DIR / f"{name}.json", name=name)
