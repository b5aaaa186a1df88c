"""Marconi's counters in the server log and on SGLang's Prometheus endpoint.

:func:`attach` is called by the factory once the cache exists (in the
scheduler process). After every finished request it

* logs one INFO line ``marconi: ...`` every ``MARCONI_LOG_EVERY`` finished
  requests (env var, default 50; ``0`` turns the line off), and
* when SGLang runs with ``--enable-metrics``, sets ``marconi_*`` gauges.

SGLang serves ``/metrics`` from prometheus_client's *multiprocess* mode (the
launcher sets ``PROMETHEUS_MULTIPROC_DIR`` before it spawns the scheduler and
the HTTP server aggregates the per-process files), so the gauges are created
here, in the scheduler, with ``multiprocess_mode="mostrecent"`` like SGLang's
own scheduler gauges; prometheus_client is imported only after that env var is
set. Cumulative counts are exported as gauges holding the running total (a
Prometheus ``Counter`` would need increments, and the counts live in
:class:`~sglang_marconi.sglang_backend.state.MarconiCounters`).
"""

from __future__ import annotations

import logging
import os
from typing import Dict, Optional

logger = logging.getLogger("sglang_marconi")

#: gauge name -> (help, getter on (counters dict, state))
GAUGES = {
    "marconi_branch_checkpoints": "SSM states admitted at a branch point (speculative insertion)",
    "marconi_last_token_checkpoints": "SSM states admitted after a request's last decoded token",
    "marconi_input_end_checkpoints": "SSM states admitted at the end of a request's input (input_state)",
    "marconi_anchor_checkpoints": "SSM states admitted at the largest power of two within a request's input (no branch point)",
    "marconi_state_hits": "prefix matches that resumed from a cached SSM state",
    "marconi_matches": "prefix-match calls seen by the Marconi cache",
    "marconi_hit_tokens": "tokens served from the cache on state hits",
    "marconi_state_evictions": "SSM states evicted",
    "marconi_leaf_evictions": "radix-tree nodes evicted (their KV freed)",
    "marconi_evicted_tokens": "KV tokens evicted",
    "marconi_requests_finished": "finished requests seen by the Marconi cache",
    "marconi_requests_evicting": "finished requests during whose life (first prefix match to finish) "
                                 "the cache evicted an SSM state or a KV leaf",
    "marconi_alpha": "current alpha (weight of FLOP efficiency against recency)",
    "marconi_superseded_marks": "superseded_first: radix-tree nodes marked as a path a request branched away from",
    "marconi_ended_marks": "ended_first: finished requests whose sequence was marked as a conversation's likely end",
    "marconi_fork_hits": "state hits whose request diverged right at the state (a shared prompt's fork)",
}

_KEYS = {
    "marconi_branch_checkpoints": "admitted_branch_point",
    "marconi_last_token_checkpoints": "admitted_last_token",
    "marconi_input_end_checkpoints": "admitted_input_end",
    "marconi_anchor_checkpoints": "admitted_anchor",
    "marconi_state_hits": "state_hits",
    "marconi_matches": "matches",
    "marconi_hit_tokens": "hit_tokens",
    "marconi_state_evictions": "state_evictions",
    "marconi_leaf_evictions": "leaf_evictions",
    "marconi_evicted_tokens": "evicted_tokens",
    "marconi_superseded_marks": "superseded_marks",
    "marconi_ended_marks": "ended_marks",
    "marconi_fork_hits": "fork_hits",
}


def snapshot(cache) -> Dict[str, float]:
    """The exported values, by gauge name."""
    st = cache.marconi
    c = st.counters.as_dict()
    out = {name: float(c[key]) for name, key in _KEYS.items()}
    out["marconi_requests_finished"] = float(getattr(cache, "marconi_requests_finished", 0))
    out["marconi_requests_evicting"] = float(getattr(cache, "marconi_requests_evicting", 0))
    out["marconi_alpha"] = float(st.alpha)
    return out


