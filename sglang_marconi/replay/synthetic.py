"""Seeded synthetic trace shapes and the public Mooncake trace format, as token ids.

Everything here is pure Python and deterministic: a shape's trace is a function of
its seed (``random.Random``), and a block's tokens are a function of its id only.

**Token ids from block ids** (the Mooncake format's own model of a prompt). A prompt
is a list of *blocks* of ``BLOCK_TOKENS`` = 512 tokens (the last one may be cut).
Block id ``b`` maps to a fixed run of 512 prompt token ids: the first is
``PROMPT_IDS[0] + (b * 104729) % span`` — distinct for every id below ``span`` =
140,000, so two different blocks never share even their first token — and the rest
come from ``random.Random(b)``. Completion ids are drawn from ``COMPLETION_IDS``, a
range no prompt uses. So prompts that start with the same block ids share exactly
those tokens, and nothing else is shared. All ids are < 150,000: valid for the
Qwen3.5 vocabulary (the replay's default tokenizer; ids are never decoded).
Ids of 140,000 and more (a large real trace) may repeat a first token: a shared
prefix of one token, nothing more.

**Mooncake format** (Kimi's serving traces, FAST 2025): JSON lines, one request per
line in arrival order, ``{"timestamp": ms, "input_length": int, "output_length":
int, "hash_ids": [int, ...]}`` with one id per 512-token block of the prompt
(``ceil(input_length / 512)`` ids), ids assigned in order of first appearance.
Each line is its own request; reuse is only through shared leading blocks.

Shapes (defaults in :class:`LongDoc` and :class:`ToolAgent`):

``longdoc`` — long shared documents, Mooncake-format records. A pool of
  ``documents`` with Zipf(``zipf``) popularity; document lengths log-normal
  (median ``doc_median_tokens``, sigma ``doc_sigma``), whole blocks, at most
  ``doc_max_tokens``. A request is: with probability ``system_prob`` one of
  ``system_prompts`` shared system prompts (Zipf popularity, 1–3 blocks), then
  the document's blocks, then 1–2 unique blocks (the question, the last one cut).
  Prompts: mean ≈ 13.7k tokens, max ≈ 123k (the issue author's measurement of
  the long-document trace). Outputs log-normal (median 250). Poisson arrivals,
  ``rate`` requests/s. One request per session.

``toolagent`` — a tool-using agent / RAG: multi-turn sessions, append-only. A
  system prompt of 2–6k tokens: one shared preamble block plus the tool
  descriptions of one of ``toolsets`` (Zipf popularity); then a unique user task;
  then turns of tool call (the assistant's completion, log-normal, median 60
  tokens) and tool output (log-normal, 100–4000 tokens). With probability
  ``retrieval_prob`` a tool output is a document retrieved from a shared
  ``corpus`` (Zipf popularity): shared content, but not at the prefix, so it is
  reused only within its session. Requests per session geometric (mean 15), a
  session ends before a request that would pass ``max_context`` tokens. Poisson
  session starts (``rate`` sessions/s), exponential think gaps (mean
  ``gap_s``) between a completion and the next request.

``multitenant``, ``bestofn``, ``docchat``, ``compaction`` — four shapes outside the
  evaluation suite (``OUTSIDE_SHAPES``, below), never used for a policy choice: a
  check of how a default generalizes. ``nsampling`` — ``bestofn`` as SGLang serves
  one request with ``n`` = 4 (the prompt prefilled alone first, decoding nothing);
  added with the admission rule for such requests, which it checks.

Sessions are generated one after another from per-session RNGs, so the first N
sessions of a seed do not depend on how many are generated: ``--skip-sessions N
--sessions N`` is the second half of the same trace.

Writer (a file in the public format, or the canonical pre-tokenized format)::

    python -m sglang_marconi.replay.synthetic longdoc --seed S --requests N --out FILE.jsonl
    python -m sglang_marconi.replay.synthetic toolagent --seed S --sessions N --out FILE.jsonl
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import functools
import itertools
import json
import math
import os
import random
import sys
from typing import Iterable, Iterator, Optional, Sequence

BLOCK_TOKENS = 512
PROMPT_IDS = (0, 140_000)  #: prompt token ids: [lo, hi)
COMPLETION_IDS = (140_000, 150_000)  #: completion token ids: a range no prompt uses
_FIRST_TOKEN_MULT = 104_729  # prime, coprime with the span: b -> first token is a bijection mod span
_PROMPT_SPAN = range(*PROMPT_IDS)
_COMPLETION_SPAN = range(*COMPLETION_IDS)
MOONCAKE_KEYS = ("timestamp", "input_length", "output_length", "hash_ids")


# ------------------------------------------------------------------- token runs


class BlockTokens:
    """Block id -> its run of ``BLOCK_TOKENS`` prompt token ids (memoized)."""

    def __init__(self):
        self._runs: dict[int, list[int]] = {}

    def run(self, block_id: int) -> list[int]:
        r = self._runs.get(block_id)
        if r is None:
            first = PROMPT_IDS[0] + (block_id * _FIRST_TOKEN_MULT) % len(_PROMPT_SPAN)
            r = [first] + random.Random(block_id).choices(_PROMPT_SPAN, k=BLOCK_TOKENS - 1)
            self._runs[block_id] = r
        return r

    def prompt(self, blocks: Sequence[int], length: int) -> list[int]:
        """The blocks' runs concatenated, cut to ``length`` tokens."""
        out: list[int] = []
        for b in blocks:
            out.extend(self.run(b))
        del out[length:]
        return out


