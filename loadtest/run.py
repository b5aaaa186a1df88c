"""One headless command: the same bounded Locust load against three caches on loopback.

    python loadtest/run.py --users 4 --duration 30s --out loadtest/out

For each of ``marconi`` (``--radix-cache-backend marconi``), ``sglang``
(SGLang's default cache for a hybrid model) and ``disabled``
(``--disable-radix-cache``) it starts the tiny NemotronH CPU server
(sglang_marconi.cpu_serving.launch), runs ``locust --headless`` with
loadtest/locustfile.py (CSV + HTML reports under --out), stops the server,
and finally prints (and writes summary.md) a table with TTFT p50/p95, failed
requests, cached tokens and ratios against ``disabled``. ``--pressure`` serves
every config with the soak's small pools (``launch.PRESSURE_POOL_FLAGS``).
``--replicas 1,2`` instead runs the load through SMG's cache_aware gateway in front of 1, then
2 Marconi replicas (sglang_marconi.cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = {
    "marconi": ["--radix-cache-backend", "marconi"],
    "sglang": [],
    "disabled": ["--disable-radix-cache"],
    # opt-in (--configs): the paper as stated (its alpha tuner, no input-end state)
    "marconi-paper": ["--radix-cache-backend", "marconi", "--radix-eviction-policy-config", '{"variant": "paper"}'],
}
DEFAULT_CONFIGS = ("marconi", "sglang", "disabled")


def run_one(name, extra, model, a, out: Path) -> dict:
    from sglang_marconi.cpu_serving import launch

    pools = launch.PRESSURE_POOL_FLAGS if a.pressure else []
    srv = launch.start_server(model, log_path=out / f"{name}-server.log",
                              extra=["--dtype", "float32", *pools, *extra], ready_timeout=300)
    try:
        return _locust(name, srv.url, a, out)
    finally:
        srv.stop()


def run_replicas(n: int, model, a, out: Path) -> dict:
    """``n`` Marconi replicas behind SMG's cache_aware gateway (sglang_marconi.cluster)."""
    from sglang_marconi import cluster as cl
    from sglang_marconi.cpu_serving import launch

    pools = launch.PRESSURE_POOL_FLAGS if a.pressure else []
    name = f"marconi-x{n}"
    logs = out / f"{name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    cluster = cl.start_cluster(model, n, "cache_aware", logs, server_extra=pools)
    try:
        return _locust(name, cluster.url, a, out)
    finally:
        cluster.stop()


def _locust(name: str, url: str, a, out: Path) -> dict:
    record = out / f"{name}-requests.jsonl"
    record.unlink(missing_ok=True)
    env = {**os.environ, "LOADTEST_RECORD": str(record), "LOADTEST_SEED": str(a.seed)}
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless",
           "-u", str(a.users), "-r", str(a.spawn_rate), "-t", a.duration, "--host", url,
           "--csv", str(out / name), "--html", str(out / f"{name}.html"), "--only-summary",
           "--stop-timeout", "30", "--exit-code-on-error", "0"]
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=str(out), timeout=_seconds(a.duration) + 240)
    rows = [json.loads(x) for x in record.read_text().splitlines()] if record.exists() else []
    out_summary = summarize(rows)
    out_summary["failures"] = failures(out / f"{name}_stats.csv")
    return out_summary


def failures(stats_csv: Path) -> int:
    """Locust's failure count over every request entry (its "Aggregated" row)."""
    import csv

    if not stats_csv.exists():
        return -1
    with open(stats_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("Name") == "Aggregated":
                return int(row.get("Failure Count") or 0)
    return -1


def _seconds(d: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return int(float(d[:-1]) * units[d[-1]]) if d[-1] in units else int(d)


def summarize(rows) -> dict:
    if not rows:
        return {"requests": 0}
    ttft = sorted(r["ttft_ms"] for r in rows)
    prompt = sum(r["prompt_tokens"] or 0 for r in rows)
    cached = sum(r["cached_tokens"] or 0 for r in rows)
    return {
        "requests": len(rows),
        "ttft_p50_ms": statistics.median(ttft),
        "ttft_p90_ms": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
        "ttft_p95_ms": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))],
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_ratio": cached / prompt if prompt else 0.0,
    }


