"""KV events of a Marconi replica (``--kv-events-config``): resumable prefixes only.

The Marconi cache is built with SGLang's event recording on (what the scheduler
does with ``--kv-events-config``), driven through the driver or direct inserts,
and its ``take_events()`` stream is replayed into a block index shaped like
SMG's ``PositionalIndexer`` (hash -> parent hash, token). After every step the
index must hold exactly the blocks of root -> every node holding an SSM state,
with the hashes SGLang's own recorder computes for those paths.
"""

from __future__ import annotations

import random
from array import array

import pytest
import torch

from sglang.srt.disaggregation.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams
from sglang.srt.mem_cache.events import KVCacheEventRecorder
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_cache.components.base import ComponentType
from sglang.srt.mem_cache.utils import get_hash_str, hash_str_to_int64

from sglang_marconi.policy import builtin_profile, parse_config
from sglang_marconi.sglang_backend.driver import CacheDriver
from sglang_marconi.sglang_backend.events import StatePathEvents
from sglang_marconi.sglang_backend.pools import build_hybrid_cache
from sglang_marconi.sglang_backend.tuning import build_marconi_cache

MAMBA = ComponentType.MAMBA
BIG = 10**9


def _key(tokens):
    return RadixKey(array("q", tokens))


@pytest.fixture
def make():
    made = []

    def build(events=True, kv_slots=2048, mamba_slots=16, kv_budget=None, state_budget=None, **config):
        config.setdefault("tuner", "inline")
        config.setdefault("anchor_state", False)  # the hand-computed streams: branch point + last token
        cfg = parse_config(config)
        built = build_marconi_cache(kv_slots=kv_slots, mamba_slots=mamba_slots, config=cfg,
                                    profile=builtin_profile("paper-7b"), enable_kv_cache_events=events)
        made.append(built)
        return built, CacheDriver(built, kv_budget=kv_budget, state_budget=state_budget)

    yield build
    for built in made:
        built.cache.marconi.close()


class BlockIndex:
    """What a positional indexer learns from the stream (SMG keeps hash -> parent chains)."""

    def __init__(self):
        self.blocks: dict[int, tuple] = {}  # hash -> (parent hash, token)
        self.stored = self.removed = 0

    def apply(self, events):
        for ev in events:
            if isinstance(ev, BlockStored):
                parent = ev.parent_block_hash
                assert ev.block_size == 1 and len(ev.token_ids) == len(ev.block_hashes)
                for h, tok in zip(ev.block_hashes, ev.token_ids):
                    assert parent is None or parent in self.blocks, "a stored block links to an unknown parent"
                    assert h not in self.blocks, "a block stored twice"
                    self.blocks[h] = (parent, tok)
                    parent = h
                    self.stored += 1
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    assert h in self.blocks, "removal of a block never stored"
                    del self.blocks[h]
                    self.removed += 1
            elif isinstance(ev, AllBlocksCleared):
                self.blocks.clear()
        parents = {p for p, _ in self.blocks.values()}
        assert parents <= set(self.blocks) | {None}, "a removed block still has children in the index"
        return self


def chain(tokens):
    """SGLang's event hashes for the pages of ``tokens`` from the root (page size 1, no namespace)."""
    return [hash_str_to_int64(h) for h in get_hash_str(list(tokens), None, page_size=1)]


def walk(node, prefix=()):
    for c in node.children.values():
        p = prefix + tuple(c.key.token_ids)
        yield c, p
        yield from walk(c, p)


def state_paths(built):
    return [p for n, p in walk(built.cache.tree_core.root_node) if n.component_data[MAMBA].value is not None]


def expected_blocks(built):
    out = {}
    for path in state_paths(built):
        hs = chain(path)
        for i, h in enumerate(hs):
            out[h] = (hs[i - 1] if i else None, path[i])
    return out


def check(built, index):
    index.apply(built.cache.take_events())
    assert index.blocks == expected_blocks(built)
    return index


def insert_kv_only(built, tokens):
    """KV into the tree without a state (what a prefill chunk Marconi declines does)."""
    kv = built.kv_allocator.alloc(len(tokens))
    res = built.cache.insert(InsertParams(key=_key(tokens), value=kv, mamba_value=None))
    if res.prefix_len:
        built.kv_allocator.free(kv[: res.prefix_len])
    return res


# ---------------------------------------------------------------- switching


