"""Hit density: the eviction rank learned from the cache's own hits and evictions.

An alternative to the paper's fixed-form utility (recency + α·efficiency with α
found by replaying past windows). After LHD (Beckmann, Chen, Cidon, "LHD:
Improving Cache Hit Rate by Maximizing Hit Density", NSDI 2018), each cached
SSM state is ranked by the value it is expected to return per byte and per unit
of time it stays cached:

    score(n) = density(class(n), age(n)) · value(n) / bytes(n)

    density(c, a) =            Σ_{x ≥ a} hits_c(x)
                    ───────────────────────────────────────────
                    Σ_{x ≥ a} (x − a) · (hits_c(x) + evictions_c(x))

``hits_c(x)`` and ``evictions_c(x)`` count the states of class ``c`` that were
hit, or evicted, at age ``x`` (time since their last access; a hit starts a new
lifetime). The numerator is how likely a state that has reached age ``a`` is to
be hit before it is evicted, the denominator how much longer it is expected to
stay cached: the ratio is hits per unit of cache-time, what a byte of cache
earns by keeping this state instead of another. ``value`` is the FLOPs a hit
saves (or its tokens), ``bytes`` what evicting the state frees.

Classes are what the cache can observe about a state when it is scored: its
prefix length (log₂ buckets; on agent traces the context length predicts the end
of a session, on chat traces which conversations continue), whether the node
has children (a state a longer sequence has already run past is rarely hit
again) and, with ``density_reuse``, whether the state was hit before (a
shared prefix's state is hit again and again; an agent's branch point, made
when the next turn edits its history, is hit once by the turn after and then
never: the turn after that branches deeper). Ages are binned on a log scale.
Counts decay geometrically every ``period`` events so the estimate follows a
changing workload; until a class has
``MIN_EVENTS`` events it uses the pooled estimate of all classes, and until any
has, the rank is plain recency (LRU).

Nothing here is tuned to a trace: the two rates are the only knobs, and the
statistics come from the live cache itself (the replay driver runs the same
code), so there is no window replay, no α, and no tuner process.
"""

from __future__ import annotations

import math
from typing import Optional

#: Log-spaced age bins: this many per doubling of age.
BINS_PER_OCTAVE = 4
#: Number of age bins (ages beyond the last bin fall into it): 2^24 clock ticks.
N_BINS = 24 * BINS_PER_OCTAVE
#: Prefix-length buckets: floor(log2(end)), capped.
LENGTH_BUCKETS = 24
#: Events a class needs before its own estimate replaces the pooled one.
MIN_EVENTS = 8.0


def _bin_lo(b: int) -> float:
    return 2.0 ** (b / BINS_PER_OCTAVE) - 1.0


#: Width of each age bin (ticks) and its representative age (midpoint).
BIN_WIDTH = tuple(_bin_lo(b + 1) - _bin_lo(b) for b in range(N_BINS))
BIN_MID = tuple(0.5 * (_bin_lo(b) + _bin_lo(b + 1)) for b in range(N_BINS))


def age_bin(age: float) -> int:
    if age <= 0:
        return 0
    return min(int(math.log2(1.0 + age) * BINS_PER_OCTAVE), N_BINS - 1)


def state_class(end: int, has_children: bool, reused: bool = False) -> int:
    """Class of a cached state: prefix-length bucket × has-children (× was-hit-before,
    with ``reused``; classes without it keep their ids)."""
    bucket = min(max(end, 1).bit_length() - 1, LENGTH_BUCKETS - 1)
    return 2 * bucket + (1 if has_children else 0) + (2 * LENGTH_BUCKETS if reused else 0)


def density_table(hits: list, evictions: list) -> list:
    """Hit density per age bin from per-bin event counts (the formula above).

    Lifetimes are measured from each bin's midpoint with the bin widths, so
    log-spaced bins weigh long remaining lifetimes correctly."""
    n = len(hits)
    out = [0.0] * n
    hits_above = 0.0  # Σ_{x ≥ a} hits(x)
    events_above = 0.0  # Σ_{x ≥ a} events(x)
    weighted_above = 0.0  # Σ_{x ≥ a} mid(x) · events(x)
    for b in range(n - 1, -1, -1):
        ev = hits[b] + evictions[b]
        hits_above += hits[b]
        events_above += ev
        weighted_above += BIN_MID[b] * ev
        # Σ (x − a)·events over x ≥ a, with a at this bin's lower edge; an event
        # in the same bin counts half its width, so the life is never 0.
        life = weighted_above - _bin_lo(b) * events_above
        out[b] = hits_above / life if life > 0 else 0.0
    return out


class HitDensity:
    """Per-class hit/eviction histograms over age and the density tables built from them."""

    def __init__(self, period: int = 32, decay: float = 0.98):
        if period < 1:
            raise ValueError(f"hit density: period={period!r} must be >= 1")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"hit density: decay={decay!r} must be in (0, 1]")
        self.period = period
        self.decay = decay
        self._hits: dict[int, list] = {}
        self._evictions: dict[int, list] = {}
        self._tables: dict[int, list] = {}
        self._pooled: Optional[list] = None
        self._since = 0
        self.events = 0  # hits + evictions recorded so far

    def record(self, cls: int, age: float, hit: bool) -> None:
        """A state of class ``cls`` was hit (``hit``) or evicted at ``age``."""
        book = self._hits if hit else self._evictions
        row = book.get(cls)
        if row is None:
            row = book[cls] = [0.0] * N_BINS
            other = self._evictions if hit else self._hits
            other.setdefault(cls, [0.0] * N_BINS)
        row[age_bin(age)] += 1.0
        self.events += 1
        self._since += 1
        if self._since >= self.period:
            self.recompute()

    def recompute(self) -> None:
        """Rebuild the tables from the counts, then age the counts."""
        self._since = 0
        pooled_h = [0.0] * N_BINS
        pooled_e = [0.0] * N_BINS
        tables: dict[int, list] = {}
        for cls, h in self._hits.items():
            e = self._evictions[cls]
            for b in range(N_BINS):
                pooled_h[b] += h[b]
                pooled_e[b] += e[b]
            if sum(h) + sum(e) >= MIN_EVENTS:
                tables[cls] = density_table(h, e)
        self._tables = tables
        self._pooled = density_table(pooled_h, pooled_e) if sum(pooled_h) + sum(pooled_e) > 0 else None
        if self.decay < 1.0:
            for book in (self._hits, self._evictions):
                for row in book.values():
                    for b in range(N_BINS):
                        row[b] *= self.decay

    @property
    def learned(self) -> bool:
        return self._pooled is not None

    def density(self, cls: int, age: float) -> float:
        """Expected hits per tick of cache-time of a state of class ``cls`` at ``age``;
        ``1 / (1 + age)`` (recency) before anything was learned."""
        table = self._tables.get(cls) or self._pooled
        if table is None:
            return 1.0 / (1.0 + max(age, 0.0))
        return table[age_bin(age)]


__all__ = ["HitDensity", "age_bin", "density_table", "state_class"]
