"""The ``sgl_kernel`` names SGLang 0.5.23 imports unconditionally on a CPU engine.

With ``SGLANG_USE_CPU_ENGINE=1``, SGLang imports a few CPU ops from
``sgl_kernel`` at module import time (before any plugin can run):

* ``sglang/kernels/ops/kvcache/cache_move.py``: ``copy_all_layer_kv_cache_cpu``;
* ``sglang/srt/mem_cache/allocation.py``: ``assign_req_to_token_pool_cpu``;
* ``sglang/kernels/ops/speculative/*``: seven speculative-decoding ops, imported
  but only called with ``--speculative-algorithm`` (see ``SPECULATIVE_ONLY``:
  they raise ``NotImplementedError`` if called);
* ``torch.ops.sgl_kernel.fused_gdn_gating_cpu`` / ``..._delta_rule_update_cpu``
  (Gated DeltaNet, read at import time; see ``TORCH_OPS_IMPORT_ONLY``).

No CPU build of ``sgl_kernel`` is published, so :mod:`.shim` generates a small
``sgl_kernel`` package that re-exports this module (and ``sgl_kernel.mamba``,
:mod:`.sgl_kernel_cpu_mamba`), and the CPU launcher puts it on ``PYTHONPATH``
(only there, only on CPU). Every other name raises ``AttributeError`` (so
``from sgl_kernel import x`` raises ``ImportError``, what SGLang's optional
imports expect). No torch library is registered and ``convert_weight_packed``
is never provided, so SGLang's AMX probe (``_is_intel_amx_backend_available``)
stays false and its CPU layers take their plain-torch paths.
"""

from __future__ import annotations

from sglang_marconi.kernels.cpu_ops import (
    assign_req_to_token_pool_cpu,
    copy_all_layer_kv_cache_cpu,
)

# Speculative decoding (EAGLE / MTP) ops that SGLang's ``kernels/ops/speculative/*``
# modules import at module import time on CPU. They are only *called* with
# ``--speculative-algorithm``, which this CPU path does not support: each raises
# NotImplementedError naming itself if it is ever reached.
SPECULATIVE_ONLY = (
    "build_tree_kernel_efficient_cpu",  # kernels/ops/speculative/spec_tree.py
    "verify_tree_greedy_cpu",  # kernels/ops/speculative/spec_tree.py
    "rotate_input_ids_cpu",  # kernels/ops/speculative/multi_layer_eagle.py
    "fill_accept_out_cache_loc_cpu",  # kernels/ops/speculative/eagle.py
    "fill_bonus_tokens_cpu",  # kernels/ops/speculative/eagle.py
    "assign_draft_cache_locs_contiguous_cpu",  # kernels/ops/speculative/cache_locs.py
    "assign_extend_cache_locs_cpu",  # kernels/ops/speculative/cache_locs.py
)


def _unsupported(name: str, why: str):
    def op(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name}: {why} by sglang-marconi (no CPU implementation of this op)"
        )

    op.__name__ = op.__qualname__ = name
    return op


for _name in SPECULATIVE_ONLY:
    globals()[_name] = _unsupported(_name, "speculative decoding is not supported on CPU")
del _name

__all__ = ["assign_req_to_token_pool_cpu", "copy_all_layer_kv_cache_cpu", *SPECULATIVE_ONLY]

# Gated DeltaNet (Qwen3-Next / Qwen3.5) ops that ``srt/layers/attention/linear/
# gdn_backend.py`` and ``kernels/gdn_triton.py`` read from ``torch.ops.sgl_kernel``
# at import time; the attention-backend factory imports those modules for every
# hybrid model, NemotronH included. Not implemented: set on the op namespace as
# callables raising NotImplementedError (no torch.library schema is registered,
# and nothing answers SGLang's AMX probe ``convert_weight_packed``).
TORCH_OPS_IMPORT_ONLY = (
    "fused_gdn_gating_cpu",
    "fused_sigmoid_gating_delta_rule_update_cpu",
)


def _install_torch_ops() -> None:
    import torch

    ns = torch.ops.sgl_kernel
    for name in TORCH_OPS_IMPORT_ONLY:
        if name not in vars(ns):
            try:
                getattr(ns, name)  # a real registration wins
            except (AttributeError, RuntimeError):
                setattr(ns, name, _unsupported(name, "Gated DeltaNet is not supported on CPU"))


_install_torch_ops()

IS_SGLANG_MARCONI_STAND_IN = True


def __getattr__(name: str):
    raise AttributeError(
        f"sgl_kernel (sglang-marconi CPU stand-in) has no {name!r}: only "
        f"{', '.join(__all__)} are provided on CPU"
    )
