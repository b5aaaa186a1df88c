"""The ``vllm`` baseline (the paper's vLLM+) on a lean block tree.

vLLM+ keeps an SSM state at every 32-token block boundary and evicts by
recency. Driving SGLang's tree with it (``CacheDriver`` + ``BlockAdmission``
on the ``lru`` cache, :func:`build_reference`) costs one SGLang insert walk and
one leaf eviction per block: ~300 per request on 10k-token agent prompts, about
30x slower than replaying ``lru``. This module replays the same cache on a
radix tree of its own that does only what that run's decisions read:

* the tree's shape — nodes of at most one block, split where a match or an
  insert diverges inside one, created in the same order (node ids break ties);
* one recency stamp per node: a match stamps the matched state's path (the
  ``lru`` config's ``refresh: "path"`` and ``kv_refresh: "path"``, so the KV
  stamp and the state stamp are always equal), an insert stamps the node it
  ends at, a split's new parent takes its child's stamp;
* the evictions SGLang's two pools make (the KV pool deletes the least recently
  used leaf; the state pool takes the least recently used state holder with at
  most one child, deleting a leaf and tombstoning an internal node) and the
  single byte budget's queue (``MarconiRadixCache._evict_to_bytes_recency``).

Each eviction queue is a heap kept across calls, entries checked when popped,
instead of a queue rebuilt from every candidate per call. The state pool's
per-call queue breaks equal stamps by node id among the holders it starts
with and puts a holder that became one during the call (a deleted leaf's
parent) after them, and the heap here does the same. ``tests/test_vllm_blocks.py``
checks identical hits, admissions, evictions and final trees against
:func:`build_reference` on trace slices in both layouts.
"""

from __future__ import annotations

import heapq
import itertools
from types import SimpleNamespace
from typing import Optional, Sequence

from ..policy.admission import AdmissionReason, BlockAdmission
from ..sglang_backend.driver import CapacityError, RequestResult


class _Node:
    __slots__ = ("id", "parent", "children", "key", "state", "t", "cut_phase", "cut")

    def __init__(self, nid: int, parent, key: tuple, state: bool, t: int):
        self.id = nid
        self.parent = parent
        self.children: dict = {}
        self.key = key
        self.state = state
        self.t = t
        self.cut_phase = -1  #: the eviction phase that last deleted a child of this node
        self.cut = 0  #: how many children that phase deleted


