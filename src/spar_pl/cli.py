"""``spar-cli``: the command line.

``spar-cli fit|validate|test|predict --config ...`` is a LightningCLI (``spar-cli fit --help``);
``spar-cli export CKPT OUT`` writes a distilled student as open_clip safetensors; ``spar-cli tiny-data``
generates images for the tiny CPU config; ``spar-cli cache`` fills a teacher-feature cache; ``spar-cli table``
runs the 18 evaluations of the paper's table; ``spar-cli config`` lists or prints the shipped configs (package data:
``--config configs/...`` works from any folder); ``spar-cli models`` lists the backbone families and the models
each takes.

``spar-cli quickstart`` runs the whole feature path on one image: single-pass and sliding-window
features, their agreement, and an open-vocabulary segmentation written as overlay PNGs. With no
arguments it loads the shipped tiny model pretrained on generated shape scenes, segments a held-out scene
and ends with a one-seed ``reproduce-tiny`` table (a short distillation), offline on a CPU; ``--backbone``
alone builds a tiny random model (a generated scene, the tiny distillation and the tiny table); pass
``--model-name``/``--pretrained``/``--weights`` and ``--image`` for real use.

``spar-cli reproduce-tiny`` measures single pass vs sliding window vs SPAR on generated scenes at 4x the native
side over several seeds (``spar_pl.reproduce``); ``spar-cli pretrain-tiny`` re-creates the shipped tiny model.

``spar-cli segment IMAGE_OR_DIR... --classes road car "person, pedestrian" --out DIR`` writes overlays and label
PNGs for your images (one class per argument, commas list synonyms); ``spar-cli features IMAGE_OR_DIR... --out
DIR`` writes dense features as safetensors (``--help`` on each). ``spar-cli demo`` serves the same in the browser
(Gradio, ``pip install 'spar-pl[demo]'``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from spar_pl.encoders import backbone_defaults
from spar_pl.families import backbone_family, backbone_names
from spar_pl.images import read_image, to_pil
from spar_pl.recipes import RECIPES
from spar_pl.render import overlay, save_atomic
from spar_pl.runner import (
    check_writable,
    command_help,
    config_path,
    end_process_group,
    lightning_cli,
    packaged_configs,
    positive_int,
    self_contained_config,
)
from spar_pl.sliding import window_starts
from spar_pl.testing import TINY_MODELS

#: ``--help`` of ``--dense``.
DENSE_HELP = "the clip family's (open_clip ViT CLIPs') last-block dense recipe (default: maskclip); docs/method.md"


def quickstart(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the quickstart through :func:`spar_pl.load` (``SPAR.features``, ``SPAR.segment``, ``Segmentation.save``);
    returns the measured numbers (also printed)."""
    parser = argparse.ArgumentParser(prog="spar-cli quickstart", description=command_help(__doc__.split("\n\n")[1]))
    parser.add_argument(
        "--backbone", default=None, choices=sorted(TINY_MODELS), help="default: the shipped pretrained tiny model"
    )
    parser.add_argument("--model-name", default=None, help="open_clip name or hf-hub: id (default: tiny random)")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag")
    parser.add_argument("--weights", default=None, help="local open_clip weights file; dinov3txt: the backbone .pth")
    parser.add_argument("--head-weights", default=None, help="dinov3txt: the dino.txt head and text encoder .pth")
    parser.add_argument("--image", default=None, help="an image file (default: a generated scene)")
    parser.add_argument(
        "--classes", nargs="+", default=None, help="one class per argument; commas list synonyms (default: the scene's)"
    )
    parser.add_argument("--stride", type=int, default=24)
    parser.add_argument("--crop", type=int, default=None, help="window side (default: the model's native size)")
    parser.add_argument("--out", default="results/quickstart")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-distill", action="store_true", help="skip the tiny distillation and table stages")
    parser.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed", "16-mixed"))
    parser.add_argument("--dense", default=None, choices=RECIPES, help=DENSE_HELP)
    args = parser.parse_args(argv)
    from spar_pl.api import load
    from spar_pl.openvocab import parse_classes
    from spar_pl.scenes import SHAPE_CLASSES, scene_image

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        classes = [", ".join(names) for names in parse_classes(args.classes or SHAPE_CLASSES, 2, option="--classes")]
    except ValueError as err:
        raise SystemExit(str(err)) from err
    # No model named: the shipped tiny model pretrained on generated shape scenes (spar_pl.reproduce).
    shipped = args.backbone is None and args.model_name is None and args.weights is None and args.pretrained is None
    if shipped:
        from spar_pl.reproduce import TINY_MODEL, shipped_weights

        args.backbone, name, pretrained, weights = "maskclip", TINY_MODEL, None, shipped_weights()
    else:
        if args.model_name is None:
            args.backbone = args.backbone or "siglip2"
        name = args.model_name or (
            TINY_MODELS[args.backbone]
            if args.weights is None
            else backbone_defaults(args.backbone, backbone_family(args.backbone))["model_name"]
        )
        pretrained = args.pretrained if args.pretrained is not None else "default"
        weights = args.weights
    try:
        model = load(
            args.backbone, None, device, name, pretrained, weights, args.head_weights, args.precision, args.dense
        )
        args.backbone = model.encoder.backbone
        if args.image:  # the one image reader: EXIF, transparency, 16-bit, grayscale
            image = to_pil(read_image(args.image))
        elif shipped:  # a held-out scene of the kind the shipped model was pretrained on
            image = scene_image(256, 256, args.seed, "quickstart")
        else:
            image = scene_image(320, 480, args.seed)
    except (OSError, ValueError, RuntimeError) as err:
        raise SystemExit(str(err)) from err  # main prints it once, as "spar-cli quickstart: error: ..."
    random_weights = name in TINY_MODELS.values()
    print(
        f"model: {args.backbone} / {name}"
        + (" (tiny, random weights: the masks are not meaningful)" if random_weights else "")
        + (" (tiny, pretrained on generated shape scenes at 64 px, shipped)" if shipped else "")
    )
    crop = args.crop or model.encoder.default_crop
    n_windows = len(window_starts(image.height, crop, args.stride)) * len(window_starts(image.width, crop, args.stride))
    print(f"image: {image.width}x{image.height}; teacher: {n_windows} windows of {crop}px, stride {args.stride}")

    truth = None
    if shipped:  # the held-out scene's own labels (scene_image draws the first scene of the same stream)
        from spar_pl.scenes import make_scenes

        truth = make_scenes(1, 256, args.seed, "quickstart")[1][0].numpy()
    model.features(image)  # a warm-up call outside the timing (the first call of a model pays its set-up)
    t0 = time.perf_counter()
    single = model.features(image)
    t1 = time.perf_counter()
    sliding = model.features(image, "sliding-features", args.stride, args.crop)
    t2 = time.perf_counter()
    single = single[..., : sliding.shape[-2], : sliding.shape[-1]]
    cosine = F.cosine_similarity(single, sliding, dim=1).mean().item()
    mse = F.mse_loss(single, sliding).item()
    out = Path(args.out)
    save_atomic(image, out / "image.png")  # the input, to segment again with spar-cli segment
    masks, names = {}, []
    for tag, mode in (("single", "single"), ("sliding", "sliding-features")):
        result = model.segment(image, classes, mode, args.stride, args.crop)
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
    if not args.no_distill and shipped:
        from spar_pl.api import SPAR
        from spar_pl.reproduce import reproduce_tiny

        print("SPAR on generated scenes with the shipped model, one seed, a short distillation (make reproduce-tiny):")
        students: dict = {}
        runs = reproduce_tiny(
            out, seeds=[args.seed], eval_images=8, distill_steps=40, distill_batch=2, threads=None, students=students
        )
        numbers.update({f"reproduce_{k}": v for k, v in runs[args.seed].items()})
        student = SPAR(students[args.seed].to(model.device).eval(), args.backbone, precision=args.precision)
        student.features(image)  # warm-up, as for the base model
        t0 = time.perf_counter()
        student.features(image)
        seconds["spar"] = time.perf_counter() - t0
        result = student.segment(image, classes)
        result.save(out, "spar", name="{kind}_{stem}")
        masks["spar"] = result.mask
    figure = side_by_side(image, truth, masks, seconds, names, out / "quickstart.png")
    numbers.update({f"image_mIoU_{k}": v for k, v in figure.items()})
    print(f"wrote {out}/quickstart.png (" + ", ".join(f"{k} mIoU {v:.1f}" for k, v in figure.items()) + ")")
    if not args.no_distill and not shipped:
        numbers.update(distill_demo(out / "distill"))
        from spar_pl.table import table_tiny

        print("the paper's table on tiny generated benchmarks (make table-tiny):")
        numbers["table"] = table_tiny(out)
    return numbers


