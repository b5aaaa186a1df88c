"""``--radix-cache-backend marconi`` in a live SGLang 0.5.23 server on this CPU.

Two real servers (``python -m sglang.launch_server``, tiny NemotronH, float32,
``--page-size 1``, ``no_buffer``) are started on 127.0.0.1 once for the module
— one with the Marconi cache (``--enable-metrics``, α fixed at 0.5), one with
``--disable-radix-cache`` — and always stopped at the end. The same request
script (a shared system prompt over three requests, a three-turn chat fed
with the server's own replies, a branching conversation) must give identical
greedy tokens on both, and the Marconi server must report cached tokens.

What hits with ``no_buffer``: SGLang stores an SSM state where a request
ended (input + output - 1), so next turns and branches taken *after* a reply
hit. A sibling that shares only a system prompt with an earlier request
creates a branch point inside the cached tree; the plugin ends that request's
first prefill chunk exactly there (``plugin.cut_prefill_at_branch_point``),
the Marconi component admits the state, and the *third* request sharing the
prompt hits it. The first request, which creates no branch point, admits its
anchor the same way (the largest power of two within its input), which the
second request hits. The tests assert exactly that, and that the cut chunks
leave greedy outputs unchanged.

Skipped (with the reason) without the server requirements or the
``sglang.srt.plugins`` entry point; see tests/test_cpu_serving.py.
"""

from __future__ import annotations

import importlib.util
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sglang_marconi.cpu_serving import launch

SERVER_MODULES = ("fastapi", "uvicorn", "uvloop", "setproctitle", "zmq", "einops", "xgrammar", "transformers",
                  "prometheus_client")
NEW = 6  # tokens per reply: the tiny model's text is gibberish, only the tokens matter
COMMON = ["--dtype", "float32"]
MARCONI = ["--radix-cache-backend", "marconi", "--enable-metrics"]  # the default policy: no config
DISABLED = ["--disable-radix-cache"]


def _skip_reason():
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return f"server requirements missing ({', '.join(missing)}): install requirements/cpu-server.txt"
    if not launch.plugin_installed():
        return f"entry point {launch.ENTRY_POINT_VALUE!r} is not installed in group sglang.srt.plugins"
    return None


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from sglang_marconi.cpu_serving.tiny_model import build

    return build(tmp_path_factory.mktemp("tiny-nemotron-h"), seed=0)


@pytest.fixture(scope="module")
def tok(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))


