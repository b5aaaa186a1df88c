"""Live soak: a Marconi CPU server under memory pressure, concurrent clients and faults.

    python -m sglang_marconi.cpu_serving.soak --duration 60s --clients 6
    python -m sglang_marconi.cpu_serving.soak --duration 10m --clients 6 --out soak-out
    python -m sglang_marconi.cpu_serving.soak --config '{"variant": "paper"}' --kill-background-at 30

Two servers of the tiny NemotronH (float32) start: the one under test
(``--radix-cache-backend marconi``, the pressure pools of
:data:`launch.PRESSURE_POOL_FLAGS`, metrics on, SGLang's busy-time memory
check on) and a reference with ``--disable-radix-cache``. For ``--duration``,
``--clients`` threads send to the first one, each picking per request:

* ``turn`` — the next turn of a multi-turn session over one of a few shared
  system prompts, the server's replies fed back (streamed or not);
* ``branch`` — an earlier turn of the session edited, the session continues
  from there;
* ``samples`` — the next turn sent with ``n`` = 3 (SGLang prefills the prompt
  alone first, a request that decodes nothing, then the samples); the session
  continues from the first sample;
* ``hangup`` — a streamed turn whose client closes the connection after the
  first chunk; ``timeout`` — a client time-out (50 ms) on a long reply;
* ``abort`` — a streamed turn cancelled with ``/abort_request`` by its rid;
* ``flush`` — ``/flush_cache`` while others run (SGLang answers 400 while busy);
* ``malformed`` — one of :data:`MALFORMED` (ids outside the vocabulary, empty
  input, input beyond the context, negative or absurd sampling values, wrong
  types): it must get a 4xx with a one-line reason.

Then, with the load stopped: the server must be alive and answer; SGLang's idle
memory check (``available + evictable + protected == total`` for the KV and the
state pool, read from the tree's own counts; strict, so a leak raises in the
scheduler) is logged by the plugin (``MARCONI_LOG_IDLE_POOLS``) and read back;
probe requests (a fresh prefix, then its next turn served from the cache) and a
sample of the soak's own completed requests must give the reference server's
greedy tokens; ``marconi_state_evictions`` and ``marconi_leaf_evictions`` must
be > 0 (and the share of finished requests during whose life the cache evicted is
reported, from ``marconi_requests_evicting``); the server log must hold no traceback after
start-up. ``--kill-background-at S`` SIGKILLs the cache's background processes
(the α tuner's worker) S seconds in; the server must keep serving and log one
line about it. Last, the server's main process gets SIGTERM: no process of its
session may be left once it has exited. The report is printed and written as JSON (``--out``); the exit
status is 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import requests

from . import launch

VOCAB = 512  # the tiny model's
NEW = 8  # tokens per reply
MAX_HISTORY = 400  # a session starts over beyond this many tokens (the pressure context is 800)
ACTIONS = {"turn": 60, "branch": 12, "samples": 6, "hangup": 5, "timeout": 4, "abort": 5, "flush": 2,
           "malformed": 12}
SAMPLES = 3  # n of a ``samples`` request
REQUEST_TIMEOUT = 180.0
SERVER_ENV = {
    "MARCONI_LOG_IDLE_POOLS": "1",  # the plugin logs SGLang's idle pool check when it changes
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1",  # SGLang's per-batch KV accounting check
}

#: (label, path, payload); every one must get a 4xx
MALFORMED = [
    ("id >= vocab", "/generate", {"input_ids": [5, 6, VOCAB], "sampling_params": {"max_new_tokens": 2}}),
    ("negative id", "/generate", {"input_ids": [5, -1, 7], "sampling_params": {"max_new_tokens": 2}}),
    ("id >= vocab in a batch", "/generate", {"input_ids": [[5, 6], [7, 10 ** 6]], "sampling_params": {"max_new_tokens": 2}}),
    ("OpenAI ids >= vocab", "/v1/completions", {"model": "default", "prompt": [5, 6, 9999], "max_tokens": 2}),
    ("empty input_ids", "/generate", {"input_ids": [], "sampling_params": {"max_new_tokens": 2}}),
    ("empty text", "/generate", {"text": "", "sampling_params": {"max_new_tokens": 2}}),
    ("input beyond the context", "/generate", {"input_ids": [5] * 5000, "sampling_params": {"max_new_tokens": 2}}),
    ("negative max_new_tokens", "/generate", {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": -3}}),
    ("negative temperature", "/generate", {"input_ids": [5, 6], "sampling_params": {"temperature": -1}}),
    ("top_p 5", "/generate", {"input_ids": [5, 6], "sampling_params": {"top_p": 5}}),
    ("frequency_penalty 1e9", "/generate", {"input_ids": [5, 6], "sampling_params": {"frequency_penalty": 1e9}}),
    ("max_new_tokens 1e9", "/generate", {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 10 ** 9}}),
    ("temperature a string", "/generate", {"input_ids": [5, 6], "sampling_params": {"temperature": "hot"}}),
    ("input_ids a dict", "/generate", {"input_ids": {"a": 1}, "sampling_params": {"max_new_tokens": 2}}),
    ("float id", "/generate", {"input_ids": [5, 6.5], "sampling_params": {"max_new_tokens": 2}}),
    ("body a list", "/generate", [1, 2, 3]),
]


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '1h' -> seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (examples: 90s, 10m, 1h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _reason(body) -> str:
    """The first line of an error body's message."""
    if isinstance(body, dict):
        err = body.get("error", body.get("message", body))
        body = err.get("message", err) if isinstance(err, dict) else err
    return str(body).strip().splitlines()[0][:200] if str(body).strip() else ""


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    actions: Counter = field(default_factory=Counter)
    server_errors: List[str] = field(default_factory=list)  # 5xx and dropped connections
    other_errors: List[str] = field(default_factory=list)
    malformed: List[Dict] = field(default_factory=list)
    flush_status: Counter = field(default_factory=Counter)
    aborted: int = 0
    completed: List[tuple] = field(default_factory=list)  # (input_ids, output_ids) of full greedy replies
    ttft_ms: List[float] = field(default_factory=list)

    def add(self, name: str, item) -> None:
        with self.lock:
            getattr(self, name).append(item)


