"""What the benchmark sections share: constants, timing, formatting, random-weight encoders, the table rows."""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from bench_plans import ModelSpec, Plan
from torch import nn
from torch.utils import benchmark

STRIDE = 24
PAPER_RATIO = 52.0  # docs/method.md section 5: stride-24 sliding window vs one single pass, SigLIP2 B/16
PAPER_CACHE_BYTES = 170e9 / 25_000  # docs/method.md section 3: about 170 GB of teacher features for 25K images
OVERHEAD_LIMIT = 0.05
SECTIONS = (
    "1. Teacher overhead",
    "2. Naive vs ours",
    "3. Student vs teacher",
    "4. Memory",
    "5. Cache",
    "6. Data path",
    "7. Precision",
    "8. Head memory",
)

logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that random-weight models have no weights

# ---------------------------------------------------------------------------------------------------------
# Timing and formatting
# ---------------------------------------------------------------------------------------------------------


class Clock:
    """Wall time on CPU; CUDA events (and bf16 autocast) on CUDA.

    Args:
        device: where the models run.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def precision(self) -> contextlib.AbstractContextManager:
        """The autocast context models run under: bf16 on CUDA, none (float32) on CPU."""
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def mark(self) -> float | torch.cuda.Event:
        """A point in time: ``perf_counter`` on CPU, a recorded CUDA event on CUDA."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def span(self, start: float | torch.cuda.Event, end: float | torch.cuda.Event) -> float:
        """Seconds between two marks (synchronises on CUDA)."""
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start

    def time(self, fn: Callable[[], object]) -> float:
        """Seconds one call of ``fn`` takes."""
        if self.cuda:
            torch.cuda.synchronize()
        start = self.mark()
        fn()
        return self.span(start, self.mark())


def measure(
    clock: Clock,
    fns: dict[str, Callable[[], object]],
    plan: Plan,
    warmups: dict[str, Callable[[], object]] | None = None,
) -> dict[str, list[float]]:
    """Time several functions side by side: one untimed warm-up each, then interleaved timed repeats.

    The warm-up of a function is ``warmups[name]`` when given (a cheaper call of the same code path, for
    runs too long to repeat on a CPU), else the function itself. A function whose first timed call took
    longer than ``plan.heavy_s`` is repeated ``plan.heavy_repeats`` times in all instead of ``plan.repeats``.
    """
    warmups = warmups or {}
    for name, fn in fns.items():
        clock.time(warmups.get(name, fn))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(plan.repeats):
        for name, fn in fns.items():
            if r >= plan.heavy_repeats and times[name][0] > plan.heavy_s:
                continue
            times[name].append(clock.time(fn))
    return times


@contextlib.contextmanager
def strict_float32() -> Iterator[None]:
    """CUDA matmuls and convolutions in full float32 (TF32 off) inside the block."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def med(values: list[float]) -> float:
    """Median."""
    return statistics.median(values)


def fmt_s(seconds: float) -> str:
    """A duration with a readable unit."""
    if seconds >= 100:
        return f"{seconds:.0f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt_t(values: list[float]) -> str:
    """Median of timings with the number of repeats."""
    return f"{fmt_s(med(values))} (n={len(values)})"


def fmt_b(num: float) -> str:
    """A byte count in MB/GB (decimal)."""
    return f"{num / 1e9:.2f} GB" if abs(num) >= 1e9 else f"{num / 1e6:.1f} MB"


def warm_time(fn: Callable[[], object]) -> float:
    """Seconds of one call of ``fn`` after ``torch.utils.benchmark``'s untimed warm-up calls (synchronised on an
    accelerator, all torch threads): a quick estimate used to plan the runs, not a reported timing."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(number=1).median


# ---------------------------------------------------------------------------------------------------------
# Random-weight encoders
# ---------------------------------------------------------------------------------------------------------


def _no_text(texts: object) -> None:
    """The tokenizer of benchmark encoders: text is never encoded."""
    raise RuntimeError("benchmark encoders are built without a tokenizer: text is not benchmarked")


def make_encoder(spec: ModelSpec, device: torch.device, seed: int = 0) -> nn.Module:
    """A random-weight dense encoder, built offline.

    open_clip picks a Gemma tokenizer (a download) for names containing "siglip", so such models are built
    directly and wrapped without a tokenizer.
    """
    import open_clip

    from spar_pl.encoders import SigLIP2Encoder, build_encoder

    torch.manual_seed(seed)
    if "siglip" in spec.name.lower():
        model = open_clip.create_model(spec.name, pretrained=None, load_weights=False)
        encoder = SigLIP2Encoder(model.eval(), tokenizer=_no_text)
        encoder.model_name = spec.name
    else:
        encoder = build_encoder(spec.backbone, spec.name, pretrained=None)
    return encoder.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One table row."""

    section: str
    config: str
    measured: str
    against: str
    result: str


class Bench:
    """What the sections share: the plan, the device and its clock, and the rows and raw numbers collected.

    Args:
        plan: what to measure.
        device: where the models run.
    """

    def __init__(self, plan: Plan, device: torch.device) -> None:
        self.plan, self.device = plan, device
        self.clock = Clock(device)
        self.rows: list[Row] = []
        self.data: dict[str, object] = {}
        self.per_window: dict[str, float] = {}  # teacher seconds per window, by model name, measured here
        self.cpu = device.type == "cpu"

    def add(self, section: str, config: str, measured: str, against: str, result: str) -> None:
        """Append a row."""
        self.rows.append(Row(section, config, measured, against, result))

    def extrapolated(self, spec: ModelSpec, windows: int, estimate: float) -> bool:
        """Whether a teacher run of ``windows`` windows is extrapolated rather than measured (CPU only).

        Args:
            spec: the model.
            windows: windows of the run.
            estimate: per-window seconds to assume when none was measured yet.
        """
        if not self.cpu or self.plan.max_teacher_s is None:
            return False
        extrapolate = self.per_window.get(spec.name, estimate) * windows > self.plan.max_teacher_s
        if extrapolate and spec.name not in self.per_window:
            raise RuntimeError(f"no measured per-window teacher time of {spec.name} to extrapolate from")
        return extrapolate

    def image(self, height: int, width: int, seed: int = 0) -> torch.Tensor:
        """A random normalised image ``(1, 3, H, W)`` on the device."""
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(1, 3, height, width, generator=gen).to(self.device)
