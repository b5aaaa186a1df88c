"""SGLang general plugin (entry-point group ``sglang.srt.plugins``).

SGLang calls :func:`register` early in every process it starts; it registers
the ``marconi`` radix-cache backend so ``--radix-cache-backend marconi`` works
without editing SGLang's source.
"""

from __future__ import annotations

BACKEND_NAME = "marconi"


def register() -> None:
    from sglang.srt.mem_cache.registry import (
        get_radix_cache_factory,
        register_radix_cache_backend,
    )

    from .sglang_backend.factory import marconi_factory

    if get_radix_cache_factory(BACKEND_NAME) is None:
        register_radix_cache_backend(BACKEND_NAME, marconi_factory)
