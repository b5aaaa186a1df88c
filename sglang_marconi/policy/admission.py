"""Marconi's admission rule (speculative insertion), as pure functions.

Per request, at most two SSM states enter the cache:

* BRANCH_POINT — before prefill, the match tells whether the input creates a
  branch point inside the cached tree: the KV match runs past the deepest
  reusable SSM state (it ends inside an edge, or at a node whose state is
  gone). The state at that position is checkpointed during this request's
  prefill, so the *next* request with the same prefix hits it.
* LAST_TOKEN — when the request finishes, the state after its last decoded
  token (the end of its committed KV) is checkpointed, so the next turn of the
  same conversation hits the whole previous input + output.
* ANCHOR — a request that creates no branch point spends its other state on
  the largest power of two within its input, when that lies past its hit
  (:func:`anchor_position`). A branch point only appears with a prefix's
  second user, so without it the first reuse of a shared prefix (a long
  document asked a second question) misses; with it that reuse hits at least
  half of any shared prefix the anchor lies in. Positions 2^k are the same for
  every request, so siblings find each other's anchor, and one growing
  sequence places at most log2(length) of them over its life.

Nothing else is admitted. Positions are exact tokens by default; in "grid"
mode the branch point is floored to SGLang's mamba checkpoint grid (what an
extra_buffer prefill can capture without splitting a chunk), which loses the
tail of the shared prefix past the last grid line.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional


class AdmissionReason(str, enum.Enum):
    BRANCH_POINT = "branch_point"
    LAST_TOKEN = "last_decoded_token"
    INPUT_END = "input_end"  # the state after prefill (option input_state)
    ANCHOR = "anchor"  # the largest power of two within the input (no branch point)
    GRID = "grid"  # baselines: a state on a fixed grid of positions


@dataclass(frozen=True)
class Checkpoint:
    position: int  # sequence length the state covers
    reason: AdmissionReason


def branch_point(
    full_kv_hit_len: int,
    state_hit_len: int,
    *,
    mode: str = "exact",
    grid: int = 1,
) -> Optional[int]:
    """Position to checkpoint during prefill, or None.

    ``full_kv_hit_len`` is how far the input's tokens match cached KV (the
    radix match, ignoring SSM states); ``state_hit_len`` is the deepest matched
    position that holds an SSM state (the usable hit).
    """
    pos = full_kv_hit_len
    if mode == "grid":
        if grid < 1:
            raise ValueError(f"checkpoint grid must be >= 1, got {grid}")
        pos = (pos // grid) * grid
    elif mode != "exact":
        raise ValueError(f"branch point mode must be 'exact' or 'grid', got {mode!r}")
    return pos if pos > state_hit_len else None


def anchor_position(input_len: int, hit_len: int, grid: int = 1, bits: int = 1) -> Optional[int]:
    """The anchor state's position: the largest power of two ``p <= input_len``,
    when ``p > hit_len`` (a state past what the request reuses) and ``p`` lies on
    the checkpoint ``grid`` (SGLang's extra_buffer grid); else None. ``bits``
    (experiment ``anchor_bits``): the largest number of at most that many
    significant bits instead (2: powers of two and 1.5 times them)."""
    if input_len < 1:
        return None
    shift = max(0, input_len.bit_length() - bits)
    p = (input_len >> shift) << shift
    return p if p > hit_len and p % grid == 0 else None


def plan_request(
    input_len: int,
    committed_len: int,
    hit_len: int,
    branching_len: Optional[int],
) -> list[Checkpoint]:
    """Checkpoints one request admits, in sequence order (at most two).

    ``committed_len`` is the KV length the request leaves behind when it
    finishes (input + output − 1: the last sampled token is never run through
    the model). A branch point is taken only strictly inside the prefilled
    span (hit_len, input_len]; the last-token state always.
    """
    plan: list[Checkpoint] = []
    if branching_len is not None and hit_len < branching_len <= input_len and branching_len < committed_len:
        plan.append(Checkpoint(branching_len, AdmissionReason.BRANCH_POINT))
    if committed_len > 0:
        plan.append(Checkpoint(committed_len, AdmissionReason.LAST_TOKEN))
    return plan


# -- admission policies the drivers can run -----------------------------------
# Each maps one request's match to the checkpoints it admits. ``hit`` is the
# usable hit (deepest matched SSM state), ``full_kv_hit`` how far the KV match
# runs; ``committed`` the KV length the finished request leaves behind.


class Admission:
    name = "base"
    #: Hit reported for a request: the usable state hit, or (oracle) the KV match.
    oracle = False

    def plan(self, input_len: int, committed: int, hit: int, full_kv_hit: int,
             prefill_only: bool = False) -> list[Checkpoint]:
        """``prefill_only``: the request decodes nothing (``max_new_tokens`` 0: SGLang's
        warm-up before ``n > 1`` samples, a frontend ``fork``'s commit)."""
        raise NotImplementedError


def prompt_end_position(input_len: int, hit_len: int) -> Optional[int]:
    """Where a request that decodes nothing keeps its last state: one token before the end
    of its input, where a request with the same prompt resumes (a request matches at most
    all but its last token, which it recomputes) and one token short of where a longer
    prompt would; the state at its end serves neither. None when its hit already reaches
    there. The replay's plan and the live component both ask this."""
    p = input_len - 1
    return p if p > hit_len else None


def admits_input_end(input_len: int, committed: int, hit: int, branch_planned: bool) -> bool:
    """Option ``input_state``: spend the request's second state on the end of its
    input when it plans no branch point (so still <= 2 states per request), it
    computed something (``hit < input_len``) and decodes past it; losing the
    output's KV leaf then still leaves a hit at the input's end. The replay's
    plan and the live component both ask this."""
    return not branch_planned and hit < input_len < committed


class MarconiAdmission(Admission):
    """Speculative insertion: the branch point (exact or on a grid) or the anchor + the last
    decoded token; for a request that decodes nothing (exact mode), the last state is at
    :func:`prompt_end_position` instead of its end."""

    name = "marconi"

    def __init__(self, mode: str = "exact", grid: int = 1, input_state: bool = False, anchor: bool = False,
                 anchor_bits: int = 1, prompt_end: bool = True):
        self.mode, self.grid, self.input_state, self.anchor = mode, grid, input_state, anchor
        self.anchor_bits, self.prompt_end = anchor_bits, prompt_end

    def plan(self, input_len, committed, hit, full_kv_hit, prefill_only=False):
        if prefill_only and self.prompt_end and self.mode == "exact":
            # its last state one token before its input's end (the branch point or anchor as for any request)
            committed = prompt_end_position(input_len, hit)
            if committed is None:
                return []
        plan = plan_request(input_len, committed, hit, branch_point(full_kv_hit, hit, mode=self.mode, grid=self.grid))
        branch_planned = any(c.reason is AdmissionReason.BRANCH_POINT for c in plan)
        if self.input_state and admits_input_end(input_len, committed, hit, branch_planned):
            plan.insert(0, Checkpoint(input_len, AdmissionReason.INPUT_END))
        elif self.anchor and not branch_planned:
            p = anchor_position(input_len, hit, self.grid if self.mode == "grid" else 1, self.anchor_bits)
            if p is not None and p < committed:  # at `committed` it is the last-token state
                plan.insert(0, Checkpoint(p, AdmissionReason.ANCHOR))
        return plan


class SGLangGridAdmission(Admission):
    """SGLang 0.5.23's extra_buffer admission, per request.

    Prefill tracks one state: the grid-aligned branch point when it falls in
    the prefilled span, otherwise the last grid-aligned position of the span
    (``prefix + ⌊extend/grid⌋·grid``, only when the span covers a whole grid
    cell). At finish the last tracked grid-aligned position (⌊committed/grid⌋·grid)
    is donated. (``ScheduleBatch._mamba_radix_cache_v2_track_entry`` and
    ``MambaComponent._select_finished_checkpoint``.)
    """

    name = "sglang"

    def __init__(self, grid: int = 64):
        if grid < 1:
            raise ValueError(f"checkpoint grid must be >= 1, got {grid}")
        self.grid = grid

    def plan(self, input_len, committed, hit, full_kv_hit, prefill_only=False):
        g = self.grid
        out: list[Checkpoint] = []
        branch = branch_point(full_kv_hit, hit, mode="grid", grid=g)
        extend = input_len - hit
        if branch is not None and hit < branch < input_len:
            out.append(Checkpoint(branch, AdmissionReason.BRANCH_POINT))
        elif extend >= g:
            out.append(Checkpoint(hit + (extend // g) * g, AdmissionReason.GRID))
        last = (committed // g) * g
        if last > (out[-1].position if out else hit):
            out.append(Checkpoint(last, AdmissionReason.LAST_TOKEN))
        return out


class BlockAdmission(Admission):
    """vLLM-style: a state at every block boundary of the newly computed span."""

    name = "vllm"

    def __init__(self, block: int = 32):
        if block < 1:
            raise ValueError(f"block size must be >= 1, got {block}")
        self.block = block

    def plan(self, input_len, committed, hit, full_kv_hit, prefill_only=False):
        b = self.block
        first = (hit // b + 1) * b
        return [Checkpoint(p, AdmissionReason.GRID) for p in range(first, committed + 1, b)]


class OracleAdmission(Admission):
    """Infinite cache upper bound: any cached prefix is reusable (a state at every token)."""

    name = "infinite"
    oracle = True

    def plan(self, input_len, committed, hit, full_kv_hit, prefill_only=False):
        return [Checkpoint(committed, AdmissionReason.LAST_TOKEN)] if committed > 0 else []
