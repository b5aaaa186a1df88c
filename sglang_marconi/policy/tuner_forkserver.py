"""Preloaded by the α tuner's forkserver only (``tuner.one_worker_executor``); never
imported by the scheduler.

The forkserver's parent is the scheduler. Every worker the forkserver forks starts
waiting for that scheduler to exit right after the fork, before ``multiprocessing``
re-imports the server's main module in it, and exits with it: a worker still starting
does not outlive the server. The forkserver waits for it too: it would otherwise exit
only once every holder of its pipe had (the scheduler and each worker, including one
the scheduler asked for just before it died).
"""

import os
import select
import threading
import time

_SCHEDULER = os.getppid()
try:  # readable once the scheduler has exited, reaped or not
    _SCHEDULER_FD = os.pidfd_open(_SCHEDULER)
except (AttributeError, OSError):  # no pidfd (not Linux ≥ 5.3): poll the pid
    _SCHEDULER_FD = None


def _exit_with_scheduler() -> None:
    if _SCHEDULER_FD is not None:
        select.select([_SCHEDULER_FD], [], [])
    else:
        while True:
            try:
                os.kill(_SCHEDULER, 0)
            except ProcessLookupError:
                break
            time.sleep(1.0)
    os._exit(0)


def _watch_scheduler() -> None:
    threading.Thread(target=_exit_with_scheduler, name="marconi-tuner-parent", daemon=True).start()


os.register_at_fork(after_in_child=_watch_scheduler)
_watch_scheduler()  # in the forkserver itself (a fork copies only the forking thread)
