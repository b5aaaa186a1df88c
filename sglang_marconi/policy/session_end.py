"""Which answers end their conversation: learned online from completion endings.

A finished request leaves its last decoded token's state at the end of its
sequence in the tree. If the conversation goes on, the next request extends
that sequence and hits it; if the answer was the last one (an agent's
``submit``, a final answer, a goodbye), nothing ever will, and under memoryless
arrivals that is the only thing an online policy can know about the future
(see BENCHMARKS.md: "end-oracle"). Conversations that end tend to end the same
way, so the last few tokens of the completion are a feature:

* each finished request's ending is its last ``tail_tokens`` output tokens;
* an ending is *unanswered* when the sequence it ended is evicted first, and
  *continued* when a later request continues that sequence: with the cache's
  labels (``end_labels: "cache"``) only by hitting, extending or revising it
  while it is cached; with the sequence labels (the default) whenever a later
  request's input shares at least half of it, cached or not — an unanswered
  label is then taken back (:meth:`EndPredictor.continued_after_all`), so a
  tight budget that evicts everything before its continuation arrives does not
  teach non-final endings final;
* an ending is *likely final* when the posterior mean of "continued"
  (``(continued + 1) / (resolved + 2)``, a uniform prior) is at most
  ``max_continue``: with the default 0.1 that takes at least 8 unanswered
  sequences and none continued.

:class:`EndPredictor` is that bookkeeping, with no SGLang in it; the cache
marks a sequence whose ending is likely final to go first (``ended_first``).
Its memory is bounded: at most ``capacity`` endings, least recently seen
forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence


class EndPredictor:
    def __init__(self, tail_tokens: int = 4, max_continue: float = 0.1, capacity: int = 65536):
        if isinstance(tail_tokens, bool) or not isinstance(tail_tokens, int) or tail_tokens < 1:
            raise ValueError(f"end predictor: tail_tokens must be an integer >= 1, got {tail_tokens!r}")
        if not 0.0 < max_continue < 1.0:
            raise ValueError(f"end predictor: max_continue must be in (0, 1), got {max_continue!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"end predictor: capacity must be an integer >= 1, got {capacity!r}")
        self.tail_tokens = tail_tokens
        self.max_continue = max_continue
        self.capacity = capacity
        #: ending -> [continued, unanswered]
        self._stats: OrderedDict[tuple, list] = OrderedDict()

    def ending(self, output_ids: Sequence[int]) -> Optional[tuple]:
        """The feature of a finished request (None: output shorter than the tail)."""
        k = self.tail_tokens
        if len(output_ids) < k:
            return None
        return tuple(int(t) for t in output_ids[len(output_ids) - k:])

    def _entry(self, ending: tuple) -> list:
        e = self._stats.get(ending)
        if e is None:
            e = self._stats[ending] = [0, 0]
            if len(self._stats) > self.capacity:
                self._stats.popitem(last=False)
        else:
            self._stats.move_to_end(ending)
        return e

    def continued(self, ending: tuple) -> None:
        self._entry(ending)[0] += 1

    def unanswered(self, ending: tuple) -> None:
        self._entry(ending)[1] += 1

    def continued_after_all(self, ending: tuple) -> None:
        """A sequence counted unanswered (evicted first) was continued later."""
        e = self._entry(ending)
        e[0] += 1
        e[1] = max(e[1] - 1, 0)

    def p_continue(self, ending: tuple) -> float:
        """Posterior mean of "a sequence with this ending is continued" (0.5 if unseen)."""
        c, u = self._stats.get(ending, (0, 0))
        return (c + 1.0) / (c + u + 2.0)

    def likely_final(self, ending: Optional[tuple]) -> bool:
        return ending is not None and self.p_continue(ending) <= self.max_continue

    def __len__(self) -> int:
        return len(self._stats)
