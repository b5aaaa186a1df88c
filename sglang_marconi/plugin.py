"""SGLang general plugin (entry-point group ``sglang.srt.plugins``).

SGLang calls :func:`register` early in every process it starts (before it
parses ``launch_server``'s flags). It registers the ``marconi`` radix-cache
backend, so ``--radix-cache-backend marconi`` works without editing SGLang's
source. It also validates Marconi's knobs when SGLang checks the server
arguments, before any process is spawned or a model is loaded: a bad
``--radix-eviction-policy-config`` stops start-up at once with one line naming
the key. And it rejects requests whose token ids lie outside the model's
vocabulary with a 400 before they reach the scheduler (:mod:`.request_checks`;
on CPU such an id would take the server down).
"""

from __future__ import annotations

import os

BACKEND_NAME = "marconi"
_HOOKED = False


def validate_server_args(server_args) -> None:
    """Raise SystemExit with one line if the Marconi knobs are invalid."""
    if getattr(server_args, "radix_cache_backend", None) != BACKEND_NAME:
        return
    from .policy.config import MarconiConfigError, parse_server_config
    from .sglang_backend.factory import resolve_profile

    try:
        config = parse_server_config(getattr(server_args, "radix_eviction_policy_config", None))
        if config.profile:
            resolve_profile(config.profile)
        policy = getattr(server_args, "radix_eviction_policy", "lru")
        if policy != "lru":
            raise MarconiConfigError(
                f"--radix-eviction-policy {policy} conflicts with --radix-cache-backend marconi "
                "(Marconi's utility decides eviction); pass its knobs in --radix-eviction-policy-config"
            )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _before_check(self, *args, **kwargs):
    validate_server_args(self)
    return None


def cut_prefill_at_branch_point(admission, adder, req, *args, **kwargs):
    """End a new request's first prefill chunk exactly at its Marconi branch point.

    SGLang checkpoints a request's state only where a prefill chunk ends
    (``cache_unfinished_req``), and its chunks end where the token budget
    runs out. Marconi's branch point (the end of the KV match, where the
    request leaves the cached tree) usually lies strictly inside the first
    chunk, so siblings of a shared prefix would never get its state. This
    AFTER hook on ``PrefillAdder._select_prefill_admission`` shortens that
    chunk to end at the branch point; the Marconi component then admits the
    state there, and the rest of the input is the next chunk. Only on a
    Marconi tree, with chunked prefill on, for a request not yet checkpointed,
    and when no other chunked request is pending in this batch (SGLang tracks
    one); the batch takes no further requests after the cut.
    """
    from sglang.srt.managers.schedule_policy import _PrefillAdmission

    if not isinstance(admission, _PrefillAdmission):
        return None
    if getattr(adder.tree_cache, "marconi", None) is None or adder.rem_chunk_tokens is None:
        return None
    branch = getattr(req, "mamba_branching_seqlen", None)
    if branch is None or getattr(req, "marconi_branch_admitted", False) or adder.new_chunked_req is not None:
        return None
    start, end = admission.prefix_len, admission.prefix_len + admission.extend_len
    if not (start < branch < end) or admission.replay_len:
        return None
    cut = branch - start
    adder.rem_chunk_tokens = min(adder.rem_chunk_tokens, cut)  # nothing else joins this batch
    return _PrefillAdmission(start, cut, 0, True, admission.replay_len)


def cut_chunk_at_prompt_end(adder, req, *args, **kwargs):
    """End a request's continuing prefill chunk one token before its input's end, when it
    decodes nothing (SGLang's warm-up before ``n > 1`` samples, a frontend ``fork``'s
    commit): the Marconi component keeps its last state there, where a request with the
    same prompt resumes. BEFORE hook on ``PrefillAdder.add_chunked_req``: the first cut
    (:func:`cut_prefill_at_branch_point`) went to its branch point or anchor; this one
    shortens the chunk budget so that the continuation stops at ``marconi_prompt_end``.
    Nothing else joins the batch, as with the first cut."""
    if getattr(adder.tree_cache, "marconi", None) is None or adder.rem_chunk_tokens is None:
        return None
    end = getattr(req, "marconi_prompt_end", None)
    if end is None or getattr(req, "marconi_prompt_end_admitted", False):
        return None
    start = req.prefix_len
    if start < end < len(req.full_untruncated_fill_ids):
        adder.rem_chunk_tokens = min(adder.rem_chunk_tokens, end - start)
    return None


IDLE_POOLS_ENV = "MARCONI_LOG_IDLE_POOLS"
_last_idle_pools = [None]


def log_idle_pool_check(result, checker, *args, **kwargs):
    """AFTER hook on SGLang's idle memory check (``SchedulerInvariantChecker._check_all_pools``,
    run whenever the scheduler is idle): with ``MARCONI_LOG_IDLE_POOLS=1`` it logs SGLang's own
    accounting — pool free counts against the tree's evictable and protected holdings — as one
    line, each time it changes (the soak reads it back)."""
    import logging

    has_leak, messages = result
    line = f"leak={bool(has_leak)}; " + "; ".join(m for m in messages if m)
    if line != _last_idle_pools[0]:
        _last_idle_pools[0] = line
        logging.getLogger(__name__).info("marconi: idle pool check: %s", line)
    return None


def register() -> None:
    global _HOOKED
    from sglang.srt.mem_cache.registry import (
        get_radix_cache_factory,
        register_radix_cache_backend,
    )

    from . import request_checks
    from .sglang_backend.factory import marconi_factory

    if get_radix_cache_factory(BACKEND_NAME) is None:
        register_radix_cache_backend(BACKEND_NAME, marconi_factory)
    if not _HOOKED:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        HookRegistry.register("sglang.srt.server_args.ServerArgs.check_server_args", _before_check, HookType.BEFORE)
        HookRegistry.register(
            "sglang.srt.managers.schedule_policy.PrefillAdder._select_prefill_admission",
            cut_prefill_at_branch_point,
            HookType.AFTER,
        )
        HookRegistry.register(
            "sglang.srt.managers.schedule_policy.PrefillAdder.add_chunked_req",
            cut_chunk_at_prompt_end,
            HookType.BEFORE,
        )
        HookRegistry.register(request_checks.TARGET, request_checks.check_input_ids, HookType.BEFORE)
        if os.environ.get(IDLE_POOLS_ENV, "0") == "1":
            HookRegistry.register(
                "sglang.srt.managers.scheduler_components.invariant_checker.SchedulerInvariantChecker._check_all_pools",
                log_idle_pool_check,
                HookType.AFTER,
            )
        _HOOKED = True
