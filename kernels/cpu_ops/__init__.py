"""CPU implementations (plain torch) of the kernels SGLang 0.5.23's Mamba2 path needs.

SGLang binds these only for CUDA/NPU/XPU (Triton / CUDA kernels) or takes them
from the unpublished CPU build of ``sgl_kernel``. Each op has SGLang's call
signature so it can be bound in place of the original, and a float64
``*_ref`` twin (plain loops) that the tests use as the oracle:

| op | SGLang name it stands in for |
|---|---|
| :func:`causal_conv1d_fn` | ``causal_conv1d_fn`` / ``causal_conv1d_fn_triton`` (prefill, varlen) |
| :func:`causal_conv1d_update` | ``causal_conv1d_update`` / ``causal_conv1d_update_triton`` (decode) |
| :func:`mamba_chunk_scan_combined` | ``triton_ops.mamba_chunk_scan_combined`` (prefill) |
| :func:`selective_state_update` | ``triton_ops.selective_state_update`` (decode) |
| :func:`rms_norm_gated` | ``fla.layernorm_gated.rms_norm_gated`` (Mixer2RMSNormGated) |
| :func:`copy_all_layer_kv_cache_cpu` | ``sgl_kernel.copy_all_layer_kv_cache_cpu`` |
| :func:`assign_req_to_token_pool_cpu` | ``sgl_kernel.assign_req_to_token_pool_cpu`` |

For Marconi's exact branch checkpoints: :func:`mamba_chunk_scan_with_snapshots`
(SSM state of each sequence after any token offset, in the same pass as the
final state) and :func:`causal_conv1d_states_at` (the conv state there).

Importing this package imports torch only (no Triton, no SGLang).
"""

from .causal_conv1d import (
    PAD_SLOT_ID,
    causal_conv1d_fn,
    causal_conv1d_fn_ref,
    causal_conv1d_states_at,
    causal_conv1d_states_at_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
)
from .kv_cache import (
    assign_req_to_token_pool_cpu,
    assign_req_to_token_pool_cpu_ref,
    copy_all_layer_kv_cache_cpu,
    copy_all_layer_kv_cache_cpu_ref,
)
from .norm import rms_norm_gated, rms_norm_gated_ref
from .ssd import (
    ScanResult,
    mamba_chunk_scan_combined,
    mamba_chunk_scan_with_snapshots,
    selective_state_update,
    selective_state_update_ref,
    ssd_scan,
    ssd_scan_ref,
)

__all__ = [
    "PAD_SLOT_ID",
    "causal_conv1d_fn",
    "causal_conv1d_fn_ref",
    "causal_conv1d_update",
    "causal_conv1d_update_ref",
    "causal_conv1d_states_at",
    "causal_conv1d_states_at_ref",
    "mamba_chunk_scan_combined",
    "mamba_chunk_scan_with_snapshots",
    "ssd_scan",
    "ssd_scan_ref",
    "ScanResult",
    "selective_state_update",
    "selective_state_update_ref",
    "rms_norm_gated",
    "rms_norm_gated_ref",
    "copy_all_layer_kv_cache_cpu",
    "copy_all_layer_kv_cache_cpu_ref",
    "assign_req_to_token_pool_cpu",
    "assign_req_to_token_pool_cpu_ref",
]