def completion_tokens(key: str, n: int) -> list[int]:
    """``n`` completion ids from ``COMPLETION_IDS``, seeded by ``key``."""
    return random.Random(key).choices(_COMPLETION_SPAN, k=n)


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS)


# ----------------------------------------------------------------------- draws


class Zipf:
    """Ranks 0..n-1 with P(rank r) proportional to 1 / (r + 1) ** s."""

    def __init__(self, n: int, s: float):
        self.cum = list(itertools.accumulate(1.0 / (r + 1) ** s for r in range(n)))

    def draw(self, rng: random.Random) -> int:
        return bisect.bisect_left(self.cum, rng.random() * self.cum[-1])


def lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma))))


class IdBook:
    """Ids in order of first appearance (as the Mooncake format assigns them)."""

    def __init__(self):
        self.ids: dict = {}

    def __call__(self, key) -> int:
        i = self.ids.get(key)
        if i is None:
            i = self.ids[key] = len(self.ids)
        return i


# --------------------------------------------------------------------- longdoc


@dataclasses.dataclass(frozen=True)
class LongDoc:
    documents: int = 2000
    zipf: float = 1.0
    doc_median_tokens: float = 7400.0
    doc_sigma: float = 1.0
    doc_max_tokens: int = 120_320  # 235 blocks: prompts stay below ~123k
    system_prompts: int = 4
    system_prob: float = 0.8
    system_zipf: float = 1.0
    question_tokens: tuple = (30, 1024)  # uniform; 1-2 blocks, the last one cut
    output_median_tokens: float = 250.0
    output_sigma: float = 0.8
    output_max_tokens: int = 4096
    rate: float = 1.0  #: requests per second (Poisson)


def longdoc_records(seed: int, requests: int, shape: LongDoc = LongDoc()) -> list[dict]:
    """``requests`` Mooncake-format records of the long shared-document shape."""
    return list(itertools.islice(iter_longdoc(seed, shape), requests))


def iter_longdoc(seed: int, shape: LongDoc = LongDoc()) -> Iterator[dict]:
    return (rec for rec, _ in longdoc_draws(seed, shape))


def longdoc_draws(seed: int, shape: LongDoc = LongDoc()) -> Iterator[tuple[dict, int]]:
    """(record, the document's popularity rank) per request."""
    arrivals = random.Random(f"longdoc:{seed}:arrivals")
    docs = Zipf(shape.documents, shape.zipf)
    systems = Zipf(shape.system_prompts, shape.system_zipf)
    book = IdBook()
    t = 0.0
    for i in itertools.count():
        rng = random.Random(f"longdoc:{seed}:request:{i}")
        keys: list = []
        if rng.random() < shape.system_prob:
            s = systems.draw(rng)
            n_sys = 1 + random.Random(f"longdoc:{seed}:system:{s}").randrange(3)
            keys += [("system", s, j) for j in range(n_sys)]
        d = docs.draw(rng)
        doc_rng = random.Random(f"longdoc:{seed}:doc:{d}")
        doc_tokens = lognormal_int(doc_rng, shape.doc_median_tokens, shape.doc_sigma, BLOCK_TOKENS,
                                   shape.doc_max_tokens)
        keys += [("doc", d, j) for j in range(max(1, round(doc_tokens / BLOCK_TOKENS)))]
        q = rng.randint(*shape.question_tokens)
        keys += [("question", i, j) for j in range(blocks_for(q))]
        hash_ids = [book(k) for k in keys]
        out = lognormal_int(rng, shape.output_median_tokens, shape.output_sigma, 1, shape.output_max_tokens)
        yield {"timestamp": round(t * 1000), "input_length": (len(hash_ids) - blocks_for(q)) * BLOCK_TOKENS + q,
               "output_length": out, "hash_ids": hash_ids}, d
        t += arrivals.expovariate(shape.rate)


