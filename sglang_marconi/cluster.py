"""N Marconi replicas of the tiny hybrid on this CPU behind SGLang's model gateway (SMG).

    python -m sglang_marconi.cluster --replicas 2                       # serve until Ctrl-C
    python -m sglang_marconi.cluster --replicas 2 --smoke --json out.json  # scripted workload, then stop

Each replica is ``python -m sglang.launch_server`` (``cpu_serving.launch``) with
``--radix-cache-backend marconi`` and its pools capped (``REPLICA_FLAGS``); the gateway is
SMG's own launcher, unmodified (``python -m smg.launch_router --worker-urls ... --policy R``,
HTTP workers). Every process is stopped on exit, on Ctrl-C and on SIGTERM.

``--smoke`` runs ``smoke_workload`` through the gateway (sessions on shared system prompts,
multi-turn with the replies fed back, branches) and writes ``{"replicas", "requests",
"failed", "cached_tokens", "prompt_tokens", "per_replica": {url: requests}}``. A replica that
dies is reported in one line (``replica URL exited with CODE``); the gateway's health checks
take it out and the others keep serving.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .cpu_serving import launch

#: each replica: Marconi's cache, float32, pools capped so N replicas fit in this machine's memory
REPLICA_FLAGS = ["--dtype", "float32", "--radix-cache-backend", "marconi",
                 "--max-mamba-cache-size", "64", "--max-total-tokens", "16384"]
GATEWAY_POLICIES = ("cache_aware", "round_robin", "random", "power_of_two", "least_load", "prefix_hash",
                    "consistent_hashing")


class ClusterError(RuntimeError):
    """A replica or the gateway could not start (message says which, in one line)."""


@dataclass
class Gateway:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def stop(self, timeout: float = 15.0) -> None:
        launch.Server(self.proc, self.url, self.log_path).stop(timeout)


#: SGLang's /health runs a one-token generation and answers within its own limit
#: (SGLANG_HEALTH_CHECK_TIMEOUT, 20 s); on a busy CPU that takes more than SMG's default 5 s,
#: and a replica timed out twice is taken out of routing while it serves. A dead replica
#: refuses the connection at once, so the longer timeout does not slow its removal.
HEALTH_CHECK_TIMEOUT_S = 25


def gateway_command(port: int, worker_urls: Sequence[str], policy: str, extra: Sequence[str] = (),
                    metrics_port: Optional[int] = None) -> List[str]:
    """SMG's launcher on 127.0.0.1:port. Its Prometheus listener would take 0.0.0.0:29000, open to
    the network and taken by a second gateway on the machine; it gets a free local port instead."""
    return [sys.executable, "-m", "smg.launch_router", "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", *worker_urls, "--policy", policy, "--log-level", "warn",
            "--health-check-interval-secs", "2", "--health-failure-threshold", "2",
            "--health-check-timeout-secs", str(HEALTH_CHECK_TIMEOUT_S),
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port or launch.free_port()), *extra]


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode(errors="replace")


def start_gateway(worker_urls: Sequence[str], policy: str, log_path: Path, port: Optional[int] = None,
                  ready_timeout: float = 120.0, extra: Sequence[str] = (), metrics_port: Optional[int] = None) -> Gateway:
    port = port or launch.free_port()
    log = open(log_path, "wb")
    proc = subprocess.Popen(gateway_command(port, worker_urls, policy, extra, metrics_port), stdout=log,
                            stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(log_path.parent))
    log.close()
    gw = Gateway(proc, f"http://127.0.0.1:{port}", log_path)
    wanted = {u.rstrip("/") for u in worker_urls}
    healthy: set = set()
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no log)"]
            raise ClusterError(f"the gateway exited with {proc.returncode}: {tail[0]} (log: {log_path})")
        try:
            if _get(gw.url + "/readiness")[0] == 200:
                healthy = healthy_workers(gw.url)
                if wanted <= healthy:
                    return gw
        except (urllib.error.URLError, ConnectionError, OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    gw.stop()
    missing = ", ".join(sorted(wanted - healthy))
    raise ClusterError(f"the gateway was not ready after {ready_timeout:.0f}s: not healthy in its /workers: {missing} "
                       f"(log: {log_path})")


def healthy_workers(gateway_url: str) -> set:
    """The worker URLs the gateway routes to now (its ``/workers``, healthy ones). Its
    ``/readiness`` answers 200 once one worker is healthy; the others register in the
    background, and a gateway used before then sent every request to the first."""
    workers = json.loads(_get(gateway_url + "/workers")[1])["workers"]
    return {w["url"].rstrip("/") for w in workers if w.get("is_healthy")}


@dataclass
class Cluster:
    """The replicas and the gateway in front; ``stop()`` ends every process (idempotent)."""

    replicas: List[launch.Server]
    gateway: Optional[Gateway] = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return self.gateway.url

    def dead(self) -> List[str]:
        """One line per replica that has exited."""
        return [f"replica {s.url} exited with {s.proc.returncode} (log: {s.log_path})"
                for s in self.replicas if s.proc.poll() is not None]

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        procs = ([self.gateway] if self.gateway is not None else []) + list(self.replicas)
        with ThreadPoolExecutor(max(1, len(procs))) as ex:
            list(ex.map(lambda p: p.stop(), procs))


def check_options(replicas: int, policy: str) -> None:
    if replicas < 1:
        raise ClusterError(f"--replicas must be >= 1, got {replicas}")
    if policy not in GATEWAY_POLICIES:
        raise ClusterError(f"--router: unknown gateway policy {policy!r} (known: {', '.join(GATEWAY_POLICIES)})")


def replica_env(replicas: int) -> Dict[str, str]:
    """The machine's cores split between the replicas (``OMP_NUM_THREADS``; one set by the user
    wins). On CPU torch runs one thread per core in every process, and N replicas' spinning
    thread pools on the same cores ran the load test's decode 20-50x slower than one replica."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // replicas))}


