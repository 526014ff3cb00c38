"""Sections 4 and 8: peak memory of the teacher per window batch and of the segmentation head, each measured in a
fresh process (this file run as a script with one JSON job: ``python bench_memory.py '{...}'``)."""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import SECTIONS, STRIDE, Bench, Clock, fmt_b, make_encoder
from bench_plans import ModelSpec
from torch import nn

from spar_pl.sliding import SlidingWindowTeacher


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


def memory_section(bench: Bench) -> None:
    """Section 4: peak memory of the teacher per window batch, each in a fresh process."""
    plan = bench.plan
    real = plan.memory_real_chunks if bench.cpu else None
    jobs = [(plan.memory_size, wb) for wb in plan.memory_batches] + [plan.memory_contrast]
    jobs = [
        {
            "backbone": plan.memory_model.backbone,
            "name": plan.memory_model.name,
            "size": list(size),
            "window_batch": wb,
            "real_chunks": real,
            "device": str(bench.device),
        }
        for size, wb in jobs
    ]
    command = [sys.executable, str(Path(__file__).resolve())]
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
        if bench.cpu
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
        bench.add(
            SECTIONS[3],
            f"{plan.memory_model.label}, {height}x{width}, {res['windows']} windows, window_batch "
            f"{res['window_batch']}{part}",
            f"peak {fmt_b(res['peak_bytes'])} ({how})",
            f"output canvas {fmt_b(res['canvas_bytes'])}; one chunk of crops {fmt_b(res['chunk_bytes'])}; all "
            f"crops at once would be {fmt_b(all_crops)}",
            result,
        )
    bench.data["memory"] = results


def head_memory_section(bench: Bench) -> None:
    """Section 8: peak memory of segmentation at the original size, the chunked head against the whole
    ``K x H x W`` tensor, each in a fresh process."""
    plan = bench.plan
    spec = plan.head_model
    jobs = [
        {
            "kind": "head",
            "backbone": spec.backbone,
            "name": spec.name,
            "size": list(size),
            "chunked": chunked,
            "classes": plan.head_classes,
            "device": str(bench.device),
        }
        for k, size in enumerate(plan.head_sizes)
        for chunked in ((True, False) if k == 0 else (True,))  # the whole tensor only at the first size
    ]
    command = [sys.executable, str(Path(__file__).resolve())]
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
        new, old = (next(r for r in results if r["size"] == list(size) and r["chunked"] is c) for c in (True, False))
        k = new.get("classes_count", "?")
        old_text = fmt_b(old["peak_bytes"]) if old["peak_bytes"] else f"failed (exit {old['failed']})"
        bench.add(
            SECTIONS[7],
            f"{spec.label} features, {k} classes ({plan.head_classes}), mask and float16 probabilities at "
            f"{size[0]}x{size[1]} (probabilities written to a file)",
            f"chunked head: peak {fmt_b(new['peak_bytes'])} (peak RSS minus RSS before, fresh process)",
            f"whole K x H x W float32 tensor (an unchunked head): peak {old_text}",
            f"{old['peak_bytes'] / new['peak_bytes']:.1f}x less memory" if old["peak_bytes"] else "chunked only",
        )
    small, large = (next(r for r in results if r["size"] == list(s) and r["chunked"]) for s in plan.head_sizes[:2])
    px = [s[0] * s[1] for s in plan.head_sizes[:2]]
    per_px = (large["peak_bytes"] - small["peak_bytes"]) / (px[1] - px[0])
    fixed = small["peak_bytes"] - per_px * px[0]
    if per_px > 0:
        largest = (budget - fixed - large.get("base_bytes", 0)) / per_px
        bench.add(
            SECTIONS[7],
            f"{spec.label}, chunked head, {plan.head_classes}: the largest image in 24 GB",
            f"{per_px:.0f} bytes per pixel above a fixed {fmt_b(fixed)} (from the two sizes above)",
            f"24 GB minus the process before the call ({fmt_b(large.get('base_bytes', 0))})",
            f"about {largest / 1e6:.0f} MP, e.g. {int((largest / 2) ** 0.5)}x{int((largest * 2) ** 0.5)} "
            "EXTRAPOLATED (linear in pixels; the encoder's own memory at that size is not included)",
        )
    bench.data["head_memory"] = results


# ---------------------------------------------------------------------------------------------------------
# The child process
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
    from spar_pl.openvocab import OpenVocabHead, parse_classes

    device = torch.device(job["device"])
    encoder = make_encoder(ModelSpec(job["backbone"], job["name"], job["name"]), device)
    synonyms = sum(len(names) for names in parse_classes(job["classes"]))
    text = F.normalize(torch.randn(synonyms, encoder.embed_dim), dim=1)  # random text: memory does not depend on it
    head = OpenVocabHead(text, job["classes"]).to(device)
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
    """Peak memory of one teacher call in this (fresh) process; printed as JSON when this file runs as a script."""
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


if __name__ == "__main__":
    print(json.dumps(memory_child(json.loads(sys.argv[1]))), flush=True)
