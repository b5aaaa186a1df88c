"""SGLang general plugin (entry-point group ``sglang.srt.plugins``).

SGLang calls :func:`register` early in every process it starts (before it
parses ``launch_server``'s flags). It registers the ``marconi`` radix-cache
backend, so ``--radix-cache-backend marconi`` works without editing SGLang's
source. It also validates Marconi's knobs when SGLang checks the server
arguments, before any process is spawned or a model is loaded: a bad
``--radix-eviction-policy-config`` stops start-up at once with one line naming
the key.
"""

from __future__ import annotations

BACKEND_NAME = "marconi"
_HOOKED = False


def validate_server_args(server_args) -> None:
    """Raise SystemExit with one line if the Marconi knobs are invalid."""
    if getattr(server_args, "radix_cache_backend", None) != BACKEND_NAME:
        return
    from .policy.config import MarconiConfigError, parse_config
    from .sglang_backend.factory import check_live_config, resolve_profile

    try:
        config = parse_config(getattr(server_args, "radix_eviction_policy_config", None))
        if config.profile:
            resolve_profile(config.profile)
        check_live_config(config)
        policy = getattr(server_args, "radix_eviction_policy", "lru")
        if policy != "lru":
            raise MarconiConfigError(
                f"--radix-eviction-policy {policy} conflicts with --radix-cache-backend marconi "
                "(Marconi's utility decides eviction); pass its knobs in --radix-eviction-policy-config"
            )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _before_check(self, *args, **kwargs):
    validate_server_args(self)
    return None


def register() -> None:
    global _HOOKED
    from sglang.srt.mem_cache.registry import (
        get_radix_cache_factory,
        register_radix_cache_backend,
    )

    from .sglang_backend.factory import marconi_factory

    if get_radix_cache_factory(BACKEND_NAME) is None:
        register_radix_cache_backend(BACKEND_NAME, marconi_factory)
    if not _HOOKED:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        HookRegistry.register("sglang.srt.server_args.ServerArgs.check_server_args", _before_check, HookType.BEFORE)
        _HOOKED = True