# ------------------------------------------------------------------- toolagent


@dataclasses.dataclass(frozen=True)
class ToolAgent:
    toolsets: int = 8
    toolset_zipf: float = 1.2
    system_tokens: tuple = (2000, 6000)  # uniform per toolset, preamble block included
    task_median_tokens: float = 150.0
    mean_turns: float = 15.0  #: requests per session: geometric with this mean
    call_median_tokens: float = 60.0
    call_sigma: float = 0.7
    output_median_tokens: float = 450.0
    output_sigma: float = 0.9
    output_tokens: tuple = (100, 4000)
    retrieval_prob: float = 0.3
    corpus: int = 300
    corpus_zipf: float = 1.0
    max_context: int = 65_536
    rate: float = 1.0  #: session starts per second (Poisson)
    gap_s: float = 6.0  #: mean think gap between a completion and the next request


@dataclasses.dataclass
class SynthSession:
    """One session: a token stream and, per request, (arrival_s, prompt_len, completion_len);
    request k's prompt and completion are ``stream[:prompt_len]`` and the next ids."""

    session_id: str
    stream: list
    turns: list
    meta: dict = dataclasses.field(default_factory=dict)  #: how it was drawn (toolagent: toolset, system_tokens)


class _Segments:
    """Prompt text as block-id tokens: the same ``(kind, key)`` gives the same tokens."""

    def __init__(self, tokens: BlockTokens):
        self.tokens = tokens
        self.book = IdBook()

    def __call__(self, kind: str, key, n: int) -> list[int]:
        return self.tokens.prompt([self.book((kind, key, j)) for j in range(blocks_for(n))], n)


def _starts(kind: str, seed: int, per_s: float, unit: str = "session") -> Iterator[tuple]:
    """``(i, the i-th unit's RNG, its start time)``: Poisson starts at ``per_s``/s."""
    starts = random.Random(f"{kind}:{seed}:starts")
    t0 = 0.0
    for i in itertools.count():
        yield i, random.Random(f"{kind}:{seed}:{unit}:{i}"), t0
        t0 += starts.expovariate(per_s)


def iter_toolagent(seed: int, shape: ToolAgent = ToolAgent(), *, tokens: Optional[BlockTokens] = None
                   ) -> Iterator[SynthSession]:
    segment = _Segments(tokens or BlockTokens())
    toolsets = Zipf(shape.toolsets, shape.toolset_zipf)
    corpus = Zipf(shape.corpus, shape.corpus_zipf)
    p_end = 1.0 / shape.mean_turns
    for i, rng, t0 in _starts("toolagent", seed, shape.rate):
        ts = toolsets.draw(rng)
        sys_tokens = random.Random(f"toolagent:{seed}:toolset:{ts}").randint(*shape.system_tokens)
        stream = segment("preamble", 0, BLOCK_TOKENS) + segment("toolset", ts, sys_tokens - BLOCK_TOKENS)
        stream += segment("task", i, lognormal_int(rng, shape.task_median_tokens, 0.8, 20, 2000))
        turns: list = []
        t = t0
        lo, hi = shape.output_tokens
        while True:
            prompt_len = len(stream)
            call = completion_tokens(f"toolagent:{seed}:{i}:{len(turns)}",
                                     lognormal_int(rng, shape.call_median_tokens, shape.call_sigma, 4, 1000))
            if prompt_len + len(call) > shape.max_context:
                break
            stream += call
            turns.append((t, prompt_len, len(call)))
            if rng.random() < p_end:
                break
            if rng.random() < shape.retrieval_prob:
                d = corpus.draw(rng)
                n = lognormal_int(random.Random(f"toolagent:{seed}:doc:{d}"), shape.output_median_tokens,
                                  shape.output_sigma, lo, hi)
                stream += segment("doc", d, n)
            else:
                stream += segment("output", (i, len(turns)), lognormal_int(rng, shape.output_median_tokens,
                                                                          shape.output_sigma, lo, hi))
            t += rng.expovariate(1.0 / shape.gap_s)
        if turns:
            del stream[turns[-1][1] + turns[-1][2]:]  # the tool output after the last request is never sent
            yield SynthSession(f"toolagent-{i}", stream, turns, {"toolset": ts, "system_tokens": sys_tokens})


