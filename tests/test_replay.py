"""Trace replay end to end on small hand-made pre-tokenized traces (hit rates computable
by hand), through the CLI and the runner, on SGLang's real cache classes (CPU)."""

from __future__ import annotations

import io
import json
import random
import tarfile

import pytest

from sglang_marconi.replay.runner import main, replay_one
from sglang_marconi.replay.loaders import LoadOptions, load_trace
from sglang_marconi.replay.policies import LRU_CONFIG, Budget

BIG = ["--kv-gb", "2", "--ssm-gb", "2"]  # paper-7b: ~30k KV tokens, 74 states: no eviction here


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_MARCONI_REPLAY_CACHE", str(tmp_path / "replay-cache"))


def write_trace(path, reqs):
    """reqs: (session, prompt ids, completion ids); arrivals 0, 1, 2, ..."""
    with open(path, "w") as f:
        for i, (sid, p, c) in enumerate(reqs):
            f.write(json.dumps({"session_id": sid, "arrival_s": float(i), "prompt_ids": list(p),
                                "completion_ids": list(c)}) + "\n")
    return str(path)


def replay_json(tmp_path, trace, *args, name="out.json"):
    out = tmp_path / name
    rc = main(["--trace", trace, "--no-progress", "--json", str(out), *args])
    assert rc == 0
    return json.loads(out.read_text())


def toks(start, n):
    return list(range(start, start + n))


def run_of(doc, policy):
    (run,) = [r for r in doc["runs"] if r["policy"] == policy]
    return run


def test_purely_input_reuse_hits_the_anchor_then_the_branch_point(tmp_path):
    system = toks(1000, 40)
    reqs = [("a", system + [1, 2, 3], [7, 8, 9]), ("b", system + [4, 5, 6], [7, 8]), ("c", system + [10, 11], [12])]
    doc = replay_json(tmp_path, write_trace(tmp_path / "t.jsonl", reqs), "--policies", "marconi,marconi:no-anchor", *BIG)
    # 1st (no hit, no branch point) admits its anchor at 32 (the largest power of two
    # within 43 tokens) and its last token; the 2nd hits the anchor's 32 tokens and
    # admits the branch point at 40 (where the KV match ends) + its last token; the 3rd
    # hits all 40 (its anchor, 32, is not past its hit: only its last token)
    run = run_of(doc, "marconi")
    assert run["hit_tokens"] == 32 + 40
    assert run["input_tokens"] == 43 + 43 + 42
    assert run["token_hit_rate"] == round(72 / 128, 6)
    assert run["ssm_hits"] == 2
    assert run["requests"] == 3
    assert run["states_admitted_per_request"] == round(5 / 3, 4)
    assert run["evictions"] == 0
    from sglang_marconi.policy import builtin_profile

    prof = builtin_profile("paper-7b")
    assert run["flops_saved"] == pytest.approx(prof.prefill_flops(0, 32) + prof.prefill_flops(0, 40))
    assert run["ttft_p95_ms"] == pytest.approx(17.8 + 0.053 * 43)
    assert run["ttft_p50_ms"] == pytest.approx(17.8 + 0.053 * (43 - 32))
    # without the anchor (the paper's admission) the first reuse misses: only the 3rd hits
    old = run_of(doc, "marconi:no-anchor")
    assert old["hit_tokens"] == 40 and old["ssm_hits"] == 1
    assert old["states_admitted_per_request"] == round(4 / 3, 4)


def test_multi_turn_hits_previous_input_plus_output(tmp_path):
    u1, a1 = toks(100, 25), toks(300, 8)
    u2 = u1 + a1 + toks(500, 6)
    a2 = toks(600, 4)
    u3 = u2 + a2 + toks(700, 3)
    reqs = [("s", u1, a1), ("s", u2, a2), ("s", u3, [1])]
    doc = replay_json(tmp_path, write_trace(tmp_path / "t.jsonl", reqs), "--policies", "marconi,lru,sglang", *BIG)
    run = run_of(doc, "marconi")
    # turn k+1 hits turn k's committed length: input + output - 1
    hit2, hit3 = 25 + 8 - 1, len(u2) + 4 - 1
    assert run["hit_tokens"] == hit2 + hit3
    assert run["token_hit_rate"] == round((hit2 + hit3) / (25 + len(u2) + len(u3)), 6)
    assert run["ssm_hits"] == 2
    assert run_of(doc, "lru")["hit_tokens"] == hit2 + hit3
    # SGLang's default cache checkpoints on its 64-token grid: these prompts are shorter than one cell
    assert run_of(doc, "sglang")["hit_tokens"] == 0
    assert {r["policy"] for r in doc["runs"]} == {"marconi", "lru", "sglang"}


