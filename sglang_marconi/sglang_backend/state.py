"""Per-cache Marconi state: the bridge between SGLang tree nodes and the policy core.

One :class:`MarconiState` lives on each :class:`MarconiRadixCache`. It owns the
logical clock, the cost profile, the α tuner and the counters, and turns a
tree node into the tensor-free :class:`~sglang_marconi.policy.utility.Candidate`
the policy scores. Both components (FULL and MAMBA) go through it, so the two
pools are scored by one formula.

Node bookkeeping is stored as plain attributes on SGLang's ``UnifiedTreeNode``:

* ``marconi_t``   — last access of the node's SSM state on Marconi's clock
  (a hit stamps the deepest matched node, or the whole matched path with
  ``refresh="path"``; an insert stamps the node it ends on; a split copies the
  child's stamp to the new parent).
* ``marconi_kv_t`` — the same for the node's KV, under ``kv_refresh``: the
  KV pool ranks leaves by it, the state pool by ``marconi_t``.
* ``marconi_end`` — the token position where the node ends. It never changes:
  a split only moves a node's *start*, so it is memoized.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

from ..policy.admission import AdmissionReason
from ..policy.config import MarconiConfig
from ..policy.hit_density import HitDensity, state_class
from ..policy.session_end import EndPredictor
from ..policy.tuner import AlphaTuner
from ..policy.utility import Candidate, EvictionQueue

if TYPE_CHECKING:
    from ..policy.cost_model import CostProfile

logger = logging.getLogger("sglang_marconi")


MAMBA = None  # ComponentType.MAMBA, bound lazily (keeps this module importable early)


def _mamba_ct():
    global MAMBA
    if MAMBA is None:
        from sglang.srt.mem_cache.unified_cache.components.base import ComponentType

        MAMBA = ComponentType.MAMBA
    return MAMBA


@dataclass
class MarconiCounters:
    """What the cache did, for logs, metrics and replays."""

    matches: int = 0
    hit_tokens: int = 0
    state_hits: int = 0
    admitted: Counter = field(default_factory=Counter)  # AdmissionReason -> count
    state_evictions: int = 0  # SSM states freed (tombstoned or with their leaf)
    leaf_evictions: int = 0  # nodes deleted (their KV freed)
    evicted_tokens: int = 0
    superseded_marks: int = 0  # superseded_first: nodes marked as left behind by a branch
    ended_marks: int = 0  # ended_first: finished requests whose sequence was marked as a conversation's end
    fork_hits: int = 0  # state hits whose request diverged right at the state from its node's children
    eviction_log: list = field(default_factory=list)  # (pool, node_end, tokens, utility), bounded

    def as_dict(self) -> dict[str, Any]:
        return {
            "matches": self.matches,
            "hit_tokens": self.hit_tokens,
            "state_hits": self.state_hits,
            "admitted_branch_point": self.admitted[AdmissionReason.BRANCH_POINT],
            "admitted_last_token": self.admitted[AdmissionReason.LAST_TOKEN],
            "admitted_input_end": self.admitted[AdmissionReason.INPUT_END],
            "admitted_anchor": self.admitted[AdmissionReason.ANCHOR],
            "state_evictions": self.state_evictions,
            "leaf_evictions": self.leaf_evictions,
            "evicted_tokens": self.evicted_tokens,
            "superseded_marks": self.superseded_marks,
            "ended_marks": self.ended_marks,
            "fork_hits": self.fork_hits,
        }


EVICTION_LOG_MAX = 10_000
#: ``tombstones_first``: shifts internal holders' stamps below every leaf's
#: (clock ticks never reach it).
TOMBSTONE_FIRST_SHIFT = 1e15
#: ``superseded_first``: most nodes one branch point marks (bounds the walk).
SUPERSEDED_MARK_MAX = 256
#: ``end_labels: "sequence"``: block size of the sequence hashes, and most
#: finished sequences waiting for a continuation (oldest forgotten first).
SEQUENCE_BLOCK = 64
PENDING_ENDINGS_MAX = 65536
#: ``superseded_share_from: "fork"``: other sequences that must split off a node
#: besides the branch's own path for it to count as a shared prompt's fork (an
#: agent's own revision forks in two: the path it left and the one it took).
FORK_MIN_OTHERS = 2


def _block_hashes(tokens, blocks: int, chain: Sequence[int] = ()) -> list[int]:
    """Chain hashes of the first ``blocks`` full ``SEQUENCE_BLOCK``-token blocks:
    equal at block i iff (up to hash collisions) the first i + 1 blocks are.
    ``chain``: the hashes of ``tokens``' leading blocks already computed (of a
    prefix of ``tokens``); only the blocks after them are hashed."""
    out = list(chain[:blocks])
    h = out[-1] if out else 0
    for i in range(len(out), blocks):
        h = hash((h, tuple(tokens[i * SEQUENCE_BLOCK:(i + 1) * SEQUENCE_BLOCK])))
        out.append(h)
    return out


@dataclass(slots=True)
class _PendingEnding:
    """``end_labels: "sequence"``: a finished sequence no later input has continued yet."""
    ending: tuple
    node: Any  #: the node the sequence ended at (its ``marconi_pending`` points back here)
    counted_unanswered: bool = False  #: its node was evicted first and the ending counted unanswered


def _stamp(node, pool: str) -> float:
    """The recency stamp ``pool`` ("kv" or "state") ranks ``node`` by."""
    return getattr(node, "marconi_kv_t" if pool == "kv" else "marconi_t", 0.0)


class MarconiState:
    def __init__(self, config: MarconiConfig, profile: "CostProfile", tuner: Optional[AlphaTuner] = None):
        self.config = config
        self.profile = profile
        self.tuner = tuner
        self.clock = 0.0
        self.counters = MarconiCounters()
        self.log_evictions = False  # the demo and tests turn this on
        self.root = None  # set by the cache once its tree exists
        self.requests_finished = 0
        self.anchors_admitted = self.anchors_hit = 0  # anchor states, and those hit at least once
        #: ``internal_prior``: unproven internal states hit while internal, and evicted unhit
        self.internal_hit = self.internal_lost = 0
        #: α fixed at 0 with the sum or product form: the utility is normalized
        #: recency alone, so candidates skip the cost terms (FLOPs, bytes, replay
        #: distance), which the order never reads.
        self.recency_only = tuner is None and config.alpha == 0.0 and config.utility_form in ("sum", "product")
        #: ``tombstones_first`` applies only to that recency order (state pool)
        self.tombstones_first = self.recency_only and config.tombstones_first
        #: ``superseded_first``: also only in that recency order (both pools)
        self.superseded_first = self.recency_only and config.superseded_first
        #: ``ended_first``: likewise; the predictor learns whichever order evicts
        self.ended_first = self.recency_only and config.ended_first
        self.end_predictor: Optional[EndPredictor] = (
            EndPredictor(config.end_tail_tokens, config.end_max_continue) if config.ended_first else None)
        #: ``end_labels: "sequence"``: finished sequences not continued yet, by the
        #: chain hash of their first blocks
        self.sequence_labels = self.end_predictor is not None and config.end_labels == "sequence"
        self._pending_endings: "OrderedDict[int, _PendingEnding]" = OrderedDict()
        self._last_ended = None  # (node, ending) of the finished request being inserted
        #: the utility form eviction queues are built with
        self.queue_form = config.utility_form
        #: ``value`` (GreedyDual-Size-Frequency): each pool's inflation value L,
        #: raised to the priority of every entry it evicts; an access stamps the
        #: node with the current L of each pool ("state" also serves the single
        #: byte budget's queue)
        self.inflation = {"state": 0.0, "kv": 0.0}
        #: ``value`` with ``value_kv_pool: "recency"``: the two pools' KV pool ranks leaves by stamp
        self.kv_by_recency = config.utility_form == "value" and config.value_kv_pool == "recency"
        #: ``value`` (not the paper's variant): :meth:`value_entry` gives the state pool's
        #: and the single byte budget's priorities (no marks act in this form)
        self.value_scores = config.utility_form == "value" and config.variant != "paper"
        self.hit_density: Optional[HitDensity] = None
        #: classes split by "hit before" (``density_reuse``)
        self.density_reuse = config.density_reuse
        if config.utility_form == "density":
            self.hit_density = HitDensity(config.density_period, config.density_decay)
        #: measurement only (the replay's ``--end-oracle``): set before each
        #: request to whether it is its conversation's last; :meth:`request_ended`
        #: then marks by it instead of by the predictor. None: the predictor.
        self.ending_oracle: Optional[bool] = None

    # -- clock and α --------------------------------------------------------
    def tick(self) -> float:
        self.clock += 1.0
        return self.clock

    @property
    def alpha(self) -> float:
        if self.tuner is not None:
            self.tuner.poll()
            return self.tuner.alpha
        return self.config.alpha or 0.0

    def stamp(self, node) -> None:
        """A new or re-inserted node: both its state and its KV are fresh."""
        node.marconi_t = node.marconi_kv_t = self.clock
        node.marconi_L, node.marconi_kv_L = self.inflation["state"], self.inflation["kv"]

    def inflate(self, pool: str, score) -> None:
        """``value``: ``pool`` ("state", "kv") evicted an entry of priority ``score``."""
        if score is not None and score > self.inflation[pool]:
            self.inflation[pool] = score

    def frequency(self, node) -> float:
        """``value``: hits that predict the next one. A leaf: 1 (its admission) +
        its hits. An internal node: only the hits it got while internal (a
        request that resumed there and went another way than every cached
        continuation), + 1 if it was admitted as a branch point (a request
        diverged there: a hit, had the state existed); the hits it got as a leaf
        were continuations, which its child's state now serves."""
        if node.children:
            f = getattr(node, "marconi_ihits", 0) + (1 if getattr(node, "marconi_branch", False) else 0)
            if f == 0 and self.config.anchor_prior and getattr(node, "marconi_anchor", False):
                return (self.anchors_hit + 1) / (self.anchors_admitted + 2)
            if self.config.internal_prior and self._unproven_internal(node):
                return (self.internal_hit + 1) / (self.internal_hit + self.internal_lost + 2)
            return f
        return 1 + getattr(node, "marconi_hits", 0) - getattr(node, "marconi_ihits", 0)

    def stamp_hit(self, node, root) -> None:
        """A hit on ``node`` (the deepest matched state), per the refresh knobs."""
        t = self.clock
        if self.hit_density is not None:
            self.hit_density.record(self.state_class(node), t - getattr(node, "marconi_t", 0.0), hit=True)
        if getattr(node, "marconi_anchor", False) and not getattr(node, "marconi_hits", 0):
            self.anchors_hit += 1
        node.marconi_hits = getattr(node, "marconi_hits", 0) + 1
        if self.config.internal_prior and node.children and self._unproven_internal(node):
            self.internal_hit += 1
        if node.children:
            node.marconi_ihits = getattr(node, "marconi_ihits", 0) + 1
        self.revive(node)
        node.marconi_t = node.marconi_kv_t = t
        node.marconi_L, node.marconi_kv_L = self.inflation["state"], self.inflation["kv"]
        state_path = self.config.refresh == "path"
        kv_path = self.config.kv_refresh == "path"
        if state_path or kv_path:
            cur = node.parent
            while cur is not None and cur is not root:
                if state_path:
                    cur.marconi_t = t
                if kv_path:
                    cur.marconi_kv_t = t
                cur = cur.parent

    # -- node geometry ------------------------------------------------------
    def node_end(self, node) -> int:
        end = getattr(node, "marconi_end", None)
        if end is not None:
            return end
        chain = []
        cur = node
        while cur is not None and getattr(cur, "marconi_end", None) is None and cur.parent is not None:
            chain.append(cur)
            cur = cur.parent
        base = 0 if cur is None or cur.parent is None else cur.marconi_end
        for n in reversed(chain):
            base += len(n.key)
            n.marconi_end = base
        return node.marconi_end

    def replay_from(self, node) -> int:
        """Position of the nearest strict ancestor holding an SSM state (0 = root).

        A miss at ``node`` falls back to that state, so the FLOPs a hit here
        saves run from it, not from the parent, when tombstones lie between.
        """
        ct = _mamba_ct()
        cur = node.parent
        while cur is not None and cur.parent is not None:
            if cur.component_data[ct].value is not None:
                return self.node_end(cur)
            cur = cur.parent
        return 0

    # -- scoring ------------------------------------------------------------
    def state_class(self, node) -> int:
        reused = self.density_reuse and getattr(node, "marconi_hits", 0) > 0
        return state_class(self.node_end(node), bool(node.children), reused)

    def eviction_queue(self, cands: list) -> EvictionQueue:
        """The queue one eviction call pops from, under the configured utility."""
        c = self.config
        return EvictionQueue(cands, self.alpha, self.clock + 1.0, self.queue_form, c.recency,
                             self.efficiency_horizon_ticks(), self.hit_density, c.density_value, c.density_rank)

    def candidate(self, node, *, frees_kv: bool, pool: str = "state") -> Candidate:
        """The policy's view of evicting ``node``.

        ``frees_kv``: the eviction deletes the node (its KV and state go);
        otherwise only its SSM state is freed (tombstone). ``pool`` ("kv" or
        "state") picks the recency stamp the pool ranks by.
        """
        ct = _mamba_ct()
        end = self.node_end(node)
        own = len(node.key)
        start = end - own
        has_state = node.component_data[ct].value is not None
        paper = self.config.variant == "paper"
        # One walk up to the nearest ancestor holding a state: the replay origin, and the
        # exclusive path (stateless ancestors with this one child, which go with the node)
        replay_from, exclusive = 0, frees_kv and self.config.value_bytes == "exclusive"
        excl_from = start  # where the KV the eviction frees begins
        cur = node.parent
        while cur is not None and cur.parent is not None:
            if cur.component_data[ct].value is not None:
                replay_from = self.node_end(cur)
                break
            if exclusive and len(cur.children) != 1:
                exclusive, excl_from = False, self.node_end(cur)
            cur = cur.parent
        if exclusive:  # ran up to the state (or the root) through single-child stateless nodes
            excl_from = replay_from
        excl = end - excl_from
        if paper:
            replay_from = start
        elif self.config.value_flops == "root":
            replay_from = 0
        flops, nbytes = self._cost_terms(node, start, end, replay_from, has_state, frees_kv, excl, paper)
        cand = Candidate(key=node, last_access=_stamp(node, pool), flops_saved=flops, nbytes=nbytes)
        if self.queue_form == "value":
            cand.base = getattr(node, "marconi_kv_L" if pool == "kv" else "marconi_L", 0.0)
            cand.freq = self.frequency(node)
            if not self.config.value_frequency:
                cand.freq = min(cand.freq, 1.0)
            if pool == "kv" and self.config.value_kv_pool == "recency":
                cand.base, cand.freq = cand.last_access, 0.0
        if self.hit_density is not None:
            cand.cls = self.state_class(node)
            cand.tokens_saved = end - replay_from if has_state else 0
            cand.dead = self.config.ended_in_density and getattr(node, "marconi_ended", False)
        return cand

    def _cost_terms(self, node, start: int, end: int, replay_from: int, has_state: bool, frees_kv: bool,
                    excl: int, paper: bool = False) -> tuple[float, int]:
        """(FLOPs a hit saves, bytes the eviction frees) of :meth:`candidate`."""
        # The cost terms change only when the node's start, its replay origin,
        # its state, its exclusive path or the kind of eviction change: memoize them on the node.
        memo_key = (start, replay_from, has_state, frees_kv, excl)
        memo = getattr(node, "marconi_memo", None)
        if memo is not None and memo[0] == memo_key:
            return memo[1], memo[2]
        p = self.profile
        state_bytes = p.ssm_state_bytes() if has_state else 0
        if paper:
            nbytes = p.kv_bytes(end) + state_bytes
        else:
            nbytes = (p.kv_bytes(excl) if frees_kv else 0) + state_bytes
        flops = p.flops_saved(start, end, replay_from=replay_from) if has_state else 0.0
        node.marconi_memo = (memo_key, flops, nbytes)
        return flops, nbytes

    # -- the value form's scores, straight into queue entries -------------------
    def value_entry(self, node, frees_kv: bool, origins: dict) -> tuple:
        """``(H, state stamp, node id, node)``: the priority :meth:`state_pool_candidate`
        gives ``node`` under the value form (``value_scores``; also the single byte
        budget's candidate there), as a :class:`~sglang_marconi.policy.utility.ScoredQueue`
        entry, without building the :class:`Candidate`. ``origins``: the
        :meth:`_origins` memo, shared by every node scored while the tree stays as it is."""
        end = self.node_end(node)
        start = end - len(node.key)
        has_state = node.component_data[_mamba_ct()].value is not None
        parent = node.parent
        replay_from, excl_from = origins.get(parent) or self._origins(parent, origins)
        cfg = self.config
        if not (frees_kv and cfg.value_bytes == "exclusive"):
            excl_from = start
        if cfg.value_flops == "root":
            replay_from = 0
        flops, nbytes = self._cost_terms(node, start, end, replay_from, has_state, frees_kv, end - excl_from)
        freq = self.frequency(node)
        if not cfg.value_frequency:
            freq = min(freq, 1.0)
        h = getattr(node, "marconi_L", 0.0) + freq * (flops / nbytes if nbytes > 0 else 0.0)
        return h, getattr(node, "marconi_t", 0.0), node.id, node

    def _origins(self, node, memo: dict) -> tuple[int, int]:
        """What :meth:`candidate`'s walk up from a child of ``node`` finds: (the end
        of the nearest ancestor-or-self of ``node`` holding a state, 0 at the root;
        where the child's exclusive path begins: the end of the nearest stateless
        node on that walk with other than one child, else the state's end). Every
        node of the walk is memoized in ``memo``, so a walk stops at the first
        node an earlier one has passed."""
        ct = _mamba_ct()
        chain = []
        cur = node
        while cur.parent is not None and cur.component_data[ct].value is None and cur not in memo:
            chain.append(cur)
            cur = cur.parent
        if cur in memo:
            replay_from, excl_from = memo[cur]
        else:  # the root, or a state holder
            replay_from = excl_from = 0 if cur.parent is None else self.node_end(cur)
            memo[cur] = (replay_from, excl_from)
        for x in reversed(chain):
            if len(x.children) != 1:
                excl_from = self.node_end(x)
            memo[x] = (replay_from, excl_from)
        return memo[node]

    def eviction_candidate(self, node, *, frees_kv: bool, pool: str = "state") -> Candidate:
        """:meth:`candidate` as an eviction call needs it: with ``recency_only``
        the cost terms are skipped (the order reads only the stamp)."""
        if self.recency_only:
            return Candidate(key=node, last_access=_stamp(node, pool), flops_saved=0.0, nbytes=0)
        return self.candidate(node, frees_kv=frees_kv, pool=pool)

    def state_pool_candidate(self, node, *, frees_kv: bool, tombstones: Optional[bool] = None,
                             single_queue: bool = False) -> Candidate:
        """An eviction candidate of the SSM-state pool: with ``tombstones_first``
        (or ``tombstones``, when given) an internal holder's stamp is shifted
        below every leaf's (order kept within each group), except a branch state
        not hit yet with ``tombstones_spare_branches`` and a state that served a
        fork with ``tombstones_spare_fork_hits`` (``single_queue``: the caller is
        the single byte budget's queue); a marked node's (``_goes_first``) likewise."""
        cand = self.eviction_candidate(node, frees_kv=frees_kv)
        if tombstones is None:
            tombstones = self.tombstones_first
        if tombstones and node.children and not self._spared_tombstone(node, single_queue=single_queue):
            cand.last_access -= TOMBSTONE_FIRST_SHIFT
        elif self._goes_first(node):
            cand.last_access -= TOMBSTONE_FIRST_SHIFT
        return cand

    def kv_pool_candidate(self, node) -> Candidate:
        """An eviction candidate of the KV pool (a leaf): with ``superseded_first``
        / ``ended_first`` a marked leaf's stamp is shifted below every other leaf's."""
        if self.kv_by_recency:  # the value rule's KV pool: the stamp alone (SGLang's LRU)
            t = node.marconi_kv_t
            return Candidate(key=node, last_access=t, flops_saved=0.0, nbytes=0, base=t, freq=0.0)
        cand = self.eviction_candidate(node, frees_kv=True, pool="kv")
        if self._goes_first(node):
            cand.last_access -= TOMBSTONE_FIRST_SHIFT
        return cand

    def single_budget_candidate(self, node, *, frees_kv: bool) -> Candidate:
        """An eviction candidate of the single byte budget's queue (leaves and
        internal state holders together), with the marks
        ``single_budget_marks`` lets act there."""
        mode = self.config.single_budget_marks
        if mode == "off":
            return self.eviction_candidate(node, frees_kv=frees_kv)
        # the state pool's shifts; tombstones-first only with "all"
        return self.state_pool_candidate(node, frees_kv=frees_kv, tombstones=mode == "all" and self.tombstones_first,
                                         single_queue=True)

    def _goes_first(self, node) -> bool:
        """In the recency order: ``node`` lies on a path a request branched away
        from (``superseded_first``) or on a conversation's likely last sequence
        (``ended_first``); both pools shift it below the rest."""
        return ((self.superseded_first and getattr(node, "marconi_superseded", False))
                or (self.ended_first and getattr(node, "marconi_ended", False)))

    # -- superseded paths ----------------------------------------------------
    def on_branch_admitted(self, branch) -> None:
        """A request admitted a branch point at ``branch``, a node with one child:
        the path through it had no branch there. If the request shares at least
        ``superseded_min_shared`` of that sequence (up to ``branch`` against up to
        the end of the child's subtree, counted from the root or, with
        ``superseded_share_from: "fork"``, from the nearest shared prompt's fork
        and at least one ``SEQUENCE_BLOCK``), it is a revision of it (an agent
        that dropped or edited part of its history, a re-rendered answer): the
        conversation goes on, so the endings of requests that finished in the
        child's subtree were continued (``ended_first``), and that subtree is
        the part it left: marked, while ``superseded_first`` is configured,
        whichever order evicts now. A
        request that shares only a short common prefix (another conversation
        after the same system prompt) does neither; nor does a subtree of more
        than ``SUPERSEDED_MARK_MAX`` nodes."""
        cfg = self.config
        if len(branch.children) != 1 or not (cfg.superseded_first or self.end_predictor is not None):
            return
        subtree, tokens = [], 0
        stack = list(branch.children.values())
        while stack:
            if len(subtree) == SUPERSEDED_MARK_MAX:
                return
            x = stack.pop()
            subtree.append(x)
            tokens += len(x.key)
            stack.extend(x.children.values())
        shared = self.node_end(branch)
        if cfg.superseded_share_from == "fork":
            shared -= self._fork_end_above(branch)
            if shared < SEQUENCE_BLOCK:
                return  # less than one block of its own history: not a revision
        if shared < cfg.superseded_min_shared * (shared + tokens):
            return
        for x in subtree:
            self._ending_continued(x)
        if not cfg.superseded_first or (cfg.superseded_needs_state and not self._state_above_on_path(branch)):
            return
        for x in subtree:
            x.marconi_superseded = True
        self.counters.superseded_marks += len(subtree)

    def _fork_end_above(self, branch) -> int:
        """``superseded_share_from: "fork"``: where the nearest proper ancestor of
        ``branch`` ends from which ``FORK_MIN_OTHERS`` other sequences split off
        (0: none below the root)."""
        cur = branch.parent
        while cur is not None and cur.parent is not None:
            if len(cur.children) > FORK_MIN_OTHERS:
                return self.node_end(cur)
            cur = cur.parent
        return 0

    def _state_above_on_path(self, branch) -> bool:
        """``superseded_needs_state``: the nearest ancestor of ``branch`` holding an
        SSM state is reached through nodes with one child (no other path splits
        off between that state and the branch)."""
        ct = _mamba_ct()
        cur = branch.parent
        while cur is not None and cur.parent is not None:
            if cur.component_data[ct].value is not None:
                return True
            if len(cur.children) != 1:
                return False
            cur = cur.parent
        return False

    def revive(self, node) -> None:
        """``node`` is in use again (hit, or extended by an insert): it and its
        marked ancestors (superseded, ended) are ordinary again; if a finished
        request's sequence ended at it, that ending was continued."""
        self._ending_continued(node)
        while node is not None and (getattr(node, "marconi_superseded", False) or getattr(node, "marconi_ended", False)):
            node.marconi_superseded = node.marconi_ended = False
            node = node.parent

    # -- conversation ends ---------------------------------------------------
    def request_ended(self, node, output_ids) -> None:
        """A finished request's sequence ends at ``node`` (its last decoded
        token's state): remember its ending; with ``ended_first``, if the
        predictor says the ending is final, mark ``node`` and the unbranched
        path above it (at most ``SUPERSEDED_MARK_MAX`` nodes) to go first."""
        pred = self.end_predictor
        if pred is None or node.children:
            return
        if self.ending_oracle is not None:
            if self.ending_oracle:
                self._mark_ended(node)
            return
        ending = pred.ending(output_ids)
        if ending is None:
            return
        node.marconi_ending = ending  # open: a hit (continued) or its eviction (unanswered) decides
        self._last_ended = (node, ending)
        if pred.likely_final(ending):
            self._mark_ended(node)

    def _mark_ended(self, node) -> None:
        """Mark ``node`` and the unbranched path above it (at most
        ``SUPERSEDED_MARK_MAX`` nodes, up to the first node another sequence
        shares) as a conversation's last sequence."""
        self.counters.ended_marks += 1
        for _ in range(SUPERSEDED_MARK_MAX):
            node.marconi_ended = True
            node = node.parent
            if node is None or node.parent is None or len(node.children) != 1:
                break

    def _ending_continued(self, node) -> None:
        ending = getattr(node, "marconi_ending", None)
        if ending is not None and not self.sequence_labels:
            node.marconi_ending = None
            self.end_predictor.continued(ending)

    def leaf_evicted(self, node) -> None:
        """``node`` leaves the tree: a finished request's sequence that ended
        there was never continued while cached (not counted when it was marked
        to go first: the mark, not the workload, decided that)."""
        ending = getattr(node, "marconi_ending", None)
        if ending is not None:
            node.marconi_ending = None
            if not getattr(node, "marconi_ended", False):  # a marked one went first because of the mark
                self.end_predictor.unanswered(ending)
                entry = getattr(node, "marconi_pending", None)
                if entry is not None:
                    entry.counted_unanswered = True

    def _sequence_labels(self, input_ids, output_ids) -> None:
        """``end_labels: "sequence"``: a finished request whose input shares the
        first blocks of an earlier finished sequence (at least
        ``superseded_min_shared`` of it, in ``SEQUENCE_BLOCK``-token blocks)
        continued it, cached or not; then this request's own sequence waits."""
        pred = self.end_predictor
        pending = self._pending_endings
        hashes = _block_hashes(input_ids, len(input_ids) // SEQUENCE_BLOCK)
        for h in hashes:
            entry = pending.pop(h, None)
            if entry is not None:
                node = entry.node
                if entry.counted_unanswered:
                    pred.continued_after_all(entry.ending)
                else:
                    pred.continued(entry.ending)
                    if node.marconi_ending == entry.ending:
                        node.marconi_ending = None
                node.marconi_pending = None
        last, self._last_ended = self._last_ended, None
        if last is None:
            return
        node, ending = last
        n = len(input_ids) + len(output_ids) - 1  # the committed sequence: the input, the output but its last token
        blocks = -(-int(self.config.superseded_min_shared * n) // SEQUENCE_BLOCK)
        if blocks * SEQUENCE_BLOCK > n:
            blocks = n // SEQUENCE_BLOCK
        if blocks == 0:
            return
        if blocks <= len(hashes):
            key = hashes[blocks - 1]
        else:  # the key reaches into the output: extend the input's chain over the blocks needed
            committed = list(input_ids) + list(output_ids[: blocks * SEQUENCE_BLOCK - len(input_ids)])
            key = _block_hashes(committed, blocks, hashes)[-1]
        entry = _PendingEnding(ending, node)
        pending[key] = entry
        node.marconi_pending = entry
        if len(pending) > PENDING_ENDINGS_MAX:
            _, old = pending.popitem(last=False)
            old.node.marconi_pending = None

    def _spared_tombstone(self, node, *, single_queue: bool = False) -> bool:
        """``tombstones_spare_branches``: a branch point's state not hit since it was
        admitted keeps its place in the recency order (the request that made the
        branch, or its sibling, is the likely next hit); ``tombstones_spare_fork_hits``:
        so does a state a request diverged at (a shared prompt's fork), in the
        queues that mode names."""
        forks = self.config.tombstones_spare_fork_hits
        if (forks == "both" or (forks == "two_pools" and not single_queue)) and getattr(node, "marconi_fork_hits", 0):
            return True
        return (self.config.tombstones_spare_branches and getattr(node, "marconi_branch", False)
                and getattr(node, "marconi_hits", 0) == 0)

    # -- events -------------------------------------------------------------
    def on_eviction_call(self) -> None:
        self.tick()
        if self.tuner is not None:
            self.tuner.on_eviction()

    def _unproven_internal(self, node) -> bool:
        """No evidence of its own: never resumed from while internal, not a branch point, not an anchor."""
        return not (getattr(node, "marconi_ihits", 0) or getattr(node, "marconi_branch", False)
                    or getattr(node, "marconi_anchor", False))

    def state_evicted(self, node) -> None:
        """``node``'s SSM state is about to be freed (tombstoned or with its leaf)."""
        self.counters.state_evictions += 1
        if self.config.internal_prior and node.children and self._unproven_internal(node):
            self.internal_lost += 1
        if self.hit_density is not None:
            # the age the eviction queue scored it at (it scores at clock + 1)
            self.hit_density.record(self.state_class(node), self.clock + 1.0 - getattr(node, "marconi_t", 0.0), hit=False)

    def record_eviction(self, pool: str, node, tokens: int, score: Optional[float]) -> None:
        c = self.counters
        c.evicted_tokens += tokens
        if self.log_evictions and len(c.eviction_log) < EVICTION_LOG_MAX:
            c.eviction_log.append((pool, self.node_end(node), tokens, score))

    def efficiency_horizon_ticks(self) -> Optional[float]:
        """``efficiency_horizon`` (requests) in logical clock ticks, from the ticks
        per finished request so far."""
        h = self.config.efficiency_horizon
        if h is None:
            return None
        return h * max(self.clock, 1.0) / max(self.requests_finished, 1)

    def on_request_finished(self, input_ids, output_ids) -> None:
        self.requests_finished += 1
        if self.sequence_labels:
            self._sequence_labels(input_ids, output_ids)
        if self.tuner is not None:
            self.tuner.on_request_finished(input_ids, output_ids)

    def close(self) -> None:
        """Stop the α tuner's worker (if any)."""
        if self.tuner is not None:
            self.tuner.close()
