"""Marconi's FULL and MAMBA tree components for SGLang's UnifiedRadixCache.

They subclass SGLang's own components and change only policy:

MarconiMambaComponent (the SSM-state pool)
  * match: the branch point is the exact end of the KV match when it runs past
    the deepest SSM state ("exact"), or SGLang's checkpoint grid ("grid");
    with none, the request's anchor (the largest power of two within its
    input, past its hit) takes its place (``anchor_state``); a request that
    decodes nothing keeps its last state one token before its input's end
    (where a request with the same prompt resumes) instead of at its end;
  * a hit stamps only the deepest matched node (the one whose state is used);
  * insert accepts ``mamba_value=None``: KV enters the tree without a state,
    which is how Marconi declines every state but its two per request;
  * eviction picks the state with the smallest utility among unlocked state
    holders with at most one child (all unlocked holders if none qualifies):
    a leaf is deleted, an internal node loses its state and keeps its KV.

MarconiFullComponent (the KV pool)
  * eviction picks the unlocked leaf with the smallest utility (SGLang: the
    least recently used leaf). A leaf without a state saves nothing on a hit
    (hybrid matches stop at the last state), so its efficiency is 0.

Both rank by one formula (``MarconiState.candidate`` + ``EvictionQueue``).
"""

from __future__ import annotations

from typing import Optional

from sglang.srt.mem_cache.unified_cache.components.base import (
    ComponentType,
    EvictLayer,
    LRURefreshPhase,
)
from sglang.srt.mem_cache.unified_cache.components.full import FullComponent
from sglang.srt.mem_cache.unified_cache.components.mamba import MambaComponent

from ..policy.admission import AdmissionReason, admits_input_end, anchor_position, branch_point, prompt_end_position
from ..policy.utility import ScoredQueue


def _keeps_prompt_end(config, req) -> bool:
    """The request decodes nothing (``max_new_tokens`` 0: SGLang's warm-up request before
    ``n > 1`` samples of one prompt, or a frontend ``fork``'s commit), so its last state
    goes one token before its input's end (exact branch points, ``prompt_end_state``)."""
    params = getattr(req, "sampling_params", None)
    return (config.prompt_end_state and config.branch_points == "exact"
            and getattr(params, "max_new_tokens", None) == 0)


def _node_id(node) -> int:
    return node.id