# ------------------------------------------------------ shapes outside the suite
#
# Four more production shapes, never used for a policy choice (the suite's eight are):
# a check of how a default generalizes. Each is an endless seeded stream of sessions
# (per-session RNGs, as above); shared content is keyed block ids, so equal keys are
# equal tokens and nothing else is shared. ``rate`` (``--sps``) multiplies the arrival
# rate each docstring states.


def _chat_turns(rng, seg, stream: list, sid: str, t: float, turns: int, user: tuple, answer: tuple,
                gap_s: float) -> list:
    """Append ``turns`` (user message, answer) pairs to ``stream``: the requests' turns."""
    out = []
    for k in range(turns):
        stream += seg("user", (sid, k), lognormal_int(rng, *user))
        comp = completion_tokens(f"{sid}:{k}", lognormal_int(rng, *answer))
        out.append((t, len(stream), len(comp)))
        stream += comp
        t += rng.expovariate(1.0 / gap_s)
    return out


def iter_multitenant(seed: int, *, rate: float = 1.0, tokens: Optional[BlockTokens] = None) -> Iterator[SynthSession]:
    """Chat behind 40 tenants' system prompts (300–6000 tokens, Zipf(1.1) popularity): 1–12
    short turns per session (user median 80 tokens, answer median 250), think gaps of
    20 s on average, 0.5 session starts/s."""
    seg, tenants = _Segments(tokens or BlockTokens()), Zipf(40, 1.1)
    for i, rng, t0 in _starts("multitenant", seed, 0.5 * rate):
        k = tenants.draw(rng)
        n = lognormal_int(random.Random(f"multitenant:{seed}:tenant:{k}"), 1500, 0.6, 300, 6000)
        stream = seg("tenant", k, n)
        sid = f"multitenant-{i}"
        turns = _chat_turns(rng, seg, stream, sid, t0, 1 + min(11, int(rng.expovariate(1 / 3))),
                            (80, 0.8, 5, 1500), (250, 0.7, 10, 1500), 20.0)
        yield SynthSession(sid, stream, turns, {"tenant": k, "shared_tokens": n})


def iter_bestofn(seed: int, *, n: int = 4, rate: float = 1.0, tokens: Optional[BlockTokens] = None,
                 warmup: bool = False) -> Iterator[SynthSession]:
    """Best-of-n sampling: a few-shot prompt (one of 3 templates of 800–3000 tokens, then a
    unique question) sent ``n`` times at once (each sample a one-request session with its
    own completion, median 400 tokens), then 0–2 follow-up turns on one of the samples
    (its own session). One group per second; a group's sessions are consecutive.
    ``warmup``: as SGLang serves one request with ``n`` > 1 — the prompt first, alone and
    decoding nothing (session ``.w``, no completion), then the samples (``nsampling``)."""
    seg = _Segments(tokens or BlockTokens())
    for i, rng, t0 in _starts("bestofn", seed, rate, "group"):
        k = rng.randrange(3)
        prompt = seg("template", k, lognormal_int(random.Random(f"bestofn:{seed}:template:{k}"), 1500, 0.3, 800, 3000))
        prompt += seg("question", i, lognormal_int(rng, 200, 0.5, 50, 600))
        samples = [completion_tokens(f"bestofn:{seed}:{i}:{j}", lognormal_int(rng, 400, 0.5, 100, 1500))
                   for j in range(n)]
        if warmup:
            yield SynthSession(f"bestofn-{i}.w", prompt, [(t0, len(prompt), 0)], {"group": i})
        for j, comp in enumerate(samples):
            yield SynthSession(f"bestofn-{i}.{j}", prompt + comp, [(t0, len(prompt), len(comp))], {"group": i})
        follow = rng.randrange(3)
        if follow:
            stream = prompt + samples[rng.randrange(n)]
            sid = f"bestofn-{i}.f"
            turns = _chat_turns(rng, seg, stream, sid, t0 + 5 + rng.expovariate(0.1), follow,
                                (100, 0.6, 10, 800), (300, 0.6, 50, 1200), 15.0)
            yield SynthSession(sid, stream, turns, {"group": i})