def side_by_side(
    image: Image.Image,
    truth,
    masks: dict,
    seconds: dict[str, float],
    names: Sequence[str],
    path: Path,
) -> dict[str, float]:
    """The quickstart's picture: the image, its ground truth (when known) and each method's mask side by side, each
    titled with its mIoU on this image (when the truth is known) and its time. Returns the mIoU per method."""
    import numpy as np
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


def export(argv: Sequence[str] | None = None) -> Path:
    """``spar-cli export CKPT OUT``: the model's open_clip weights from a SPAR checkpoint (a ``spar-cli fit``
    checkpoint's student, an authors' ``.ckpt``, ...) as safetensors; the file is read safely, never unpickled.
    ``spar-cli export CKPT --hub-dir DIR [--results FILE.json ...] [--push-to-hub ORG/NAME]``: a Hugging Face Hub
    model folder (open_clip's Hub files, a spar-pl config and a model card; ``spar_pl.hub``), uploaded with
    ``huggingface_hub`` when asked."""
    parser = argparse.ArgumentParser(prog="spar-cli export", description=command_help(export.__doc__))
    parser.add_argument("checkpoint", help="a SPAR checkpoint (.ckpt of spar-cli fit or of the authors)")
    parser.add_argument("out", nargs="?", default=None, help="output .safetensors file, for build_encoder(weights=...)")
    hub = parser.add_argument_group("Hugging Face Hub")
    hub.add_argument("--hub-dir", default=None, help="write a Hub model folder here (refused if it holds files)")
    hub.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="upload the Hub folder to this repo")
    hub.add_argument("--private", action="store_true", help="create the Hub repository private")
    hub.add_argument(
        "--backbone", default=None, choices=backbone_names(), help="for checkpoints recording none (the authors')"
    )
    hub.add_argument("--model-name", default=None, help="base open_clip model (default: the checkpoint's)")
    hub.add_argument("--results", nargs="+", default=[], metavar="JSON", help="spar-cli test/table results files")
    hub.add_argument("--license", default="other", help="the model card's license id (default: other)")
    hub.add_argument("--force", action="store_true", help="replace a --hub-dir that holds files")
    args = parser.parse_args(argv)
    to_hub = args.hub_dir is not None or args.push_to_hub is not None
    if args.out is None and not to_hub:
        parser.error("give OUT (a .safetensors file), --hub-dir DIR and/or --push-to-hub ORG/NAME")
    hub_only = {"--backbone": args.backbone, "--model-name": args.model_name, "--results": args.results or None}
    hub_only.update({"--force": args.force or None, "--private": args.private or None})
    if not to_hub and any(v is not None for v in hub_only.values()):
        given = ", ".join(k for k, v in hub_only.items() if v is not None)
        parser.error(f"{given}: for --hub-dir / --push-to-hub only")
    from spar_pl import hub as hubs

    token = None
    if args.push_to_hub is not None:  # before any work: a bad id or a missing token
        hubs.check_repo_id(args.push_to_hub)
        token = hubs.hub_token()
    if args.hub_dir is not None:
        hubs.check_out_dir(args.hub_dir, args.force, [args.checkpoint, *args.results])
        check_writable(Path(args.hub_dir).absolute().parent, "parent folder of --hub-dir")
    if not to_hub:
        return _export_weights(Path(args.checkpoint), args.out)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            folder = hubs.export_hub_dir(
                args.checkpoint,
                args.hub_dir or Path(scratch) / "model",
                backbone=args.backbone,
                model_name=args.model_name,
                results=args.results,
                license_id=args.license,
                repo_id=args.push_to_hub,
                force=args.force,
            )
            if args.hub_dir is not None:
                files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                print(f"wrote {folder}: {', '.join(files)}")
            if args.out is not None:  # after the Hub folder, whose checks come first: a failed export writes nothing
                _export_weights(Path(args.checkpoint), args.out)
            if args.push_to_hub is not None:
                url = hubs.push_hub_dir(folder, args.push_to_hub, token, args.private)
                print(f"uploaded to {url}")
    except (OSError, RuntimeError) as err:  # a model that needs the network, a failed upload, a full disk
        raise SystemExit(str(err)) from err  # main prints it once, as "spar-cli export: error: ..."
    return Path(args.hub_dir) if args.hub_dir else Path(args.push_to_hub)


