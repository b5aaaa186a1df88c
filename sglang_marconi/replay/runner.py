"""Replay a trace through each policy at each budget, one request at a time in arrival order.

    python -m sglang_marconi.replay --trace SOURCE --model PROFILE \\
        --policies marconi,sglang,lru,vllm,infinite \\
        [--kv-gb X --ssm-gb Y | --cache-gb Z --single-budget] [--sweep KEY=V1,V2,...] \\
        [--json OUT.json] [--plot OUT.png]

See ``sglang_marconi/replay/README.md`` for sources, budgets and metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Optional, Sequence

from .bounds import LiveHitProbe, session_next_use
from .loaders import SWE_ARRIVALS, LoadOptions, Trace, TraceError, load_trace, source_defaults_help
from . import routing
from .policies import (
    MARCONI_DEFAULT_CONFIG, POLICIES, Budget, PolicyError, PolicyOptions, TraceShape, build_policy, close,
)
from .routing import FleetOptions, RoutingError, build_fleet

DEFAULT_POLICIES = ("marconi", "sglang", "lru", "vllm", "infinite")
DEFAULT_FRAC = 0.1
TTFT_A_MS = 17.8  # Jamba-1.5-Mini prefill profile fitted in the paper notes
TTFT_B_MS = 0.053


class ReplayError(ValueError):
    """Bad command-line options (message says which)."""


# ------------------------------------------------------------------- one replay


@dataclasses.dataclass
class RunResult:
    policy: str
    budget: Optional[Budget]
    metrics: dict
    ttft_ms: list  # per request, arrival order (for the CDF plot; not in the JSON)
    info: dict
    hits: list = dataclasses.field(default_factory=list)  # per-request hit tokens, arrival order


class _EvictionCounter:
    """Counts what every eviction call removes from the tree (SSM states, KV tokens),
    for any cache: wraps ``evict`` and ``evict_to_bytes`` on the instance."""

    def __init__(self, drv):
        self.drv = drv
        self.states = 0
        self.kv_tokens = 0
        cache = drv.cache
        for meth in ("evict", "evict_to_bytes"):
            orig = getattr(cache, meth, None)
            if orig is not None:
                setattr(cache, meth, self._wrap(orig))

    def _wrap(self, fn):
        drv = self.drv

        def wrapped(*a, **kw):
            kv0, st0 = drv.tree_kv_tokens(), drv.tree_states()
            out = fn(*a, **kw)
            self.kv_tokens += max(0, kv0 - drv.tree_kv_tokens())
            self.states += max(0, st0 - drv.tree_states())
            return out

        return wrapped


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in (0, 100])."""
    if not values:
        return 0.0
    s = sorted(values)
    k = max(1, math.ceil(q / 100.0 * len(s)))
    return s[k - 1]


