"""Reject token ids outside the vocabulary before a request reaches the scheduler.

SGLang 0.5.23 does not check ``input_ids`` against the vocabulary on every
device: on CPU an id >= ``vocab_size`` (or a negative one) reaches the
embedding, raises ``IndexError: index out of range in self`` in the scheduler,
and the whole server goes down; so does an empty input (``"text": ""`` tokenizes
to no ids and the Mamba2 mixer cannot reshape a 0-token prefill). :func:`check_input_ids` is a BEFORE hook on
``TokenizerManager._validate_one_request`` — which runs in the HTTP server's
process for every request with ids: ``/generate`` (single or batch, each item
separately), ``/v1/completions`` with a prompt of ids, ``/v1/chat/completions``
after templating — and raises ``ValueError``, which SGLang turns into a 400
(a streamed request gets the error as its one event, with code 400).

The check is device-independent (it reads ``model_config.vocab_size``), so it
guards a GPU server the same way; multimodal requests are left alone (their
``input_ids`` hold placeholder pad values the processor swaps out).
"""

from __future__ import annotations

from typing import Optional, Sequence

TARGET = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"


def first_bad_token(input_ids: Sequence, vocab_size: int) -> Optional[str]:
    """One-line reason naming the first id that is not an int in [0, vocab_size), or None.
    An empty input (e.g. ``"text": ""``) is refused too: its prefill takes the server down."""
    if len(input_ids) == 0:
        return "the input is empty (0 tokens); a request needs at least one token"
    for pos, tid in enumerate(input_ids):
        if isinstance(tid, bool) or not isinstance(tid, int):
            return f"input_ids[{pos}] = {tid!r} is not an integer token id"
        if not 0 <= tid < vocab_size:
            return (f"input_ids[{pos}] = {tid} is outside the model's vocabulary "
                    f"(valid ids: 0 to {vocab_size - 1})")
    return None


def check_input_ids(tokenizer_manager, obj, input_ids, *args, **kwargs) -> None:
    """BEFORE hook: raise ValueError (-> HTTP 400) for an out-of-vocabulary or non-int id."""
    if input_ids is None or getattr(obj, "input_embeds", None) is not None:
        return None
    contains_mm = getattr(obj, "contains_mm_input", None)
    if contains_mm is not None and contains_mm():
        return None
    reason = first_bad_token(input_ids, tokenizer_manager.model_config.vocab_size)
    if reason:
        raise ValueError(reason)
    return None