def _export_weights(path: Path, out: str) -> Path:
    """The open_clip weights of a SPAR checkpoint as one safetensors file (``spar-cli export CKPT OUT``)."""
    from spar_pl.fileio import save_safetensors
    from spar_pl.weights import LAYOUTS, read_state_dict, strip_layout

    state, prefix = strip_layout(read_state_dict(path), set())  # errors: one line from spar-cli's main
    if not prefix:
        raise ValueError(
            f"{path} carries no known checkpoint layout ({', '.join(p for p in LAYOUTS if p)}); a plain state dict "
            "is already loadable with --weights"
        )
    weights = {k: v.contiguous() for k, v in state.items()}
    written = save_safetensors(weights, out, {"source": str(path), "format": "open_clip", "layout": prefix})
    print(f"wrote {len(weights)} tensors ({LAYOUTS[prefix]}) to {written}")
    return written


def tiny_data(argv: Sequence[str] | None = None) -> None:
    """``spar-cli tiny-data OUT``: generated train/val images for the tiny distillation config."""
    from spar_pl.testing import write_sample_images

    parser = argparse.ArgumentParser(prog="spar-cli tiny-data", description=command_help(tiny_data.__doc__))
    parser.add_argument("out", nargs="?", default="data/tiny")
    parser.add_argument("--train", type=int, default=12)
    parser.add_argument("--val", type=int, default=4)
    args = parser.parse_args(argv)
    write_sample_images(Path(args.out) / "train", args.train, seed=0)
    write_sample_images(Path(args.out) / "val", args.val, seed=1)
    print(f"wrote {args.train} train and {args.val} val images under {args.out}")