def test_vllm_hits_only_whole_blocks(tmp_path):
    prefix = toks(1000, 70)
    u1, a1 = toks(5000, 50), toks(6000, 20)
    reqs = [
        ("a", prefix + [1, 2], [3, 4]),
        ("b", prefix + [5, 6, 7], [8]),  # shares 70 tokens with a: blocks at 32 and 64 exist
        ("c", u1, a1),
        ("c", u1 + a1 + toks(7000, 9), [9, 9]),  # previous committed 69 -> hits 64
    ]
    trace = load_trace(write_trace(tmp_path / "t.jsonl", reqs))
    from sglang_marconi.policy import builtin_profile

    res = replay_one(trace, "vllm", builtin_profile("paper-7b"), Budget(kv_gb=2, ssm_gb=2))
    assert res.hits == [0, 64, 0, 64]
    assert all(h % 32 == 0 for h in res.hits)
    marconi = replay_one(trace, "lru", builtin_profile("paper-7b"), Budget(kv_gb=2, ssm_gb=2))
    assert marconi.hits == [0, 0, 0, 69]  # exact positions: no branch state for b yet; c's whole turn
    doc = replay_json(tmp_path, write_trace(tmp_path / "t2.jsonl", reqs), "--policies", "vllm", "--block", "16", *BIG)
    assert run_of(doc, "vllm")["hit_tokens"] == 64 + 64  # 16-token blocks: 64 and 64 (69 -> 64)


def committed(p, c):
    return list(p) + list(c)[: max(len(c) - 1, 0)]


def prefix_sharing_bound(reqs):
    """For each request: max over earlier requests' committed sequences of the common
    prefix length with input[:-1] (computed here independently of the cache)."""
    out = []
    seen = []
    for p, c in reqs:
        q = list(p)[:-1]
        best = 0
        for s in seen:
            n = 0
            for x, y in zip(q, s):
                if x != y:
                    break
                n += 1
            best = max(best, n)
        out.append(best)
        seen.append(committed(p, c))
    return out


def random_sessions(seed, n_sessions=6, turns=5):
    rng = random.Random(seed)
    systems = [toks(10_000 * (i + 1), rng.randint(20, 90)) for i in range(2)]
    hist = {}
    reqs = []
    for t in range(turns):
        for s in range(n_sessions):
            if t > 0 and rng.random() < 0.3:
                continue
            h = hist.get(s)
            if h is None:
                h = list(rng.choice(systems))
            elif rng.random() < 0.2:  # edit: cut the history mid-way
                h = h[: rng.randint(1, len(h))]
            p = h + [rng.randint(1, 500) for _ in range(rng.randint(1, 40))]
            c = [rng.randint(501, 900) for _ in range(rng.randint(1, 30))]
            reqs.append((f"s{s}", p, c))
            hist[s] = p + c
    return reqs


def test_infinite_equals_prefix_sharing_bound(tmp_path):
    reqs = random_sessions(5)
    trace = load_trace(write_trace(tmp_path / "t.jsonl", reqs))
    expected = prefix_sharing_bound([(p, c) for _, p, c in reqs])
    from sglang_marconi.policy import builtin_profile

    res = replay_one(trace, "infinite", builtin_profile("paper-7b"), None)
    assert res.hits == expected
    assert res.metrics["evictions"] == 0
    assert sum(expected) > 0
    # every finite policy is bounded by it
    doc = replay_json(tmp_path, str(tmp_path / "t.jsonl"), "--policies", "marconi,sglang,lru,vllm,infinite",
                      "--kv-gb", "0.02", "--ssm-gb", "0.2")
    bound = run_of(doc, "infinite")["hit_tokens"]
    assert bound == sum(expected)
    for r in doc["runs"]:
        assert r["hit_tokens"] <= bound


