"""Replay across replicas: N caches of one policy behind a router, in arrival order.

    python -m sglang_marconi.replay ... --replicas 4 --router round_robin,cache_aware,state_aware

Each replica is the policy's cache at the budget the budget flags give (per replica).
Routers (``ROUTERS``):

* ``round_robin`` — request i goes to replica i mod N.
* ``cache_aware`` — SGLang's model gateway (SMG 1.13.0, ``--policy cache_aware``, its
  default) as it ships: an approximate radix tree of the prompts it routed, one tenant per
  replica (gRPC mode: token ids, page-aligned to ``--block-size`` 16); a request whose
  matched share of its prompt exceeds ``cache_threshold`` goes to the least-loaded replica
  among those holding the deepest matched node (random among equal loads), unless the
  spill gate fires (load above ``balance_rel_threshold`` × the mean AND above the mean by the
  margin), then to the least-loaded replica (ties: fewer processed requests, then order);
  any other request goes to the least-loaded replica; the prompt is then inserted for the
  chosen replica. ``SMG`` holds the defaults; ``docs/replicas.md`` says where each comes from.
* ``state_aware`` — the same rule, the matched length of each replica being the hit it would
  really give: the deepest stored SSM state on the request's prefix in that replica's cache
  (``CacheDriver.peek_hit``, a read-only walk). When no replica's hit clears the threshold,
  SMG's tree decides as in ``cache_aware``: a request that shares KV but no state with a
  replica is sent there all the same, where Marconi checkpoints the branch point it creates
  (the state the next request on that prefix hits).
* ``state_only`` — the real hits alone: a request no replica can resume goes to the
  least-loaded replica (the ablation of ``state_aware``'s fallback to the tree).
* ``kv_events`` — SMG's event-driven mode (gRPC workers publishing KV cache events, its
  ``PositionalIndexer``): the replica with the longest cached KV prefix of the prompt wins
  (any overlap, no threshold; ties: lower load, then random), spill gate as above, no overlap:
  the least-loaded replica. The overlap is each replica's real KV prefix
  (``peek_hit(kv=True)``): what SGLang's stock KV events of a Marconi replica tell SMG.
* ``state_events`` — the same event-driven rule, the overlap being the real state hit: what a
  replica publishing only resumable prefixes (a stored state and the KV under it) would tell it.

Load is what SMG counts: requests in flight per replica. A request is in flight from its
arrival for its modeled service time: the replay's TTFT model (a + b · uncached tokens) plus
``tpot_ms`` per output token.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
from typing import Optional, Sequence

ROUTERS = ("round_robin", "cache_aware", "state_aware", "state_only", "kv_events", "state_events")
#: SMG's event-driven mode: the replica with the largest overlap (> 0, no threshold) wins
EVENT_ROUTERS = ("kv_events", "state_events")
TPOT_MS = 20.0  #: modeled decode time per output token (only sets how long a request counts as load)


@dataclasses.dataclass(frozen=True)
class SMG:
    """SMG 1.13.0's cache-aware defaults (``smg/router_args.py`` of the wheel: ``RouterArgs``)."""

    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    block_size: int = 16  #: the token tree's page (gRPC mode)
    max_tree_size: int = 2 ** 26  #: tokens over all tenants; the replay refuses a trace that would need eviction
    spill_margin_floor: int = 4  #: the spill margin's floor (``--balance-abs-threshold`` help text)

    def spill_margin(self, mean_load: float) -> float:
        """The absolute part of the spill gate: capped at the in-flight count's natural swing
        at the mean (two standard deviations), never under 4 unless the threshold is lower."""
        cap = max(2.0 * math.sqrt(mean_load), min(self.spill_margin_floor, self.balance_abs_threshold))
        return min(float(self.balance_abs_threshold), cap)


class RoutingError(ValueError):
    """Bad --replicas / --router (message says which)."""


@dataclasses.dataclass(frozen=True)
class FleetOptions:
    replicas: int = 1
    router: str = "round_robin"
    tpot_ms: float = TPOT_MS
    seed: int = 0
    smg: SMG = SMG()


def parse_routers(spec: str) -> list[str]:
    out: list[str] = []
    for name in (x.strip() for x in spec.split(",")):
        if not name:
            continue
        if name not in ROUTERS:
            raise RoutingError(f"--router: unknown router {name!r} (known: {', '.join(ROUTERS)})")
        if name not in out:
            out.append(name)
    if not out:
        raise RoutingError("--router is empty")
    return out


def add_arguments(ap) -> None:
    g = ap.add_argument_group("replicas")
    g.add_argument("--replicas", type=int, metavar="N",
                   help="replay N caches (each with the budget the budget flags give) behind a router")
    g.add_argument("--router", metavar="R1,R2,...",
                   help=f"with --replicas: routers to compare, from {','.join(ROUTERS)} (default round_robin)")
    g.add_argument("--tpot-ms", type=float, default=TPOT_MS,
                   help=f"with --replicas: modeled decode ms per output token, for the routers' load "
                        f"(requests in flight; default {TPOT_MS})")


