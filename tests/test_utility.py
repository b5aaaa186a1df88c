"""Pure policy unit tests: the eviction utility, its priority queue, the
admission plan and the config parser (no SGLang, no torch)."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from sglang_marconi.policy.admission import (
    AdmissionReason,
    Checkpoint,
    MarconiAdmission,
    branch_point,
    plan_request,
)
from sglang_marconi.policy.config import (
    DEFAULT_ALPHA_GRID,
    PAPER_ALPHA_GRID,
    MarconiConfig,
    MarconiConfigError,
    parse_config,
)
from sglang_marconi.policy.utility import (
    Candidate,
    EvictionQueue,
    argmin_utility,
    recency,
    utilities,
)


def C(key, t, flops, nbytes=10):
    return Candidate(key=key, last_access=float(t), flops_saved=float(flops), nbytes=nbytes)


# --------------------------------------------------------------------------- utilities


def test_utilities_min_max_normalization_hand_computed():
    # now = 5: recencies 1/4, 1/3, 1/2 -> normalized 0, 1/3, 1
    # efficiencies 1, 2, 4 (flops / 10 bytes) -> normalized 0, 1/3, 1
    cands = [C("a", 1, 10), C("b", 2, 20), C("c", 3, 40)]
    got = utilities(cands, alpha=0.5, now=5.0)
    assert got == pytest.approx([0.0, 1 / 3 + 0.5 / 3, 1.0 + 0.5])


def test_utilities_mixed_directions_hand_computed():
    # Old but efficient vs recent but inefficient, and a middle one.
    # now = 11: r = 1/10, 1/6, 1/1 -> norm 0, (1/6-1/10)/(0.9) = 0.0740.., 1
    # e = 5, 1, 3 -> norm 1, 0, 0.5
    cands = [C("old", 1, 50), C("mid", 5, 10), C("new", 10, 30)]
    r_mid = (1 / 6 - 1 / 10) / (1 - 1 / 10)
    got = utilities(cands, alpha=2.0, now=11.0)
    assert got == pytest.approx([0 + 2 * 1, r_mid + 0, 1 + 2 * 0.5])


def test_single_candidate_normalizes_to_all_ones():
    assert utilities([C("x", 3, 7)], alpha=0.0, now=10.0) == [1.0]
    assert utilities([C("x", 3, 7)], alpha=1.5, now=10.0) == [pytest.approx(2.5)]


def test_equal_values_normalize_to_all_ones():
    cands = [C(i, 4, 100) for i in range(4)]
    assert utilities(cands, alpha=0.7, now=9.0) == [pytest.approx(1.7)] * 4
    # equal recency only: recency term is 1 for all, efficiency still spreads
    cands = [C("lo", 4, 10), C("hi", 4, 30)]
    assert utilities(cands, alpha=1.0, now=9.0) == pytest.approx([1.0, 2.0])


def test_empty_candidate_set():
    assert utilities([], alpha=1.0, now=3.0) == []
    assert argmin_utility([], alpha=1.0, now=3.0) is None
    q = EvictionQueue([], alpha=1.0, now=3.0)
    assert len(q) == 0 and q.pop() is None and q.peek_score() is None
    assert q.score(C("x", 1, 1)) == pytest.approx(2.0)


def test_recency_clock_guard():
    assert recency(3.0, 5.0) == pytest.approx(0.5)
    # the clock never runs behind a stamp by less than 1
    assert recency(5.0, 5.0) == 1.0 and recency(6.0, 5.0) == 1.0


def test_alpha_zero_is_pure_recency_oldest_first():
    rng = random.Random(0)
    cands = [C(i, t, rng.uniform(0, 1e6), rng.randint(1, 100)) for i, t in enumerate(rng.sample(range(1, 200), 30))]
    now = 300.0
    assert argmin_utility(cands, 0.0, now) == min(cands, key=lambda c: c.last_access).key
    q = EvictionQueue(cands, 0.0, now)
    order = [q.pop().key for _ in range(len(cands))]
    assert order == [c.key for c in sorted(cands, key=lambda c: c.last_access)]


def test_large_alpha_prefers_evicting_low_efficiency():
    # "old" is least recent but very efficient; "cheap" is recent and worthless.
    cands = [C("old", 1, 1000), C("cheap", 9, 1), C("mid", 5, 500)]
    assert argmin_utility(cands, 0.0, 10.0) == "old"
    assert argmin_utility(cands, 10.0, 10.0) == "cheap"
    q = EvictionQueue(cands, 10.0, 10.0)
    assert [q.pop().key for _ in range(3)] == ["cheap", "mid", "old"]


def test_efficiency_of_zero_byte_candidate_is_zero():
    assert Candidate("z", 1.0, 123.0, 0).efficiency == 0.0
    assert Candidate("z", 1.0, 120.0, 12).efficiency == pytest.approx(10.0)


def test_argmin_ties_break_by_older_access_then_position():
    # Equal utilities (all-equal set): the first listed wins.
    cands = [C("a", 3, 5), C("b", 3, 5)]
    assert argmin_utility(cands, 1.0, 10.0) == "a"
    q = EvictionQueue(cands, 1.0, 10.0)
    assert [q.pop().key for _ in range(2)] == ["a", "b"]


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 4.0])
def test_queue_pop_order_equals_exact_scores_of_initial_set(seed, alpha):
    """Popping the queue without pushes yields the candidates in order of their
    exact utilities over the initial set (repeated argmin of those scores)."""
    rng = random.Random(seed)
    n = rng.randint(1, 25)
    cands = [
        C(i, rng.randint(0, 50), rng.choice([0, rng.uniform(0, 1e5)]), rng.randint(1, 1000)) for i in range(n)
    ]
    now = 60.0
    scores = utilities(cands, alpha, now)
    expected = []
    remaining = list(range(n))
    while remaining:  # repeated argmin over the initial (frozen) scores
        best = min(remaining, key=lambda i: (scores[i], cands[i].last_access, i))
        expected.append(best)
        remaining.remove(best)
    q = EvictionQueue(cands, alpha, now)
    assert len(q) == n
    got = []
    while len(q):
        s = q.peek_score()
        c = q.pop()
        assert s == pytest.approx(scores[c.key])
        got.append(c.key)
    assert got == expected
    # The first pop is the exact (paper) argmin.
    assert got[0] == argmin_utility(cands, alpha, now)


@pytest.mark.parametrize("seed", range(10))
def test_alpha_zero_queue_equals_repeated_renormalized_argmin(seed):
    """With α = 0 the min–max renormalization after each eviction cannot change
    the order, so the queue equals the paper's quadratic rescoring."""
    rng = random.Random(100 + seed)
    cands = [C(i, rng.randint(0, 40), rng.uniform(0, 10), rng.randint(1, 9)) for i in range(15)]
    now = 50.0
    left = list(cands)
    paper = []
    while left:
        k = argmin_utility(left, 0.0, now)
        paper.append(k)
        left = [c for c in left if c.key != k]
    q = EvictionQueue(cands, 0.0, now)
    assert [q.pop().key for _ in range(len(cands))] == paper


