"""Session-level bounds: how much any eviction policy could gain over LRU on a trace.

``python -m sglang_marconi.replay.bounds --trace swe-agent --sessions 20 ...``

A coarse model of a multi-turn trace in which every turn's prompt extends the
previous turn's prompt + completion (append-only sessions): the cache holds
whole session contexts (a session's committed KV, ``prompt + completion − 1``
tokens) within a KV-token budget, a request hits the whole resident context of
its session, and the session's new context replaces it. Three policies:

* ``lru`` — evict the least recently used session (what the radix caches do at
  this granularity);
* ``end-oracle`` — evict sessions that have *ended* first (knows which request
  is a session's last), then LRU: the most any online policy can gain from
  predicting session ends;
* ``belady`` — evict the session whose next request is farthest in the future,
  and never keep a session's last context (knows every future arrival);
* ``turn-hazard`` — evict the session least likely to be alive: knows, from the
  whole trace, the chance that a request at turn k is its session's last
  (``h(k)``, turns bucketed by ``HAZARD_BUCKET``) and the mean turn gap ``g``,
  and scores a session silent for ``t`` after turn k by
  ``P(alive) = (1-h) e^(-t/g) / ((1-h) e^(-t/g) + h)`` (exponential gaps). The
  most a learned per-turn (or, the same way, per-length) end predictor could add
  to LRU's silence order.

The gap between ``end-oracle`` and ``belady`` is what only knowledge of arrival
order buys; on a trace whose turn gaps are drawn i.i.d. (the SWE-agent loader's
exponential gaps) no online policy can predict it.

The live-hit ceiling (:func:`hit_ceiling`, :class:`LiveHitProbe`; the replay's
``--live-ceiling K``) is a bound on the real cache instead of a model of it.
With i.i.d. exponential turn gaps every live session (started, not ended) is
equally likely to send the next request, so the next request's expected hit is
the mean, over live sessions, of what that session's next prompt would hit in
the cache now. No cache can hold more of that than the best choice of
prefix-closed token sets within its budget: every token shared by ``m`` live
sessions' cacheable prefixes counts ``m`` times, each session's own tokens once,
and (with a per-state cost) each session that keeps any own tokens pays for one
state. That ceiling knows which sessions are live (end knowledge), may cut a
sequence at any token (no node granularity, no missing states) and never leaves
the budget unfilled; a cache reaches it only by being all of those. The probe
measures a policy's own expected hit at the same moments, so ``ceiling ÷ LRU's
expected hit`` bounds the gain any eviction policy can make over LRU there
without knowing the arrival order.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, Optional, Sequence

import numpy as np

from .loaders import SWE_ARRIVALS, LoadOptions, Request, TraceError, cut_line, load_trace, source_defaults_help

POLICIES = ("lru", "end-oracle", "belady", "turn-hazard")
HAZARD_BUCKET = 5  #: turns per bucket of the turn-hazard oracle's end chances


def turn_hazards(requests: Sequence[Request], next_use: Sequence[int]) -> tuple[dict, float]:
    """Per turn bucket, the share of requests that are their session's last; and
    the mean gap between a session's consecutive requests (s)."""
    n = len(requests)
    seen: dict = {}
    ends: dict = {}
    gaps = []
    for i, r in enumerate(requests):
        b = r.turn // HAZARD_BUCKET
        seen[b] = seen.get(b, 0) + 1
        if next_use[i] == n:
            ends[b] = ends.get(b, 0) + 1
        else:
            gaps.append(requests[next_use[i]].arrival_s - r.arrival_s)
    mean_gap = sum(gaps) / len(gaps) if gaps else 1.0
    return {b: ends.get(b, 0) / c for b, c in seen.items()}, max(mean_gap, 1e-9)