def fleet_options(args) -> list[Optional[FleetOptions]]:
    """One FleetOptions per router, or [None] (one cache, no router)."""
    if args.replicas is None:
        if args.router is not None:
            raise RoutingError("--router needs --replicas N")
        return [None]
    if args.replicas < 1:
        raise RoutingError(f"--replicas must be >= 1, got {args.replicas}")
    if not (args.tpot_ms >= 0 and math.isfinite(args.tpot_ms)):
        raise RoutingError(f"--tpot-ms must be >= 0, got {args.tpot_ms}")
    if args.end_oracle or args.live_ceiling:
        raise RoutingError("--end-oracle and --live-ceiling act on one cache; drop them with --replicas")
    return [FleetOptions(args.replicas, r, args.tpot_ms, args.seed) for r in parse_routers(args.router or "round_robin")]


# ------------------------------------------------------------- approximate tree


class _Node:
    __slots__ = ("edge", "children", "tenants")

    def __init__(self, edge: tuple, tenants: set):
        self.edge = edge
        self.children: dict = {}
        self.tenants = tenants


class ApproxTree:
    """SMG's token tree (``kv_index::TokenTree``): a radix tree of the prompts routed, each
    node with the replicas (tenants) whose prompts ran through it, matched and inserted in
    whole pages. No eviction: ``size`` (tokens summed over tenants) must stay under
    ``max_tree_size``, SMG's eviction bound."""

    def __init__(self, page: int, max_size: int):
        self.page = page
        self.max_size = max_size
        self.root = _Node((), set())
        self.size = 0

    def _matched(self, edge: tuple, tokens: tuple, pos: int, end: int) -> int:
        """Tokens of ``edge`` equal to ``tokens[pos:end]``, in whole pages."""
        n = min(len(edge), end - pos)
        if tokens[pos:pos + n] == edge[:n]:
            return n - n % self.page
        m = 0
        p = self.page
        while m + p <= n and tokens[pos + m:pos + m + p] == edge[m:m + p]:
            m += p
        return m

    def match(self, tokens: tuple) -> tuple[int, set]:
        """(matched tokens, tenants of the deepest matched node)."""
        p = self.page
        end = len(tokens) - len(tokens) % p
        node, pos, tenants = self.root, 0, set()
        while pos + p <= end:
            child = node.children.get(tokens[pos:pos + p])
            if child is None:
                break
            m = self._matched(child.edge, tokens, pos, end)
            pos += m
            tenants = child.tenants
            if m < len(child.edge):
                break
            node = child
        return pos, tenants

    def insert(self, tokens: tuple, tenant: int) -> None:
        p = self.page
        end = len(tokens) - len(tokens) % p
        node, pos = self.root, 0
        while pos + p <= end:
            key = tokens[pos:pos + p]
            child = node.children.get(key)
            if child is None:
                leaf = _Node(tokens[pos:end], {tenant})
                node.children[key] = leaf
                self.size += end - pos
                break
            m = self._matched(child.edge, tokens, pos, end)
            if m < len(child.edge):  # split the edge at the page boundary
                upper = _Node(child.edge[:m], set(child.tenants))
                child.edge = child.edge[m:]
                upper.children[child.edge[:p]] = child
                node.children[key] = upper
                child = upper
            if tenant not in child.tenants:
                child.tenants.add(tenant)
                self.size += len(child.edge)
            pos += m
            node = child
        if self.size > self.max_size:
            raise RoutingError(f"cache_aware: the approximate tree holds {self.size:,} tokens, over SMG's "
                               f"max_tree_size {self.max_size:,}; its eviction is not modeled")


# ------------------------------------------------------------------- the fleet


class _Counter:
    def __init__(self, counters):
        self.counters = counters

    @property
    def states(self) -> int:
        return sum(c.states for c in self.counters)

    @property
    def kv_tokens(self) -> int:
        return sum(c.kv_tokens for c in self.counters)


