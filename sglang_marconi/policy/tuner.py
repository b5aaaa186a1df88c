"""Online α tuning by replaying recent requests.

Timeline (paper §4.3, with continuous re-tuning added):

* α = 0 (pure recency) until the first eviction; N0 = requests seen by then.
* Every W = m · N0 requests (m = ``window_multiplier``, default 5), the last
  W requests are replayed once per α in the grid on a fresh, tensor-free copy
  of the cache (same slot counts, same policy code) and the α that saves the
  most prefill FLOPs over the window wins. Ties go to the smaller α.
* The paper tunes once; by default this re-tunes every window (``retune``).
* Steady state only (``warm_start``, default): the first window after the
  first eviction is the cache's cold start (sessions still arriving, the
  tree filling), and the α that wins it need not win afterwards. The first
  tuning therefore waits one more window and replays the first one as
  uncounted warm-up.
* Hold-out and hysteresis (``switch_margin``, default 2%): the current α is
  always among the replayed values. A different α becomes a candidate when
  its score beats the current one's by that margin; it is adopted only if it
  beats the current α by the margin again on the *next* window, which it
  was not chosen on. Switching α re-orders the cache, so a switch that does
  not hold up costs more than it gains.
* Memory (``score_decay``, default 0.8): each α's score is its FLOPs saved
  on this window plus ``score_decay`` times its previous score, so one short,
  noisy window cannot flip α (0 = the last window alone, the paper's rule).
* The grid's top never binds: when the top wins, the next tuning also tries
  twice the top.

Replay start state: the first window starts at the trace's first request, so
replaying it from an empty cache is exact. Later windows replay the previous
window first as warm-up (uncounted) instead of snapshotting the live tree: the
live tree's contents are a function of recent requests, and this keeps the
tuner free of any access to live tree state from another thread or process.

Tuning never runs on the caller's thread unless ``tuner="inline"``: jobs go to
a one-worker process pool (``"process"``, default: no GIL contention with the
scheduler) or thread pool, and :meth:`AlphaTuner.poll` swaps the new α in when
the job is done. At most one job is in flight; a window that comes due while
one runs is skipped and logged. If the tuner's process dies (killed, out of
memory), the cache keeps the current α, tuning stops and one warning line says
so; the scheduler keeps serving.

This module does not import SGLang: the replay itself is injected as a
picklable ``replay_fn(spec, warmup, window, alphas) -> {alpha: flops_saved}``.
"""

from __future__ import annotations

import concurrent.futures as cf
from concurrent.futures.process import BrokenProcessPool
import logging
import multiprocessing
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from .config import MarconiConfig

logger = logging.getLogger(__name__)

RequestRecord = tuple[tuple[int, ...], tuple[int, ...]]  # (input ids, output ids)
ReplayFn = Callable[[Any, Sequence[RequestRecord], Sequence[RequestRecord], Sequence[float]], dict]


def _background_priority() -> None:
    """Tuner processes yield the CPU to the scheduler (lowest nice level)."""
    try:
        os.nice(19)
    except OSError:
        pass


def one_worker_executor(mode: str, thread_name: str) -> cf.Executor:
    """The one-worker executor background replays run on: a process at the lowest CPU
    priority (``"process"``) or a thread (``"thread"``).

    The process is forked by a ``multiprocessing`` forkserver that preloads only
    ``tuner_forkserver``, which makes every worker exit with the scheduler from its
    first instant: a worker still starting (re-importing the server's main module
    takes seconds) does not outlive the server, as a spawned one could."""
    if mode == "process":
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([f"{__package__}.tuner_forkserver"])
        return cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_background_priority)
    return cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)


def best_alpha(scores: dict[float, float]) -> float:
    """α with the most FLOPs saved; ties go to the smaller α."""
    return min(scores, key=lambda a: (-scores[a], a))


def choose_alpha(scores: dict[float, float], current: float, margin: float) -> float:
    """The best α, unless it beats ``current`` (if scored) by less than ``margin``."""
    best = best_alpha(scores)
    if best == current or current not in scores:
        return best
    cur = scores[current]
    return best if scores[best] > cur * (1.0 + margin) else current