def cache(argv: Sequence[str] | None = None) -> dict[str, float]:
    """``spar-cli cache --config CFG [overrides]``: run the teacher once over the training set into
    ``model.teacher_cache`` with the config's trainer: its device(s), strategy (DDP over ``devices`` x ``num_nodes``,
    each rank a disjoint share of the images) and precision. Resumable: valid entries are kept after a header check;
    missing, corrupt or stale ones are computed. One summary for the whole job."""
    from spar_pl.callbacks import CacheWriter
    from spar_pl.distill import TeacherCacheTask

    cli = lightning_cli(list(argv or []), run=False)
    task = TeacherCacheTask(cli.model, cli.datamodule)
    trainer = cli.trainer
    writer = CacheWriter()
    trainer.callbacks.append(writer)
    trainer.predict(task, return_predictions=False)
    totals = writer.totals
    n = max(totals["written"] + totals["kept"], 1)
    numbers = {
        **{k: totals[k] for k in ("written", "kept", "recomputed", "skipped")},
        "bytes_per_image": totals["bytes"] / n,
        "float32_bytes_per_image": totals["float32_bytes"] / n,
        "per_rank_written": [r["written"] for r in writer.per_rank],
    }
    if trainer.is_global_zero:
        written = ", ".join(str(w) for w in numbers["per_rank_written"])
        per_rank = (
            f" over {len(writer.per_rank)} ranks (written per rank: {written})" if len(writer.per_rank) > 1 else ""
        )
        print(
            f"cache {task.store.root}: {totals['written']} written, {totals['kept']} already valid, "
            f"{totals['recomputed']} corrupt or stale recomputed, {totals['skipped']} unusable images skipped (named "
            f"above){per_rank}; {numbers['bytes_per_image']:,.0f} bytes per image "
            f"as float16 safetensors against {numbers['float32_bytes_per_image']:,.0f} for the raw float32 features "
            f"({numbers['bytes_per_image'] / max(numbers['float32_bytes_per_image'], 1):.2f}x)"
        )
    return numbers


