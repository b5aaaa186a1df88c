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
