"""Shared bits of the example programs: the backend, the data path, cached-token reporting."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import sglang as sgl

REPO = Path(__file__).resolve().parents[1]


def parse_args(description: str, **extra):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--url", default=os.environ.get("SGLANG_URL", "http://127.0.0.1:30000"),
                    help="SGLang server (env SGLANG_URL)")
    ap.add_argument("--max-tokens", type=int, default=8)
    for name, (typ, default, help_) in extra.items():
        ap.add_argument(f"--{name}", type=typ, default=default, help=help_)
    return ap.parse_args()


def connect(url: str) -> sgl.RuntimeEndpoint:
    backend = sgl.RuntimeEndpoint(url)
    sgl.set_default_backend(backend)
    return backend


def cached(state, name: str) -> int:
    """cached_tokens SGLang reported for the generation stored under ``name``."""
    meta = state.get_meta_info(name) or {}
    return int(meta.get("cached_tokens", 0))


def report(program: str, rows) -> int:
    """rows: (label, cached_tokens, prompt_tokens). Prints one line per request and a total."""
    total = 0
    for label, c, p in rows:
        print(f"{program}: {label}: cached_tokens={c} prompt_tokens={p}")
        total += c
    print(f"{program}: total cached_tokens={total} over {len(rows)} requests")
    return total


def prompt_tokens(state, name: str) -> int:
    meta = state.get_meta_info(name) or {}
    return int(meta.get("prompt_tokens", 0))
