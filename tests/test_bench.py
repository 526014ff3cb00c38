"""The benchmarks (``benchmarks/bench.py``): quick mode end to end, and its timing helper and baseline."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spar_pl.sliding import SlidingWindowTeacher

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("spar_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # every section end to end, child processes included (about 50 s on 2 CPUs)
def test_quick_mode_writes_one_table_with_every_section(tmp_path):
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
    bench = load_bench()
    assert sections == set(bench.SECTIONS)
    assert all(row.count(" | ") == 4 for row in rows)  # five cells, no stray pipes
    naive = [row for row in rows if row.startswith("| 2. Naive vs ours")]
    assert len(naive) == 1 and "outputs asserted equal" in naive[0]
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["naive"]["equal"] is True
    assert data["naive"]["max_abs_diff"] <= data["naive"]["atol"] + data["naive"]["rtol"]
    assert data["overhead"]["windows"] == 36
    assert {m["window_batch"] for m in data["memory"]} == {1, 16, 64}
    assert data["cache"]["bytes_f16"] < 0.55 * data["cache"]["bytes_f32"]
    assert len(data["data_path"]["students"]) == 2


def test_measure_interleaves_and_repeats_heavy_calls_less():
    bench = load_bench()
    plan = bench.Plan(**{**bench.asdict(bench.QUICK), "repeats": 4, "heavy_repeats": 2, "heavy_s": 0.05})
    order = []
    clock = bench.Clock(torch.device("cpu"))
    fns = {"fast": lambda: order.append("fast"), "slow": lambda: (order.append("slow"), time.sleep(0.06))}
    times = bench.measure(clock, fns, plan, warmups={"slow": lambda: order.append("warm")})
    assert order[:2] == ["fast", "warm"]  # one warm-up each, the given cheap one for "slow"
    assert order[2:6] == ["fast", "slow", "fast", "slow"]  # interleaved
    assert len(times["fast"]) == 4 and len(times["slow"]) == 2
    assert min(times["slow"]) >= 0.05


def test_naive_baseline_matches_the_teacher(clip_encoder):
    bench = load_bench()
    images = torch.randn(2, 3, 100, 150)
    with torch.no_grad():
        ours = SlidingWindowTeacher(clip_encoder, crop=64, stride=24, window_batch=5)(images)
        naive = bench.naive_teacher(clip_encoder, images, 64, 24)
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)
