"""Progress bar, the results table, the JSON document and the plot of a replay."""

from __future__ import annotations

import json
import math
from typing import Optional

from .loaders import cut_line

#: Paper figures (arXiv 2411.19379) printed beside ours.
PAPER = {
    "vs_vllm_token_hit_rate": {"lmsys": 4.5, "sharegpt": 7.3, "swe-bench": 34.4},
    "vs_sglang_plus_p95_gain": {"lmsys": 0.456, "sharegpt": 0.190, "swe-bench": 2.197},
}


# ----------------------------------------------------------------------- progress


class Progress:
    """A rich progress bar (stderr): one line for loading, one per replay job."""

    def __init__(self, enabled: bool = True, console=None):
        self.enabled = enabled
        self.console = console
        self._p = None
        self._load_task = None
        self._tasks: list = []

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._p = RichProgress(
                TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), console=self.console, transient=False,
            )
            self._p.__enter__()
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)
            self._p = None
        return False

    def load_progress(self, stage: str, done: int, total: int) -> None:
        if self._p is None:
            return
        if self._load_task is None:
            self._load_task = self._p.add_task("load trace", total=total)
        self._p.update(self._load_task, description=f"load trace: {stage}", completed=done, total=total)

    def add_jobs(self, names, total: int) -> int:
        base = len(self._tasks)
        for n in names:
            self._tasks.append(self._p.add_task(n, total=total) if self._p is not None else None)
        return base

    def job_progress(self, base: int):
        def cb(i: int, done: int) -> None:
            if self._p is not None:
                self._p.update(self._tasks[base + i], completed=done)

        return cb


# --------------------------------------------------------------------------- JSON


def build_json(args, trace, profile, results, inf: Optional[dict], *, timing: bool = True) -> dict:
    a, b = args.ttft_a_ms, args.ttft_b_ms
    no_cache = sorted(a + b * r.prompt_len for r in trace.requests)

    def pct(q):
        k = max(1, math.ceil(q / 100 * len(no_cache)))
        return round(no_cache[k - 1], 3) if no_cache else 0.0

    runs = []
    for r in results:
        m = dict(r.metrics)
        if not timing:
            m["replay_requests_per_s"] = None
        runs.append(m)
    doc = {
        "trace": trace.name,
        "trace_spec": args.trace,
        "model": profile.name,
        "profile": {"kv_bytes_per_token": profile.kv_bytes(1), "ssm_state_bytes": profile.ssm_state_bytes()},
        "trace_summary": trace.summary(),
        "load": {k: v for k, v in trace.meta.items() if k != "cache"},
        "budget_mode": "single" if args.single_budget else "two-pool",
        "infinite_tree": inf,
        "ttft_model": {"a_ms": a, "b_ms_per_token": b, "no_cache_p50_ms": pct(50), "no_cache_p95_ms": pct(95)},
        "runs": runs,
        "ratios": ratios(runs),
    }
    return doc


def _budget_key(m: dict):
    return (m.get("kv_gb"), m.get("ssm_gb"), m.get("cache_gb"), m.get("router"))


def ratios(runs: list) -> list:
    """Per budget: Marconi's token hit rate over each baseline's, and P95 TTFT gains."""
    by_budget: dict = {}
    for m in runs:
        if m["policy"] == "infinite":
            continue
        by_budget.setdefault(_budget_key(m), {})[m["policy"]] = m
    out = []
    for key, pol in by_budget.items():
        for name, mc in pol.items():
            if not (name == "marconi" or name.startswith("marconi:")):
                continue
            row = {"policy": name, "kv_gb": key[0], "ssm_gb": key[1], "cache_gb": key[2], "frac": mc.get("frac")}
            if key[3] is not None:
                row["router"] = key[3]
            for base in ("sglang", "lru", "vllm"):
                if base in pol:
                    bh = pol[base]["token_hit_rate"]
                    row[f"hit_rate_vs_{base}"] = round(mc["token_hit_rate"] / bh, 4) if bh > 0 else None
                    row[f"p95_ttft_reduction_vs_{base}"] = (
                        round(1 - mc["ttft_p95_ms"] / pol[base]["ttft_p95_ms"], 4) if pol[base]["ttft_p95_ms"] else None
                    )
            out.append(row)
    return out