@pytest.fixture(scope="module")
def servers(model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("server-logs")

    def start(name_extra):
        name, extra = name_extra
        return launch.start_server(model, log_path=logs / f"{name}.log", ready_timeout=300,
                                   extra=COMMON + extra, env={"MARCONI_LOG_EVERY": "1"})

    with ThreadPoolExecutor(2) as ex:  # both start-ups at once
        futs = [ex.submit(start, ne) for ne in (("marconi", MARCONI), ("disabled", DISABLED))]
        started, errors = [], []
        for f in futs:
            try:
                started.append(f.result())
            except Exception as e:  # noqa: BLE001 - stop whatever did start, then fail
                errors.append(e)
    if errors:
        for s in started:
            s.stop()
        raise errors[0]
    srvs = dict(zip(("marconi", "disabled"), started))
    try:
        yield srvs
    finally:
        for s in srvs.values():
            s.stop()
            assert s.proc.poll() is not None


SYSTEM = "system: you are a terse assistant for questions about caches of hybrid models. "
QUESTIONS = ["user: what is a radix tree?", "user: why are SSM states large?", "user: what does alpha weigh?"]
CHAT = [
    "user: hello there, tell me about prefix caching",
    " user: and what about mamba layers",
    " user: thanks, one more question about eviction",
]
BASE = "system: branching conversation. user: start a story about a cache"
BRANCHES = [" user: continue with a happy ending", " user: continue with a sad ending"]
DEEPER = " user: and then?"


def run_script(srv, tok):
    """The request script; every prompt that follows a reply contains the server's own reply.
    Returns a list of (label, input_ids, output_ids, cached_tokens), in request order."""
    log = []

    def gen(label, ids):
        r = launch.generate(srv, ids, max_new_tokens=NEW)
        log.append((label, ids, r["output_ids"], r["meta_info"]["cached_tokens"]))
        return r["output_ids"]

    enc = lambda s: tok(s)["input_ids"]  # noqa: E731
    # 1. shared system prompt across three requests
    for i, q in enumerate(QUESTIONS):
        gen(f"shared-system-{i}", enc(SYSTEM + q))
    # 2. multi-turn chat, replies fed back
    hist = []
    for i, turn in enumerate(CHAT):
        hist = hist + enc(turn)
        hist = hist + gen(f"chat-turn-{i}", hist)
    # 3. branching conversation: two branches after the base reply, one deeper turn on each
    base = enc(BASE)
    base = base + gen("branch-base", base)
    for b, text in enumerate(BRANCHES):
        h = base + enc(text)
        h = h + gen(f"branch-{b}", h)
        gen(f"branch-{b}-deeper", h + enc(DEEPER))
    return log


@pytest.fixture(scope="module")
def runs(servers, tok):
    return {name: run_script(srv, tok) for name, srv in servers.items()}


def test_greedy_outputs_identical_to_cache_disabled(runs):
    m, d = runs["marconi"], runs["disabled"]
    assert [r[0] for r in m] == [r[0] for r in d]
    for (label, ids_m, out_m, _), (_, ids_d, out_d, _) in zip(m, d):
        assert ids_m == ids_d, label  # same replies so far -> same prompts
        assert out_m == out_d, label
        assert len(out_m) == NEW


def test_marconi_reports_cached_tokens(runs):
    cached = {label: c for label, _, _, c in runs["marconi"]}
    print("marconi cached_tokens per request:", cached)
    assert all(c == 0 for _, _, _, c in runs["disabled"])
    assert sum(cached.values()) > 0
    # a next turn resumes from the state stored where the previous request ended
    by_label = {r[0]: r for r in runs["marconi"]}
    for i in (1, 2):
        prev_label, prev_ids, prev_out, _ = by_label[f"chat-turn-{i - 1}"]
        assert cached[f"chat-turn-{i}"] == len(prev_ids) + len(prev_out) - 1
    base_ids, base_out = by_label["branch-base"][1], by_label["branch-base"][2]
    for b in (0, 1):  # both branches share the base conversation's stored state
        assert cached[f"branch-{b}"] == len(base_ids) + len(base_out) - 1
        assert cached[f"branch-{b}-deeper"] > cached[f"branch-{b}"]
    # the shared system prompt: request 0 (no hit, no branch point) admits its anchor, the
    # largest power of two within its input (its first chunk ends there); request 1 hits it
    # when it lies in the shared prompt and creates the branch point (its first chunk ends
    # there and the state is admitted); request 2 hits exactly that prefix
    ids = [by_label[f"shared-system-{i}"][1] for i in range(3)]
    first = ids[0] + by_label["shared-system-0"][2]

    def lcp(a, b):
        return next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))

    common = lcp(first, ids[1])
    anchor = 1 << (len(ids[0]).bit_length() - 1)
    assert anchor > common  # this script: the anchor lies past the prompt request 1 shares...
    assert cached["shared-system-0"] == 0
    assert cached["shared-system-1"] == 0  # ...so request 1 misses and creates the branch point
    # request 2 resumes from the deepest of the two states its prompt runs through
    assert cached["shared-system-2"] == max(p for p, path in ((common, ids[1]), (anchor, first), (0, []))
                                            if lcp(ids[2], path) >= p) >= common > 0


def _scrape(srv):
    text = launch.get_text(srv, "/metrics")
    vals = {}
    for line in text.splitlines():
        m = re.match(r"^(marconi_[a-z_]+)(\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
        if m:
            vals[m.group(1)] = float(m.group(3))
    return vals


def test_prometheus_metrics_and_log_line(servers, runs):
    srv = servers["marconi"]
    vals = _scrape(srv)
    n = len(runs["marconi"])
    assert vals.get("marconi_requests_finished") == n, vals
    assert vals["marconi_state_hits"] > 0
    assert vals["marconi_hit_tokens"] > 0
    assert vals["marconi_last_token_checkpoints"] > 0
    assert vals["marconi_alpha"] == 0.0  # the default has no α
    for name in ("marconi_branch_checkpoints", "marconi_requests_evicting", "marconi_state_evictions", "marconi_leaf_evictions", "marconi_fork_hits"):
        assert name in vals
    log = srv.log_path.read_text(errors="replace")
    assert re.search(rf"marconi: requests={n} evicting_requests=\d+ matches=\d+ state_hits=[1-9]", log), srv.log_tail()
    assert re.search(r"alpha=0\.000 order=value$", log, re.M), srv.log_tail()


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script,args,expect_hits", [
    ("gsm8k_kshot.py", ["--k", "2", "--n", "3"], True),
    # text round trip: the tiny model's gibberish replies (byte-level pieces, U+FFFD)
    # re-tokenize differently, so the next turn's prompt misses the stored state
    ("multi_turn_chat.py", ["--turns", "3"], False),
    ("fork_branches.py", ["--branches", "2"], True),
])
def test_examples_run_and_report_cached_tokens(servers, runs, script, args, expect_hits):
    """The frontend programs (sgl.function + RuntimeEndpoint) against the Marconi server."""
    import os
    import subprocess
    import sys

    if script == "gsm8k_kshot.py":
        data = Path(os.environ.get("MARCONI_GSM8K_DIR", EXAMPLES.parents[1] / "shared" / "traces" / "gsm8k"))
        if not (data / "train.jsonl").exists():
            pytest.skip(f"GSM8K data not found at {data} (set MARCONI_GSM8K_DIR)")
    srv = servers["marconi"]
    r = subprocess.run([sys.executable, str(EXAMPLES / script), "--url", srv.url, "--max-tokens", "4", *args],
                       capture_output=True, text=True, timeout=300, cwd=str(EXAMPLES))
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"total cached_tokens=(\d+) over (\d+) requests", r.stdout)
    assert m, r.stdout
    print(r.stdout)
    assert int(m.group(2)) >= 3
    if expect_hits:
        assert int(m.group(1)) > 0, r.stdout


