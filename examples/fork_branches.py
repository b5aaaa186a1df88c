"""Branching with ``fork``: one shared context, several continuations, then a judge.

    python examples/fork_branches.py --url http://127.0.0.1:30000 --branches 3

The shared context is generated first (so a state exists where its request
ended); ``s.fork(n)`` then sends the branches, which share that prefix.
"""

from __future__ import annotations

import sglang as sgl

from _common import cached, connect, parse_args, prompt_tokens, report

STYLES = ["a happy ending", "a sad ending", "a surprising twist", "an open ending"]


@sgl.function
def branches(s, num, max_tokens):
    s += "Write the start of a short story about a cache that remembers everything.\nStory:"
    s += sgl.gen("start", max_tokens=max_tokens, temperature=0)
    forks = s.fork(num)
    for i, f in enumerate(forks):
        f += f"\nContinue it with {STYLES[i % len(STYLES)]}:"
        f += sgl.gen("cont", max_tokens=max_tokens, temperature=0)
    forks.join()
    s += "\nThe continuations were:" + "".join(f"\n{i}: " + f["cont"] for i, f in enumerate(forks))
    s += "\nThe best one is number"
    s += sgl.gen("judge", max_tokens=2, temperature=0)
    s.branch_states = forks  # kept for reporting


def main():
    a = parse_args("fork-based branching", branches=(int, 3, "number of branches"))
    connect(a.url)
    st = branches.run(num=a.branches, max_tokens=a.max_tokens)
    rows = [("start", cached(st, "start"), prompt_tokens(st, "start"))]
    rows += [(f"branch {i}", cached(f, "cont"), prompt_tokens(f, "cont")) for i, f in enumerate(st.branch_states)]
    rows.append(("judge", cached(st, "judge"), prompt_tokens(st, "judge")))
    report("fork", rows)


if __name__ == "__main__":
    main()