def table(results: dict) -> str:
    """Ratios against ``disabled``, or with --replicas against the first replica count."""
    base_name = "disabled" if "disabled" in results else next(iter(results), "-")
    base = results.get(base_name, {})
    lines = [f"| cache | requests | failed | TTFT p50 ms | TTFT p95 ms | cached/prompt tokens | TTFT p50 vs {base_name} | requests vs {base_name} |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if not r.get("requests"):
            lines.append(f"| {name} | 0 | {r.get('failures', '-')} | - | - | - | - | - |")
            continue
        rt = r["ttft_p50_ms"] / base["ttft_p50_ms"] if base.get("requests") else float("nan")
        rq = r["requests"] / base["requests"] if base.get("requests") else float("nan")
        lines.append(f"| {name} | {r['requests']} | {r.get('failures', '-')} | {r['ttft_p50_ms']:.1f} | {r['ttft_p95_ms']:.1f} | "
                     f"{r['cached_tokens']}/{r['prompt_tokens']} ({r['hit_ratio']:.1%}) | {rt:.2f} | {rq:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--spawn-rate", type=float, default=4)
    ap.add_argument("--duration", default="30s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help=f"comma-separated, from {', '.join(CONFIGS)} (default {','.join(DEFAULT_CONFIGS)})")
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--pressure", action="store_true",
                    help="serve with the soak's small pools (launch.PRESSURE_POOL_FLAGS: 800 KV tokens, "
                         "16 state slots): states and KV leaves evicted on most requests")
    ap.add_argument("--replicas", default=None,
                    help="comma-separated replica counts, e.g. 1,2: instead of --configs, Marconi replicas "
                         "behind SMG's cache_aware gateway (python -m sglang_marconi.cluster), one run per count")
    ap.add_argument("--model-dir", default=None, help="model to serve (default: built from --model-size)")
    ap.add_argument("--model-size", default="small", choices=["tiny", "small"],
                    help="NemotronH preset built when --model-dir is not given (default small: its prefill costs "
                         "real compute here; the tiny model's prefill is as cheap as the scheduler's overhead)")
    a = ap.parse_args(argv)
    unknown = [c for c in a.configs.split(",") if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: --configs: unknown config {unknown[0]!r} (known: {', '.join(CONFIGS)})")
    replicas = []
    for r in (a.replicas.split(",") if a.replicas else []):
        if not r.strip().isdigit() or int(r) < 1:
            raise SystemExit(f"error: --replicas: {r!r} is not a replica count >= 1")
        replicas.append(int(r))
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from sglang_marconi.cpu_serving.launch import DEFAULT_MODEL_DIR
    from sglang_marconi.cpu_serving.tiny_model import MODEL_PRESETS, build

    if a.model_dir:
        model = build(a.model_dir)
    elif a.model_size == "tiny":
        model = build(DEFAULT_MODEL_DIR)
    else:
        model = build(DEFAULT_MODEL_DIR.parent / f"{a.model_size}-nemotron-h", dtype="float32",
                      **MODEL_PRESETS[a.model_size])
    results = {}
    runs = ([(f"marconi-x{n}", lambda n=n: run_replicas(n, model, a, out)) for n in replicas] if replicas else
            [(name, lambda name=name: run_one(name, CONFIGS[name], model, a, out)) for name in a.configs.split(",")])
    for name, run in runs:
        t0 = time.monotonic()
        results[name] = run()
        print(f"[{name}] done in {time.monotonic() - t0:.0f}s: {results[name]}", flush=True)
    t = table(results)
    (out / "summary.md").write_text(t + "\n")
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