class BlockTree:
    """The vllm baseline's radix tree, stamps and eviction queues (module docstring)."""

    def __init__(self, profile, single: bool):
        self.profile = profile
        self.single = single  #: one byte budget (one queue) instead of SGLang's two pools
        self.root = _Node(0, None, (), False, 0)
        self._ids = itertools.count(1)
        self.clock = 0
        self.kv_tokens = 0
        self.states = 0
        self._kv_heap: list = []  # (stamp, id, node): leaves (two pools' KV pool)
        self._state_heap: list = []  # (stamp, id, node): state holders with <= 1 child (two pools' state pool)
        self._single_heap: list = []  # (stamp, id, node): the single byte budget's candidates
        self._phase = 0
        self.nodes = 0
        self._pushes = 0  # heap entries pushed since the last compaction

    # -- queues ---------------------------------------------------------------
    def _touch(self, node) -> None:
        """``node``'s stamp or shape changed: give each queue it may now belong to an entry."""
        if node.parent is None:
            return
        entry = (node.t, node.id, node)
        nchild = len(node.children)
        if self.single:
            if nchild == 0 or (nchild == 1 and node.state):
                heapq.heappush(self._single_heap, entry)
        else:
            if nchild == 0:
                heapq.heappush(self._kv_heap, entry)
            if nchild <= 1 and node.state:
                heapq.heappush(self._state_heap, entry)
        self._pushes += 1

    def compact(self) -> None:
        """Between requests: drop stale entries when they outnumber the nodes (a
        refreshed stamp leaves its old entry behind until popped)."""
        if self._pushes < 4 * self.nodes + 4096:
            return
        self._pushes = 0
        for name in ("_kv_heap", "_state_heap", "_single_heap"):
            heap = [e for e in getattr(self, name) if e[2].parent is not None and e[0] == e[2].t]
            heapq.heapify(heap)
            setattr(self, name, heap)
            self._pushes += len(heap)

    # -- match ----------------------------------------------------------------
    def match(self, key: Sequence[int]):
        """SGLang's match on ``key``: split the node the key diverges (or ends) in,
        stamp the path to the deepest state; return that state's node and position."""
        node, pos, n = self.root, 0, len(key)
        best, best_pos = self.root, 0
        children = node.children
        while pos < n:
            child = children.get(key[pos])
            if child is None:
                break
            ck = child.key
            m = len(ck)
            if key[pos:pos + m] != ck:
                self._split(child, _common(ck, key, pos))
                break
            pos += m
            node = child
            children = node.children
            if node.state:
                best, best_pos = node, pos
        self.clock += 1
        if best is not self.root:
            t = self.clock
            cur = best
            while cur is not self.root:
                cur.t = t
                self._touch(cur)
                cur = cur.parent
        return best, best_pos

    def _split(self, child, at: int):
        """SGLang's ``_split_node``: a new parent holds ``child``'s first ``at`` tokens
        (no state: a state sits at its node's end), with ``child``'s stamp."""
        parent = child.parent
        up = _Node(next(self._ids), parent, child.key[:at], False, child.t)
        child.key = child.key[at:]
        child.parent = up
        up.children[child.key[0]] = child
        parent.children[up.key[0]] = up
        self.nodes += 1
        return up

    # -- insert ---------------------------------------------------------------
    def insert(self, tokens: Sequence[int], start_node, start: int, end: int):
        """Insert ``tokens[:end]`` with a state at ``end``, the walk resumed at
        ``start_node`` (which ends at ``start``). Returns (the node at ``end``,
        whether it already held a state)."""
        node, pos = start_node, start
        while True:
            if pos == end:
                break
            child = node.children.get(tokens[pos])
            if child is None:
                leaf = _Node(next(self._ids), node, tuple(tokens[pos:end]), False, 0)
                node.children[leaf.key[0]] = leaf
                self.kv_tokens += end - pos
                self.nodes += 1
                node = leaf
                break
            ck = child.key
            m = len(ck)
            if m <= end - pos and tokens[pos:pos + m] == ck:
                pos += m
                node = child
                continue
            at = _common(ck, tokens, pos, end)
            node = self._split(child, at)
            pos += at
        existed = node.state
        if not existed:
            node.state = True
            self.states += 1
        self.clock += 1
        node.t = self.clock
        self._touch(node)
        return node, existed

    # -- eviction: SGLang's two pools ------------------------------------------
    def _delete_leaf(self, node) -> tuple[int, int]:
        """Delete an unlocked leaf: (KV tokens, states) freed. Its parent may have
        become a leaf or a holder with one child: it gets queue entries."""
        parent = node.parent
        del parent.children[node.key[0]]
        node.parent = None
        kv = len(node.key)
        self.kv_tokens -= kv
        st = 1 if node.state else 0
        self.states -= st
        self.nodes -= 1
        if parent.cut_phase != self._phase:
            parent.cut_phase, parent.cut = self._phase, 0
        parent.cut += 1
        self._touch(parent)
        return kv, st

    def _evict_node(self, x):
        """Evict a candidate: delete a leaf (returns its parent), or take an internal
        node's state (returns None)."""
        if not x.children:
            parent = x.parent
            self._delete_leaf(x)
            return parent
        x.state = False
        self.states -= 1
        return None

    def evict(self, num_tokens: int = 0, mamba_num: int = 0, locked=None) -> None:
        """``UnifiedRadixCache.evict(EvictParams(num_tokens, mamba_num))`` with Marconi's
        recency components: the KV pool's walk, then the state pool's. ``locked``: the
        node a request in flight holds (not evicted; SGLang locks its state and the
        KV of its path, and only it can be a leaf there)."""
        assert not self.single, "one byte budget: the pools never run short (build_policy sizes them)"
        kv = st = 0
        if num_tokens > 0:
            self._phase += 1
            heap, spared = self._kv_heap, []
            while kv < num_tokens and heap:
                e = heapq.heappop(heap)
                t, _, x = e
                if x.parent is None or x.children or t != x.t:
                    continue
                if x is locked:
                    spared.append(e)
                    continue
                dk, ds = self._delete_leaf(x)
                kv, st = kv + dk, st + ds
            for e in spared:
                heapq.heappush(heap, e)
        if st < mamba_num:
            self._evict_states(mamba_num - st, locked)

    def _evict_states(self, want: int, locked=None) -> None:
        """The state pool's walk: the unlocked holders with at most one child at its
        start, oldest first, ties by node id; a holder that becomes one during the walk
        (a deleted leaf's parent) ranks after every starting holder of its stamp."""
        self._phase += 1
        phase = self._phase
        heap = self._state_heap
        spared: list = []  # the locked node's entries, back into the kept heap afterwards
        start = self._starting_holders(locked, spared)  # None: the kept heap's entries are the starting set
        src = heap if start is None else start
        late: list = []  # (stamp, 1, seq, node): holders made during the walk
        seq = itertools.count()
        done = 0
        cut_parent = None  # the parent of the leaf the last step deleted
        while done < want:
            p, cut_parent = cut_parent, None
            if p is not None and p is not self.root and p is not locked and p.state and len(p.children) <= 1 \
                    and self._children_at_start(p, phase) > 1:
                heapq.heappush(late, (p.t, 1, next(seq), p))
            while src:
                t, _, x = src[0]
                if x.parent is not None and x.state and t == x.t and (
                        start is not None or self._children_at_start(x, phase) <= 1):
                    if x is not locked:
                        break
                    spared.append(src[0])
                heapq.heappop(src)
            while late and (late[0][3].parent is None or not late[0][3].state):
                heapq.heappop(late)
            if src and (not late or src[0][0] <= late[0][0]):
                x = heapq.heappop(src)[2]
            elif late:
                x = heapq.heappop(late)[3]
            else:
                break
            cut_parent = self._evict_node(x)
            done += 1
        for _, _, _, x in late:  # they stay holders for the walks to come
            if x.parent is not None and x.state:
                heapq.heappush(heap, (x.t, x.id, x))
        for e in spared:
            heapq.heappush(heap, e)

    @staticmethod
    def _children_at_start(node, phase: int) -> int:
        return len(node.children) + (node.cut if node.cut_phase == phase else 0)

    def _starting_holders(self, locked, spared: list) -> Optional[list]:
        """None when some unlocked holder has at most one child (the kept heap serves);
        otherwise every unlocked holder (SGLang's fallback), as a heap of this walk's own."""
        heap = self._state_heap
        while heap:
            t, _, x = heap[0]
            if x.parent is not None and x.state and t == x.t and len(x.children) <= 1:
                if x is not locked:
                    return None
                spared.append(heap[0])
            heapq.heappop(heap)
        out, stack = [], [self.root]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            if n is not self.root and n is not locked and n.state:
                out.append((n.t, n.id, n))
        heapq.heapify(out)
        return out

    # -- eviction: one byte budget ---------------------------------------------
    def tree_bytes(self) -> int:
        p = self.profile
        return p.kv_bytes(self.kv_tokens) + self.states * p.ssm_state_bytes()

    def evict_to_bytes(self, budget_bytes: int) -> int:
        """``MarconiRadixCache._evict_to_bytes_recency``: the oldest candidate (an
        unlocked node with at most one child that is a leaf or holds a state),
        ties by node id; a leaf is deleted, an internal node loses its state."""
        heap = self._single_heap
        n = 0
        while self.tree_bytes() > budget_bytes:
            x = None
            while heap:
                t, _, c = heapq.heappop(heap)
                if c.parent is not None and t == c.t and len(c.children) <= 1 and (c.state or not c.children):
                    x = c
                    break
            if x is None:
                break
            self._evict_node(x)
            n += 1
        return n

    # -- probes ---------------------------------------------------------------
    def peek(self, tokens: Sequence[int], kv: bool = False) -> int:
        """``CacheDriver.peek_hit``: the deepest state on ``tokens``' path (``kv``:
        the KV match), without splitting or stamping."""
        node, pos, hit, n = self.root, 0, 0, len(tokens)
        while pos < n:
            child = node.children.get(tokens[pos])
            if child is None:
                break
            ck = child.key
            m = len(ck)
            if tuple(tokens[pos:pos + m]) != ck:
                if kv:
                    hit = pos + _common(ck, tokens, pos)
                break
            pos += m
            node = child
            if kv or node.state:
                hit = pos
        return hit

    def snapshot(self) -> tuple:
        """Every node in id order: (where it ends, its length, holds a state, stamp rank)."""
        out, stack = [], [(self.root, 0)]
        while stack:
            n, end = stack.pop()
            for c in n.children.values():
                stack.append((c, end + len(c.key)))
            if n is not self.root:
                out.append((n.id, end, len(n.key), n.state, n.t))
        return _ranked(out)


