"""The caches a replay compares, all built from the project's existing pieces.

=========  ==================================================================
policy     cache + driver admission
=========  ==================================================================
marconi    ``MarconiRadixCache`` (``build_marconi_cache``), α ``auto`` tuned
           with ``tuner: "inline"`` (synchronous, so a replay is
           deterministic; the live server's default is ``"process"``), the
           driver's default admission for a Marconi cache
           (``MarconiAdmission``, exact branch points).
sglang     SGLang 0.5.23's own default hybrid cache: ``UnifiedRadixCache``
           with its default FULL + MAMBA components on the Rust tree core,
           LRU eviction, admission ``SGLangGridAdmission(grid)`` with the
           cache's ``mamba_checkpoint_grid`` (extra_buffer checkpoints).
lru        the paper's SGLang+: Marconi's admission with LRU eviction
           (``MarconiRadixCache``, ``{"alpha": 0, "refresh": "path", "kv_refresh": "path"}``).
vllm       the paper's vLLM+: the same LRU cache, a state at every block
           (``BlockAdmission(block)``, default 32 tokens), replayed on its
           own block tree (``replay/vllm.py``), which reproduces that run
           on SGLang's tree (``build_policy(..., reference=True)``) exactly.
infinite   no eviction (pools as large as the trace, no budget) and
           ``OracleAdmission``: any cached prefix is reusable — the trace's
           prefix-sharing upper bound.
=========  ==================================================================

Budgets: two pools (``kv_gb`` → ``kv_gb·1e9 // kv_bytes(1)`` KV tokens,
``ssm_gb`` → ``ssm_gb·1e9 // ssm_state_bytes()`` states, each enforced by
the driver after every request) or one byte budget over both (``cache_gb``,
``CacheDriver(byte_budget=...)`` → ``MarconiRadixCache.evict_to_bytes``; only
for caches built on ``MarconiRadixCache``). Pools are sized by slot count:
the budget plus headroom for the running request (its committed KV and the
states it may checkpoint before the budget is enforced again).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from .variants import LRU_CONFIG, VARIANTS

POLICIES = ("marconi", "sglang", "lru", "vllm", "infinite")
MARCONI_BASED = ("marconi", "lru", "vllm", "infinite")
KV_MARGIN = 64  # spare KV slots beyond budget + longest request
STATE_HEADROOM = 4  # spare state slots: Marconi/SGLang admit <= 2 states per request
MARCONI_DEFAULT_CONFIG = {"tuner": "inline"}  # the package defaults; replays tune inline (deterministic)


class PolicyError(ValueError):
    """A policy cannot run with the given budget (message says why)."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """One cache budget. ``frac`` records a budget derived as a fraction of the
    infinite cache's tree (None when given in GB)."""

    kv_gb: Optional[float] = None
    ssm_gb: Optional[float] = None
    cache_gb: Optional[float] = None
    frac: Optional[float] = None

    @property
    def single(self) -> bool:
        return self.cache_gb is not None

    @property
    def total_gb(self) -> float:
        return self.cache_gb if self.single else (self.kv_gb or 0.0) + (self.ssm_gb or 0.0)

    def kv_budget(self, profile) -> Optional[int]:
        return None if self.kv_gb is None else int(self.kv_gb * 1e9 // profile.kv_bytes(1))

    def state_budget(self, profile) -> Optional[int]:
        return None if self.ssm_gb is None else int(self.ssm_gb * 1e9 // profile.ssm_state_bytes())

    def byte_budget(self) -> Optional[int]:
        return None if self.cache_gb is None else int(self.cache_gb * 1e9)

    def label(self) -> str:
        if self.single:
            s = f"{self.cache_gb:.3g} GB"
        else:
            s = f"{self.kv_gb:.3g}+{self.ssm_gb:.3g} GB"
        return s + (f" ({self.frac:g}×∞)" if self.frac is not None else "")


@dataclasses.dataclass(frozen=True)
class PolicyOptions:
    block: int = 32  #: vllm block size
    marconi_config: Optional[dict] = None  #: overrides of MARCONI_DEFAULT_CONFIG for `marconi`
    sglang_grid: Optional[int] = None  #: override of the sglang admission grid (default: the cache's)
    #: named Marconi variants (``--variant NAME=JSON``): policy ``marconi:NAME`` runs
    #: MARCONI_DEFAULT_CONFIG updated with that JSON (the ablation's rows)
    variants: tuple = ()
    #: ``--end-oracle`` (a bound, not a policy): Marconi policies with
    #: ``ended_first`` are told which request is each session's last and mark
    #: its sequence by that instead of by their end predictor
    end_oracle: bool = False
    #: ``--live-ceiling K`` (a bound, not a policy): every K-th request, each
    #: live session's expected hit and the live-hit ceiling (``bounds.LiveHitProbe``)
    live_ceiling_every: int = 0

    def variant(self, name: str) -> Optional[dict]:
        """``--variant NAME=JSON``'s overrides, else the named experiment (``variants.VARIANTS``)."""
        given = dict(self.variants)
        return given[name] if name in given else VARIANTS.get(name)


@dataclasses.dataclass
class TraceShape:
    """What pool sizing needs to know about the trace."""

    longest: int  #: longest prompt + completion
    requests: int
    stream_tokens: int  #: upper bound of the infinite tree's KV tokens


def _marconi(kv_slots, mamba_slots, cfg: dict, profile, kv_budget, state_budget, byte_budget):
    from ..policy.config import parse_config
    from ..sglang_backend.tuning import build_marconi_cache

    return build_marconi_cache(
        kv_slots=kv_slots, mamba_slots=mamba_slots, config=parse_config(cfg), profile=profile,
        kv_budget=kv_budget, state_budget=state_budget, byte_budget=byte_budget,
    )


def build_policy(name: str, profile, budget: Optional[Budget], shape: TraceShape,
                 opts: PolicyOptions = PolicyOptions(), *, reference: bool = False) -> tuple[Any, Any, dict]:
    """(built cache, CacheDriver, info) for ``name`` at ``budget``.

    ``vllm`` replays on its own block tree (``replay/vllm.py``); ``reference=True``
    drives SGLang's tree with it instead, the run that tree reproduces."""
    from sglang.srt.mem_cache.unified_cache.components.base import ComponentType

    from ..policy.admission import BlockAdmission, OracleAdmission, SGLangGridAdmission
    from ..sglang_backend.driver import CacheDriver
    from ..sglang_backend.pools import build_hybrid_cache

    variant_cfg = None
    if name.startswith("marconi:"):
        variant_cfg = opts.variant(name.partition(":")[2])
        if variant_cfg is None:
            raise PolicyError(f"unknown policy {name!r}: no --variant {name.partition(':')[2]}=JSON given "
                              f"and no named variant (known: {', '.join(VARIANTS)})")
    elif name not in POLICIES:
        raise PolicyError(f"unknown policy {name!r} (known: {', '.join(POLICIES)}, marconi:NAME with --variant)")
    info: dict = {}
    if name == "infinite":
        kv_slots = shape.stream_tokens + KV_MARGIN
        mamba_slots = shape.requests + STATE_HEADROOM
        # nothing is ever evicted, so the eviction order is moot: plain recency
        built = _marconi(kv_slots, mamba_slots, {"alpha": 0.0, "utility_form": "sum", "tuner": "inline"}, profile,
                         None, None, None)
        drv = CacheDriver(built, admission=OracleAdmission())
        info.update(kv_slots=kv_slots, mamba_slots=mamba_slots, admission="oracle")
        return built, drv, info
    if budget is None:
        raise PolicyError(f"policy {name} needs a budget")
    if budget.single and name not in MARCONI_BASED and variant_cfg is None:
        raise PolicyError(
            f"policy {name}: SGLang's cache has two pools (KV tokens, SSM states) and no single byte budget; "
            "replay it with --kv-gb/--ssm-gb (or drop it from --policies with --single-budget)"
        )
    state_bytes = profile.ssm_state_bytes()
    kv_budget = budget.kv_budget(profile)
    state_budget = budget.state_budget(profile)
    byte_budget = budget.byte_budget()
    if budget.single:
        kv_cap = byte_budget // profile.kv_bytes(1)
        state_cap = byte_budget // state_bytes if state_bytes else 0
    else:
        kv_cap, state_cap = kv_budget, state_budget
    headroom = math.ceil(shape.longest / opts.block) + 2 if name == "vllm" else STATE_HEADROOM
    kv_slots = kv_cap + shape.longest + KV_MARGIN
    mamba_slots = max(1, state_cap + headroom)
    info.update(kv_slots=kv_slots, mamba_slots=mamba_slots, kv_budget_tokens=kv_budget,
                state_budget=state_budget, byte_budget=byte_budget)
    budgets = dict(kv_budget=kv_budget, state_budget=state_budget, byte_budget=byte_budget)
    if name == "sglang":
        built = build_hybrid_cache(kv_slots=kv_slots, mamba_slots=mamba_slots, tree_core_backend="rust")
        backend = getattr(built.cache, "_tree_core_backend", None)
        if backend != "rust":
            raise PolicyError(f"policy sglang: expected SGLang's Rust tree core, got {backend!r}")
        grid = opts.sglang_grid or built.cache.components[ComponentType.MAMBA].mamba_checkpoint_grid
        drv = CacheDriver(built, profile=profile, admission=SGLangGridAdmission(grid), **budgets)
        info.update(tree_core_backend=backend, admission=f"sglang-grid({grid})")
        return built, drv, info
    if name == "marconi" or variant_cfg is not None:
        cfg = dict(MARCONI_DEFAULT_CONFIG)
        cfg.update(variant_cfg if variant_cfg is not None else (opts.marconi_config or {}))
        built = _marconi(kv_slots, mamba_slots, cfg, profile, **budgets)
        drv = CacheDriver(built, **budgets)  # default admission: MarconiAdmission(branch_points)
        info.update(config=built.cache.marconi.config.to_dict(), admission=f"marconi({drv.admission.mode})")
        info["config"].pop("alpha_grid", None)
        return built, drv, info
    if name == "vllm" and not reference:
        from ..sglang_backend.pools import MAX_RUNNING_REQS
        from .vllm import build_block_driver

        # the state slots the reference's allocator has (its pools keep working states too)
        built, drv = build_block_driver(profile, block=opts.block, kv_slots=kv_slots,
                                        mamba_slots=mamba_slots + MAX_RUNNING_REQS, **budgets)
        info.update(admission=f"blocks({opts.block})")
        return built, drv, info
    built = _marconi(kv_slots, mamba_slots, dict(LRU_CONFIG, tuner="inline"), profile, **budgets)
    if name == "lru":
        drv = CacheDriver(built, **budgets)
        info.update(admission="marconi(exact)")
    else:
        drv = CacheDriver(built, admission=BlockAdmission(opts.block), **budgets)
        info.update(admission=f"blocks({opts.block})")
    return built, drv, info


def close(built) -> None:
    st = getattr(built.cache, "marconi", None)
    if st is not None:
        st.close()


__all__ = ["Budget", "POLICIES", "PolicyError", "PolicyOptions", "TraceShape", "build_policy", "close"]
