"""Marconi's admission (speculative insertion) through the real SGLang cache.

Every request goes through ``CacheDriver.run`` (match on input[:-1], branch
checkpoint during prefill, last-token state at finish) on a real
``MarconiRadixCache`` with real pools.
"""

from __future__ import annotations

import random

import pytest

from sglang.srt.mem_cache.unified_cache.components.base import ComponentType

from sglang_marconi.policy.admission import AdmissionReason, anchor_position

MAMBA = ComponentType.MAMBA
FULL = ComponentType.FULL
BP = AdmissionReason.BRANCH_POINT.value
LT = AdmissionReason.LAST_TOKEN.value
AN = AdmissionReason.ANCHOR.value


def walk(node):
    for c in node.children.values():
        yield c
        yield from walk(c)


def state_positions(built):
    """Sorted token positions (node ends) that hold an SSM state."""
    st = built.cache.marconi
    return sorted(st.node_end(n) for n in walk(built.cache.tree_core.root_node) if n.component_data[MAMBA].value is not None)


def toks(start, n):
    return list(range(start, start + n))


# ----------------------------------------------------------------- purely-input reuse


def test_shared_system_prompt_exact(make_marconi):
    built, drv = make_marconi()
    system = toks(1000, 40)
    r1 = drv.run(system + [1, 2, 3], [7, 8, 9])
    r2 = drv.run(system + [4, 5, 6], [7, 8])
    r3 = drv.run(system + [10, 11], [12])
    # Request 1 builds the path, admitting only its last-token state.
    assert r1.hit_len == 0
    assert r1.checkpoints == [(45, LT, True)]
    # Request 2 diverges at token 40: the branch checkpoint lands exactly there; it saves nothing.
    assert r2.hit_len == 0 and r2.flops_saved == 0.0
    assert r2.checkpoints == [(40, BP, True), (44, LT, True)]
    # Request 3 hits the whole system prompt.
    assert r3.hit_len == 40
    assert r3.flops_saved == pytest.approx(built.cache.marconi.profile.prefill_flops(0, 40))
    assert r3.checkpoints == [(42, LT, True)]
    assert state_positions(built) == [40, 42, 44, 45]
    # Further requests keep hitting the prompt without new branch points.
    r4 = drv.run(system + [20, 21, 22, 23], [24])
    assert r4.hit_len == 40 and [c[1] for c in r4.checkpoints] == [LT]


def test_branch_point_at_first_differing_token(make_marconi):
    built, drv = make_marconi()
    base = toks(5000, 70)
    drv.run(base, [1, 2])
    prev = 0
    for d in (13, 37, 55):
        other = base[:d] + toks(9000 + d * 100, 20)
        r = drv.run(other, [3])
        bps = [c for c in r.checkpoints if c[1] == BP]
        assert bps == [(d, BP, True)]
        assert r.hit_len == prev  # the deepest earlier branch state on this prefix
        again = drv.run(base[:d] + toks(7000 + d * 100, 5), [4])
        assert again.hit_len == d
        prev = d


def test_mamba_checkpoint_grid_is_sglang_chunk_size(make_marconi):
    built, _ = make_marconi(branch_points="grid")
    comp = built.cache.components[MAMBA]
    # page_size 1 -> grid = lcm(mamba_cache_chunk_size, 1) = 64 (pools._ensure_server_args)
    assert comp.mamba_cache_chunk_size == 64
    assert comp.mamba_checkpoint_grid == 64