def _ranked(nodes: list) -> tuple:
    """Nodes sorted by id, ids and stamps replaced by their ranks (two trees built by
    the same operations agree on ranks, not on raw ids or clock values)."""
    nodes = sorted(nodes)
    stamps = {t: i for i, t in enumerate(sorted({n[-1] for n in nodes}))}
    return tuple((end, length, state, stamps[t]) for _, end, length, state, t in nodes)


def _common(key: tuple, tokens: Sequence[int], pos: int, end: Optional[int] = None) -> int:
    """Length of the common prefix of ``key`` and ``tokens[pos:end]``."""
    limit = min(len(key), (len(tokens) if end is None else end) - pos)
    i = 0
    while i < limit and key[i] == tokens[pos + i]:
        i += 1
    return i


class BlockDriver:
    """``CacheDriver``'s interface (``run``, budgets, probes) over a :class:`BlockTree`."""

    def __init__(self, profile, *, block: int, kv_slots: int, mamba_slots: int, kv_budget: Optional[int] = None,
                 state_budget: Optional[int] = None, byte_budget: Optional[int] = None):
        self.profile = profile
        self.admission = BlockAdmission(block)
        self.cache = BlockTree(profile, single=byte_budget is not None)
        self.kv_slots, self.mamba_slots = kv_slots, mamba_slots
        self.kv_budget, self.state_budget, self.byte_budget = kv_budget, state_budget, byte_budget

    def run(self, input_ids: Sequence[int], output_ids: Sequence[int]) -> RequestResult:
        if len(input_ids) == 0:
            raise ValueError("request has an empty input")
        tree = self.cache
        tree.compact()
        tokens = tuple(input_ids) + tuple(output_ids)
        committed = len(input_ids) + max(len(output_ids) - 1, 0)
        held, hit = tree.match(tokens[: len(input_ids) - 1])
        result = RequestResult(input_len=len(input_ids), hit_len=hit,
                               flops_saved=self.profile.prefill_flops(0, hit) if hit else 0.0)
        plan = self.admission.plan(len(input_ids), committed, hit, hit)
        # The pools hold the tree and the request in flight; when they run short, the
        # request's node is locked while the tree evicts (CacheDriver._alloc_kv / _alloc_state).
        short = committed - hit - (self.kv_slots - tree.kv_tokens)
        if short > 0:
            tree.evict(short, 0, locked=held)
            if committed - hit > self.kv_slots - tree.kv_tokens:
                raise CapacityError(f"request needs {committed - hit} KV slots; "
                                    f"{self.kv_slots - tree.kv_tokens} free after eviction (pool of {self.kv_slots})")
        # One pass when the state slots are free for the whole plan; otherwise a slot per
        # checkpoint, evicting for it with the lock on the last node inserted.
        one_pass = len(plan) > 1 and self.mamba_slots - tree.states >= len(plan)
        node, pos = tree.root, 0
        grid = AdmissionReason.GRID.value
        for cp in plan:
            if not one_pass and self.mamba_slots - tree.states < 1:
                tree.evict(0, 1, locked=held)
                if self.mamba_slots - tree.states < 1:
                    raise CapacityError("no SSM state slot free after eviction; every state is locked")
            node, existed = tree.insert(tokens, node, pos, cp.position)
            held, pos = node, cp.position
            result.checkpoints.append((pos, grid, not existed))
        self.enforce_budget()
        return result

    def enforce_budget(self) -> None:
        tree = self.cache
        if self.byte_budget is not None:
            tree.evict_to_bytes(self.byte_budget)
            return
        kv_excess = 0 if self.kv_budget is None else max(0, tree.kv_tokens - self.kv_budget)
        st_excess = 0 if self.state_budget is None else max(0, tree.states - self.state_budget)
        if kv_excess or st_excess:
            tree.evict(kv_excess, st_excess)

    def tree_kv_tokens(self) -> int:
        return self.cache.kv_tokens

    def tree_states(self) -> int:
        return self.cache.states

    def can_peek(self) -> bool:
        return True

    def peek_hit(self, tokens: Sequence[int], kv: bool = False) -> int:
        return self.cache.peek(tokens, kv)


def build_block_driver(profile, *, block: int, kv_slots: int, mamba_slots: int, **budgets):
    """(built, driver) as ``build_policy`` returns them for ``vllm``."""
    drv = BlockDriver(profile, block=block, kv_slots=kv_slots, mamba_slots=mamba_slots, **budgets)
    return SimpleNamespace(cache=drv.cache), drv


__all__ = ["BlockDriver", "BlockTree", "build_block_driver"]
