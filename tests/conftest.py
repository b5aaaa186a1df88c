"""Shared fixtures: Marconi and stock SGLang caches on real SGLang 0.5.23 classes (CPU)."""

from __future__ import annotations

import os
import warnings

import pytest

warnings.filterwarnings("ignore", message=".*Triton is not supported.*")
warnings.filterwarnings("ignore", message=".*support.*quantization.*")
warnings.filterwarnings("ignore", message=".*support AWQ.*")


def tree_nodes(cache) -> list:
    """Every node of ``cache``'s SGLang tree but the root, in creation (id) order."""
    core = cache.tree_core
    nodes, stack = [], [core.root_node]
    while stack:
        n = stack.pop()
        stack.extend(n.children.values())
        if n is not core.root_node:
            nodes.append(n)
    return sorted(nodes, key=lambda n: n.id)


def replay_records(drv, requests, tree, check_every: int = 8) -> tuple[list, list]:
    """Run ``requests`` (``prompt_ids``, ``completion_ids``) through ``drv``: per request
    (hit, checkpoints, states evicted so far, KV tokens evicted so far), and ``tree(drv)``
    every ``check_every`` requests and after the last."""
    from sglang_marconi.replay.runner import _EvictionCounter

    counter = _EvictionCounter(drv)
    per_request, trees = [], []
    for i, r in enumerate(requests):
        res = drv.run(r.prompt_ids, r.completion_ids)
        per_request.append((res.hit_len, tuple(res.checkpoints), counter.states, counter.kv_tokens))
        if i % check_every == 0 or i == len(requests) - 1:
            trees.append(tree(drv))
    return per_request, trees


@pytest.fixture
def make_marconi():
    """make_marconi(kv_slots, mamba_slots, kv_budget=None, state_budget=None, **config) -> (built, driver).

    Config defaults here: alpha 0, utility_form "sum", inline tuner, input_state, anchor_state,
    tombstones_first, superseded_first and ended_first false, bytes freed counted
    as the node's own KV (the α utility's hand-computed cases; the value rule keeps its default), tombstones_spare_fork_hits off, end_labels "cache",
    the superseded share counted from the root at 0.5 (the base rules the hand-computed tests spell out)."""
    from sglang_marconi.policy import builtin_profile, parse_config
    from sglang_marconi.sglang_backend.driver import CacheDriver
    from sglang_marconi.sglang_backend.tuning import build_marconi_cache

    made = []

    def make(kv_slots=2048, mamba_slots=16, kv_budget=None, state_budget=None, byte_budget=None, profile="paper-7b", **config):
        config.setdefault("alpha", 0.0)
        # the base admission (branch point + last token); tests of the default's
        # input-end state pass input_state=True
        config.setdefault("input_state", False)
        config.setdefault("anchor_state", False)  # the anchor state's own tests turn it on
        config.setdefault("tombstones_first", False)
        config.setdefault("superseded_first", False)
        config.setdefault("ended_first", False)
        config.setdefault("tombstones_spare_fork_hits", "off")
        # the revision share from the root, at half the sequence (rounds 7-11's rule, which the
        # hand-computed superseded tests spell out; the default's "fork" rule has its own test)
        config.setdefault("superseded_share_from", "root")
        config.setdefault("superseded_min_shared", 0.5)
        config.setdefault("end_labels", "cache")  # tests of the sequence labels say so
        config.setdefault("utility_form", "sum")  # recency / α utility; the default's value rule: test_value_order.py
        if config["utility_form"] != "value":  # the α utility's hand-computed bytes: the node's own KV
            config.setdefault("value_bytes", "own")
        config.setdefault("tuner", "inline")
        cfg = parse_config(config)
        prof = builtin_profile(profile) if isinstance(profile, str) else profile
        built = build_marconi_cache(
            kv_slots=kv_slots, mamba_slots=mamba_slots, config=cfg, profile=prof,
            kv_budget=kv_budget, state_budget=state_budget, byte_budget=byte_budget,
        )
        drv = CacheDriver(built, kv_budget=kv_budget, state_budget=state_budget, byte_budget=byte_budget)
        made.append(built)
        return built, drv

    yield make
    for built in made:
        built.cache.marconi.close()
