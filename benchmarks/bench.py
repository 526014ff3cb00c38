"""SPAR benchmarks: the sliding-window teacher, the single-pass student and the data path, side by side.

``make bench`` (or ``python benchmarks/bench.py``) prints one table and writes it to ``results/bench.md``
(plus the raw numbers to ``results/bench.json``). Every row is measured in the same run, each timing is
the median over repeats after an untimed warm-up, and the measurements of a row are interleaved repeat by
repeat so that load on the machine hits them alike. Sections:

1. Teacher overhead: sliding-window features of one image against the sum of the encoder forwards on the
   same windows alone; the fold, unfold and resize must stay under 5% of the encoder time.
2. Naive against ours: the teacher against a per-window loop with a Python fold (written below), same
   windows; the outputs are asserted equal.
3. Student against teacher: one single pass against the stride-24 sliding window (``SPAR.md`` section 5:
   about 52x for SigLIP2), with the window count behind the ratio.
4. Memory: peak memory of the teacher at 1024x2048 for window_batch 1, 16 and 64, each in a fresh process.
5. Cache: bytes per image of the float16 safetensors cache against float32 pickles, and read throughput.
6. Data path: images per second the streaming DataModule delivers against distillation steps per second.

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
import gc
import json
import logging
import os
import pickle
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spar_pl.sliding import SlidingWindowTeacher, upsample_factor, window_starts

ROOT = Path(__file__).resolve().parents[1]
STRIDE = 24
PAPER_RATIO = 52.0  # SPAR.md section 5: stride-24 sliding window vs one single pass, SigLIP2 B/16
PAPER_CACHE_BYTES = 170e9 / 25_000  # SPAR.md section 3: about 170 GB of teacher features for 25K images
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
# Plans: what each mode measures
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A dense encoder by backbone and open_clip model name, random weights."""

    backbone: str
    name: str
    label: str


@dataclass(frozen=True)
class Plan:
    """Sizes and models of one benchmark mode.

    Args:
        mode: ``full`` or ``quick``.
        repeats: timed repeats per measurement (medians are reported).
        heavy_repeats: repeats in all of a call whose first timed run takes over ``heavy_s`` seconds.
        heavy_s: that threshold.
        overhead_model: encoder of sections 1 and 2.
        overhead_size: image of sections 1 and 2 ``(H, W)``.
        window_batch: the teacher's windows per encoder call (sections 1 to 3, 6).
        compare: section 3, ``(model, sizes)`` pairs.
        max_teacher_s: on CPU, a teacher run estimated to take longer is extrapolated from the model's
            measured per-window time (``None``: measure everything).
        memory_model: encoder of section 4.
        memory_size: image of section 4.
        memory_batches: window batches of section 4.
        memory_real_chunks: on CPU, chunks that run the real encoder in section 4 (the others replay its
            output; ``None``: all real).
        memory_contrast: a smaller image and window batch, to show what the image size adds.
        memory_parallel: run the memory processes side by side (quick mode) rather than one at a time.
        cache_shape: teacher features of one image ``(C, h, w)``, section 5.
        cache_entries: images written and read, section 5.
        data_images: photo-like JPEGs generated for section 6.
        data_size: their nominal size ``(H, W)``.
        data_box: augmentation box override (``None``: the paper's).
        data_min_side: augmentation minimum side override.
        students: section 6 students ``(spec, crop)``.
    """

    mode: str
    repeats: int
    heavy_repeats: int
    heavy_s: float
    overhead_model: ModelSpec
    overhead_size: tuple[int, int]
    window_batch: int
    compare: tuple[tuple[ModelSpec, tuple[tuple[int, int], ...]], ...]
    max_teacher_s: float | None
    memory_model: ModelSpec
    memory_size: tuple[int, int]
    memory_batches: tuple[int, ...]
    memory_real_chunks: int | None
    memory_contrast: tuple[tuple[int, int], int]
    memory_parallel: bool
    cache_shape: tuple[int, int, int]
    cache_entries: int
    data_images: int
    data_size: tuple[int, int]
    data_box: tuple[int, int] | None
    data_min_side: int | None
    students: tuple[tuple[ModelSpec, int], ...]
    precision_model: ModelSpec | None = None
    precision_single: tuple[int, int] = (512, 1024)
    precision_teacher: tuple[int, int] = (256, 512)
    head_model: ModelSpec | None = None
    head_sizes: tuple[tuple[int, int], ...] = ((1024, 2048),)
    head_classes: str = "ade20k"


CLIP_B16 = ModelSpec("maskclip", "ViT-B-16", "MaskCLIP ViT-B/16 @224")
SIGLIP2_B16 = ModelSpec("siglip2", "ViT-B-16-SigLIP2-512", "SigLIP2 ViT-B/16 @512")
TINY_CLIP = ModelSpec("maskclip", "spar-tiny-clip", "tiny CLIP @64")
TINY_SL2 = ModelSpec("siglip2", "spar-tiny-sl2", "tiny SigLIP2 @64")

