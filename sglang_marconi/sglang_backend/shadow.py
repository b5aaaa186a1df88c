"""Shadow caches for ``utility_form: "leader"`` (``policy/leader.py``).

One tensor-free :class:`MarconiRadixCache` per eviction order — recency (the
default) and hit density — with the live cache's slot counts, budgets,
admission and config otherwise, each driven by the same
:class:`~sglang_marconi.sglang_backend.driver.CacheDriver` the replay uses. Every
finished request is replayed into both, and their hit tokens go to the
:class:`~sglang_marconi.policy.leader.LeaderSelector`.

Where they run follows the config's ``tuner`` key, as the α tuner's replays
do: ``"inline"`` on the caller's thread (replays, tests: deterministic);
``"thread"`` or ``"process"`` in a one-worker executor that keeps the shadows
between jobs (a process worker holds them in a module global), fed in batches
of the requests finished since the last job; :meth:`ShadowRunner.poll` hands
back each batch's hits in order. If a job fails, the shadows are rebuilt
empty and the live order stays as it is; the server keeps serving.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import dataclasses
import logging
from typing import Optional, Sequence

from ..policy.leader import DENSITY, DENSITY_REUSE, RECENCY
from ..policy.tuner import one_worker_executor
from .tuning import TunerSpec, build_marconi_cache

logger = logging.getLogger("sglang_marconi")

#: Off-thread: finished requests queued while a batch runs, at most (a worker
#: that falls this far behind skips requests, counted and logged once).
MAX_PENDING = 4096


def expert_configs(spec: TunerSpec) -> dict:
    """The live config with each order's eviction (and no tuner of its own)."""
    base = spec.config
    out = {
        RECENCY: dataclasses.replace(base, utility_form="sum", alpha=0.0, tuner="inline"),
        DENSITY: dataclasses.replace(base, utility_form="density", density_reuse=False, tuner="inline"),
    }
    if base.leader_density_reuse:
        out[DENSITY_REUSE] = dataclasses.replace(base, utility_form="density", density_reuse=True, tuner="inline")
    return out


class ShadowCaches:
    """The shadow caches, one per order the leader follows (built on first use)."""

    def __init__(self, spec: TunerSpec):
        from .driver import CacheDriver

        self.drivers = {}
        for name, cfg in expert_configs(spec).items():
            built = build_marconi_cache(kv_slots=spec.kv_slots, mamba_slots=spec.mamba_slots, config=cfg,
                                        profile=spec.profile)
            self.drivers[name] = CacheDriver(built, kv_budget=spec.kv_budget, state_budget=spec.state_budget,
                                             byte_budget=spec.byte_budget)

    def feed(self, input_ids: Sequence[int], output_ids: Sequence[int]) -> dict:
        """Replay one finished request into every shadow: its hit tokens in each."""
        return {name: drv.run(input_ids, output_ids).hit_len for name, drv in self.drivers.items()}

    def density_tables(self) -> dict:
        """A copy of what each density shadow has learned (order -> its ``HitDensity``)."""
        return {name: copy.deepcopy(drv.cache.marconi.hit_density)
                for name, drv in self.drivers.items() if name != RECENCY}


_WORKER_SHADOWS: dict = {}  # in the executor's worker: key -> ShadowCaches


def _feed_batch(key: int, spec: TunerSpec, batch: Sequence[tuple]) -> list:
    sh = _WORKER_SHADOWS.get(key)
    if sh is None:
        sh = _WORKER_SHADOWS[key] = ShadowCaches(spec)
    try:
        return [sh.feed(inp, out) for inp, out in batch], sh.density_tables()
    except Exception:
        _WORKER_SHADOWS.pop(key, None)  # start over from empty shadows
        raise


class ShadowRunner:
    """Feeds finished requests to the shadows where the config says."""

    def __init__(self, spec: TunerSpec):
        self.spec = spec
        self.mode = spec.config.tuner
        self.key = id(self)
        self._inline: Optional[ShadowCaches] = None
        self._executor: Optional[cf.Executor] = None
        self._future: Optional[cf.Future] = None
        self._pending: list = []  # (input ids, output ids, live hit) not yet sent
        self._sent: list = []  # live hits of the batch in flight
        self._tables = None  # the density shadow's HitDensity after the last batch
        self.failures = 0
        self.dropped = 0

    def submit(self, input_ids: Sequence[int], output_ids: Sequence[int], live_hit: int) -> list:
        """Queue one finished request; returns the (shadow hits, live hit) pairs now available, in order."""
        if self.mode == "inline":
            if self._inline is None:
                self._inline = ShadowCaches(self.spec)
            return [(self._inline.feed(input_ids, output_ids), live_hit)]
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            if self.dropped == 1:
                logger.warning("marconi: shadow caches fell %d requests behind; skipping requests until they catch up",
                               MAX_PENDING)
        else:
            self._pending.append((tuple(input_ids), tuple(output_ids), live_hit))
        return self.poll()

    def poll(self) -> list:
        out: list = []
        f = self._future
        if f is not None and f.done():
            self._future = None
            try:
                hits, self._tables = f.result()
                out = list(zip(hits, self._sent))
            except Exception:
                self.failures += 1
                logger.exception("marconi: shadow caches failed; rebuilding them empty, keeping the current order")
            self._sent = []
        if self._future is None and self._pending:
            if self._executor is None:
                self._executor = one_worker_executor(self.mode, "marconi-shadow")
            batch = [(i, o) for i, o, _ in self._pending]
            self._sent = [h for _, _, h in self._pending]
            self._pending = []
            self._future = self._executor.submit(_feed_batch, self.key, self.spec, batch)
        return out

    def wait(self, timeout: Optional[float] = None) -> list:
        """Block until every queued request is replayed (tests); returns their results."""
        out = []
        while self._future is not None or self._pending:
            if self._future is not None:
                cf.wait([self._future], timeout=timeout)
                if not self._future.done():
                    break
            out += self.poll()
        return out

    def density_tables(self, order: str = DENSITY):
        """What ``order``'s shadow has learned, as of the results handed back so far."""
        if self._inline is not None:
            return self._inline.density_tables().get(order)
        return copy.deepcopy((self._tables or {}).get(order))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        _WORKER_SHADOWS.pop(self.key, None)  # thread mode keeps them in this process