class Client:
    """One simulated user: sessions over shared system prompts, with faults mixed in."""

    def __init__(self, idx: int, url: str, systems: List[List[int]], seed: int, tally: Tally):
        self.idx, self.url, self.systems, self.tally = idx, url, systems, tally
        self.rng = random.Random(seed * 1000 + idx)
        self.http = requests.Session()
        self.n = 0
        self.n_malformed = idx  # clients start at different kinds
        self.new_session()

    def new_session(self) -> None:
        self.history = list(self.rng.choice(self.systems))
        self.turn_starts: List[int] = []  # where each user turn began, for branches

    def user_text(self) -> List[int]:
        return [self.rng.randrange(5, VOCAB) for _ in range(self.rng.randint(16, 48))]

    def payload(self, ids, stream=False, new=NEW, rid=None) -> Dict:
        p = {"input_ids": ids, "stream": stream,
             "sampling_params": {"temperature": 0, "max_new_tokens": new, "ignore_eos": True}}
        if rid:
            p["rid"] = rid
        return p

    # -- one request of each kind ------------------------------------------
    def generate(self, ids, stream: bool) -> Optional[List[int]]:
        t0 = time.perf_counter()
        if not stream:
            r = self.http.post(self.url + "/generate", json=self.payload(ids), timeout=REQUEST_TIMEOUT)
            self.check_status(r, "turn")
            out = r.json()["output_ids"] if r.status_code == 200 else None
            ttft = None
        else:
            out, ttft = None, None
            with self.http.post(self.url + "/generate", json=self.payload(ids, stream=True), stream=True,
                                timeout=REQUEST_TIMEOUT) as r:
                self.check_status(r, "turn")
                if r.status_code != 200:
                    return None
                for line in r.iter_lines():
                    if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                        continue
                    ttft = ttft or (time.perf_counter() - t0) * 1000
                    chunk = json.loads(line[5:])
                    if "error" in chunk:
                        self.tally.add("server_errors", f"turn: stream error {chunk['error']}")
                        return None
                    out = chunk["output_ids"]
        if out is not None:
            self.tally.add("ttft_ms", ttft if ttft is not None else (time.perf_counter() - t0) * 1000)
            if len(out) == NEW:
                self.tally.add("completed", (list(ids), list(out)))
        return out

    def check_status(self, r, what: str) -> None:
        if r.status_code >= 500:
            self.tally.add("server_errors", f"{what}: {r.status_code} {_reason(r.text)}")
        elif r.status_code != 200:
            self.tally.add("other_errors", f"{what}: {r.status_code} {_reason(r.text)}")

    def turn(self) -> None:
        if len(self.history) > MAX_HISTORY or self.rng.random() < 0.15:  # a new conversation
            self.new_session()
        self.turn_starts.append(len(self.history))
        ids = self.history + self.user_text()
        out = self.generate(ids, stream=self.rng.random() < 0.5)
        if out is None:
            self.new_session()
            return
        self.history = ids + out

    def samples(self) -> None:
        if len(self.history) > MAX_HISTORY:
            self.new_session()
        self.turn_starts.append(len(self.history))
        ids = self.history + self.user_text()
        payload = self.payload(ids)
        payload["sampling_params"]["n"] = SAMPLES
        r = self.http.post(self.url + "/generate", json=payload, timeout=REQUEST_TIMEOUT)
        self.check_status(r, "samples")
        outs = [s["output_ids"] for s in r.json()] if r.status_code == 200 else []
        for out in outs:
            if len(out) == NEW:
                self.tally.add("completed", (list(ids), list(out)))
        if len(outs) != SAMPLES:
            if r.status_code == 200:
                self.tally.add("server_errors", f"samples: {len(outs)} samples for n={SAMPLES}")
            self.new_session()
            return
        self.history = ids + outs[0]

    def branch(self) -> None:
        if len(self.turn_starts) < 2:
            return self.turn()
        cut = self.rng.choice(self.turn_starts[1:])  # edit an earlier user turn
        self.history = self.history[:cut]
        self.turn_starts = [s for s in self.turn_starts if s < cut]
        self.turn()

    def hangup(self) -> None:
        ids = self.history + self.user_text()
        with self.http.post(self.url + "/generate", json=self.payload(ids, stream=True, new=64), stream=True,
                            timeout=REQUEST_TIMEOUT) as r:
            self.check_status(r, "hangup")
            for line in r.iter_lines():
                if line.startswith(b"data:"):
                    break  # hang up after the first chunk: the context manager closes the socket
        self.http.close()
        self.http = requests.Session()

    def timeout(self) -> None:
        ids = self.history + self.user_text()
        try:
            r = self.http.post(self.url + "/generate", json=self.payload(ids, new=64), timeout=(10, 0.05))
            self.check_status(r, "timeout")
        except requests.exceptions.ReadTimeout:
            pass
        self.http.close()
        self.http = requests.Session()

    def abort(self) -> None:
        ids = self.history + self.user_text()
        rid = f"soak-{self.idx}-{self.n}"
        with self.http.post(self.url + "/generate", json=self.payload(ids, stream=True, new=64, rid=rid),
                            stream=True, timeout=REQUEST_TIMEOUT) as r:
            self.check_status(r, "abort")
            sent = False
            last = None
            for line in r.iter_lines():
                if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                    continue
                last = json.loads(line[5:])
                if not sent:
                    a = requests.post(self.url + "/abort_request", json={"rid": rid}, timeout=30)
                    self.check_status(a, "abort_request")
                    sent = True
        reason = ((last or {}).get("meta_info") or {}).get("finish_reason") or {}
        if reason.get("type") == "abort":
            with self.tally.lock:
                self.tally.aborted += 1

    def flush(self) -> None:
        r = self.http.post(self.url + "/flush_cache", timeout=60)
        if r.status_code >= 500:
            self.tally.add("server_errors", f"flush: {r.status_code} {_reason(r.text)}")
        with self.tally.lock:
            self.tally.flush_status[r.status_code] += 1

    def malformed(self) -> None:
        label, path, payload = MALFORMED[self.n_malformed % len(MALFORMED)]  # each kind in turn
        self.n_malformed += 1
        r = self.http.post(self.url + path, json=payload, timeout=REQUEST_TIMEOUT)
        try:
            body = r.json()
        except ValueError:
            body = r.text
        if r.status_code == 200 and isinstance(payload, dict) and payload.get("stream"):
            body = r.text
        self.tally.add("malformed", {"label": label, "status": r.status_code, "reason": _reason(body)})
        if r.status_code >= 500:
            self.tally.add("server_errors", f"malformed {label}: {r.status_code} {_reason(body)}")

    def run(self, deadline: float, min_requests: int = 0, hard_deadline: float = 0.0) -> None:
        """Until ``deadline``, and past it (up to ``hard_deadline``) until the clients together
        sent ``min_requests``. The first request of each client is a malformed one."""
        kinds, weights = zip(*ACTIONS.items())
        while time.monotonic() < deadline or (sum(self.tally.actions.values()) < min_requests
                                              and time.monotonic() < hard_deadline):
            kind = self.rng.choices(kinds, weights)[0] if self.n else "malformed"
            self.n += 1
            with self.tally.lock:
                self.tally.actions[kind] += 1
            try:
                getattr(self, kind)()
            except requests.exceptions.RequestException as e:  # the server dropped or refused us
                self.tally.add("server_errors", f"{kind}: {type(e).__name__}: {str(e)[:200]}")
                self.http = requests.Session()
                time.sleep(1.0)