def test_pushed_candidate_terms_are_clamped_to_unit_interval():
    # Snapshot bounds: recency in [1/9, 1/5] (now=10, stamps 1 and 5),
    # efficiency in [1, 3].
    cands = [C("a", 1, 10), C("b", 5, 30)]
    q = EvictionQueue(cands, alpha=2.0, now=10.0)
    b = q.bounds
    assert (b.r_min, b.r_max, b.e_min, b.e_max) == pytest.approx((1 / 9, 1 / 5, 1.0, 3.0))
    # More recent than the snapshot's max and more efficient than its max: 1 + 2 * 1.
    hot = C("hot", 9, 1000)
    assert q.score(hot) == pytest.approx(3.0)
    # Older than the min and less efficient than the min: 0 + 2 * 0.
    cold = C("cold", 0, 0)
    assert q.score(cold) == pytest.approx(0.0)
    # Inside the range: exact affine normalization.
    mid = C("mid", 3, 20)  # r = 1/7, e = 2
    assert q.score(mid) == pytest.approx((1 / 7 - 1 / 9) / (1 / 5 - 1 / 9) + 2 * 0.5)
    q.push(hot)
    q.push(cold)
    order = [q.pop().key for _ in range(4)]
    # a: 0 + 0 = 0 ties with cold (0); a is older? no: cold t=0 < a t=1 -> cold first
    assert order == ["cold", "a", "b", "hot"]
    assert q.pop() is None


