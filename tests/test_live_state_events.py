"""Live: one Marconi replica in SMG gRPC mode publishing KV events, SMG in event-driven mode.

The replica (``--smg-grpc-mode --kv-events-config '{"publisher":"zmq",...,"bind":true}'``,
the tiny NemotronH on CPU, this checkout's code on ``PYTHONPATH``) and
``python -m smg.launch_router --worker-urls grpc://... --policy cache_aware --model-path``
are started once and always stopped. A test subscriber on the same ZMQ endpoint replays
the stream. Two chat turns through the gateway: the second hits the state Marconi stored
after the first reply, the gateway log shows the KV event stream connected, and the blocks
published are exactly root -> the stored states (here: the second turn's committed sequence),
with SGLang's hashes. Skipped (with the reason) without the server requirements or smg.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from sglang_marconi import cluster as cl
from sglang_marconi.cpu_serving import launch
from sglang_marconi.cpu_serving.shim import server_env

from test_live_marconi import _skip_reason
from test_state_events import BlockIndex, chain

REPO = Path(__file__).resolve().parents[1]
NEW = 6


def _wait_log(path: Path, needle: str, proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n" + path.read_text(errors="replace")[-3000:])
        if needle in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise TimeoutError(f"no {needle!r} after {timeout:.0f}s in {path}:\n" + path.read_text(errors="replace")[-3000:])


def _post(url, payload, timeout=120.0):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class Subscriber(threading.Thread):
    """SUB on the replica's event endpoint: (topic, seq, msgpack KVEventBatch) frames."""

    def __init__(self, endpoint):
        super().__init__(daemon=True)
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.RCVTIMEO, 200)
        self.sock.connect(endpoint)
        self.events, self.stop_flag = [], False

    def run(self):
        import msgspec
        import zmq

        from sglang.srt.disaggregation.kv_events import KVEventBatch

        dec = msgspec.msgpack.Decoder(type=KVEventBatch)
        while not self.stop_flag:
            try:
                _topic, _seq, payload = self.sock.recv_multipart()
            except zmq.Again:
                continue
            self.events.extend(dec.decode(payload).events)

    def close(self):
        self.stop_flag = True
        self.join(5)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    reason = _skip_reason() or (None if importlib.util.find_spec("smg") else "smg (the gateway) is not installed")
    if reason:
        pytest.skip(reason)
    from sglang_marconi.cpu_serving.tiny_model import build

    model = build(tmp_path_factory.mktemp("tiny-nemotron-h"), seed=0)
    logs = tmp_path_factory.mktemp("events-logs")
    # SGLang derives a legacy --grpc-port = --port + 10000 in --smg-grpc-mode and refuses one
    # above 65535 (serving_hook.handle_deprecated_args), though it listens on --port
    grpc_port = next(p for p in iter(launch.free_port, None) if p + 10000 <= 65535)
    events_port, gw_port, metrics_port = launch.free_port(), launch.free_port(), launch.free_port()
    endpoint = f"tcp://127.0.0.1:{events_port}"
    env = server_env()
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"  # this checkout's plugin code
    cmd = launch.server_command(model, grpc_port, extra=[
        "--dtype", "float32", "--radix-cache-backend", "marconi", "--smg-grpc-mode",
        "--kv-events-config", json.dumps({"publisher": "zmq", "endpoint": endpoint, "bind": True})])
    srv_log = logs / "replica.log"
    with open(srv_log, "wb") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(logs))
    server = launch.Server(proc, f"grpc://127.0.0.1:{grpc_port}", srv_log, cmd)
    gateway = sub = None
    try:
        _wait_log(srv_log, "gRPC server listening", proc, 240)
        sub = Subscriber(endpoint)
        sub.start()
        gateway = cl.start_gateway([server.url], "cache_aware", logs / "gateway.log", port=gw_port, ready_timeout=90,
                                   extra=["--model-path", str(model), "--log-level", "info"], metrics_port=metrics_port)
        gateway.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        yield model, server, gateway, sub
    finally:
        if sub is not None:
            sub.close()
        if gateway is not None:
            gateway.stop()
        server.stop()
        assert proc.poll() is not None


def test_second_turn_hits_through_event_driven_gateway(started):
    model, server, gateway, sub = started
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    name = json.loads(cl._get(gateway.url + "/v1/models")[1])["data"][0]["id"]

    def generate(ids):
        out = _post(gateway.url + "/generate", {"model": name, "input_ids": ids,
                                                 "sampling_params": {"max_new_tokens": NEW, "temperature": 0.0}})
        return out[0] if isinstance(out, list) else out  # SMG's gRPC /generate answers a one-item list

    turn1 = tok(cl.SYSTEMS[0] + "user: tell me about radix trees")["input_ids"]
    out1 = generate(turn1)
    assert out1["meta_info"]["cached_tokens"] == 0
    turn2 = turn1 + out1["output_ids"] + tok(cl.FOLLOW_UPS[0])["input_ids"]
    out2 = generate(turn2)
    # the state Marconi stored after the first reply: input + output - 1
    assert out2["meta_info"]["cached_tokens"] == len(turn1) + len(out1["output_ids"]) - 1, out2["meta_info"]

    gw_text = gateway.log_path.read_text(errors="replace")
    assert "KV event stream connected" in gw_text, gw_text[-3000:]
    # the line only this checkout's cache logs: the replica runs StatePathEvents
    assert "marconi: KV events publish resumable prefixes only" in server.log_path.read_text(errors="replace")

    # the stored states on this path: turn 1's end (and input end), turn 2's end; all under the latter
    committed2 = turn2 + out2["output_ids"][:-1]
    want = chain(committed2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        idx = BlockIndex().apply(list(sub.events))
        if set(want) <= set(idx.blocks):
            break
        time.sleep(0.3)
    assert [idx.blocks.get(h, (None, None))[1] for h in want] == committed2
    # other published blocks are other paths (the gateway's health checks generate from a
    # one-token prompt): none continues this path past its end
    def root_token(h):
        while idx.blocks[h][0] is not None:
            h = idx.blocks[h][0]
        return idx.blocks[h][1]
    others = set(idx.blocks) - set(want)
    assert all(root_token(h) != committed2[0] for h in others), others

    # SMG applied the batches, and every stored chain linked to a parent its index held
    # (a wrong parent hash would be placed as a new chain from the root and counted here)
    metrics = cl._get(gateway.metrics_url)[1]
    applied = [ln for ln in metrics.splitlines() if ln.startswith("smg_kv_event_batches_total") and "applied" in ln]
    assert applied and sum(float(ln.rsplit(" ", 1)[1]) for ln in applied) > 0, applied
    parentless = [ln for ln in metrics.splitlines() if ln.startswith("smg_kv_event_parentless_stores_total")]
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in parentless) == 0, parentless
    print(f"turn1 {len(turn1)} tokens + {len(out1['output_ids'])} out; turn2 {len(turn2)} tokens, cached "
          f"{out2['meta_info']['cached_tokens']}; published blocks {len(idx.blocks)} (this path {len(want)}); "
          f"SMG {applied}")