def _tiny_swe_tgz(path, n=3, turns=4, seed=0, created=None):
    rng = random.Random(seed)
    words = "the cache holds a state for every branch of the radix tree and evicts by utility".split()
    with tarfile.open(path, "w:gz") as tf:
        for i in range(n):
            msgs = [{"role": "system", "content": "You are a helpful assistant that can run bash."},
                    {"role": "user", "content": f"<pr_description>\nTask {i}: " + " ".join(rng.choices(words, k=60))}]
            for t in range(turns):
                msgs.append({"role": "assistant", "content": f"THOUGHT: step {t}\n```bash\nls -la dir{t}\n```"})
                if created is not None:
                    msgs[-1]["extra"] = {"response": {"created": created(i, t)}}
                msgs.append({"role": "user", "content": "<returncode>0</returncode>\n<output>"
                             + " ".join(rng.choices(words, k=rng.randint(20, 80))) + "</output>"})
            body = json.dumps({"instance_id": f"repo__task-{i}", "messages": msgs}).encode()
            info = tarfile.TarInfo(f"trajs/repo__task-{i}/repo__task-{i}.traj.json")
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    return str(path)


def test_same_seed_gives_identical_json(tmp_path):
    tgz = _tiny_swe_tgz(tmp_path / "trajs.tgz")
    args = ["--policies", "marconi,sglang,lru,vllm,infinite", "--seed", "7", "--no-timing", "--sweep",
            "frac=0.2,0.5"]
    spec = f"swe-agent:{tgz}"
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    assert main(["--trace", spec, "--no-progress", "--json", str(a), *args]) == 0
    assert main(["--trace", spec, "--no-progress", "--json", str(b), "--no-cache", *args]) == 0
    assert a.read_bytes() == b.read_bytes()
    doc = json.loads(a.read_text())
    assert len(doc["runs"]) == 2 * 4 + 1
    assert all(r["replay_requests_per_s"] is None for r in doc["runs"])
    assert doc["trace_summary"]["requests"] == 12
    # another seed moves the arrivals (and so the interleaving), not the requests
    c = tmp_path / "c.json"
    assert main(["--trace", spec, "--no-progress", "--json", str(c), *args[:3], "8", *args[4:]]) == 0
    assert json.loads(c.read_text())["trace_summary"]["input_tokens"] == doc["trace_summary"]["input_tokens"]


