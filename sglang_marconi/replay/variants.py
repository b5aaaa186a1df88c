"""Named eviction experiments for the replay — the only place the experiment keys live.

The server takes a handful of keys (``policy/config.py: SERVER_KEYS``); every other field of
``MarconiConfig`` is an experiment, set here by name or with ``--variant NAME=JSON`` (any
field). ``--policies marconi:NAME`` runs a name from :data:`VARIANTS`; a ``--variant`` of the
same name overrides it. docs/policy.md says what each one measured.
"""

from __future__ import annotations

#: whole-path LRU for KV and states, Marconi's admission without the input-end state (the
#: paper's SGLang+; the replay's ``lru`` policy)
LRU_CONFIG = {"alpha": 0.0, "utility_form": "sum", "refresh": "path", "kv_refresh": "path", "input_state": False,
              "anchor_state": False,
              "tombstones_first": False, "superseded_first": False, "ended_first": False}

#: the recency order with the marks of rounds 7-14 (the previous default without the leader
#: and its shadow caches around it)
MARKS_CONFIG = {"utility_form": "sum", "alpha": 0.0, "input_state": "auto", "anchor_state": False, "tombstones_first": True, "tombstones_spare_branches": True,
                "tombstones_spare_fork_hits": "two_pools", "superseded_first": True, "ended_first": True}

VARIANTS: dict[str, dict] = {
    # the paper as stated: its utility, α tuned once on the cold start (grid 0..2 step 0.1)
    "paper": {"variant": "paper"},
    "marks": MARKS_CONFIG,
    "recency": {"utility_form": "sum", "alpha": 0.0, "input_state": "auto", "anchor_state": False},
    "value-input-end": {"input_state": "auto"},  # the default + the input-end state with two pools
    "no-anchor": {"anchor_state": False},  # the default without the anchor state
    "no-anchor-prior": {"anchor_prior": False},  # an anchor not hit yet counts 0 evidence (the previous default)
    "anchor-2bits": {"anchor_bits": 2},  # the anchor at 2^k or 1.5 * 2^k: nearer the input's end
    "no-prompt-end": {"prompt_end_state": False},  # a request that decodes nothing keeps its state at its end
    "internal-prior": {"internal_prior": True},  # every unproven internal state counts its class's share hit
    # the value rule's parts, one at a time
    "value-kv": {"value_kv_pool": "value"},  # the two pools' KV pool by value per byte too
    "value-own-bytes": {"value_bytes": "own"},  # bytes freed: the node's own KV only
    "value-root-flops": {"value_flops": "root"},  # FLOPs saved: from the root
    "value-no-frequency": {"value_frequency": False},  # GreedyDual-Size (every hit counts once)
    "density": {"utility_form": "density"},  # hit density learned online × value per byte
}