class MarconiMambaComponent(MambaComponent):
    @property
    def marconi(self):
        return self.cache.marconi

    # -- match ----------------------------------------------------------------
    def finalize_match_result_in_tree_core(self, result, params, value_chunks, best_value_len):
        result = super().finalize_match_result_in_tree_core(result, params, value_chunks, best_value_len)
        st = self.marconi  # the clock ticked in refresh_lru(MATCH_END), which runs first
        st.counters.matches += 1
        if result.device_prefix_len > 0:
            st.counters.state_hits += 1
            st.counters.hit_tokens += result.device_prefix_len
            node = result.last_device_node
            if result.full_kv_hit_length == result.device_prefix_len and node.children:
                # the request diverges right at this state from its children: a fork
                node.marconi_fork_hits = getattr(node, "marconi_fork_hits", 0) + 1
                st.counters.fork_hits += 1
        boundary = result.device_prefix_len + result.host_hit_length
        if st.config.branch_points == "exact":
            result = result._replace(
                mamba_branching_seqlen=branch_point(result.full_kv_hit_length, boundary, mode="exact")
            )
        req = getattr(params, "req", None)
        if req is None:
            return result
        # A request that decodes nothing keeps its last state one token before its input's
        # end, where a request with the same prompt resumes (MarconiAdmission's plan): its
        # prefill is cut there too (plugin.cut_chunk_at_prompt_end) and the state at its end
        # is not kept (prepare_for_caching_req).
        end = prompt_end_position(len(req.origin_input_ids), boundary) if _keeps_prompt_end(st.config, req) else None
        req.marconi_prompt_end = end
        if end is not None and result.mamba_branching_seqlen == end:
            result = result._replace(mamba_branching_seqlen=None)  # the last state's position, not a branch point
        if st.config.anchor_state and not st.config.input_state_on(st.config.single_budget_gb is not None):
            # No branch point: the request's other state goes to its anchor
            # (checkpointed like a branch point; prepare_for_caching_req tells them apart).
            # With the input-end experiment on, that state is the input end's, as in
            # MarconiAdmission's plan.
            req.marconi_anchor = None
            if result.mamba_branching_seqlen is None:
                grid = self.mamba_checkpoint_grid if st.config.branch_points == "grid" else 1
                anchor = anchor_position(len(req.origin_input_ids), boundary, grid, st.config.anchor_bits)
                if anchor is not None and end is not None and anchor >= end:
                    anchor = None  # it would be the last state
                req.marconi_anchor = anchor
                result = result._replace(mamba_branching_seqlen=anchor)
        if end is not None and (result.mamba_branching_seqlen is None or result.mamba_branching_seqlen >= end):
            # no state before it: the prompt end is the request's first (and only) cut
            req.marconi_anchor = None
            result = result._replace(mamba_branching_seqlen=end)
        return result

    def refresh_lru(self, phase, node, root_node) -> None:
        super().refresh_lru(phase, node, root_node)
        if phase is LRURefreshPhase.MATCH_END:
            # Once per match, before the hit is stamped, so a hit is strictly
            # more recent than every earlier insert.
            st = self.marconi
            st.tick()
            if node is not root_node:
                st.stamp_hit(node, root_node)

    # -- insert ---------------------------------------------------------------
    def commit_insert_component_data(self, node, is_new_leaf, params, result, cache_actions) -> None:
        st = self.marconi
        st.tick()
        if is_new_leaf:
            st.revive(node.parent)  # a request extends this path: it is in use
        if params.mamba_value is None:
            # KV-only insert: Marconi admits no state at this position.
            if is_new_leaf:
                st.stamp(node)
            return
        super().commit_insert_component_data(node, is_new_leaf, params, result, cache_actions)
        events = self.cache.state_events
        if events is not None:
            events.state_gained(node)
        st.stamp(node)
        output_ids = getattr(params, "marconi_output_ids", None)
        if not result.mamba_exist:
            node.marconi_hits = node.marconi_ihits = 0  # a new state: never hit yet
            reason = getattr(params, "marconi_reason", None)
            node.marconi_branch = reason is AdmissionReason.BRANCH_POINT
            node.marconi_anchor = reason is AdmissionReason.ANCHOR
            st.anchors_admitted += node.marconi_anchor
            if node.marconi_branch:
                st.on_branch_admitted(node)
            elif (reason is AdmissionReason.LAST_TOKEN and output_ids is not None and len(output_ids) == 0
                  and st.config.prompt_end_state):
                # A request that decoded nothing is sent to be continued from (SGLang's
                # warm-up before n > 1 samples, a fork's commit): its state counts the
                # fork it announces, as a branch point's.
                node.marconi_branch = True
            if reason is not None:
                st.counters.admitted[reason] += 1
        if output_ids is not None:
            st.request_ended(node, output_ids)

    # -- live scheduler path: admission of the request's own states -----------
    def prepare_for_caching_req(self, req, insert_params, token_ids_len, is_finished):
        """Marconi admission on SGLang's ``checkpoint`` path.

        Finished: the last decoded token's state is donated (SGLang's own path).
        Unfinished (a prefill chunk or a decode checkpoint): the state is
        admitted only when this checkpoint lands on the request's branch point
        (or, with none, its anchor: ``marconi_anchor``), once, or (option ``input_state``) on the end of its input when it has no
        branch point; otherwise the KV is published without a state.
        """
        if is_finished:
            insert_params.marconi_reason = AdmissionReason.LAST_TOKEN
            insert_params.marconi_output_ids = req.output_ids
            cache_len = super().prepare_for_caching_req(req, insert_params, token_ids_len, is_finished)
            end = self._prompt_end_held(req)
            if end is not None:
                # A request that decoded nothing already holds its state one token before
                # its input's end: the insert stops there, finds that state, and the
                # request's own slot (the state past it) is freed.
                return min(cache_len, end)
            return cache_len
        branch = getattr(req, "mamba_branching_seqlen", None)
        at = req.kv.mamba_last_track_seqlen if self.cache.enable_mamba_extra_buffer else token_ids_len
        reason = None
        end = getattr(req, "marconi_prompt_end", None)
        if branch is not None and at == branch and not getattr(req, "marconi_branch_admitted", False):
            req.marconi_branch_admitted = True
            if end == branch:
                req.marconi_prompt_end_admitted = True
                reason = AdmissionReason.LAST_TOKEN
            elif getattr(req, "marconi_anchor", None) == branch:
                reason = AdmissionReason.ANCHOR
            else:
                reason = AdmissionReason.BRANCH_POINT
        elif end is not None and at == end and not getattr(req, "marconi_prompt_end_admitted", False):
            req.marconi_prompt_end_admitted = True  # the second cut (plugin.cut_chunk_at_prompt_end)
            reason = AdmissionReason.LAST_TOKEN
        elif (self.marconi.config.input_state_on(self.marconi.config.single_budget_gb is not None)
              and not getattr(req, "marconi_input_admitted", False)):
            input_len = len(req.origin_input_ids)
            hit = getattr(req, "num_matched_prefix_tokens", 0) or 0
            # Unfinished after its prefill: the request decodes past its input.
            if at == input_len and admits_input_end(input_len, input_len + 1, hit, branch_planned=branch is not None):
                req.marconi_input_admitted = True
                reason = AdmissionReason.INPUT_END
        if reason is None:
            insert_params.mamba_value = None
            return None
        insert_params.marconi_reason = reason
        if reason is AdmissionReason.LAST_TOKEN:
            insert_params.marconi_output_ids = []  # its prompt end: it decodes nothing (commit_insert_component_data)
        pool = self.cache.req_to_token_pool
        mamba_pool = pool.mamba_pool
        if (
            self.cache.enable_mamba_extra_buffer
            or self.int8_ckpt_pool is not None
            or mamba_pool.replayssm_write_pos is not None
            or getattr(mamba_pool, "_slot_siblings", None)
        ):
            return super().prepare_for_caching_req(req, insert_params, token_ids_len, is_finished)
        # Copy the live state into a cache slot: one launch for all layers on CUDA.
        from ..kernels import scatter_states

        slot = self._alloc_mamba_slot(req)
        translate = pool.translate_mamba_indices
        state = mamba_pool.mamba_cache
        scatter_states(state.conv, state.temporal, translate(req.kv.mamba_pool_idx.view(1)), translate(slot.view(1)))
        insert_params.mamba_value = slot.view(1)
        return token_ids_len

    def _prompt_end_held(self, req) -> Optional[int]:
        """For a finished request that decoded nothing: the position one token before its
        input's end when the node its lock sits on ends there and holds a state (its own
        checkpoint, or a hit on an earlier one); else None (the cut was not made: the
        state at its end is donated, as for any request)."""
        if not _keeps_prompt_end(self.marconi.config, req):
            return None
        end = prompt_end_position(len(req.origin_input_ids), 0)
        node_id = getattr(req, "last_node", None)  # the locked node: in the tree
        if end is None or node_id is None or req.kv.cache_protected_len != end:
            return None
        node = self.tree_core.node_by_id(node_id)
        if node is self.tree_core.root_node or node.component_data[self.component_type].value is None:
            return None
        return end

    def redistribute_on_node_split(self, new_parent, child):
        super().redistribute_on_node_split(new_parent, child)
        new_parent.marconi_t = getattr(child, "marconi_t", 0.0)
        new_parent.marconi_kv_t = getattr(child, "marconi_kv_t", 0.0)
        new_parent.marconi_L = getattr(child, "marconi_L", 0.0)
        new_parent.marconi_kv_L = getattr(child, "marconi_kv_L", 0.0)
        new_parent.marconi_superseded = getattr(child, "marconi_superseded", False)
        new_parent.marconi_published = getattr(child, "marconi_published", False)  # the path to child covers it

    # -- eviction -------------------------------------------------------------
    def evict_component(self, node, device_frees, host_frees, cache_actions, target=EvictLayer.DEVICE):
        had = node.component_data[self.component_type].value is not None
        freed = super().evict_component(node, device_frees, host_frees, cache_actions, target=target)
        events = self.cache.state_events
        if had and events is not None and node.component_data[self.component_type].value is None:
            events.state_lost(node)
        return freed

    def _holders(self):
        ct = self.component_type
        nodes = self.tree_core.lru_lists[ct].cache.values()
        unlocked = [n for n in nodes if n.component_data[ct].lock_ref == 0]
        if self.marconi.config.state_candidates == "all":
            return unlocked
        narrow = [n for n in unlocked if len(n.children) <= 1]
        return narrow or unlocked

    def _evict_device_start(self, request_cnt: int) -> None:
        st = self.marconi
        st.on_eviction_call()
        leaves = self.tree_core.evictable_device_leaves
        if self.cache.value_scores_fast and st.value_scores:
            # The same order, scored straight into (H, stamp, node id) entries.
            origins = {}
            self._queue = ScoredQueue([st.value_entry(n, n in leaves, origins) for n in self._holders()])
        else:
            # Node-id order: equal utilities break the same way in every process
            # (the leaf set iterates in memory order).
            cands = [st.state_pool_candidate(n, frees_kv=n in leaves) for n in sorted(self._holders(), key=_node_id)]
            self._queue = st.eviction_queue(cands)
        self._evict_device_request_cnt = request_cnt
        self._last_leaf = None

    def _evict_device_next_node(self, tracker, device_frees, host_frees, cache_actions):
        ct = self.component_type
        st = self.marconi
        leaves = self.tree_core.evictable_device_leaves
        # A deleted leaf's parent may now hold a state with no children left.
        lv = self._last_leaf
        self._last_leaf = None
        if lv is not None and lv.parent is not None and lv.parent is not self.tree_core.root_node:
            p = lv.parent
            cd = p.component_data[ct]
            if cd.value is not None and cd.lock_ref == 0 and len(p.children) <= 1:
                if isinstance(self._queue, ScoredQueue):
                    self._queue.push(st.value_entry(p, p in leaves, {}))
                else:
                    self._queue.push(st.state_pool_candidate(p, frees_kv=p in leaves))
        while tracker[ct] < self._evict_device_request_cnt:
            score = self._queue.peek_score()
            x = self._queue.pop_key()
            if x is None:
                return None
            cd = x.component_data[ct]
            if cd.value is None or cd.lock_ref > 0 or x.parent is None:
                continue  # stale: cascaded away, or locked since the snapshot
            st.inflate("state", score)
            st.state_evicted(x)
            if x in leaves:
                st.counters.leaf_evictions += 1
                st.leaf_evicted(x)
                st.record_eviction("mamba", x, len(x.key), score)
                self._last_leaf = x
                return x.id
            st.record_eviction("mamba", x, 0, score)
            self.tree_core._evict_component_and_detach_lru(
                x,
                self,
                target=EvictLayer.DEVICE,
                tracker=tracker,
                device_frees=device_frees,
                host_frees=host_frees,
                cache_actions=cache_actions,
            )
            self.tree_core._cascade_evict(
                x, self, tracker, device_frees=device_frees, host_frees=host_frees, cache_actions=cache_actions
            )
            return None
        return None

    def _evict_device_end(self) -> None:
        self._queue = None
        self._last_leaf = None