def test_recorded_swe_arrivals_through_the_cli(tmp_path, capsys):
    args = ["--policies", "marconi,lru", "--no-timing", "--no-progress", "--sweep", "frac=0.3", "--swe-arrivals", "recorded"]
    bare = _tiny_swe_tgz(tmp_path / "bare.tgz")
    assert main(["--trace", f"swe-agent:{bare}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "trajs/repo__task-0/repo__task-0.traj.json: message 2 has no numeric extra.response.created" in err
    assert "\n" not in err
    # call t of session i at 1000 + 10 i + 3 t**2: gaps 3, 9, 15 s; session i starts at i s
    tgz = _tiny_swe_tgz(tmp_path / "rec.tgz", created=lambda i, t: 1000 + 10 * i + 3 * t * t)
    out = tmp_path / "rec.json"
    assert main(["--trace", f"swe-agent:{tgz}", "--json", str(out), *args]) == 0
    doc = json.loads(out.read_text())
    assert doc["trace_summary"]["duration_s"] == 2 + 27  # the last session starts at 2 s, its last call 27 s later
    assert run_of(doc, "lru")["requests"] == 12


def test_parallel_jobs_give_the_same_results(tmp_path):
    reqs = random_sessions(11, n_sessions=8, turns=6)
    path = write_trace(tmp_path / "t.jsonl", reqs)
    args = ["--policies", "marconi,sglang,lru,vllm", "--no-timing", "--sweep", "frac=0.1,0.3"]
    one = replay_json(tmp_path, path, *args, name="one.json")
    two = replay_json(tmp_path, path, *args, "--jobs", "2", name="two.json")
    assert one == two
    assert any(r["evictions"] > 0 for r in one["runs"])


def test_single_budget_and_plot(tmp_path):
    reqs = random_sessions(3)
    path = write_trace(tmp_path / "t.jsonl", reqs)
    png = tmp_path / "p.png"
    doc = replay_json(tmp_path, path, "--policies", "marconi,lru,vllm,infinite", "--single-budget",
                      "--sweep", "frac=0.2,0.6", "--plot", str(png))
    assert doc["budget_mode"] == "single"
    runs = [r for r in doc["runs"] if r["policy"] != "infinite"]
    assert all(r["cache_gb"] is not None and r["kv_gb"] is None for r in runs)
    assert png.stat().st_size > 10_000
    assert {"hit_rate_vs_lru", "hit_rate_vs_vllm"} <= set(doc["ratios"][0])


def test_cuts_are_printed_with_their_counts(tmp_path, capsys):
    # 120 sessions (more than the built-in sources' 100); session 5's second request has 33,000 ids
    reqs = [(f"s{i}", toks(10 * i, 5), [1]) for i in range(120)]
    reqs.append(("s5", toks(50, 5) + [1] + toks(0, 33_000), [2]))
    path = write_trace(tmp_path / "t.jsonl", reqs)
    doc = replay_json(tmp_path, path, "--policies", "lru", *BIG)
    assert doc["trace_summary"]["sessions"] == 120 and doc["trace_summary"]["requests"] == 121
    assert "trace: replayed whole (120 sessions; no cut)\n" in capsys.readouterr().out
    doc = replay_json(tmp_path, path, "--policies", "lru", "--sessions", "100", "--max-tokens", "32768", *BIG)
    assert doc["trace_summary"]["requests"] == 100
    assert doc["load"]["cuts"]["token_cut_requests"] == 1
    assert ("trace: kept 100 of 120 sessions (20 past --sessions 100); 1 session cut at --max-tokens 32768 "
            "(1 request dropped)\n") in capsys.readouterr().out


def test_demo_next_steps_point_at_what_exists(capsys):
    """The end of ``make demo``: the replay command parses, the serving command
    selects the marconi backend, the docs it names are there."""
    import pathlib
    import shlex

    from sglang_marconi.demo import main as demo_main
    from sglang_marconi.replay.runner import build_parser

    assert demo_main(["--next"]) == 0
    out = capsys.readouterr().out
    replay = next(ln for ln in out.splitlines() if "sglang_marconi.replay" in ln)
    argv = shlex.split(replay.split("sglang_marconi.replay", 1)[1])
    assert build_parser().parse_args(argv).trace == "your_trace.jsonl"
    assert "sglang.launch_server" in out and "--radix-cache-backend marconi" in out
    root = pathlib.Path(__file__).resolve().parents[1]
    assert "docs/replay.md" in out and (root / "docs" / "replay.md").is_file()


def test_option_errors_are_one_line(tmp_path, capsys):
    path = write_trace(tmp_path / "t.jsonl", [("a", [1, 2, 3], [4])])
    assert main(["--trace", path, "--single-budget", "--cache-gb", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "policy sglang is SGLang's two-pool cache" in err and err.count("\n") == 1
    assert main(["--trace", path, "--kv-gb", "1", "--no-progress"]) == 2
    assert "give both --kv-gb and --ssm-gb" in capsys.readouterr().err
    assert main(["--trace", path, "--policies", "marconi,foo", "--no-progress"]) == 2
    assert "unknown policy 'foo'" in capsys.readouterr().err
    assert main(["--trace", path, "--model", "nope-7b", "--no-progress"]) == 2
    assert "--model: profile='nope-7b'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"session_id": "a", "arrival_s": "x", "prompt_ids": [1], "completion_ids": []}\n')
    assert main(["--trace", str(bad), "--no-progress"]) == 2
    assert 'bad.jsonl:1: arrival_s must be a number, got "x"' in capsys.readouterr().err


def test_variants_run_as_named_marconi_policies(tmp_path):
    reqs = random_sessions(3)
    trace = write_trace(tmp_path / "t.jsonl", reqs)
    doc = replay_json(
        tmp_path, trace, "--policies", "marconi,lru,marconi:same", "--variant", "same={}",
        "--variant", "lru0=" + json.dumps(LRU_CONFIG), "--frac", "0.3", "--no-timing",
    )
    pols = [r["policy"] for r in doc["runs"]]
    assert pols == ["marconi", "lru", "marconi:same", "marconi:lru0"]  # unlisted variants are appended
    strip = lambda r: {k: v for k, v in r.items() if k not in ("policy", "admission")}  # noqa: E731
    # a variant with no overrides is the default policy; one with all of LRU's knobs is LRU
    assert strip(run_of(doc, "marconi:same")) == strip(run_of(doc, "marconi"))
    assert run_of(doc, "marconi:lru0")["hit_tokens"] == run_of(doc, "lru")["hit_tokens"]
    assert {r["policy"] for r in doc["ratios"]} == {"marconi", "marconi:same", "marconi:lru0"}


def test_end_oracle_evicts_a_finished_session_before_a_live_one(tmp_path):
    """KV room for 250 tokens, plenty of states. Sessions b, a and c each leave a
    109-token sequence (100 + 10 - 1); c's needs room, and recency evicts b's, the
    oldest, so b's second turn misses. Told that a's and c's requests are their
    sessions' last (``--end-oracle``), the cache evicts a's instead and b's second
    turn hits all 109 tokens (its 17 new tokens fit beside c's). The learned end
    predictor has seen too few endings to mark anything, and LRU has no
    ``ended_first``: neither changes."""
    from sglang_marconi.policy import builtin_profile

    b1, cb = toks(1000, 100), toks(5000, 10)
    reqs = [("b", b1, cb), ("a", toks(2000, 100), toks(6000, 10)), ("c", toks(3000, 100), toks(7000, 10)),
            ("b", b1 + cb + toks(8000, 5), toks(9000, 3))]
    trace = write_trace(tmp_path / "t.jsonl", reqs)
    kv_gb = repr(250 * builtin_profile("paper-7b").kv_bytes(1) / 1e9)
    # the recency order with its marks (ended_first), a named experiment
    args = ("--policies", "marconi:marks,lru", "--kv-gb", kv_gb, "--ssm-gb", "2", "--no-timing")
    learned = replay_json(tmp_path, trace, *args, name="learned.json")
    oracle = replay_json(tmp_path, trace, *args, "--end-oracle", name="oracle.json")
    assert run_of(learned, "marconi:marks")["hit_tokens"] == 0
    assert run_of(oracle, "marconi:marks")["hit_tokens"] == 109
    assert run_of(oracle, "marconi:marks")["kv_tokens_evicted"] == 109  # a's sequence only
    assert run_of(oracle, "lru")["hit_tokens"] == run_of(learned, "lru")["hit_tokens"] == 0


def test_variant_errors_are_one_line(tmp_path, capsys):
    path = write_trace(tmp_path / "t.jsonl", [("a", [1, 2, 3], [4])])
    for args, needle in (
        (["--variant", "x"], "expected NAME=JSON"),
        (["--variant", "x={bad"], "--variant x: not JSON"),
        (["--variant", 'x={"alhpa": 1}'], "--variant x: unknown key 'alhpa'"),
        (["--variant", "x=[1]"], "must be a JSON object"),
        (["--variant", "x={}", "--variant", "x={}"], "given twice"),
        (["--policies", "marconi:y"], "unknown policy 'marconi:y'"),
        (["--skip-sessions", "-1"], "--skip-sessions must be an integer >= 0"),
        (["--system-prompt", "@/no/such/file"], "--system-prompt @/no/such/file: cannot read"),
        (["--marconi-config", '{"alhpa": 1}'], "--marconi-config: unknown key 'alhpa'"),
        (["--marconi-config", "{bad"], "--marconi-config: not JSON"),
        (["--end-oracle", "--policies", "lru,sglang"], "--end-oracle acts on marconi policies only"),
    ):
        assert main(["--trace", path, "--no-progress", *args]) == 2, args
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, (args, err)


def test_session_bounds_hand_computed():
    """Room for one context of two alternating sessions: LRU always evicts the one
    about to return; Belady does not cache a context that is never reused; the
    end-oracle evicts an ended session before a live one."""
    from sglang_marconi.replay.bounds import session_hit_rate
    from sglang_marconi.replay.loaders import Request

    def req(sid, prompt):  # one-token completions: the committed context is the prompt
        return Request(sid, 0.0, 0, tuple(range(prompt + 1)), prompt, 1)

    reqs = [req("a", 10), req("b", 10), req("a", 11), req("b", 11)]
    assert session_hit_rate(reqs, 12, "lru") == 0.0
    assert session_hit_rate(reqs, 12, "end-oracle") == 0.0  # both sessions live until their last turn
    assert session_hit_rate(reqs, 12, "belady") == pytest.approx(10 / 42)  # a1 is a's last: not cached
    assert session_hit_rate(reqs, 100, "lru") == pytest.approx(20 / 42)
    reqs2 = [req("a", 10), req("c", 5), req("d", 5), req("a", 12)]  # c and d are one-shot
    assert session_hit_rate(reqs2, 15, "lru") == 0.0  # d evicts a, the least recent
    assert session_hit_rate(reqs2, 15, "end-oracle") == pytest.approx(10 / 32)  # d evicts c (ended)
    with pytest.raises(ValueError, match="unknown bound policy"):
        session_hit_rate(reqs, 10, "fifo")


def test_turn_hazard_bound_hand_computed():
    """Room for two contexts; x's only request is at turn 5 and every request in
    turns 5-9 ends its session (h = 1), so when w arrives turn-hazard evicts x,
    the more recent, and y's return hits; LRU evicts y."""
    from sglang_marconi.replay.bounds import HAZARD_BUCKET, session_hit_rate, turn_hazards
    from sglang_marconi.replay.loaders import Request

    def req(sid, t, turn, prompt):
        return Request(sid, t, turn, tuple(range(prompt + 1)), prompt, 1)

    reqs = [req("y", 0.0, 0, 10), req("x", 1.0, HAZARD_BUCKET, 10), req("w", 2.0, 0, 10), req("y", 3.0, 1, 11)]
    hazard, gap = turn_hazards(reqs, [3, 4, 4, 4])
    assert hazard == {0: pytest.approx(2 / 3), 1: 1.0} and gap == 3.0
    assert session_hit_rate(reqs, 25, "lru") == 0.0
    assert session_hit_rate(reqs, 25, "turn-hazard") == pytest.approx(10 / 41)
    assert session_hit_rate(reqs, 25, "end-oracle") == pytest.approx(10 / 41)


# ------------------------------------------------------------------ live-hit ceiling


def _arrays(*seqs):
    import numpy as np

    return [np.asarray(s, dtype=np.int64) for s in seqs]


def test_hit_ceiling_hand_computed():
    """Prefixes a=[1,2,3], b=[1,2,3,4], c=[1,2,5], d=[7,8]: tokens 1 and 2 are on
    three prefixes, 3 on two; b, c and d have 1, 1 and 2 tokens of their own."""
    from sglang_marconi.replay.bounds import hit_ceiling, shared_histogram

    p = _arrays([1, 2, 3], [1, 2, 3, 4], [1, 2, 5], [7, 8])
    runs, shared = shared_histogram(p)
    assert sorted(runs) == [(2, 1), (3, 2)]
    assert shared == [3, 3, 2, 0]
    assert hit_ceiling(p, 2) == 6  # 1, 2: three prefixes each
    assert hit_ceiling(p, 4) == 9  # + 3 (two) + one own token
    assert hit_ceiling(p, 10) == 12  # everything: 3 + 4 + 3 + 2
    # a state per prefix that keeps own tokens costs 2 tokens of room (7 left after the shared 3):
    # one prefix keeps 2 own tokens (cost 4) or two keep 3 (cost 7); three would leave 1
    assert hit_ceiling(p, 10, state_tokens=2) == 11
    assert hit_ceiling(p, 10, max_states=1) == 10  # d's 2 own tokens only
    assert hit_ceiling(p, 0) == 0 and hit_ceiling([], 10) == 0
    with pytest.raises(ValueError, match="state_tokens must be >= 0"):
        hit_ceiling(p, 10, state_tokens=-1)


def test_hit_ceiling_is_the_best_prefix_closed_choice():
    """Against brute force on small alphabets: every way to keep a prefix of each
    sequence whose union (plus a state per sequence keeping tokens past what it
    shares) fits the room. The ceiling is that maximum, not just above it."""
    import itertools

    from hypothesis import given, settings, strategies as stn

    from sglang_marconi.replay.bounds import hit_ceiling, shared_histogram

    seq = stn.lists(stn.integers(0, 2), min_size=0, max_size=4)

    @settings(max_examples=150, deadline=None)
    @given(stn.lists(seq, min_size=1, max_size=4), stn.integers(0, 14), stn.sampled_from([0.0, 1.5]),
           stn.sampled_from([None, 1, 2]))
    def check(seqs, room, sigma, max_states):
        p = _arrays(*seqs)
        _, shared = shared_histogram(p)
        best = 0
        for keep in itertools.product(*(range(len(s) + 1) for s in seqs)):
            union = {tuple(s[:k][: i + 1]) for s, k in zip(seqs, keep) for i in range(k)}
            owners = sum(k > m for k, m in zip(keep, shared))
            if max_states is not None and owners > max_states:
                continue
            if len(union) + sigma * owners <= room:
                best = max(best, sum(keep))
        assert hit_ceiling(p, room, state_tokens=sigma, max_states=max_states) == pytest.approx(best)

    check()


def test_weighted_choice_hand_computed():
    """The prefixes of the ceiling's test, worth a=1, b=0.5, c=0.2, d=0.9: tokens 1-2
    are worth 1.7, token 3 1.5, d's own 7-8 0.9, b's own 4 0.5, c's own 5 0.2; the
    most valuable go first, a child only after its parent."""
    from sglang_marconi.replay.bounds import weighted_choice

    p = _arrays([1, 2, 3], [1, 2, 3, 4], [1, 2, 5], [7, 8])
    w = [1.0, 0.5, 0.2, 0.9]
    assert weighted_choice(p, w, 4) == [3, 3, 2, 1]  # 1, 2, 3, then one of d's
    assert weighted_choice(p, w, 3, state_tokens=1) == [3, 3, 2, 0]  # no room left for d's state
    assert weighted_choice(p, w, 6, state_tokens=1) == [3, 3, 2, 2]  # d's state + 2 tokens; b's state does not fit
    assert weighted_choice(p, w, 10, max_states=1) == [3, 3, 2, 2]  # d's state, not b's or c's
    assert weighted_choice(p, w, 10) == [3, 4, 3, 2]
    assert weighted_choice(p, [1.0, 0.5, 0.2, 0.0], 10) == [3, 4, 3, 0]  # worth nothing: not kept
    assert weighted_choice(p, w, 0) == [0, 0, 0, 0] and weighted_choice([], [], 5) == []
    # own tokens whole or not at all: with room 4, d's two own tokens do not fit after 1, 2, 3
    # (one token of room left), b's one does
    assert weighted_choice(p, w, 4, whole=True) == [3, 4, 2, 0]
    assert weighted_choice(p, w, 5, whole=True) == [3, 3, 2, 2]


def test_weighted_choice_with_equal_weights_is_the_ceiling():
    """All weights 1 and no state charge: the kept tokens are the ceiling's count; with
    any weights the kept set fits the room and holds only tokens of prefixes worth
    something (hypothesis, small alphabets)."""
    from hypothesis import given, settings, strategies as stn

    from sglang_marconi.replay.bounds import hit_ceiling, weighted_choice

    seq = stn.lists(stn.integers(0, 2), min_size=0, max_size=5)

    @settings(max_examples=200, deadline=None)
    @given(stn.lists(seq, min_size=1, max_size=5), stn.integers(0, 16),
           stn.lists(stn.sampled_from([0.0, 0.1, 0.5, 1.0]), min_size=5, max_size=5))
    def check(seqs, room, weights):
        p = _arrays(*seqs)
        kept = weighted_choice(p, [1.0] * len(p), room)
        assert sum(kept) == hit_ceiling(p, room)
        kept = weighted_choice(p, weights[: len(p)], room)
        union = {tuple(s[: i + 1]) for s, k in zip(seqs, kept) for i in range(k)}
        assert len(union) <= room and all(0 <= k <= len(s) for s, k in zip(seqs, kept))
        worth = {t for s, k, w in zip(seqs, kept, weights) if w > 0 for t in (tuple(s[: i + 1]) for i in range(k))}
        assert union == worth  # a token is kept only for a prefix worth something

    check()


def test_peek_hit_is_the_next_hit_and_changes_nothing(tmp_path):
    """``--live-ceiling 1`` walks the tree before every request: the hits are
    those of the same replay without it, request for request, and each policy's
    expected hit sits at or below the ceiling. A session's next request hits
    what the probe said it would."""
    from sglang_marconi.policy import builtin_profile

    rng = random.Random(3)
    reqs, history = [], {}
    for i in range(40):
        sid = f"s{rng.randrange(5)}"
        prompt = history.get(sid, toks(0, 20)) + toks(1000 * (i + 1), rng.randrange(5, 40))
        out = toks(500_000 + 1000 * i, rng.randrange(2, 12))
        reqs.append((sid, prompt, out))
        history[sid] = prompt + out
    trace = write_trace(tmp_path / "t.jsonl", reqs)
    kv_gb = repr(150 * builtin_profile("paper-7b").kv_bytes(1) / 1e9)
    args = ("--policies", "lru,marconi", "--kv-gb", kv_gb, "--ssm-gb", "0.5", "--no-timing")
    plain = replay_json(tmp_path, trace, *args, name="plain.json")
    probed = replay_json(tmp_path, trace, *args, "--live-ceiling", "1", name="probed.json")
    for policy in ("lru", "marconi"):
        a, b = run_of(plain, policy), run_of(probed, policy)
        assert a["hit_tokens"] == b["hit_tokens"] and a["kv_tokens_evicted"] == b["kv_tokens_evicted"]
        assert b["live_samples"] > 20
        assert 0 < b["live_expected_hit"] <= b["live_hit_ceiling"]
        assert 0 < b["live_end_blind_ceiling"] <= b["live_hit_ceiling"]
        assert 0 < b["live_end_blind_whole"] <= b["live_hit_ceiling"]
        assert "live_expected_hit" not in a or a["live_expected_hit"] is None

    # the probe's walk against the real match, request by request
    from sglang_marconi.replay.policies import Budget, PolicyOptions, TraceShape, build_policy, close
    from sglang_marconi.replay.loaders import LoadOptions, load_trace

    t = load_trace(trace, LoadOptions())
    profile = builtin_profile("paper-7b")
    budget = Budget(kv_gb=float(kv_gb), ssm_gb=0.5)
    built, drv, _ = build_policy("marconi", profile, budget, TraceShape(t.longest, len(t.requests), t.stream_tokens()),
                                 PolicyOptions())
    try:
        for r in t.requests:
            expected = drv.peek_hit(r.prompt_ids[:-1])
            assert drv.peek_hit(r.prompt_ids[:-1]) == expected
            assert drv.run(r.prompt_ids, r.completion_ids).hit_len == expected
    finally:
        close(built)


def test_live_ceiling_option_error(tmp_path, capsys):
    path = write_trace(tmp_path / "t.jsonl", [("a", [1, 2, 3], [4])])
    assert main(["--trace", path, "--no-progress", "--live-ceiling", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--live-ceiling must be an integer >= 1 (0: off), got -1" in err and err.count("\n") == 1
