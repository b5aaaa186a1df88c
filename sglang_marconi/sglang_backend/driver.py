"""A scheduler-shaped driver: what SGLang's scheduler does with the tree cache
for one request, without a model.

Per request, in order (page size 1, one request at a time):

1. ``match_prefix`` on the input minus its last token (SGLang never matches
   the last input token: its logits must be computed), lock the matched node;
2. allocate KV slots for the uncached tokens (evicting through the cache's
   own walks when the pool is short);
3. during prefill, insert the checkpoint the admission plan asks for (the
   branch point), move the lock onto it;
4. at finish, insert the committed sequence (input + output − 1: the last
   sampled token never runs through the model) with the final SSM state;
5. unlock, then hold the tree to its budget.

Request-owned KV that duplicates what the tree already holds is freed by the
insert itself (``prev_prefix_len``), and a state slot the tree did not take is
returned, exactly as SGLang's ``checkpoint`` does, so the allocators' free counts return to their initial
values after ``reset``. SSM state *values* are never computed (slots stand in
for them); slot counts and tree shapes are what the policies act on.

The same driver runs the demo, the tests, the α tuner's replays and the trace
replay, for Marconi and for SGLang's stock cache alike.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from ..policy.admission import Admission, AdmissionReason, BlockAdmission, MarconiAdmission, SGLangGridAdmission
from .pools import BuiltCache


class CapacityError(RuntimeError):
    """A request cannot be served: the pools cannot hold its own working set."""


@dataclass
class RequestResult:
    input_len: int
    hit_len: int
    flops_saved: float
    checkpoints: list[tuple[int, str, bool]] = field(default_factory=list)  # (position, reason, admitted)

    @property
    def states_admitted(self) -> int:
        return sum(1 for _, _, ok in self.checkpoints if ok)


@dataclass
class _Held:
    """What a request in flight holds: its locked node, the lock, and how far
    (``protected``) its KV row is the tree's own."""

    node: int
    lock: object
    protected: int


def _mamba_ct():
    from sglang.srt.mem_cache.unified_cache.components.base import ComponentType

    return ComponentType.MAMBA


def _key(tokens: Sequence[int]) -> RadixKey:
    return RadixKey(array("q", tokens))


