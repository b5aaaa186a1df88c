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
"""

from __future__ import annotations

import argparse
import math
from typing import Sequence

from .loaders import SWE_ARRIVALS, LoadOptions, Request, TraceError, load_trace

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

        def p_alive(s: str, now: float) -> float:
            r = requests[stamp[s]]
            h = hazard[r.turn // HAZARD_BUCKET]
            live = (1.0 - h) * math.exp(-max(0.0, now - r.arrival_s) / mean_gap)
            return live / (live + h) if live + h > 0 else 0.0

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
                victim = min(resident, key=lambda s: (p_alive(s, r.arrival_s), stamp[s]))
            else:
                victim = max(resident, key=lambda s: next_use[stamp[s]])
            used -= resident.pop(victim)
        resident[sid] = size
        stamp[sid] = i
        used += size
    return hit / total if total else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_marconi.replay.bounds", description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default="swe-agent", help="sharegpt, swe-agent, gsm8k or a .jsonl trace (default swe-agent)")
    ap.add_argument("--sessions", type=int, default=None)
    ap.add_argument("--skip-sessions", type=int, default=0)
    ap.add_argument("--max-turns", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=32768)
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
    opt = LoadOptions(sessions=args.sessions if args.sessions is not None else 100, skip_sessions=args.skip_sessions,
                      max_turns=args.max_turns, max_tokens=args.max_tokens, seed=args.seed,
                      swe_arrivals=args.swe_arrivals)
    try:
        trace = load_trace(args.trace, opt)
    except (TraceError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    tokens = trace.stream_tokens()
    print(f"{trace.name}: {trace.sessions} sessions, {len(trace.requests)} requests, {tokens:,} distinct session tokens")
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
