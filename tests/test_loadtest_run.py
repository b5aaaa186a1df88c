"""loadtest/run.py without servers: its option errors and its summary table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("loadtest_run", Path(__file__).resolve().parents[1] / "loadtest" / "run.py")
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)


@pytest.mark.parametrize("args, message", [
    (["--replicas", "0"], "error: --replicas: '0' is not a replica count >= 1"),
    (["--replicas", "1,two"], "error: --replicas: 'two' is not a replica count >= 1"),
    (["--configs", "marconi,bogus"], "error: --configs: unknown config 'bogus'"),
])
def test_option_errors_are_one_line(args, message):
    with pytest.raises(SystemExit) as e:
        run.main(args)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_table_ratios_against_disabled_or_the_first_replica_count():
    row = lambda n, p50: {"requests": n, "failures": 0, "ttft_p50_ms": p50, "ttft_p95_ms": 2 * p50,  # noqa: E731
                          "cached_tokens": 1, "prompt_tokens": 2, "hit_ratio": 0.5}
    t = run.table({"marconi": row(30, 50.0), "disabled": row(20, 200.0)}).splitlines()
    assert "vs disabled" in t[0] and t[2].endswith("| 0.25 | 1.50 |")
    t = run.table({"marconi-x1": row(100, 80.0), "marconi-x2": row(150, 40.0)}).splitlines()
    assert "vs marconi-x1" in t[0] and t[2].endswith("| 1.00 | 1.00 |") and t[3].endswith("| 0.50 | 1.50 |")
