"""Replay across replicas (``--replicas N --router ...``, sglang_marconi/replay/routing.py): SMG's
approximate token tree, its cache-aware rule, the state-aware variant, and option errors."""

from __future__ import annotations

import json

import pytest

from sglang_marconi.replay.routing import SMG, ApproxTree
from sglang_marconi.replay.runner import main

from test_replay import BIG, toks, write_trace  # noqa: F401 - the fixture below is per module


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_MARCONI_REPLAY_CACHE", str(tmp_path / "replay-cache"))


def test_approx_tree_matches_whole_pages_and_names_the_deepest_holders():
    t = ApproxTree(page=4, max_size=10_000)
    t.insert(tuple(range(10)), 0)  # 8 tokens stored (two pages), the tail is dropped
    assert t.size == 8
    assert t.match(tuple(range(10))) == (8, {0})
    assert t.match(tuple(range(6)) + (99, 99)) == (4, {0})  # the second page differs
    t.insert(tuple(range(4)) + (7, 7, 7, 7), 1)  # splits the edge after one page
    assert t.size == 8 + 4 + 4
    n, holders = t.match(tuple(range(4)) + (5,))
    assert (n, holders) == (4, {0, 1})  # the shared first page: both replicas
    assert t.match(tuple(range(4)) + (7, 7, 7, 7, 1)) == (8, {1})
    assert t.match((5, 5, 5, 5)) == (0, set())
    assert t.match((0, 1, 2)) == (0, set())  # shorter than a page


def test_spill_margin_follows_the_documented_cap():
    smg = SMG()
    assert smg.spill_margin(0) == 4  # never under four
    assert smg.spill_margin(100) == 20  # two standard deviations of the in-flight count
    assert smg.spill_margin(10_000) == 64  # capped at balance_abs_threshold
    assert SMG(balance_abs_threshold=2).spill_margin(0) == 2  # unless the threshold is lower


def _fleet_doc(tmp_path, reqs, *args):
    out = tmp_path / "out.json"
    rc = main(["--trace", write_trace(tmp_path / "t.jsonl", reqs), "--no-progress", "--json", str(out),
               "--policies", "marconi", *BIG, *args])
    assert rc == 0
    return {r["router"]: r for r in json.loads(out.read_text())["runs"]}


def test_routers_on_two_sessions_hand_computed(tmp_path):
    # a1, a2, b1, b2 (arrivals 0..3 s): round robin sends each second turn to the other replica
    # (no hit); both cache-aware rules keep a session where its first turn ran: the second
    # turn hits the first's input + output - 1 (the state Marconi stores at the end)
    a1, b1 = toks(0, 40), toks(1000, 40)
    ca, cb = [7] * 5, [8] * 5
    reqs = [("a", a1, ca), ("a", a1 + ca + toks(500, 10), [9]), ("b", b1, cb), ("b", b1 + cb + toks(600, 10), [9])]
    runs = _fleet_doc(tmp_path, reqs, "--replicas", "2", "--router", "round_robin,cache_aware,state_aware")
    assert runs["round_robin"]["hit_tokens"] == 0
    assert [r["requests"] for r in runs["round_robin"]["per_replica"]] == [2, 2]
    for router in ("cache_aware", "state_aware"):
        run = runs[router]
        assert run["hit_tokens"] == 2 * (40 + 5 - 1), router
        assert run["replicas"] == 2
        # the first sessions' misses go to the least-loaded replica (ties: fewer processed): one each
        assert [r["requests"] for r in run["per_replica"]] == [2, 2], router
        assert [r["hit_tokens"] for r in run["per_replica"]] == [44, 44], router
        assert run["load_balance_requests"] == 1.0
        assert run["affinity_routed"] == 2
        assert run["router_config"]["cache_threshold"] == 0.3
    # each session's path in the tree: its second prompt's whole 16-token pages (55 -> 48 tokens)
    assert runs["cache_aware"]["approx_tree_tokens"] == 2 * 48