FULL = Plan(
    mode="full",
    repeats=3,
    heavy_repeats=2,
    heavy_s=20.0,
    overhead_model=CLIP_B16,
    overhead_size=(256, 512),
    window_batch=16,
    compare=((SIGLIP2_B16, ((512, 1024), (1024, 2048))), (CLIP_B16, ((512, 1024),))),
    max_teacher_s=60.0,
    memory_model=CLIP_B16,
    memory_size=(1024, 2048),
    memory_batches=(1, 16, 64),
    memory_real_chunks=2,
    memory_contrast=((512, 1024), 16),
    memory_parallel=False,
    cache_shape=(768, 64, 128),  # SigLIP2 ViT-B/16 features of a 1024x2048 image
    cache_entries=8,
    data_images=24,
    data_size=(1500, 2000),  # SA-1B-like sources
    data_box=None,
    data_min_side=None,
    students=((TINY_SL2, 64), (CLIP_B16, 224)),
    precision_model=CLIP_B16,
    head_model=SIGLIP2_B16,
    head_sizes=((1024, 2048), (2048, 4096)),  # the chunk budget binds at both: the difference is per-pixel state
)

QUICK = Plan(
    mode="quick",
    repeats=3,
    heavy_repeats=2,
    heavy_s=20.0,
    overhead_model=TINY_CLIP,
    overhead_size=(128, 256),
    window_batch=16,
    compare=((TINY_SL2, ((128, 256), (256, 512))), (TINY_CLIP, ((128, 256),))),
    max_teacher_s=None,
    memory_model=TINY_CLIP,
    memory_size=(256, 512),
    memory_batches=(1, 16, 64),
    memory_real_chunks=None,
    memory_contrast=((128, 256), 16),
    memory_parallel=True,
    cache_shape=(768, 16, 32),
    cache_entries=4,
    data_images=4,
    data_size=(300, 400),
    data_box=(256, 128),
    data_min_side=64,
    students=((TINY_SL2, 64), (TINY_CLIP, 64)),
    precision_model=TINY_CLIP,
    precision_single=(256, 512),
    precision_teacher=(128, 256),
    head_model=TINY_SL2,
    head_sizes=((512, 1024), (1024, 2048)),
)


# ---------------------------------------------------------------------------------------------------------
# Timing
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


# ---------------------------------------------------------------------------------------------------------
# Models and encoder wrappers
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


class TimedEncoder(nn.Module):
    """An encoder whose forward calls are timed (and optionally their outputs kept).

    Args:
        encoder: the wrapped dense encoder.
        clock: the run's clock.
    """

    def __init__(self, encoder: nn.Module, clock: Clock) -> None:
        super().__init__()
        self.encoder = encoder
        self.clock = clock
        self.patch_size = encoder.patch_size
        self.native_size = encoder.native_size
        self.spans: list[tuple] = []
        self.outputs: list[torch.Tensor] = []
        self.keep = False

    def reset(self, keep: bool = False) -> None:
        """Forget the recorded calls; ``keep`` records the outputs of the next calls."""
        self.spans, self.outputs, self.keep = [], [], keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = self.clock.mark()
        y = self.encoder(x)
        self.spans.append((start, self.clock.mark()))
        if self.keep:
            self.outputs.append(y)
        return y


class ReplayEncoder(nn.Module):
    """Returns recorded encoder outputs in call order: the teacher without the encoder's cost.

    Args:
        outputs: the outputs of one teacher run, in call order.
        patch_size: the encoder's patch size.
        native_size: the encoder's native crop.
    """

    def __init__(self, outputs: list[torch.Tensor], patch_size: int, native_size: int) -> None:
        super().__init__()
        self.outputs, self.patch_size, self.native_size = outputs, patch_size, native_size
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.outputs[self.calls % len(self.outputs)]
        self.calls += 1
        return out


class PartialEncoder(nn.Module):
    """Runs the real encoder for the first ``real`` calls, then replays its last output (memory runs on CPU).

    The teacher still extracts, folds and averages every window; only the later encoder calls are skipped.
    """

    def __init__(self, encoder: nn.Module, real: int) -> None:
        super().__init__()
        self.encoder, self.real = encoder, real
        self.patch_size, self.native_size = encoder.patch_size, encoder.native_size
        self.calls = 0
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls <= self.real or self.last is None or self.last.shape[0] < x.shape[0]:
            self.last = self.encoder(x)
            return self.last
        return self.last[: x.shape[0]]


def write_photo_like_jpegs(out: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """JPEGs with about the entropy of photos: a smooth random colour field plus grain, quality 85.

    Decoding time follows the compressed size, and the flat shapes of ``spar_pl.data.write_sample_images``
    compress about 15x better than photos (0.06 MB against 0.9 MB at 1500x2000), so they would flatter the
    data path.
    """
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        h, w = int(size[0] * rng.uniform(0.75, 1.25)), int(size[1] * rng.uniform(0.75, 1.25))
        coarse = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
        grain = rng.normal(0.0, 6.0, base.shape).astype(np.float32)
        path = out / f"photo_{i:04d}.jpg"
        Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)).save(path, quality=85)
        paths.append(path)
    return paths