def p_alive(hazard: dict, mean_gap: float, last: Request, now: float) -> float:
    """The chance that the session whose latest request is ``last`` sends another,
    silent since: ``(1-h) e^(-t/g) / ((1-h) e^(-t/g) + h)`` with ``h`` its turn
    bucket's end chance and ``g`` the mean turn gap (:func:`turn_hazards`;
    exponential gaps)."""
    h = hazard.get(last.turn // HAZARD_BUCKET, 1.0)
    live = (1.0 - h) * math.exp(-max(0.0, now - last.arrival_s) / mean_gap)
    return live / (live + h) if live + h > 0 else 0.0


def session_next_use(requests: Sequence[Request]) -> list[int]:
    """Per request, the index of the same session's next request
    (``len(requests)``: none, the request is its session's last)."""
    n = len(requests)
    next_use = [n] * n
    last_seen: dict = {}
    for i in range(n - 1, -1, -1):
        sid = requests[i].session_id
        next_use[i] = last_seen.get(sid, n)
        last_seen[sid] = i
    return next_use


def session_hit_rate(requests: Sequence[Request], capacity: float, policy: str) -> float:
    """Token hit rate (hit tokens / prompt tokens) of ``policy`` at ``capacity`` KV tokens."""
    if policy not in POLICIES:
        raise ValueError(f"unknown bound policy {policy!r} (known: {', '.join(POLICIES)})")
    n = len(requests)
    next_use = session_next_use(requests)
    if policy == "turn-hazard":
        hazard, mean_gap = turn_hazards(requests, next_use)

    resident: dict = {}  # session -> cached tokens
    stamp: dict = {}  # session -> index of its last request
    used = 0
    hit = total = 0
    for i, r in enumerate(requests):
        sid = r.session_id
        total += r.prompt_len
        if sid in resident:
            hit += min(resident[sid], r.prompt_len)
            used -= resident.pop(sid)
        size = r.committed_len
        if size > capacity or (policy == "belady" and next_use[i] == n):
            continue
        while used + size > capacity and resident:
            if policy == "lru":
                victim = min(resident, key=stamp.__getitem__)
            elif policy == "end-oracle":
                victim = min(resident, key=lambda s: (next_use[stamp[s]] < n, stamp[s]))
            elif policy == "turn-hazard":
                victim = min(resident, key=lambda s: (p_alive(hazard, mean_gap, requests[stamp[s]], r.arrival_s),
                                                      stamp[s]))
            else:
                victim = max(resident, key=lambda s: next_use[stamp[s]])
            used -= resident.pop(victim)
        resident[sid] = size
        stamp[sid] = i
        used += size
    return hit / total if total else 0.0


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def trie_edges(prefixes: Sequence[np.ndarray]) -> tuple[list[tuple[int, int, list[int]]], list[int]]:
    """The trie of ``prefixes`` (token arrays): ``(start depth, tokens, members)`` for
    every run of trie tokens on two or more of them (``members``: their indices), and
    per prefix how many of its tokens are shared with another (its longest common
    prefix with any other). Tokens past that are its own.

    LCP intervals of the sorted prefixes: sorting puts prefixes that share a
    longer start next to each other, so adjacent common prefixes give the trie.
    """
    n = len(prefixes)
    order = sorted(range(n), key=lambda j: prefixes[j].tobytes())
    lcp = [_lcp(prefixes[order[j - 1]], prefixes[order[j]]) for j in range(1, n)]
    shared = [0] * n
    for j in range(n):
        left = lcp[j - 1] if j > 0 else 0
        right = lcp[j] if j < n - 1 else 0
        shared[order[j]] = max(left, right)
    edges: list[tuple[int, int, list[int]]] = []
    stack = [(0, 0)]  # (common prefix length, first sorted index of the interval)
    for i in range(1, n + 1):
        depth = lcp[i - 1] if i < n else 0
        lb = i - 1
        while depth < stack[-1][0]:
            top_depth, lb = stack.pop()
            parent = max(depth, stack[-1][0])
            edges.append((parent, top_depth - parent, order[lb:i]))  # sorted prefixes lb..i-1 share these
        if depth > stack[-1][0]:
            stack.append((depth, lb))
    return edges, shared


def shared_histogram(prefixes: Sequence[np.ndarray]) -> tuple[list[tuple[int, int]], list[int]]:
    """:func:`trie_edges` as ``(multiplicity, tokens)`` runs, and the shared length per prefix."""
    edges, shared = trie_edges(prefixes)
    return [(len(members), tokens) for _, tokens, members in edges], shared


def hit_ceiling(prefixes: Sequence[np.ndarray], kv_tokens: float, *, state_tokens: float = 0.0,
                max_states: Optional[int] = None) -> float:
    """Most hit tokens, summed over ``prefixes`` (each live session's cacheable
    prefix of its next prompt), that any cache of ``kv_tokens`` KV tokens can
    hold: the budget's tokens taken by how many prefixes run through them.

    ``state_tokens``: one state's bytes in KV tokens, paid from the same budget
    by every prefix that keeps tokens of its own (one byte budget); with
    ``max_states`` at most that many prefixes keep own tokens (a state pool).
    A state where prefixes share tokens only is not charged, so this stays an
    upper bound.
    """
    if state_tokens < 0:
        raise ValueError(f"state_tokens must be >= 0, got {state_tokens}")
    if not prefixes or kv_tokens <= 0:
        return 0.0
    runs, shared = shared_histogram(prefixes)
    runs.sort(reverse=True)
    value = 0.0
    room = math.floor(kv_tokens)
    for mult, tokens in runs:  # most-shared first: along any path multiplicity only falls
        take = min(tokens, room)
        value += mult * take
        room -= take
        if room <= 0:
            return value
    own = sorted((len(p) - s for p, s in zip(prefixes, shared)), reverse=True)
    if max_states is not None:
        own = own[: max(0, max_states)]
    best = 0.0
    total = 0.0
    for k, length in enumerate(own, start=1):  # k prefixes keep own tokens: the k longest
        total += length
        best = max(best, min(total, math.floor(room - k * state_tokens)))
    return value + best


def weighted_choice(prefixes: Sequence[np.ndarray], weights: Sequence[float], kv_tokens: float, *,
                    state_tokens: float = 0.0, max_states: Optional[int] = None, whole: bool = False) -> list[int]:
    """How many leading tokens of each prefix a cache of ``kv_tokens`` keeps when it
    fills itself by expected value: each trie token is worth the summed ``weights``
    of the prefixes through it, and the most valuable tokens are kept first (along a
    path the worth only falls, so the kept set is prefix-closed). A prefix's own
    tokens open a state (``state_tokens`` of room, at most ``max_states`` states),
    as in :func:`hit_ceiling`. With all weights 1 on the live prefixes it keeps
    what that ceiling counts, up to how the state charges are placed.

    ``whole``: a prefix's own tokens are kept whole or not at all (one state, at its
    end; the next ones in order that fit are tried), as a cache whose sessions keep
    no state inside their own tokens."""
    return _fill(_worth_order(prefixes, weights), len(prefixes), kv_tokens, state_tokens=state_tokens,
                 max_states=max_states, whole=whole)


def _worth_order(prefixes: Sequence[np.ndarray], weights: Sequence[float]) -> list[tuple]:
    """:func:`weighted_choice`'s trie runs, most valuable first: ``(worth, start
    depth, tokens, members, own)``, ``own`` for a prefix's own tokens."""
    if not prefixes:
        return []
    edges, shared = trie_edges(prefixes)
    cands = [(sum(weights[m] for m in members), start, tokens, members, False) for start, tokens, members in edges]
    cands += [(weights[j], shared[j], len(p) - shared[j], [j], True) for j, p in enumerate(prefixes)
              if len(p) > shared[j]]
    cands.sort(key=lambda c: (-c[0], c[1]))
    return cands


def _fill(cands: list[tuple], n: int, kv_tokens: float, *, state_tokens: float, max_states: Optional[int],
          whole: bool) -> list[int]:
    """Keep ``cands`` (:func:`_worth_order`) in order within ``kv_tokens``: the kept
    depth of each of the ``n`` prefixes."""
    depth = [0] * n
    room = math.floor(kv_tokens)
    states = 0
    for weight, start, tokens, members, own in cands:
        if room <= 0 or weight <= 0:
            break
        if depth[members[0]] != start:  # the path to it was not kept whole
            continue
        cost = 0.0
        if own:
            if max_states is not None and states >= max_states:
                continue
            cost = state_tokens
        take = min(tokens, math.floor(room - cost))
        if take <= 0 or (whole and own and take < tokens):
            continue
        room -= take + cost
        states += own
        for m in members:
            depth[m] += take
    return depth


class LiveHitProbe:
    """Every ``every``-th request of a replay, before it runs: each live
    session's expected hit in the cache (``peek(tokens)``: a read-only match)
    and the :func:`hit_ceiling` of the same moment, averaged over the sessions
    live then; :meth:`summary` averages both over the samples.

    Also the **end-blind ceiling**: what the live sessions would hit in a cache
    that does not know which sessions have ended. It fills the same budget with
    every started session's context (its latest request's committed tokens), each
    weighted by its chance of being alive (:func:`p_alive`, with the turn hazard
    and mean gap known from the whole trace), by :func:`weighted_choice`. With
    i.i.d. gaps the next request comes from any live session alike, so that is
    the most expected value a cache can pick from what a session's turn and
    silence tell; the ceiling's own surplus over it is what end knowledge buys.
    The same fill with each session's own tokens kept whole (``whole``: no state
    inside them) is a reference, not a bound: it shows how much of the rest comes
    from cutting a session's context short at a state inside it."""

    def __init__(self, requests: Sequence[Request], every: int, kv_tokens: float, *, state_tokens: float = 0.0,
                 max_states: Optional[int] = None):
        if every < 1:
            raise ValueError(f"live-hit probe: every must be >= 1, got {every}")
        self.requests = requests
        self.every = every
        self.kv_tokens = kv_tokens
        self.state_tokens = state_tokens
        self.max_states = max_states
        self.next_use = session_next_use(requests)
        self.hazard, self.mean_gap = turn_hazards(requests, self.next_use)
        self.latest: dict = {}  # session -> index of its latest request so far
        self._arrays: dict = {}
        self.samples = 0
        self.expected = 0.0
        self.ceiling = 0.0
        self.blind = 0.0
        self.blind_whole = 0.0
        self.live = 0

    def _tokens(self, r: Request) -> np.ndarray:
        a = self._arrays.get(id(r.stream))
        if a is None:
            a = self._arrays[id(r.stream)] = np.asarray(r.stream, dtype=np.int64)
        return a

    def cacheable(self, last: Request, nxt: Request) -> np.ndarray:
        """What of ``nxt``'s matchable prompt (all but its last token) ``last`` left in a cache."""
        a = self._tokens(last)[: last.committed_len]
        b = self._tokens(nxt)[: max(nxt.prompt_len - 1, 0)]
        n = min(len(a), len(b)) if last.stream is nxt.stream else _lcp(a, b)
        return b[:n]

    def before(self, i: int, peek: Callable[[Sequence[int]], int]) -> None:
        if i == 0 or i % self.every:
            return
        n = len(self.requests)
        live = [j for j in self.latest.values() if self.next_use[j] < n]
        if not live:
            return
        hits = 0
        prefixes = []
        for j in live:
            nxt = self.requests[self.next_use[j]]
            hits += peek(nxt.prompt_ids[:-1])
            prefixes.append(self.cacheable(self.requests[j], nxt))
        ceiling = hit_ceiling(prefixes, self.kv_tokens, state_tokens=self.state_tokens, max_states=self.max_states)
        self.samples += 1
        self.expected += hits / len(live)
        self.ceiling += ceiling / len(live)
        blind, whole = self._end_blind(i, live, prefixes)
        self.blind += blind / len(live)
        self.blind_whole += whole / len(live)
        self.live += len(live)

    def _end_blind(self, i: int, live: list[int], cacheable: list[np.ndarray]) -> tuple[float, float]:
        """The live sessions' hits in the end-blind cache at request ``i`` (class doc):
        cut anywhere, and with each session's own tokens kept whole."""
        now = self.requests[i].arrival_s
        started = list(self.latest.values())
        contexts = [self._tokens(self.requests[j])[: self.requests[j].committed_len] for j in started]
        weights = [p_alive(self.hazard, self.mean_gap, self.requests[j], now) for j in started]
        order = _worth_order(contexts, weights)  # one trie for both fills
        out = []
        for whole in (False, True):
            kept = dict(zip(started, _fill(order, len(started), self.kv_tokens, state_tokens=self.state_tokens,
                                           max_states=self.max_states, whole=whole)))
            out.append(float(sum(min(kept[j], len(c)) for j, c in zip(live, cacheable))))
        return out[0], out[1]

    def after(self, i: int) -> None:
        self.latest[self.requests[i].session_id] = i

    def summary(self) -> dict:
        k = self.samples
        return {
            "live_samples": k,
            "live_sessions_mean": round(self.live / k, 2) if k else None,
            "live_expected_hit": round(self.expected / k, 2) if k else None,
            "live_hit_ceiling": round(self.ceiling / k, 2) if k else None,
            "live_end_blind_ceiling": round(self.blind / k, 2) if k else None,
            "live_end_blind_whole": round(self.blind_whole / k, 2) if k else None,
        }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_marconi.replay.bounds", description=__doc__.split("\n")[0],
                                 epilog=source_defaults_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default="swe-agent", help="sharegpt, swe-agent, gsm8k or a .jsonl trace (default swe-agent)")
    ap.add_argument("--sessions", type=int, help="first N eligible sessions (default: the source's; 0: all)")
    ap.add_argument("--skip-sessions", type=int, default=0)
    ap.add_argument("--max-turns", type=int, help="requests per session (default: the source's; 0: all)")
    ap.add_argument("--max-tokens", type=int, help="cut a session at its first longer request (default: the source's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the arrival gaps (default 0)")
    ap.add_argument("--swe-arrivals", choices=SWE_ARRIVALS, default="poisson",
                    help="swe-agent turn gaps: poisson (default) or recorded (the trajectories' call timestamps)")
    ap.add_argument("--fracs", default="0.05,0.1,0.25",
                    help="KV budgets as fractions of the trace's distinct session tokens (default 0.05,0.1,0.25)")
    args = ap.parse_args(argv)
    try:
        fracs = [float(x) for x in args.fracs.split(",")]
    except ValueError:
        raise SystemExit(f"error: --fracs {args.fracs!r}: expected comma-separated numbers") from None
    if not fracs or any(not 0 < f for f in fracs):
        raise SystemExit(f"error: --fracs {args.fracs!r}: fractions must be > 0")
    opt = LoadOptions(sessions=args.sessions, skip_sessions=args.skip_sessions,
                      max_turns=args.max_turns, max_tokens=args.max_tokens, seed=args.seed,
                      swe_arrivals=args.swe_arrivals)
    try:
        trace = load_trace(args.trace, opt)
    except (TraceError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    tokens = trace.stream_tokens()
    print(f"{trace.name}: {trace.sessions} sessions, {len(trace.requests)} requests, {tokens:,} distinct session tokens")
    print(cut_line(trace.meta))
    print(f"{'budget':>8} {'lru':>8} {'end-oracle':>11} {'belady':>8} {'turn-hazard':>12}"
          f"   end-oracle/lru  belady/lru  turn-hazard/lru")
    for f in fracs:
        cap = f * tokens
        lru, end, opt_, hz = (session_hit_rate(trace.requests, cap, p) for p in POLICIES)

        def ratio(x: float) -> float:
            return x / lru if lru else 0.0

        print(f"{f:>8g} {lru:>8.2%} {end:>11.2%} {opt_:>8.2%} {hz:>12.2%}"
              f"   {ratio(end):>14.3f}  {ratio(opt_):>10.3f}  {ratio(hz):>15.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