# ---------------------------------------------------------------------------- checks


def scrape(srv) -> Dict[str, float]:
    vals = {}
    for line in launch.get_text(srv, "/metrics").splitlines():
        m = re.match(r"^(marconi_[a-z_]+)(\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
        if m:
            vals[m.group(1)] = float(m.group(3))
    return vals


def log_after_ready(srv) -> str:
    text = srv.log_path.read_text(errors="replace")
    i = text.find("The server is fired up and ready to roll")
    return text[i:] if i >= 0 else text


def idle_pool_check(log: str) -> Optional[str]:
    lines = re.findall(r"marconi: idle pool check: (.*)", log)
    return lines[-1] if lines else None


def probe(srv, ref, rng: random.Random) -> List[Dict]:
    """A fresh prefix, then its next turn (served from the cache): greedy tokens vs the reference."""
    out = []
    ids = [rng.randrange(5, VOCAB) for _ in range(40)]
    for step in ("fresh prefix", "next turn, from the cache"):
        a = launch.generate(srv, ids, max_new_tokens=NEW)
        b = launch.generate(ref, ids, max_new_tokens=NEW)
        out.append({"probe": step, "input_len": len(ids), "cached_tokens": a["meta_info"]["cached_tokens"],
                    "equal": a["output_ids"] == b["output_ids"]})
        ids = ids + a["output_ids"] + [rng.randrange(5, VOCAB) for _ in range(12)]
    return out


#: A soak reply that differs from the reference only after a position where the
#: reference's top two log-probabilities are closer than this is a numerical tie (the tiny
#: random model's logits are flat; a batch of other size or a state resumed from the cache
#: rounds differently in float32), not a wrong output.
TIE_GAP = 1e-4


def replay_sample(ref, completed: List[tuple], n: int, rng: random.Random) -> Dict:
    """Replay up to ``n`` of the soak's completed greedy requests on the reference server.
    A mismatch is ``wrong`` unless the reference's top-2 gap at the first differing token is
    below :data:`TIE_GAP` (then it is counted in ``ties``, with its gap)."""
    sample = rng.sample(completed, min(n, len(completed)))

    def one(item):
        ids, out = item
        r = launch.post(ref, "/generate", {
            "input_ids": ids, "return_logprob": True, "top_logprobs_num": 2,
            "sampling_params": {"temperature": 0, "max_new_tokens": NEW, "ignore_eos": True}})[1]
        ref_out = r["output_ids"]
        if ref_out == out:
            return None
        k = next(i for i, (a, b) in enumerate(zip(out, ref_out)) if a != b)
        top2 = r["meta_info"]["output_top_logprobs"][k]
        gap = top2[0][0] - top2[1][0]
        return {"input_len": len(ids), "position": k, "soak": out, "reference": ref_out, "top2_gap": gap}

    with ThreadPoolExecutor(2) as ex:
        diffs = [d for d in ex.map(one, sample) if d is not None]
    ties = [d for d in diffs if d["top2_gap"] < TIE_GAP]
    return {"replayed": len(sample), "wrong": len(diffs) - len(ties), "ties": len(ties), "differences": diffs}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def describe_pids(pids: List[int]) -> List[str]:
    """One line per process: pid, parent, state, threads, what it waits in, command line."""
    out = []
    for pid in pids:
        try:
            status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if ":\t" in line)
            wchan = Path(f"/proc/{pid}/wchan").read_text()
        except OSError:
            out.append(f"{pid}: gone")
            continue
        out.append(f"{pid} ppid={status.get('PPid', '?').strip()} state={status.get('State', '?').strip()} "
                   f"threads={status.get('Threads', '?').strip()} wchan={wchan or '-'} {_cmdline(pid)[:160]}")
    return out