def replay_one(trace: Trace, policy: str, profile, budget: Optional[Budget], *,
               popts: PolicyOptions = PolicyOptions(), ttft_a_ms: float = TTFT_A_MS, ttft_b_ms: float = TTFT_B_MS,
               progress: Optional[Callable[[int], None]] = None, fleet: Optional[FleetOptions] = None) -> RunResult:
    shape = TraceShape(longest=trace.longest, requests=len(trace.requests), stream_tokens=trace.stream_tokens())
    if fleet is not None:  # --replicas: N caches behind a router (replay.routing)
        built, drv, info = build_fleet(fleet, policy, profile, budget, shape, popts, ttft_a_ms, ttft_b_ms)
        counter = drv.counter
    else:
        built, drv, info = build_policy(policy, profile, budget, shape, popts)
        counter = _EvictionCounter(drv)
    hit_tokens = input_tokens = ssm_hits = states = 0
    flops = 0.0
    ttft: list[float] = []
    hits: list[int] = []
    oracle_state = getattr(built.cache, "marconi", None) if popts.end_oracle else None
    next_use = session_next_use(trace.requests) if oracle_state is not None else []
    probe = _live_probe(trace, profile, budget, info, popts.live_ceiling_every, drv)
    t0 = time.perf_counter()
    try:
        for i, r in enumerate(trace.requests):
            if oracle_state is not None:
                oracle_state.ending_oracle = next_use[i] == len(trace.requests)
            if probe is not None:
                probe.before(i, drv.peek_hit)
            res = drv.route(r) if fleet is not None else drv.run(r.prompt_ids, r.completion_ids)
            if probe is not None:
                probe.after(i)
            hits.append(res.hit_len)
            hit_tokens += res.hit_len
            input_tokens += res.input_len
            ssm_hits += res.hit_len > 0
            states += res.states_admitted
            flops += res.flops_saved
            ttft.append(ttft_a_ms + ttft_b_ms * (res.input_len - res.hit_len))
            if progress is not None and (i & 15) == 15:
                progress(i + 1)
        wall = time.perf_counter() - t0
        if progress is not None:
            progress(len(trace.requests))
        n = len(trace.requests)
        st = getattr(built.cache, "marconi", None)
        m = {
            "policy": policy,
            "kv_gb": None if budget is None else budget.kv_gb,
            "ssm_gb": None if budget is None else budget.ssm_gb,
            "cache_gb": None if budget is None else budget.cache_gb,
            "frac": None if budget is None else budget.frac,
            "kv_budget_tokens": info.get("kv_budget_tokens"),
            "state_budget": info.get("state_budget"),
            "token_hit_rate": round(hit_tokens / input_tokens, 6) if input_tokens else 0.0,
            "ssm_hits": ssm_hits,
            "flops_saved": flops,
            "ttft_p50_ms": round(percentile(ttft, 50), 3),
            "ttft_p95_ms": round(percentile(ttft, 95), 3),
            "requests": n,
            "input_tokens": input_tokens,
            "hit_tokens": hit_tokens,
            "states_admitted_per_request": round(states / n, 4) if n else 0.0,
            "evictions": counter.states,
            "kv_tokens_evicted": counter.kv_tokens,
            "final_tree_kv_tokens": drv.tree_kv_tokens(),
            "final_tree_states": drv.tree_states(),
            "alpha": None,
            "alpha_tunings": None,
            "admission": info.get("admission"),
            "replay_requests_per_s": round(n / wall, 1) if wall > 0 else None,
        }
        if probe is not None:
            m.update(probe.summary())
        if fleet is not None:
            m.update(drv.metrics())
        if st is not None and (policy == "marconi" or policy.startswith("marconi:")):
            m["alpha"] = st.alpha
            m["alpha_tunings"] = len(st.tuner.events) if st.tuner is not None else 0
        return RunResult(policy, budget, m, ttft, info, hits)
    finally:
        drv.close() if fleet is not None else close(built)


def _live_probe(trace: Trace, profile, budget: Optional[Budget], info: dict, every: int, drv):
    """The ``--live-ceiling`` probe of one budgeted run (None: off, or a cache it cannot walk)."""
    if not every or budget is None or not drv.can_peek():
        return None  # SGLang's own cache runs on its Rust tree core: no read-only walk there
    kv_bytes = profile.kv_bytes(1)
    if info.get("byte_budget") is not None:
        # one byte budget: every token and every state are paid from it
        return LiveHitProbe(trace.requests, every, info["byte_budget"] / kv_bytes,
                            state_tokens=profile.ssm_state_bytes() / kv_bytes)
    return LiveHitProbe(trace.requests, every, info["kv_budget_tokens"], max_states=info.get("state_budget"))


# --------------------------------------------------------------- parallel runs

_JOB_STATE: dict = {}


def _job_init(queue):
    _JOB_STATE["queue"] = queue
    try:
        import torch

        torch.set_num_threads(1)
    except Exception:  # pragma: no cover
        pass


def _job_run(idx: int, policy: str, budget: Optional[Budget]) -> RunResult:
    s = _JOB_STATE
    q = s.get("queue")
    prog = (lambda done: q.put((idx, done))) if q is not None else None
    return replay_one(s["trace"], policy, s["profile"], budget, popts=s["popts"], ttft_a_ms=s["a"],
                      ttft_b_ms=s["b"], progress=prog, fleet=s.get("fleet"))


def _preload() -> None:
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache  # noqa: F401

    from ..sglang_backend import cache, driver, pools, tuning  # noqa: F401


