"""Locust users replaying shared-prefix sessions against SGLang's /generate (streaming).

* ``ChatSessionUser``: picks one of a few shared system prompts, then runs a
  multi-turn session; every turn re-sends the whole conversation *including
  the server's own replies* (as token ids, so the prefix matches exactly).
* ``FewShotUser``: one shared exemplar prefix + a fresh question per request.

Every request streams; TTFT (time to the first streamed chunk) is reported to
Locust as request type ``TTFT`` (so it lands in the CSV/HTML reports next to
``E2E``, the whole streamed response; Locust's own ``POST`` entry times the
response headers only), and each request's
``meta_info.cached_tokens`` / ``prompt_tokens`` is appended to the JSON-lines
file ``$LOADTEST_RECORD`` (if set).

Knobs (env): LOADTEST_TURNS (4), LOADTEST_NEW_TOKENS (8), LOADTEST_SEED (0),
LOADTEST_VOCAB (512: token ids are drawn below it; the tiny model's vocab).
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, events, task

TURNS = int(os.environ.get("LOADTEST_TURNS", "4"))
NEW = int(os.environ.get("LOADTEST_NEW_TOKENS", "8"))
VOCAB = int(os.environ.get("LOADTEST_VOCAB", "512"))
RECORD = os.environ.get("LOADTEST_RECORD")
_rng = random.Random(int(os.environ.get("LOADTEST_SEED", "0")))

# a few shared prefixes (token ids), fixed for the whole run
SYSTEM_PROMPTS = [[_rng.randrange(5, VOCAB) for _ in range(n)] for n in (96, 128, 160)]
FEW_SHOT_PREFIX = [_rng.randrange(5, VOCAB) for _ in range(256)]
_records = []


def stream_generate(user, input_ids, name):
    """POST /generate with stream=True; returns (output_ids, meta_info) or (None, None)."""
    payload = {"input_ids": input_ids, "stream": True,
               "sampling_params": {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}}
    t0 = time.perf_counter()
    ttft = None
    last = None
    with user.client.post("/generate", json=payload, stream=True, name=name, catch_response=True) as resp:
        if resp.status_code != 200:
            resp.failure(f"status {resp.status_code}")
            return None, None
        for line in resp.iter_lines():
            if not line or not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            if ttft is None:
                ttft = (time.perf_counter() - t0) * 1000
            last = json.loads(data)
        if last is None:
            resp.failure("no chunks")
            return None, None
        resp.success()
    e2e = (time.perf_counter() - t0) * 1000  # the POST entry above times the response headers only
    events.request.fire(request_type="TTFT", name=name, response_time=ttft, response_length=0,
                        exception=None, context={})
    events.request.fire(request_type="E2E", name=name, response_time=e2e, response_length=0,
                        exception=None, context={})
    meta = last["meta_info"]
    _records.append({"name": name, "ttft_ms": ttft, "e2e_ms": e2e, "prompt_tokens": meta.get("prompt_tokens"),
                     "cached_tokens": meta.get("cached_tokens", 0), "t": time.time()})
    return last["output_ids"], meta


class ChatSessionUser(HttpUser):
    weight = 3
    wait_time = between(0.0, 0.2)

    def on_start(self):
        self.rng = random.Random(id(self))

    @task
    def session(self):
        hist = list(self.rng.choice(SYSTEM_PROMPTS))
        for turn in range(TURNS):
            hist += [self.rng.randrange(5, VOCAB) for _ in range(self.rng.randint(8, 24))]  # user text
            out, _ = stream_generate(self, hist, f"chat turn {min(turn, 3)}")
            if out is None:
                return
            hist += out  # the server's own reply goes back into the conversation


class FewShotUser(HttpUser):
    weight = 1
    wait_time = between(0.0, 0.2)

    def on_start(self):
        self.rng = random.Random(id(self) + 1)

    @task
    def question(self):
        q = [self.rng.randrange(5, VOCAB) for _ in range(self.rng.randint(16, 32))]
        stream_generate(self, FEW_SHOT_PREFIX + q, "few-shot")


@events.quitting.add_listener
def _write_records(environment, **kw):
    if RECORD and _records:
        with open(RECORD, "w") as f:
            for r in _records:
                f.write(json.dumps(r) + "\n")
