"""The evaluation suite: every trace shape × cost profile × budget layout × budget, one command.

    python -m sglang_marconi.replay.suite --half choice|heldout|fresh [--policies lru,sglang,marconi] \\
        [--variant NAME=JSON ...] [--marconi-config JSON] [--profiles paper-7b,qwen3.5-9b] \\
        [--layouts two,one] [--budgets 0.05,0.1,0.25] [--shapes ...] [--jobs 2] [--json OUT] [--quick]

Each shape's trace is loaded once (tokenized traces are cached, see ``loaders``), its
infinite cache replayed once to size the budgets (fractions of the infinite tree's bytes,
per pool for two pools, of KV + states for one byte budget), then every (profile, layout,
budget, policy) replay runs in-process (``runner.replay_one``) in ``--jobs`` forked
workers. Policy choices are made on the ``choice`` half of every shape and reported on
the ``heldout`` half: the two halves are disjoint sessions of the same source (table
below). ``fresh`` is a third slice of the same size after them, for a last check of a
default on sessions neither its choice nor its reports have seen. ``sglang`` has no
single byte budget: it is skipped under ``--layouts one``. ``--shapes outside`` runs four
more shapes no choice was made on (``UNSEEN``); ``--shapes nsampling`` one of them as SGLang
serves ``n`` > 1 (``OUTSIDE``).

The table prints per cell the token hit rate of every policy and each policy ÷ ``lru``
(and ÷ ``sglang`` with two pools), then per policy: the geometric mean ÷ ``lru`` over
all cells, the worst cell, the cells below 0.99× ``lru``, the geometric mean ÷ ``sglang``
over the two-pool cells and the cells below it, the geometric mean of FLOPs saved ÷
``lru``'s, and its replay speed ÷ ``lru``'s (all its requests over all its replays' CPU
time, same run: other processes on the machine do not move it). See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

from .loaders import SOURCE_DEFAULTS, LoadOptions, TraceError, load_trace
from .policies import PolicyError, PolicyOptions
from .runner import ReplayError, _config_overrides, _policies, _variants, infinite_tree, replay_one, resolve_budgets

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PROMPT_FILE = REPO / "examples" / "data" / "system_prompt.txt"


@dataclasses.dataclass(frozen=True)
class Shape:
    """One trace shape: ``--trace`` spec and loader options; the choice half is sessions
    1..``sessions``, the held-out half sessions ``sessions``+1..2·``sessions``, the fresh
    slice 2·``sessions``+1..3·``sessions`` (``--quick``: the first ``quick`` sessions of each)."""

    source: str
    options: dict
    sessions: int
    quick: int
    about: str

    def load_options(self, half: str, quick: bool, seed: int = 0) -> LoadOptions:
        """``seed``: the loader's ``--seed``, which only the SWE-agent shapes' Poisson turn
        gaps read (the seeded synthetic shapes name their own seed in ``source``)."""
        opts = dict(self.options)
        if opts.get("system_prompt", "").startswith("@"):
            opts["system_prompt"] = (REPO / opts["system_prompt"][1:]).read_text(encoding="utf-8")
        return LoadOptions(sessions=self.quick if quick else self.sessions,
                           skip_sessions=self.sessions * HALVES.index(half), seed=seed, **opts)


#: name -> shape. Sizes: one half of the full suite (lru, sglang, marconi; both profiles,
#: layouts, three budgets) takes 10-15 min with --jobs 2 on 2 cores (docs/evaluation.md).
SHAPES: dict[str, Shape] = {
    "sharegpt": Shape("sharegpt", {}, 100, 25, "ShareGPT chats with >= 10 turns (the paper's)"),
    "chat": Shape("sharegpt", {"system_prompt": "@examples/data/system_prompt.txt"}, 100, 25,
                  "ShareGPT behind one shared system prompt"),
    "gsm8k": Shape("gsm8k", {"k": 5}, 400, 100, "GSM8K 5-shot: a shared exemplar prefix, single-turn questions"),
    "swe-poisson": Shape("swe-agent", {}, 40, 10, "SWE-agent trajectories, append-only, Poisson turn gaps"),
    "swe-recorded": Shape("swe-agent", {"swe_arrivals": "recorded"}, 40, 10,
                          "SWE-agent trajectories, append-only, recorded turn gaps"),
    "swe-transform": Shape("swe-agent", {"swe_drop_observations": 5}, 40, 10,
                           "SWE-agent with the paper's transform (only the last 5 observations kept)"),
    "longdoc": Shape("longdoc:0", {"max_tokens": None}, 600, 150,
                     "long shared documents, Mooncake format (synthetic, seed 0)"),
    "toolagent": Shape("toolagent:0", {"max_tokens": None}, 60, 15,
                       "tool-using agent / RAG sessions (synthetic, seed 0)"),
}
#: shapes outside the suite (``--shapes outside``): never chosen on, a check of how a
#: default generalizes (``synthetic.py``: OUTSIDE_SHAPES; every slice of them is unseen)
#: sized as the replay loads them (loaders.SOURCE_DEFAULTS); --quick: a quarter
OUTSIDE: dict[str, Shape] = {
    name: Shape(f"{name}:0", {}, SOURCE_DEFAULTS[name]["sessions"], SOURCE_DEFAULTS[name]["sessions"] // 4, about)
    for name, about in (
        ("multitenant", "chat behind 40 tenants' system prompts (synthetic)"),
        ("bestofn", "best-of-4 sampling of a few-shot prompt, then follow-ups (synthetic)"),
        ("docchat", "multi-turn chat with a popular document (synthetic)"),
        ("compaction", "an agent whose context is compacted every 8 turns (synthetic)"),
        ("nsampling", "bestofn as SGLang serves n = 4: the prompt prefilled alone first (synthetic)"),
    )
}
#: what ``--shapes outside`` runs: the shapes outside the suite that no choice was made on
#: (``nsampling`` came with the rule for requests that decode nothing, which it checks)
UNSEEN = ("multitenant", "bestofn", "docchat", "compaction")
HALVES = ("choice", "heldout", "fresh")  # consecutive slices of each source's sessions
PROFILES = ("paper-7b", "qwen3.5-9b")
LAYOUTS = ("two", "one")
BUDGETS = (0.05, 0.1, 0.25)
DEFAULT_POLICIES = "lru,sglang,marconi"
SLOW_POLICIES = ("marconi",)  # scheduled first: the replays that take longest


# ------------------------------------------------------------------------ jobs


_STATE: dict = {}


def _run_job(job: tuple) -> tuple:
    shape, profile_name, policy, budget = job
    t0 = time.process_time()
    res = replay_one(_STATE["traces"][shape], policy, _STATE["profiles"][profile_name], budget, popts=_STATE["popts"])
    return job, res.metrics, time.process_time() - t0


def _run_all(jobs: list, workers: int, progress) -> list:
    if workers <= 1:
        out = []
        for j in jobs:
            out.append(_run_job(j))
            progress()
        return out
    import concurrent.futures as cf
    import multiprocessing as mp

    from .runner import _job_init, _preload

    _preload()  # import SGLang once, before forking
    out = []
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"), initializer=_job_init,
                                initargs=(None,)) as ex:
        for f in cf.as_completed([ex.submit(_run_job, j) for j in jobs]):
            out.append(f.result())
            progress()
    return out


# ---------------------------------------------------------------------- report


def _geomean(xs: list) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs and all(x > 0 for x in xs) else None


def _ratio(a: float, b: float) -> Optional[float]:
    if b > 0:
        return a / b
    return 1.0 if a == b else None  # both zero: even; a baseline of 0 under a policy above it: no ratio


def cell_ratios(runs: dict) -> dict:
    """Per policy of one cell: hit rate and FLOPs saved ÷ lru's, hit rate ÷ sglang's."""
    out = {}
    for p, m in runs.items():
        r = {}
        if "lru" in runs:
            r["vs_lru"] = _ratio(m["token_hit_rate"], runs["lru"]["token_hit_rate"])
            r["flops_vs_lru"] = _ratio(m["flops_saved"], runs["lru"]["flops_saved"])
        if "sglang" in runs:
            r["vs_sglang"] = _ratio(m["token_hit_rate"], runs["sglang"]["token_hit_rate"])
        out[p] = r
    return out


def summarize(cells: list, policies: list, cpu: dict) -> dict:
    """Per policy over all cells (see the module doc); ``cpu[policy]`` = (requests, replay CPU seconds)."""
    out = {}
    for p in policies:
        rows = [(c, c["ratios"][p]) for c in cells if p in c["ratios"]]
        vs_lru = [(r.get("vs_lru"), c) for c, r in rows if r.get("vs_lru") is not None]
        vs_sg = [r["vs_sglang"] for c, r in rows if r.get("vs_sglang") is not None]
        worst = min(vs_lru, key=lambda x: x[0], default=(None, None))
        req, sec = cpu.get(p, (0, 0.0))
        lreq, lsec = cpu.get("lru", (0, 0.0))
        out[p] = {
            "cells": len(rows),
            "geomean_vs_lru": _geomean([x for x, _ in vs_lru]),
            "worst_vs_lru": worst[0],
            "worst_cell": None if worst[1] is None else cell_label(worst[1]),
            "cells_below_0.99_lru": sum(x < 0.99 for x, _ in vs_lru),
            "geomean_vs_sglang": _geomean(vs_sg),
            "cells_below_sglang": sum(x < 1.0 for x in vs_sg),
            "flops_geomean_vs_lru": _geomean([r.get("flops_vs_lru") for _, r in rows]),
            "requests_per_s": req / sec if sec else None,
            "speed_vs_lru": (req / sec) / (lreq / lsec) if sec and lsec and lreq else None,
        }
    return out


def cell_label(c: dict) -> str:
    return f"{c['shape']} {c['profile']} {c['layout']} {c['frac']:g}"


def _f(x: Optional[float], fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def print_report(console, doc: dict) -> None:
    from rich.table import Table

    policies = doc["policies"]
    others = [p for p in policies if p != "lru"]
    t = Table(title=f"token hit rate, {doc['half']} half" + (" (quick)" if doc["quick"] else "")
                    + (f", --seed {doc['seed']}" if doc.get("seed") else ""))
    for col in ("shape", "profile", "layout", "budget"):
        t.add_column(col)
    for p in policies:
        t.add_column(p, justify="right")
    for p in others:
        t.add_column(f"{p} ÷ lru", justify="right")
    for p in (p for p in others if p != "sglang"):
        t.add_column(f"{p} ÷ sglang", justify="right")
    prev = None
    for c in doc["cells"]:
        if prev is not None and c["shape"] != prev:
            t.add_section()
        prev = c["shape"]
        row = [c["shape"], c["profile"], c["layout"], f"{c['frac']:g}"]
        row += [_f(c["runs"][p]["token_hit_rate"], "{:.2%}") if p in c["runs"] else "-" for p in policies]
        row += [_f(c["ratios"].get(p, {}).get("vs_lru")) for p in others]
        row += [_f(c["ratios"].get(p, {}).get("vs_sglang")) for p in others if p != "sglang"]
        t.add_row(*row)
    console.print(t)
    s = Table(title="per policy over all cells")
    for col in ("policy", "cells", "geomean ÷ lru", "worst ÷ lru", "worst cell", "cells < 0.99× lru",
                "geomean ÷ sglang", "cells < sglang", "FLOPs saved ÷ lru", "req/s ÷ lru"):
        s.add_column(col, justify="left" if col in ("policy", "worst cell") else "right")
    for p in policies:
        m = doc["summary"][p]
        s.add_row(p, str(m["cells"]), _f(m["geomean_vs_lru"], "{:.4f}"), _f(m["worst_vs_lru"], "{:.4f}"),
                  m["worst_cell"] or "-", str(m["cells_below_0.99_lru"]), _f(m["geomean_vs_sglang"], "{:.4f}"),
                  str(m["cells_below_sglang"]), _f(m["flops_geomean_vs_lru"], "{:.4f}"), _f(m["speed_vs_lru"], "{:.2f}"))
    console.print(s)
    console.print(f"wall time {doc['wall_s']:.0f} s ({doc['replay_cpu_s']:.0f} CPU s in {doc['replays']} replays, "
                  f"--jobs {doc['jobs']}); req/s from each replay's CPU time")


# ------------------------------------------------------------------------- run


def _split(flag: str, raw: str, known: Optional[Sequence[str]] = None) -> list:
    out = [x.strip() for x in raw.split(",") if x.strip()]
    if not out:
        raise ReplayError(f"{flag} is empty")
    for x in out:
        if known is not None and x not in known:
            raise ReplayError(f"{flag}: unknown {x!r} (known: {', '.join(known)})")
    return list(dict.fromkeys(out))


def _fracs(raw: str) -> list:
    try:
        out = [float(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise ReplayError(f"--budgets {raw!r}: expected comma-separated fractions") from None
    if not out or any(not (0 < f and math.isfinite(f)) for f in out):
        raise ReplayError(f"--budgets {raw!r}: needs fractions > 0 of the infinite tree")
    return list(dict.fromkeys(out))


def run(args, console=None) -> dict:
    """Everything the command does but printing; returns the JSON document."""
    from rich.progress import Progress

    from ..policy.config import MarconiConfigError
    from ..sglang_backend.factory import resolve_profile

    variants = _variants(args.variant)
    policies = _policies(args.policies, variants)
    if "infinite" in policies:
        raise ReplayError("--policies: infinite is the budget scale, not a policy to compare")
    shapes = _split("--shapes", args.shapes, [*SHAPES, *OUTSIDE, "outside"])
    shapes = list(dict.fromkeys(x for s in shapes for x in (UNSEEN if s == "outside" else [s])))
    profiles = _split("--profiles", args.profiles)  # names or config.json paths, checked by resolve_profile
    layouts = _split("--layouts", args.layouts, LAYOUTS)
    fracs = _fracs(args.budgets)
    if args.jobs < 1:
        raise ReplayError(f"--jobs must be >= 1, got {args.jobs}")
    if args.seed < 0:
        raise ReplayError(f"--seed must be >= 0, got {args.seed}")
    marconi_cfg = _config_overrides("--marconi-config", args.marconi_config) if args.marconi_config else None
    prof = {}
    for name in profiles:
        try:
            prof[name] = resolve_profile(name)
        except MarconiConfigError as e:
            raise ReplayError(f"--profiles: {str(e).removeprefix('marconi config: ')}") from None
    popts = PolicyOptions(marconi_config=marconi_cfg, variants=variants)
    t0 = time.perf_counter()
    traces, shape_docs, jobs = {}, {}, []
    with Progress(console=console, disable=args.no_progress, transient=True) as ui:
        task = ui.add_task("load traces", total=len(shapes))
        for name in shapes:
            sh = SHAPES.get(name) or OUTSIDE[name]
            opt = sh.load_options(args.half, args.quick, args.seed)
            tr = traces[name] = load_trace(sh.source, opt)
            # the infinite tree (KV tokens, states) does not depend on the profile: no eviction, oracle admission
            inf_run = replay_one(tr, "infinite", prof[profiles[0]], None, popts=popts)
            shape_docs[name] = {"source": sh.source, "about": sh.about,
                                "sessions": [opt.skip_sessions + 1, opt.skip_sessions + (opt.sessions or 0)],
                                "options": dict(sh.options), "trace_summary": tr.summary(),
                                "infinite_token_hit_rate": inf_run.metrics["token_hit_rate"], "infinite_tree": {}}
            for pn in profiles:
                inf = shape_docs[name]["infinite_tree"][pn] = infinite_tree(inf_run, prof[pn])
                for layout in layouts:
                    ns = SimpleNamespace(single_budget=layout == "one", cache_gb=None, kv_gb=None, ssm_gb=None,
                                         sweep="frac=" + ",".join(map(str, fracs)), frac=fracs[0])
                    for b in resolve_budgets(ns, inf):
                        jobs += [(name, pn, p, b) for p in policies if not (layout == "one" and p == "sglang")]
            ui.advance(task)
        _STATE.update(traces=traces, profiles=prof, popts=popts)
        # longest first: the slow policy on the longest traces, so the workers finish together
        weight = {n: t.input_tokens for n, t in traces.items()}
        jobs.sort(key=lambda j: (j[2] not in SLOW_POLICIES, -weight[j[0]]))
        task = ui.add_task("replays", total=len(jobs))
        results = _run_all(jobs, min(args.jobs, len(jobs)), lambda: ui.advance(task))
    cells: dict = {}
    cpu: dict = {}
    for (name, pn, p, b), m, sec in results:
        key = (name, pn, "one" if b.single else "two", b.frac)
        c = cells.setdefault(key, {"shape": name, "profile": pn, "layout": key[2], "frac": b.frac,
                                   "budget": {"kv_gb": b.kv_gb, "ssm_gb": b.ssm_gb, "cache_gb": b.cache_gb},
                                   "runs": {}})
        c["runs"][p] = dict(m, replay_cpu_s=round(sec, 3))
        req, s = cpu.get(p, (0, 0.0))
        cpu[p] = (req + m["requests"], s + sec)
    cell_list = [cells[k] for k in sorted(cells, key=lambda k: (shapes.index(k[0]), profiles.index(k[1]),
                                                                layouts.index(k[2]), k[3]))]
    for c in cell_list:
        c["runs"] = {p: c["runs"][p] for p in policies if p in c["runs"]}
        c["ratios"] = cell_ratios(c["runs"])
    return {
        "half": args.half, "quick": args.quick, "seed": args.seed, "policies": policies, "profiles": profiles, "layouts": layouts,
        "budgets": fracs, "marconi_config": marconi_cfg, "variants": dict(variants), "shapes": shape_docs,
        "cells": cell_list, "summary": summarize(cell_list, policies, cpu), "replays": len(jobs),
        "replay_cpu_s": round(sum(s for _, s in cpu.values()), 1),
        "jobs": args.jobs, "wall_s": round(time.perf_counter() - t0, 1),
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sglang_marconi.replay.suite",
                                 description="The evaluation suite: token hit rate of each policy over every trace "
                                             "shape, cost profile, budget layout and budget, with ratios to lru "
                                             "and sglang. See docs/evaluation.md.")
    ap.add_argument("--half", required=True, choices=HALVES,
                    help="choice: sessions policy decisions are made on; heldout: the disjoint sessions reported; "
                         "fresh: the next ones, for a last check")
    ap.add_argument("--policies", default=DEFAULT_POLICIES, help=f"comma-separated (default {DEFAULT_POLICIES})")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="policy marconi:NAME = the marconi policy with these config overrides (repeatable)")
    ap.add_argument("--marconi-config", help="JSON overrides of the marconi policy's config")
    ap.add_argument("--profiles", default=",".join(PROFILES), help=f"cost profiles (default {','.join(PROFILES)})")
    ap.add_argument("--layouts", default=",".join(LAYOUTS),
                    help="two (SGLang's KV + state pools) and/or one (one byte budget); default two,one")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)),
                    help="fractions of the infinite tree's bytes (default 0.05,0.1,0.25)")
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help=f"default the suite's: {','.join(SHAPES)}; also {','.join(OUTSIDE)} "
                         "(or 'outside' for the first four: shapes no choice was made on)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the SWE-agent shapes' Poisson turn gaps (default 0): another draw of their "
                         "arrival times, same sessions; the other shapes do not change")
    ap.add_argument("--jobs", type=int, default=2, help="replays in parallel (forked processes; default 2)")
    ap.add_argument("--json", help="write every cell and the summary here")
    ap.add_argument("--quick", action="store_true", help="a smaller version of each half (smoke checks)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    args = build_parser().parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1)
    except Exception:  # pragma: no cover
        pass
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)
    try:
        doc = run(args, console=Console(stderr=True))
    except (TraceError, ReplayError, PolicyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_report(console, doc)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