def log_line(values: Dict[str, float], order: str) -> str:
    """One INFO line; ``order``: the eviction order (the cache's utility form)."""
    return (
        "marconi: requests=%d evicting_requests=%d matches=%d state_hits=%d hit_tokens=%d branch_checkpoints=%d "
        "last_token_checkpoints=%d input_end_checkpoints=%d anchor_checkpoints=%d state_evictions=%d leaf_evictions=%d evicted_tokens=%d alpha=%.3f "
        "order=%s"
        % (
            values["marconi_requests_finished"],
            values["marconi_requests_evicting"],
            values["marconi_matches"],
            values["marconi_state_hits"],
            values["marconi_hit_tokens"],
            values["marconi_branch_checkpoints"],
            values["marconi_last_token_checkpoints"],
            values["marconi_input_end_checkpoints"],
            values["marconi_anchor_checkpoints"],
            values["marconi_state_evictions"],
            values["marconi_leaf_evictions"],
            values["marconi_evicted_tokens"],
            values["marconi_alpha"],
            order,
        )
    )


class MarconiMetrics:
    """Prometheus gauges (None when metrics are off) + the periodic log line."""

    def __init__(self, labels: Optional[Dict[str, str]] = None, enable_prometheus: bool = False,
                 log_every: Optional[int] = None):
        self.labels = labels or {}
        self.log_every = int(os.environ.get("MARCONI_LOG_EVERY", "50")) if log_every is None else log_every
        self.gauges = None
        if enable_prometheus:
            try:
                from prometheus_client import Gauge  # after PROMETHEUS_MULTIPROC_DIR is set

                names = sorted(self.labels)
                self.gauges = {
                    n: Gauge(n, h, labelnames=names, multiprocess_mode="mostrecent") for n, h in GAUGES.items()
                }
            except Exception as e:  # metrics must never stop serving
                logger.warning("marconi: Prometheus gauges unavailable (%s)", e)
                self.gauges = None

    def update(self, cache, *, finished: bool = True) -> None:
        values = snapshot(cache)
        if self.gauges is not None:
            for n, g in self.gauges.items():
                (g.labels(**self.labels) if self.labels else g).set(values[n])
        n = int(values["marconi_requests_finished"])
        if finished and self.log_every > 0 and n % self.log_every == 0:
            logger.info(log_line(values, cache.marconi.queue_form))


def attach(cache, server_args=None) -> MarconiMetrics:
    """Wire metrics into a live ``MarconiRadixCache`` (idempotent per cache)."""
    enable = bool(getattr(server_args, "enable_metrics", False))
    labels = {}
    if server_args is not None:
        labels["model_name"] = str(getattr(server_args, "served_model_name", None) or getattr(server_args, "model_path", "") or "")
    metrics = MarconiMetrics(labels=labels, enable_prometheus=enable)
    cache.marconi_metrics = metrics
    cache.marconi_requests_finished = 0
    cache.marconi_requests_evicting = 0
    inner = cache.checkpoint_into_tree
    inner_match = getattr(cache, "match_prefix", None)

    def evictions() -> int:
        c = cache.marconi.counters
        return c.state_evictions + c.leaf_evictions

    def match_prefix(params, *args, **kwargs):
        # a request's first match stamps the eviction count; its finish compares
        req = getattr(params, "req", None)
        if req is not None and getattr(req, "marconi_evictions_at_start", None) is None:
            try:
                req.marconi_evictions_at_start = evictions()
            except AttributeError:  # a request object that takes no attributes: not counted
                pass
        return inner_match(params, *args, **kwargs)

    def checkpoint_into_tree(req, *, up_to: int, **kwargs):
        inner(req, up_to=up_to, **kwargs)
        if req.finished():
            cache.marconi_requests_finished += 1
            start = getattr(req, "marconi_evictions_at_start", None)
            if start is not None and evictions() > start:
                cache.marconi_requests_evicting += 1
            try:
                metrics.update(cache)
            except Exception as e:  # never break the scheduler over a metric
                logger.warning("marconi: metrics update failed: %s", e)

    cache.checkpoint_into_tree = checkpoint_into_tree
    if inner_match is not None:
        cache.match_prefix = match_prefix
    metrics.update(cache, finished=False)
    return metrics