def test_state_aware_goes_where_the_state_is(tmp_path):
    # x1 = S + u1 runs on replica 0; x2 = S + u2 shares S (48 of 64 tokens: above the threshold),
    # so SMG's tree sends it to replica 0, where no state sits at S; state_aware sees no hit
    # anywhere and balances it to replica 1. A third request on S hits the branch state x2
    # left on whichever replica ran it. (Each input is 64 tokens, so a request's anchor state
    # sits at its own end, past S.)
    s = toks(0, 48)
    reqs = [("x", s + toks(100, 16), [1, 2]), ("y", s + toks(200, 16), [3, 4]), ("z", s + toks(300, 16), [5])]
    runs = _fleet_doc(tmp_path, reqs, "--replicas", "2", "--router", "cache_aware,state_aware,state_only")
    # cache_aware: y and z follow x (S matched: 48 of 64 tokens); y branches at 48 on replica 0
    # and Marconi checkpoints that branch point, which z then hits
    assert [r["requests"] for r in runs["cache_aware"]["per_replica"]] == [3, 0]
    assert runs["cache_aware"]["hit_tokens"] == 48
    # state_only: no replica holds a state on S when y arrives, so y is a miss routed to the
    # least-loaded replica (ties: fewer processed), replica 1; z likewise to replica 0, where it
    # creates the branch point itself: no branch state exists before z, and z hits nothing
    assert [r["requests"] for r in runs["state_only"]["per_replica"]] == [2, 1]
    assert runs["state_only"]["hit_tokens"] == 0
    # state_aware: y has no state hit anywhere, so SMG's tree sends it after x (replica 0),
    # where its branch point is checkpointed; z then has a real hit of 48 there
    run = runs["state_aware"]
    assert [r["requests"] for r in run["per_replica"]] == [3, 0]
    assert run["hit_tokens"] == 48
    assert run["state_routed"] == 1


def test_one_replica_is_the_plain_replay(tmp_path):
    a1 = toks(0, 40)
    reqs = [("a", a1, [7] * 5), ("a", a1 + [7] * 5 + toks(500, 10), [9])]
    runs = _fleet_doc(tmp_path, reqs, "--replicas", "1", "--router", "state_aware")
    out = tmp_path / "plain.json"
    assert main(["--trace", str(tmp_path / "t.jsonl"), "--no-progress", "--json", str(out), "--policies", "marconi",
                 *BIG]) == 0
    plain = json.loads(out.read_text())["runs"][0]
    assert runs["state_aware"]["hit_tokens"] == plain["hit_tokens"] == 44


@pytest.mark.parametrize("args, message", [
    (["--replicas", "2", "--router", "bogus"], "--router: unknown router 'bogus'"),
    (["--replicas", "0"], "--replicas must be >= 1, got 0"),
    (["--router", "cache_aware"], "--router needs --replicas N"),
    (["--replicas", "2", "--live-ceiling", "5"], "--end-oracle and --live-ceiling act on one cache"),
])
def test_option_errors_are_one_line(tmp_path, capsys, args, message):
    trace = write_trace(tmp_path / "t.jsonl", [("a", toks(0, 20), [1])])
    assert main(["--trace", trace, "--no-progress", "--policies", "marconi", *BIG, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


@pytest.mark.parametrize("router, chosen", [("kv_events", 0), ("state_events", 1), ("state_aware", 1),
                                            ("state_only", 1)])
def test_kv_prefix_is_not_a_hit(router, chosen):
    """Replica 0 holds the longer KV prefix of the prompt with no state on it; replica 1 a
    shorter one ending in a state (the branch point two requests made). Scoring KV (what
    SGLang's KV events tell SMG) picks replica 0, where the hit is 0; scoring states picks 1."""
    from sglang_marconi.replay.policies import Budget, PolicyOptions, TraceShape
    from sglang_marconi.replay.routing import FleetOptions, build_fleet
    from sglang_marconi.sglang_backend.factory import resolve_profile

    fleet, _, _ = build_fleet(FleetOptions(2, router), "marconi", resolve_profile("paper-7b"),
                              Budget(kv_gb=2, ssm_gb=2), TraceShape(longest=200, requests=10, stream_tokens=2000),
                              PolicyOptions(), 17.8, 0.053)
    try:
        a, x, c = toks(0, 40), toks(100, 30), [7, 7, 7]
        fleet.drivers[0].run(a + x, c)  # states at its anchor and after the reply (64, 72): past 50
        fleet.drivers[1].run(a + toks(200, 30), c)
        fleet.drivers[1].run(a + toks(300, 30), c)  # branches at 40: Marconi checkpoints it
        prompt = tuple(a + x[:10] + toks(400, 10))
        assert [d.peek_hit(prompt, kv=True) for d in fleet.drivers] == [50, 40]
        assert [d.peek_hit(prompt[:-1]) for d in fleet.drivers] == [0, 40]
        assert fleet._select(prompt, [0, 0]) == chosen
    finally:
        fleet.close()
