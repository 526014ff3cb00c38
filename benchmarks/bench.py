"""SPAR benchmarks: the sliding-window teacher, the single-pass student and the data path, side by side.

``make bench`` (or ``python benchmarks/bench.py``) prints one table and writes it to ``results/bench.md``
(plus the raw numbers to ``results/bench.json``). Every row is measured in the same run, each timing is
the median over repeats after an untimed warm-up, and the measurements of a row are interleaved repeat by
repeat so that load on the machine hits them alike. Sections:

1. Teacher overhead: sliding-window features of one image against the sum of the encoder forwards on the
   same windows alone; the fold, unfold and resize must stay under 5% of the encoder time.
2. Naive against ours: the teacher against a per-window loop with a Python fold
   (``spar_pl.testing.naive_teacher``), same windows; the outputs are asserted equal.
3. Student against teacher: one single pass against the stride-24 sliding window (``docs/method.md`` section 5:
   about 52x for SigLIP2), with the window count behind the ratio.
4. Memory: peak memory of the teacher at 1024x2048 for window_batch 1, 16 and 64, each in a fresh process.
5. Cache: bytes per image of the float16 safetensors cache against float32 pickles, and read throughput.
6. Data path: images per second the streaming DataModule delivers against distillation steps per second.
7. Precision: float32 against bf16 autocast, a single pass and the teacher, time and feature error.
8. Head memory: peak memory of segmenting at the original size, the chunked head against the whole tensor.

This file runs the sections and writes the table; the sections live beside it by concern: ``bench_plans.py``
(what each mode measures), ``bench_common.py`` (timing, formatting, encoders, the rows), ``bench_teacher.py``
(sections 1, 2, 3, 7), ``bench_memory.py`` (4 and 8, each job in a fresh process) and ``bench_data.py`` (5, 6).

On CUDA the models run under bf16 autocast and are timed with CUDA events; on CPU in float32 with wall
time. Random weights throughout (timing does not depend on them); no downloads. ``--quick`` runs tiny
models at small sizes (the smoke test). The full mode keeps under 15 minutes on 2 CPU cores: on a CPU, a
teacher run estimated over a minute is extrapolated from the per-window time measured on a smaller image of
the same model (marked EXTRAPOLATED in the table), and the memory runs encode the first two chunks for real
and replay the encoder's output after them (said in the row). On CUDA everything is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

import bench_data
import bench_memory
import bench_teacher
import torch
from bench_common import STRIDE, Bench
from bench_plans import FULL, QUICK, Plan

RUNS = (  # the sections in table order, each a function of the Bench
    ("teacher overhead, naive vs ours", bench_teacher.teacher_sections),
    ("student vs teacher", bench_teacher.compare_section),
    ("memory", bench_memory.memory_section),
    ("cache", bench_data.cache_section),
    ("data path", bench_data.data_section),
    ("precision", bench_teacher.precision_section),
    ("head memory", bench_memory.head_memory_section),
)


def device_name(device: torch.device) -> str:
    """The device in words."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (bf16 autocast, CUDA events)"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = found.group(1).strip() if found else model
    return f"CPU {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (float32, wall time)"


def render(bench: Bench, started: float, load: tuple[float, float]) -> str:
    """The markdown report: a header and one table."""
    plan = bench.plan
    lines = [
        f"# spar-pl benchmarks ({plan.mode} mode)",
        "",
        f"- device: {device_name(bench.device)}; torch {torch.__version__}; Python {platform.python_version()}",
        f"- timings: median over n repeats after an untimed warm-up, measurements of a row interleaved; random "
        f"weights; stride {STRIDE}; total run {time.perf_counter() - started:.0f} s",
        f"- machine load average (1 min) at start / end: {load[0]:.2f} / {load[1]:.2f}",
        "- EXTRAPOLATED marks a number computed from a measured per-window time (CPU only; every window is "
        "measured on CUDA)",
        "",
        "| section | configuration | measured | against | result |",
        "|---|---|---|---|---|",
    ]
    for row in bench.rows:
        cells = (row.section, row.config, row.measured, row.against, row.result)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    return device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models at small sizes (the smoke test)")
    parser.add_argument("--out", default="results/bench.md", help="markdown table (the JSON goes beside it)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default: 3)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and write the table."""
    args = parse_args(argv)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    plan = QUICK if args.quick else FULL
    if args.repeats is not None:
        plan = Plan(**{**asdict(plan), "repeats": args.repeats})
    device = pick_device(args.device)
    bench = Bench(plan, device)
    for name, section in RUNS:
        t0 = time.perf_counter()
        section(bench)
        print(f"[bench] {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    report = render(bench, started, (load_start, os.getloadavg()[0]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    payload = {"mode": plan.mode, "device": device_name(device), "rows": [asdict(r) for r in bench.rows], **bench.data}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