def test_pushed_scores_never_leave_snapshot_range():
    rng = random.Random(7)
    cands = [C(i, rng.randint(10, 20), rng.uniform(5, 10), 1) for i in range(6)]
    alpha = 1.5
    q = EvictionQueue(cands, alpha, now=30.0)
    for j in range(200):
        c = C(f"p{j}", rng.randint(0, 29), rng.uniform(0, 100), rng.randint(1, 3))
        s = q.score(c)
        assert 0.0 <= s <= 1.0 + alpha


# --------------------------------------------------------------------------- admission


def test_branch_point_exact():
    assert branch_point(40, 0) == 40
    assert branch_point(57, 12, mode="exact") == 57
    assert branch_point(40, 40) is None  # the match already ends on a state
    assert branch_point(0, 0) is None
    assert branch_point(30, 35) is None


def test_branch_point_grid_floors_to_grid():
    assert branch_point(150, 0, mode="grid", grid=64) == 128
    assert branch_point(128, 0, mode="grid", grid=64) == 128
    assert branch_point(127, 0, mode="grid", grid=64) == 64
    assert branch_point(63, 0, mode="grid", grid=64) is None  # floors to 0
    assert branch_point(150, 128, mode="grid", grid=64) is None  # floors onto the state
    assert branch_point(200, 128, mode="grid", grid=64) == 192
    assert branch_point(191, 128, mode="grid", grid=64) is None
    assert branch_point(260, 128, mode="grid", grid=64) == 256
    assert branch_point(150, 0, mode="grid", grid=1) == 150


def test_branch_point_bad_arguments():
    with pytest.raises(ValueError):
        branch_point(10, 0, mode="grid", grid=0)
    with pytest.raises(ValueError):
        branch_point(10, 0, mode="nearest")


def test_plan_request_branch_and_last_token():
    plan = plan_request(input_len=43, committed_len=45, hit_len=0, branching_len=40)
    assert plan == [
        Checkpoint(40, AdmissionReason.BRANCH_POINT),
        Checkpoint(45, AdmissionReason.LAST_TOKEN),
    ]


def test_plan_request_without_branch():
    assert plan_request(43, 45, 0, None) == [Checkpoint(45, AdmissionReason.LAST_TOKEN)]
    # branch at the hit (nothing new) is dropped
    assert plan_request(43, 45, 40, 40) == [Checkpoint(45, AdmissionReason.LAST_TOKEN)]
    # branch past the input (can't be captured during prefill) is dropped
    assert plan_request(43, 60, 0, 44) == [Checkpoint(60, AdmissionReason.LAST_TOKEN)]
    # branch exactly at the input end is allowed when output follows
    assert plan_request(43, 60, 0, 43) == [
        Checkpoint(43, AdmissionReason.BRANCH_POINT),
        Checkpoint(60, AdmissionReason.LAST_TOKEN),
    ]
    # branch at the committed end would duplicate the last-token state
    assert plan_request(43, 43, 0, 43) == [Checkpoint(43, AdmissionReason.LAST_TOKEN)]
    # nothing committed: nothing admitted
    assert plan_request(0, 0, 0, None) == []


