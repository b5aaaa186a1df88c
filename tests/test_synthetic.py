"""Seeded synthetic shapes (longdoc, toolagent) and the Mooncake source: determinism, what is
shared (exactly the shared blocks), format errors, and the shapes' stated statistics."""

from __future__ import annotations

import itertools
import json
import statistics
from collections import Counter

import pytest

from sglang_marconi.replay import synthetic as syn
from sglang_marconi.replay.loaders import LoadOptions, TraceError, default_max_tokens, load_trace

UNCUT = LoadOptions(sessions=None, max_tokens=None)


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def streams(trace) -> dict:
    return {r.session_id: r.stream for r in trace.requests}


# ----------------------------------------------------------------- determinism


def test_generators_are_deterministic_per_seed():
    assert syn.longdoc_records(3, 40) == syn.longdoc_records(3, 40)
    assert syn.longdoc_records(3, 40) != syn.longdoc_records(4, 40)
    a = [(s.stream, s.turns) for s in itertools.islice(syn.iter_toolagent(3), 6)]
    b = [(s.stream, s.turns) for s in itertools.islice(syn.iter_toolagent(3), 6)]
    c = [(s.stream, s.turns) for s in itertools.islice(syn.iter_toolagent(4), 6)]
    assert a == b and a != c
    for spec in ("longdoc:5", "toolagent:5"):
        t1 = load_trace(spec, LoadOptions(sessions=8, max_tokens=None))
        t2 = load_trace(spec, LoadOptions(sessions=8, max_tokens=None))
        assert [(r.session_id, r.arrival_s, r.prompt_ids, r.completion_ids) for r in t1.requests] == \
               [(r.session_id, r.arrival_s, r.prompt_ids, r.completion_ids) for r in t2.requests]


@pytest.mark.parametrize("spec", ["longdoc:2", "toolagent:2"])
def test_halves_are_the_two_halves_of_one_trace(spec):
    whole = load_trace(spec, LoadOptions(sessions=12, max_tokens=None))
    first = load_trace(spec, LoadOptions(sessions=6, max_tokens=None))
    second = load_trace(spec, LoadOptions(sessions=6, skip_sessions=6, max_tokens=None))
    key = lambda t: sorted((r.session_id, r.turn, r.prompt_ids, r.completion_ids) for r in t.requests)  # noqa: E731
    assert key(whole) == sorted(key(first) + key(second))
    assert not set(streams(first)) & set(streams(second))
    assert first.sessions == second.sessions == 6


def test_seed_defaults_to_the_seed_option():
    a = load_trace("longdoc", LoadOptions(sessions=5, seed=9, max_tokens=None))
    b = load_trace("longdoc:9", LoadOptions(sessions=5, max_tokens=None))
    assert [r.prompt_ids for r in a.requests] == [r.prompt_ids for r in b.requests]


# -------------------------------------------------------------- what is shared


def test_longdoc_prompts_share_exactly_their_common_leading_blocks():
    recs = syn.longdoc_records(1, 80)
    book = syn.BlockTokens()
    prompts = [book.prompt(r["hash_ids"], r["input_length"]) for r in recs]
    shared_pairs = 0
    for (ra, pa), (rb, pb) in itertools.combinations(zip(recs, prompts), 2):
        blocks = common_prefix(ra["hash_ids"], rb["hash_ids"])
        expect = min(blocks * syn.BLOCK_TOKENS, len(pa), len(pb))
        assert common_prefix(pa, pb) == expect
        shared_pairs += blocks > 0
    assert shared_pairs > 100  # the shape does share documents and system prompts
    for r, p in zip(recs, prompts):
        assert len(p) == r["input_length"] and all(syn.PROMPT_IDS[0] <= t < syn.PROMPT_IDS[1] for t in p)


def test_block_runs_are_distinct_from_their_first_token():
    book = syn.BlockTokens()
    firsts = [book.run(b)[0] for b in range(20000)]
    assert len(set(firsts)) == len(firsts)
    assert book.run(7) == syn.BlockTokens().run(7) and len(book.run(7)) == syn.BLOCK_TOKENS