def test_parallel_samples_resume_one_token_before_the_prompt_end(servers):
    """``n > 1``: SGLang first prefills the prompt alone (a request that decodes nothing),
    then sends the samples. That request keeps its last state one token before its
    input's end, so every sample resumes there (at its end, the first sample would resume
    at the anchor, the largest power of two within the prompt). Greedy samples equal the
    reference's."""
    ids = [(i * 37 + 11) % 500 + 5 for i in range(150)]  # a prompt no other test sends
    got = launch.generate(servers["marconi"], ids, max_new_tokens=NEW, n=3)
    ref = launch.generate(servers["disabled"], ids, max_new_tokens=NEW, n=3)
    assert [s["output_ids"] for s in got] == [s["output_ids"] for s in ref]
    assert [s["meta_info"]["cached_tokens"] for s in got] == [len(ids) - 1] * 3
    # the next turn, on one sample's reply, resumes from that sample's own last state
    nxt = ids + got[0]["output_ids"] + [7, 8, 9]
    a = launch.generate(servers["marconi"], nxt, max_new_tokens=NEW)
    assert a["output_ids"] == launch.generate(servers["disabled"], nxt, max_new_tokens=NEW)["output_ids"]
    assert a["meta_info"]["cached_tokens"] == len(ids) + NEW - 1


def test_malformed_requests_get_errors_and_server_keeps_serving(servers, tok):
    srv = servers["marconi"]
    good = tok("user: a good request after bad ones")["input_ids"]
    bad = [
        {"input_ids": "not a list of ints", "sampling_params": {"max_new_tokens": 2}},
        {"input_ids": [[1, "x"]], "sampling_params": {"max_new_tokens": 2}},
        {"input_ids": [5] * 100_000, "sampling_params": {"max_new_tokens": 2}},  # beyond the context length
        {"input_ids": good, "sampling_params": {"max_new_tokens": -3}},
    ]
    for payload in bad:
        status, body = launch.post(srv, "/generate", payload)
        assert status >= 400, (payload if len(str(payload)) < 200 else str(payload)[:200], status, body)
    r = launch.generate(srv, good, max_new_tokens=NEW)
    assert len(r["output_ids"]) == NEW
    assert srv.proc.poll() is None


@pytest.mark.parametrize("name", ["marconi", "disabled"])
def test_out_of_vocabulary_ids_get_400_and_server_keeps_serving(servers, model, name):
    """An id >= the vocabulary or a negative one used to reach the embedding and kill the
    scheduler (also with --disable-radix-cache); the plugin refuses it in the HTTP process."""
    srv = servers[name]
    vocab = 512
    sp = {"max_new_tokens": 2}
    cases = [
        ("/generate", {"input_ids": [5, 6, vocab], "sampling_params": sp}, f"input_ids[2] = {vocab} is outside"),
        ("/generate", {"input_ids": [5, -1], "sampling_params": sp}, "input_ids[1] = -1 is outside"),
        ("/generate", {"input_ids": [[5, 6], [7, 8, 10 ** 6]], "sampling_params": sp}, "input_ids[2] = 1000000 is outside"),
        ("/v1/completions", {"model": str(model), "prompt": [5, 9999], "max_tokens": 2}, "input_ids[1] = 9999 is outside"),
        ("/generate", {"text": "", "sampling_params": sp}, "the input is empty"),
    ]
    for path, payload, reason in cases:
        status, body = launch.post(srv, path, payload)
        msg = body.get("message") or body.get("error", {}).get("message") if isinstance(body, dict) else body
        assert status == 400 and msg.startswith(reason) and "\n" not in msg, (path, payload, status, body)
    # streamed: the error is the stream's one event, with code 400
    status, body = launch.post(srv, "/generate", {"input_ids": [5, vocab + 1], "stream": True, "sampling_params": sp})
    assert status == 200 and '"code":400' in body and f"input_ids[1] = {vocab + 1} is outside" in body, body
    assert len(launch.generate(srv, [5, 6, 7], max_new_tokens=NEW)["output_ids"]) == NEW
    assert srv.proc.poll() is None