def test_plan_request_properties_exhaustive_small():
    for input_len, extra, hit, br in itertools.product(range(1, 7), range(0, 4), range(0, 7), [None, *range(0, 9)]):
        committed = input_len + extra
        if hit > input_len - 1:
            continue
        plan = plan_request(input_len, committed, hit, br)
        assert len(plan) <= 2
        assert plan[-1] == Checkpoint(committed, AdmissionReason.LAST_TOKEN)
        positions = [c.position for c in plan]
        assert positions == sorted(set(positions))
        if len(plan) == 2:
            bp = plan[0]
            assert bp.reason is AdmissionReason.BRANCH_POINT
            assert bp.position == br
            assert hit < bp.position <= input_len and bp.position < committed


def test_marconi_admission_policy_composes_branch_point_and_plan():
    exact, grid = MarconiAdmission("exact"), MarconiAdmission("grid", 64)
    # (input_len, committed, hit, full_kv_hit)
    assert exact.plan(43, 45, 0, 40) == [
        Checkpoint(40, AdmissionReason.BRANCH_POINT),
        Checkpoint(45, AdmissionReason.LAST_TOKEN),
    ]
    assert grid.plan(153, 155, 0, 150) == [
        Checkpoint(128, AdmissionReason.BRANCH_POINT),
        Checkpoint(155, AdmissionReason.LAST_TOKEN),
    ]
    assert grid.plan(43, 45, 0, 40) == [Checkpoint(45, AdmissionReason.LAST_TOKEN)]
    for args in itertools.product(range(1, 9), range(0, 3), range(0, 8), range(0, 9)):
        inp, extra, hit, kv = args
        if hit > kv or hit >= inp or kv >= inp:
            continue
        committed = inp + extra
        assert exact.plan(inp, committed, hit, kv) == plan_request(inp, committed, hit, branch_point(kv, hit))
        assert len(exact.plan(inp, committed, hit, kv)) <= 2
    assert exact.oracle is False


# --------------------------------------------------------------------------- config