class Fleet:
    """N replicas (built cache, CacheDriver) behind one router. ``route(request)`` picks a
    replica, runs the request there and returns the driver's ``RequestResult``."""

    cache = None  # no single cache: the replay's per-cache extras (α, end oracle) stay off

    def __init__(self, replicas: Sequence[tuple], opts: FleetOptions, ttft_a_ms: float, ttft_b_ms: float):
        from .runner import _EvictionCounter

        self.built = [b for b, _ in replicas]
        self.drivers = [d for _, d in replicas]
        self.opts = opts
        self.counter = _Counter([_EvictionCounter(d) for d in self.drivers])
        self.ttft = (ttft_a_ms, ttft_b_ms)
        n = len(self.drivers)
        self.inflight: list[list[float]] = [[] for _ in range(n)]  # end times (heaps)
        self.processed = [0] * n
        self.input_tokens = [0] * n
        self.hit_tokens = [0] * n
        self.spills = 0
        self.affinity = 0  # requests routed by a match above the cache threshold
        self.rng = random.Random(opts.seed)
        use_tree = opts.router in ("cache_aware", "state_aware")
        self.tree = ApproxTree(opts.smg.block_size, opts.smg.max_tree_size) if use_tree else None
        self.state_routed = 0  # state_aware: requests routed by a real hit above the threshold

    # -- the SMG rule -----------------------------------------------------------
    def _holders(self, prompt: tuple) -> tuple[int, set]:
        """(matched tokens, the replicas that hold them) by this router's score."""
        router = self.opts.router
        if router == "cache_aware":
            return self.tree.match(prompt)
        if router == "kv_events":
            hits = [d.peek_hit(prompt, kv=True) for d in self.drivers]
        else:  # the hit each replica would really give
            hits = [d.peek_hit(prompt[:-1]) for d in self.drivers]
        best = max(hits)
        if router == "state_aware":
            if best / len(prompt) <= self.opts.smg.cache_threshold:
                return self.tree.match(prompt)  # no replica can resume it: SMG's tree decides
            self.state_routed += 1
        return best, ({i for i, h in enumerate(hits) if h == best} if best else set())

    def _select(self, prompt: tuple, loads: list[int]) -> int:
        smg = self.opts.smg
        n = len(loads)
        min_idx = min(range(n), key=lambda i: (loads[i], self.processed[i], i))
        matched, holders = self._holders(prompt)
        threshold = 0.0 if self.opts.router in EVENT_ROUTERS else smg.cache_threshold
        if not prompt or matched / len(prompt) <= threshold or not holders:
            return min_idx
        self.affinity += 1
        low = min(loads[i] for i in holders)
        tied = sorted(i for i in holders if loads[i] == low)
        sel = tied[self.rng.randrange(len(tied))] if len(tied) > 1 else tied[0]
        mean = sum(loads) / n
        if loads[sel] > mean * smg.balance_rel_threshold and loads[sel] > mean + smg.spill_margin(mean):
            self.spills += 1
            return min_idx
        return sel

    def route(self, r):
        now = r.arrival_s
        for h in self.inflight:
            while h and h[0] <= now:
                heapq.heappop(h)
        loads = [len(h) for h in self.inflight]
        prompt = r.prompt_ids
        if self.opts.router == "round_robin":
            idx = sum(self.processed) % len(self.drivers)
        else:
            idx = self._select(prompt, loads)
        if self.tree is not None:
            self.tree.insert(prompt, idx)
        res = self.drivers[idx].run(prompt, r.completion_ids)
        a, b = self.ttft
        busy_ms = a + b * (res.input_len - res.hit_len) + self.opts.tpot_ms * r.completion_len
        heapq.heappush(self.inflight[idx], now + busy_ms / 1000.0)
        self.processed[idx] += 1
        self.input_tokens[idx] += res.input_len
        self.hit_tokens[idx] += res.hit_len
        return res

    # -- the replay's driver interface -------------------------------------------
    def tree_kv_tokens(self) -> int:
        return sum(d.tree_kv_tokens() for d in self.drivers)

    def tree_states(self) -> int:
        return sum(d.tree_states() for d in self.drivers)

    def can_peek(self) -> bool:
        return False

    def metrics(self) -> dict:
        def balance(xs):
            mean = sum(xs) / len(xs)
            return round(max(xs) / mean, 4) if mean else None

        m = {
            "replicas": len(self.drivers),
            "router": self.opts.router,
            "per_replica": [{"requests": q, "input_tokens": t, "hit_tokens": h}
                            for q, t, h in zip(self.processed, self.input_tokens, self.hit_tokens)],
            "load_balance_requests": balance(self.processed),
            "load_balance_input_tokens": balance(self.input_tokens),
            "tpot_ms": self.opts.tpot_ms,
        }
        if self.opts.router != "round_robin":
            m["router_config"] = dataclasses.asdict(self.opts.smg)
            m["affinity_routed"] = self.affinity
            m["spilled"] = self.spills
        if self.tree is not None:
            m["approx_tree_tokens"] = self.tree.size
        if self.opts.router == "state_aware":
            m["state_routed"] = self.state_routed
        return m

    def close(self) -> None:
        from .policies import close

        for b in self.built:
            close(b)


def build_fleet(opts: FleetOptions, policy: str, profile, budget, shape, popts, ttft_a_ms: float, ttft_b_ms: float):
    """(fleet, fleet, info of replica 0): ``opts.replicas`` caches of ``policy`` at ``budget`` each."""
    from .policies import build_policy, close

    if opts.router not in ("round_robin", "cache_aware") and policy == "sglang":
        raise RoutingError(f"--router {opts.router} walks each replica's tree; SGLang's Rust tree core exposes none")
    replicas: list = []
    try:
        for _ in range(opts.replicas):
            built, drv, info = build_policy(policy, profile, budget, shape, popts)
            replicas.append((built, drv))
    except BaseException:
        for b, _ in replicas:
            close(b)
        raise
    fleet = Fleet(replicas, opts, ttft_a_ms, ttft_b_ms)
    return fleet, fleet, info


__all__ = ["ROUTERS", "SMG", "ApproxTree", "Fleet", "FleetOptions", "RoutingError", "add_arguments", "build_fleet",
           "fleet_options", "parse_routers"]