def iter_docchat(seed: int, *, rate: float = 1.0, tokens: Optional[BlockTokens] = None) -> Iterator[SynthSession]:
    """Chat with a document: a shared 400-token system prompt, one of 200 documents
    (Zipf(1.0) popularity, median 6000 tokens, 500–40000), then 1–7 questions (median 60
    tokens) and answers (median 200); gaps of 30 s on average, 0.5 session starts/s."""
    seg, docs = _Segments(tokens or BlockTokens()), Zipf(200, 1.0)
    for i, rng, t0 in _starts("docchat", seed, 0.5 * rate):
        d = docs.draw(rng)
        stream = seg("system", 0, 400) + seg("doc", d, lognormal_int(random.Random(f"docchat:{seed}:doc:{d}"),
                                                                     6000, 0.8, 500, 40000))
        sid, shared = f"docchat-{i}", len(stream)
        turns = _chat_turns(rng, seg, stream, sid, t0, rng.randrange(1, 8), (60, 0.7, 5, 400), (200, 0.6, 20, 800), 30.0)
        yield SynthSession(sid, stream, turns, {"doc": d, "shared_tokens": shared})


def iter_compaction(seed: int, *, every: int = 8, rate: float = 1.0, tokens: Optional[BlockTokens] = None
                    ) -> Iterator[SynthSession]:
    """An agent that compacts its context: a shared 2000-token system prompt, a task, then
    append-only turns (tool call median 80 tokens, output median 600, 50–4000); every
    ``every`` turns the history is replaced by a new 800-token summary followed by the last
    turn, which starts a new session (``-c1``, ``-c2``, ...). 10–39 turns per agent, think
    gaps of 7 s on average, one agent start per 8 s."""
    seg = _Segments(tokens or BlockTokens())
    for i, rng, t0 in _starts("compaction", seed, rate / 8):
        head = seg("system", 0, 2000) + seg("task", i, lognormal_int(rng, 500, 0.5, 100, 2000))
        stream, turns, last, t, part = list(head), [], [], t0, 0
        for k in range(rng.randrange(10, 40)):
            if k and k % every == 0:  # compaction: a new context, a new session
                yield SynthSession(f"compaction-{i}-c{part}", stream[: turns[-1][1] + turns[-1][2]], turns)
                part += 1
                stream, turns = head + seg("summary", (i, part), 800) + last, []
            comp = completion_tokens(f"compaction:{seed}:{i}:{k}", lognormal_int(rng, 80, 0.6, 10, 600))
            turns.append((t, len(stream), len(comp)))
            obs = seg("output", (i, k), lognormal_int(rng, 600, 0.9, 50, 4000))
            last = comp + obs
            stream += last
            t += rng.expovariate(1 / 7)
        yield SynthSession(f"compaction-{i}-c{part}", stream[: turns[-1][1] + turns[-1][2]], turns)


OUTSIDE_SHAPES = {"multitenant": iter_multitenant, "bestofn": iter_bestofn, "docchat": iter_docchat,
                  "compaction": iter_compaction, "nsampling": functools.partial(iter_bestofn, warmup=True)}


# -------------------------------------------------------------------- mooncake


def _bad(where: str, what: str):
    from .loaders import TraceError

    return TraceError(f"{where}: {what}")