def test_parse_config_defaults():
    cfg = parse_config(None)
    assert cfg == MarconiConfig()
    # the default (issue 23): value per byte (GreedyDual-Size-Frequency) in the state pool and the
    # single byte budget's queue, SGLang's recency in the two pools' KV pool; no α, no tuner
    assert cfg.utility_form == "value" and cfg.alpha == 0.0 and not cfg.auto_alpha
    assert (cfg.value_bytes, cfg.value_flops, cfg.value_kv_pool, cfg.value_frequency) == (
        "exclusive", "replay", "recency", True)
    # no input-end state: with the value rule it bought +0.14% over the choice half's two-pool cells
    # and cost half of the per-request bookkeeping (issue 23); "auto" (on with two pools) is an experiment
    assert cfg.input_state is False and not cfg.input_state_on(single_budget=False)
    auto = parse_config({"input_state": "auto"})
    assert auto.input_state_on(single_budget=False) and not auto.input_state_on(single_budget=True)
    assert parse_config({"input_state": True}).input_state_on(True) and not parse_config({"input_state": False}).input_state_on(False)
    assert cfg.refresh == cfg.kv_refresh == "deepest"
    # the recency order's marks are experiments now, off by default
    assert not (cfg.tombstones_first or cfg.superseded_first or cfg.ended_first)
    assert not parse_config({"variant": "paper"}).ended_first
    assert parse_config({"superseded_min_shared": 0}).superseded_min_shared == 0.0
    # α other than 0 selects the α utility unless the form is given
    assert parse_config({"alpha": "auto"}).utility_form == parse_config({"alpha": 1}).utility_form == "sum"
    assert parse_config({"alpha": 0}).utility_form == "value"
    assert parse_config({"alpha": 1, "utility_form": "product"}).utility_form == "product"
    assert cfg.alpha_grid == DEFAULT_ALPHA_GRID == (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    assert cfg.warm_start and cfg.confirm and cfg.retune
    assert cfg.switch_margin == 0.02 and cfg.score_decay == 0.8
    paper = parse_config({"variant": "paper"})
    assert paper.alpha_grid == PAPER_ALPHA_GRID and len(PAPER_ALPHA_GRID) == 21 and PAPER_ALPHA_GRID[-1] == 2.0
    assert not paper.retune and not paper.warm_start and not paper.confirm
    assert paper.auto_alpha and not paper.input_state and not paper.tombstones_first
    assert paper.utility_form == "sum"
    assert paper.switch_margin == 0.0 and paper.score_decay == 0.0
    # explicit keys win over the paper's tuner defaults
    assert parse_config({"variant": "paper", "retune": True, "alpha_grid": [0, 1]}).retune is True
    assert parse_config({"variant": "paper", "alpha_grid": [0, 1]}).alpha_grid == (0.0, 1.0)
    assert parse_config("") == MarconiConfig()
    assert parse_config("   ") == MarconiConfig()
    assert parse_config({}) == MarconiConfig()
    assert parse_config(cfg) is cfg


def test_parse_config_valid_dict():
    cfg = parse_config(
        {
            "alpha": 0.5,
            "window_multiplier": 15,
            "alpha_grid": [1, 0.5, 0, 0.5],
            "retune": False,
            "profile": "nemotron-h-8b",
            "branch_points": "grid",
            "variant": "paper",
            "refresh": "path",
            "single_budget_gb": 2,
            "tuner": "thread",
            "tuner_max_requests": 100,
        }
    )
    assert cfg.alpha == 0.5 and not cfg.auto_alpha
    assert cfg.window_multiplier == 15
    assert cfg.alpha_grid == (0.0, 0.5, 1.0)  # sorted, deduplicated
    assert cfg.retune is False
    assert cfg.profile == "nemotron-h-8b"
    assert cfg.branch_points == "grid"
    assert cfg.variant == "paper"
    assert cfg.refresh == "path"
    assert cfg.single_budget_gb == 2.0
    assert cfg.tuner == "thread"
    assert cfg.tuner_max_requests == 100


def test_parse_config_valid_json_and_roundtrip():
    raw = '{"alpha": "auto", "alpha_grid": "0:1:0.25", "window_multiplier": 3}'
    cfg = parse_config(raw)
    assert cfg.auto_alpha
    assert cfg.alpha_grid == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert cfg.window_multiplier == 3
    d = cfg.to_dict()
    assert d["alpha"] == "auto" and d["alpha_grid"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_config(json.dumps(d)) == cfg
    cfg2 = parse_config(json.dumps({"alpha": 0, "single_budget_gb": None, "profile": None}))
    assert cfg2.alpha == 0.0 and not cfg2.auto_alpha
    assert cfg2.single_budget_gb is None and cfg2.profile is None
    assert parse_config({"alpha_grid": "0:2:0.1"}).alpha_grid == PAPER_ALPHA_GRID


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"alhpa": 1.0}, "alhpa"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": "fast"}, "alpha"),
        ({"alpha": True}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"window_multiplier": 0}, "window_multiplier"),
        ({"window_multiplier": 2.5}, "window_multiplier"),
        ({"window_multiplier": True}, "window_multiplier"),
        ({"tuner_max_requests": 0}, "tuner_max_requests"),
        ({"alpha_grid": "a:b"}, "alpha_grid"),
        ({"alpha_grid": "a:b:c"}, "alpha_grid"),
        ({"alpha_grid": "1:0:0.1"}, "alpha_grid"),
        ({"alpha_grid": "0:1:0"}, "alpha_grid"),
        ({"alpha_grid": []}, "alpha_grid"),
        ({"alpha_grid": [0.1, -1]}, "alpha_grid"),
        ({"alpha_grid": [0.1, "x"]}, "alpha_grid"),
        ({"alpha_grid": 3}, "alpha_grid"),
        ({"retune": "yes"}, "retune"),
        ({"profile": ""}, "profile"),
        ({"profile": 7}, "profile"),
        ({"branch_points": "near"}, "branch_points"),
        ({"variant": "x"}, "variant"),
        ({"refresh": "all"}, "refresh"),
        ({"tuner": "gpu"}, "tuner"),
        ({"single_budget_gb": -1}, "single_budget_gb"),
        ({"single_budget_gb": 0}, "single_budget_gb"),
        ({"single_budget_gb": "1GB"}, "single_budget_gb"),
        ({"switch_margin": -0.1}, "switch_margin"),
        ({"score_decay": 1.0}, "score_decay"),
        ({"score_decay": "slow"}, "score_decay"),
        ({"warm_start": 1}, "warm_start"),
        ({"confirm": "no"}, "confirm"),
        ({"input_state": None}, "input_state"),
        ({"input_state": "on"}, "input_state"),
        ({"tombstones_first": "yes"}, "tombstones_first"),
        ({"warmup_windows": 0}, "warmup_windows"),
        ({"alpha_max": -1}, "alpha_max"),
        ({"state_candidates": "some"}, "state_candidates"),
        ({"replay_start": "live"}, "replay_start"),
        ({"utility_form": "max"}, "utility_form"),
        ({"recency": "log"}, "recency"),
        ({"score_windows": 0}, "score_windows"),
        ({"efficiency_horizon": 0}, "efficiency_horizon"),
        ({"utility_form": "leader"}, "utility_form"),
        ({"value_bytes": "path"}, "value_bytes"),
        ({"value_kv_pool": "lru"}, "value_kv_pool"),
        ({"value_frequency": 1}, "value_frequency"),
        ({"density_reuse": "yes"}, "density_reuse"),
        ({"tombstones_spare_branches": "no"}, "tombstones_spare_branches"),
        ({"superseded_first": "on"}, "superseded_first"),
        ({"ended_first": "yes"}, "ended_first"),
        ({"end_tail_tokens": 0}, "end_tail_tokens"),
        ({"end_tail_tokens": 2.5}, "end_tail_tokens"),
        ({"end_max_continue": 1.0}, "end_max_continue"),
        ({"end_max_continue": 0}, "end_max_continue"),
        ({"end_labels": "tree"}, "end_labels"),
        ({"superseded_needs_state": 1}, "superseded_needs_state"),
        ({"superseded_share_from": "prompt"}, "superseded_share_from"),
        ({"superseded_min_shared": 1.5}, "superseded_min_shared"),
        ({"superseded_min_shared": -0.1}, "superseded_min_shared"),
        ({"superseded_min_shared": "half"}, "superseded_min_shared"),
    ],
)
def test_parse_config_rejects_bad_key_or_value(raw, key):
    forms = [raw, json.dumps(raw)]  # as a dict and as the server flag's JSON text
    for form in forms:
        with pytest.raises(MarconiConfigError) as ei:
            parse_config(form)
        msg = str(ei.value)
        assert "\n" not in msg
        assert key in msg
        assert msg.startswith("marconi config:")