@dataclass
class TuningEvent:
    at_request: int
    window: int
    alpha: float
    scores: dict[float, float] = field(default_factory=dict)


class AlphaTuner:
    def __init__(self, config: MarconiConfig, replay_fn: ReplayFn, spec: Any):
        self.config = config
        self.replay_fn = replay_fn
        self.spec = spec
        self.fixed = config.alpha is not None
        self.alpha: float = config.alpha if config.alpha is not None else 0.0
        self.requests_seen = 0
        self.n0: Optional[int] = None
        self.next_tune_at: Optional[int] = None
        self._log: deque[RequestRecord] = deque(maxlen=(1 + config.warmup_windows + config.score_windows) * config.tuner_max_requests)
        self._future: Optional[cf.Future] = None
        self._future_meta: Optional[tuple[int, int]] = None
        self._executor: Optional[cf.Executor] = None
        self.events: list[TuningEvent] = []
        self.skipped_windows = 0
        cap = config.alpha_max
        self.grid: list[float] = sorted(a for a in set(config.alpha_grid) if cap is None or a <= cap)
        self.cum_scores: dict[float, float] = {}
        self.pending: Optional[float] = None  # α chosen on the last window, awaiting confirmation
        #: ``replay_start: "snapshot"``: the cache sets this to its ``export_tree``
        self.snapshot_fn: Optional[Callable[[], Any]] = None
        self._snap: Optional[tuple[int, Any]] = None  # (requests_seen when taken, snapshot)
        self._snap_due: Optional[int] = None
        if not self.fixed and config.tuner == "process":
            # spawn the worker now (a no-op job), not at the first tuning window: that
            # window does not wait for a Python start-up, and the process exists from
            # the server's start (it exits with the scheduler: one_worker_executor)
            self._executor = one_worker_executor(config.tuner, "marconi-tuner")
            self._executor.submit(int)

    # -- inputs from the cache --------------------------------------------
    @property
    def window(self) -> Optional[int]:
        return None if self.n0 is None else self.config.window_multiplier * self.n0

    def on_eviction(self) -> None:
        if self.fixed or self.n0 is not None:
            return
        self.n0 = max(1, self.requests_seen)
        self.next_tune_at = (2 if self.config.warm_start else 1) * self.window
        self._snap_due = self.next_tune_at - self.window
        logger.info("marconi: first eviction after %d requests; tuning window W=%d", self.n0, self.window)

    def on_request_finished(self, input_ids: Sequence[int], output_ids: Sequence[int]) -> None:
        self.requests_seen += 1
        if self.fixed:
            return
        self._log.append((tuple(input_ids), tuple(output_ids)))
        self.poll()
        if self.next_tune_at is not None and self.requests_seen >= self.next_tune_at:
            self._launch()
            self.next_tune_at = (self.requests_seen + self.window) if self.config.retune else None
            self._snap_due = self.requests_seen if self.next_tune_at is not None else None
        if self.snapshot_fn is not None and self._snap_due is not None and self.requests_seen >= self._snap_due:
            self._snap = (self.requests_seen, self.snapshot_fn())  # the start of the next scored window
            self._snap_due = None

    # -- tuning jobs --------------------------------------------------------
    def _launch(self) -> None:
        if self._future is not None and not self._future.done():
            self.skipped_windows += 1
            log = logger.warning if self.skipped_windows == 1 else logger.debug
            log("marconi: α tuning still running at request %d; skipping this window (%d skipped so far)",
                self.requests_seen, self.skipped_windows)
            return
        w = min(self.window, self.config.tuner_max_requests)
        log = list(self._log)
        # score_windows > 1: each α is replayed and scored over that many recent
        # windows in one run, so effects that build up over windows count
        w0 = w
        w = min(w * self.config.score_windows, max(w, len(log) - w * self.config.warmup_windows), self.config.tuner_max_requests)
        window = log[-w:]
        warm = self.config.warm_start or len(self.events) > 0 or self.skipped_windows
        k = self.config.warmup_windows
        warmup = log[-(w + k * w0) : -w] if warm else []
        snapshot = None
        if self._snap is not None and self._snap[0] == self.requests_seen - len(window):
            snapshot, warmup = self._snap[1], []  # start from the live tree as the window began
        self._snap = None
        extra = (snapshot,) if snapshot is not None else ()
        alphas = sorted(set(self.grid) | {self.alpha})
        meta = (self.requests_seen, len(window))
        if self.config.tuner == "inline":
            try:
                scores = self.replay_fn(self.spec, warmup, window, alphas, *extra)
            except Exception:  # like the off-thread modes: keep α, keep serving
                logger.exception("marconi: α tuning replay failed; keeping α=%.2f", self.alpha)
                return
            self._finish(meta, scores)
            return
        if self._executor is None:
            self._executor = one_worker_executor(self.config.tuner, "marconi-tuner")
        try:
            self._future = self._executor.submit(self.replay_fn, self.spec, warmup, window, alphas, *extra)
        except BrokenProcessPool as e:
            self._lose_process(e)
            return
        self._future_meta = meta

    def _finish(self, meta: tuple[int, int], scores: dict[float, float]) -> None:
        d = self.config.score_decay
        prev = dict(self.cum_scores)
        for a in scores:  # a value new to the grid (a raised top) starts from the old top's history
            base = prev.get(a, prev[max(prev)] if prev else 0.0)
            self.cum_scores[a] = d * base + scores[a]
        cum = {a: self.cum_scores[a] for a in scores}
        margin = self.config.switch_margin
        if self.config.confirm:
            new_alpha = self.alpha
            pending = self.pending
            if pending is not None and pending in scores and scores[pending] > scores.get(self.alpha, 0.0) * (1 + margin):
                new_alpha = pending  # chosen on the last window, confirmed on this one (not chosen on it)
            cand = choose_alpha(cum, new_alpha, margin)
            self.pending = cand if cand != new_alpha else None
        else:
            new_alpha = choose_alpha(cum, self.alpha, margin)
        top = max(self.grid)
        below = [cum[a] for a in cum if a < top]
        cap = self.config.alpha_max
        if top > 0 and below and cum[top] > max(below) and (cap is None or top * 2 <= cap):
            self.grid.append(top * 2)  # the top wins outright: try beyond it next time
        self.events.append(TuningEvent(at_request=meta[0], window=meta[1], alpha=new_alpha, scores=dict(scores)))
        logger.info("marconi: α %.2f -> %.2f (window of %d requests ending at %d)", self.alpha, new_alpha, meta[1], meta[0])
        self.alpha = new_alpha

    def poll(self) -> None:
        """Swap in the result of a finished tuning job (non-blocking)."""
        if getattr(self._executor, "_broken", False):  # a ProcessPoolExecutor whose worker died
            self._lose_process(self._executor._broken)
            return
        f = self._future
        if f is None or not f.done():
            return
        self._future = None
        try:
            scores = f.result()
        except BrokenProcessPool as e:
            self._lose_process(e)
            return
        except Exception:  # a failed replay keeps the current α; the server keeps serving
            logger.exception("marconi: α tuning replay failed; keeping α=%.2f", self.alpha)
            return
        self._finish(self._future_meta, scores)

    def _lose_process(self, why) -> None:
        """The tuner's process died (killed, out of memory): keep the current α — the
        cache keeps its order — stop tuning, log one line; the scheduler keeps serving."""
        logger.warning("marconi: α tuner process died (%s); keeping α=%.2f, no further tuning",
                       str(why).splitlines()[0][:120], self.alpha)
        self._future = None
        self.next_tune_at = None
        self._snap_due = None
        self.close()

    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until the in-flight job (if any) is done and applied (tests, replays)."""
        if self._future is not None:
            cf.wait([self._future], timeout=timeout)
            self.poll()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