class MarconiFullComponent(FullComponent):
    @property
    def marconi(self):
        return self.cache.marconi

    def _evict_device_start(self, request_cnt: int) -> None:
        st = self.marconi
        st.on_eviction_call()
        if self.cache.value_scores_fast and st.kv_by_recency:
            # kv_pool_candidate's priority is the KV stamp itself: (stamp, stamp, node id) entries
            self._queue = ScoredQueue([(n.marconi_kv_t, n.marconi_kv_t, n.id, n)
                                       for n in self.tree_core.evictable_device_leaves])
        else:
            leaves = sorted(self.tree_core.evictable_device_leaves, key=_node_id)
            cands = [st.kv_pool_candidate(n) for n in leaves]
            self._queue = st.eviction_queue(cands)
        self._evict_device_request_cnt = request_cnt
        self._evict_device_last_node = None

    def _evict_device_next_node(self, tracker, device_frees, host_frees, cache_actions) -> Optional[int]:
        ct = self.component_type
        st = self.marconi
        leaves = self.tree_core.evictable_device_leaves
        lv = self._evict_device_last_node
        self._evict_device_last_node = None
        if lv is not None and lv.parent is not None and lv.parent in leaves:
            p = lv.parent
            if isinstance(self._queue, ScoredQueue):
                self._queue.push((p.marconi_kv_t, p.marconi_kv_t, p.id, p))
            else:
                self._queue.push(st.kv_pool_candidate(p))
        while tracker[ct] < self._evict_device_request_cnt:
            score = self._queue.peek_score()
            x = self._queue.pop_key()
            if x is None:
                return None
            if x not in leaves:
                continue
            st.inflate("kv", score)
            st.counters.leaf_evictions += 1
            st.leaf_evicted(x)
            if x.component_data[ComponentType.MAMBA].value is not None:
                st.state_evicted(x)
            st.record_eviction("kv", x, len(x.key), score)
            self._evict_device_last_node = x
            return x.id
        return None

    def _evict_device_end(self) -> None:
        self._queue = None
        self._evict_device_last_node = None
