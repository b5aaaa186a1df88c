"""Marconi's eviction utility and the priority queue that serves it.

    S(n) = norm(recency(n)) + α · norm(efficiency(n))
    recency(n)    = 1 / (now − last_access(n))            (logical clock)
    efficiency(n) = FLOPs a hit on n saves / bytes n holds (cost model)

``norm`` is min–max over the current candidate set (all ones when the set has
one member or all values are equal), and the candidate with the smallest S is
evicted first.

Normalization and cost: the paper's simulator rescores every candidate after
every eviction (O(N) per evicted entry, O(N²) per eviction call). Here an
eviction *call* takes one snapshot: it scores the N candidates once, computes
the min/max bounds from that snapshot, and heapifies (O(N)); each evicted
entry then costs O(log N). The bounds stay frozen for the rest of the call, so
they are exact for every candidate present at the start. A node that becomes a
candidate during the call (a parent whose last child was just evicted) is
scored against the frozen bounds with its normalized terms clamped to [0, 1]:
its score is off by at most the amount its raw value lies outside the
snapshot's range, it can only be pushed toward the ends it already belongs to,
and it is rescored exactly at the next call. Every evicted entry's recency and
efficiency are computed at the same logical instant, as in the paper, because
the clock advances once per eviction call. SGLang's own full-KV eviction pays
the same O(N) heapify per call.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Optional

from .hit_density import HitDensity



@dataclass
class Candidate:
    """One evictable entry as the policy sees it (no tensors, no tree)."""

    key: Hashable
    last_access: float
    flops_saved: float
    nbytes: int
    #: Hit-density class (``hit_density.state_class``) and the tokens a hit
    #: saves; only ``utility_form="density"`` reads them.
    cls: int = 0
    tokens_saved: int = 0
    #: Predicted dead (a conversation's likely last sequence): the density form
    #: ranks it before every candidate it has a density for (ties by age).
    dead: bool = False
    #: ``utility_form="value"``: the inflation value the node was last stamped
    #: with and its hit frequency (``MarconiState.candidate`` fills both).
    base: float = 0.0
    freq: float = 1.0

    @property
    def efficiency(self) -> float:
        return self.flops_saved / self.nbytes if self.nbytes > 0 else 0.0


def recency(last_access: float, now: float, kind: str = "inverse") -> float:
    """``"inverse"`` (the paper): 1 / (now − last_access), the clock runs ahead of
    every stamp by ≥ 1. ``"linear"``: −(now − last_access), so min–max spreads
    candidates evenly by age instead of crowding every old one near 0."""
    if kind == "linear":
        return -(now - last_access)
    return 1.0 / max(now - last_access, 1.0)


@dataclass(frozen=True)
class Bounds:
    r_min: float
    r_max: float
    e_min: float
    e_max: float

    @staticmethod
    def of(rs: Iterable[float], es: Iterable[float]) -> "Bounds":
        rs, es = list(rs), list(es)
        return Bounds(min(rs), max(rs), min(es), max(es))


def _norm(x: float, lo: float, hi: float) -> float:
    if hi <= lo:
        return 1.0
    return min(max((x - lo) / (hi - lo), 0.0), 1.0)


def utility(r: float, e: float, alpha: float, b: Bounds, form: str = "sum") -> float:
    """``"sum"``: the paper's norm(r) + α·norm(e). ``"product"``: norm(r)·(1 + α·norm(e)),
    efficiency as a bounded bonus on recency: the stalest candidate scores 0 whatever
    its efficiency, so no α keeps a node forever."""
    rn = _norm(r, b.r_min, b.r_max)
    en = _norm(e, b.e_min, b.e_max)
    if form == "product":
        return rn * (1.0 + alpha * en)
    return rn + alpha * en


def utilities(cands: list[Candidate], alpha: float, now: float, form: str = "sum", rec: str = "inverse") -> list[float]:
    """Exact utilities of a candidate set (min–max over exactly these candidates):
    the scores an :class:`EvictionQueue` over the same set orders by."""
    queue = EvictionQueue(cands, alpha, now, form, rec)
    return [queue.score(c) for c in cands]


class EvictionQueue:
    """Min-heap of candidates by utility, bounds frozen at construction.

    Ties break by older last access, then by insertion order, so the order is
    deterministic for equal scores.
    """

    def __init__(self, cands: list[Candidate], alpha: float, now: float, form: str = "sum", rec: str = "inverse",
                 horizon: Optional[float] = None, density: Optional[HitDensity] = None, value: str = "flops",
                 density_rank: str = "full"):
        if form == "density" and density is None:
            raise ValueError("EvictionQueue: utility_form 'density' needs a HitDensity")
        self.density = density
        self.value = value
        self.density_rank = density_rank
        self.alpha = alpha
        self.now = now
        self.form = form
        self.rec = rec
        self.horizon = horizon  # efficiency bonus decays as exp(-age / horizon) (None: no decay)
        self._seq = itertools.count()
        if cands:
            rs = [recency(c.last_access, now, rec) for c in cands]
            es = [c.efficiency for c in cands]
            self.bounds: Optional[Bounds] = Bounds.of(rs, es)
            self._heap = [
                (self._score(r, e, c), c.last_access, next(self._seq), c) for r, e, c in zip(rs, es, cands)
            ]
            heapq.heapify(self._heap)
        else:
            self.bounds = None
            self._heap = []

    def __len__(self) -> int:
        return len(self._heap)

    def _density_score(self, c: Candidate) -> float:
        """Expected value per byte per unit of cache-time (``hit_density``)."""
        if c.dead:
            return -1.0
        if c.nbytes <= 0:
            return 0.0
        value = c.tokens_saved if self.value == "tokens" else c.flops_saved
        score = self.density.density(c.cls, self.now - c.last_access) * value / c.nbytes
        if self.density_rank == "dead_first":
            # 0 (predicted dead) before 1 (everything else); ties go by older access
            return 1.0 if score > 0 else 0.0
        return score

    def _score(self, r: float, e: float, c: Candidate) -> float:
        if self.form == "value":
            return c.base + c.freq * e
        if self.form == "density":
            return self._density_score(c)
        alpha = self.alpha
        if self.horizon and alpha:
            alpha *= math.exp(-max(self.now - c.last_access, 0.0) / self.horizon)
        return utility(r, e, alpha, self.bounds, self.form)

    def score(self, c: Candidate) -> float:
        if self.form == "value":
            return self._score(0.0, c.efficiency, c)
        if self.form == "density":
            return self._density_score(c)
        if self.bounds is None:
            return 1.0 + self.alpha
        return self._score(recency(c.last_access, self.now, self.rec), c.efficiency, c)

    def push(self, c: Candidate) -> None:
        heapq.heappush(self._heap, (self.score(c), c.last_access, next(self._seq), c))

    def pop(self) -> Optional[Candidate]:
        if not self._heap:
            return None
        return heapq.heappop(self._heap)[3]

    def pop_key(self) -> Optional[Hashable]:
        cand = self.pop()
        return None if cand is None else cand.key

    def peek_score(self) -> Optional[float]:
        return self._heap[0][0] if self._heap else None


class ScoredQueue:
    """An :class:`EvictionQueue`'s order over entries the caller has scored:
    ``(score, last_access, rank, key)``, ``rank`` being the entry's place in the
    order the candidates would have been queued in (a node id, for candidates
    queued in node-id order). No :class:`Candidate` is built and no sort is
    needed; an entry pushed later ranks after every initial one, in push order,
    as an :class:`EvictionQueue`'s insertion counter does."""

    #: above every initial rank (node ids count up from 0)
    PUSHED_RANK = 1 << 62

    def __init__(self, entries: list[tuple]):
        self._heap = entries
        heapq.heapify(self._heap)
        self._seq = itertools.count(self.PUSHED_RANK)

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, entry: tuple) -> None:
        score, last_access, _, key = entry
        heapq.heappush(self._heap, (score, last_access, next(self._seq), key))

    def pop_key(self) -> Optional[Hashable]:
        if not self._heap:
            return None
        return heapq.heappop(self._heap)[3]

    def peek_score(self) -> Optional[float]:
        return self._heap[0][0] if self._heap else None


def argmin_utility(cands: list[Candidate], alpha: float, now: float, form: str = "sum",
                   rec: str = "inverse") -> Optional[Any]:
    """Key of the candidate the paper's rule evicts next (exact, O(N))."""
    if not cands:
        return None
    scores = utilities(cands, alpha, now, form, rec)
    best = min(range(len(cands)), key=lambda i: (scores[i], cands[i].last_access, i))
    return cands[best].key
