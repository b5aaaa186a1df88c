"""The α tuner's replay, and the one constructor every driver uses for a Marconi cache.

``replay_alphas`` is what :class:`~sglang_marconi.policy.tuner.AlphaTuner`
runs off the scheduler's thread (in a worker process by default): for each α
it builds a fresh :class:`MarconiRadixCache` with the live cache's slot counts
and budgets (tiny tensors), replays the warm-up requests uncounted, then the
window, and reports the prefill FLOPs the hits saved. Same components, same
driver, same policy code as the live cache — only α differs.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from ..policy.config import MarconiConfig
from .pools import BuiltCache, PoolShape, build_hybrid_cache


@dataclasses.dataclass(frozen=True)
class TunerSpec:
    """Everything a replay needs to rebuild the cache (picklable)."""

    kv_slots: int
    mamba_slots: int
    config: MarconiConfig
    profile: object  # CostProfile
    kv_budget: Optional[int] = None
    state_budget: Optional[int] = None
    byte_budget: Optional[int] = None


def build_marconi_cache(
    *,
    kv_slots: int,
    mamba_slots: int,
    config: MarconiConfig,
    profile,
    kv_budget: Optional[int] = None,
    state_budget: Optional[int] = None,
    byte_budget: Optional[int] = None,
    device: str = "cpu",
    shape: PoolShape = PoolShape(),
    deferred_frees: bool = True,
    enable_kv_cache_events: bool = False,
) -> BuiltCache:
    """A MarconiRadixCache on real SGLang pools, with its tuner wired to replay
    on a copy of the same shape (``deferred_frees``: see ``build_hybrid_cache``)."""
    from .cache import MarconiRadixCache

    spec = TunerSpec(kv_slots, mamba_slots, config, profile, kv_budget, state_budget, byte_budget)

    def cache_class(params):
        return MarconiRadixCache(params, config=config, profile=profile, tuner_spec=spec)

    return build_hybrid_cache(
        kv_slots=kv_slots, mamba_slots=mamba_slots, device=device, shape=shape, cache_class=cache_class,
        deferred_frees=deferred_frees, enable_kv_cache_events=enable_kv_cache_events,
    )


def replay_alphas(spec: TunerSpec, warmup: Sequence, window: Sequence, alphas: Sequence[float],
                  snapshot=None) -> dict[float, float]:
    """FLOPs saved over ``window`` for each α (warm-up requests replayed first, uncounted;
    or, with ``snapshot``, starting from that copy of the live tree)."""
    from .driver import CacheDriver

    scores: dict[float, float] = {}
    for alpha in alphas:
        cfg = dataclasses.replace(spec.config, alpha=float(alpha), tuner="inline")
        built = build_marconi_cache(kv_slots=spec.kv_slots, mamba_slots=spec.mamba_slots, config=cfg, profile=spec.profile)
        drv = CacheDriver(
            built, kv_budget=spec.kv_budget, state_budget=spec.state_budget, byte_budget=spec.byte_budget
        )
        if snapshot is not None:
            drv.load_snapshot(snapshot)
        for inp, out in warmup:
            drv.run(inp, out)
        scores[float(alpha)] = sum(drv.run(inp, out).flops_saved for inp, out in window)
    return scores
