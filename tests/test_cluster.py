"""Two Marconi replicas behind SGLang's model gateway (SMG), live on this CPU
(``python -m sglang_marconi.cluster``): the scripted sessions (shared system prompts,
multi-turn with the replies fed back, branches) through the gateway fail nothing, keep each
session on one replica, hit cached states, and give the same greedy tokens as one
``--disable-radix-cache`` server; under round robin both replicas serve; a replica that dies
is reported in one line and the other keeps serving.

Skipped (with the reason) without the server requirements, the plugin entry point or smg.
"""

from __future__ import annotations

import importlib.util
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sglang_marconi import cluster as cl
from sglang_marconi.cpu_serving import launch

from test_live_marconi import _skip_reason

SESSIONS = 4  # two per system prompt
TURNS = 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    reason = _skip_reason() or (None if importlib.util.find_spec("smg") else "smg (the gateway) is not installed")
    if reason:
        pytest.skip(reason)
    from sglang_marconi.cpu_serving.tiny_model import build

    return build(tmp_path_factory.mktemp("tiny-nemotron-h"), seed=0)


@pytest.fixture(scope="module")
def tok(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))


@pytest.fixture(scope="module")
def started(model, tmp_path_factory):
    """The cluster (2 replicas + gateway) and the reference server, started at once."""
    logs = tmp_path_factory.mktemp("cluster-logs")
    with ThreadPoolExecutor(2) as ex:
        fc = ex.submit(cl.start_cluster, model, 2, "cache_aware", logs)
        fr = ex.submit(launch.start_server, model, log_path=logs / "reference.log", ready_timeout=300,
                       extra=["--dtype", "float32", "--disable-radix-cache", "--max-total-tokens", "16384"])
        out = []
        errors = []
        for f in (fc, fr):
            try:
                out.append(f.result())
            except Exception as e:  # noqa: BLE001 - stop whatever did start, then fail
                errors.append(e)
    if errors:
        for x in out:
            x.stop()
        raise errors[0]
    cluster, ref = out
    try:
        yield cluster, ref
    finally:
        cluster.stop()
        ref.stop()
        for p in [cluster.gateway.proc, ref.proc] + [s.proc for s in cluster.replicas]:
            assert p.poll() is not None


def test_two_replicas_serve_the_sessions_with_hits_and_the_reference_outputs(started, tok, tmp_path):
    cluster, ref = started
    urls = [s.url for s in cluster.replicas]
    scripts = cl.smoke_workload(SESSIONS, TURNS)
    expected = {r.label: r for r in cl.run_workload(ref.url, tok, scripts)}
    assert all(r.error is None and r.cached_tokens == 0 for r in expected.values())

    def check_outputs(got):
        assert sorted(r.label for r in got) == sorted(expected), [r.label for r in got]
        for r in got:
            assert r.input_ids == expected[r.label].input_ids, r.label
            assert r.output_ids == expected[r.label].output_ids, r.label

    # cache_aware: a session's later requests stay where its first ran (SMG's tree holds its
    # prefix) and hit there. Which replica gets a prefix SMG has not seen is its tie-break
    # among idle replicas, so the spread is checked under round_robin below.
    got = cl.run_workload(cluster.url, tok, scripts)
    summary = cl.summarize(got, urls)
    assert summary["failed"] == 0, [r.error for r in got if r.error]
    assert summary["requests"] == SESSIONS * (TURNS + len(cl.BRANCHES))
    assert summary["cached_tokens"] > 0, summary
    by_session: dict = {}
    for r in got:
        by_session.setdefault(r.label.split("-")[0], set()).add(r.worker)
    assert all(len(w) == 1 and None not in w for w in by_session.values()), by_session
    check_outputs(got)

    # round_robin over the same replicas: both serve, with the same greedy tokens
    # (start_gateway returns once every replica is healthy in the gateway's /workers: its
    # /readiness alone answered while the second registered, and all went to the first)
    gw = cl.start_gateway(urls, "round_robin", tmp_path / "gateway-rr.log")
    try:
        assert cl.healthy_workers(gw.url) == set(urls)
        got = cl.run_workload(gw.url, tok, scripts)
    finally:
        gw.stop()
    summary = cl.summarize(got, urls)
    assert summary["failed"] == 0, [r.error for r in got if r.error]
    assert all(n > 0 for n in summary["per_replica"].values()), (
        summary["per_replica"], (tmp_path / "gateway-rr.log").read_text(errors="replace")[-3000:])
    check_outputs(got)


def test_a_replica_that_dies_is_reported_and_the_other_keeps_serving(started, tok):
    cluster, _ = started
    victim, survivor = cluster.replicas
    victim.stop(timeout=10)
    lines = cluster.dead()
    assert lines == [f"replica {victim.url} exited with {victim.proc.returncode} (log: {victim.log_path})"]
    # the gateway's health check (every 2 s, 2 failures) takes the dead replica out
    deadline = time.monotonic() + 30
    results = []
    while time.monotonic() < deadline:
        results = cl.run_workload(cluster.url, tok, cl.smoke_workload(2, 1))
        if all(r.error is None for r in results):
            break
        time.sleep(1)
    assert results and all(r.error is None for r in results), [r.error for r in results]
    assert {r.worker for r in results} == {survivor.url}


@pytest.mark.parametrize("args, message", [
    (["--replicas", "0"], "--replicas must be >= 1, got 0"),
    (["--router", "bogus"], "--router: unknown gateway policy 'bogus'"),
])
def test_cluster_option_errors_are_one_line(capsys, args, message):
    assert cl.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_replicas_split_the_cores_unless_the_user_set_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cl.os, "cpu_count", lambda: 8)
    assert cl.replica_env(1) == {"OMP_NUM_THREADS": "8"}
    assert cl.replica_env(3) == {"OMP_NUM_THREADS": "2"}
    assert cl.replica_env(16) == {"OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert cl.replica_env(2) == {}  # the user's setting reaches the replicas unchanged


def test_gateway_not_ready_names_the_workers_it_waited_for(tmp_path):
    """A worker that never becomes healthy in the gateway's /workers: start_gateway stops the
    gateway after its timeout and names that worker in one line (a trailing slash is the same URL)."""
    if importlib.util.find_spec("smg") is None:
        pytest.skip("smg (the gateway) is not installed")
    url = f"http://127.0.0.1:{launch.free_port()}"
    with pytest.raises(cl.ClusterError) as e:
        cl.start_gateway([url + "/"], "round_robin", tmp_path / "gateway.log", ready_timeout=6)
    msg = str(e.value)
    assert msg.startswith("the gateway was not ready after 6s: not healthy in its /workers: ")
    assert url in msg and "\n" not in msg