def run_jobs(trace: Trace, profile, jobs: list[tuple[str, Optional[Budget]]], *, popts: PolicyOptions,
             ttft_a_ms: float, ttft_b_ms: float, workers: int = 1, progress=None,
             fleet: Optional[FleetOptions] = None) -> list[RunResult]:
    """Replay every (policy, budget) job; results in job order (independent of ``workers``).

    ``progress(job_index, done_requests)``. With ``workers > 1`` the jobs run in
    forked processes that share the loaded trace (each job is deterministic on
    its own, so the results do not depend on the scheduling).
    """
    _JOB_STATE.update(trace=trace, profile=profile, popts=popts, a=ttft_a_ms, b=ttft_b_ms, fleet=fleet)
    results: list[Optional[RunResult]] = [None] * len(jobs)
    if workers <= 1 or len(jobs) <= 1:
        for i, (p, b) in enumerate(jobs):
            results[i] = replay_one(trace, p, profile, b, popts=popts, ttft_a_ms=ttft_a_ms, ttft_b_ms=ttft_b_ms,
                                    progress=(lambda d, i=i: progress(i, d)) if progress else None, fleet=fleet)
        return results  # type: ignore[return-value]
    import concurrent.futures as cf
    import multiprocessing as mp
    import queue as queue_mod

    _preload()  # import SGLang once here, not in every forked worker

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    try:
        with cf.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx,
                                    initializer=_job_init, initargs=(q,)) as ex:
            futs = {ex.submit(_job_run, i, p, b): i for i, (p, b) in enumerate(jobs)}
            pending = set(futs)
            while pending:
                done, pending = cf.wait(pending, timeout=0.2)
                while True:
                    try:
                        i, d = q.get_nowait()
                    except queue_mod.Empty:
                        break
                    if progress:
                        progress(i, d)
                for f in done:
                    results[futs[f]] = f.result()
                    if progress:
                        progress(futs[f], len(trace.requests))
    finally:
        q.close()
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------- budgets


def infinite_tree(result: RunResult, profile) -> dict:
    """Size of the infinite cache's tree at the end of the trace (the budget scale)."""
    kv = result.metrics["final_tree_kv_tokens"]
    states = result.metrics["final_tree_states"]
    kv_bytes = profile.kv_bytes(kv)
    st_bytes = states * profile.ssm_state_bytes()
    return {"kv_tokens": kv, "states": states, "kv_gb": kv_bytes / 1e9, "ssm_gb": st_bytes / 1e9,
            "total_gb": (kv_bytes + st_bytes) / 1e9}


def parse_sweep(spec: str) -> tuple[str, list[float]]:
    key, sep, vals = spec.partition("=")
    key = key.strip()
    if not sep or key not in ("frac", "kv-gb", "cache-gb"):
        raise ReplayError(f"--sweep {spec!r}: expected frac=..., kv-gb=... or cache-gb=... (comma-separated numbers)")
    try:
        out = [float(v) for v in vals.split(",") if v.strip()]
    except ValueError:
        raise ReplayError(f"--sweep {spec!r}: values must be numbers") from None
    if not out or any(not (v > 0 and math.isfinite(v)) for v in out):
        raise ReplayError(f"--sweep {spec!r}: needs positive numbers")
    return key, out


def needs_infinite_scale(args) -> bool:
    """Do the budgets depend on the infinite cache's tree size?"""
    if args.sweep:
        key, _ = parse_sweep(args.sweep)
        if key == "frac":
            return True
        if key == "kv-gb":
            return args.kv_gb is None or args.ssm_gb is None
        return False
    if args.single_budget:
        return args.cache_gb is None
    return args.kv_gb is None and args.ssm_gb is None