def _inference_parser(prog: str, description: str, modes: Sequence[str]) -> argparse.ArgumentParser:
    """Arguments shared by ``segment`` and ``features``: inputs, output folder, model, mode, size."""

    parser = argparse.ArgumentParser(prog=prog, description=command_help(description))
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files and folders of images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--backbone",
        default=None,
        choices=backbone_names(),
        help="a paper preset or a family (default: the family of --model-name's model; no model either: siglip2)",
    )
    parser.add_argument("--model-name", default=None, help="open_clip name or hf-hub: id (default: the backbone's)")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag (default: the backbone's)")
    parser.add_argument("--weights", default=None, help="local open_clip weights file; dinov3txt: the backbone .pth")
    parser.add_argument("--head-weights", default=None, help="dinov3txt: the dino.txt head and text encoder .pth")
    parser.add_argument("--checkpoint", default=None, help="SPAR checkpoint: .ckpt or spar-cli export .safetensors")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument(
        "--mode", default="single", choices=(*modes, "sliding"), help="single pass or a sliding window (README)"
    )
    parser.add_argument("--stride", type=positive_int, default=24, help="sliding-window stride")
    parser.add_argument("--crop", type=positive_int, default=None, help="sliding-window side (default: native)")
    parser.add_argument("--max-side", type=positive_int, default=None, help="downscale longer sides to this first")
    parser.add_argument(
        "--precision", default="32-true", choices=("32-true", "bf16-mixed", "16-mixed"), help="autocast of the encoder"
    )
    parser.add_argument("--dense", default=None, choices=RECIPES, help=DENSE_HELP)
    return parser


def _load_model(args: argparse.Namespace, parser: argparse.ArgumentParser, modes: Sequence[str]):
    """The model of ``segment``/``features``; a bad mode, stride or crop stops before any image is read."""
    from spar_pl.api import load

    pretrained = args.pretrained if args.pretrained is not None else "default"
    try:
        model = load(
            args.backbone,
            args.checkpoint,
            args.device,
            args.model_name,
            pretrained,
            args.weights,
            args.head_weights,
            args.precision,
            dense=args.dense,
        )
    except (OSError, ValueError, RuntimeError, NotImplementedError) as err:
        raise SystemExit(str(err)) from err  # main prints it once, as "spar-cli segment: error: ..."
    try:
        args.mode = model.check_mode(args.mode, args.stride, modes, args.crop)
    except ValueError as err:
        parser.error(str(err))
    return model


def _run_batch(args: argparse.Namespace, work, desc: str) -> int:
    """Run ``work(path, stem)`` over the inputs; print a summary; exit 1 after the run if any input failed."""
    from spar_pl.api import collect_images, output_stems, run_images

    paths, failures = collect_images(args.images)
    stems = output_stems(paths)
    failed = run_images(paths, lambda path: work(path, stems[path]), desc)
    print(f"{desc}: {len(paths) - len(failed)} of {len(paths)} images done, outputs in {args.out}")
    failures += failed
    if failures:
        print(f"{len(failures)} input(s) failed:", file=sys.stderr)
        for _, message in failures:
            print(f"  {message}", file=sys.stderr)
        raise SystemExit(1)
    return len(paths)


def segment(argv: Sequence[str] | None = None) -> int:
    """``spar-cli segment IMAGE_OR_DIR... --classes road car "person, man" --out DIR``: per image a colour overlay
    with a legend (``<stem>_overlay.png``), the palette label PNG (``<stem>_labels.png``) and, with ``--save-probs``,
    float16 class probabilities (``<stem>_probs.safetensors``), all at the image's original size."""
    from spar_pl.openvocab import parse_classes
    from spar_pl.sliding import SEGMENT_MODES

    parser = _inference_parser("spar-cli segment", segment.__doc__, SEGMENT_MODES)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--classes", nargs="+", metavar="CLASS", help='one class per argument; commas list synonyms: road "person, man"'
    )
    group.add_argument("--classes-file", help='class file, one class a line, synonyms "name, synonym" (or voc21 ...)')
    parser.add_argument("--logit-scale", type=float, default=40.0)
    parser.add_argument("--prob-thd", type=float, default=0.0, help="pixels scoring below this become class 0")
    parser.add_argument("--save-probs", action="store_true", help="also write <stem>_probs.safetensors (K, H, W)")
    args = parser.parse_args(argv)
    check_writable(args.out, "output folder (--out)")
    try:
        if args.classes is not None:
            parsed = parse_classes(args.classes, min_classes=2, option="--classes")
        else:
            parsed = parse_classes(args.classes_file, min_classes=2)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    if len(parsed) > 256:
        parser.error(f"{len(parsed)} classes: the label PNG holds at most 256")
    classes = [", ".join(names) for names in parsed]
    model = _load_model(args, parser, SEGMENT_MODES)
    shown = "; ".join(classes[:12]) + (f"; ... ({len(classes) - 12} more)" if len(classes) > 12 else "")
    print(f"{model}: {len(classes)} classes ({shown}), mode {args.mode}, precision {args.precision}")

    def work(path: Path, stem: str) -> None:
        probs_file = Path(args.out) / f"{stem}_probs.safetensors" if args.save_probs else None
        result = model.segment(
            path,
            classes,
            args.mode,
            args.stride,
            args.crop,
            args.logit_scale,
            args.prob_thd,
            args.max_side,
            probs_file=probs_file,  # written in pieces while the mask is computed
        )
        result.save(args.out, stem)

    return _run_batch(args, work, "segment")


