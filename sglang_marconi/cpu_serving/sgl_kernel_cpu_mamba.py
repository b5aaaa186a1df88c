"""``sgl_kernel.mamba`` names SGLang 0.5.23 imports at module import time on CPU.

* ``srt/layers/attention/linear/kda_backend.py`` and ``gdn_backend.py`` (imported
  by the attention-backend factory for every hybrid model, NemotronH included)
  take ``causal_conv1d_update_cpu`` / ``causal_conv1d_fn_cpu`` from here and call
  them with the signature of SGLang's Python ``causal_conv1d_update`` /
  ``causal_conv1d_fn``: the plain-torch ops of
  :mod:`sglang_marconi.kernels.cpu_ops` have it, so these are real.
* ``srt/layers/attention/linear/kernels/gdn_triton.py`` imports
  ``chunk_gated_delta_rule_cpu`` (Gated DeltaNet prefill, Qwen3-Next / Qwen3.5):
  not implemented here; it raises ``NotImplementedError`` if called.
"""

from __future__ import annotations

from sglang_marconi.kernels.cpu_ops import causal_conv1d_fn as causal_conv1d_fn_cpu
from sglang_marconi.kernels.cpu_ops import causal_conv1d_update as causal_conv1d_update_cpu


def chunk_gated_delta_rule_cpu(*args, **kwargs):
    raise NotImplementedError(
        "sgl_kernel.mamba.chunk_gated_delta_rule_cpu: Gated DeltaNet (Qwen3-Next / "
        "Qwen3.5) is not supported on CPU by sglang-marconi; Mamba2 hybrids are"
    )


__all__ = ["causal_conv1d_fn_cpu", "causal_conv1d_update_cpu", "chunk_gated_delta_rule_cpu"]


def __getattr__(name: str):
    raise AttributeError(
        f"sgl_kernel.mamba (sglang-marconi CPU stand-in) has no {name!r}: only "
        f"{', '.join(__all__)} are provided on CPU"
    )
