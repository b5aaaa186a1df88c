"""Run a command and report the peak memory of its whole process tree (PSS, /proc; Linux).

    python scripts/peak_memory.py -- python -m pytest -q tests/test_live_marconi.py

Every 0.5 s it sums the proportional set size (``Pss`` in ``/proc/<pid>/smaps_rollup``:
shared pages split between the processes that map them) of the command and all its
descendants — including SGLang servers started in their own sessions — and prints the
peak at the end (also the peak sum of RSS, which counts shared pages once per process).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def _children() -> dict:
    kids: dict = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    return kids


def tree_memory(root: int) -> tuple:
    """(PSS, RSS) in bytes of ``root`` and its descendants."""
    kids = _children()
    todo, pss, rss = [root], 0, 0
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return pss, rss


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise SystemExit("usage: peak_memory.py -- <command ...>")
    proc = subprocess.Popen(argv)
    peak_pss = peak_rss = 0
    while proc.poll() is None:
        pss, rss = tree_memory(proc.pid)
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(0.5)
    print(f"peak memory of the process tree: PSS {peak_pss / 2**30:.2f} GiB (RSS sum {peak_rss / 2**30:.2f} GiB); "
          f"exit status {proc.returncode}", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