def features(argv: Sequence[str] | None = None) -> int:
    """``spar-cli features IMAGE_OR_DIR... --out DIR``: dense features per image as ``<stem>.safetensors``, tensor
    ``features`` (1, C, h, w) (NCHW) with metadata (backbone, model, mode, stride, image and input sizes, dtype)."""
    from spar_pl.sliding import FEATURE_MODES

    parser = _inference_parser("spar-cli features", features.__doc__, FEATURE_MODES)
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--upsample", action="store_true", help="resize the features to the image size (H, W)")
    args = parser.parse_args(argv)
    check_writable(args.out, "output folder (--out)")
    model = _load_model(args, parser, FEATURE_MODES)
    print(f"{model}: mode {args.mode}, {args.dtype}{', upsampled to the image size' if args.upsample else ''}")

    def work(path: Path, stem: str) -> None:
        model.write_features(
            path,
            Path(args.out) / f"{stem}.safetensors",
            args.mode,
            args.stride,
            args.crop,
            args.upsample,
            args.max_side,
            getattr(torch, args.dtype),
        )

    return _run_batch(args, work, "features")


def reproduce_tiny(argv: Sequence[str] | None = None) -> dict:
    """``spar-cli reproduce-tiny``: single pass vs sliding window vs SPAR with the shipped tiny pretrained model."""
    from spar_pl.reproduce import reproduce_tiny as run

    parser = argparse.ArgumentParser(prog="spar-cli reproduce-tiny", description=command_help(reproduce_tiny.__doc__))
    parser.add_argument("--out", default="results", help="writes reproduce-tiny.md and reproduce-tiny.png here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--weights", default=None, help="pretrained tiny model (default: the shipped one)")
    parser.add_argument("--eval-images", type=positive_int, default=16, help="held-out 256 px scenes per seed")
    parser.add_argument("--distill-steps", type=positive_int, default=120)
    parser.add_argument("--distill-batch", type=positive_int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4, help="distillation learning rate")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    parser.add_argument("--dense", default=None, choices=RECIPES, help="last-block recipe (reproduce-tiny-DENSE.md)")
    args = parser.parse_args(argv)
    check_writable(args.out, "output folder (--out)")  # before minutes of work
    return run(
        args.out,
        args.seeds,
        args.weights,
        args.eval_images,
        args.distill_steps,
        args.distill_batch,
        args.lr,
        args.threads,
        dense=args.dense,
    )


def pretrain_tiny(argv: Sequence[str] | None = None) -> Path:
    """``spar-cli pretrain-tiny``: re-create the shipped tiny pretrained model (``spar-tiny-p8`` on shape scenes)."""
    from spar_pl.reproduce import PRETRAIN_DEFAULTS, pretrain, shipped_weights

    parser = argparse.ArgumentParser(prog="spar-cli pretrain-tiny", description=command_help(pretrain_tiny.__doc__))
    parser.add_argument("--out", default=None, help="safetensors file (default: the package's shipped weights)")
    parser.add_argument("--seed", type=int, default=PRETRAIN_DEFAULTS["seed"])
    parser.add_argument("--steps", type=positive_int, default=PRETRAIN_DEFAULTS["steps"])
    parser.add_argument("--batch-size", type=positive_int, default=PRETRAIN_DEFAULTS["batch_size"])
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else shipped_weights()
    check_writable(out.parent, "output folder")  # before minutes of work
    pretrain(out, seed=args.seed, steps=args.steps, batch_size=args.batch_size)
    print(f"wrote {out}")
    return out