class CacheDriver:
    """Drives one cache through a request stream.

    ``kv_budget`` / ``state_budget``: the tree is evicted down to at most this
    many cached KV tokens / SSM states after every request (two-pool budget);
    ``byte_budget``: one byte budget over both (paper mode, Marconi only).
    Unset budgets leave the pools' own capacity as the only limit.
    """

    #: block admission inserts a request's checkpoints in one pass (see ``_checkpoint``)
    one_pass = True

    def __init__(
        self,
        built: BuiltCache,
        *,
        profile=None,
        kv_budget: Optional[int] = None,
        state_budget: Optional[int] = None,
        byte_budget: Optional[int] = None,
        admission: Optional[Admission] = None,
    ):
        self.built = built
        self.cache = built.cache
        self.marconi = getattr(self.cache, "marconi", None)
        self.profile = profile if profile is not None else (self.marconi.profile if self.marconi else None)
        self.kv_budget = kv_budget
        self.state_budget = state_budget
        self.byte_budget = byte_budget
        if byte_budget is not None and self.marconi is None:
            raise ValueError("a single byte budget needs the marconi cache (evict_to_bytes)")
        self.initial_free = self.free_counts()
        if admission is None:
            if self.marconi is not None:
                cfg = self.marconi.config
                grid = self.cache.components[_mamba_ct()].mamba_checkpoint_grid
                admission = MarconiAdmission(cfg.branch_points, grid, input_state=cfg.input_state_on(byte_budget is not None),
                                             anchor=cfg.anchor_state, anchor_bits=cfg.anchor_bits,
                                             prompt_end=cfg.prompt_end_state)
            else:
                admission = SGLangGridAdmission(self.cache.components[_mamba_ct()].mamba_checkpoint_grid)
        self.admission = admission

    # -- allocator helpers ----------------------------------------------------
    def free_counts(self) -> tuple[int, int]:
        return self.built.kv_allocator.available_size(), self.built.mamba_allocator.available_size()

    def _alloc_kv(self, n: int) -> torch.Tensor:
        alloc = self.built.kv_allocator
        if n <= 0:
            return torch.empty((0,), dtype=torch.int64, device=self.cache.device)
        short = n - alloc.available_size()
        if short > 0:
            self.cache.evict(EvictParams(num_tokens=short))
        out = alloc.alloc(n)
        if out is None:
            raise CapacityError(
                f"request needs {n} KV slots; {alloc.available_size()} free after eviction "
                f"(pool of {alloc.size}); size the KV pool above the longest request"
            )
        return out

    def _alloc_state(self) -> torch.Tensor:
        alloc = self.built.mamba_allocator
        if alloc.available_size() < 1:
            self.cache.evict(EvictParams(num_tokens=0, mamba_num=1))
        out = alloc.alloc(1)
        if out is None:
            raise CapacityError("no SSM state slot free after eviction; every state is locked")
        return out

    # -- one request ------------------------------------------------------------
    def run(self, input_ids: Sequence[int], output_ids: Sequence[int]) -> RequestResult:
        if len(input_ids) == 0:
            raise ValueError("request has an empty input")
        cache = self.cache
        tokens = list(input_ids) + list(output_ids)
        committed = len(input_ids) + max(len(output_ids) - 1, 0)

        match = cache.match_prefix(MatchPrefixParams(key=_key(input_ids[:-1])))
        hit = match.device_prefix_len
        node = match.last_device_node
        lock = cache.inc_lock_ref(node)
        prefix = cache.path_device_indices(node)
        assert len(prefix) == hit, (len(prefix), hit)

        reported = match.full_kv_hit_length if self.admission.oracle else hit
        result = RequestResult(
            input_len=len(input_ids),
            hit_len=reported,
            flops_saved=self.profile.prefill_flops(0, reported) if (self.profile is not None and reported) else 0.0,
        )
        try:
            row = torch.cat([prefix.to(torch.int64), self._alloc_kv(committed - hit).to(torch.int64)])
        except CapacityError:
            cache.dec_lock_ref(node, lock.to_dec_params())
            raise
        held = _Held(node=node, lock=lock, protected=hit)  # row[:protected] are the tree's own indices
        try:
            self._checkpoint(input_ids, tokens, committed, hit, match, row, held, result)
        finally:
            # Normally the last checkpoint reaches `committed`; on a CapacityError
            # mid-plan the request gives back what it still holds.
            if held.protected < committed:
                self.built.kv_allocator.free(row[held.protected : committed])
            cache.dec_lock_ref(held.node, held.lock.to_dec_params())
        if self.marconi is not None:
            self.marconi.on_request_finished(input_ids, output_ids)
        self.enforce_budget()
        return result

    def _checkpoint(self, input_ids, tokens, committed, hit, match, row, held, result) -> None:
        """Insert the admission plan's checkpoints in order, advancing how far the
        tree owns the row.

        Each checkpoint is one SGLang insert; the request's lock moves onto each
        inserted node. One pass (block admission, a state slot free for every
        checkpoint, so nothing is evicted meanwhile): the state slots are taken in
        one allocator call (the same slots, in the same order, as one call per
        checkpoint: nothing else allocates or frees meanwhile but a slot the tree
        declines, which goes to the free list's end either way); each insert after
        the first resumes SGLang's insert walk at the node the previous one ended at
        (:meth:`_insert_below`) instead of walking again from the root; and the lock
        stays on the matched node — moving it onto the last checkpoint only for
        :meth:`run` to release it right after is a lock walk up the whole new path
        and back that leaves every count and leaf set as it was. O(path + blocks)
        per request instead of O(path x blocks). ``self.one_pass = False`` keeps the
        insert-per-checkpoint path (the reference the tests compare one pass with)."""
        plan = self.admission.plan(len(input_ids), committed, hit, match.full_kv_hit_length,
                                   prefill_only=len(tokens) == len(input_ids))
        one_pass = (self.one_pass and isinstance(self.admission, BlockAdmission) and len(plan) > 1
                    and self._can_resume_insert() and self.built.mamba_allocator.available_size() >= len(plan))
        slots = self.built.mamba_allocator.alloc(len(plan)) if one_pass else None
        try:
            self._insert_plan(plan, slots, input_ids, tokens, row, held, result)
        except BaseException:
            if slots is not None:  # give back the slots no insert reached
                self.built.mamba_allocator.free(slots[len(result.checkpoints) + 1 :])
            raise

    def _insert_plan(self, plan, slots, input_ids, tokens, row, held, result) -> None:
        cache = self.cache
        one_pass = slots is not None
        prev = None  # (node id, length) of the previous checkpoint, in one pass
        ids = array("q", tokens)  # converted once per request
        for i, cp in enumerate(plan):
            slot = slots[i : i + 1] if one_pass else self._alloc_state()
            params = InsertParams(
                # A walk from the root may store the key itself in a new node, so it
                # gets its own tokens; a resumed walk stores slices of key[start:]
                # only, so there a prefix view (``limit``) spares an O(position) copy.
                key=RadixKey(ids, limit=cp.position) if prev is not None else RadixKey(ids[: cp.position]),
                value=row[: cp.position],
                mamba_value=slot,
                prev_prefix_len=held.protected,  # the tree frees our duplicates past this
            )
            params.marconi_reason = cp.reason
            if cp.reason is AdmissionReason.LAST_TOKEN:
                params.marconi_output_ids = tokens[len(input_ids):]
            res = cache.insert(params) if prev is None else self._insert_below(*prev, params)
            if res.prefix_len > held.protected:
                # The tree already had these tokens and freed our copies: use its own.
                row[held.protected : res.prefix_len] = cache.path_device_indices(res.last_device_node)[
                    held.protected : res.prefix_len
                ]
            if res.mamba_exist:
                self.built.mamba_allocator.free(slot)
            held.protected = max(held.protected, cp.position)
            result.checkpoints.append((cp.position, cp.reason.value, not res.mamba_exist))
            if one_pass:
                prev = (res.last_device_node, cp.position)
            else:
                self._move_lock(held, res.last_device_node)

    def _move_lock(self, held: _Held, node) -> None:
        new_lock = self.cache.inc_lock_ref(node)
        self.cache.dec_lock_ref(held.node, held.lock.to_dec_params())
        held.node, held.lock = node, new_lock

    def _can_resume_insert(self) -> bool:
        """Whether :meth:`_insert_below` applies: SGLang's Python tree core, page
        size 1, no host/buffer pipeline, no per-path state cap (whose eviction
        would run inside the insert)."""
        core = getattr(self.cache, "tree_core", None)
        return (self.can_peek() and core.page_size == 1 and getattr(self.cache, "buffer_pipeline", None) is None
                and getattr(self.cache.components[_mamba_ct()], "mamba_max_states_per_path", -1) < 0)

    def _insert_below(self, node_id, start: int, params: InsertParams):
        """``cache.insert(params)`` whose key extends the path to ``node_id``
        (``start`` tokens, inserted by this request): SGLang's own insert walk
        (``UnifiedTreeCore``'s resumable insert and ``UnifiedRadixCache.insert``'s
        action pump), started at that node instead of at the root. What it skips —
        re-walking the path above — only restamps SGLang's ``last_access_time``
        and hit counts, which neither eviction order here reads."""
        from sglang.srt.mem_cache.base_prefix_cache import InsertResult
        from sglang.srt.mem_cache.unified_cache.unified_tree_core import _InsertPhase, _InsertWalkState

        cache = self.cache
        core = cache.tree_core
        key = params.key[start:]
        core._ongoing_insert_walk_state = _InsertWalkState(
            phase=_InsertPhase.WALK, node=core.node_by_id(node_id), key=key, value=params.value[start:],
            params=params, priority=params.priority or 0, result=InsertResult(prefix_len=0),
            total_prefix_length=start,
        )
        try:
            step = core._advance_insert()
            while True:
                cache._apply_cache_actions(step.actions)
                if step.result is not None:
                    return step.result
                step = core.resume_insert()
        finally:
            cache._apply_cache_actions(core.end_insert())

    # -- read-only probes -------------------------------------------------------
    def can_peek(self) -> bool:
        """Whether :meth:`peek_hit` can walk this tree (SGLang's Rust tree core
        does not expose its nodes)."""
        try:
            return self.cache.tree_core.root_node is not None
        except (AttributeError, NotImplementedError):
            return False

    def peek_hit(self, tokens: Sequence[int], kv: bool = False) -> int:
        """What a request whose matchable prompt is ``tokens`` would hit now:
        the end of the deepest node on its path with KV all the way and an SSM
        state of its own. Walks the tree without splitting a node or touching a
        recency stamp (``match_prefix`` does both), so probing changes nothing.
        ``kv``: the cached KV prefix instead, state or not (what SGLang's KV
        cache events tell a router about this cache)."""
        from sglang.srt.mem_cache.unified_cache.components.base import ComponentType

        core = self.cache.tree_core
        if not self.can_peek():
            raise NotImplementedError(f"peek_hit needs SGLang's Python tree core, not {type(core).__name__}")
        root = core.root_node
        full, mamba = ComponentType.FULL, _mamba_ct()
        key = _key(tokens).page_aligned(core.page_size)
        node, pos, hit = root, 0, 0
        while pos < len(key):
            child = node.children.get(key.child_key_at(pos, core.page_size))
            if child is None or child.component_data[full].value is None:
                break
            matched = child.key.match_at(key, pos, page_size=core.page_size)
            if matched < len(child.key):
                hit = pos + matched if kv else hit  # a state sits at a node's end only
                break
            pos += matched
            node = child
            if kv or child.component_data[mamba].value is not None:
                hit = pos
        return hit

    # -- snapshots ------------------------------------------------------------
    def load_snapshot(self, snap) -> None:
        """Rebuild a tree exported by ``MarconiRadixCache.export_tree`` into this
        (empty) cache: same nodes, states and recency stamps, fresh slots."""
        cache = self.cache
        nodes: list = []
        paths: list = []
        for parent, own, has_state, t, kv_t in snap.nodes:
            base = () if parent < 0 else paths[parent]
            path = base + tuple(own)
            prefix = cache.path_device_indices(nodes[parent]) if parent >= 0 else torch.empty((0,), dtype=torch.int64)
            value = torch.cat([prefix.to(torch.int64), self._alloc_kv(len(own)).to(torch.int64)])
            slot = self._alloc_state() if has_state else None
            res = cache.insert(InsertParams(key=_key(path), value=value, mamba_value=slot, prev_prefix_len=len(base)))
            if slot is not None and res.mamba_exist:
                self.built.mamba_allocator.free(slot)
            tree_node = cache.tree_core.node_by_id(res.last_device_node)
            tree_node.marconi_t, tree_node.marconi_kv_t = t, kv_t
            nodes.append(res.last_device_node)
            paths.append(path)
        if self.marconi is not None:
            self.marconi.clock = max(self.marconi.clock, snap.clock)

    # -- budgets --------------------------------------------------------------
    def tree_kv_tokens(self) -> int:
        return self.cache.full_evictable_size() + self.cache.full_protected_size()

    def tree_states(self) -> int:
        return self.cache.mamba_evictable_size() + self.cache.mamba_protected_size()

    def enforce_budget(self) -> None:
        if self.byte_budget is not None:
            self.cache.evict_to_bytes(self.byte_budget)
            return
        kv_excess = 0 if self.kv_budget is None else max(0, self.tree_kv_tokens() - self.kv_budget)
        st_excess = 0 if self.state_budget is None else max(0, self.tree_states() - self.state_budget)
        if kv_excess or st_excess:
            self.cache.evict(EvictParams(num_tokens=kv_excess, mamba_num=st_excess))

    def reset(self) -> None:
        self.cache.reset()


__all__ = ["CacheDriver", "CapacityError", "RequestResult", "AdmissionReason"]