def _jshort(v) -> str:
    s = json.dumps(v) if not isinstance(v, (bytes, bytearray)) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def check_mooncake(where: str, obj, prev_ts: Optional[float]) -> dict:
    """One Mooncake record, validated; errors name ``where`` and the problem."""
    if not isinstance(obj, dict):
        raise _bad(where, f"expected a JSON object, got {_jshort(obj)}")
    for k in MOONCAKE_KEYS:
        if k not in obj:
            raise _bad(where, f"missing key \"{k}\"")
    ts = obj["timestamp"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
        raise _bad(where, f"timestamp must be a number of milliseconds >= 0, got {_jshort(ts)}")
    if prev_ts is not None and ts < prev_ts:
        raise _bad(where, f"timestamp {ts} is before the previous line's {prev_ts} (the trace must be in arrival order)")
    for k, least in (("input_length", 1), ("output_length", 0)):
        v = obj[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise _bad(where, f"{k} must be an integer >= {least}, got {_jshort(v)}")
    h = obj["hash_ids"]
    if not isinstance(h, list):
        raise _bad(where, f"hash_ids must be a list of block ids, got {_jshort(h)}")
    for j, x in enumerate(h):
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise _bad(where, f"hash_ids[{j}] must be a non-negative integer, got {_jshort(x)}")
    n = obj["input_length"]
    if len(h) != blocks_for(n):
        raise _bad(where, f"input_length {n} needs {blocks_for(n)} hash_ids of {BLOCK_TOKENS} tokens, got {len(h)}")
    return obj


def read_mooncake(path: str) -> list[dict]:
    """Validated records of a Mooncake-format JSONL file (blank lines skipped)."""
    if not os.path.isfile(path):
        raise _bad(path, "no such file")
    out: list[dict] = []
    prev: Optional[float] = None
    from .loaders import json_lines

    for where, _, obj in json_lines(path):
        out.append(check_mooncake(where, obj, prev))
        prev = obj["timestamp"]
    if not out:
        raise _bad(path, "no requests")
    return out


def mooncake_session(session_id: str, rec: dict, tokens: BlockTokens) -> SynthSession:
    """A Mooncake record as a one-request session (prompt from its blocks, completion ids seeded by the id)."""
    prompt = tokens.prompt(rec["hash_ids"], rec["input_length"])
    comp = completion_tokens(f"mooncake:{session_id}", rec["output_length"])
    return SynthSession(session_id, prompt + comp, [(rec["timestamp"] / 1000.0, len(prompt), len(comp))])


# ---------------------------------------------------------------------- loader

#: the replay's sources served here (``--trace SPEC``); their halves: ``--sessions N`` is
#: sessions 1..N, ``--skip-sessions N --sessions N`` sessions N+1..2N of the same trace
SOURCES = ("mooncake", "longdoc", "toolagent", *OUTSIDE_SHAPES)


def source_seed(kind: str, arg: Optional[str], default: int) -> int:
    """``longdoc[:SEED]`` / ``toolagent[:SEED]``: the seed (default: ``--seed``)."""
    if arg is None or arg == "":
        return default
    try:
        return int(arg)
    except ValueError:
        raise _bad(f"--trace {kind}:{arg}", f"SEED must be an integer, got {arg!r}") from None


def load_synthetic(kind: str, arg: Optional[str], opt, cuts) -> tuple[str, list, int, dict]:
    """(name, requests in session order, requests cut by ``opt.max_tokens``, meta) of a source here.

    ``opt`` is the loader's resolved :class:`~.loaders.LoadOptions`: ``skip_sessions``,
    ``sessions``, ``min_turns`` (which sessions are eligible), ``max_turns``, ``max_tokens``
    (a session ends before its first request longer than this) and ``seed``; ``sps`` is the
    Poisson rate (longdoc: requests/s; toolagent: session starts/s). ``mooncake:PATH``
    keeps the file's timestamps. ``cuts`` (a :class:`~.loaders.Cuts`) gets what was left out.
    """
    from .loaders import Request

    tokens = BlockTokens()
    if kind == "mooncake":
        if not arg:
            raise _bad("--trace mooncake", "needs a file: mooncake:PATH.jsonl")
        records = read_mooncake(arg)
        name, meta = os.path.basename(arg), {"format": "mooncake"}
        sessions: Iterable = (mooncake_session(f"line-{i + 1}", r, tokens) for i, r in enumerate(records))
    elif kind == "longdoc":
        seed = source_seed(kind, arg, opt.seed)
        name, meta = f"longdoc:{seed}", {"format": "mooncake", "seed": seed}
        shape = LongDoc(rate=opt.sps)
        sessions = (mooncake_session(f"longdoc-{i}", r, tokens) for i, r in enumerate(iter_longdoc(seed, shape)))
    elif kind == "toolagent":
        seed = source_seed(kind, arg, opt.seed)
        name, meta = f"toolagent:{seed}", {"format": "pre-tokenized", "seed": seed}
        sessions = iter_toolagent(seed, ToolAgent(rate=opt.sps), tokens=tokens)
    else:  # a shape outside the suite: --sps multiplies its arrival rate
        seed = source_seed(kind, arg, opt.seed)
        name, meta = f"{kind}:{seed}", {"format": "pre-tokenized", "seed": seed}
        sessions = OUTSIDE_SHAPES[kind](seed, rate=opt.sps, tokens=tokens)
    requests: list = []
    cut = 0
    kept_turns: dict = {}
    if kind != "mooncake":  # an endless seeded stream: the sessions asked for are the trace
        stop = None if opt.sessions is None else opt.skip_sessions + opt.sessions
        sessions = itertools.islice((x for x in sessions if len(x.turns) >= (opt.min_turns or 1)),
                                    opt.skip_sessions, stop)
    for s in sessions:
        n = cuts.select(len(s.turns), opt) if kind == "mooncake" else len(s.turns)
        if kind == "mooncake" and opt.sessions is not None and cuts.past_sessions:
            break  # a finite file: the rest is past --sessions (counted below)
        turns = s.turns[:n]
        if not turns:
            continue
        kept_turns[s.session_id] = len(turns)
        keep = turns
        if opt.max_tokens is not None:
            keep = list(itertools.takewhile(lambda t: t[1] + t[2] <= opt.max_tokens, turns))
            cut += len(turns) - len(keep)
        if keep:
            stream = tuple(s.stream[: keep[-1][1] + keep[-1][2]])
            requests += [Request(s.session_id, t, k, stream, p, c) for k, (t, p, c) in enumerate(keep)]
    if kind == "mooncake" and cuts.past_sessions:  # count the file's remaining sessions
        rest = sum(1 for _ in sessions)
        cuts.sessions_total += rest
        cuts.past_sessions += rest
    if kind != "mooncake":
        cuts.sessions_total = len(kept_turns)
    cuts.count_token_cuts(kept_turns, requests)
    if not requests and cut == 0:
        raise _bad(f"--trace {kind}" + (f":{arg}" if arg else ""),
                   f"no sessions left after --skip-sessions {opt.skip_sessions}")
    return name, requests, cut, meta


# ---------------------------------------------------------------------- writer


def write_jsonl(path: str, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":")))
            f.write("\n")
            n += 1
    return n


