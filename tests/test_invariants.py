"""Randomized operation sequences (hypothesis) against the real cache.

Operations: insert (a new request through the driver), finish (the next turn
of an earlier request: the driver's insert at finish), match (``match_prefix``,
optionally locking the matched node), unlock, evict (``cache.evict`` with
random KV / state counts) and, in single-budget mode, ``evict_to_bytes``.
Budgets are tiny so the tree is evicting all the time.

After every operation:

(a) every node held by a test lock is still attached to the tree, its path's
    KV indices are unchanged and, if it held an SSM state when locked, it
    still holds the same one;
(b) the cache's size counters, ``tree_bytes()`` and the allocators agree with
    a walk of the tree (free + tree-held == pool size, for KV and states; no
    slot is held twice);
plus the hit of every request is the deepest fully matched state on its
input (minus its last token), and Marconi's memoized node ends are exact.

At the end of every example: release all locks, evict everything — the
allocators return exactly to ``driver.initial_free`` and the tree is empty —
then ``cache.reset()`` and one more request work.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_cache.components.base import ComponentType

from array import array

MAMBA = ComponentType.MAMBA
FULL = ComponentType.FULL

KINDS = ("insert", "insert", "finish", "finish", "match", "lock", "unlock", "evict")
MAX_LOCKS = 3
EXAMPLES = 30
MIN_OPS = 130
MAX_OPS = 200

VARIANTS = {
    "alpha0": dict(alpha=0.0),
    "alpha1": dict(alpha=1.0),
    "paper": dict(alpha=0.5, variant="paper"),
    # grid mode: longer requests, so shared prefixes reach SGLang's 64-token checkpoint grid
    "grid": dict(alpha=1.0, branch_points="grid", long=True),
    "single_budget": dict(alpha=1.0, variant="paper", single=True),
    "refresh_path": dict(alpha=0.5, refresh="path"),
    # the package default (issue 6): α = 0 with the input-end state
    # (ended_first with a hair trigger: 2-token endings over a 4-token vocabulary, final at P(continued) <= 0.4)
    "default": dict(alpha=0.0, input_state=True, tombstones_first=True, superseded_first=True,
                    ended_first=True, end_tail_tokens=2, end_max_continue=0.4, end_labels="sequence"),
    "density": dict(utility_form="density", input_state=True, density_period=4),
    "density_reuse": dict(utility_form="density", density_reuse=True, input_state=True, density_period=4),
    # the package default: value per byte (states, single queue) with the input-end state
    "value": dict(utility_form="value", input_state="auto"),
    "value_single": dict(utility_form="value", single=True),
    "value_kv_value": dict(utility_form="value", value_kv_pool="value", input_state=True),
}

OPS_DONE: dict[str, int] = {}
SUPERSEDED_MARKS: dict = {}  #: variant -> nodes marked superseded over all examples
ENDED_MARKS: dict = {}  #: variant -> finished requests marked as a conversation's end over all examples

POOLS = dict(kv_slots=600, mamba_slots=10, kv_budget=90, state_budget=4)


def _key(tokens):
    return RadixKey(array("q", tokens))


def walk(node, depth=0):
    for c in node.children.values():
        d = depth + len(c.key)
        yield c, d
        yield from walk(c, d)


def is_live(built, node):
    root = built.cache.tree_core.root_node
    page = built.cache.tree_core.page_size
    cur = node
    while cur is not root:
        p = cur.parent
        if p is None or p.children.get(cur.key.child_key(page)) is not cur:
            return False
        cur = p
    return True


def expected_hit(built, tokens):
    """Deepest fully matched node holding an SSM state along ``tokens``."""
    node = built.cache.tree_core.root_node
    page = built.cache.tree_core.page_size
    pos = 0
    best = 0
    while pos < len(tokens):
        child = node.children.get(_key(tokens[pos:]).child_key(page))
        if child is None:
            break
        k = list(child.key.token_ids)
        if tokens[pos : pos + len(k)] != k:
            break  # ends inside the edge: nothing from this node
        pos += len(k)
        node = child
        if node.component_data[MAMBA].value is not None:
            best = pos
    return best


class World:
    def __init__(self, built, drv, seed, single_budget, long=False):
        self.built = built
        self.cache = built.cache
        self.drv = drv
        self.rng = random.Random(seed)
        self.history: list[tuple[list[int], list[int]]] = []
        self.locks: list[tuple] = []  # (node, node_id, receipt, path_idx, state_or_None)
        self.single = single_budget
        self.kv_total, self.st_total = drv.initial_free
        self.profile = built.cache.marconi.profile
        lo, hi = (60, 110) if long else (8, 30)
        self.max_len = 180 if long else 70
        self.bases = [[self.rng.randint(1, 4) for _ in range(self.rng.randint(lo, hi))] for _ in range(5)]

    # ------------------------------------------------------------ requests
    def new_request(self):
        r = self.rng
        base = r.choice(self.bases)
        cut = r.randint(0, len(base))
        inp = base[:cut] + [r.randint(1, 4) for _ in range(r.randint(1, 8))]
        out = [r.randint(1, 4) for _ in range(r.randint(0, 4))]
        return inp, out

    def next_turn(self):
        r = self.rng
        if not self.history:
            return self.new_request()
        inp, out = r.choice(self.history[-8:])
        if r.random() < 0.25 and len(inp) > 2:
            # edit: diverge somewhere inside an earlier turn
            cut = r.randint(1, len(inp) - 1)
            nxt = inp[:cut] + [r.randint(1, 4) for _ in range(r.randint(1, 6))]
        else:
            nxt = inp + out + [r.randint(1, 4) for _ in range(r.randint(1, 6))]
        if len(nxt) > self.max_len:
            return self.new_request()
        return nxt, [r.randint(1, 4) for _ in range(r.randint(0, 4))]

    def run(self, inp, out):
        want = expected_hit(self.built, inp[:-1])
        res = self.drv.run(inp, out)
        assert res.hit_len == want, (res.hit_len, want)
        committed = len(inp) + max(len(out) - 1, 0)
        assert len(res.checkpoints) <= 2
        if not out and self.drv.cache.marconi.config.branch_points == "exact":
            # it decodes nothing: its last state one token before its input's end, past its hit
            committed = len(inp) - 1
        if committed > res.hit_len or out:
            assert res.checkpoints[-1][0] == committed
        else:
            assert res.checkpoints == []
        if len(res.checkpoints) == 2:
            assert res.hit_len < res.checkpoints[0][0] <= len(inp)
        self.history.append((inp, out))
        if not self.locks:
            if self.single:
                assert self.cache.tree_bytes() <= self.drv.byte_budget
            else:
                assert self.drv.tree_kv_tokens() <= self.drv.kv_budget
                assert self.drv.tree_states() <= self.drv.state_budget

    # ------------------------------------------------------------ ops
    def op(self, kind, seed):
        r = self.rng
        r.seed(seed)
        if kind == "insert":
            self.run(*self.new_request())
        elif kind == "finish":
            self.run(*self.next_turn())
        elif kind in ("match", "lock"):
            inp, _ = self.next_turn() if r.random() < 0.5 else self.new_request()
            m = self.cache.match_prefix(MatchPrefixParams(key=_key(inp)))
            assert m.device_prefix_len == expected_hit(self.built, inp)
            nid = m.last_device_node
            if kind == "lock" and len(self.locks) < MAX_LOCKS and not self.cache.is_root(nid):
                node = self.cache.tree_core.node_by_id(nid)
                rec = self.cache.inc_lock_ref(nid).to_dec_params()
                sv = node.component_data[MAMBA].value
                self.locks.append((node, nid, rec, self.cache.path_device_indices(nid).clone(), None if sv is None else sv.clone()))
        elif kind == "unlock":
            if self.locks:
                node, nid, rec, _, _ = self.locks.pop(r.randrange(len(self.locks)))
                self.cache.dec_lock_ref(nid, rec)
        elif kind == "evict":
            if self.single and r.random() < 0.5:
                budget = r.randint(0, 2 * self.drv.byte_budget)
                self.cache.evict_to_bytes(budget)
                if not self.locks:
                    assert self.cache.tree_bytes() <= budget
            else:
                self.cache.evict(EvictParams(num_tokens=r.randint(0, 40), mamba_num=r.randint(0, 3)))
        else:  # pragma: no cover
            raise AssertionError(kind)

    # ------------------------------------------------------------ invariants
    def check(self):
        cache, built = self.cache, self.built
        tc = cache.tree_core
        st_ = cache.marconi
        kv_tokens = states = 0
        kv_prot = st_prot = 0
        kv_vals, st_vals = [], []
        live = set()
        for n, end in walk(tc.root_node):
            live.add(n)
            fv = n.component_data[FULL].value
            assert fv is not None and len(fv) == len(n.key) > 0
            kv_tokens += len(fv)
            kv_vals.append(fv)
            if n.component_data[FULL].lock_ref > 0:
                kv_prot += len(fv)
            mv = n.component_data[MAMBA].value
            if mv is not None:
                states += 1
                st_vals.append(mv)
                if n.component_data[MAMBA].lock_ref > 0:
                    st_prot += 1
            assert st_.node_end(n) == end
            assert getattr(n, "marconi_t", 0.0) <= st_.clock
        # (b) counters vs the tree
        assert cache.full_evictable_size() + cache.full_protected_size() == kv_tokens
        assert cache.full_protected_size() == kv_prot
        assert cache.mamba_evictable_size() + cache.mamba_protected_size() == states
        assert cache.mamba_protected_size() == st_prot
        p = self.profile
        assert cache.tree_bytes() == p.kv_bytes(kv_tokens) + states * p.ssm_state_bytes()
        # (b) allocators: free + tree-held == pool; no slot held twice
        kv_free, st_free = self.drv.free_counts()
        assert kv_free + kv_tokens == self.kv_total
        assert st_free + states == self.st_total
        if kv_vals:
            allkv = torch.cat([v.to(torch.int64) for v in kv_vals])
            assert torch.unique(allkv).numel() == allkv.numel()
        if st_vals:
            allst = torch.cat([v.to(torch.int64).flatten() for v in st_vals])
            assert torch.unique(allst).numel() == allst.numel()
        # Marconi's MAMBA LRU holds exactly the state holders
        assert set(tc.lru_lists[MAMBA].cache.values()) == {n for n in live if n.component_data[MAMBA].value is not None}
        assert all(n in live for n in tc.evictable_device_leaves)
        # (a) locked nodes
        for node, nid, rec, path_idx, sv in self.locks:
            assert node in live and is_live(built, node)
            assert tc.node_by_id(nid) is node
            assert torch.equal(cache.path_device_indices(nid), path_idx)
            if sv is not None:
                mv = node.component_data[MAMBA].value
                assert mv is not None and torch.equal(mv, sv)

    def finish(self):
        cache = self.cache
        for node, nid, rec, _, _ in self.locks:
            cache.dec_lock_ref(nid, rec)
        self.locks.clear()
        self.check()
        total_kv = cache.full_evictable_size() + cache.full_protected_size()
        total_st = cache.mamba_evictable_size() + cache.mamba_protected_size()
        assert cache.full_protected_size() == 0 and cache.mamba_protected_size() == 0
        cache.evict(EvictParams(num_tokens=total_kv, mamba_num=total_st))
        assert cache.tree_core.root_node.children == {}
        assert self.drv.free_counts() == self.drv.initial_free
        assert cache.full_evictable_size() == 0 and cache.mamba_evictable_size() == 0
        cache.reset()
        assert self.drv.free_counts() == self.drv.initial_free
        res = self.drv.run([1, 2, 3, 4, 1], [2, 3])
        # an empty tree after reset: no hit, no branch point; the last token's
        # state, and the input end's with input_state
        input_state = self.drv.cache.marconi.config.input_state_on(self.drv.byte_budget is not None)
        states = 2 if input_state else 1
        assert res.hit_len == 0 and res.states_admitted == states
        assert self.drv.free_counts() == (self.kv_total - 6, self.st_total - states)


OPS = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 2**31 - 1)), min_size=MIN_OPS, max_size=MAX_OPS)

SETTINGS = settings(
    derandomize=True,
    deadline=None,
    max_examples=EXAMPLES,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _build(make_marconi, variant):
    cfg = dict(VARIANTS[variant])
    single = cfg.pop("single", False)
    long = cfg.pop("long", False)
    if long:
        built, drv = make_marconi(**dict(POOLS, kv_budget=300), **cfg)
    elif single:
        from sglang_marconi.policy import builtin_profile

        prof = builtin_profile("paper-7b")
        budget = 3 * prof.ssm_state_bytes() + prof.kv_bytes(80)
        built, drv = make_marconi(kv_slots=POOLS["kv_slots"], mamba_slots=POOLS["mamba_slots"], byte_budget=budget, **cfg)
    else:
        built, drv = make_marconi(**POOLS, **cfg)
    return built, drv, single, long


def _run_ops(make_marconi, variant, ops):
    built, drv, single, long = _build(make_marconi, variant)
    w = World(built, drv, seed=len(ops), single_budget=single, long=long)
    w.check()
    for kind, seed in ops:
        w.op(kind, seed)
        w.check()
    c = built.cache.marconi.counters
    w.finish()
    OPS_DONE[variant] = OPS_DONE.get(variant, 0) + len(ops)
    SUPERSEDED_MARKS[variant] = SUPERSEDED_MARKS.get(variant, 0) + c.superseded_marks
    ENDED_MARKS[variant] = ENDED_MARKS.get(variant, 0) + c.ended_marks
    return c


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_random_operation_sequences(make_marconi, variant):
    evictions = []

    @SETTINGS
    @given(ops=OPS)
    def run(ops):
        c = _run_ops(make_marconi, variant, ops)
        evictions.append(c.state_evictions + c.leaf_evictions)

    run()
    assert OPS_DONE[variant] >= EXAMPLES * MIN_OPS
    # the budgets are tight enough that eviction happens constantly (hypothesis's
    # first examples are degenerate: one request repeated)
    assert len(evictions) >= EXAMPLES
    assert sorted(evictions)[len(evictions) // 2] > 50
    if VARIANTS[variant].get("superseded_first"):  # branch points inside paths happened, paths were marked
        assert SUPERSEDED_MARKS[variant] > EXAMPLES, SUPERSEDED_MARKS
    if VARIANTS[variant].get("ended_first"):  # endings were learned final and sequences marked
        assert ENDED_MARKS[variant] > EXAMPLES, ENDED_MARKS


def test_total_operations_at_least_10000():
    if set(OPS_DONE) != set(VARIANTS):
        pytest.skip("run the whole module to count operations")
    assert sum(OPS_DONE.values()) >= 10_000


# ---------------------------------------------------------------- driver failure paths


def test_capacity_error_on_kv_releases_the_match_lock(make_marconi):
    from sglang_marconi.sglang_backend.driver import CapacityError

    built, drv = make_marconi(kv_slots=40, mamba_slots=4)
    drv.run(list(range(1, 21)), [1])
    with pytest.raises(CapacityError):
        drv.run(list(range(1, 21)) + list(range(100, 160)), [1])
    assert built.cache.full_protected_size() == 0 and built.cache.mamba_protected_size() == 0
    built.cache.evict(EvictParams(num_tokens=10**6, mamba_num=10**6))
    assert drv.free_counts() == drv.initial_free


def test_capacity_error_on_state_slot_releases_lock_and_kv(make_marconi):
    from sglang_marconi.sglang_backend.driver import CapacityError

    # 1 tree slot + 4 per-request slots = 5 state slots in the pool
    built, drv = make_marconi(kv_slots=500, mamba_slots=1)
    cache = built.cache
    for i in range(5):
        drv.run(list(range(100 * i + 1, 100 * i + 11)), [1])
    assert drv.free_counts() == (450, 0)
    held = [(n.id, cache.inc_lock_ref(n.id).to_dec_params()) for n in list(cache.tree_core.root_node.children.values())]
    # extends the first request: every state slot is taken and locked
    with pytest.raises(CapacityError):
        drv.run(list(range(1, 11)) + [5, 6, 7], [1])
    for nid, rec in held:
        cache.dec_lock_ref(nid, rec)
    # the failed request must not keep anything locked or allocated
    assert cache.full_protected_size() == 0 and cache.mamba_protected_size() == 0
    cache.evict(EvictParams(num_tokens=10**6, mamba_num=10**6))
    assert drv.free_counts() == drv.initial_free
