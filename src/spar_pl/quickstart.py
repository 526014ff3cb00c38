"""``spar-cli quickstart``: the whole feature path on one image through :func:`spar_pl.load`, then SPAR's effect.

:func:`quickstart` segments one image in a single pass and with a sliding window (``SPAR.features``,
``SPAR.segment``, ``Segmentation.save``: the road of the Python API), measures their agreement and time, and draws
them side by side (:func:`side_by_side`). With the shipped tiny model it ends with a one-seed ``reproduce-tiny``
(a short distillation, :mod:`spar_pl.reproduce`) and SPAR's student on the same image; with a tiny random model,
with the tiny distillation (:func:`distill_demo`) and the paper's table on tiny generated benchmarks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from spar_pl.encoders import ModelSpec, backbone_defaults
from spar_pl.families import backbone_family
from spar_pl.render import overlay, save_atomic
from spar_pl.runner import check_writable, config_path, lightning_cli
from spar_pl.sliding import window_starts
from spar_pl.testing import TINY_MODELS

__all__ = ["distill_demo", "quickstart", "quickstart_model", "side_by_side"]


def quickstart_model(model: ModelSpec | None = None) -> tuple[ModelSpec, bool]:
    """The model the quickstart runs, and whether it is the shipped one.

    No model named: the shipped tiny model pretrained on generated shape scenes
    (:func:`spar_pl.reproduce.shipped_spec`). A backbone alone: its tiny random twin
    (:data:`spar_pl.testing.TINY_MODELS`; with a weights file, the backbone's default model). No backbone with a
    model named in another way: the ``siglip2`` preset's.
    """
    from spar_pl.reproduce import shipped_spec

    shipped = shipped_spec(model)
    if shipped is not None:
        return shipped, True
    backbone, name = model.backbone, model.model_name
    if name is None:
        backbone = backbone or "siglip2"
        if model.weights is None:
            name = TINY_MODELS[backbone]
        else:
            name = backbone_defaults(backbone, backbone_family(backbone))["model_name"]
    return dataclasses.replace(model, backbone=backbone, model_name=name), False


def quickstart(
    model: ModelSpec | None = None,
    image: str | None = None,
    classes: list[str] | None = None,
    stride: int = 24,
    crop: int | None = None,
    out: str = "results/quickstart",
    seed: int = 0,
    distill: bool = True,
    precision: str = "32-true",
) -> dict:
    """The whole feature path on one image: single-pass and sliding-window features, their agreement, and an
    open-vocabulary segmentation written as overlay PNGs. With no model named it loads the shipped tiny model
    pretrained on generated shape scenes, segments a held-out scene and ends with a one-seed reproduce-tiny table (a
    short distillation), offline on a CPU; --backbone alone builds a tiny random model (a generated scene, the tiny
    distillation and the tiny table); pass --model-name/--pretrained/--weights and --image for real use.

    Args:
        model: the model (:func:`quickstart_model`; default: the shipped tiny pretrained model).
        image: an image file (default: a generated scene).
        classes: one class per entry; commas list synonyms (default: the scene's).
        stride: sliding-window stride.
        crop: sliding-window side (default: the model's native size).
        out: output folder: ``image.png``, ``overlay_*.png``, ``labels_*.png``, ``quickstart.png`` and the
            distillation's files.
        seed: the seed of the generated scene, the random weights and the distillation.
        distill: run the distillation and table stages after the segmentation.
        precision: ``32-true``, ``bf16-mixed`` or ``16-mixed`` (autocast of the encoder).

    Returns:
        The measured numbers (also printed): times, the features' agreement, each method's mIoU on the image when
        its labels are known, and the distillation's numbers.

    Raises:
        SystemExit: a bad class list, a model that cannot be built or an image that cannot be read (one line).
    """
    from spar_pl.api import load
    from spar_pl.openvocab import parse_classes
    from spar_pl.scenes import SHAPE_CLASSES, make_scenes, scene_image

    for option, value in (("--stride", stride), ("--crop", crop)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be a positive integer, got {value}")
    check_writable(out, "output folder (--out)")
    torch.manual_seed(seed)
    try:
        entries = [", ".join(names) for names in parse_classes(classes or SHAPE_CLASSES, 2, option="--classes")]
    except ValueError as err:
        raise SystemExit(str(err)) from err
    spec, shipped = quickstart_model(model)
    try:
        spar = load(spec, precision=precision)
        if image:  # the one image reader: EXIF, transparency, 16-bit, grayscale
            from spar_pl.images import read_image, to_pil

            picture = to_pil(read_image(image))
        elif shipped:  # a held-out scene of the kind the shipped model was pretrained on
            picture = scene_image(256, 256, seed, "quickstart")
        else:
            picture = scene_image(320, 480, seed)
    except (OSError, ValueError, RuntimeError) as err:
        raise SystemExit(str(err)) from err  # spar-cli prints it once, as "spar-cli quickstart: error: ..."
    name = spec.model_name
    print(
        f"model: {spar.backbone} / {name}"
        + (" (tiny, random weights: the masks are not meaningful)" if name in TINY_MODELS.values() else "")
        + (" (tiny, pretrained on generated shape scenes at 64 px, shipped)" if shipped else "")
    )
    side = crop or spar.encoder.default_crop
    n_windows = len(window_starts(picture.height, side, stride)) * len(window_starts(picture.width, side, stride))
    print(f"image: {picture.width}x{picture.height}; teacher: {n_windows} windows of {side}px, stride {stride}")

    # the held-out scene's own labels (scene_image draws the first scene of the same stream)
    truth = make_scenes(1, 256, seed, "quickstart")[1][0].numpy() if shipped and not image else None
    spar.features(picture)  # a warm-up call outside the timing (the first call of a model pays its set-up)
    t0 = time.perf_counter()
    single = spar.features(picture)
    t1 = time.perf_counter()
    sliding = spar.features(picture, "sliding-features", stride, crop)
    t2 = time.perf_counter()
    single = single[..., : sliding.shape[-2], : sliding.shape[-1]]
    cosine = F.cosine_similarity(single, sliding, dim=1).mean().item()
    mse = F.mse_loss(single, sliding).item()
    out = Path(out)
    save_atomic(picture, out / "image.png")  # the input, to segment again with spar-cli segment
    masks, names = {}, []
    for tag, mode in (("single", "single"), ("sliding", "sliding-features")):
        result = spar.segment(picture, entries, mode, stride, crop)
        result.save(out, tag, name="{kind}_{stem}")
        masks[tag], names = result.mask, result.classes
    numbers = {
        "single_pass_s": t1 - t0,
        "sliding_window_s": t2 - t1,
        "slowdown": (t2 - t1) / max(t1 - t0, 1e-9),
        "feature_cosine": cosine,
        "feature_mse": mse,
    }
    print(
        f"features: single pass {tuple(single.shape)} in {numbers['single_pass_s']:.3f}s, sliding window "
        f"{tuple(sliding.shape)} in {numbers['sliding_window_s']:.3f}s ({numbers['slowdown']:.1f}x)"
    )
    print(f"single pass vs sliding window: mean cosine {cosine:.3f}, MSE {mse:.4f}")
    print(f"wrote {out}/overlay_single.png, overlay_sliding.png, labels_single.png, labels_sliding.png")
    seconds = {"single": numbers["single_pass_s"], "sliding": numbers["sliding_window_s"]}
    if distill and shipped:
        from spar_pl.api import SPAR
        from spar_pl.reproduce import reproduce_tiny

        print("SPAR on generated scenes with the shipped model, one seed, a short distillation (make reproduce-tiny):")
        students: dict = {}
        runs = reproduce_tiny(
            out, seeds=[seed], eval_images=8, distill_steps=40, distill_batch=2, threads=None, students=students
        )
        numbers.update({f"reproduce_{k}": v for k, v in runs[seed].items()})
        student = SPAR(students[seed].to(spar.device).eval(), spar.backbone, precision=precision)
        student.features(picture)  # warm-up, as for the base model
        t0 = time.perf_counter()
        student.features(picture)
        seconds["spar"] = time.perf_counter() - t0
        result = student.segment(picture, entries)
        result.save(out, "spar", name="{kind}_{stem}")
        masks["spar"] = result.mask
        print(f"wrote {out}/overlay_spar.png, labels_spar.png")
    figure = side_by_side(picture, truth, masks, seconds, names, out / "quickstart.png")
    numbers.update({f"image_mIoU_{k}": v for k, v in figure.items()})
    scores = ", ".join(f"{k} mIoU {v:.1f}" for k, v in figure.items())
    print(f"wrote {out}/quickstart.png" + (f" ({scores})" if scores else ""))
    if distill and not shipped:
        numbers.update(distill_demo(out / "distill"))
        from spar_pl.table import table_tiny

        print("the paper's table on tiny generated benchmarks (make table-tiny):")
        numbers["table"] = table_tiny(out)
    return numbers


def side_by_side(
    image: Image.Image,
    truth: np.ndarray | None,
    masks: dict[str, np.ndarray],
    seconds: dict[str, float],
    names: Sequence[str],
    path: Path,
) -> dict[str, float]:
    """The quickstart's picture: the image, its ground truth (when known) and each method's mask side by side, each
    titled with its mIoU on this image (when the truth is known) and its time. Returns the mIoU per method."""
    from torchmetrics.functional.classification import multiclass_jaccard_index

    from spar_pl.render import panel_figure

    titles = {"single": "single pass", "sliding": "sliding window", "spar": "SPAR (distilled single pass)"}
    panels = [("image", image)]
    scores: dict[str, float] = {}
    if truth is not None:
        panels.append(("ground truth", overlay(image, np.asarray(truth), names)))
    for tag, mask in masks.items():
        title = f"{titles[tag]}\n{seconds[tag]:.3f} s"
        if truth is not None:
            pred, target = torch.as_tensor(mask).long(), torch.as_tensor(np.asarray(truth)).long()
            scores[tag] = 100 * float(multiclass_jaccard_index(pred, target, len(names), ignore_index=255))
            title = f"{titles[tag]}\nmIoU {scores[tag]:.1f}, {seconds[tag]:.3f} s"
        panels.append((title, overlay(image, mask, names)))
    panel_figure(panels, path)
    return scores


def distill_demo(root: Path) -> dict[str, float]:
    """The tiny distillation (``configs/distill/tiny.yaml``) on generated images: held-out student-vs-teacher
    feature MSE before and after ``fit``."""
    from spar_pl.testing import write_sample_images

    config = config_path("distill/tiny.yaml")
    write_sample_images(root / "data" / "train", 12, seed=0)
    write_sample_images(root / "data" / "val", 4, seed=1)
    cli = lightning_cli(
        [
            "--config",
            str(config),
            "--data.init_args.train_source",
            str(root / "data" / "train"),
            "--data.init_args.val_source",
            str(root / "data" / "val"),
            "--trainer.default_root_dir",
            str(root),
        ],
        run=False,
    )
    print("distillation (tiny config): held-out feature MSE before training")
    before = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]["val/loss"]
    cli.trainer.fit(cli.model, cli.datamodule)
    after = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]["val/loss"]
    print(
        f"held-out student-vs-teacher feature MSE: before {before:.3e}, after {after:.3e} ({after / before:.2f}x); "
        f"checkpoints and metrics.csv under {root}"
    )
    return {"heldout_mse_before": before, "heldout_mse_after": after}