def dumps(doc: dict) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


# -------------------------------------------------------------------------- table


def _fmt_rate(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}×"


def print_table(console, doc: dict, results) -> None:
    from rich.table import Table

    s = doc["trace_summary"]
    console.print(
        f"[bold]{doc['trace']}[/bold] on [bold]{doc['model']}[/bold]: {s['sessions']} sessions, {s['requests']} requests, "
        f"{s['input_tokens']:,} input tokens (mean prompt {s['mean_prompt_tokens']:.0f}, max {s['max_prompt_tokens']}); "
        f"budget mode {doc['budget_mode']}"
    )
    console.print(cut_line(doc["load"]), markup=False, highlight=False, soft_wrap=True)
    inf = doc.get("infinite_tree")
    if inf:
        console.print(
            f"infinite cache tree: {inf['kv_tokens']:,} KV tokens ({inf['kv_gb']:.2f} GB) + {inf['states']:,} states "
            f"({inf['ssm_gb']:.2f} GB)"
        )
    tm = doc["ttft_model"]
    table = Table(title=f"TTFT model {tm['a_ms']} ms + {tm['b_ms_per_token']} ms/uncached token "
                        f"(no cache: p50 {tm['no_cache_p50_ms']:.0f} ms, p95 {tm['no_cache_p95_ms']:.0f} ms)")
    fleet = any("replicas" in r.metrics for r in results)
    cols = [("budget", "left"), ("policy", "left"), ("token hit", "right")]
    if fleet:  # --replicas: each replica's budget; load = max ÷ mean over replicas (requests / input tokens)
        cols += [("replicas × router", "left"), ("load max÷mean req / tok", "right")]
    cols += [("SSM hits", "right"), ("states/req", "right"), ("evicted states", "right"), ("FLOPs saved", "right"),
             ("TTFT p50 ms", "right"), ("TTFT p95 ms", "right"), ("replay req/s", "right")]
    for col, j in cols:
        table.add_column(col, justify=j)
    prev = None
    for r in results:
        m = r.metrics
        label = "∞ (no eviction)" if r.budget is None else r.budget.label()
        if prev is not None and label != prev:
            table.add_section()
        prev = label
        rps = m.get("replay_requests_per_s")
        extra = []
        if fleet:
            extra = (["1 (one cache)", "-"] if "replicas" not in m else
                     [f"{m['replicas']} × {m['router']}",
                      f"{m['load_balance_requests']:.2f} / {m['load_balance_input_tokens']:.2f}"])
        table.add_row(
            label, m["policy"], f"{m['token_hit_rate']:.2%}", *extra, f"{m['ssm_hits']}/{m['requests']}",
            f"{m['states_admitted_per_request']:.2f}", f"{m['evictions']:,}", f"{m['flops_saved']:.3e}",
            f"{m['ttft_p50_ms']:.1f}", f"{m['ttft_p95_ms']:.1f}", "-" if rps is None else f"{rps:,.0f}",
        )
    console.print(table)
    for row in doc["ratios"]:
        budget = (f"{row['cache_gb']:.3g} GB" if row["cache_gb"] is not None
                  else f"{row['kv_gb']:.3g}+{row['ssm_gb']:.3g} GB")
        parts = [f"{row['policy']} ÷ {b}: {_fmt_rate(row.get(f'hit_rate_vs_{b}'))}" for b in ("sglang", "lru", "vllm")
                 if f"hit_rate_vs_{b}" in row]
        p95 = [f"P95 TTFT vs {b} {-row[f'p95_ttft_reduction_vs_{b}']:+.1%}" for b in ("sglang", "lru", "vllm")
               if row.get(f"p95_ttft_reduction_vs_{b}") is not None]
        if not parts:
            continue
        if "router" in row:
            budget += f" × {row['router']}"
        console.print(f"{budget}: token hit rate " + ", ".join(parts) + ("; " + ", ".join(p95) if p95 else ""))
    _print_live_ceiling(console, results)