def _assert_soak(report):
    import json

    print(json.dumps(report, indent=1, default=str))
    assert report["alive"] and report["answers"], report
    assert report["server_errors"] == 0, report["server_error_samples"]
    assert report["malformed"] > 0 and report["malformed_not_4xx"] == [], report["malformed_not_4xx"]
    assert report["tracebacks_in_log"] == 0 and report["leak_messages_in_log"] == 0
    assert report["idle_pool_check"] and report["idle_pool_check"].startswith("leak=False"), report["idle_pool_check"]
    assert [p["equal"] for p in report["probes"]] == [True, True] and report["probes"][1]["cached_tokens"] > 0
    # a difference after a float32 near-tie of the reference's top two tokens is not wrong (soak.TIE_GAP)
    assert report["replay"]["replayed"] > 0 and report["replay"]["wrong"] == 0, report["replay"]
    assert report["metrics"]["marconi_state_evictions"] > 0 and report["metrics"]["marconi_leaf_evictions"] > 0
    assert report["left_after_sigterm"] == [], report["left_after_sigterm"]
    assert report["ok"]


def test_soak_under_memory_pressure(servers, model, tmp_path):
    """30 s (and at least 30 requests) of 6 clients (sessions over shared prompts, branches, hang-ups, time-outs,
    aborts, flushes, malformed requests) on the pressure pools, default config; then the
    checks of sglang_marconi.cpu_serving.soak, and SIGTERM leaves no process behind."""
    from sglang_marconi.cpu_serving import soak

    _assert_soak(soak.run_soak(model, duration=30, clients=6, log_dir=tmp_path, replay=10, ref=servers["disabled"],
                               min_requests=30))


PAPER_TUNER = '{"variant": "paper"}'


def test_soak_survives_killing_the_tuner_process(servers, model, tmp_path):
    """The paper's α tuner replays in a forked worker process; SIGKILL it mid-soak: the server
    keeps serving (α kept), logs one line, and every soak check still passes."""
    from sglang_marconi.cpu_serving import soak

    report = soak.run_soak(model, duration=30, clients=6, config=PAPER_TUNER, kill_background_at=5,
                           log_dir=tmp_path, replay=10, ref=servers["disabled"], min_requests=30)
    assert report["killed_background_pids"], "the tuner's process never started"
    assert len(report["background_lines"]) == 1 and "tuner process died" in report["background_lines"][0]
    _assert_soak(report)


def test_sigterm_leaves_no_tuner_process_behind(model, tok, tmp_path):
    """SIGTERM to the server's main process while the α tuner's process is alive."""
    from sglang_marconi.cpu_serving import soak

    srv = launch.start_server(model, log_path=tmp_path / "paper.log", ready_timeout=300, env=soak.SERVER_ENV,
                              extra=COMMON + launch.PRESSURE_POOL_FLAGS + [
                                  "--radix-cache-backend", "marconi", "--radix-eviction-policy-config", PAPER_TUNER])
    try:
        deadline = time.monotonic() + 240
        i = 0
        while not soak.background_pids(srv) and time.monotonic() < deadline:
            launch.generate(srv, tok(f"{SYSTEM} user: question number {i} about caches")["input_ids"], max_new_tokens=4)
            i += 1
        background = soak.background_pids(srv)  # the forkserver, then its workers
        assert background, (i, srv.log_tail())
        before = soak.describe_pids(soak.group_pids(srv))
        left = soak.sigterm_leftovers(srv)
        assert left == [], "\n".join(["left:", *soak.describe_pids(left), f"background before: {background}",
                                       "session before:", *before, srv.log_tail()])
    finally:
        srv.stop()


