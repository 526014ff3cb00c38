"""The benchmarks (``benchmarks/bench.py`` and its section modules): quick mode end to end, and the timing helper."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"


@pytest.fixture
def benchmarks(monkeypatch):
    """The benchmark modules, imported as ``bench.py`` imports them (its folder on ``sys.path``)."""
    monkeypatch.syspath_prepend(str(BENCH.parent))
    return importlib.import_module("bench_common"), importlib.import_module("bench_plans")


@pytest.mark.slow  # every section end to end, child processes included (about 50 s on 2 CPUs)
def test_quick_mode_writes_one_table_with_every_section(tmp_path, benchmarks):
    out = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = out.read_text()
    assert table in proc.stdout  # printed as well as written
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| section")]
    sections = {row.split("|")[1].strip() for row in rows}
    common, _ = benchmarks
    assert sections == set(common.SECTIONS)
    assert all(row.count(" | ") == 4 for row in rows)  # five cells, no stray pipes
    naive = [row for row in rows if row.startswith("| 2. Naive vs ours")]
    assert len(naive) == 1 and "outputs asserted equal" in naive[0]
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["naive"]["max_abs_diff"] <= 2 * data["naive"]["atol"]  # atol + rtol * max|out|, atol = rtol * max|out|
    assert data["overhead"]["windows"] == 36
    assert {m["window_batch"] for m in data["memory"]} == {1, 16, 64}
    assert data["cache"]["bytes_f16"] < 0.55 * data["cache"]["bytes_f32"]
    assert len(data["data_path"]["students"]) == 2


def test_measure_interleaves_and_repeats_heavy_calls_less(benchmarks):
    common, plans = benchmarks
    plan = plans.Plan(**{**asdict(plans.QUICK), "repeats": 4, "heavy_repeats": 2, "heavy_s": 0.05})
    order = []
    clock = common.Clock(torch.device("cpu"))
    fns = {"fast": lambda: order.append("fast"), "slow": lambda: (order.append("slow"), time.sleep(0.06))}
    times = common.measure(clock, fns, plan, warmups={"slow": lambda: order.append("warm")})
    assert order[:2] == ["fast", "warm"]  # one warm-up each, the given cheap one for "slow"
    assert order[2:6] == ["fast", "slow", "fast", "slow"]  # interleaved
    assert len(times["fast"]) == 4 and len(times["slow"]) == 2
    assert min(times["slow"]) >= 0.05


def test_warm_time_warms_up_then_times_one_call(benchmarks):
    common, _ = benchmarks
    calls = []
    seconds = common.warm_time(lambda: (calls.append(1), time.sleep(0.02)))
    assert len(calls) >= 2 and 0.02 <= seconds < 1.0  # untimed warm-up calls, then one timed call
