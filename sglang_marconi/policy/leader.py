"""Follow the leader between two eviction orders, scored by shadow caches.

Recency (the default order) and hit density (``policy/hit_density.py``) win on
different workloads: density keeps many sessions' hit prefixes and wins by
1.5x and more where LRU thrashes (agentic sessions replayed with their recorded
timing, ShareGPT at 10%), recency wins when reuse comes back soon and density's
learned classes are noise. ``utility_form: "leader"`` runs both: two
tensor-free shadow caches (same pools, budgets, admission and policy code; one
per order) replay every finished request, and the live cache evicts in the
order whose shadow has saved the most lately.

:class:`LeaderSelector` is the decision, with no SGLang in it:

* each order's score is its hit tokens with exponential decay over
  ``horizon`` requests (``s <- s * (1 - 1/horizon) + hit``), and the live
  cache's own hits are scored the same way;
* recency -> density when density's shadow has beaten both recency's shadow
  and the live cache by ``margin`` for more than ``hold`` requests in a row
  (a lead that size and that long is not arrival noise on the traces
  measured); the live cache then takes over the density shadow's learned
  tables (what density learned evicting by itself, not under recency);
* density -> recency when recency's shadow beats density's by ``margin``, or
  when the live cache, evicting by density, falls ``guard`` below recency's
  shadow: the shadow's lead did not carry over to the live tree, so density's
  score restarts from recency's (it must build a new lead before it returns).

Starts on recency. Pure logic: the shadows' hits come in through
:meth:`observe`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

RECENCY = "recency"
DENSITY = "density"
EXPERTS = (RECENCY, DENSITY)


@dataclass
class LeaderSelector:
    horizon: float = 400.0  #: requests: the decay of the scores
    margin: float = 0.2  #: the lead that switches orders
    guard: float = 0.05  #: how far the live cache may fall below recency's shadow while on density
    hold: int = 200  #: requests density's lead must hold, in a row, before it takes over
    current: str = RECENCY
    scores: dict = field(default_factory=lambda: {RECENCY: 0.0, DENSITY: 0.0})
    live: float = 0.0
    switches: int = 0
    observed: int = 0
    lead_run: int = 0  #: requests in a row density has led by the margin (on recency)

    def observe(self, shadow_hits: dict, live_hit: float) -> Optional[str]:
        """One finished request: its hit tokens in each shadow and in the live
        cache. Returns the new order when this request switches it."""
        keep = 1.0 - 1.0 / self.horizon
        for e in EXPERTS:
            self.scores[e] = self.scores[e] * keep + shadow_hits[e]
        self.live = self.live * keep + live_hit
        self.observed += 1
        rec, den = self.scores[RECENCY], self.scores[DENSITY]
        want = self.current
        if self.current == RECENCY:
            self.lead_run = self.lead_run + 1 if den > (1.0 + self.margin) * max(rec, self.live) else 0
            if self.lead_run > self.hold:
                want = DENSITY
                self.lead_run = 0
        elif rec > (1.0 + self.margin) * den:
            want = RECENCY
        elif self.live < (1.0 - self.guard) * rec:
            want = RECENCY
            # the shadow's lead did not carry over: density must build a new one
            self.scores[DENSITY] = rec
        if want == self.current:
            return None
        self.current = want
        self.switches += 1
        return want