@pytest.mark.parametrize("raw", ["{alpha: 1}", "not json", '{"alpha": 1', "[1, 2]", '"alpha"', "3"])
def test_parse_config_rejects_non_object_strings(raw):
    with pytest.raises(MarconiConfigError) as ei:
        parse_config(raw)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("marconi config:")
    assert "JSON" in msg


def test_parse_config_rejects_json_array_and_non_mapping():
    with pytest.raises(MarconiConfigError, match="expected a JSON object"):
        parse_config("[]")
    with pytest.raises(MarconiConfigError, match="expected a JSON object"):
        parse_config([("alpha", 1)])


def test_config_error_is_value_error():
    assert issubclass(MarconiConfigError, ValueError)


def test_product_form_never_keeps_the_stalest_candidate():
    from sglang_marconi.policy.utility import Candidate, argmin_utility, utilities

    # c0: stalest but by far the most FLOP-efficient; c1/c2 fresher, cheap
    cands = [Candidate("old", 1.0, 1e15, 10), Candidate("mid", 50.0, 1e9, 10), Candidate("new", 99.0, 1e9, 10)]
    for alpha in (0.0, 1.0, 10.0, 1000.0):
        assert argmin_utility(cands, alpha, 100.0, "product") == "old"
        s = utilities(cands, alpha, 100.0, "product")
        assert s[0] == 0.0 and s[2] == pytest.approx(1.0)  # fresh, min efficiency: 1 × (1 + 0)
    # the paper's sum keeps the efficient stale node once α outweighs the recency span
    assert argmin_utility(cands, 0.0, 100.0, "sum") == "old"
    assert argmin_utility(cands, 2.0, 100.0, "sum") == "mid"