def background_pids(srv) -> List[int]:
    """The cache's background processes: the ``multiprocessing`` forkserver the server's
    scheduler started (SGLang titles it ``sglang::scheduler``) and the workers it forked
    (the α tuner's, ``policy/tuner.py``)."""
    pids = _group_pids(srv.proc.pid)
    servers = [pid for pid in pids if "multiprocessing.forkserver" in _cmdline(pid)
               and _cmdline(_ppid(pid)).startswith("sglang::scheduler")]
    return servers + [pid for pid in pids if _ppid(pid) in servers]


def _group_pids(pgid: int) -> List[int]:
    """Live processes in the process group ``pgid`` (the server's session)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def group_pids(srv) -> List[int]:
    return _group_pids(srv.proc.pid)


# ---------------------------------------------------------------------------- the soak


def run_soak(model, duration: float, clients: int, seed: int = 0, config: Optional[str] = None,
             kill_background_at: Optional[float] = None, log_dir: Optional[Path] = None,
             replay: int = 40, ref=None, min_requests: int = 0) -> Dict:
    """Start the servers (``ref``: an already running reference server to reuse), run the
    soak, check, stop what was started; returns the report (``report["ok"]``).
    ``min_requests``: keep going past ``duration`` (up to 4x) until that many were sent
    (a short run on a slow machine must still fill the pools)."""
    log_dir = Path(log_dir or "/tmp")
    extra = ["--dtype", "float32", *launch.PRESSURE_POOL_FLAGS, "--radix-cache-backend", "marconi", "--enable-metrics"]
    if config:
        extra += ["--radix-eviction-policy-config", config]
    starts = {"marconi": (extra, SERVER_ENV)}
    if ref is None:
        starts["reference"] = (["--dtype", "float32", "--disable-radix-cache"], None)
    with ThreadPoolExecutor(len(starts)) as ex:
        futs = {k: ex.submit(launch.start_server, model, log_path=log_dir / f"soak-{k}.log", extra=e, env=env)
                for k, (e, env) in starts.items()}
        started = {}
        errors = []
        for k, f in futs.items():
            try:
                started[k] = f.result()
            except Exception as e:  # noqa: BLE001 - stop whatever did start, then fail
                errors.append(e)
    if errors:
        for s in started.values():
            s.stop()
        raise errors[0]
    srv, own_ref = started["marconi"], started.get("reference")
    ref = ref or own_ref
    try:
        report = _soak(srv, ref, duration, clients, seed, kill_background_at, replay, min_requests)
        report["background_pids_before_sigterm"] = background_pids(srv)
        report["left_after_sigterm"] = sigterm_leftovers(srv)
        report["ok"] = report["ok"] and not report["left_after_sigterm"]
        return report
    finally:
        srv.stop()
        if own_ref is not None:
            own_ref.stop()


def sigterm_leftovers(srv, timeout: float = 60.0) -> List[int]:
    """SIGTERM the server's main process only (as an init system would), wait for it to
    exit, and return the processes of its session still alive up to ``timeout`` s later."""
    if srv.proc.poll() is None:
        os.kill(srv.proc.pid, signal.SIGTERM)
        try:
            srv.proc.wait(timeout=timeout)
        except Exception:  # noqa: BLE001 - reported below as leftovers (the main process itself)
            pass
    deadline = time.monotonic() + timeout
    left = group_pids(srv)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = group_pids(srv)
    return left


def _soak(srv, ref, duration, clients, seed, kill_background_at, replay, min_requests) -> Dict:
    rng = random.Random(seed)
    systems = [[rng.randrange(5, VOCAB) for _ in range(n)] for n in (96, 128, 160)]
    tally = Tally()
    t0 = time.monotonic()
    deadline = t0 + duration
    killed: List[int] = []
    workers = [Client(i, srv.url, systems, seed, tally) for i in range(clients)]
    hard_deadline = t0 + 4 * duration
    threads = [threading.Thread(target=w.run, args=(deadline, min_requests, hard_deadline), daemon=True)
               for w in workers]
    for t in threads:
        t.start()
    if kill_background_at is not None:
        while time.monotonic() < t0 + kill_background_at or (
                not background_pids(srv) and any(t.is_alive() for t in threads)):
            time.sleep(0.5)
        killed = background_pids(srv)
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=4 * duration + 2 * REQUEST_TIMEOUT)
    elapsed = time.monotonic() - t0
    time.sleep(3.0)  # the scheduler goes idle: SGLang's idle memory check runs

    report: Dict = {"duration_s": round(elapsed, 1), "clients": clients, "actions": dict(tally.actions)}
    report["alive"] = srv.proc.poll() is None
    try:
        answer = launch.generate(srv, systems[0] + [7, 8, 9], max_new_tokens=NEW, timeout=60)
        report["answers"] = len(answer["output_ids"]) == NEW
    except Exception as e:  # noqa: BLE001 - reported, fails the soak
        report["answers"] = False
        report["answer_error"] = repr(e)[:300]
    report["server_errors"] = len(tally.server_errors)
    report["server_error_samples"] = tally.server_errors[:5]
    report["other_non_200"] = Counter(e.split(":")[0] + ": " + e.split(":")[1].split()[0] for e in tally.other_errors)
    report["aborted"] = tally.aborted
    report["flush_status"] = dict(tally.flush_status)
    report["malformed"] = len(tally.malformed)
    report["malformed_not_4xx"] = [m for m in tally.malformed if not 400 <= m["status"] < 500]
    report["malformed_reasons"] = sorted({f"{m['label']}: {m['status']} {m['reason']}" for m in tally.malformed})
    ttft = sorted(tally.ttft_ms)
    report["completed_turns"] = len(tally.completed)
    report["ttft_p50_ms"] = round(ttft[len(ttft) // 2], 1) if ttft else None
    if report["alive"]:
        time.sleep(2.0)
        log = log_after_ready(srv)
        report["idle_pool_check"] = idle_pool_check(log)
        vals = scrape(srv)
        report["metrics"] = {k: vals.get(k) for k in ("marconi_requests_finished", "marconi_requests_evicting",
                                                     "marconi_state_hits",
                                                     "marconi_hit_tokens", "marconi_state_evictions",
                                                     "marconi_leaf_evictions", "marconi_alpha")}
        n = report["metrics"]["marconi_requests_finished"] or 1
        # the share of finished requests during whose life (first prefix match to finish) the
        # cache evicted a state or a KV leaf: SGLang evicts for a whole batch at its admission,
        # so counting the evictions between consecutive finishes would miss most of them
        report["eviction_share"] = round((report["metrics"]["marconi_requests_evicting"] or 0) / n, 3)
        report["evictions_per_request"] = {
            "state": round((report["metrics"]["marconi_state_evictions"] or 0) / n, 2),
            "leaf": round((report["metrics"]["marconi_leaf_evictions"] or 0) / n, 2)}
        report["probes"] = probe(srv, ref, rng)
        report["replay"] = replay_sample(ref, tally.completed, replay, rng)
    log = log_after_ready(srv)
    report["tracebacks_in_log"] = log.count("Traceback")
    report["leak_messages_in_log"] = len(re.findall(r"memory leak detected|Mem Leak Detected", log))
    if kill_background_at is not None:
        report["killed_background_pids"] = killed
        report["background_lines"] = re.findall(r"marconi: [^\n]*(?:process died|tuner process)[^\n]*", log)
    report["ok"] = ok(report, kill_background_at is not None)
    return report


def ok(r: Dict, killed: bool) -> bool:
    checks = [
        r["alive"], r["answers"], r["server_errors"] == 0, not r["malformed_not_4xx"],
        r["tracebacks_in_log"] == 0, r["leak_messages_in_log"] == 0,
        r.get("idle_pool_check") is not None and "leak=False" in r["idle_pool_check"],
        all(p["equal"] for p in r.get("probes", [])) and len(r.get("probes", [])) == 2,
        r.get("probes", [{}, {}])[1].get("cached_tokens", 0) > 0,
        r.get("replay", {}).get("wrong", 1) == 0,
        ((r.get("metrics") or {}).get("marconi_state_evictions") or 0) > 0,
        ((r.get("metrics") or {}).get("marconi_leaf_evictions") or 0) > 0,
    ]
    if killed:
        checks += [bool(r["killed_background_pids"]), len(r["background_lines"]) == 1]
    return all(checks)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=parse_duration, default=parse_duration("60s"), help="e.g. 90s, 10m (default 60s)")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=None, help="--radix-eviction-policy-config JSON for the server under test")
    ap.add_argument("--kill-background-at", type=float, default=None, metavar="S",
                    help="SIGKILL the cache's background processes S seconds in (waits for one to exist)")
    ap.add_argument("--replay", type=int, default=200, help="completed soak requests replayed on the reference")
    ap.add_argument("--min-requests", type=int, default=0,
                    help="keep going past --duration (up to 4x) until the clients sent this many requests")
    ap.add_argument("--model-dir", default=str(launch.DEFAULT_MODEL_DIR))
    ap.add_argument("--out", default=None, help="directory for the report (soak.json) and the server logs")
    a = ap.parse_args(argv)
    if a.clients < 1:
        raise SystemExit(f"error: --clients must be at least 1, got {a.clients}")
    from .tiny_model import build

    out = Path(a.out or "/tmp/sglang-marconi-soak")
    out.mkdir(parents=True, exist_ok=True)
    report = run_soak(build(a.model_dir), a.duration, a.clients, a.seed, a.config, a.kill_background_at, out,
                      a.replay, min_requests=a.min_requests)
    text = json.dumps(report, indent=1, default=str)
    (out / "soak.json").write_text(text + "\n")
    print(text)
    print(f"soak {'passed' if report['ok'] else 'FAILED'} (report: {out / 'soak.json'}, logs: {out})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
