"""k-shot GSM8K: every question shares the same exemplar prefix.

    python examples/gsm8k_kshot.py --url http://127.0.0.1:30000 --k 3 --n 4

Data: ``$MARCONI_GSM8K_DIR`` or ``<repo>/../shared/traces/gsm8k`` (train.jsonl for
the exemplars, test.jsonl for the questions). The prefix is sent once first
(``backend.cache_prefix``) so a state exists where it ends; with
``--mamba-radix-cache-strategy no_buffer`` SGLang can only store a hybrid
model's SSM state where a prefill ended.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import sglang as sgl

from _common import REPO, cached, connect, parse_args, prompt_tokens, report


def data_dir() -> Path:
    return Path(os.environ.get("MARCONI_GSM8K_DIR", REPO.parent / "shared" / "traces" / "gsm8k"))


def load(name: str, n: int):
    with open(data_dir() / name) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


@sgl.function
def answer(s, prefix, question, max_tokens):
    s += prefix + "Question: " + question + "\nAnswer:"
    s += sgl.gen("answer", max_tokens=max_tokens, temperature=0, stop="Question:")


def main():
    a = parse_args("k-shot GSM8K with a shared exemplar prefix",
                   k=(int, 3, "exemplars"), n=(int, 4, "questions"))
    backend = connect(a.url)
    shots = load("train.jsonl", a.k)
    prefix = "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in shots)
    backend.cache_prefix(prefix)
    qs = load("test.jsonl", a.n)
    states = answer.run_batch(
        [{"prefix": prefix, "question": q["question"], "max_tokens": a.max_tokens} for q in qs],
        num_threads=1,  # sequential: each question can reuse what the previous ones stored
    )
    rows = [(f"question {i}", cached(s, "answer"), prompt_tokens(s, "answer")) for i, s in enumerate(states)]
    report("gsm8k", rows)


if __name__ == "__main__":
    main()