def resolve_budgets(args, inf: Optional[dict]) -> list[Budget]:
    """The budgets to replay, from --kv-gb/--ssm-gb/--cache-gb/--single-budget/--sweep/--frac."""
    single = args.single_budget
    if args.cache_gb is not None and not single:
        raise ReplayError("--cache-gb is a single byte budget: add --single-budget (or use --kv-gb/--ssm-gb)")
    if single and (args.kv_gb is not None or args.ssm_gb is not None):
        raise ReplayError("--single-budget takes --cache-gb, not --kv-gb/--ssm-gb")
    if (args.kv_gb is None) != (args.ssm_gb is None) and not (args.sweep and args.sweep.startswith("kv-gb")):
        raise ReplayError("give both --kv-gb and --ssm-gb (two pools), or neither (a fraction of the infinite tree)")

    def frac_budget(f: float) -> Budget:
        if single:
            return Budget(cache_gb=round(f * inf["total_gb"], 6), frac=f)
        return Budget(kv_gb=round(f * inf["kv_gb"], 6), ssm_gb=round(f * inf["ssm_gb"], 6), frac=f)

    if args.sweep:
        key, vals = parse_sweep(args.sweep)
        if key == "frac":
            return [frac_budget(v) for v in vals]
        if key == "cache-gb":
            if not single:
                raise ReplayError("--sweep cache-gb=... needs --single-budget")
            return [Budget(cache_gb=v) for v in vals]
        if single:
            raise ReplayError("--sweep kv-gb=... is for two pools; with --single-budget sweep cache-gb=...")
        if args.kv_gb is not None and args.ssm_gb is not None:
            ratio = args.ssm_gb / args.kv_gb
        else:
            ratio = inf["ssm_gb"] / inf["kv_gb"] if inf["kv_gb"] else 0.0
        return [Budget(kv_gb=v, ssm_gb=round(v * ratio, 6)) for v in vals]
    if single:
        return [Budget(cache_gb=args.cache_gb)] if args.cache_gb is not None else [frac_budget(args.frac)]
    if args.kv_gb is not None:
        return [Budget(kv_gb=args.kv_gb, ssm_gb=args.ssm_gb)]
    return [frac_budget(args.frac)]


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m sglang_marconi.replay",
        description="Replay a real trace through Marconi and SGLang's own hybrid cache (and the paper's "
                    "baselines): token hit rate, SSM-state hits, FLOPs saved, modeled TTFT.",
        epilog=source_defaults_help() + "\nThe cuts made are printed with their counts. Docs: docs/replay.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--trace", required=True,
                    help="PATH.jsonl (canonical), sharegpt[:PATH], swe-agent[:PATH.tgz] or gsm8k[:DIR]")
    ap.add_argument("--model", default="paper-7b",
                    help="cost profile: a built-in name or a config.json path (default paper-7b)")
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                    help=f"comma-separated, from {','.join(POLICIES)} (default all)")
    g = ap.add_argument_group("budget")
    g.add_argument("--kv-gb", type=float, help="KV pool budget in GB (two pools)")
    g.add_argument("--ssm-gb", type=float, help="SSM state pool budget in GB (two pools)")
    g.add_argument("--cache-gb", type=float, help="one byte budget over KV + states (with --single-budget)")
    g.add_argument("--single-budget", action="store_true",
                   help="one byte budget (the paper's setup; policies built on MarconiRadixCache only)")
    g.add_argument("--frac", type=float, default=DEFAULT_FRAC,
                   help=f"budget when none is given: this fraction of the infinite cache's tree bytes, "
                        f"per pool (default {DEFAULT_FRAC})")
    g.add_argument("--sweep", help="budgets to replay: frac=F1,F2,... | kv-gb=X1,X2,... (ssm-gb scaled alike) | "
                                   "cache-gb=Z1,Z2,... (with --single-budget)")
    t = ap.add_argument_group("trace")
    t.add_argument("--sessions", type=int,
                   help="first N eligible sessions (default: the source's, below; 0: all)")
    t.add_argument("--skip-sessions", type=int, default=0,
                   help="skip the first N eligible sessions (e.g. the second half of a trace; default 0)")
    t.add_argument("--system-prompt", metavar="TEXT|@FILE",
                   help="sharegpt: put this system message in front of every conversation (a shared-prefix chat "
                        "trace); @FILE reads it from a file")
    t.add_argument("--max-turns", type=int, help="requests per session (default: the source's; 0: all)")
    t.add_argument("--min-turns", type=int, help="leave out sessions with fewer turns (default: the source's)")
    t.add_argument("--max-tokens", type=int,
                   help="cut a session at its first request longer than this, prompt + completion "
                        "(default: the source's; 0: no cut)")
    t.add_argument("--sps", type=float, default=1.0, help="sessions per second: session i starts at i/sps (default 1)")
    t.add_argument("--seed", type=int, default=0, help="seed of the arrival gaps (default 0)")
    t.add_argument("--swe-arrivals", choices=SWE_ARRIVALS, default="poisson",
                   help="swe-agent turn gaps: poisson (exponential, mean 7.5 s, the paper's; default) or recorded "
                        "(the gaps between the trajectory's recorded call timestamps)")
    t.add_argument("--k", type=int, default=5, help="GSM8K exemplars (default 5)")
    t.add_argument("--swe-drop-observations", type=int, metavar="K",
                   help="swe-agent: keep only the last K observations in each prompt (the paper deleted the "
                        "observation 5 rounds back each turn: K=5); default: the trajectories as recorded")
    t.add_argument("--tokenizer", default="qwen3.5", help="qwen3.5 (default), qwen2.5, or a tokenizer.json path")
    t.add_argument("--no-cache", action="store_true", help="do not read or write the tokenized-trace cache")
    p = ap.add_argument_group("policies")
    p.add_argument("--block", type=int, default=32, help="vllm block size in tokens (default 32)")
    p.add_argument("--marconi-config", help="JSON overrides of the marconi policy's config "
                                            "(default: the package defaults, with {\"tuner\": \"inline\"} so an α tuner runs synchronously)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                   help="define policy marconi:NAME = the marconi policy with these config overrides "
                        "(repeatable; list marconi:NAME in --policies, or it is appended)")
    p.add_argument("--end-oracle", action="store_true",
                   help="a bound, not a policy: Marconi policies with ended_first are told which request is each "
                        "session's last and mark its sequence by that instead of by their end predictor")
    p.add_argument("--live-ceiling", type=int, default=0, metavar="K",
                   help="a bound, not a policy: every K-th request, each live session's expected hit in every "
                        "policy's cache and the most any cache of the budget could hold (meaningful with "
                        "i.i.d. exponential turn gaps; see replay.bounds); default off")
    p.add_argument("--sglang-grid", type=int, help="sglang checkpoint grid (default: the cache's mamba_checkpoint_grid)")
    routing.add_arguments(ap)
    o = ap.add_argument_group("output")
    o.add_argument("--ttft-a-ms", type=float, default=TTFT_A_MS, help=f"TTFT model a (default {TTFT_A_MS} ms)")
    o.add_argument("--ttft-b-ms", type=float, default=TTFT_B_MS,
                   help=f"TTFT model b per uncached token (default {TTFT_B_MS} ms)")
    o.add_argument("--json", help="write the results as JSON here")
    o.add_argument("--plot", help="write hit rate vs budget and the TTFT CDF here (PNG)")
    o.add_argument("--jobs", type=int, default=1, help="replays run in parallel (forked processes; default 1)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--no-timing", action="store_true",
                   help="leave replay speed out of the JSON (null), so equal inputs give byte-identical JSON")
    return ap


