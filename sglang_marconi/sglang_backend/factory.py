"""``--radix-cache-backend marconi``: build a MarconiRadixCache inside SGLang's scheduler.

SGLang calls :func:`marconi_factory` with its ``TreeCacheBuildContext``. The
Marconi knobs come from ``--radix-eviction-policy-config`` (a JSON object; see
``policy/config.py``); the cost profile defaults to the served model's HF
config. Anything invalid raises one line naming it, which stops start-up.
"""

from __future__ import annotations

import logging
import os

from ..policy.config import MarconiConfigError, parse_server_config
from ..policy.cost_model import BUILTIN_PROFILES, CostProfile, builtin_profile, from_hf_config

logger = logging.getLogger("sglang_marconi")


def resolve_profile(name_or_path, hf_config=None) -> CostProfile:
    """A built-in profile name, a config.json path (or model dir), or the model's HF config."""
    if name_or_path:
        if name_or_path in BUILTIN_PROFILES:
            return builtin_profile(name_or_path)
        if os.path.exists(name_or_path):
            return from_hf_config(name_or_path)
        raise MarconiConfigError(
            f"marconi config: profile={name_or_path!r} is neither a built-in profile "
            f"({', '.join(BUILTIN_PROFILES)}) nor an existing config.json path"
        )
    if hf_config is not None:
        data = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        return from_hf_config(data)
    return builtin_profile("paper-7b")


def marconi_factory(ctx):
    """SGLang radix-cache factory for ``--radix-cache-backend marconi``."""
    from sglang.srt.mem_cache.registry import default_radix_cache_factory

    from .cache import MarconiRadixCache
    from .tuning import TunerSpec

    if ctx.disable_radix_cache:
        return default_radix_cache_factory(ctx)
    if not ctx.is_hybrid_ssm:
        raise ValueError(
            "--radix-cache-backend marconi caches SSM states of hybrid (attention + Mamba/GDN) "
            "models; this model has no SSM layers. Omit --radix-cache-backend."
        )
    if ctx.enable_hierarchical_cache:
        raise ValueError("--radix-cache-backend marconi does not support --enable-hierarchical-cache yet")
    policy = getattr(ctx.server_args, "radix_eviction_policy", "lru")
    if policy != "lru":
        raise ValueError(
            f"--radix-eviction-policy {policy} conflicts with --radix-cache-backend marconi "
            "(Marconi's utility decides eviction); pass its knobs in --radix-eviction-policy-config"
        )
    params = ctx.params
    config = parse_server_config(params.eviction_policy_config)
    profile = resolve_profile(config.profile, getattr(ctx.model_config, "hf_config", None))
    if params.page_size != 1 and config.branch_points == "exact":
        raise MarconiConfigError(
            f"marconi config: branch_points='exact' needs --page-size 1 (got {params.page_size}); "
            "use branch_points='grid'"
        )
    from sglang.srt.mem_cache.unified_cache.components.base import ComponentType

    params.tree_components = (ComponentType.FULL, ComponentType.MAMBA)
    kv_slots = params.token_to_kv_pool_allocator.size
    mamba_slots = params.req_to_token_pool.mamba_allocator.size
    spec = TunerSpec(
        kv_slots=kv_slots,
        mamba_slots=mamba_slots,
        config=config,
        profile=profile,
        byte_budget=int(config.single_budget_gb * 1e9) if config.single_budget_gb else None,
    )
    cache = MarconiRadixCache(params, config=config, profile=profile, tuner_spec=spec)
    from .metrics import attach

    attach(cache, ctx.server_args)  # periodic INFO line + marconi_* gauges (--enable-metrics)
    logger.info(
        "marconi: cache ready (profile=%s, alpha=%s, branch_points=%s, variant=%s, "
        "state=%.1f MB, kv=%d B/token, %d KV slots, %d state slots)",
        profile.name,
        "auto" if config.auto_alpha else config.alpha,
        config.branch_points,
        config.variant,
        profile.ssm_state_bytes() / 1e6,
        profile.kv_bytes(1),
        kv_slots,
        mamba_slots,
    )
    return cache
