"""Demo: Marconi driving SGLang 0.5.23's real cache classes on CPU.

    python -m sglang_marconi.demo [--kv-budget N] [--state-budget N] [--alpha auto|X]
    python -m sglang_marconi.demo --next     # where to go next (the end of ``make demo``)

A scripted workload — a shared system prompt, a multi-turn chat, a branching
conversation — runs through a ``MarconiRadixCache`` (SGLang's
UnifiedRadixCache, HybridReqToTokenPool/MambaPool and KV allocator, with
Marconi's components) the way SGLang's scheduler drives it. For each request
it prints the tokens hit, the SSM states admitted and why (branch point / last
decoded token), and the evictions that request caused with their utility
scores. Texts become token ids through a word-level vocabulary built on the
fly (no model or tokenizer download is possible here); the cache only sees ids.
"""

from __future__ import annotations

import argparse
import sys

SYSTEM = (
    "You are a careful assistant for a hardware store . Answer briefly , cite the aisle number , "
    "never invent prices , and ask a clarifying question when the request is ambiguous . "
    "Store hours are nine to six . Aisles : one paint , two tools , three garden , four plumbing , "
    "five electrical , six lumber , seven fasteners , eight seasonal . Returns need a receipt . "
) * 2


class Vocab:
    """Word-level ids, assigned in order of first appearance."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return [self.ids.setdefault(w, len(self.ids) + 1) for w in text.split()]


def render(messages: list[tuple[str, str]]) -> str:
    """Chat rendering whose request k + its reply is a prefix of request k+1."""
    return "".join(f" <|{role}|> {content}" for role, content in messages) + " <|assistant|>"


def workload():
    """(label, messages, reply) in arrival order."""
    s = [("system", SYSTEM)]
    a1 = s + [("user", "where do I find wood glue ?")]
    a1r = "Aisle seven , next to the fasteners . Do you need it for indoor or outdoor work ?"
    a2 = a1 + [("assistant", a1r), ("user", "outdoor , a garden bench")]
    a2r = "Then take the waterproof polyurethane glue in aisle seven , top shelf ."
    a3 = a2 + [("assistant", a2r), ("user", "and screws for it ?")]
    a3r = "Stainless deck screws , aisle seven , bottom shelf ; two inch length suits a bench ."
    b1 = s + [("user", "do you sell tomato seeds ?")]
    b1r = "Yes , aisle three , in the seed rack by the door ."
    c1 = s + [("user", "what are your opening hours on sunday ?")]
    c1r = "We are open nine to six every day , sunday included ."
    # Branch: the user edits turn 2 of conversation A (a retry with another answer).
    a2x = a1 + [("assistant", a1r), ("user", "indoor , a bookshelf")]
    a2xr = "Use regular wood glue , aisle seven , middle shelf ."
    a3x = a2x + [("assistant", a2xr), ("user", "which clamps ?")]
    a3xr = "Bar clamps in aisle two ; two of them are enough for a bookshelf ."
    d1 = s + [("user", "I need a replacement faucet cartridge .")]
    d1r = "Aisle four , plumbing ; bring the old cartridge so we can match it ."
    return [
        ("A turn 1 (new system prompt)", a1, a1r),
        ("B turn 1 (same system prompt)", b1, b1r),
        ("C turn 1 (same system prompt)", c1, c1r),
        ("A turn 2 (continues A)", a2, a2r),
        ("A turn 3 (continues A)", a3, a3r),
        ("A' turn 2 (branch: edits A turn 2)", a2x, a2xr),
        ("A' turn 3 (continues the branch)", a3x, a3xr),
        ("D turn 1 (same system prompt)", d1, d1r),
        ("B turn 2 (continues B)", b1 + [("assistant", b1r), ("user", "and pots ?")], "Aisle three , end cap ."),
        ("A turn 4 (back to A)", a3 + [("assistant", a3r), ("user", "thanks !")], "You are welcome ."),
    ]


NEXT_STEPS = """\
Next:
  replay your trace  .venv/bin/python -m sglang_marconi.replay --trace your_trace.jsonl --policies marconi,lru,vllm
                     (one JSON request per line; the format, cuts and policies: docs/replay.md;
                      try it on a built-in trace: --trace swe-agent --sessions 20)
  serve a model      python -m sglang.launch_server --model-path <hybrid model> --page-size 1 \\
                         --radix-cache-backend marconi
  the docs           README.md, docs/ (configuration, policy, replay, evaluation, replicas), BENCHMARKS.md"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_marconi.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kv-budget", type=int, default=420, help="KV tokens the tree may hold (default 420)")
    ap.add_argument("--state-budget", type=int, default=5, help="SSM states the tree may hold (default 5)")
    ap.add_argument("--alpha", default=None,
                    help="the paper's utility with this α: 'auto' (tuned online) or a number (default: the package's value-per-byte rule)")
    ap.add_argument("--profile", default="paper-7b", help="cost profile (built-in name or config.json)")
    ap.add_argument("--next", action="store_true", help="only print where to go next (replay, serving, docs)")
    args = ap.parse_args(argv)
    if args.next:
        print(NEXT_STEPS)
        return 0

    from rich.console import Console
    from rich.table import Table

    from .policy import parse_config
    from .sglang_backend.factory import resolve_profile
    from .sglang_backend.driver import CacheDriver
    from .sglang_backend.tuning import build_marconi_cache

    knobs = {"window_multiplier": 2, "tuner": "thread"}
    if args.alpha is not None:
        try:
            knobs["alpha"] = args.alpha if args.alpha == "auto" else float(args.alpha)
        except ValueError:
            raise SystemExit(f"error: --alpha {args.alpha!r}: expected 'auto' or a number") from None
    try:
        config = parse_config(knobs)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    args.alpha = "auto" if config.auto_alpha else config.alpha
    profile = resolve_profile(args.profile)
    built = build_marconi_cache(
        kv_slots=args.kv_budget + 1024,
        mamba_slots=args.state_budget + 2,
        config=config,
        profile=profile,
        kv_budget=args.kv_budget,
        state_budget=args.state_budget,
    )
    st = built.cache.marconi
    st.log_evictions = True
    driver = CacheDriver(built, kv_budget=args.kv_budget, state_budget=args.state_budget)
    vocab = Vocab()
    console = Console(width=150)
    console.print(
        f"[bold]sglang-marconi demo[/bold]: SGLang {_sglang_version()} UnifiedRadixCache + Marconi components on CPU; "
        f"profile {profile.name} (state {profile.ssm_state_bytes() / 1e6:.1f} MB, KV {profile.kv_bytes(1)} B/token); "
        f"budget {args.kv_budget} KV tokens, {args.state_budget} SSM states; alpha {args.alpha}"
    )
    table = Table(show_lines=False)
    for col in ("#", "request", "input", "hit", "states admitted (position: why)", "evictions: pool@end tokens (utility)"):
        table.add_column(col, overflow="fold")
    total_in = total_hit = 0
    for i, (label, messages, reply) in enumerate(workload(), 1):
        inp = vocab.encode(render(messages))
        out = vocab.encode(reply)
        before = len(st.counters.eviction_log)
        r = driver.run(inp, out)
        total_in += r.input_len
        total_hit += r.hit_len
        admitted = ", ".join(f"{p}: {why}" + ("" if ok else " (already cached)") for p, why, ok in r.checkpoints)
        ev = st.counters.eviction_log[before:]
        evs = "; ".join(f"{pool}@{end} {tok}t ({'-' if u is None else f'{u:.2f}'})" for pool, end, tok, u in ev) or "-"
        table.add_row(str(i), label, str(r.input_len), str(r.hit_len), admitted, evs)
    console.print(table)
    if st.tuner is not None:
        st.tuner.wait(timeout=120)
    c = st.counters.as_dict()
    console.print(
        f"token hit rate {total_hit}/{total_in} = {total_hit / total_in:.1%}; states admitted: "
        f"{c['admitted_branch_point']} branch point + {c['admitted_input_end']} input end + "
        f"{c['admitted_last_token']} last decoded token; "
        f"evictions: {c['state_evictions']} states, {c['leaf_evictions']} nodes; alpha now {st.alpha:.2f}"
        + (f" (tuned {len(st.tuner.events)}x)" if st.tuner is not None else "")
    )
    st.close()
    return 0


def _sglang_version() -> str:
    from importlib.metadata import version

    return version("sglang")


if __name__ == "__main__":
    sys.exit(main())