def test_removed_key_refuses_to_start_and_says_what_replaced_it(model, tmp_path):
    r = launch.run_server_to_exit(
        model, extra=COMMON + ["--radix-cache-backend", "marconi", "--radix-eviction-policy-config",
                               '{"utility_form": "leader"}'],
        timeout=240, cwd=tmp_path,
    )
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: marconi config: key 'utility_form' was removed: the default ranks"), r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


def test_invalid_backend_option_refuses_to_start(model, tmp_path):
    t0 = time.monotonic()
    r = launch.run_server_to_exit(
        model, extra=COMMON + ["--radix-cache-backend", "marconi", "--radix-eviction-policy-config", '{"alpah": 1}'],
        timeout=240, cwd=tmp_path,
    )
    assert r.returncode != 0, f"server did not refuse to start ({time.monotonic() - t0:.0f}s)"
    # The plugin checks the knobs with SGLang's server-args check, before any
    # process is spawned: the last stderr line is the one-line reason.
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: marconi config: unknown key 'alpah'"), r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


def test_metrics_attach_without_server(caplog):
    """metrics.attach on a stand-in cache: the log line every N finished requests, no Prometheus."""
    import logging
    from types import SimpleNamespace

    from sglang_marconi.policy import builtin_profile, parse_config
    from sglang_marconi.sglang_backend import metrics
    from sglang_marconi.sglang_backend.state import MarconiState

    calls = []
    cache = SimpleNamespace(marconi=MarconiState(parse_config({"alpha": 0.5}), builtin_profile("paper-7b")))
    cache.checkpoint_into_tree = lambda req, *, up_to, **kw: calls.append(up_to)
    m = metrics.MarconiMetrics(log_every=2)
    assert m.gauges is None
    metrics.attach(cache, SimpleNamespace(enable_metrics=False, served_model_name="x"))
    cache.marconi_metrics.log_every = 2
    cache.marconi.counters.state_hits = 3
    with caplog.at_level(logging.INFO, logger="sglang_marconi"):
        for i in range(4):
            cache.checkpoint_into_tree(SimpleNamespace(finished=lambda: True), up_to=i)
        cache.checkpoint_into_tree(SimpleNamespace(finished=lambda: False), up_to=9)
    assert calls == [0, 1, 2, 3, 9]
    assert cache.marconi_requests_finished == 4
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("marconi: requests=")]
    assert len(lines) == 2 and "state_hits=3" in lines[-1] and "alpha=0.500" in lines[-1]
    assert metrics.snapshot(cache)["marconi_alpha"] == 0.5


def test_soak_reads_durations_and_counts_requests_that_saw_an_eviction():
    """A request counts as evicting when the cache evicted a state or a KV leaf between its
    first prefix match and its finish (SGLang evicts for a whole batch when it admits it, so
    requests admitted together all count); the soak's duration parsing."""
    from sglang_marconi.cpu_serving import soak
    from sglang_marconi.sglang_backend import metrics

    from types import SimpleNamespace

    from sglang_marconi.policy import builtin_profile, parse_config
    from sglang_marconi.sglang_backend.state import MarconiState

    cache = SimpleNamespace(marconi=MarconiState(parse_config({}), builtin_profile("paper-7b")),
                            match_prefix=lambda params: "matched", checkpoint_into_tree=lambda req, up_to: None)
    metrics.attach(cache)
    c = cache.marconi.counters
    a, b, late = (SimpleNamespace(finished=lambda: True) for _ in range(3))
    assert cache.match_prefix(SimpleNamespace(req=a)) == "matched"
    cache.match_prefix(SimpleNamespace(req=b))
    c.state_evictions += 2  # the batch of a and b is admitted: one eviction burst
    cache.match_prefix(SimpleNamespace(req=a))  # a's next chunk: its stamp stays
    cache.match_prefix(SimpleNamespace(req=late))
    for r in (a, b, late):
        cache.checkpoint_into_tree(r, up_to=1)
    assert cache.marconi_requests_finished == 3
    assert cache.marconi_requests_evicting == 2  # a and b; late started after the burst
    c.leaf_evictions += 1
    d = SimpleNamespace(finished=lambda: True)
    cache.checkpoint_into_tree(d, up_to=1)  # never matched: finished, not counted
    assert (cache.marconi_requests_finished, cache.marconi_requests_evicting) == (4, 2)
    assert metrics.snapshot(cache)["marconi_requests_evicting"] == 2.0
    assert [soak.parse_duration(d) for d in ("90", "90s", "10m", "1h")] == [90, 90, 600, 3600]