def start_cluster(model_path, replicas: int, policy: str = "cache_aware", log_dir: Optional[Path] = None,
                  port: Optional[int] = None, server_extra: Sequence[str] = (), gateway_extra: Sequence[str] = (),
                  ready_timeout: float = 300.0) -> Cluster:
    """Start ``replicas`` Marconi servers at once, then the gateway; on any failure stop what started."""
    check_options(replicas, policy)
    import importlib.util

    if importlib.util.find_spec("smg") is None:
        raise ClusterError("the gateway package smg is not installed (pip install -r requirements/cpu-server.txt)")
    log_dir = Path(log_dir or f"/tmp/sglang-marconi-cluster-{os.getpid()}")
    log_dir.mkdir(parents=True, exist_ok=True)

    env = replica_env(replicas)

    def start(i):
        return launch.start_server(model_path, log_path=log_dir / f"replica-{i}.log", ready_timeout=ready_timeout,
                                   extra=[*REPLICA_FLAGS, *server_extra], env=env)

    cluster = Cluster([])
    try:
        with ThreadPoolExecutor(replicas) as ex:
            futs = [ex.submit(start, i) for i in range(replicas)]
            errors = []
            for f in futs:
                try:
                    cluster.replicas.append(f.result())
                except Exception as e:  # noqa: BLE001 - stop the others, report the first
                    errors.append(e)
        if errors:
            first = str(errors[0]).strip().splitlines()
            raise ClusterError(f"a replica did not start: {first[0] if first else errors[0]!r}")
        cluster.gateway = start_gateway([s.url for s in cluster.replicas], policy, log_dir / "gateway.log",
                                        port=port, extra=gateway_extra)
    except BaseException:
        cluster.stop()
        raise
    return cluster


# ------------------------------------------------------------------- workload

#: two system prompts that differ from their first token (SMG's tree matches in 16-token pages)
SYSTEMS = ["You are a terse assistant for questions about caches of hybrid models; answer in one line. ",
           "Ship's log voice only: brief entries about state space models and their recurrent states. "]
TOPICS = ["radix trees", "SSM states", "eviction", "prefill cost", "branch points", "recency"]
FOLLOW_UPS = [" user: say more", " user: and why does that matter?"]
BRANCHES = [" user: continue with a happy ending", " user: continue with a sad ending"]


def smoke_workload(sessions: int = 6, turns: int = 3) -> List[Callable]:
    """Session scripts: session s asks about TOPICS[s] under SYSTEMS[s % 2] for ``turns`` turns
    (replies fed back), then two branches off its history. A script is a generator function of
    ``enc`` (text -> ids) that yields ``(label, input_ids)`` and is sent each reply's output ids."""

    def script(s):
        def run(enc):
            hist = enc(SYSTEMS[s % len(SYSTEMS)] + f"user: tell me about {TOPICS[s % len(TOPICS)]}")
            for t in range(turns):
                if t:
                    hist = hist + enc(FOLLOW_UPS[(t - 1) % len(FOLLOW_UPS)])
                hist = hist + (yield (f"s{s}-turn{t}", hist))
            for b, text in enumerate(BRANCHES):
                yield (f"s{s}-branch{b}", hist + enc(text))
        return run

    return [script(s) for s in range(sessions)]


@dataclass
class Result:
    label: str
    input_ids: List[int]
    output_ids: Optional[List[int]]
    cached_tokens: int
    worker: Optional[str]
    error: Optional[str] = None