def table(argv: Sequence[str] | None = None) -> str:
    """``spar-cli table --backbone B [--ckpt C] [--tiny]``: the paper's table (``spar_pl.table.table_command``)."""
    from spar_pl.table import table_command

    results = argparse.ArgumentParser(add_help=False)
    results.add_argument("--results", default="results")
    results.add_argument("--render-only", action="store_true")
    known, _ = results.parse_known_args(argv)
    if not known.render_only:  # a finished evaluation must not be lost to a folder it cannot write
        check_writable(known.results, "results folder (--results)")
    return table_command(argv)


def models(argv: Sequence[str] | None = None) -> str:
    """``spar-cli models``: the backbone families and the models each takes (``spar_pl.catalog``)."""
    from spar_pl.catalog import models_command

    return models_command(argv)


def config(argv: Sequence[str] | None = None) -> str:
    """``spar-cli config [NAME]``: the shipped configs (package data). No NAME lists them; ``spar-cli config
    distill/siglip2.yaml > my.yaml`` writes one to edit, self-contained (the fragments it reads written in place), so
    ``spar-cli fit --config my.yaml`` runs from any folder. ``--config configs/NAME`` works from any folder too: a
    path that does not exist there is read from the package."""
    parser = argparse.ArgumentParser(prog="spar-cli config", description=command_help(config.__doc__))
    parser.add_argument("name", nargs="?", help="e.g. distill/siglip2.yaml, eval/voc21.yaml (configs/ optional)")
    args = parser.parse_args(argv)
    if args.name is None:
        text = "\n".join(packaged_configs())
        print(f"{text}\n(packaged under {config_path('eval/voc21.yaml').parents[1]})")
        return text
    name = Path(args.name)
    name = Path(*name.parts[1:]) if name.parts[:1] == ("configs",) else name
    text = self_contained_config(config_path(name))
    sys.stdout.write(text)
    return text


def demo(argv: Sequence[str] | None = None):
    """``spar-cli demo``: segmentation in the browser (Gradio; ``spar_pl.demo``)."""
    from spar_pl.demo import demo as run
    from spar_pl.scenes import SHAPE_CLASSES, scene_image

    return run(argv, scene=(SHAPE_CLASSES, scene_image()))  # a named model starts on a generated scene


