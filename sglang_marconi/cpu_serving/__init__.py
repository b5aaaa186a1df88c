"""Serve Mamba2 hybrids (NemotronH) with SGLang 0.5.23 on a CPU, through its plugin hooks.

* :func:`register` - the ``sglang.srt.plugins`` entry point. With
  ``SGLANG_USE_CPU_ENGINE=1`` it binds :mod:`sglang_marconi.kernels.cpu_ops`
  into the Mamba2 mixer (:mod:`.hooks`); otherwise it does nothing.
* :mod:`.shim` / :mod:`.sgl_kernel_cpu` - the ``sgl_kernel`` CPU ops SGLang
  imports before any plugin can run, put on ``PYTHONPATH`` by :func:`server_env`.
* :mod:`.tiny_model` - a tiny random NemotronH (+ BPE tokenizer) to serve.
* :mod:`.launch` - build it, start ``sglang.launch_server --device cpu``, query it.
"""

from __future__ import annotations

import os

from .shim import server_env, shim_dir

__all__ = ["register", "server_env", "shim_dir", "is_cpu_engine"]


def is_cpu_engine() -> bool:
    """SGLang's own CPU switch (``sglang.srt.utils.is_cpu`` reads the same variable)."""
    return os.environ.get("SGLANG_USE_CPU_ENGINE", "0") == "1"


def register() -> None:
    """Entry point for ``sglang.srt.plugins``: a no-op unless SGLang runs on CPU."""
    if not is_cpu_engine():
        return
    from .hooks import install

    install()
