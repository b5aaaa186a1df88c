"""Benchmark: cache bookkeeping per request, Marconi vs SGLang 0.5.23's default hybrid cache.

    python -m sglang_marconi.bench_bookkeeping [--requests 3000] [--repeats 3]

One synthetic request stream (sessions sharing system prompts, multi-turn
chats, under memory pressure so eviction runs on most requests) is driven
through the same scheduler-shaped driver against:

* ``sglang-rust``   — SGLang's UnifiedRadixCache with its default FULL + MAMBA
  components on its Rust tree core (what a server uses by default);
* ``sglang-python`` — the same on SGLang's Python tree core;
* ``marconi-default`` — MarconiRadixCache (Python tree core, as every custom
  component is) with the package defaults (value per byte, no helper process);
* ``marconi-paper`` — ``{"variant": "paper"}``: the paper's utility with α
  tuned by replays in a separate process; the scheduler thread pays only the
  request log and a non-blocking poll, but on a 2-core machine the tuner's
  replays share the cores with the scheduler;
* ``marconi-no-anchor`` — the default without its anchor state (an experiment
  key), to show what the anchor costs.

The time measured per request is the driver's whole call: match, lock,
allocation, the checkpoint inserts, unlock and the budget eviction — the
tree work a scheduler does per request. Two clocks: wall time, and the CPU
time of the calling thread (``time.thread_time``: what the scheduler thread
itself spends; work in the paper variant's tuner process is not
in it, but on a machine with few cores that process still slows the wall
clock). Ratios are against the baselines measured in the same run; best of
``--repeats`` runs each.
"""

from __future__ import annotations

import argparse
import gc
import random
import time


def request_stream(n: int, seed: int = 0):
    rng = random.Random(seed)
    systems = [[rng.randrange(32000) for _ in range(rng.choice([64, 256, 1024]))] for _ in range(8)]
    sessions: dict[int, list[int]] = {}
    out = []
    for _ in range(n):
        s = rng.randrange(64)
        hist = sessions.get(s)
        if hist is None or len(hist) > 6000 or rng.random() < 0.1:
            hist = list(systems[s % len(systems)])
        inp = hist + [rng.randrange(32000) for _ in range(rng.randrange(8, 200))]
        gen = [rng.randrange(32000) for _ in range(rng.randrange(4, 300))]
        sessions[s] = inp + gen
        out.append((inp, gen))
    return out


MARCONI_CONFIGS = {
    "marconi-default": {},
    "marconi-paper": {"variant": "paper", "tuner": "process"},
}
#: experiments (``policy.config`` fields the server does not take), shown next to the default
MARCONI_EXPERIMENTS = {
    "marconi-no-anchor": {"anchor_state": False},  # the default without the anchor state
}


def run_one(name: str, stream, kv_budget: int, state_budget: int) -> tuple[float, float]:
    """(wall seconds, calling-thread CPU seconds) per request."""
    from .policy import builtin_profile
    from .policy.config import parse_config, parse_server_config
    from .sglang_backend.driver import CacheDriver
    from .sglang_backend.pools import build_hybrid_cache
    from .sglang_backend.tuning import build_marconi_cache

    kv_slots = kv_budget + 8192
    if name.startswith("marconi"):
        config = (parse_server_config(MARCONI_CONFIGS[name]) if name in MARCONI_CONFIGS
                  else parse_config(MARCONI_EXPERIMENTS[name]))
        built = build_marconi_cache(
            kv_slots=kv_slots, mamba_slots=state_budget + 4,
            config=config,
            profile=builtin_profile("paper-7b"), kv_budget=kv_budget, state_budget=state_budget,
            deferred_frees=False,  # the live cache runs on SGLang's own allocator
        )
    else:
        built = build_hybrid_cache(
            kv_slots=kv_slots, mamba_slots=state_budget + 4,
            tree_core_backend="rust" if name == "sglang-rust" else "python", deferred_frees=False,
        )
        assert built.cache._tree_core_backend == ("rust" if name == "sglang-rust" else "python")
    drv = CacheDriver(built, kv_budget=kv_budget, state_budget=state_budget)
    gc.collect()  # the previous runs' garbage is not this run's to collect
    t0, c0 = time.perf_counter(), time.thread_time()
    for inp, gen in stream:
        drv.run(inp, gen)
    dt, dc = time.perf_counter() - t0, time.thread_time() - c0
    st = getattr(built.cache, "marconi", None)
    if st is not None:
        st.close()
    return dt / len(stream), dc / len(stream)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_marconi.bench_bookkeeping", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-budget", type=int, default=60_000, help="KV tokens the tree may hold")
    ap.add_argument("--state-budget", type=int, default=48, help="SSM states the tree may hold")
    args = ap.parse_args(argv)

    stream = request_stream(args.requests)
    # the paper variant last: its tuner process may still be finishing a replay when its run ends
    names = ["sglang-rust", "sglang-python", "marconi-default", *MARCONI_EXPERIMENTS, "marconi-paper"]
    best = {n: float("inf") for n in names}
    cpu = {n: float("inf") for n in names}
    for _ in range(args.repeats):
        for n in names:  # interleaved, so drift hits every variant alike
            wall, thread = run_one(n, stream, args.kv_budget, args.state_budget)
            best[n] = min(best[n], wall)
            cpu[n] = min(cpu[n], thread)
    tokens = sum(len(i) + len(g) for i, g in stream) / len(stream)
    print(f"{args.requests} requests (mean {tokens:.0f} tokens), KV budget {args.kv_budget} tokens, "
          f"{args.state_budget} states; best of {args.repeats}")
    print(f"{'cache':<15} {'us/request':>11} {'vs sglang-rust':>15} {'vs sglang-python':>17} "
          f"{'thread CPU us':>14} {'CPU vs rust':>12} {'CPU vs python':>14}")
    for n in names:
        print(f"{n:<15} {best[n] * 1e6:>11.1f} {best[n] / best['sglang-rust']:>14.2f}x {best[n] / best['sglang-python']:>16.2f}x "
              f"{cpu[n] * 1e6:>14.1f} {cpu[n] / cpu['sglang-rust']:>11.2f}x {cpu[n] / cpu['sglang-python']:>13.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