def windows_of(height: int, width: int, crop: int) -> list[tuple[int, int]]:
    """The teacher's windows ``(top, left)``, row-major (``SPAR.md`` section 2)."""
    return [(t, left) for t in window_starts(height, crop, STRIDE) for left in window_starts(width, crop, STRIDE)]


def naive_teacher(encoder: nn.Module, images: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """The baseline: one encoder call per window and a Python fold onto the canvas, written plainly."""
    b, _, height, width = images.shape
    p = encoder.patch_size
    f = p // upsample_factor(p, stride)
    ch, cw = min(crop, height), min(crop, width)
    out = []
    for img in images:
        canvas = count = None
        for top in window_starts(height, crop, stride):
            for left in window_starts(width, crop, stride):
                feat = encoder(img[None, :, top : top + ch, left : left + cw])
                feat = F.interpolate(feat.float(), size=(ch // f, cw // f), mode="bilinear", align_corners=False)[0]
                if canvas is None:
                    canvas = feat.new_zeros(feat.shape[0], height // f, width // f)
                    count = feat.new_zeros(1, height // f, width // f)
                rows, cols = slice(top // f, top // f + ch // f), slice(left // f, left // f + cw // f)
                canvas[:, rows, cols] += feat
                count[:, rows, cols] += 1
        avg = (canvas / count.clamp(min=1))[None]
        out.append(F.interpolate(avg, size=(height // p, width // p), mode="bilinear", align_corners=False))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------
# Sections
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
    """Runs the sections of a plan on a device and collects the table.

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

    # -- 1 and 2 ------------------------------------------------------------------------------------------
    def teacher_sections(self) -> None:
        """Sections 1 (teacher overhead) and 2 (naive vs ours) on the same image and windows."""
        plan, clock = self.plan, self.clock
        spec = plan.overhead_model
        encoder = make_encoder(spec, self.device)
        crop = encoder.native_size
        timed = TimedEncoder(encoder, clock)
        teacher = SlidingWindowTeacher(timed, crop=crop, stride=STRIDE, window_batch=plan.window_batch).eval()
        height, width = plan.overhead_size
        image = self.image(height, width)
        windows = windows_of(height, width, crop)
        chunks = [
            torch.stack(
                [image[0, :, t : t + crop, left : left + crop] for t, left in windows[k : k + plan.window_batch]]
            )
            for k in range(0, len(windows), plan.window_batch)
        ]
        with torch.no_grad(), clock.precision():
            timed.reset(keep=True)
            ours_out = teacher(image)  # the teacher's warm-up, recording the encoder outputs for the replay run
            replay = SlidingWindowTeacher(
                ReplayEncoder(timed.outputs, encoder.patch_size, crop),
                crop=crop,
                stride=STRIDE,
                window_batch=plan.window_batch,
            )
            calls: list[list[tuple]] = []  # the encoder spans of every teacher call, warm-up first

            def run_teacher() -> None:
                timed.reset()
                teacher(image)
                calls.append(timed.spans)

            def run_encoder() -> None:
                for chunk in chunks:
                    encoder(chunk)

            naive_outs: list[torch.Tensor] = []

            def run_naive() -> None:
                naive_outs[:] = [naive_teacher(encoder, image, crop, STRIDE)]

            times = measure(
                clock,
                {"teacher": run_teacher, "encoder": run_encoder, "naive": run_naive, "replay": lambda: replay(image)},
                plan,
                warmups={"teacher": lambda: calls.append([])},  # warmed up by the recording call above
            )
            # in-run split of each timed teacher call: its total minus the time inside its encoder calls
            inside = [
                total - sum(clock.span(a, b) for a, b in spans)
                for total, spans in zip(times["teacher"], calls[1:], strict=True)
            ]
            naive_out = naive_outs[0]
        if clock.cuda:  # the timed runs are bf16: compare one more float32 run of each (TF32 off)
            with torch.no_grad(), strict_float32():
                ours_out, naive_out = teacher(image), naive_teacher(encoder, image, crop, STRIDE)
        scale = float(ours_out.abs().max())
        tol = (1e-4, 1e-4 * scale)
        torch.testing.assert_close(ours_out, naive_out, rtol=tol[0], atol=tol[1])
        max_diff = float((ours_out - naive_out).abs().max())

        t_teacher, t_enc = med(times["teacher"]), med(times["encoder"])
        t_inside, t_replay = med(inside), med(times["replay"])
        ratio_inrun, ratio_replay = t_inside / t_enc, t_replay / t_enc
        ratio = max(ratio_inrun, ratio_replay)
        self.per_window[spec.name] = t_teacher / len(windows)
        config = (
            f"{spec.label}, {height}x{width}, {len(windows)} windows, stride {STRIDE}, window_batch {plan.window_batch}"
        )
        verdict = "PASS (bound: 5%)" if ratio < OVERHEAD_LIMIT else "FAIL (bound: 5%)"
        if ratio >= OVERHEAD_LIMIT and plan.mode == "quick":
            verdict = "over the 5% bound, which is for ViT-B-sized encoders (a tiny encoder in quick mode)"
        self.add(
            SECTIONS[0],
            config,
            f"teacher {fmt_t(times['teacher'])}; fold+unfold+resize {fmt_s(t_inside)} in-run (teacher minus its "
            f"encoder calls), {fmt_s(t_replay)} alone (encoder replayed)",
            f"encoder alone on the same windows {fmt_t(times['encoder'])}",
            f"overhead {ratio_inrun:.1%} in-run, {ratio_replay:.1%} alone, of encoder time: {verdict}",
        )
        speedup = med(times["naive"]) / t_teacher
        self.add(
            SECTIONS[1],
            config,
            f"ours {fmt_t(times['teacher'])}",
            f"naive per-window loop + Python fold {fmt_t(times['naive'])}",
            f"ours {speedup:.2f}x the naive speed; outputs asserted equal in float32 (max abs diff {max_diff:.1e}, "
            f"rtol {tol[0]:g}, atol {tol[1]:.1e})",
        )
        self.data["overhead"] = {
            "windows": len(windows),
            "teacher_s": times["teacher"],
            "encoder_s": times["encoder"],
            "inrun_overhead_s": inside,
            "replay_s": times["replay"],
            "ratio_inrun": ratio_inrun,
            "ratio_replay": ratio_replay,
            "pass": ratio < OVERHEAD_LIMIT,
        }
        self.data["naive"] = {
            "naive_s": times["naive"],
            "ours_s": times["teacher"],
            "speedup": speedup,
            "equal": True,
            "max_abs_diff": max_diff,
            "rtol": tol[0],
            "atol": tol[1],
        }

    # -- 3 ------------------------------------------------------------------------------------------------
    def compare_section(self) -> None:
        """Section 3: single pass against the stride-24 sliding window."""
        self.data["student_vs_teacher"] = []
        for spec, sizes in self.plan.compare:
            self._compare_model(spec, sizes)
            gc.collect()

    def _compare_model(self, spec: ModelSpec, sizes: tuple[tuple[int, int], ...]) -> None:
        plan, clock = self.plan, self.clock
        encoder = make_encoder(spec, self.device)
        crop = encoder.native_size
        teacher = SlidingWindowTeacher(encoder, crop=crop, stride=STRIDE, window_batch=plan.window_batch).eval()
        window = self.image(crop, crop, seed=1)
        with torch.no_grad(), clock.precision():
            one_window = min(clock.time(lambda: teacher(window)) for _ in range(2))  # warm, then estimate
        for height, width in sizes:
            image = self.image(height, width)
            n_win = teacher.num_windows(height, width)
            extrapolate = self.extrapolated(spec, n_win, one_window)
            fns = {"single": lambda image=image: encoder(image)}
            warmups = {}
            if self.cpu and plan.max_teacher_s is not None:  # CPU full mode: cheap warm-ups of the same paths
                warmups["single"] = lambda: encoder(window)
                warmups["teacher"] = lambda: teacher(window)
            if not extrapolate:
                fns["teacher"] = lambda image=image: teacher(image)
            with torch.no_grad(), clock.precision():
                times = measure(clock, fns, plan, warmups)
            t_single = med(times["single"])
            if extrapolate:
                per_win = self.per_window[spec.name]
                t_teacher = per_win * n_win
                teacher_txt = (
                    f"teacher {fmt_s(t_teacher)} EXTRAPOLATED ({n_win} windows x {fmt_s(per_win)}/window measured "
                    "above)"
                )
            else:
                t_teacher = med(times["teacher"])
                self.per_window.setdefault(spec.name, t_teacher / n_win)
                teacher_txt = f"teacher {fmt_t(times['teacher'])}"
            ratio = t_teacher / t_single
            self.add(
                SECTIONS[2],
                f"{spec.label}, {height}x{width}, {n_win} windows (crop {crop}, stride {STRIDE})",
                f"single pass {fmt_t(times['single'])}",
                teacher_txt,
                f"teacher / single pass = {ratio:.1f}x (paper: ~{PAPER_RATIO:.0f}x, SigLIP2 B/16 on a GPU at its "
                "test sizes)",
            )
            self.data["student_vs_teacher"].append(
                {
                    "model": spec.name,
                    "size": [height, width],
                    "windows": n_win,
                    "single_s": times["single"],
                    "teacher_s": times.get("teacher"),
                    "teacher_extrapolated_s": t_teacher if extrapolate else None,
                    "ratio": ratio,
                }
            )

    # -- 4 ------------------------------------------------------------------------------------------------
    def memory_section(self) -> None:
        """Section 4: peak memory of the teacher per window batch, each in a fresh process."""
        plan = self.plan
        real = plan.memory_real_chunks if self.cpu else None
        jobs = [(plan.memory_size, wb) for wb in plan.memory_batches] + [plan.memory_contrast]
        jobs = [
            {
                "backbone": plan.memory_model.backbone,
                "name": plan.memory_model.name,
                "size": list(size),
                "window_batch": wb,
                "real_chunks": real,
                "device": str(self.device),
            }
            for size, wb in jobs
        ]
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-child"]
        results = []
        # quick mode: children side by side (memory is per process); full mode: one at a time, all cores each
        for group in [jobs] if plan.memory_parallel else [[job] for job in jobs]:
            procs = [
                subprocess.Popen([*command, json.dumps(job)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for job in group
            ]
            for proc in procs:
                out, err = proc.communicate()
                lines = [ln for ln in out.splitlines() if ln.startswith("{")]
                if proc.returncode != 0 or not lines:
                    raise RuntimeError(f"memory child failed ({proc.returncode}):\n{out}\n{err}")
                results.append(json.loads(lines[-1]))
        how = (
            "process peak RSS minus RSS before the call, fresh process, one-window warm-up"
            if self.cpu
            else "torch.cuda.max_memory_allocated minus memory allocated before the call, one-window warm-up"
        )
        *main, contrast = results
        for res in results:
            part = (
                f"; the encoder runs for real on the first {res['real_chunks']} chunks, later chunks replay its output "
                "(crops, fold and canvas over all windows)"
                if res["real_chunks"]
                else ""
            )
            height, width = res["size"]
            all_crops = res["windows"] * 3 * res["crop"] ** 2 * 4
            if res is contrast:
                twin = next(r for r in main if r["window_batch"] == res["window_batch"])
                big_h, big_w = twin["size"]
                grow = twin["peak_bytes"] - res["peak_bytes"]
                result = (
                    f"{big_h}x{big_w} ({big_h * big_w // (height * width)}x the pixels), same window_batch: peak "
                    f"{'+' if grow >= 0 else '-'}{fmt_b(abs(grow))}, while the output canvas alone grows by "
                    f"{fmt_b(twin['canvas_bytes'] - res['canvas_bytes'])}"
                    + ("" if res["device"] != "cpu" else " (RSS is coarse: freed memory is reused)")
                )
            else:
                result = f"peak minus output canvas: {fmt_b(res['peak_bytes'] - res['canvas_bytes'])}"
            self.add(
                SECTIONS[3],
                f"{plan.memory_model.label}, {height}x{width}, {res['windows']} windows, window_batch "
                f"{res['window_batch']}{part}",
                f"peak {fmt_b(res['peak_bytes'])} ({how})",
                f"output canvas {fmt_b(res['canvas_bytes'])}; one chunk of crops {fmt_b(res['chunk_bytes'])}; all "
                f"crops at once would be {fmt_b(all_crops)}",
                result,
            )
        self.data["memory"] = results

    # -- 5 ------------------------------------------------------------------------------------------------
    def cache_section(self) -> None:
        """Section 5: float16 safetensors cache against float32 pickles, size and read throughput."""
        from spar_pl.cache import MANIFEST_KEYS, TeacherCache

        plan = self.plan
        shape = plan.cache_shape
        n = plan.cache_entries
        gen = torch.Generator().manual_seed(0)
        feats = [torch.randn(*shape, generator=gen) for _ in range(n)]
        with tempfile.TemporaryDirectory() as tmp:
            cache = TeacherCache(Path(tmp) / "f16", {k: "bench" for k in MANIFEST_KEYS})
            pickles = Path(tmp) / "f32"
            pickles.mkdir()

            def write_cache() -> None:
                for i, f in enumerate(feats):
                    cache.save(f"img{i}", "bench", f)

            def write_pickle() -> None:
                for i, f in enumerate(feats):
                    with (pickles / f"img{i}.pkl").open("wb") as fh:
                        pickle.dump(f.numpy().astype(np.float32), fh, protocol=pickle.HIGHEST_PROTOCOL)

            def read_cache() -> None:
                for i in range(n):
                    if cache.load(f"img{i}", "bench", shape[1:]) is None:
                        raise RuntimeError("cache entry rejected")

            def read_pickle() -> None:
                for i in range(n):
                    with (pickles / f"img{i}.pkl").open("rb") as fh:
                        torch.from_numpy(pickle.load(fh))

            wall = Clock(torch.device("cpu"))
            times = measure(
                wall,
                {"write_f16": write_cache, "write_f32": write_pickle, "read_f16": read_cache, "read_f32": read_pickle},
                plan,
            )
            size16 = statistics.mean(cache.path(f"img{i}").stat().st_size for i in range(n))
            size32 = statistics.mean((pickles / f"img{i}.pkl").stat().st_size for i in range(n))
        r16, r32 = n / med(times["read_f16"]), n / med(times["read_f32"])
        c, h, w = shape
        self.add(
            SECTIONS[4],
            f"teacher features ({c}, {h}, {w}) per image, {n} images, files in the page cache",
            f"float16 safetensors (TeacherCache, checksum and manifest checked on read): {fmt_b(size16)}/image, "
            f"read {r16:.1f} images/s ({fmt_b(size16 * r16)}/s), write {n / med(times['write_f16']):.1f} images/s",
            f"float32 pickle: {fmt_b(size32)}/image, read {r32:.1f} images/s ({fmt_b(size32 * r32)}/s), write "
            f"{n / med(times['write_f32']):.1f} images/s",
            f"bytes {size16 / size32:.2f}x; read {r16 / r32:.2f}x the images/s; 25K images: {fmt_b(size16 * 25_000)} "
            f"vs {fmt_b(size32 * 25_000)} (paper: ~170 GB, {fmt_b(PAPER_CACHE_BYTES)}/image)",
        )
        self.data["cache"] = {
            "shape": list(shape),
            "bytes_f16": size16,
            "bytes_f32": size32,
            "read_f16_images_per_s": r16,
            "read_f32_images_per_s": r32,
            **times,
        }

    # -- 6 ------------------------------------------------------------------------------------------------
    def data_section(self) -> None:
        """Section 6: images/s of the streaming DataModule against distillation steps/s."""
        from spar_pl.data import DistillDataModule

        plan = self.plan
        with tempfile.TemporaryDirectory() as tmp:
            files = write_photo_like_jpegs(Path(tmp) / "images", plan.data_images, plan.data_size)
            file_mb = statistics.mean(f.stat().st_size for f in files) / 1e6
            dm = DistillDataModule(
                train_source=str(Path(tmp) / "images"),
                preset="paper",
                box=plan.data_box,
                min_side=plan.data_min_side,
                mode="fixed",
                num_workers=0,
                seed=0,
            )
            dm.setup("fit")
            loaded: list[torch.Tensor] = []
            epoch = iter(range(10_000))

            def one_epoch() -> None:
                dm.set_epoch(next(epoch))
                loaded[:] = [batch["image"] for batch in dm.train_dataloader()]

            wall = Clock(torch.device("cpu"))
            times = measure(wall, {"epoch": one_epoch}, plan)
        rate = len(loaded) / med(times["epoch"])
        pixels = [img.shape[-2] * img.shape[-1] for img in loaded]
        step_image = loaded[int(np.argsort(pixels)[len(pixels) // 2])].to(self.device)
        h, w = step_image.shape[-2:]
        mean_mp = statistics.mean(pixels) / 1e6
        self.add(
            SECTIONS[5],
            f"DistillDataModule, {len(loaded)} photo-like JPEGs of ~{plan.data_size[0]}x{plan.data_size[1]} (mean "
            f"{file_mb:.2f} MB), preset paper{' (box ' + str(plan.data_box) + ')' if plan.data_box else ''}, mode "
            "fixed, one loader process",
            f"decode + augmentation {rate:.1f} images/s (mean output {mean_mp:.2f} MPix)",
            "the distillation steps below",
            "per loader worker; workers add throughput up to the free CPU cores",
        )
        self.data["data_path"] = {
            "loader_images_per_s": rate,
            "epoch_s": times["epoch"],
            "step_size": [h, w],
            "students": [],
        }
        for spec, crop in plan.students:
            self._student_step(spec, crop, step_image, rate)
            gc.collect()

    def _student_step(self, spec: ModelSpec, crop: int, step_image: torch.Tensor, rate: float) -> None:
        from spar_pl.distill import DistillModule

        plan, clock = self.plan, self.clock
        h, w = step_image.shape[-2:]
        torch.manual_seed(0)
        module = DistillModule(
            backbone=spec.backbone,
            model_name=spec.name,
            pretrained=None,
            crop=crop,
            stride=STRIDE,
            window_batch=plan.window_batch,
        ).to(self.device)
        opt = module.configure_optimizers()
        normed = module.student.normalize(step_image)
        n_win = module.teacher.num_windows(h, w)
        window = normed[..., :crop, :crop]
        with torch.no_grad(), clock.precision():
            one_window = min(clock.time(lambda: module.teacher_features(window)) for _ in range(2))
        extrapolate = self.extrapolated(spec, n_win, one_window)

        def step(targets: torch.Tensor | None) -> None:
            with clock.precision():
                if targets is None:  # the module's own loss: teacher in the step
                    loss = module.feature_loss(step_image)
                else:
                    preds = module.student(normed)[..., : targets.shape[-2], : targets.shape[-1]]
                    loss = F.mse_loss(preds.float(), targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        p = module.student.patch_size
        if extrapolate:  # the student step does not depend on the target values
            targets = torch.randn(1, module.student.embed_dim, h // p, w // p, device=self.device)
        else:
            with torch.no_grad(), clock.precision():
                targets = module.teacher_features(normed)
        fns = {"student": lambda: step(targets)}
        if not extrapolate:
            fns["full"] = lambda: step(None)
        times = measure(clock, fns, plan)
        t_student = med(times["student"])
        if extrapolate:
            per_win = self.per_window[spec.name]
            t_full = t_student + per_win * n_win
            full_txt = f"{1 / t_full:.4f} steps/s EXTRAPOLATED (+ {n_win} windows x {fmt_s(per_win)}/window)"
        else:
            t_full = med(times["full"])
            full_txt = f"{1 / t_full:.2f} steps/s ({fmt_t(times['full'])}/step)"
        need_cached = max(1, int(np.ceil((1 / t_student) / rate)))
        need_full = max(1, int(np.ceil((1 / t_full) / rate)))
        self.add(
            SECTIONS[5],
            f"one distillation step (MSE, backward, AdamW; trainable blk_-1,blk_-2), student {spec.label}, "
            f"{h}x{w} (median loader image), teacher {n_win} windows",
            f"teacher targets cached: {1 / t_student:.2f} steps/s ({fmt_t(times['student'])}/step)",
            f"teacher in the step: {full_txt}",
            f"loader workers to keep up: {need_cached} (cached targets), {need_full} (teacher in the step)",
        )
        self.data["data_path"]["students"].append(
            {
                "model": spec.name,
                "windows": n_win,
                "cached_step_s": times["student"],
                "full_step_s": times.get("full"),
                "full_step_extrapolated_s": t_full if extrapolate else None,
                "workers_cached": need_cached,
                "workers_full": need_full,
            }
        )

    # -- 7 ------------------------------------------------------------------------------------------------
    def precision_section(self) -> None:
        """Section 7: float32 against bf16 autocast, single pass and sliding-window teacher, time and error."""
        plan, clock = self.plan, self.clock
        spec = plan.precision_model
        encoder = make_encoder(spec, self.device)
        teacher = SlidingWindowTeacher(encoder, stride=STRIDE, window_batch=plan.window_batch).eval()
        results = {}
        for what, run, size in (
            ("single pass", encoder, plan.precision_single),
            ("teacher", teacher, plan.precision_teacher),
        ):
            image = self.image(*size)
            outputs = {}

            def call(precision: str, run=run, image=image, outputs=outputs) -> None:
                ctx = (
                    contextlib.nullcontext()
                    if precision == "float32"
                    else torch.autocast(self.device.type, torch.bfloat16)
                )
                with torch.no_grad(), strict_float32(), ctx:
                    outputs[precision] = run(image).float()

            times = measure(clock, {p: (lambda p=p: call(p)) for p in ("float32", "bf16")}, plan)
            ref, low = outputs["float32"], outputs["bf16"]
            error = float((low - ref).norm() / ref.norm())
            speed = med(times["float32"]) / med(times["bf16"])
            windows = f", {teacher.num_windows(*size)} windows" if run is teacher else ""
            self.add(
                SECTIONS[6],
                f"{spec.label}, {what}, {size[0]}x{size[1]}{windows}",
                f"bf16 autocast {fmt_t(times['bf16'])}",
                f"float32 {fmt_t(times['float32'])}",
                f"bf16 {speed:.2f}x the float32 speed; relative feature error ||bf16 - fp32|| / ||fp32|| = {error:.1e}",
            )
            results[what] = {"speedup": speed, "relative_error": error, "size": list(size)}
        self.data["precision"] = results

    # -- 8 ------------------------------------------------------------------------------------------------
    def head_memory_section(self) -> None:
        """Section 8: peak memory of segmentation at the original size, the chunked head against the whole
        ``K x H x W`` tensor, each in a fresh process."""
        plan = self.plan
        spec = plan.head_model
        jobs = [
            {
                "kind": "head",
                "backbone": spec.backbone,
                "name": spec.name,
                "size": list(size),
                "chunked": chunked,
                "classes": plan.head_classes,
                "device": str(self.device),
            }
            for k, size in enumerate(plan.head_sizes)
            for chunked in ((True, False) if k == 0 else (True,))  # the whole tensor only at the first size
        ]
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-child"]
        results = []
        for job in jobs:
            proc = subprocess.run([*command, json.dumps(job)], capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                results.append({**job, "failed": proc.returncode, "peak_bytes": None})
                continue
            results.append(json.loads(lines[-1]))
        budget = 24e9
        for size in plan.head_sizes[:1]:
            new, old = (
                next(r for r in results if r["size"] == list(size) and r["chunked"] is c) for c in (True, False)
            )
            k = new.get("classes_count", "?")
            old_text = fmt_b(old["peak_bytes"]) if old["peak_bytes"] else f"failed (exit {old['failed']})"
            self.add(
                SECTIONS[7],
                f"{spec.label} features, {k} classes ({plan.head_classes}), mask and float16 probabilities at "
                f"{size[0]}x{size[1]} (probabilities written to a file)",
                f"chunked head: peak {fmt_b(new['peak_bytes'])} (peak RSS minus RSS before, fresh process)",
                f"whole K x H x W float32 tensor (the previous head): peak {old_text}",
                f"{old['peak_bytes'] / new['peak_bytes']:.1f}x less memory" if old["peak_bytes"] else "chunked only",
            )
        small, large = (next(r for r in results if r["size"] == list(s) and r["chunked"]) for s in plan.head_sizes[:2])
        px = [s[0] * s[1] for s in plan.head_sizes[:2]]
        per_px = (large["peak_bytes"] - small["peak_bytes"]) / (px[1] - px[0])
        fixed = small["peak_bytes"] - per_px * px[0]
        if per_px > 0:
            largest = (budget - fixed - large.get("base_bytes", 0)) / per_px
            self.add(
                SECTIONS[7],
                f"{spec.label}, chunked head, {plan.head_classes}: the largest image in 24 GB",
                f"{per_px:.0f} bytes per pixel above a fixed {fmt_b(fixed)} (from the two sizes above)",
                f"24 GB minus the process before the call ({fmt_b(large.get('base_bytes', 0))})",
                f"about {largest / 1e6:.0f} MP, e.g. {int((largest / 2) ** 0.5)}x{int((largest * 2) ** 0.5)} "
                "EXTRAPOLATED (linear in pixels; the encoder's own memory at that size is not included)",
            )
        self.data["head_memory"] = results

    def run(self) -> None:
        """All sections, in order."""
        self.teacher_sections()
        self.compare_section()
        self.memory_section()
        self.cache_section()
        self.data_section()
        self.precision_section()
        self.head_memory_section()


# ---------------------------------------------------------------------------------------------------------
# Memory child process
# ---------------------------------------------------------------------------------------------------------


def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {key}")
    return int(match.group(1))


def head_memory_child(job: dict) -> dict:
    """Peak memory of segmenting one image's features at its size (mask and float16 probabilities to a file)."""
    from spar_pl.fileio import safetensors_writer
    from spar_pl.openvocab import OpenVocabHead

    device = torch.device(job["device"])
    encoder = make_encoder(ModelSpec(job["backbone"], job["name"], job["name"]), device)
    head = OpenVocabHead(encoder, job["classes"])
    text = F.normalize(torch.randn(len(head.synonyms), encoder.embed_dim), dim=1).to(device)
    head._text_cache[(device, torch.float32)] = text  # random text: memory does not depend on it
    height, width = job["size"]
    p = encoder.patch_size
    feats = torch.randn(1, encoder.embed_dim, -(-height // p), -(-width // p), device=device)
    out = Path(tempfile.mkdtemp()) / "probs.safetensors"
    gc.collect()
    base = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    with torch.no_grad():
        if job["chunked"]:
            shape = (head.num_classes, height, width)
            with safetensors_writer(out, "probs", shape, torch.float16) as write:
                head.predict(feats, (height, width), probs_out=lambda k0, k1, s: write(s[0].half()))
        else:
            from spar_pl.fileio import save_safetensors

            scores = head(feats, (height, width))
            head.mask(scores)
            save_safetensors({"probs": scores[0].half()}, out)
    peak = (_status_kb("VmHWM") - base) * 1024
    out.unlink()
    return {**job, "peak_bytes": peak, "base_bytes": base * 1024, "classes_count": head.num_classes}


def memory_child(job: dict) -> dict:
    """Peak memory of one teacher call in this (fresh) process; printed as JSON by ``--memory-child``."""
    if job.get("kind") == "head":
        return head_memory_child(job)
    device = torch.device(job["device"])
    spec = ModelSpec(job["backbone"], job["name"], job["name"])
    encoder = make_encoder(spec, device)
    crop = encoder.native_size
    wrapped = PartialEncoder(encoder, job["real_chunks"]) if job["real_chunks"] else encoder
    teacher = SlidingWindowTeacher(wrapped, crop=crop, stride=STRIDE, window_batch=job["window_batch"]).eval()
    height, width = job["size"]
    image = torch.randn(1, 3, height, width, device=device)
    clock = Clock(device)
    with torch.no_grad(), clock.precision():
        teacher(image[..., :crop, :crop])  # one-window warm-up: library set-up is not the teacher's memory
    if isinstance(wrapped, PartialEncoder):
        wrapped.calls, wrapped.last = 0, None
    gc.collect()
    with torch.no_grad(), clock.precision():
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = teacher(image)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            base = _status_kb("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
            out = teacher(image)
            peak = (_status_kb("VmHWM") - base) * 1024
    f = teacher.cell
    return {
        "size": [height, width],
        "device": device.type,
        "window_batch": job["window_batch"],
        "windows": teacher.num_windows(height, width),
        "crop": crop,
        "real_chunks": job["real_chunks"],
        "peak_bytes": peak,
        "canvas_bytes": out.shape[1] * (height // f) * (width // f) * 4,
        "chunk_bytes": min(job["window_batch"], teacher.num_windows(height, width)) * 3 * crop * crop * 4,
    }


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


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
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and write the table."""
    args = parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(memory_child(json.loads(args.memory_child))), flush=True)
        return 0
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    plan = QUICK if args.quick else FULL
    if args.repeats is not None:
        plan = Plan(**{**asdict(plan), "repeats": args.repeats})
    device = pick_device(args.device)
    bench = Bench(plan, device)
    for name, section in (
        ("teacher overhead, naive vs ours", bench.teacher_sections),
        ("student vs teacher", bench.compare_section),
        ("memory", bench.memory_section),
        ("cache", bench.cache_section),
        ("data path", bench.data_section),
        ("precision", bench.precision_section),
        ("head memory", bench.head_memory_section),
    ):
        t0 = time.perf_counter()
        section()
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
