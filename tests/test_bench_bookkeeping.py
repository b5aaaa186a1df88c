"""The bookkeeping benchmark runs end to end and prints one row per cache with both clocks."""

import re

from sglang_marconi import bench_bookkeeping as bench


def test_bench_prints_every_cache_with_wall_and_thread_cpu(capsys):
    assert bench.main(["--requests", "60", "--repeats", "1", "--kv-budget", "4000", "--state-budget", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "thread CPU us" in out[1]
    rows = {line.split()[0]: line.split()[1:] for line in out[2:]}
    assert set(rows) == {"sglang-rust", "sglang-python", *bench.MARCONI_CONFIGS, *bench.MARCONI_EXPERIMENTS}
    for name, cols in rows.items():
        wall, r_rust, r_py, cpu, c_rust, c_py = cols
        assert float(wall) > 0 and float(cpu) > 0, name
        assert re.fullmatch(r"\d+\.\d\dx", r_rust) and re.fullmatch(r"\d+\.\d\dx", c_rust), name
    assert rows["sglang-rust"][1] == "1.00x" and rows["sglang-rust"][4] == "1.00x"
    assert rows["sglang-python"][2] == "1.00x" and rows["sglang-python"][5] == "1.00x"
