"""Sections 1, 2, 3 and 7: the sliding-window teacher against its encoder, against the naive per-window loop
(``spar_pl.testing.naive_teacher``), against one single pass, and float32 against bf16 autocast."""

from __future__ import annotations

import contextlib
import gc

import torch
from bench_common import (
    OVERHEAD_LIMIT,
    PAPER_RATIO,
    SECTIONS,
    STRIDE,
    Bench,
    Clock,
    fmt_s,
    fmt_t,
    make_encoder,
    measure,
    med,
    strict_float32,
    warm_time,
)
from bench_plans import ModelSpec
from torch import nn

from spar_pl.sliding import SlidingWindowTeacher, window_starts
from spar_pl.testing import naive_teacher


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


def windows_of(height: int, width: int, crop: int) -> list[tuple[int, int]]:
    """The teacher's windows ``(top, left)``, row-major (``docs/method.md`` section 2)."""
    return [(t, left) for t in window_starts(height, crop, STRIDE) for left in window_starts(width, crop, STRIDE)]


def teacher_sections(bench: Bench) -> None:
    """Sections 1 (teacher overhead) and 2 (naive vs ours) on the same image and windows."""
    plan, clock = bench.plan, bench.clock
    spec = plan.overhead_model
    encoder = make_encoder(spec, bench.device)
    crop = encoder.native_size
    timed = TimedEncoder(encoder, clock)
    teacher = SlidingWindowTeacher(timed, crop=crop, stride=STRIDE, window_batch=plan.window_batch).eval()
    height, width = plan.overhead_size
    image = bench.image(height, width)
    windows = windows_of(height, width, crop)
    chunks = [
        torch.stack([image[0, :, t : t + crop, left : left + crop] for t, left in windows[k : k + plan.window_batch]])
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
    bench.per_window[spec.name] = t_teacher / len(windows)
    config = (
        f"{spec.label}, {height}x{width}, {len(windows)} windows, stride {STRIDE}, window_batch {plan.window_batch}"
    )
    verdict = "PASS (bound: 5%)" if ratio < OVERHEAD_LIMIT else "FAIL (bound: 5%)"
    if ratio >= OVERHEAD_LIMIT and plan.mode == "quick":
        verdict = "over the 5% bound, which is for ViT-B-sized encoders (a tiny encoder in quick mode)"
    bench.add(
        SECTIONS[0],
        config,
        f"teacher {fmt_t(times['teacher'])}; fold+unfold+resize {fmt_s(t_inside)} in-run (teacher minus its "
        f"encoder calls), {fmt_s(t_replay)} alone (encoder replayed)",
        f"encoder alone on the same windows {fmt_t(times['encoder'])}",
        f"overhead {ratio_inrun:.1%} in-run, {ratio_replay:.1%} alone, of encoder time: {verdict}",
    )
    speedup = med(times["naive"]) / t_teacher
    bench.add(
        SECTIONS[1],
        config,
        f"ours {fmt_t(times['teacher'])}",
        f"naive per-window loop + Python fold {fmt_t(times['naive'])}",
        f"ours {speedup:.2f}x the naive speed; outputs asserted equal in float32 (max abs diff {max_diff:.1e}, "
        f"rtol {tol[0]:g}, atol {tol[1]:.1e})",
    )
    bench.data["overhead"] = {
        "windows": len(windows),
        "teacher_s": times["teacher"],
        "encoder_s": times["encoder"],
        "inrun_overhead_s": inside,
        "replay_s": times["replay"],
        "ratio_inrun": ratio_inrun,
        "ratio_replay": ratio_replay,
        "pass": ratio < OVERHEAD_LIMIT,
    }
    bench.data["naive"] = {
        "naive_s": times["naive"],
        "ours_s": times["teacher"],
        "speedup": speedup,
        "equal": True,
        "max_abs_diff": max_diff,
        "rtol": tol[0],
        "atol": tol[1],
    }


def compare_section(bench: Bench) -> None:
    """Section 3: single pass against the stride-24 sliding window."""
    bench.data["student_vs_teacher"] = []
    for spec, sizes in bench.plan.compare:
        _compare_model(bench, spec, sizes)
        gc.collect()


def _compare_model(bench: Bench, spec: ModelSpec, sizes: tuple[tuple[int, int], ...]) -> None:
    plan, clock = bench.plan, bench.clock
    encoder = make_encoder(spec, bench.device)
    crop = encoder.native_size
    teacher = SlidingWindowTeacher(encoder, crop=crop, stride=STRIDE, window_batch=plan.window_batch).eval()
    window = bench.image(crop, crop, seed=1)
    with torch.no_grad(), clock.precision():
        one_window = warm_time(lambda: teacher(window))  # an estimate, before the timed runs
    for height, width in sizes:
        image = bench.image(height, width)
        n_win = teacher.num_windows(height, width)
        extrapolate = bench.extrapolated(spec, n_win, one_window)
        fns = {"single": lambda image=image: encoder(image)}
        warmups = {}
        if bench.cpu and plan.max_teacher_s is not None:  # CPU full mode: cheap warm-ups of the same paths
            warmups["single"] = lambda: encoder(window)
            warmups["teacher"] = lambda: teacher(window)
        if not extrapolate:
            fns["teacher"] = lambda image=image: teacher(image)
        with torch.no_grad(), clock.precision():
            times = measure(clock, fns, plan, warmups)
        t_single = med(times["single"])
        if extrapolate:
            per_win = bench.per_window[spec.name]
            t_teacher = per_win * n_win
            teacher_txt = (
                f"teacher {fmt_s(t_teacher)} EXTRAPOLATED ({n_win} windows x {fmt_s(per_win)}/window measured above)"
            )
        else:
            t_teacher = med(times["teacher"])
            bench.per_window.setdefault(spec.name, t_teacher / n_win)
            teacher_txt = f"teacher {fmt_t(times['teacher'])}"
        ratio = t_teacher / t_single
        bench.add(
            SECTIONS[2],
            f"{spec.label}, {height}x{width}, {n_win} windows (crop {crop}, stride {STRIDE})",
            f"single pass {fmt_t(times['single'])}",
            teacher_txt,
            f"teacher / single pass = {ratio:.1f}x (paper: ~{PAPER_RATIO:.0f}x, SigLIP2 B/16 on a GPU at its "
            "test sizes)",
        )
        bench.data["student_vs_teacher"].append(
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


def precision_section(bench: Bench) -> None:
    """Section 7: float32 against bf16 autocast, single pass and sliding-window teacher, time and error."""
    plan, clock = bench.plan, bench.clock
    spec = plan.precision_model
    encoder = make_encoder(spec, bench.device)
    teacher = SlidingWindowTeacher(encoder, stride=STRIDE, window_batch=plan.window_batch).eval()
    results = {}
    for what, run, size in (
        ("single pass", encoder, plan.precision_single),
        ("teacher", teacher, plan.precision_teacher),
    ):
        image = bench.image(*size)
        outputs = {}

        def call(precision: str, run=run, image=image, outputs=outputs) -> None:
            ctx = (
                contextlib.nullcontext()
                if precision == "float32"
                else torch.autocast(bench.device.type, torch.bfloat16)
            )
            with torch.no_grad(), strict_float32(), ctx:
                outputs[precision] = run(image).float()

        times = measure(clock, {p: (lambda p=p: call(p)) for p in ("float32", "bf16")}, plan)
        ref, low = outputs["float32"], outputs["bf16"]
        error = float((low - ref).norm() / ref.norm())
        speed = med(times["float32"]) / med(times["bf16"])
        windows = f", {teacher.num_windows(*size)} windows" if run is teacher else ""
        bench.add(
            SECTIONS[6],
            f"{spec.label}, {what}, {size[0]}x{size[1]}{windows}",
            f"bf16 autocast {fmt_t(times['bf16'])}",
            f"float32 {fmt_t(times['float32'])}",
            f"bf16 {speed:.2f}x the float32 speed; relative feature error ||bf16 - fp32|| / ||fp32|| = {error:.1e}",
        )
        results[what] = {"speedup": speed, "relative_error": error, "size": list(size)}
    bench.data["precision"] = results