def test_longdoc_ids_are_assigned_in_order_of_first_appearance():
    seen = -1
    for r in syn.longdoc_records(0, 200):
        for h in r["hash_ids"]:
            assert h <= seen + 1
            seen = max(seen, h)
        assert len(r["hash_ids"]) == -(-r["input_length"] // 512)


def test_toolagent_sessions_share_only_the_system_prompt():
    sessions = list(itertools.islice(syn.iter_toolagent(0), 40))
    for a, b in itertools.combinations(sessions, 2):
        same = a.meta["toolset"] == b.meta["toolset"]
        expect = a.meta["system_tokens"] if same else syn.BLOCK_TOKENS  # toolset's prompt, or the preamble
        assert common_prefix(a.stream, b.stream) == expect
    for s in sessions:
        assert all(0 <= t < 150_000 for t in s.stream)
        for t, p, c in s.turns:  # completions come from their own id range
            assert all(syn.COMPLETION_IDS[0] <= x < syn.COMPLETION_IDS[1] for x in s.stream[p:p + c])
        assert all(x < syn.COMPLETION_IDS[0] for x in s.stream[: s.turns[0][1]])


def test_toolagent_retrieved_documents_are_shared_off_the_prefix():
    sessions = list(itertools.islice(syn.iter_toolagent(0), 60))
    runs: dict = {}
    for s in sessions:
        start = s.turns[0][1]  # after the system prompt and the task
        for i in range(start, len(s.stream) - 16):
            runs.setdefault(tuple(s.stream[i:i + 16]), set()).add(s.session_id)
    shared = [k for k, v in runs.items() if len(v) > 1]
    assert shared, "no retrieved document appears in two sessions"


def test_toolagent_requests_are_append_only():
    trace = load_trace("toolagent:1", LoadOptions(sessions=10, max_tokens=None))
    last: dict = {}
    for r in trace.requests:
        prev = last.get(r.session_id)
        if prev is not None:
            assert r.prompt_ids[: len(prev)] == prev and r.arrival_s >= 0
        last[r.session_id] = r.prompt_ids + r.completion_ids


# ------------------------------------------------------------------ statistics


def test_longdoc_statistics():
    recs = syn.longdoc_records(0, 20000)
    lengths = [r["input_length"] for r in recs]
    assert abs(statistics.mean(lengths) - 13_700) < 0.05 * 13_700
    assert 100_000 < max(lengths) <= 123_000
    assert statistics.median(lengths) < 0.8 * statistics.mean(lengths)  # heavy tail
    docs = Counter(d for _, d in itertools.islice(syn.longdoc_draws(0), 4000))
    top = sum(n for _, n in docs.most_common(syn.LongDoc().documents // 100))
    assert top > 0.3 * 4000  # the most popular 1% of documents: over 30% of requests
    gaps = [(b["timestamp"] - a["timestamp"]) / 1000 for a, b in zip(recs, recs[1:])]
    assert abs(statistics.mean(gaps) - 1.0) < 0.05  # Poisson, 1 request/s


def test_longdoc_reuse_in_a_suite_sized_trace():
    recs = syn.longdoc_records(0, 800)
    seen: set = set()
    reused = total = 0
    for r in recs:
        h = r["hash_ids"]
        k = 0
        while k < len(h) and tuple(h[: k + 1]) in seen:
            k += 1
        seen.update(tuple(h[:j]) for j in range(1, len(h) + 1))
        reused += min(k * 512, r["input_length"])
        total += r["input_length"]
    assert 0.25 < reused / total < 0.6


def test_toolagent_statistics():
    shape = syn.ToolAgent()
    sessions = list(itertools.islice(syn.iter_toolagent(0), 400))
    turns = [len(s.turns) for s in sessions]
    assert 12 < statistics.mean(turns) < 16.5  # geometric, mean 15, cut by the context window
    assert all(shape.system_tokens[0] <= s.meta["system_tokens"] <= shape.system_tokens[1] for s in sessions)
    assert all(s.turns[-1][1] + s.turns[-1][2] <= shape.max_context for s in sessions)
    toolsets = Counter(s.meta["toolset"] for s in sessions)
    assert toolsets.most_common(1)[0][1] > 0.3 * len(sessions)  # skewed toolset popularity
    outputs = [b[1] - a[1] - a[2] for s in sessions for a, b in zip(s.turns, s.turns[1:])]
    assert min(outputs) >= 100 and max(outputs) <= 4000
    starts = [s.turns[0][0] for s in sessions]
    assert abs(statistics.mean(b - a for a, b in zip(starts, starts[1:])) - 1.0) < 0.15


# ------------------------------------------------------------- mooncake format


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def ok(ts=0, n=600, out=5, ids=(0, 1)):
    return {"timestamp": ts, "input_length": n, "output_length": out, "hash_ids": list(ids)}


BAD = [
    ([ok(), "{oops"], 2, "not JSON (Expecting property name enclosed in double quotes at column 2)"),
    ([{"timestamp": 0, "input_length": 5, "output_length": 1}], 1, 'missing key "hash_ids"'),
    ([ok(), ok(ts="1")], 2, 'timestamp must be a number of milliseconds >= 0, got "1"'),
    ([ok(ts=50), ok(ts=10)], 2, "timestamp 10 is before the previous line's 50 (the trace must be in arrival order)"),
    ([ok(n=0, ids=())], 1, "input_length must be an integer >= 1, got 0"),
    ([ok(out=True)], 1, "output_length must be an integer >= 0, got true"),
    ([ok(ids=(0, "a"))], 1, 'hash_ids[1] must be a non-negative integer, got "a"'),
    ([ok(n=1100, ids=(0, 1))], 1, "input_length 1100 needs 3 hash_ids of 512 tokens, got 2"),
    (["[1, 2]"], 1, "expected a JSON object, got [1, 2]"),
]


@pytest.mark.parametrize("rows,lineno,problem", BAD)
def test_mooncake_errors_name_file_line_and_problem(tmp_path, rows, lineno, problem):
    path = write_lines(tmp_path / "t.jsonl", rows)
    with pytest.raises(TraceError) as e:
        load_trace(f"mooncake:{path}", UNCUT)
    assert str(e.value) == f"{path}:{lineno}: {problem}"
    assert "\n" not in str(e.value)


def test_source_spec_errors(tmp_path):
    with pytest.raises(TraceError, match="SEED must be an integer, got 'x'"):
        load_trace("longdoc:x", UNCUT)
    with pytest.raises(TraceError, match="needs a file: mooncake:PATH.jsonl"):
        load_trace("mooncake", UNCUT)
    with pytest.raises(TraceError, match="no such file"):
        load_trace(f"mooncake:{tmp_path / 'none.jsonl'}", UNCUT)
    with pytest.raises(TraceError, match="no sessions left after --skip-sessions 5"):
        load_trace(f"mooncake:{write_lines(tmp_path / 't.jsonl', [ok()])}", LoadOptions(skip_sessions=5))


def test_written_longdoc_file_loads_as_the_generated_source(tmp_path):
    out = tmp_path / "ld.jsonl"
    assert syn.main(["longdoc", "--seed", "7", "--requests", "30", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows == syn.longdoc_records(7, 30) and set(rows[0]) == set(syn.MOONCAKE_KEYS)
    a = load_trace(f"mooncake:{out}", UNCUT)
    b = load_trace("longdoc:7", LoadOptions(sessions=30, max_tokens=None))
    assert [(r.arrival_s, r.prompt_ids) for r in a.requests] == [(r.arrival_s, r.prompt_ids) for r in b.requests]
    assert a.meta["format"] == "mooncake" and len(a.requests) == 30


def test_written_toolagent_file_loads_as_the_generated_source(tmp_path):
    out = tmp_path / "ta.jsonl"
    assert syn.main(["toolagent", "--seed", "2", "--sessions", "5", "--out", str(out)]) == 0
    a = load_trace(str(out), UNCUT)
    b = load_trace("toolagent:2", LoadOptions(sessions=5, max_tokens=None))
    key = lambda t: sorted((r.session_id, r.turn, r.prompt_ids, r.completion_ids) for r in t.requests)  # noqa: E731
    assert key(a) == key(b)


def test_max_tokens_cut_and_defaults():
    assert default_max_tokens("longdoc", None) is None and default_max_tokens("mooncake:x.jsonl", None) is None
    assert default_max_tokens("sharegpt", None) == 32768 and default_max_tokens("longdoc", 4096) == 4096
    whole = load_trace("longdoc:0", LoadOptions(sessions=50, max_tokens=None))
    cut = load_trace("longdoc:0", LoadOptions(sessions=50, max_tokens=16384))
    dropped = sum(r.prompt_len + r.completion_len > 16384 for r in whole.requests)
    assert dropped > 0 and len(cut.requests) == 50 - dropped
    assert cut.meta["requests_cut_by_max_tokens"] == dropped


# ------------------------------------------------------ shapes outside the suite

OUTSIDE = sorted(syn.OUTSIDE_SHAPES)


@pytest.mark.parametrize("kind", OUTSIDE)
def test_outside_shapes_are_seeded_prefix_stable_and_append_only(kind):
    gen = syn.OUTSIDE_SHAPES[kind]
    a = [(s.session_id, s.stream, s.turns) for s in itertools.islice(gen(3), 12)]
    assert a == [(s.session_id, s.stream, s.turns) for s in itertools.islice(gen(3), 12)]
    assert a[:5] == [(s.session_id, s.stream, s.turns) for s in itertools.islice(gen(3), 5)]
    assert a != [(s.session_id, s.stream, s.turns) for s in itertools.islice(gen(4), 12)]
    whole = load_trace(f"{kind}:3", LoadOptions(sessions=12))
    first = load_trace(f"{kind}:3", LoadOptions(sessions=6))
    second = load_trace(f"{kind}:3", LoadOptions(sessions=6, skip_sessions=6))
    key = lambda t: sorted((r.session_id, r.turn, r.prompt_ids, r.completion_ids) for r in t.requests)  # noqa: E731
    assert key(whole) == sorted(key(first) + key(second)) and whole.sessions == 12
    last: dict = {}
    for r in whole.requests:  # within a session each request extends the previous one
        prev = last.get(r.session_id)
        assert prev is None or r.prompt_ids[: len(prev)] == prev
        assert all(0 <= t < 150_000 for t in r.prompt_ids + r.completion_ids)
        last[r.session_id] = r.prompt_ids + r.completion_ids
    assert [r.arrival_s for r in whole.requests] == sorted(r.arrival_s for r in whole.requests)


def test_multitenant_and_docchat_share_exactly_the_tenant_prompt_or_the_document():
    for gen, key in ((syn.iter_multitenant, "tenant"), (syn.iter_docchat, "doc")):
        sessions = list(itertools.islice(gen(0), 60))
        assert len({s.meta[key] for s in sessions}) < len(sessions), key  # skewed popularity: repeats
        for a, b in itertools.combinations(sessions, 2):
            n = common_prefix(a.stream, b.stream)
            if a.meta[key] == b.meta[key]:  # the same prompt or document whole, then unique messages
                assert n == a.meta["shared_tokens"] == b.meta["shared_tokens"]
            else:  # different tenants share nothing; different documents the system prompt
                assert n == (0 if key == "tenant" else 400)


def test_bestofn_groups_send_one_prompt_n_times_then_follow_one_sample():
    sessions = list(itertools.islice(syn.iter_bestofn(0), 40))
    groups: dict = {}
    for s in sessions:
        groups.setdefault(s.meta["group"], []).append(s)
    assert any(any(s.session_id.endswith(".f") for s in g) for g in groups.values())
    for g in list(groups.values())[:-1]:  # the last group may be cut by islice
        samples = [s for s in g if not s.session_id.endswith(".f")]
        assert len(samples) == 4
        p = samples[0].turns[0][1]
        assert all(s.turns[0][:2] == (samples[0].turns[0][0], p) and s.stream[:p] == samples[0].stream[:p]
                   for s in samples)
        assert len({tuple(s.stream[p:]) for s in samples}) == 4  # four different completions
        for f in (s for s in g if s.session_id.endswith(".f")):
            assert any(f.stream[: len(s.stream)] == s.stream for s in samples)  # continues one sample
            assert f.turns[0][0] > samples[0].turns[0][0]


def test_nsampling_is_bestofn_with_the_prompt_prefilled_alone_first():
    """SGLang's ``n`` > 1: before the samples, the prompt alone, decoding nothing."""
    plain = list(itertools.islice(syn.iter_bestofn(0), 40))
    warm = list(itertools.islice(syn.OUTSIDE_SHAPES["nsampling"](0), 50))
    firsts = [s for s in warm if s.session_id.endswith(".w")]
    assert firsts and [s for s in warm if not s.session_id.endswith(".w")][:40] == plain
    for w in firsts:
        sample = next(s for s in warm if s.session_id == w.session_id[:-2] + ".0")
        t, p, c = sample.turns[0]
        assert w.turns == [(t, p, 0)] and w.stream == sample.stream[:p]
        assert warm.index(w) == warm.index(sample) - 1  # sent first
    tr = load_trace("nsampling:0", LoadOptions(sessions=10))
    warmups = [r for r in tr.requests if r.session_id.endswith(".w")]
    assert warmups and all(len(r.completion_ids) == 0 for r in warmups)


def test_compaction_restarts_from_the_system_prompt_task_and_a_summary():
    parts = list(itertools.islice(syn.iter_compaction(0), 12))
    by_agent: dict = {}
    for s in parts:
        agent, part = s.session_id.rsplit("-c", 1)
        by_agent.setdefault(agent, []).append((int(part), s))
    system = parts[0].stream[:2000]
    assert all(s.stream[:2000] == system for s in parts)
    compacted = [v for v in by_agent.values() if len(v) > 1]
    assert compacted
    for v in compacted:
        v.sort(key=lambda x: x[0])
        assert [p for p, _ in v] == list(range(len(v)))
        head = v[0][1].turns[0][1]  # system + task
        for (_, a), (_, b) in zip(v, v[1:]):
            assert b.stream[:head] == a.stream[:head]
            assert common_prefix(a.stream, b.stream) < head + 800  # the summary is new
            assert len(a.turns) == 8 and b.turns[0][0] > a.turns[-1][0]


def test_outside_shape_errors_and_writer(tmp_path):
    with pytest.raises(TraceError, match="SEED must be an integer, got 'x'"):
        load_trace("docchat:x", UNCUT)
    out = tmp_path / "bo.jsonl"
    assert syn.main(["bestofn", "--seed", "2", "--sessions", "9", "--out", str(out)]) == 0
    a = load_trace(str(out), UNCUT)
    b = load_trace("bestofn:2", LoadOptions(sessions=9))
    key = lambda t: sorted((r.session_id, r.turn, r.prompt_ids, r.completion_ids) for r in t.requests)  # noqa: E731
    assert key(a) == key(b)


def test_sps_multiplies_an_outside_shapes_arrival_rate():
    one = load_trace("docchat:1", LoadOptions(sessions=20))
    two = load_trace("docchat:1", LoadOptions(sessions=20, sps=2.0))
    starts = lambda t: sorted({r.session_id: r.arrival_s for r in t.requests if r.turn == 0}.values())  # noqa: E731
    assert starts(two)[-1] == pytest.approx(starts(one)[-1] / 2)
    assert sorted(r.prompt_ids for r in one.requests) == sorted(r.prompt_ids for r in two.requests)