def test_on_only_with_events_and_stock_recorder_otherwise(make):
    built, _ = make(events=False)
    assert built.cache.state_events is None
    assert type(built.cache.tree_core.kv_events) is KVCacheEventRecorder
    built, _ = make(events=True)
    assert isinstance(built.cache.tree_core.kv_events, StatePathEvents)
    assert built.cache.state_events is built.cache.tree_core.kv_events


def test_stock_cache_still_publishes_every_kv_page():
    stock = build_hybrid_cache(kv_slots=512, mamba_slots=8, enable_kv_cache_events=True)
    assert type(stock.cache.tree_core.kv_events) is KVCacheEventRecorder
    insert_kv_only_stock = stock.kv_allocator.alloc(12)
    stock.cache.insert(InsertParams(key=_key(list(range(12))), value=insert_kv_only_stock,
                                    mamba_value=stock.req_to_token_pool.mamba_allocator.alloc(1)))
    assert BlockIndex().apply(stock.cache.take_events()).blocks.keys() == set(chain(range(12)))


# ---------------------------------------------------------------- what is published


def test_kv_without_a_state_publishes_nothing(make):
    built, _ = make()
    index = check(built, BlockIndex())
    insert_kv_only(built, list(range(100, 140)))
    assert built.cache.take_events() == []
    assert built.cache.full_evictable_size() == 40  # the KV is in the tree
    # a state below it publishes the whole path, the KV-only part included
    built.cache.insert(InsertParams(key=_key(list(range(100, 150))), value=built.kv_allocator.alloc(50),
                                    mamba_value=built.mamba_allocator.alloc(1)))
    check(built, index)
    assert len(index.blocks) == 50


def test_hashes_equal_sglang_recorder_for_the_same_path(make):
    """The same request on the Marconi replica (publishes its end state's path) and its
    committed sequence inserted into SGLang's stock hybrid cache (publishes every page):
    the same hashes, parents and tokens."""
    tokens, out = [7, 3, 9, 1, 4, 4, 8, 2, 6, 5, 11, 12], [20, 21, 22]
    built, drv = make()
    drv.run(tokens, out)
    ours = built.cache.take_events()
    stock = build_hybrid_cache(kv_slots=512, mamba_slots=8, enable_kv_cache_events=True)
    committed = tokens + out[:-1]  # what a finished request inserts (the last sampled token never ran)
    stock.cache.insert(InsertParams(key=_key(committed), value=stock.kv_allocator.alloc(len(committed)),
                                    mamba_value=stock.req_to_token_pool.mamba_allocator.alloc(1)))
    theirs = stock.cache.take_events()
    flat = lambda evs: [(h, e.parent_block_hash if i == 0 else None, t)  # noqa: E731
                        for e in evs if isinstance(e, BlockStored) for i, (h, t) in enumerate(zip(e.block_hashes, e.token_ids))]
    assert [x for x in flat(ours)] == [x for x in flat(theirs)]
    assert [h for h, _, _ in flat(ours)] == chain(tokens + out[:-1])
    assert len(flat(ours)) == len(tokens) + len(out) - 1


def test_branch_point_and_eviction_remove_only_what_no_state_lies_under(make):
    built, drv = make(alpha=0.0)
    index = check(built, BlockIndex())
    shared = list(range(1000, 1030))
    a = shared + list(range(2000, 2010))
    b = shared + list(range(3000, 3012))
    drv.run(a, [1])            # state at 40 (a's end)
    check(built, index)
    assert len(index.blocks) == 40
    drv.run(b, [1])            # branch point state at 30, end state at 42
    check(built, index)
    assert len(index.blocks) == 30 + 10 + 12
    # evict states one by one: after each, exactly the paths to the remaining states
    sizes = []
    while state_paths(built):
        before = len(index.blocks)
        built.cache.evict(EvictParams(num_tokens=0, mamba_num=1))
        check(built, index)
        sizes.append((before, len(index.blocks)))
    assert index.blocks == {} and index.removed == index.stored
    assert all(after < before for before, after in sizes)