def _share(part: float, whole: float) -> str:
    return f"{part / whole:.3f}" if whole else "-"


def _print_live_ceiling(console, results) -> None:
    """``--live-ceiling``: each run's expected hit per live session against the
    most any cache of its budget could hold, and both against LRU's."""
    from rich.table import Table

    runs = [r for r in results if r.metrics.get("live_expected_hit") is not None]
    if not runs:
        return
    lru = {r.budget.label(): r.metrics["live_expected_hit"] for r in runs if r.metrics["policy"] == "lru"}
    table = Table(title="expected hit tokens of the next request, per live session (--live-ceiling)")
    for col in ("budget", "policy", "samples", "live sessions", "expected hit", "ceiling", "÷ ceiling",
                "end-blind ceiling", "÷ end-blind", "end-blind whole", "÷ whole", "÷ lru", "ceiling ÷ lru"):
        table.add_column(col, justify="left" if col in ("budget", "policy") else "right")
    for r in runs:
        m = r.metrics
        base = lru.get(r.budget.label())
        e, c, b, w = (m["live_expected_hit"], m["live_hit_ceiling"], m["live_end_blind_ceiling"],
                      m["live_end_blind_whole"])
        table.add_row(r.budget.label(), m["policy"], str(m["live_samples"]), f"{m['live_sessions_mean']:.1f}",
                      f"{e:,.1f}", f"{c:,.1f}", _share(e, c), f"{b:,.1f}", _share(e, b), f"{w:,.1f}", _share(e, w),
                      _share(e, base), _share(c, base))
    console.print(table)
    console.print("end-blind ceiling: the same budget filled by each started session's chance of being alive "
                  "(turn hazard and silence), not knowing which have ended; whole: each session's own tokens kept "
                  "whole or not at all (a reference, not a bound; replay/bounds.py)")


# --------------------------------------------------------------------------- plot


def plot(path: str, doc: dict, results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict = {}
    inf_rate = None
    for r in results:
        m = r.metrics
        if r.budget is None:
            inf_rate = m["token_hit_rate"]
            continue
        series.setdefault(m["policy"], []).append((r.budget.total_gb, m["token_hit_rate"]))
    for pol, pts in series.items():
        pts.sort()
        ax1.plot([x for x, _ in pts], [100 * y for _, y in pts], marker="o", label=pol)
    if inf_rate is not None:
        ax1.axhline(100 * inf_rate, ls="--", color="gray", label="infinite (bound)")
    ax1.set_xlabel("cache budget (GB, KV + SSM states)")
    ax1.set_ylabel("token hit rate (%)")
    ax1.set_title(f"{doc['trace']} / {doc['model']}: hit rate vs budget")
    from matplotlib.ticker import FormatStrFormatter

    if len({x for pts in series.values() for x, _ in pts}) > 1:
        ax1.set_xscale("log")
        ax1.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax1.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax1.grid(alpha=0.3)
    ax1.legend()
    # TTFT CDF at the tightest budget (most pressure), plus no cache and the bound.
    budgets = sorted({r.budget.total_gb for r in results if r.budget is not None})
    tight = budgets[0] if budgets else None
    tm = doc["ttft_model"]
    for r in results:
        if r.budget is not None and r.budget.total_gb != tight:
            continue
        xs = sorted(r.ttft_ms)
        n = len(xs)
        label = r.metrics["policy"] if r.budget is not None else "infinite (bound)"
        ax2.plot(xs, [(i + 1) / n for i in range(n)], label=label, ls="--" if r.budget is None else "-")
    ax2.set_xlabel("modeled TTFT (ms)")
    ax2.set_ylabel("CDF")
    ax2.set_xscale("log")
    ax2.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax2.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax2.set_title(f"TTFT CDF at {tight:.3g} GB ({tm['a_ms']} ms + {tm['b_ms_per_token']} ms/token)"
                  if tight is not None else "TTFT CDF")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["Progress", "build_json", "dumps", "plot", "print_table", "ratios", "PAPER"]
