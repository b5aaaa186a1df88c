"""Bind the CPU ops into SGLang 0.5.23's Mamba2 mixer (no SGLang file is edited).

``srt/layers/attention/mamba/mamba.py`` (``MambaMixer2``) calls, by module-level
name:

* ``mamba_chunk_scan_combined`` and ``selective_state_update`` - imported from
  the Triton ops on every platform; Triton has no CPU driver, so they are
  replaced through SGLang's ``HookRegistry`` (``HookType.REPLACE``), which also
  re-points every other module holding the same function;
* ``causal_conv1d_fn`` / ``causal_conv1d_update`` and their ``*_triton`` twins
  (NemotronH asks for the Triton ones) - bound only under CUDA, NPU and XPU, so
  on CPU the names do not exist and the first prefill dies with ``NameError``.
  ``HookRegistry`` can only wrap an existing attribute (``_apply_target`` does
  ``getattr`` first), so these four are set on the module directly, and only
  when missing.
"""

from __future__ import annotations

import importlib
import logging
from typing import Dict, List

logger = logging.getLogger(__name__)

MAMBA_MODULE = "sglang.srt.layers.attention.mamba.mamba"

# module attribute -> cpu_ops function name
REPLACED = {
    "mamba_chunk_scan_combined": "mamba_chunk_scan_combined",
    "selective_state_update": "selective_state_update",
}
BOUND_IF_MISSING = {
    "causal_conv1d_fn": "causal_conv1d_fn",
    "causal_conv1d_update": "causal_conv1d_update",
    "causal_conv1d_fn_triton": "causal_conv1d_fn",
    "causal_conv1d_update_triton": "causal_conv1d_update",
}

_installed: List[str] = []


def install() -> List[str]:
    """Register the hooks and bind the missing names; returns what was done (idempotent)."""
    if _installed:
        return list(_installed)
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sglang_marconi.kernels import cpu_ops

    done: List[str] = []
    for attr, fn_name in REPLACED.items():
        HookRegistry.register(f"{MAMBA_MODULE}.{attr}", getattr(cpu_ops, fn_name), HookType.REPLACE)
        done.append(f"replace {attr}")

    mod = importlib.import_module(MAMBA_MODULE)
    bound: Dict[str, str] = {}
    for attr, fn_name in BOUND_IF_MISSING.items():
        if attr not in vars(mod):
            setattr(mod, attr, getattr(cpu_ops, fn_name))
            bound[attr] = fn_name
            done.append(f"bind {attr}")
    logger.info("sglang-marconi CPU ops: %s", ", ".join(done))
    _installed.extend(done)
    return done