def test_shared_system_prompt_grid_mode(make_marconi):
    built, drv = make_marconi(branch_points="grid")
    grid = built.cache.components[MAMBA].mamba_checkpoint_grid
    system = toks(1000, 150)
    r1 = drv.run(system + [1, 2, 3], [7, 8, 9])
    r2 = drv.run(system + [4, 5, 6], [7, 8])
    r3 = drv.run(system + [10, 11], [12])
    assert r1.checkpoints == [(155, LT, True)]
    # The branch point floors to SGLang's checkpoint grid: 150 -> 128.
    assert (150 // grid) * grid == 128
    assert r2.hit_len == 0
    assert r2.checkpoints == [(128, BP, True), (154, LT, True)]
    # The third request hits only the grid-aligned state: the tail 128..150 is lost.
    assert r3.hit_len == 128
    assert [c[1] for c in r3.checkpoints] == [LT]
    assert state_positions(built) == [128, 152, 154, 155]


def test_grid_mode_short_prefix_gets_no_branch_point(make_marconi):
    _, drv = make_marconi(branch_points="grid")
    system = toks(1000, 40)  # shorter than one grid step
    drv.run(system + [1, 2], [3])
    r2 = drv.run(system + [4, 5], [6])
    r3 = drv.run(system + [7, 8], [9])
    assert [c[1] for c in r2.checkpoints] == [LT]
    assert r3.hit_len == 0


# ----------------------------------------------------------------- input + output reuse


def test_multi_turn_hits_previous_input_plus_output(make_marconi):
    built, drv = make_marconi()
    rng = random.Random(1)
    inp = toks(100, 30)
    nxt = 20000
    prev_committed = None
    for turn in range(6):
        out = toks(nxt, rng.randint(1, 12))
        nxt += 100
        r = drv.run(inp, out)
        committed = len(inp) + len(out) - 1
        if prev_committed is None:
            assert r.hit_len == 0
        else:
            # turn k+1 hits everything turn k committed: len(input_k) + len(output_k) - 1
            assert r.hit_len == prev_committed
            assert r.flops_saved == pytest.approx(built.cache.marconi.profile.prefill_flops(0, prev_committed))
        # exactly one state per turn: the last decoded token's (committed length)
        assert r.checkpoints == [(committed, LT, True)]
        assert r.states_admitted == 1
        assert committed in state_positions(built)
        prev_committed = committed
        inp = inp + out + toks(nxt, rng.randint(1, 10))
        nxt += 100
    c = built.cache.marconi.counters
    assert c.admitted[AdmissionReason.LAST_TOKEN] == 6
    assert c.admitted[AdmissionReason.BRANCH_POINT] == 0


def test_next_turn_hit_len_is_committed_length(make_marconi):
    _, drv = make_marconi()
    inp = toks(100, 25)
    out = toks(300, 8)
    r1 = drv.run(inp, out)
    assert r1.checkpoints == [(32, LT, True)]
    inp2 = inp + out + toks(500, 6)
    r2 = drv.run(inp2, toks(600, 4))
    # len(input_1) + len(output_1) - 1: the last sampled token never ran through the model
    assert r2.hit_len == len(inp) + len(out) - 1 == 32
    assert r2.checkpoints == [(len(inp2) + 4 - 1, LT, True)]
    # single-token output: committed == input length
    inp3 = inp2 + toks(600, 4) + [1]
    r3 = drv.run(inp3, [2])
    assert r3.hit_len == len(inp2) + 4 - 1
    assert r3.checkpoints == [(len(inp3), LT, True)]
    r4 = drv.run(inp3 + [2, 3], [4])
    assert r4.hit_len == len(inp3)


# ----------------------------------------------------------------- per-request bounds


def test_anchor_gives_the_first_reuse_a_hit(make_marconi):
    """The default's anchor state: a request that creates no branch point checkpoints the
    largest power of two within its input, past its hit."""
    built, drv = make_marconi(anchor_state=True)
    system = toks(1000, 40)
    r1 = drv.run(system + [1, 2, 3], [7, 8, 9])
    # no match, no branch point: the anchor at 32 (43 tokens) and the last token
    assert r1.checkpoints == [(32, AN, True), (45, LT, True)]
    # the first reuse hits the anchor, and the KV match past it makes the branch point at 40
    r2 = drv.run(system + [4, 5, 6], [7, 8])
    assert r2.hit_len == 32
    assert r2.flops_saved == pytest.approx(built.cache.marconi.profile.prefill_flops(0, 32))
    assert r2.checkpoints == [(40, BP, True), (44, LT, True)]
    # the second reuse hits the branch point; its anchor (32) lies inside its hit: none
    r3 = drv.run(system + [10, 11], [12])
    assert r3.hit_len == 40 and r3.checkpoints == [(42, LT, True)]
    # a next turn past 64 tokens crosses a power of two: its anchor is 64
    r4 = drv.run(system + [10, 11, 12] + toks(5000, 30), [13])
    assert r4.hit_len == 42 and r4.checkpoints == [(64, AN, True), (73, LT, True)]
    assert state_positions(built) == [32, 40, 42, 44, 45, 64, 73]
    assert built.cache.marconi.counters.as_dict()["admitted_anchor"] == 2


@pytest.mark.parametrize("input_len, hit, grid, expected", [
    (43, 0, 1, 32), (32, 0, 1, 32), (33, 31, 1, 32), (33, 32, 1, None), (63, 40, 1, None), (64, 40, 1, 64),
    (1, 0, 1, 1), (0, 0, 1, None), (13_700, 0, 64, 8192), (100, 0, 64, 64), (63, 0, 64, None),
])
def test_anchor_position(input_len, hit, grid, expected):
    assert anchor_position(input_len, hit, grid) == expected


def test_anchor_plan_takes_the_slot_a_branch_point_leaves():
    from sglang_marconi.policy.admission import Checkpoint, MarconiAdmission

    adm = MarconiAdmission(anchor=True)
    A, B, L = AdmissionReason.ANCHOR, AdmissionReason.BRANCH_POINT, AdmissionReason.LAST_TOKEN
    assert adm.plan(100, 105, 0, 0) == [Checkpoint(64, A), Checkpoint(105, L)]
    assert adm.plan(100, 105, 0, 70) == [Checkpoint(70, B), Checkpoint(105, L)]  # a branch point: no anchor
    assert adm.plan(100, 105, 64, 64) == [Checkpoint(105, L)]  # the anchor lies in the hit
    assert adm.plan(64, 64, 0, 0) == [Checkpoint(64, L)]  # it would be the last-token state
    # the input-end experiment keeps its own slot; grid mode puts the anchor on the grid
    assert MarconiAdmission(anchor=True, input_state=True).plan(100, 105, 0, 0)[0] == Checkpoint(100, AdmissionReason.INPUT_END)
    assert MarconiAdmission("grid", 64, anchor=True).plan(100, 105, 0, 0)[0] == Checkpoint(64, A)
    assert MarconiAdmission("grid", 64, anchor=True).plan(60, 65, 0, 0) == [Checkpoint(65, L)]


@pytest.mark.parametrize("anchor", [False, True])
def test_every_request_admits_at_most_two_states_at_documented_positions(make_marconi, anchor):
    built, drv = make_marconi(kv_slots=20000, mamba_slots=2000, anchor_state=anchor)
    rng = random.Random(7)
    prefixes = [toks(10000 * (i + 1), rng.randint(5, 60)) for i in range(4)]
    history = []
    prefill_only = 0
    mfree0 = built.mamba_allocator.available_size()
    for i in range(200):
        choice = rng.random()
        if history and choice < 0.4:
            inp, out = rng.choice(history)
            inp = inp + out + [rng.randint(1, 50) for _ in range(rng.randint(1, 6))]
        elif history and choice < 0.55:
            inp, _ = rng.choice(history)
            cut = rng.randint(1, len(inp))
            inp = inp[:cut] + [rng.randint(1, 50) for _ in range(rng.randint(1, 6))]
        else:
            inp = rng.choice(prefixes) + [rng.randint(1, 50) for _ in range(rng.randint(1, 8))]
        out = [rng.randint(51, 99) for _ in range(rng.randint(0, 5))]
        states_before = len(state_positions(built))
        r = drv.run(inp, out)
        committed = len(inp) + max(len(out) - 1, 0)
        assert len(r.checkpoints) <= 2
        p = anchor_position(len(inp), r.hit_len) if anchor else None
        if not out:  # it decodes nothing: its last state where the same prompt resumes, past the hit
            committed = len(inp) - 1
            prefill_only += 1
            if committed <= r.hit_len:
                assert r.checkpoints == []
                history.append((inp, out))
                continue
        if len(r.checkpoints) == 2:
            assert r.checkpoints[-1][:2] == (committed, LT)
            pos, why, _ = r.checkpoints[0]
            assert why == BP or (why == AN and pos == p)
            assert r.hit_len < pos <= len(inp) and pos < committed
        else:  # no branch point, so no anchor either: none past the hit, or it is the last token's
            assert r.checkpoints[-1][:2] == (committed, LT)
            assert p is None or p >= committed
        assert 0 <= r.hit_len <= len(inp) - 1
        # admitted flags agree with the tree: new states == admitted count
        states_after = state_positions(built)
        assert len(states_after) == states_before + r.states_admitted
        for pos, _, _ in r.checkpoints:
            assert pos in states_after
        history.append((inp, out))
    assert prefill_only > 10
    # every state slot is either free or held by the tree
    assert built.mamba_allocator.available_size() + len(state_positions(built)) == mfree0


def test_state_already_cached_is_not_admitted_twice(make_marconi):
    built, drv = make_marconi()
    inp, out = toks(100, 20), toks(500, 5)
    r1 = drv.run(inp, out)
    assert r1.checkpoints == [(24, LT, True)]
    free_before = built.mamba_allocator.available_size()
    r2 = drv.run(inp, out)
    # The match (input[:-1], 19 tokens) ends inside the cached edge: branch point at 19 (new),
    # the last-token state at 24 exists already and is not admitted again.
    assert r2.hit_len == 0
    assert r2.checkpoints == [(19, BP, True), (24, LT, False)]
    assert r2.states_admitted == 1
    assert built.mamba_allocator.available_size() == free_before - 1
    r3 = drv.run(inp, out)
    assert r3.hit_len == 19
    assert r3.checkpoints == [(24, LT, False)]
    assert r3.states_admitted == 0
    assert built.mamba_allocator.available_size() == free_before - 1
    assert state_positions(built) == [19, 24]
    c = built.cache.marconi.counters
    assert c.admitted[AdmissionReason.BRANCH_POINT] == 1
    assert c.admitted[AdmissionReason.LAST_TOKEN] == 1


def test_branch_in_the_middle_of_a_history(make_marconi):
    built, drv = make_marconi()
    system = toks(100, 30)
    u1, a1 = toks(200, 10), toks(300, 12)
    u2, a2 = toks(400, 15), toks(500, 9)
    u3, a3 = toks(600, 7), toks(700, 5)
    t1 = system + u1
    t2 = t1 + a1 + u2
    t3 = t2 + a2 + u3
    drv.run(t1, a1)
    drv.run(t2, a2)
    drv.run(t3, a3)
    # Edit the user message of turn 2 at its 6th token (a retry with another text).
    k = 5
    u2x = u2[:k] + toks(4000, 8)
    t2x = t1 + a1 + u2x
    divergence = len(t1) + len(a1) + k
    r = drv.run(t2x, toks(800, 4))
    # Hit: the turn-1 state (committed length of turn 1).
    assert r.hit_len == len(t1) + len(a1) - 1
    assert r.checkpoints == [(divergence, BP, True), (len(t2x) + 3, LT, True)]
    assert divergence in state_positions(built)
    # A later retry of turn 2 with yet another text hits exactly the divergence point.
    r2 = drv.run(t1 + a1 + u2[:k] + toks(5000, 3), [1])
    assert r2.hit_len == divergence
    # and the original conversation still hits its full history
    r3 = drv.run(t3 + a3 + [9, 9], [1])
    assert r3.hit_len == len(t3) + len(a3) - 1


def test_edit_right_at_the_turn_boundary(make_marconi):
    """Divergence right after the previous turn's committed state: the branch
    point is one token past the hit (the last sampled token of turn 1)."""
    built, drv = make_marconi()
    t1, a1 = toks(100, 20), toks(300, 6)
    drv.run(t1, a1)
    drv.run(t1 + a1 + toks(400, 10), [1, 2])
    r = drv.run(t1 + a1 + toks(900, 10), [3, 4])
    c1 = len(t1) + len(a1) - 1
    assert r.hit_len == c1
    assert r.checkpoints[0] == (c1 + 1, BP, True)


# ----------------------------------------------------------------- counters


def test_counters_match_admitted_checkpoints(make_marconi):
    built, drv = make_marconi(kv_slots=8000, mamba_slots=500)
    rng = random.Random(3)
    sys_prompts = [toks(10000 * (i + 1), 40 + 10 * i) for i in range(3)]
    want = {BP: 0, LT: 0}
    hits = 0
    hit_tokens = 0
    n = 0
    for i in range(120):
        inp = rng.choice(sys_prompts) + [rng.randint(1, 30) for _ in range(rng.randint(1, 5))]
        out = [rng.randint(31, 60) for _ in range(rng.randint(1, 4))]
        r = drv.run(inp, out)
        n += 1
        for _, why, ok in r.checkpoints:
            want[why] += ok
        hits += r.hit_len > 0
        hit_tokens += r.hit_len
    c = built.cache.marconi.counters
    assert c.admitted[AdmissionReason.BRANCH_POINT] == want[BP] > 0
    assert c.admitted[AdmissionReason.LAST_TOKEN] == want[LT] > 0
    d = c.as_dict()
    assert d["admitted_branch_point"] == want[BP]
    assert d["admitted_last_token"] == want[LT]
    assert c.matches == n
    assert c.state_hits == hits
    assert c.hit_tokens == hit_tokens
    # nothing was evicted with these pool sizes
    assert c.state_evictions == 0 and c.leaf_evictions == 0
    assert len(state_positions(built)) == want[BP] + want[LT]


@pytest.mark.parametrize("input_len,hit,expected", [
    (1700, 0, 1536), (1535, 0, 1024), (1536, 0, 1536), (12000, 0, 8192), (12288, 0, 12288),
    (3, 0, 3), (7, 0, 6), (1700, 1536, None), (1700, 1535, 1536),
])
def test_anchor_position_with_two_significant_bits(input_len, hit, expected):
    """The ``anchor-2bits`` experiment: the largest 2^k or 3 * 2^(k-1) within the input."""
    assert anchor_position(input_len, hit, 1, bits=2) == expected
    assert anchor_position(input_len, hit, 1, bits=1) == anchor_position(input_len, hit, 1)


def test_a_request_that_decodes_nothing_keeps_its_last_state_where_its_samples_resume(make_marconi):
    """SGLang's ``n > 1``: the prompt is first prefilled alone (no output), then the samples
    are sent. That first request keeps its last state at input - 1 instead of at its end
    (its branch point or anchor as any request's); each sample (which matches at most
    input - 1 tokens) resumes there. Grid mode keeps the plan of any request."""
    from sglang_marconi.policy.admission import Checkpoint, MarconiAdmission, prompt_end_position

    A, B, L = AdmissionReason.ANCHOR, AdmissionReason.BRANCH_POINT, AdmissionReason.LAST_TOKEN
    adm = MarconiAdmission(anchor=True)
    assert adm.plan(150, 150, 0, 0, prefill_only=True) == [Checkpoint(128, A), Checkpoint(149, L)]
    assert adm.plan(150, 150, 0, 140, prefill_only=True) == [Checkpoint(140, B), Checkpoint(149, L)]
    # a branch point at its last state's position is that state (the anchor takes the other slot)
    assert adm.plan(150, 150, 0, 149, prefill_only=True) == [Checkpoint(128, A), Checkpoint(149, L)]
    assert adm.plan(129, 129, 0, 0, prefill_only=True) == [Checkpoint(128, L)]  # the anchor is its end
    assert adm.plan(150, 150, 149, 149, prefill_only=True) == []  # already there
    assert prompt_end_position(1, 0) is None and prompt_end_position(2, 0) == 1
    assert MarconiAdmission("grid", 64, anchor=True).plan(150, 150, 0, 0, prefill_only=True) == \
        MarconiAdmission("grid", 64, anchor=True).plan(150, 150, 0, 0)

    built, drv = make_marconi(anchor_state=True)
    prompt = toks(100, 150)
    warm = drv.run(prompt, [])
    assert [c[:2] for c in warm.checkpoints] == [(128, A), (149, L)]
    assert state_positions(built) == [128, 149]
    samples = [drv.run(prompt, toks(1000 + 10 * j, 6)) for j in range(3)]
    assert [s.hit_len for s in samples] == [149, 149, 149]
    # its state counts the fork it announces, as a branch point's: once the first sample has
    # continued past it (a hit as a leaf, which the continuation serves), the evidence is the
    # two hits it got while internal + 1, not the 2 of an internal state nobody announced
    st = built.cache.marconi
    node = next(n for n in walk(built.cache.tree_core.root_node) if st.node_end(n) == 149)
    assert node.children and node.marconi_branch and st.frequency(node) == 2 + 1
    # the experiment without the rule (marconi:no-prompt-end): the state at its end, as any request's
    assert MarconiAdmission(anchor=True, prompt_end=False).plan(150, 150, 0, 0, prefill_only=True) == \
        MarconiAdmission(anchor=True).plan(150, 150, 0, 0) == [Checkpoint(128, A), Checkpoint(150, L)]
    built3, drv3 = make_marconi(anchor_state=True, prompt_end_state=False)
    assert [c[:2] for c in drv3.run(prompt, []).checkpoints] == [(128, A), (150, L)]
    assert drv3.run(prompt, toks(1000, 6)).hit_len == 128
    # without the warm-up, the first sample resumes at the anchor (128) and creates the branch point
    built2, drv2 = make_marconi(anchor_state=True)
    drv2.run(prompt, toks(1000, 6))
    assert drv2.run(prompt, toks(1010, 6)).hit_len == 128
