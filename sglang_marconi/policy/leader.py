"""Follow the leader between eviction orders, scored by shadow caches.

Recency (the default order) and hit density (``policy/hit_density.py``) win on
different workloads: density keeps many sessions' hit prefixes and wins by
1.5x and more where LRU thrashes (agentic sessions replayed with their recorded
timing, ShareGPT at 10%), recency wins when reuse comes back soon and density's
learned classes are noise. Hit density with the reuse classes
(``density_reuse``: states hit before apart from states never hit) wins where
agents edit their history (a branch state is hit once, by the next turn) and
loses to plain density on append-only sessions. ``utility_form: "leader"``
runs them all: tensor-free shadow caches (same pools, budgets, admission and
policy code; one per order) replay every finished request, and the live cache
evicts in the order whose shadow has saved the most lately.

:class:`LeaderSelector` is the decision, with no SGLang in it:

* each order's score is its hit tokens with exponential decay over
  ``horizon`` requests (``s <- s * (1 - 1/horizon) + hit``), and the live
  cache's own hits are scored the same way;
* recency is the base order; a challenger (a density order) takes over when
  its shadow has beaten recency's shadow, the current order's shadow and the
  live cache by ``margin`` for more than ``hold`` requests in a row (a lead
  that size and that long is not arrival noise on the traces measured); if
  several qualify at once, the highest score; the live cache then takes over
  that shadow's learned tables (what it learned evicting by itself);
* a challenger hands back to recency when recency's shadow beats its shadow by
  ``margin``, or when the live cache, evicting by it, falls ``guard`` below
  recency's shadow: the shadow's lead did not carry over to the live tree, so
  that order's score restarts from recency's (it must build a new lead before
  it returns); the guard waits ``guard_grace`` requests after a takeover (the
  live tree was built by the order before and needs that long to reshape).

Starts on recency. Pure logic: the shadows' hits come in through
:meth:`observe`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

RECENCY = "recency"
DENSITY = "density"
DENSITY_REUSE = "density-reuse"
EXPERTS = (RECENCY, DENSITY, DENSITY_REUSE)


@dataclass
class LeaderSelector:
    horizon: float = 400.0  #: requests: the decay of the scores
    margin: float = 0.2  #: the lead that switches orders
    guard: float = 0.05  #: how far the live cache may fall below recency's shadow while on a challenger
    hold: int = 200  #: requests a challenger's lead must hold, in a row, before it takes over
    challengers: tuple = (DENSITY,)  #: the orders besides recency
    current: str = RECENCY
    scores: dict = field(default_factory=dict)
    live: float = 0.0
    switches: int = 0
    observed: int = 0
    lead_runs: dict = field(default_factory=dict)  #: requests in a row each challenger has led by the margin
    guard_grace: int = 0  #: requests after a takeover before the guard applies
    since_switch: int = 0  #: requests observed since the last switch

    def __post_init__(self):
        bad = [c for c in self.challengers if c not in EXPERTS or c == RECENCY]
        if bad or not self.challengers:
            raise ValueError(f"leader: challengers {self.challengers!r} must be among {EXPERTS[1:]}")
        for e in (RECENCY, *self.challengers):
            self.scores.setdefault(e, 0.0)
            if e != RECENCY:
                self.lead_runs.setdefault(e, 0)

    def observe(self, shadow_hits: dict, live_hit: float) -> Optional[str]:
        """One finished request: its hit tokens in each shadow and in the live
        cache. Returns the new order when this request switches it."""
        keep = 1.0 - 1.0 / self.horizon
        for e in self.scores:
            self.scores[e] = self.scores[e] * keep + shadow_hits[e]
        self.live = self.live * keep + live_hit
        self.observed += 1
        self.since_switch += 1
        rec = self.scores[RECENCY]
        bar = (1.0 + self.margin) * max(rec, self.scores[self.current], self.live)
        ready = []
        for c in self.challengers:
            if c == self.current:
                self.lead_runs[c] = 0
                continue
            self.lead_runs[c] = self.lead_runs[c] + 1 if self.scores[c] > bar else 0
            if self.lead_runs[c] > self.hold:
                ready.append(c)
        want = self.current
        if ready:
            want = max(ready, key=lambda c: self.scores[c])
            for c in self.lead_runs:
                self.lead_runs[c] = 0
        elif self.current != RECENCY:
            cur = self.scores[self.current]
            if rec > (1.0 + self.margin) * cur:
                want = RECENCY
            elif self.since_switch > self.guard_grace and self.live < (1.0 - self.guard) * rec:
                want = RECENCY
                # the shadow's lead did not carry over: this order must build a new one
                self.scores[self.current] = rec
        if want == self.current:
            return None
        self.current = want
        self.switches += 1
        self.since_switch = 0
        return want
