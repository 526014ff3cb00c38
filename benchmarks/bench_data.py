"""Sections 5 and 6: the teacher cache on disk (float16 safetensors against float32 pickles) and the data path
(images per second of the streaming DataModule against distillation steps per second)."""

from __future__ import annotations

import gc
import pickle
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_common import PAPER_CACHE_BYTES, SECTIONS, STRIDE, Bench, Clock, fmt_b, fmt_s, fmt_t, measure, med, warm_time
from bench_plans import ModelSpec


def write_photo_like_jpegs(out: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """JPEGs with about the entropy of photos: a smooth random colour field plus grain, quality 85.

    Decoding time follows the compressed size, and the flat shapes of ``spar_pl.testing.write_sample_images``
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


def cache_section(bench: Bench) -> None:
    """Section 5: float16 safetensors cache against float32 pickles, size and read throughput."""
    from spar_pl.cache import MANIFEST_KEYS, TeacherCache

    plan = bench.plan
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
    bench.add(
        SECTIONS[4],
        f"teacher features ({c}, {h}, {w}) per image, {n} images, files in the page cache",
        f"float16 safetensors (TeacherCache, checksum and manifest checked on read): {fmt_b(size16)}/image, "
        f"read {r16:.1f} images/s ({fmt_b(size16 * r16)}/s), write {n / med(times['write_f16']):.1f} images/s",
        f"float32 pickle: {fmt_b(size32)}/image, read {r32:.1f} images/s ({fmt_b(size32 * r32)}/s), write "
        f"{n / med(times['write_f32']):.1f} images/s",
        f"bytes {size16 / size32:.2f}x; read {r16 / r32:.2f}x the images/s; 25K images: {fmt_b(size16 * 25_000)} "
        f"vs {fmt_b(size32 * 25_000)} (paper: ~170 GB, {fmt_b(PAPER_CACHE_BYTES)}/image)",
    )
    bench.data["cache"] = {
        "shape": list(shape),
        "bytes_f16": size16,
        "bytes_f32": size32,
        "read_f16_images_per_s": r16,
        "read_f32_images_per_s": r32,
        **times,
    }


def data_section(bench: Bench) -> None:
    """Section 6: images/s of the streaming DataModule against distillation steps/s."""
    from spar_pl.data import DistillDataModule

    plan = bench.plan
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
    step_image = loaded[int(np.argsort(pixels)[len(pixels) // 2])].to(bench.device)
    h, w = step_image.shape[-2:]
    mean_mp = statistics.mean(pixels) / 1e6
    bench.add(
        SECTIONS[5],
        f"DistillDataModule, {len(loaded)} photo-like JPEGs of ~{plan.data_size[0]}x{plan.data_size[1]} (mean "
        f"{file_mb:.2f} MB), preset paper{' (box ' + str(plan.data_box) + ')' if plan.data_box else ''}, mode "
        "fixed, one loader process",
        f"decode + augmentation {rate:.1f} images/s (mean output {mean_mp:.2f} MPix)",
        "the distillation steps below",
        "per loader worker; workers add throughput up to the free CPU cores",
    )
    bench.data["data_path"] = {
        "loader_images_per_s": rate,
        "epoch_s": times["epoch"],
        "step_size": [h, w],
        "students": [],
    }
    for spec, crop in plan.students:
        _student_step(bench, spec, crop, step_image, rate)
        gc.collect()


def _student_step(bench: Bench, spec: ModelSpec, crop: int, step_image: torch.Tensor, rate: float) -> None:
    from spar_pl.distill import DistillModule

    plan, clock = bench.plan, bench.clock
    h, w = step_image.shape[-2:]
    torch.manual_seed(0)
    module = DistillModule(
        backbone=spec.backbone,
        model_name=spec.name,
        pretrained=None,
        crop=crop,
        stride=STRIDE,
        window_batch=plan.window_batch,
    ).to(bench.device)
    opt = module.configure_optimizers()
    normed = module.student.normalize(step_image)
    n_win = module.teacher.num_windows(h, w)
    window = normed[..., :crop, :crop]
    with torch.no_grad(), clock.precision():
        one_window = warm_time(lambda: module.teacher_features(window))
    extrapolate = bench.extrapolated(spec, n_win, one_window)

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
        targets = torch.randn(1, module.student.embed_dim, h // p, w // p, device=bench.device)
    else:
        with torch.no_grad(), clock.precision():
            targets = module.teacher_features(normed)
    fns = {"student": lambda: step(targets)}
    if not extrapolate:
        fns["full"] = lambda: step(None)
    times = measure(clock, fns, plan)
    t_student = med(times["student"])
    if extrapolate:
        per_win = bench.per_window[spec.name]
        t_full = t_student + per_win * n_win
        full_txt = f"{1 / t_full:.4f} steps/s EXTRAPOLATED (+ {n_win} windows x {fmt_s(per_win)}/window)"
    else:
        t_full = med(times["full"])
        full_txt = f"{1 / t_full:.2f} steps/s ({fmt_t(times['full'])}/step)"
    need_cached = max(1, int(np.ceil((1 / t_student) / rate)))
    need_full = max(1, int(np.ceil((1 / t_full) / rate)))
    bench.add(
        SECTIONS[5],
        f"one distillation step (MSE, backward, AdamW; trainable blk_-1,blk_-2), student {spec.label}, "
        f"{h}x{w} (median loader image), teacher {n_win} windows",
        f"teacher targets cached: {1 / t_student:.2f} steps/s ({fmt_t(times['student'])}/step)",
        f"teacher in the step: {full_txt}",
        f"loader workers to keep up: {need_cached} (cached targets), {need_full} (teacher in the step)",
    )
    bench.data["data_path"]["students"].append(
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