COMMANDS = {
    "quickstart": quickstart,
    "config": config,
    "models": models,
    "export": export,
    "tiny-data": tiny_data,
    "cache": cache,
    "segment": segment,
    "features": features,
    "table": table,
    "reproduce-tiny": reproduce_tiny,
    "pretrain-tiny": pretrain_tiny,
    "demo": demo,
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


# Known noise: advertisements, facts a user did not ask about, warnings about internals that do not apply here.
_NOISE_LOGS = (
    "💡 Tip:",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "No pretrained weights loaded",
    "Failed to read schema from",  # datasets on a damaged parquet shard: the run's own error line names it
)
_NOISE_WARNINGS = (
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",  # the CSV logger is what this project uses
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # inside Lightning
    r"LightningCLI's args parameter is intended to run from within Python",  # quickstart/table run it in-process
    r"Your `IterableDataset` has `__len__` defined",  # StreamingImages' length is exact per rank and worker
    r"Found \d+ module\(s\) in eval mode at the start of training",  # the frozen teacher, in eval mode on purpose
    r"Total length of `list` across ranks is zero",  # DistillDataModule's empty validation list (no val_source)
    r"Couldn't infer the batch indices",  # spar-cli cache's writer names entries by image id, not by index
)


def _not_noise(record: logging.LogRecord) -> bool:
    return not any(text in record.getMessage() for text in _NOISE_LOGS)


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted (redirected or captured streams
    replace it; a handler holding the old one would write to a closed stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _add_console_handler(logger: logging.Logger) -> None:
    """Give ``logger`` the console handler (warnings and errors, known noise dropped), once, in place of plain
    stream handlers."""
    for handler in list(logger.handlers):
        if type(handler) is logging.StreamHandler:
            logger.removeHandler(handler)
    if not any(getattr(h, "spar_console", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        handler.addFilter(_not_noise)
        handler.spar_console = True
        logger.addHandler(handler)


def configure_console() -> None:
    """A quiet, truthful console for ``spar-cli``: each log line once, known noise dropped.

    Lightning prints its INFO lines through its own handlers; a root handler (which ``logging.warning`` in a library
    would otherwise create with ``basicConfig``, printing every Lightning line a second time) shows warnings and
    errors only. open_clip's "No pretrained weights loaded" is dropped: the tiny models are random by design (the
    commands say so) and a SPAR checkpoint or weights file is loaded after it.
    """
    root = logging.getLogger()
    if _not_noise not in root.filters:
        root.addFilter(_not_noise)
    _add_console_handler(root)  # before Lightning's import, which adds handlers of its own only if there is none
    import datasets  # noqa: F401  (its handler exists once it is imported)
    import lightning.pytorch  # noqa: F401  (its handlers exist once it is imported)

    # The console handler replaces plain stream handlers bound to the stderr of their creation: the root's (a
    # library's logging.warning runs basicConfig) and datasets' own, which also printed a damaged shard's error
    # before the run's own line named it.
    _add_console_handler(logging.getLogger("datasets"))

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if _not_noise not in handler.filters:
                handler.addFilter(_not_noise)
            if type(handler) is logging.StreamHandler:
                handler.stream = sys.stderr  # Lightning binds its handlers at import; print where stderr is now
    for message in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError)
_UNION_DUMP = "Does not validate against any of the Union subtypes"


_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def worker_message(text: str) -> str:
    """The original error of a DataLoader worker (PyTorch re-raises it with the worker's whole traceback in its
    message): the last exception line(s) after the traceback, without the type name."""
    if _WORKER_TRACEBACK not in text:
        return text
    lines = text.split(_WORKER_TRACEBACK, 1)[1].splitlines()
    indented = [i for i, line in enumerate(lines) if line.startswith(" ")]
    last = " ".join(lines[indented[-1] + 1 :] if indented else lines).strip()
    head, sep, rest = last.partition(": ")
    return rest if sep and head.replace(".", "").replace("_", "").isalnum() else last


def user_message(err: BaseException) -> str:
    """One line for an ordinary mistake: jsonargparse's dump of a failed class instantiation ("Union subtypes")
    is replaced by the error that caused it (a checkpoint that does not match, a missing file, ...); an error raised
    in a DataLoader worker is its original message, without the worker's traceback."""
    while _UNION_DUMP in str(err) and err.__cause__ is not None:
        err = err.__cause__
    text = worker_message(str(err).strip())
    if _UNION_DUMP in text:  # no cause attached: its "Errors:" list holds the reasons
        reasons = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")]
        text = reasons[0] if reasons else text.splitlines()[0]
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return " ".join(text.split()) or type(err).__name__


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``spar-cli``. An ordinary user error (a missing or unreadable file or folder, a value out of
    range, a checkpoint that does not match) prints one line naming it on stderr and exits with status 1."""
    argv = list(sys.argv[1:] if args is None else args)
    names = ",".join([*LIGHTNING_COMMANDS, *COMMANDS])
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: spar-cli {" + names + "} [options]\n\n" + command_help(__doc__.strip()))
        raise SystemExit(0)
    command = argv[0]
    configure_console()
    if command not in LIGHTNING_COMMANDS and command not in COMMANDS:
        print(f"spar-cli: unknown command {command!r}; choose from {{{names}}} (spar-cli --help)", file=sys.stderr)
        raise SystemExit(2)
    try:
        if command in LIGHTNING_COMMANDS:
            lightning_cli(args)
        else:
            COMMANDS[command](argv[1:])
        end_process_group()
    except (*USER_ERRORS, argparse.ArgumentError) as err:
        print(f"spar-cli {command}: error: {user_message(err)}", file=sys.stderr)
        raise SystemExit(1) from None
    except SystemExit as exc:
        if not isinstance(exc.code, str):  # argparse / jsonargparse usage errors and plain exits
            raise
        print(f"spar-cli {command}: error: {exc.code}", file=sys.stderr)  # a message the command raised
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