def canonical_rows(sessions: Iterable[SynthSession]) -> list[dict]:
    """Sessions as canonical pre-tokenized rows, ordered by arrival."""
    rows = []
    for s in sessions:
        for t, p, c in s.turns:
            rows.append({"session_id": s.session_id, "arrival_s": round(t, 6), "prompt_ids": s.stream[:p],
                         "completion_ids": s.stream[p:p + c]})
    rows.sort(key=lambda r: r["arrival_s"])  # stable: session order breaks ties
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_marconi.replay.synthetic",
                                 description="Write a seeded synthetic trace: longdoc in the public Mooncake format, "
                                             "the others in the canonical pre-tokenized format.")
    ap.add_argument("shape", choices=("longdoc", "toolagent", *OUTSIDE_SHAPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, help="longdoc: requests (default 1000)")
    ap.add_argument("--sessions", type=int, help="the other shapes: sessions (default 100)")
    ap.add_argument("--out", required=True, help="output JSONL")
    args = ap.parse_args(argv)
    if args.shape == "longdoc":
        if args.sessions is not None:
            ap.error("longdoc takes --requests (one request per session), not --sessions")
        n = args.requests if args.requests is not None else 1000
        rows: Iterable[dict] = longdoc_records(args.seed, n)
    else:
        if args.requests is not None:
            ap.error(f"{args.shape} takes --sessions, not --requests")
        n = args.sessions if args.sessions is not None else 100
        make = iter_toolagent if args.shape == "toolagent" else OUTSIDE_SHAPES[args.shape]
        rows = canonical_rows(itertools.islice(make(args.seed), n))
    if n < 1:
        ap.error(f"the count must be >= 1, got {n}")
    lines = write_jsonl(args.out, rows)
    print(f"wrote {args.out}: {lines} lines", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