def test_linear_recency_spreads_candidates_by_age():
    from sglang_marconi.policy.utility import Candidate, recency, utilities

    assert recency(90.0, 100.0, "linear") == -10.0 and recency(90.0, 100.0) == pytest.approx(0.1)
    cands = [Candidate(k, t, 1.0, 1) for k, t in (("a", 0.0), ("b", 50.0), ("c", 99.0))]
    inv = utilities(cands, 0.0, 100.0)
    lin = utilities(cands, 0.0, 100.0, rec="linear")
    assert inv[1] < 0.02 and lin[1] == pytest.approx(50 / 99)  # 1/age crowds the old ones near 0
    assert lin[0] == 0.0 and lin[2] == 1.0


def test_efficiency_horizon_decays_the_bonus_with_age():
    from sglang_marconi.policy.utility import Candidate, EvictionQueue

    cands = [Candidate("old-efficient", 0.0, 1e15, 10), Candidate("new-cheap", 95.0, 1e9, 10)]
    assert EvictionQueue(list(cands), 4.0, 100.0).pop().key == "new-cheap"  # the paper: efficiency wins
    assert EvictionQueue(list(cands), 4.0, 100.0, horizon=10.0).pop().key == "old-efficient"  # e^-10 of the bonus
    assert EvictionQueue(list(cands), 4.0, 100.0, horizon=1e6).pop().key == "new-cheap"


# ------------------------------------------------------------ the server's keys


def test_server_config_takes_at_most_eight_documented_keys():
    from sglang_marconi.policy.config import SERVER_KEYS, parse_server_config

    assert len(SERVER_KEYS) <= 8
    assert parse_server_config(None) == MarconiConfig()
    assert parse_server_config("") == MarconiConfig()
    paper = parse_server_config('{"variant": "paper", "alpha": 0.5, "tuner": "inline"}')
    assert paper.variant == "paper" and paper.alpha == 0.5 and paper.utility_form == "sum" and paper.tuner == "inline"
    assert parse_server_config({"variant": "paper"}).auto_alpha
    cfg = parse_server_config({"branch_points": "grid", "single_budget_gb": 2, "profile": "qwen3.5-9b"})
    assert (cfg.branch_points, cfg.single_budget_gb, cfg.profile) == ("grid", 2.0, "qwen3.5-9b")


@pytest.mark.parametrize(
    "raw, says",
    [
        ({"utility_form": "sum"}, "key 'utility_form' was removed: the default ranks every candidate by value per byte"),
        ({"leader_margin": 0.2}, "key 'leader_margin' was removed: follow-the-leader"),
        ({"window_multiplier": 5}, "key 'window_multiplier' was removed: the α tuner runs with the paper's settings"),
        ({"tombstones_first": True}, "replay variants (sglang_marconi/replay/variants.py)"),
        ({"alpah": 1}, "unknown key 'alpah' (known keys: variant, profile, branch_points"),
        ({"alpha": 1}, "alpha=1 weighs the paper's utility"),
        ({"tuner": "thread"}, "tuner='thread' places the paper's α tuner"),
        ({"variant": "papers"}, "variant='papers' must be one of marconi, paper"),
        ("[1]", "expected a JSON object, got list"),
        ("{", "not valid JSON"),
    ],
)
def test_server_config_errors_are_one_line_and_say_what_replaced_a_key(raw, says):
    from sglang_marconi.policy.config import parse_server_config

    with pytest.raises(MarconiConfigError) as e:
        parse_server_config(raw)
    msg = str(e.value)
    assert says in msg and "\n" not in msg and msg.startswith("marconi config: ")
