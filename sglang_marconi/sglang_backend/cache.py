"""``MarconiRadixCache``: SGLang's UnifiedRadixCache with Marconi's components.

The tree, the pools, locking, splitting and the controller are SGLang's; the
FULL and MAMBA components are replaced (``components.py``) and a
:class:`~sglang_marconi.sglang_backend.state.MarconiState` carries the policy
state. Custom components run on SGLang's Python tree core (its Rust core only
hosts the built-in components).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
from sglang.srt.mem_cache.unified_cache.components.base import ComponentType
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from ..policy.admission import AdmissionReason
from ..policy.config import MarconiConfig
from ..policy.tuner import AlphaTuner
from .components import MarconiFullComponent, MarconiMambaComponent
from .events import StatePathEvents
from .state import MarconiState, _stamp

logger = logging.getLogger("sglang_marconi")

GB = 1e9


@dataclasses.dataclass(frozen=True)
class TreeSnapshot:
    clock: float
    #: (parent index or -1, the node's own tokens, holds a state, state stamp, KV stamp), pre-order
    nodes: tuple


class MarconiRadixCache(UnifiedRadixCache):
    def __init__(self, params, *, config: MarconiConfig, profile, tuner_spec=None):
        if ComponentType.MAMBA not in (params.tree_components or ()):
            raise ValueError(
                "--radix-cache-backend marconi caches SSM states of hybrid models; "
                f"this model's tree components are {params.tree_components}"
            )
        if params.enable_session_radix_cache:
            raise ValueError("--radix-cache-backend marconi does not support --enable-session-radix-cache yet")
        override = dict(params.component_registry_override or {})
        override[ComponentType.FULL] = MarconiFullComponent
        override[ComponentType.MAMBA] = MarconiMambaComponent
        params = dataclasses.replace(
            params,
            component_registry_override=override,
            eviction_policy="lru",
            eviction_policy_config=None,
            tree_core_backend="python",
        )
        tuner = None
        if config.auto_alpha and config.utility_form in ("sum", "product"):
            from .tuning import replay_alphas

            tuner = AlphaTuner(config, replay_alphas, tuner_spec)
        self.marconi = MarconiState(config, profile, tuner)
        self.state_events = None
        super().__init__(params)
        self.marconi.root = self.tree_core.root_node
        # --kv-events-config: publish resumable prefixes (paths to stored states), not every KV page
        if self.tree_core.kv_events.enabled:
            self.state_events = StatePathEvents.replacing(self.tree_core.kv_events)
            self.tree_core.kv_events = self.state_events
            logger.info("marconi: KV events publish resumable prefixes only (root -> each stored SSM state)")
        if tuner is not None and config.replay_start == "snapshot":
            tuner.snapshot_fn = self.export_tree

    # -- tree snapshots for the α tuner's replays ------------------------------
    def export_tree(self) -> "TreeSnapshot":
        """The tree's shape, states and recency stamps (no tensors, picklable):
        what a tuning replay needs to start from the live cache instead of a
        warm-up. Nodes in pre-order, each with its parent's index."""
        ct = ComponentType.MAMBA
        nodes = []
        stack = [(self.tree_core.root_node, -1)]
        while stack:
            node, parent = stack.pop()
            idx = parent
            if node is not self.tree_core.root_node:
                idx = len(nodes)
                nodes.append((
                    parent, tuple(node.key.token_ids), node.component_data[ct].value is not None,
                    getattr(node, "marconi_t", 0.0), getattr(node, "marconi_kv_t", 0.0),
                ))
            for child in sorted(node.children.values(), key=lambda n: n.id, reverse=True):
                stack.append((child, idx))
        return TreeSnapshot(clock=self.marconi.clock, nodes=tuple(nodes))

    def evict(self, params):
        """Count-driven eviction with the KV frees of the whole call batched into
        one allocator call (SGLang's ``free_group``): the allocator's free list is
        concatenated once per call instead of once per evicted node. Only for this
        entry point: ``evict_for_alloc`` watches the allocator's free size while it
        walks, so its frees must land immediately."""
        alloc = self.token_to_kv_pool_allocator
        if getattr(alloc, "free_group", ()) is not None:  # nested group, or no support
            return super().evict(params)
        alloc.free_group_begin()
        try:
            return super().evict(params)
        finally:
            alloc.free_group_end()

    # -- live scheduler hook: feed finished requests to the α tuner ----------
    def checkpoint_into_tree(self, req, *, up_to: int, **kwargs) -> None:
        super().checkpoint_into_tree(req, up_to=up_to, **kwargs)
        budget = self.marconi.config.single_budget_gb
        if budget is not None:
            self.evict_to_bytes(int(budget * GB))
        if req.finished():
            self.marconi.on_request_finished(req.origin_input_ids, req.output_ids)

    # -- paper-faithful single byte budget -----------------------------------
    def tree_bytes(self) -> int:
        """Bytes the tree holds at the profile's real sizes: KV of every cached
        token plus one SSM state per state-holding node."""
        p = self.marconi.profile
        kv_tokens = self.full_evictable_size() + self.full_protected_size()
        states = self.mamba_evictable_size() + self.mamba_protected_size()
        return p.kv_bytes(kv_tokens) + states * p.ssm_state_bytes()

    #: ``evict_to_bytes`` keeps one queue per call for the plain recency order
    #: (``_evict_to_bytes_recency``); False: rescore every candidate per eviction
    #: (``_evict_to_bytes_ref``, the reference the tests compare it with)
    single_queue_fast = True
    #: The value form scores eviction candidates straight into queue entries
    #: (``MarconiState.value_entry``; the KV pool by recency: its stamp), in both
    #: pools' eviction calls and in ``_evict_to_bytes_value``; False: Candidates
    #: and an ``EvictionQueue`` (the reference the tests compare it with)
    value_scores_fast = True

    def evict_to_bytes(self, budget_bytes: int) -> int:
        """Evict until the tree fits ``budget_bytes`` (one budget over KV + states).

        Candidates are the paper's: unlocked nodes with at most one child that
        hold a state or are leaves. A leaf is deleted; an internal node loses
        its state. Returns the number of evictions.
        """
        st = self.marconi
        if (self.single_queue_fast and st.recency_only and not st.tombstones_first and not st.superseded_first
                and not st.ended_first):
            return self._evict_to_bytes_recency(budget_bytes)
        if self.value_scores_fast and st.value_scores:
            return self._evict_to_bytes_value(budget_bytes)
        return self._evict_to_bytes_ref(budget_bytes)

    def _single_candidate(self, node, leaves) -> bool:
        """Whether ``node`` may be evicted under the single byte budget now."""
        cd = node.component_data[ComponentType.MAMBA]
        if node.parent is None or cd.lock_ref > 0 or len(node.children) > 1:
            return False
        return node in leaves or cd.value is not None

    def _evict_single(self, node, leaves) -> None:
        """Evict ``node`` (a candidate): delete a leaf, or tombstone an internal state."""
        st = self.marconi
        if node.component_data[ComponentType.MAMBA].value is not None:
            st.state_evicted(node)
        if node in leaves:
            kv = len(node.key)
            # Delete exactly this leaf through SGLang's own leaf eviction.
            self._evict_device_leaf(node.id, {ct: 0 for ct in self.tree_components})
            st.counters.leaf_evictions += 1
            st.leaf_evicted(node)
            st.record_eviction("single", node, kv, None)
        else:
            self._tombstone_state(node)
            st.record_eviction("single", node, 0, None)

    def _single_pool(self, leaves) -> dict:
        pool = {n.id: n for n in leaves}
        pool.update(self.tree_core.lru_lists[ComponentType.MAMBA].cache)
        return pool

    def _evict_to_bytes_ref(self, budget_bytes: int) -> int:
        """Every eviction rescores every candidate (a value-per-byte score moves when
        an eviction changes a neighbour's replay origin or exclusive path)."""
        st = self.marconi
        n = 0
        while self.tree_bytes() > budget_bytes:
            st.on_eviction_call()
            leaves = self.tree_core.evictable_device_leaves
            cands = []
            for _, node in sorted(self._single_pool(leaves).items()):  # ties break by node id, alike every run
                if self._single_candidate(node, leaves):
                    cands.append(st.single_budget_candidate(node, frees_kv=node in leaves))
            queue = st.eviction_queue(cands)
            score = queue.peek_score()
            victim = queue.pop()
            if victim is None:
                break
            st.inflate("state", score)
            self._evict_single(victim.key, leaves)
            n += 1
        return n

    def _evict_to_bytes_value(self, budget_bytes: int) -> int:
        """``_evict_to_bytes_ref`` under the value form: each eviction's victim is
        the candidate of the smallest (H, stamp, node id), what the reference's
        queue pops first, with H computed straight into that tuple
        (``MarconiState.value_entry``) instead of a Candidate and a queue."""
        st = self.marconi
        n = 0
        while self.tree_bytes() > budget_bytes:
            st.on_eviction_call()
            leaves = self.tree_core.evictable_device_leaves
            origins = {}
            entries = [st.value_entry(node, node in leaves, origins) for node in self._single_pool(leaves).values()
                       if self._single_candidate(node, leaves)]
            if not entries:
                break
            score, _, _, victim = min(entries)
            st.inflate("state", score)
            self._evict_single(victim, leaves)
            n += 1
        return n

    def _evict_to_bytes_recency(self, budget_bytes: int) -> int:
        """The recency order (``lru``, ``vllm``): a candidate ranks by (its stamp,
        its node id) — what the reference's queue orders by, its min–max
        normalisation being monotone — and no eviction moves a stamp, so one heap
        serves the whole call. An eviction can make only the victim's parent (or,
        tombstoned, the victim) newly evictable: those are pushed; entries no
        longer evictable are skipped when popped. O(log n) per eviction instead
        of O(n)."""
        st = self.marconi
        leaves = self.tree_core.evictable_device_leaves
        heap = [(_stamp(node, "state"), nid, node) for nid, node in self._single_pool(leaves).items()
                if self._single_candidate(node, leaves)]
        heapq.heapify(heap)
        n = 0
        while self.tree_bytes() > budget_bytes:
            st.on_eviction_call()
            leaves = self.tree_core.evictable_device_leaves
            node = None
            while heap:
                _, _, cand = heapq.heappop(heap)
                if self._single_candidate(cand, leaves):
                    node = cand
                    break
            if node is None:
                break
            parent = node.parent
            self._evict_single(node, leaves)
            n += 1
            leaves = self.tree_core.evictable_device_leaves
            for x in (node, parent):
                if x is not None and self._single_candidate(x, leaves):
                    heapq.heappush(heap, (_stamp(x, "state"), x.id, x))
        return n

    def _tombstone_state(self, node) -> None:
        from sglang.srt.mem_cache.unified_cache.components.base import EvictLayer
        from sglang.srt.mem_cache.unified_cache.unified_tree_core_interface import BaseEvictionResult

        comp = self.components[ComponentType.MAMBA]
        result = BaseEvictionResult()
        tracker = {ct: 0 for ct in self.tree_components}
        self.tree_core._evict_component_and_detach_lru(
            node,
            comp,
            target=EvictLayer.DEVICE,
            tracker=tracker,
            device_frees=result.device_frees,
            host_frees=result.host_frees,
            cache_actions=result.cache_actions,
        )
        self.tree_core._cascade_evict(
            node, comp, tracker, device_frees=result.device_frees, host_frees=result.host_frees,
            cache_actions=result.cache_actions,
        )
        self._apply_eviction_result(result)


__all__ = ["MarconiRadixCache", "AdmissionReason"]