def _generate(url: str, ids: List[int], new: int, timeout: float) -> tuple:
    body = json.dumps({"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": new,
                                                             "ignore_eos": True}}).encode()
    req = urllib.request.Request(url + "/generate", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read()), r.headers.get("x-smg-routed-worker-id")


def run_workload(url: str, tokenizer, scripts: Sequence[Callable], *, new_tokens: int = 6, concurrency: int = 1,
                 timeout: float = 120.0) -> List[Result]:
    """Run the session scripts against ``url``. ``concurrency`` 1: one request at a time, sessions
    interleaved turn by turn (deterministic); more: that many sessions at once, each in order."""
    enc = lambda s: tokenizer(s)["input_ids"]  # noqa: E731
    results: List[Result] = []
    lock = threading.Lock()

    def step(gen, sent):
        try:
            label, ids = gen.send(sent)
        except StopIteration:
            return None
        try:
            out, worker = _generate(url, ids, new_tokens, timeout)
            r = Result(label, ids, out["output_ids"], out["meta_info"].get("cached_tokens", 0), worker)
        except (urllib.error.URLError, ConnectionError, OSError, ValueError, KeyError) as e:
            r = Result(label, ids, None, 0, None, error=f"{type(e).__name__}: {e}")
        with lock:
            results.append(r)
        return r

    gens = [sc(enc) for sc in scripts]
    if concurrency <= 1:
        live = [(g, step(g, None)) for g in gens]
        while live:
            nxt = []
            for g, last in live:
                if last is None:
                    continue
                nxt.append((g, step(g, last.output_ids or [])))
            live = [x for x in nxt if x[1] is not None]
        return results

    def session(g):
        last = step(g, None)
        while last is not None:
            last = step(g, last.output_ids or [])

    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(session, gens))
    return results


def summarize(results: Sequence[Result], replicas: Sequence[str]) -> Dict:
    per = {u: 0 for u in replicas}
    for r in results:
        if r.worker is not None:
            per[r.worker] = per.get(r.worker, 0) + 1
    ok = [r for r in results if r.error is None]
    return {
        "replicas": len(replicas),
        "requests": len(results),
        "failed": len(results) - len(ok),
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "prompt_tokens": sum(len(r.input_ids) for r in ok),
        "per_replica": per,
    }


# ------------------------------------------------------------------------ CLI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_marconi.cluster",
                                 description="N Marconi replicas of the tiny hybrid on CPU behind SGLang's model "
                                             "gateway (SMG)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--router", default="cache_aware", help=f"SMG --policy, from {', '.join(GATEWAY_POLICIES)} "
                                                            "(default cache_aware)")
    ap.add_argument("--port", type=int, default=0, help="gateway port (default: a free one)")
    ap.add_argument("--model-dir", default=str(launch.DEFAULT_MODEL_DIR))
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--smoke", action="store_true", help="run the scripted workload through the gateway, then stop")
    ap.add_argument("--sessions", type=int, default=6, help="--smoke: sessions (default 6)")
    ap.add_argument("--concurrency", type=int, default=3, help="--smoke: sessions at once (default 3)")
    ap.add_argument("--json", help="--smoke: write the summary here")
    a, server_extra = ap.parse_known_args(argv)
    try:
        check_options(a.replicas, a.router)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not launch.plugin_installed():
        print(f"error: the sglang.srt.plugins entry point {launch.ENTRY_POINT_VALUE!r} is not installed",
              file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    from .cpu_serving.tiny_model import build

    model = build(a.model_dir)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    t0 = time.monotonic()
    try:
        cluster = start_cluster(model, a.replicas, a.router, a.log_dir, a.port or None, server_extra)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        print(f"gateway {cluster.url} ({a.router}) over {', '.join(s.url for s in cluster.replicas)}; "
              f"ready in {time.monotonic() - t0:.0f}s", flush=True)
        if not a.smoke:
            print("serving; Ctrl-C to stop", flush=True)
            reported: set = set()
            while cluster.gateway.proc.poll() is None:
                for line in cluster.dead():
                    if line not in reported:
                        reported.add(line)
                        print(line, flush=True)
                if len(reported) == len(cluster.replicas):
                    print("every replica has exited", file=sys.stderr)
                    return 1
                time.sleep(1.0)
            print(f"the gateway exited with {cluster.gateway.proc.returncode}", file=sys.stderr)
            return 1
        tok = AutoTokenizer.from_pretrained(str(model))
        results = run_workload(cluster.url, tok, smoke_workload(a.sessions), concurrency=a.concurrency)
        summary = summarize(results, [s.url for s in cluster.replicas])
        for line in cluster.dead():
            print(line)
        print(json.dumps(summary))
        if a.json:
            Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")
        return 0 if summary["failed"] == 0 else 1
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
