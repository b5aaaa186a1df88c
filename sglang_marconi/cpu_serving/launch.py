"""Start SGLang 0.5.23 on this CPU with a tiny NemotronH and query it.

    python -m sglang_marconi.cpu_serving.launch                 # build, serve, query, stop
    python -m sglang_marconi.cpu_serving.launch --keep-running  # ... and leave it up
    python -m sglang_marconi.cpu_serving.launch --serve-only --radix-cache-backend marconi --enable-metrics
                                         # unknown flags go to sglang.launch_server

The server command is SGLang's own, unmodified::

    SGLANG_USE_CPU_ENGINE=1 PYTHONPATH=<sgl_kernel stand-in dir> \\
    python -m sglang.launch_server --model-path <tiny model> --device cpu \\
        --attention-backend torch_native --disable-cuda-graph --skip-server-warmup \\
        --max-total-tokens 8192 --max-mamba-cache-size 128 \\
        --mamba-radix-cache-strategy no_buffer \\
        --disable-overlap-schedule --page-size 1 --host 127.0.0.1 --port <port>

Pool flags given later (``extra``, e.g. :data:`PRESSURE_POOL_FLAGS`) override these
(argparse keeps the last occurrence).

The Mamba2 CPU ops come in through the ``sglang.srt.plugins`` entry point
(``sglang_marconi.cpu_serving:register``), which must be installed.

Prefix-cache check: a hybrid model can only resume from a stored SSM state, and
with ``no_buffer`` SGLang stores one where a request ends (input + output - 1
tokens). So the check is a second chat turn (turn 1's input + output + new
text): it must report ``cached_tokens == len(input) + len(output) - 1`` and the
same greedy output as the same request on an empty cache.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .shim import server_env

DEFAULT_MODEL_DIR = Path.home() / ".cache" / "sglang-marconi" / "tiny-nemotron-h"
ENTRY_POINT_VALUE = "sglang_marconi.cpu_serving:register"

#: Pool sizes of every server the project starts (tests, demo, load test, soak). Left
#: unset, SGLang sizes the Mamba state pool from free RAM: 357,691 slots (5.5 GB) for the
#: tiny model, so nothing is ever evicted. A state slot is 16 KB for the tiny model and
#: about 2.4 MB for the load test's ``small`` preset; a KV token 128 B / 8 KB.
POOL_FLAGS = ["--max-total-tokens", "8192", "--max-mamba-cache-size", "128"]
#: Memory pressure (the soak, ``loadtest/run.py --pressure``, ``launch --pressure``): pools
#: so small that SSM states and KV leaves are evicted on most requests. 16 state slots cap
#: SGLang at 5 running requests (3 slots each); 800 KV tokens hold the shared prompts and
#: about two conversations, fewer than six clients' requests in flight need (requests wait
#: for room, SGLang evicts); the context is cut to the pool, so a longer input gets a 400.
PRESSURE_POOL_FLAGS = ["--max-total-tokens", "800", "--max-mamba-cache-size", "16", "--context-length", "800"]

SERVER_FLAGS = [
    "--device", "cpu",
    "--attention-backend", "torch_native",
    "--disable-cuda-graph",
    "--skip-server-warmup",
    *POOL_FLAGS,
    "--mamba-radix-cache-strategy", "no_buffer",
    "--disable-overlap-schedule",
    "--page-size", "1",
]


def plugin_installed() -> bool:
    """Is the CPU-ops entry point registered in SGLang's plugin group?"""
    from importlib.metadata import entry_points

    return any(ep.value == ENTRY_POINT_VALUE for ep in entry_points(group="sglang.srt.plugins"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_command(model_path, port: int, host: str = "127.0.0.1", extra: Sequence[str] = ()) -> List[str]:
    return [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", str(model_path),
        *SERVER_FLAGS,
        "--host", host, "--port", str(port),
        *extra,
    ]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log_path: Path
    cmd: List[str] = field(default_factory=list)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM then SIGKILL to the process group this server was started in."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # scheduler / detokenizer children share the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=timeout)


def _http(method: str, url: str, payload: Optional[Dict] = None, timeout: float = 120.0):
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
        return r.status, (json.loads(body) if body.strip().startswith((b"{", b"[")) else body.decode())


def start_server(
    model_path,
    port: Optional[int] = None,
    host: str = "127.0.0.1",
    log_path: Optional[os.PathLike] = None,
    extra: Sequence[str] = (),
    ready_timeout: float = 300.0,
    env: Optional[Dict[str, str]] = None,
) -> Server:
    """Start ``sglang.launch_server`` on CPU and wait until it answers; raises on failure.

    ``env``: extra environment variables for the server (e.g. ``MARCONI_LOG_EVERY``).
    The server runs with its log directory as working directory: ``python -m`` puts
    the cwd on ``sys.path``, and a stale ``sglang_marconi.egg-info`` in a source
    checkout would otherwise hide the installed entry points from SGLang's plugin loader.
    """
    port = port or free_port(host)
    cmd = server_command(model_path, port, host, extra)
    log_path = Path(log_path or f"/tmp/sglang-marconi-cpu-server-{port}.log")
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        cmd, env={**server_env(), **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(log_path.parent),
    )
    log.close()
    srv = Server(proc=proc, url=f"http://{host}:{port}", log_path=log_path, cmd=cmd)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log tail:\n{srv.log_tail()}")
        try:
            status, _ = _http("GET", srv.url + "/model_info", timeout=5)
            if status == 200:
                return srv
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(1.0)
    srv.stop()
    raise TimeoutError(f"server not ready after {ready_timeout:.0f}s; log tail:\n{srv.log_tail()}")


def generate(srv: Server, input_ids: List[int], max_new_tokens: int = 10, timeout: float = 120.0, n: int = 1):
    """Greedy ``/generate``: its JSON body, or with ``n`` > 1 (SGLang's parallel sampling)
    the list of the ``n`` samples' bodies."""
    params = {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
    if n != 1:
        params["n"] = n
    status, body = _http("POST", srv.url + "/generate", {"input_ids": input_ids, "sampling_params": params},
                         timeout=timeout)
    if status != 200:
        raise RuntimeError(f"/generate returned {status}: {body}")
    return body


def run_server_to_exit(model_path, extra: Sequence[str] = (), timeout: float = 300.0,
                       host: str = "127.0.0.1", cwd=None):
    """Run the server command expecting it to refuse to start; returns the CompletedProcess
    (stdout and stderr captured separately). A server that comes up is killed at ``timeout``."""
    cmd = server_command(model_path, free_port(host), host, extra)
    proc = subprocess.Popen(
        cmd, env=server_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        start_new_session=True, text=True, cwd=str(cwd or Path.home()),
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftover children of a failed start
    except (ProcessLookupError, PermissionError):
        pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def post(srv: Server, path: str, payload: Dict, timeout: float = 120.0):
    """POST JSON; returns (status, body) for error statuses too."""
    try:
        return _http("POST", srv.url + path, payload, timeout=timeout)
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, body.decode(errors="replace")


def get_text(srv: Server, path: str, timeout: float = 30.0) -> str:
    with urllib.request.urlopen(srv.url + path, timeout=timeout) as r:
        return r.read().decode()


def flush_cache(srv: Server, timeout: float = 30.0) -> None:
    """POST /flush_cache. SGLang answers 400 while requests are still being
    released (e.g. right after a concurrent batch), so retry until it flushes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = _http("POST", srv.url + "/flush_cache")
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read().decode(errors="replace")
        if status == 200:
            return
        if status != 400 or time.monotonic() > deadline:
            raise RuntimeError(f"/flush_cache returned {status}: {body}")
        time.sleep(0.5)


def two_turn_check(srv: Server, tokenizer, first: str, follow_up: str, max_new_tokens: int = 10) -> Dict:
    """Turn 1, turn 2 (= turn 1 + its output + follow-up), turn 2 again on an empty cache."""
    ids1 = tokenizer(first)["input_ids"]
    r1 = generate(srv, ids1, max_new_tokens)
    ids2 = ids1 + r1["output_ids"] + tokenizer(follow_up)["input_ids"]
    r2 = generate(srv, ids2, max_new_tokens)
    flush_cache(srv)
    r2_cold = generate(srv, ids2, max_new_tokens)
    return {
        "turn1_input_ids": ids1,
        "turn1_output_ids": r1["output_ids"],
        "turn1_cached_tokens": r1["meta_info"]["cached_tokens"],
        "turn2_input_len": len(ids2),
        "turn2_output_ids": r2["output_ids"],
        "turn2_cached_tokens": r2["meta_info"]["cached_tokens"],
        "turn2_expected_cached_tokens": len(ids1) + len(r1["output_ids"]) - 1,
        "turn2_cold_output_ids": r2_cold["output_ids"],
        "turn2_cold_cached_tokens": r2_cold["meta_info"]["cached_tokens"],
        "text": r1.get("text"),
    }


EXAMPLE_PROGRAMS = ("gsm8k_kshot.py", "multi_turn_chat.py", "fork_branches.py")


def run_examples(directory: str, url: str, timeout: float = 300.0) -> bool:
    """Run the frontend example programs against ``url``; each prints its cached tokens."""
    ok = True
    gsm8k = Path(os.environ.get("MARCONI_GSM8K_DIR", Path(directory).resolve().parent.parent / "shared" / "traces" / "gsm8k"))
    for name in EXAMPLE_PROGRAMS:
        path = os.path.join(directory, name)
        print(f"--- {name}", flush=True)
        if name == "gsm8k_kshot.py" and not (gsm8k / "train.jsonl").is_file():
            print(f"skipped: GSM8K data not found at {gsm8k} (set MARCONI_GSM8K_DIR)")
            continue
        r = subprocess.run([sys.executable, path, "--url", url], capture_output=True, text=True, timeout=timeout)
        print(r.stdout.rstrip())
        if r.returncode != 0:
            ok = False
            print(f"{name} failed ({r.returncode}): {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")
    return ok


def _print_metrics(srv) -> None:
    """Marconi's counters from the server's Prometheus endpoint, when --enable-metrics is on."""
    try:
        text = get_text(srv, "/metrics")
    except Exception:
        return
    lines = [ln for ln in text.splitlines() if ln.startswith("marconi_")]
    if lines:
        print("marconi metrics:")
        for ln in lines:
            print("  " + ln)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Serve a tiny NemotronH with SGLang on CPU and query it")
    ap.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--keep-running", action="store_true")
    ap.add_argument("--log", default=None)
    ap.add_argument("--serve-only", action="store_true", help="skip the two-turn check; just serve")
    ap.add_argument("--pressure", action="store_true",
                    help="the soak's small pools (PRESSURE_POOL_FLAGS): evictions on most requests")
    ap.add_argument("--examples", default=None,
                    help="directory of SGLang frontend programs (examples/) to run against the server")
    # anything else goes to sglang.launch_server, e.g. --radix-cache-backend marconi --enable-metrics
    a, server_extra = ap.parse_known_args(argv)

    if not plugin_installed():
        print(
            f"the sglang.srt.plugins entry point {ENTRY_POINT_VALUE!r} is not installed "
            "(reinstall sglang-marconi after adding it to pyproject.toml)",
            file=sys.stderr,
        )
        return 2
    from transformers import AutoTokenizer

    from .tiny_model import build

    model = build(a.model_dir)
    tok = AutoTokenizer.from_pretrained(str(model))
    t0 = time.monotonic()
    srv = start_server(model, port=a.port or None, log_path=a.log,
                       extra=(PRESSURE_POOL_FLAGS if a.pressure else []) + server_extra)
    print(f"server ready at {srv.url} in {time.monotonic() - t0:.1f}s (log: {srv.log_path})")
    try:
        if a.serve_only:
            print(f"serving at {srv.url}; Ctrl-C to stop", flush=True)
            srv.proc.wait()
            return 0
        res = two_turn_check(
            srv, tok, "the answer to the question about the shared prefix cache of a hybrid model",
            " and the next turn",
        )
        for k, v in res.items():
            print(f"{k}: {json.dumps(v)}")
        examples_ok = run_examples(a.examples, srv.url) if a.examples else True
        ok = (
            res["turn2_cached_tokens"] == res["turn2_expected_cached_tokens"]
            and res["turn2_output_ids"] == res["turn2_cold_output_ids"]
        )
        print("prefix cache hit with identical greedy output:", ok)
        ok = ok and examples_ok
        _print_metrics(srv)
        if a.keep_running:
            print(f"serving at {srv.url}; Ctrl-C to stop")
            srv.proc.wait()
        return 0 if ok else 1
    except KeyboardInterrupt:
        return 0
    finally:
        srv.stop()


if __name__ == "__main__":
    sys.exit(main())
