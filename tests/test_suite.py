"""The evaluation suite on a tiny config: one shape, one budget, lru against an lru-equivalent
variant (ratios exactly 1) and SGLang's own cache (two pools only)."""

from __future__ import annotations

import json

import pytest

from sglang_marconi.replay import suite
from sglang_marconi.replay.policies import LRU_CONFIG

LRU_EQ = "lrueq=" + json.dumps(LRU_CONFIG)


@pytest.fixture(autouse=True)
def tiny_shape(monkeypatch):
    monkeypatch.setitem(suite.SHAPES, "toolagent", suite.Shape("toolagent:0", {"max_tokens": None}, 3, 2, "tiny"))


def test_tiny_suite_table_and_json(tmp_path, capsys):
    out = tmp_path / "suite.json"
    rc = suite.main(["--half", "choice", "--shapes", "toolagent", "--profiles", "paper-7b", "--budgets", "0.25",
                     "--policies", "lru,sglang", "--variant", LRU_EQ, "--jobs", "1", "--no-progress",
                     "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "marconi:lrueq ÷ lru" in printed and "geomean ÷ lru" in printed
    doc = json.loads(out.read_text())
    assert doc["policies"] == ["lru", "sglang", "marconi:lrueq"]
    assert doc["shapes"]["toolagent"]["sessions"] == [1, 3]
    cells = {c["layout"]: c for c in doc["cells"]}
    assert set(cells) == {"two", "one"} and all(c["frac"] == 0.25 for c in cells.values())
    assert set(cells["two"]["runs"]) == {"lru", "sglang", "marconi:lrueq"}
    assert set(cells["one"]["runs"]) == {"lru", "marconi:lrueq"}  # sglang has no single byte budget
    for c in cells.values():
        runs, ratios = c["runs"], c["ratios"]
        assert runs["lru"]["token_hit_rate"] > 0
        assert runs["marconi:lrueq"]["hit_tokens"] == runs["lru"]["hit_tokens"]
        assert ratios["marconi:lrueq"]["vs_lru"] == 1.0 and ratios["marconi:lrueq"]["flops_vs_lru"] == 1.0
    two = cells["two"]
    sg = two["runs"]["sglang"]["token_hit_rate"] / two["runs"]["lru"]["token_hit_rate"]
    assert two["ratios"]["sglang"]["vs_lru"] == pytest.approx(sg)
    assert two["ratios"]["lru"]["vs_sglang"] == pytest.approx(1 / sg)
    assert cells["one"]["budget"]["cache_gb"] is not None and two["budget"]["kv_gb"] is not None
    s = doc["summary"]["marconi:lrueq"]
    assert s["cells"] == 2 and s["geomean_vs_lru"] == 1.0 and s["worst_vs_lru"] == 1.0
    assert s["cells_below_0.99_lru"] == 0 and s["speed_vs_lru"] > 0
    assert doc["summary"]["sglang"]["cells"] == 1
    assert doc["summary"]["sglang"]["geomean_vs_lru"] == pytest.approx(sg)


@pytest.mark.parametrize("half,first", [("heldout", 4), ("fresh", 7)])
def test_heldout_and_fresh_are_the_next_sessions(half, first):
    args = suite.build_parser().parse_args(["--half", half, "--shapes", "toolagent", "--profiles", "paper-7b",
                                            "--layouts", "two", "--budgets", "0.25", "--policies", "lru",
                                            "--jobs", "1", "--no-progress", "--quick"])
    doc = suite.run(args)
    # quick: the first 2 of sessions 4..6 (heldout) or 7..9 (fresh)
    assert doc["shapes"]["toolagent"]["sessions"] == [first, first + 1]
    assert doc["shapes"]["toolagent"]["trace_summary"]["sessions"] == 2 and len(doc["cells"]) == 1


@pytest.mark.parametrize("argv,problem", [
    (["--shapes", "nope"], "--shapes: unknown 'nope'"),
    (["--budgets", "0.1,x"], "--budgets '0.1,x': expected comma-separated fractions"),
    (["--policies", "lru,infinite"], "infinite is the budget scale"),
    (["--layouts", "three"], "--layouts: unknown 'three'"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
])
def test_bad_options_one_line_error(argv, problem, capsys):
    assert suite.main(["--half", "choice", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert problem in err and err.count("\n") == 1


def test_outside_names_the_four_shapes_no_choice_was_made_on(monkeypatch):
    for name, sh in list(suite.OUTSIDE.items()):  # tiny: 4 sessions of each
        monkeypatch.setitem(suite.OUTSIDE, name, suite.Shape(sh.source, sh.options, 4, 2, sh.about))
    args = suite.build_parser().parse_args(["--half", "fresh", "--shapes", "outside", "--profiles", "paper-7b",
                                            "--layouts", "one", "--budgets", "0.25", "--policies", "lru",
                                            "--jobs", "1", "--no-progress", "--quick"])
    doc = suite.run(args)
    assert list(doc["shapes"]) == ["multitenant", "bestofn", "docchat", "compaction"] == list(suite.UNSEEN)
    assert all(s["sessions"] == [9, 10] and s["source"].endswith(":0") for s in doc["shapes"].values())
    assert not set(suite.OUTSIDE) & set(suite.SHAPES)


def test_seed_redraws_only_the_swe_agent_turn_gaps():
    """``--seed`` is another draw of the SWE-agent shapes' Poisson arrivals over the same
    requests; a seeded synthetic shape keeps its trace (its seed is in its source)."""
    from sglang_marconi.replay.loaders import load_trace, traces_dir

    def toolagent_doc(seed):
        args = suite.build_parser().parse_args(["--half", "choice", "--shapes", "toolagent", "--profiles", "paper-7b",
                                                "--layouts", "two", "--budgets", "0.25", "--policies", "lru",
                                                "--jobs", "1", "--no-progress", "--quick", "--seed", str(seed)])
        return suite.run(args)

    a, b = toolagent_doc(0), toolagent_doc(3)
    assert (a["seed"], b["seed"]) == (0, 3)
    assert a["shapes"]["toolagent"]["trace_summary"] == b["shapes"]["toolagent"]["trace_summary"]
    assert a["cells"][0]["runs"]["lru"]["hit_tokens"] == b["cells"][0]["runs"]["lru"]["hit_tokens"]
    if not (traces_dir() / "swe-agent" / "trajs.tgz").exists():
        pytest.skip("SWE-agent trajectories not present")
    sh = suite.Shape("swe-agent", {"max_turns": 4}, 3, 2, "tiny")
    t0, t5 = (load_trace(sh.source, sh.load_options("choice", True, seed)) for seed in (0, 5))
    by_turn = lambda t: sorted(t.requests, key=lambda r: (r.session_id, r.turn))  # noqa: E731 - arrival order differs
    assert [r.prompt_ids for r in by_turn(t0)] == [r.prompt_ids for r in by_turn(t5)]
    assert [r.arrival_s for r in by_turn(t0)] != [r.arrival_s for r in by_turn(t5)]
