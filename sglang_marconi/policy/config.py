"""Marconi's knobs, parsed and validated in one place.

In the live server they arrive as the JSON object of SGLang's own
``--radix-eviction-policy-config`` (the eviction-policy tuning flag), with
``--radix-cache-backend marconi`` selecting this cache::

    python -m sglang.launch_server ... --radix-cache-backend marconi \
        --radix-eviction-policy-config '{"variant": "paper"}'

An unknown key or a bad value raises :class:`MarconiConfigError` with one line
naming it, which stops start-up.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Optional, Union

#: 0 and a geometric ladder 1/8 ... 8; when the best α is the grid's top, the
#: tuner doubles the top for the next window (the upper end never binds).
DEFAULT_ALPHA_GRID = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
PAPER_ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(21))  # 0.0, 0.1, ..., 2.0

VARIANTS = ("marconi", "paper")
#: ``variant: "paper"`` also selects the paper's admission (no input-end state)
#: and its tuner (α auto, tuned once, on the first window after the first
#: eviction, scored from a cold start, no memory or hysteresis, grid 0..2 step
#: 0.1) unless the keys are given explicitly.
PAPER_TUNER_DEFAULTS = {"alpha": None, "utility_form": "sum", "input_state": False, "anchor_state": False, "tombstones_first": False, "superseded_first": False, "ended_first": False, "single_budget_marks": "off", "retune": False, "confirm": False, "warm_start": False, "switch_margin": 0.0, "score_decay": 0.0,
                        "alpha_grid": PAPER_ALPHA_GRID}
BRANCH_POINT_MODES = ("exact", "grid")
TUNER_MODES = ("process", "thread", "inline")
REFRESH_MODES = ("deepest", "path")
STATE_CANDIDATES = ("narrow", "all")
REPLAY_STARTS = ("warmup", "snapshot")
RECENCY_KINDS = ("inverse", "linear")
UTILITY_FORMS = ("value", "sum", "product", "density")
DENSITY_VALUES = ("flops", "tokens")
DENSITY_RANKS = ("dead_first", "full")
END_LABELS = ("cache", "sequence")
SINGLE_BUDGET_MARKS = ("off", "marks", "all")
SPARE_FORK_MODES = ("off", "two_pools", "both")
SHARE_FROM = ("root", "fork")

#: Keys whose value is one of a fixed set of strings.
_CHOICES = {
    "branch_points": BRANCH_POINT_MODES,
    "variant": VARIANTS,
    "refresh": REFRESH_MODES,
    "kv_refresh": REFRESH_MODES,
    "state_candidates": STATE_CANDIDATES,
    "replay_start": REPLAY_STARTS,
    "recency": RECENCY_KINDS,
    "utility_form": UTILITY_FORMS,
    "density_value": DENSITY_VALUES,
    "density_rank": DENSITY_RANKS,
    "end_labels": END_LABELS,
    "single_budget_marks": SINGLE_BUDGET_MARKS,
    "tombstones_spare_fork_hits": SPARE_FORK_MODES,
    "superseded_share_from": SHARE_FROM,
    "tuner": TUNER_MODES,
    "value_bytes": ("own", "exclusive"),
    "value_flops": ("replay", "root"),
    "value_kv_pool": ("value", "recency"),
}
_BOOLS = ("retune", "warm_start", "confirm", "tombstones_first", "density_reuse",
          "tombstones_spare_branches", "superseded_first", "superseded_needs_state",
          "ended_first", "ended_in_density", "value_frequency", "anchor_state", "anchor_prior", "internal_prior",
          "prompt_end_state")
#: Keys that take an integer (with its minimum).
_INTS = {"anchor_bits": 1, "window_multiplier": 1, "tuner_max_requests": 1, "warmup_windows": 1, "score_windows": 1, "density_period": 1,
         "end_tail_tokens": 1}
#: Keys that take null or a number (with its minimum).
_OPTIONAL_NUMBERS = {"alpha_max": 0.0, "efficiency_horizon": 1e-9, "single_budget_gb": 1e-9}
#: Keys that take a number (with its minimum).
_NUMBERS = {"switch_margin": 0.0}


class MarconiConfigError(ValueError):
    """A Marconi configuration key or value is invalid (message names it)."""


@dataclasses.dataclass(frozen=True)
class MarconiConfig:
    #: Weight of FLOP efficiency against recency in the paper's utility (the sum
    #: and product forms); ``None`` = tuned online ("auto", the paper's tuner).
    alpha: Optional[float] = 0.0
    #: Tuning window = window_multiplier x (requests seen before the first eviction).
    window_multiplier: int = 5
    #: Candidate α values the tuner replays.
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID
    #: Largest α the tuner may try (None: unbounded; the grid's top doubles when it wins).
    alpha_max: Optional[float] = None
    #: How nodes are ranked for eviction. "value" (the default): expected
    #: value per byte, GreedyDual-Size-Frequency (docs/policy.md): priority =
    #: the pool's inflation value when the node was last used + hit frequency ×
    #: FLOPs a hit saves / bytes its eviction frees; the lowest goes, and the
    #: pool's inflation value rises to it. Experiments (replay variants):
    #: "sum" (the paper: norm(recency) + α·norm(efficiency)), "product"
    #: (norm(recency)·(1 + α·norm(efficiency))), "density" (hit density learned
    #: from the cache's own hits and evictions × value per byte:
    #: ``policy/hit_density.py``). A config that sets ``alpha`` without
    #: ``utility_form`` gets "sum" (α is read by the sum and product forms only).
    utility_form: str = "value"
    #: ``value``: bytes an eviction frees: the node's own KV ("own") or the KV of
    #: its exclusive path (up to the nearest ancestor another sequence shares)
    value_bytes: str = "exclusive"
    #: ``value``: FLOPs a hit saves: from the nearest ancestor state ("replay") or the root
    value_flops: str = "replay"
    #: ``value``: the KV pool (two pools) ranks leaves by value too, or by "recency"
    value_kv_pool: str = "recency"
    #: ``value``: hits count (GDSF) or every candidate with evidence counts once (GDS)
    value_frequency: bool = True
    #: ``density``: how the learned density ranks candidates. "full": by
    #: density × value per byte (LHD's rank); "dead_first": states it predicts
    #: are never hit again (density 0: no state of their class was hit at their
    #: age or older) go first, the rest by recency.
    density_rank: str = "full"
    #: ``density``: what a hit is worth, "flops" (prefill FLOPs saved) or "tokens".
    density_value: str = "flops"
    #: ``density``: classes also split states hit before from states never hit
    #: since they were admitted (``policy/hit_density.py``).
    density_reuse: bool = False
    #: ``density``: the tables are rebuilt every this many hits + evictions ...
    density_period: int = 32
    #: ... and the counts then decay by this factor (1 = never forget).
    density_decay: float = 0.98
    #: Recency term: "inverse" (the paper: 1/age) or "linear" (−age; min–max then
    #: spreads candidates evenly by age).
    recency: str = "inverse"
    #: Efficiency bonus decays as exp(-age / (horizon x logical ticks per request)):
    #: a node keeps its FLOP-efficiency advantage for about this many requests
    #: after its last use, then ranks by recency alone. None: no decay (the paper).
    efficiency_horizon: Optional[float] = None
    #: Re-tune every window (True) or once, as the paper did (False).
    retune: bool = True
    #: Score α on steady-state windows only: the first tuning waits for one
    #: window of warm-up (replayed uncounted) instead of scoring the cold start.
    warm_start: bool = True
    #: A new α replaces the current one only if it saves this fraction more
    #: FLOPs than the current α on the same window (hysteresis against noise).
    switch_margin: float = 0.02
    #: A new α must win again on the next window before it is adopted (hold-out).
    confirm: bool = True
    #: Windows each tuning replay scores in one continuous run (the most recent
    #: ones; 1 = the last window, the paper's rule).
    score_windows: int = 1
    #: What a tuning replay starts from: "warmup" (an empty cache fed the
    #: previous window(s), uncounted) or "snapshot" (a copy of the live tree as
    #: it was when the scored window began: shape, states and recency stamps).
    replay_start: str = "warmup"
    #: Windows of history each tuning replay runs (uncounted) before the scored
    #: window, so the replayed cache is in the steady state of the α it tries.
    warmup_windows: int = 1
    #: α is chosen on FLOPs saved summed over past windows, each older window
    #: weighted by this factor (0 = the last window only, as the paper did):
    #: single windows are short and noisy on agentic traces.
    score_decay: float = 0.8
    #: Cost profile: a built-in name, a path to a config.json, or None (use the
    #: served model's HF config; the paper's 7B profile outside a server).
    profile: Optional[str] = None
    #: "exact": checkpoint the branch point at the exact token; "grid": SGLang's
    #: mamba checkpoint grid (what its extra_buffer prefill can capture).
    branch_points: str = "exact"
    #: Also checkpoint the state at the end of the input when the request
    #: creates no branch point (still <= 2 states per request): losing the
    #: output's KV leaf then still leaves a hit on the whole input. "auto": on
    #: with SGLang's two pools, off under one byte budget (``single_budget_gb``,
    #: the replay's ``--single-budget``), where each such state costs as many
    #: bytes as hundreds of KV tokens. Default off (an experiment): with the
    #: value rule it bought +0.14% over the choice half's two-pool cells and
    #: cost half of the per-request bookkeeping (docs/policy.md).
    input_state: Union[bool, str] = False
    #: A request that creates no branch point spends its second state on the
    #: largest power of two within its input, past its hit (admission.py's
    #: ``anchor_position``): the first reuse of a shared prefix then hits. On
    #: by default; off in ``lru`` (the paper's SGLang+) and ``variant: "paper"``.
    anchor_state: bool = True
    #: A request that decodes nothing (``max_new_tokens`` 0: SGLang's warm-up before
    #: ``n`` > 1 samples, a frontend ``fork``'s commit) keeps its last state one token
    #: before its input's end, where a request with the same prompt resumes, instead of
    #: at its end (admission.py's ``prompt_end_position``). On by default; off only in
    #: the experiment ``marconi:no-prompt-end``.
    prompt_end_state: bool = True
    #: the anchor at the largest number of at most this many significant bits within
    #: the input (1: a power of two). Experiment (``marconi:anchor-2bits``).
    anchor_bits: int = 1
    #: ``value``: an anchor state not hit yet counts, while internal, the share of
    #: anchors hit so far (Laplace-smoothed) as its frequency, instead of the 0 of an
    #: internal state nobody resumed from. On by default.
    anchor_prior: bool = True
    #: ``value``: any other internal state without evidence of its own (never resumed
    #: from while internal, not a branch point) counts the share of such states hit
    #: while internal so far, instead of 0. Experiment (``marconi:internal-prior``).
    internal_prior: bool = False
    #: "marconi" (this project's default: replay distance to the nearest
    #: ancestor state, node-local bytes) or "paper" (the paper's formulas as
    #: stated: saved FLOPs from the parent, bytes counting the path's KV).
    variant: str = "marconi"
    #: Which nodes a hit refreshes: "deepest" (the matched node whose state is
    #: used; the paper's rule) or "path" (every matched node, as LRU caches do).
    refresh: str = "deepest"
    #: The same for the KV pool's recency (leaves of the KV pool).
    kv_refresh: str = "deepest"
    #: State pool, α fixed at 0: evict states of internal nodes (tombstones: the
    #: KV stays, a longer sequence already runs past them) before any leaf's
    #: state, each group by recency.
    tombstones_first: bool = False
    #: ... except a branch point's state not hit since it was admitted (it stays
    #: in the recency order with the leaves).
    tombstones_spare_branches: bool = True
    #: ... and a state that served a fork: a hit whose request diverged right
    #: at it from the node's children (a shared prompt's fork, where the next
    #: question or conversation starts), unlike a hit that extends a leaf (the
    #: next turn of one conversation). Counted per node, so a state admitted
    #: again where one served a fork is spared at once. "two_pools": in the state pool of
    #: SGLang's two pools (the default since round 14); "both": also in the
    #: single byte budget's queue (``single_budget_marks: "all"``); "off".
    tombstones_spare_fork_hits: str = "two_pools"
    #: Recency order, both pools: when a request branches off inside a path that
    #: had no branch there (it diverges from the cached sequence: an agent
    #: dropped or edited part of its history, a chat template re-rendered the
    #: last answer), the path it left is superseded: its leaves' KV and its
    #: states go before every other candidate (each group by recency). A hit
    #: on it, or a request extending it, makes it ordinary again.
    superseded_first: bool = False
    #: ... counted as a revision only when the request shares at least this
    #: fraction of the sequence it diverges from (counted as
    #: ``superseded_share_from`` says; a short common prefix, such as a system
    #: prompt before another conversation, is not one).
    superseded_min_shared: float = 0.25
    #: ... and only when the shared part ends below a cached SSM state on that
    #: same unbranched path (the request resumed from the sequence it revises;
    #: a new conversation after an uncheckpointed system prompt did not).
    superseded_needs_state: bool = False
    #: Where that share is counted from: "root" (the whole sequence; round 7-11's
    #: rule, with ``superseded_min_shared`` 0.5) or "fork" (below the nearest
    #: node above the branch where two or more other sequences split off, and
    #: at least one 64-token block of it): another conversation after a long
    #: shared system prompt, or another question after a few-shot block,
    #: shares most of a short sequence from the root but almost nothing past
    #: the prompt's fork; an agent's edit shares its own history past it.
    #: Default "fork" (issue 6, round 12).
    superseded_share_from: str = "fork"
    #: Recency order, both pools: a finished request whose last output tokens
    #: end conversations (learned online, ``policy/session_end.py``: sequences
    #: with that ending were evicted unanswered, never continued) marks its
    #: sequence — its leaf and the unbranched path above it — to go first, as
    #: ``superseded_first`` does. A hit on it, or a request extending it, makes
    #: it ordinary again and teaches the predictor that the ending continues.
    ended_first: bool = False
    #: ... the ending is the last this many output tokens
    end_tail_tokens: int = 4
    #: ... and counts as final when P(continued) (posterior mean, uniform
    #: prior) is at most this
    end_max_continue: float = 0.1
    #: ... where the labels come from: "cache" (continued = a later request hit,
    #: extended or revised the sequence while it was cached; unanswered = it was
    #: evicted first) or "sequence" (continued = a later request's input shares at
    #: least ``superseded_min_shared`` of it, cached or not — an unanswered label
    #: given at eviction is taken back then)
    end_labels: str = "sequence"
    #: ... and the density orders rank a marked sequence before every other
    #: candidate too (ties by age)
    ended_in_density: bool = True
    #: SSM-state eviction candidates: "narrow" (holders with at most one child,
    #: the paper's rule: a branch point's state serves several children) or
    #: "all" (every unlocked holder, as SGLang's LRU does).
    state_candidates: str = "narrow"
    #: Paper-faithful single byte budget over KV + states (GB); None = SGLang's
    #: two pools, each budgeted by its own allocator.
    single_budget_gb: Optional[float] = None
    #: One byte budget (``single_budget_gb``, the replay's ``--single-budget``):
    #: which of the recency order's marks its single eviction queue applies.
    #: "off": none (plain recency; before round 11 the queue applied none);
    #: "marks" (round 11's default): the paths a request branched away from and
    #: a conversation's likely last sequence go first (``superseded_first``,
    #: ``ended_first``); "all" (the default since round 13): those and internal
    #: nodes' states before any leaf (``tombstones_first``), as in the two
    #: pools' state pool.
    single_budget_marks: str = "all"
    #: Where α replays run: "process" (off the scheduler's GIL), "thread", or
    #: "inline" (synchronous; for tests and deterministic replays).
    tuner: str = "process"
    #: Most recent requests a tuning replay uses (bounds tuning cost).
    tuner_max_requests: int = 2000

    def input_state_on(self, single_budget: bool) -> bool:
        """``input_state`` resolved for a cache with one byte budget or two pools."""
        return (not single_budget) if self.input_state == "auto" else bool(self.input_state)

    @property
    def auto_alpha(self) -> bool:
        return self.alpha is None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["alpha"] = "auto" if self.alpha is None else self.alpha
        d["alpha_grid"] = list(self.alpha_grid)
        return d


_FIELDS = {f.name for f in dataclasses.fields(MarconiConfig)}


def _err(key: str, value: Any, why: str) -> MarconiConfigError:
    return MarconiConfigError(f"marconi config: {key}={value!r} {why}")


def _number(key: str, value: Any, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(key, value, "is not a number")
    if not math.isfinite(value) or value < minimum:
        raise _err(key, value, f"must be a finite number >= {minimum}")
    return float(value)


def _parse_grid(value: Any) -> tuple[float, ...]:
    key = "alpha_grid"
    if isinstance(value, str):
        parts = value.split(":")
        if len(parts) != 3:
            raise _err(key, value, "must be a list of numbers or 'start:stop:step'")
        try:
            start, stop, step = (float(p) for p in parts)
        except ValueError:
            raise _err(key, value, "must be a list of numbers or 'start:stop:step'") from None
        if step <= 0 or stop < start or start < 0:
            raise _err(key, value, "needs 0 <= start <= stop and step > 0")
        n = int(math.floor((stop - start) / step + 1e-9)) + 1
        grid = [round(start + i * step, 10) for i in range(n)]
    elif isinstance(value, (list, tuple)):
        grid = [_number(key, v) for v in value]
    else:
        raise _err(key, value, "must be a list of numbers or 'start:stop:step'")
    if not grid:
        raise _err(key, value, "is empty")
    return tuple(sorted(set(grid)))


def parse_config(raw: Union[None, str, Mapping[str, Any], MarconiConfig]) -> MarconiConfig:
    """Parse a dict, a JSON string, or None (defaults) into a validated config."""
    if raw is None:
        return MarconiConfig()
    if isinstance(raw, MarconiConfig):
        return raw
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as e:
            raise MarconiConfigError(f"marconi config: not valid JSON ({e.msg} at char {e.pos}): {raw!r}") from None
    if not isinstance(raw, Mapping):
        raise MarconiConfigError(f"marconi config: expected a JSON object, got {type(raw).__name__} {raw!r}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _FIELDS:
            raise MarconiConfigError(
                f"marconi config: unknown key {key!r} (known keys: {', '.join(sorted(_FIELDS))})"
            )
        if key == "alpha":
            out[key] = None if value == "auto" else _number(key, value)
        elif key in _CHOICES:
            if value not in _CHOICES[key]:
                raise _err(key, value, f"must be one of {', '.join(_CHOICES[key])}")
            out[key] = value
        elif key == "input_state":
            if not isinstance(value, bool) and value != "auto":
                raise _err(key, value, 'must be true, false or "auto"')
            out[key] = value
        elif key in _BOOLS:
            if not isinstance(value, bool):
                raise _err(key, value, "must be true or false")
            out[key] = value
        elif key in _INTS:
            if isinstance(value, bool) or not isinstance(value, int) or value < _INTS[key]:
                raise _err(key, value, f"must be an integer >= {_INTS[key]}")
            out[key] = value
        elif key in _OPTIONAL_NUMBERS:
            out[key] = None if value is None else _number(key, value, minimum=_OPTIONAL_NUMBERS[key])
        elif key == "alpha_grid":
            out[key] = _parse_grid(value)
        elif key == "profile":
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise _err(key, value, "must be a built-in profile name or a path to config.json")
            out[key] = value
        elif key in _NUMBERS:
            out[key] = _number(key, value, minimum=_NUMBERS[key])
        elif key == "superseded_min_shared":
            out[key] = _number(key, value)
            if out[key] > 1.0:
                raise _err(key, value, "must be in [0, 1]")
        elif key == "end_max_continue":
            out[key] = _number(key, value)
            if not 0.0 < out[key] < 1.0:
                raise _err(key, value, "must be in (0, 1)")
        elif key == "density_decay":
            out[key] = _number(key, value)
            if not 0.0 < out[key] <= 1.0:
                raise _err(key, value, "must be in (0, 1]")
        elif key == "score_decay":
            out[key] = _number(key, value)
            if out[key] >= 1.0:
                raise _err(key, value, "must be in [0, 1)")
    if out.get("variant") == "paper":  # the paper's tuner too, unless a key says otherwise
        for key, value in PAPER_TUNER_DEFAULTS.items():
            out.setdefault(key, value)
    if "alpha" in out and out["alpha"] != 0.0:  # α weighs the sum/product utility
        out.setdefault("utility_form", "sum")
    return MarconiConfig(**out)


# ------------------------------------------------------------- the server's keys
#: What ``--radix-eviction-policy-config`` takes (docs/configuration.md). Every
#: other field of :class:`MarconiConfig` is an experiment: the replay's named
#: variants (``replay/variants.py``) set them, the server does not parse them.
SERVER_KEYS = ("variant", "profile", "branch_points", "single_budget_gb", "alpha", "tuner")

_ORDER_KEYS = ("utility_form", "recency", "efficiency_horizon", "refresh", "kv_refresh", "state_candidates",
               "input_state", "density_rank", "density_value", "density_reuse", "density_period", "density_decay",
               "tombstones_first", "tombstones_spare_branches", "tombstones_spare_fork_hits", "superseded_first",
               "superseded_min_shared", "superseded_needs_state", "superseded_share_from", "ended_first",
               "end_tail_tokens", "end_max_continue", "end_labels", "ended_in_density", "single_budget_marks",
               "value_bytes", "value_flops", "value_kv_pool", "value_frequency")
_TUNER_KEYS = ("window_multiplier", "alpha_grid", "alpha_max", "retune", "warm_start", "confirm", "switch_margin",
               "score_decay", "replay_start", "score_windows", "warmup_windows", "tuner_max_requests")
_LEADER_KEYS = ("leader_horizon", "leader_margin", "leader_guard", "leader_hold", "leader_guard_grace",
                "leader_density_reuse")
#: removed server key -> what replaced it (the one-line error says it)
REPLACED_KEYS = {
    **{k: "the default ranks every candidate by value per byte with one rule and no knobs (docs/policy.md); "
          "eviction experiments are replay variants (sglang_marconi/replay/variants.py)" for k in _ORDER_KEYS},
    **{k: "the α tuner runs with the paper's settings under {\"variant\": \"paper\"} (docs/policy.md); "
          "tuner experiments are replay variants (sglang_marconi/replay/variants.py)" for k in _TUNER_KEYS},
    **{k: "follow-the-leader and its shadow caches were replaced by the value-per-byte rule (docs/policy.md)"
       for k in _LEADER_KEYS},
}


def parse_server_config(raw: Union[None, str, Mapping[str, Any]]) -> MarconiConfig:
    """The server's ``--radix-eviction-policy-config``: only :data:`SERVER_KEYS`;
    a removed key's error says what replaced it, an unknown one lists the keys."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as e:
            raise MarconiConfigError(f"marconi config: not valid JSON ({e.msg} at char {e.pos}): {raw!r}") from None
    if raw is not None and not isinstance(raw, Mapping):
        raise MarconiConfigError(f"marconi config: expected a JSON object, got {type(raw).__name__} {raw!r}")
    for key in raw or {}:
        if key in REPLACED_KEYS:
            raise MarconiConfigError(f"marconi config: key {key!r} was removed: {REPLACED_KEYS[key]}")
        if key not in SERVER_KEYS:
            raise MarconiConfigError(
                f"marconi config: unknown key {key!r} (known keys: {', '.join(SERVER_KEYS)})")
    if raw and "alpha" in raw and raw.get("variant") != "paper":
        raise MarconiConfigError(
            f"marconi config: alpha={raw['alpha']!r} weighs the paper's utility: use it with "
            '{"variant": "paper"} (the default has no α)')
    if raw and "tuner" in raw and raw.get("variant") != "paper":
        raise MarconiConfigError(
            f"marconi config: tuner={raw['tuner']!r} places the paper's α tuner: use it with "
            '{"variant": "paper"} (the default runs no tuner)')
    return parse_config(raw)