def test_internal_state_eviction_keeps_shared_prefix_published(make):
    """The branch point's state goes first (oldest use): its KV stays in the tree and its
    blocks stay published (the two leaves' states lie under them); nothing is removed."""
    built, drv = make(alpha=0.0)
    shared = list(range(500, 520))
    drv.run(shared + [1, 2, 3], [9])
    drv.run(shared + [4, 5, 6], [9])
    index = check(built, BlockIndex())
    mid = [n for n, p in walk(built.cache.tree_core.root_node) if len(p) == 20]
    assert len(mid) == 1 and mid[0].component_data[MAMBA].value is not None
    n0 = len(index.blocks)
    built.cache._tombstone_state(mid[0])  # the state alone, as the MAMBA component's eviction does
    assert built.cache.take_events() == []
    check(built, index)
    assert len(index.blocks) == n0


def test_kv_eviction_of_a_leaf_removes_its_exclusive_path(make):
    built, drv = make(alpha=0.0)
    index = check(built, BlockIndex())
    drv.run(list(range(10, 30)), [1])   # 20 tokens
    drv.run(list(range(40, 75)), [1])   # 35 tokens
    check(built, index)
    built.cache.evict(EvictParams(num_tokens=1))   # the least recent leaf goes, with its state
    evs = built.cache.take_events()
    removed = [h for e in evs if isinstance(e, BlockRemoved) for h in e.block_hashes]
    assert sorted(removed) == sorted(chain(range(10, 30)))
    index.apply(evs)
    assert index.blocks == expected_blocks(built)


def test_state_lost_above_kv_only_tail_removes_back_to_the_next_state(make):
    """A KV-only extension under a state: evicting the state unpublishes its path up to
    the deepest ancestor that still covers a state; the KV-only tail never appears."""
    built, drv = make(alpha=0.0)
    drv.run(list(range(100, 110)), [1])                  # state S1 at 10
    drv.run(list(range(100, 110)) + list(range(200, 215)), [1])  # S2 at 25, hits S1
    index = check(built, BlockIndex())
    insert_kv_only(built, list(range(100, 110)) + list(range(200, 215)) + list(range(300, 320)))
    assert built.cache.take_events() == []
    deep = [n for n, p in walk(built.cache.tree_core.root_node) if len(p) == 25][0]
    built.cache._tombstone_state(deep)
    evs = built.cache.take_events()
    removed = [h for e in evs if isinstance(e, BlockRemoved) for h in e.block_hashes]
    assert sorted(removed) == sorted(chain(list(range(100, 110)) + list(range(200, 215)))[10:])
    index.apply(evs)
    assert index.blocks == expected_blocks(built) and len(index.blocks) == 10


@pytest.mark.parametrize("seed, admission", [(0, "input_state"), (1, "input_state"), (2, "anchor_state"),
                                             (3, "anchor_state")])
def test_random_stream_matches_the_state_paths(make, seed, admission):
    """Random sessions over shared prefixes under tiny budgets (evicting all the time),
    with KV-only inserts and count-driven evictions mixed in: after every step the
    index rebuilt from the stream is exactly root -> every stored state."""
    rng = random.Random(seed)
    built, drv = make(alpha=0.5, kv_slots=700, mamba_slots=12, kv_budget=160, state_budget=5, **{admission: True})
    index = BlockIndex()
    prefixes = [[rng.randrange(5, 50) for _ in range(rng.randrange(4, 25))] for _ in range(4)]
    history = []
    for step in range(120):
        r = rng.random()
        if r < 0.15 and history:
            base = rng.choice(history)
            insert_kv_only(built, base + [rng.randrange(5, 50) for _ in range(rng.randrange(1, 8))])
        elif r < 0.25:
            built.cache.evict(EvictParams(num_tokens=rng.randrange(0, 30), mamba_num=rng.randrange(0, 2)))
        else:
            base = rng.choice(history) if history and rng.random() < 0.5 else rng.choice(prefixes)
            inp = base + [rng.randrange(5, 50) for _ in range(rng.randrange(1, 12))]
            out = [rng.randrange(5, 50) for _ in range(rng.randrange(1, 5))]
            drv.run(inp, out)
            history.append(inp + out[:-1])
        check(built, index)
    assert index.stored > 100 and index.removed > 50  # the stream really moved both ways
    built.cache.evict(EvictParams(num_tokens=BIG, mamba_num=BIG))
    check(built, index)
    assert index.blocks == {}


def test_reset_clears_the_index(make):
    built, drv = make()
    drv.run(list(range(10, 20)), [1])
    index = check(built, BlockIndex())
    assert index.blocks
    built.cache.reset()
    check(built, index)
    assert index.blocks == {}
    drv.run(list(range(10, 20)), [1])  # republished from a clean tree
    check(built, index)
    assert len(index.blocks) == 10
