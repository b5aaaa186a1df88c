"""A multi-turn chat: every turn re-sends the conversation including the model's replies.

    python examples/multi_turn_chat.py --url http://127.0.0.1:30000 --turns 4

Completion style (``User:`` / ``Assistant:`` lines), so no chat template is needed.
"""

from __future__ import annotations

import sglang as sgl

from _common import cached, connect, parse_args, prompt_tokens, report

QUESTIONS = [
    "What is a prefix cache?",
    "Why do hybrid models need SSM state checkpoints?",
    "Which states should a cache keep?",
    "How is alpha tuned?",
    "Summarize the conversation.",
]


@sgl.function
def chat(s, turns, max_tokens):
    s += "A conversation between a user and a helpful assistant.\n"
    for i in range(turns):
        s += "User: " + QUESTIONS[i % len(QUESTIONS)] + "\nAssistant:"
        s += sgl.gen(f"turn{i}", max_tokens=max_tokens, temperature=0, stop="User:")
        s += "\n"


def main():
    a = parse_args("multi-turn chat", turns=(int, 4, "turns"))
    connect(a.url)
    st = chat.run(turns=a.turns, max_tokens=a.max_tokens)
    report("chat", [(f"turn {i}", cached(st, f"turn{i}"), prompt_tokens(st, f"turn{i}")) for i in range(a.turns)])


if __name__ == "__main__":
    main()