def _config_overrides(flag: str, raw: str) -> dict:
    """A JSON object of Marconi config overrides from ``flag``, validated (one-line errors)."""
    from ..policy.config import MarconiConfigError, parse_config

    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ReplayError(f"{flag}: not JSON ({e.msg}): {raw!r}") from None
    if not isinstance(cfg, dict):
        raise ReplayError(f"{flag}: must be a JSON object, got {raw!r}")
    try:
        parse_config({**MARCONI_DEFAULT_CONFIG, **cfg})
    except MarconiConfigError as e:
        raise ReplayError(f"{flag}: {str(e).removeprefix('marconi config: ')}") from None
    return cfg


def _variants(specs: Sequence[str]) -> tuple:
    """``--variant NAME=JSON`` → ((name, config dict), ...), validated."""
    out: dict = {}
    for spec in specs:
        name, sep, raw = spec.partition("=")
        name = name.strip()
        if not sep or not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ReplayError(f"--variant {spec!r}: expected NAME=JSON with a name of letters, digits, '-', '_', '.'")
        if name in out:
            raise ReplayError(f"--variant {name!r} is given twice")
        out[name] = _config_overrides(f"--variant {name}", raw)
    return tuple(out.items())


def _policies(spec: str, variants: tuple = ()) -> list[str]:
    out = []
    from .variants import VARIANTS

    names = {f"marconi:{n}" for n, _ in variants} | {f"marconi:{n}" for n in VARIANTS}
    for p in (x.strip() for x in spec.split(",")):
        if not p:
            continue
        if p not in POLICIES and p not in names:
            raise ReplayError(f"--policies: unknown policy {p!r} (known: {', '.join(POLICIES)}"
                              + (f", {', '.join(sorted(names))}" if names else "") + ")")
        if p not in out:
            out.append(p)
    for n in (f"marconi:{v}" for v, _ in variants):  # variants not listed run too, in --variant order
        if n not in out:
            out.append(n)
    if not out:
        raise ReplayError("--policies is empty")
    return out


def run(args, *, console=None) -> dict:
    """Everything the CLI does except printing; returns the JSON document."""
    from ..policy.config import MarconiConfigError
    from ..sglang_backend.factory import resolve_profile
    from . import report

    variants = _variants(args.variant)
    policies = _policies(args.policies, variants)
    if args.block < 1:
        raise ReplayError(f"--block must be >= 1, got {args.block}")
    if not (args.frac > 0):
        raise ReplayError(f"--frac must be > 0, got {args.frac}")
    marconi_cfg = _config_overrides("--marconi-config", args.marconi_config) if args.marconi_config else None
    try:
        profile = resolve_profile(args.model)
    except MarconiConfigError as e:
        raise ReplayError(f"--model: {str(e).removeprefix('marconi config: ')}") from None
    if args.live_ceiling < 0:
        raise ReplayError(f"--live-ceiling must be an integer >= 1 (0: off), got {args.live_ceiling}")
    fleets = routing.fleet_options(args)
    if args.end_oracle and not any(p == "marconi" or p.startswith("marconi:") for p in policies):
        raise ReplayError(f"--end-oracle acts on marconi policies only; --policies {args.policies!r} has none")
    if args.single_budget and "sglang" in policies:
        raise ReplayError(
            "--single-budget: policy sglang is SGLang's two-pool cache (KV tokens, SSM states) and has no single "
            "byte budget; replay it with --kv-gb/--ssm-gb, or drop it from --policies"
        )
    system_prompt = args.system_prompt
    if system_prompt is not None and system_prompt.startswith("@"):
        try:
            with open(system_prompt[1:], encoding="utf-8") as f:
                system_prompt = f.read()
        except OSError as e:
            raise ReplayError(f"--system-prompt {args.system_prompt}: cannot read ({e.strerror})") from None
    opt = LoadOptions(
        skip_sessions=args.skip_sessions, system_prompt=system_prompt,
        sessions=args.sessions, max_turns=args.max_turns, max_tokens=args.max_tokens,
        min_turns=args.min_turns,
        sps=args.sps, seed=args.seed, k=args.k, tokenizer=args.tokenizer,
        swe_drop_observations=args.swe_drop_observations, swe_arrivals=args.swe_arrivals,
    )
    ui = report.Progress(enabled=not args.no_progress, console=console)
    with ui:
        trace = load_trace(args.trace, opt, use_cache=not args.no_cache, progress=ui.load_progress)
        popts = PolicyOptions(block=args.block, marconi_config=marconi_cfg, sglang_grid=args.sglang_grid,
                              variants=variants, end_oracle=args.end_oracle,
                              live_ceiling_every=args.live_ceiling)
        common = dict(popts=popts, ttft_a_ms=args.ttft_a_ms, ttft_b_ms=args.ttft_b_ms)
        inf_result = None
        inf = None
        if needs_infinite_scale(args) or "infinite" in policies:
            ui.add_jobs(["infinite (budget scale)" if "infinite" not in policies else "infinite"], len(trace.requests))
            inf_result = run_jobs(trace, profile, [("infinite", None)], workers=1, progress=ui.job_progress(0), **common)[0]
            inf = infinite_tree(inf_result, profile)
        budgets = resolve_budgets(args, inf)
        jobs = [(p, b) for b in budgets for p in policies if p != "infinite"]
        results = []
        for fleet in fleets:  # one pass per --router (a single pass, fleet None, without --replicas)
            tag = "" if fleet is None else f" ×{fleet.replicas} {fleet.router}"
            base = ui.add_jobs([f"{p}{tag} @ {b.label()}" for p, b in jobs], len(trace.requests))
            results += run_jobs(trace, profile, jobs, workers=max(1, args.jobs), progress=ui.job_progress(base),
                                fleet=fleet, **common)
    if inf_result is not None and "infinite" in policies:
        results.append(inf_result)
    doc = report.build_json(args, trace, profile, results, inf, timing=not args.no_timing)
    return {"doc": doc, "results": results, "trace": trace, "profile": profile, "budgets": budgets}


def main(argv: Optional[Sequence[str]] = None) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    args = build_parser().parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1)  # tiny tensor ops only; also keeps forked workers safe
    except Exception:  # pragma: no cover
        pass
    from rich.console import Console

    from . import report

    console = Console(stderr=False, width=None if sys.stdout.isatty() else 160)
    try:
        out = run(args, console=Console(stderr=True))
    except (TraceError, ReplayError, PolicyError, RoutingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report.print_table(console, out["doc"], out["results"])
    if args.json:
        text = report.dumps(out["doc"])
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text)
        console.print(f"wrote {args.json}")
    if args.plot:
        report.plot(args.plot, out["doc"], out["results"])
        console.print(f"wrote {args.plot}")
    return 0


__all__ = ["main", "run", "replay_one", "run_jobs", "resolve_budgets", "percentile", "RunResult"]
