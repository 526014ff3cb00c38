"""A small reproduction of SPAR's effect on a CPU (``make reproduce-tiny``).

A tiny MaskCLIP-style open_clip ViT (``spar-tiny-p8``: patch 8, an 8 x 8 grid at its native 64 px) is
pretrained on generated shape scenes (:mod:`spar_pl.scenes`) to align its dense features with the text
embeddings of the class names: this stands in for CLIP's pretraining and may use labels. On held-out scenes at
4x the native side the experiment then compares, with the project's own components:

* the single pass (:class:`~spar_pl.encoders.MaskCLIPEncoder` at 256 px: interpolated positional embeddings),
* the sliding window (:class:`~spar_pl.sliding.SlidingWindowTeacher`, crop 64, stride 24),
* SPAR: :class:`~spar_pl.distill.DistillModule` (its teacher, trainable blocks and MSE loss) trained through
  Lightning on unlabelled 256 px scenes, then run in a single pass,

each segmented by :class:`~spar_pl.openvocab.OpenVocabHead` with the class names and scored with torchmetrics'
dataset-level mIoU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from open_clip import OPENAI_IMAGENET_TEMPLATES
from torchmetrics.classification import MulticlassJaccardIndex

from spar_pl.distill import DistillModule
from spar_pl.encoders import DenseEncoder, ModelSpec, build_encoder
from spar_pl.fileio import save_safetensors
from spar_pl.openvocab import OpenVocabHead
from spar_pl.scenes import SHAPE_CLASSES, make_scenes
from spar_pl.sliding import SlidingWindowTeacher

#: The open_clip config of the tiny model (``model_configs/spar-tiny-p8.json``).
TINY_MODEL = "spar-tiny-p8"
NATIVE = 64
HIGH_RES = 256
#: The recipe of the shipped weights (``spar-cli pretrain-tiny`` re-creates them): :func:`pretrain`'s defaults.
PRETRAIN_DEFAULTS = {
    "seed": 0,
    "steps": 4000,
    "batch_size": 32,
    "lr": 1e-3,
    "weight_decay": 0.05,
    "logit_scale": 20.0,
    "background_weight": 0.5,
}
_MODULE_HPARAMS = ("lr", "weight_decay", "logit_scale", "background_weight")


def shipped_weights() -> Path:
    """The pretrained tiny model shipped with the package (``spar-cli pretrain-tiny`` re-creates it)."""
    return Path(str(resources.files("spar_pl") / "pretrained" / f"{TINY_MODEL}-shapes.safetensors"))


def load_tiny(
    weights: str | Path | None = None, device: str | torch.device = "cpu", dense: str | None = None
) -> DenseEncoder:
    """The tiny MaskCLIP-style encoder with the shipped (or given) pretrained weights (``dense``: the last block's
    recipe, :mod:`spar_pl.recipes`)."""
    with quiet_lightning():
        return build_encoder(
            "maskclip", TINY_MODEL, pretrained=None, weights=weights or shipped_weights(), device=device, dense=dense
        )


def shipped_spec(spec: ModelSpec | None = None) -> ModelSpec | None:
    """The shipped tiny model (:data:`TINY_MODEL` with :func:`shipped_weights`) when ``spec`` names no model (no
    backbone, model name or weights file, the default pretrained tag), with ``spec``'s other fields (``checkpoint``,
    ``dense``, ...); ``None`` when ``spec`` names a model. What ``spar-cli quickstart`` and ``spar-cli demo`` run with
    no model named."""
    spec = spec or ModelSpec()
    if (spec.backbone, spec.model_name, spec.weights, spec.pretrained) != (None, None, None, "default"):
        return None
    weights = str(shipped_weights())
    return dataclasses.replace(spec, backbone="maskclip", model_name=TINY_MODEL, pretrained=None, weights=weights)


# -- pretraining (stands in for CLIP's) ------------------------------------------------------------------------------
def prompt_tokens(encoder: DenseEncoder, classes: Sequence[str], templates=OPENAI_IMAGENET_TEMPLATES) -> torch.Tensor:
    """Token ids ``(K * T, L)`` of every template filled with every class name, class-major."""
    return encoder.tokenizer([template(name) for name in classes for template in templates])


def class_embeddings(encoder: DenseEncoder, tokens: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class embeddings ``(K, C)`` with gradients, computed as ``open_clip.build_zero_shot_classifier`` does
    (mean over templates of L2-normalised text features, L2-normalised), so that
    :class:`~spar_pl.openvocab.OpenVocabHead` sees at inference exactly what pretraining aligned to."""
    feats = encoder.model.encode_text(tokens.to(encoder.model.positional_embedding.device), normalize=True)
    return F.normalize(feats.view(num_classes, -1, feats.shape[-1]).mean(dim=1), dim=-1)


class SceneBatches(torch.utils.data.IterableDataset):
    """Batches of generated scenes, a deterministic function of ``(stream, seed, batch index)``.

    Args:
        size: image side in pixels.
        batch_size: scenes per batch.
        batches: batches per pass.
        seed: the stream's seed.
        stream: the stream's name (pretraining, distillation and evaluation streams never share scenes).
        labels: whether batches carry the label maps.
    """

    def __init__(self, size: int, batch_size: int, batches: int, seed: int, stream: str, labels: bool) -> None:
        super().__init__()
        self.size, self.batch_size, self.batches = size, batch_size, batches
        self.seed, self.stream, self.labels = seed, stream, labels

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        for b in range(self.batches):
            start = b * self.batch_size
            images, labels = make_scenes(self.batch_size, self.size, self.seed, self.stream, start)
            batch = {"image": images, "id": [f"{self.stream}/{self.seed}/{start + i}" for i in range(len(images))]}
            if self.labels:
                batch["label"] = labels
            yield batch


class PretrainModule(L.LightningModule):
    """Dense vision-language pretraining of the tiny model on labelled scenes at the native size.

    Per-pixel cross-entropy of cosine logits between the L2-normalised dense features of the project's encoder
    forward (:class:`~spar_pl.encoders.MaskCLIPEncoder`, what SPAR uses) and the class-name embeddings of the
    text tower (trained jointly, through the 80 OpenAI templates), logits bilinearly upsampled to the image.

    Args:
        model_name: the open_clip config (random initialisation).
        classes: class names, index = label value.
        lr: peak AdamW learning rate (one-cycle schedule over ``max_steps``).
        weight_decay: AdamW weight decay.
        max_steps: length of the schedule.
        logit_scale: multiplier of the cosine logits.
        background_weight: cross-entropy weight of class 0 (the others weigh 1): background covers most pixels.
    """

    def __init__(
        self,
        model_name: str = TINY_MODEL,
        classes: Sequence[str] = SHAPE_CLASSES,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        max_steps: int = 3000,
        logit_scale: float = 20.0,
        background_weight: float = 0.5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = build_encoder("maskclip", model_name, pretrained=None)
        self.encoder.model.train()
        self.register_buffer("tokens", prompt_tokens(self.encoder, classes), persistent=False)
        weight = torch.ones(len(classes))
        weight[0] = background_weight
        self.register_buffer("class_weight", weight, persistent=False)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]
        feats = F.normalize(self.encoder(self.encoder.normalize(images)), dim=1)
        text = class_embeddings(self.encoder, self.tokens, len(self.hparams.classes))
        logits = torch.einsum("bchw,kc->bkhw", feats, text) * self.hparams.logit_scale
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, labels, weight=self.class_weight)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
        )
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, self.hparams.lr, total_steps=self.hparams.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@contextlib.contextmanager
def quiet_lightning():
    """Silence Lightning's banners, per-run warnings and open_clip's "no pretrained weights" notice (the caller
    prints its own summary)."""
    names = ("", "lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class PrintLoss(L.Callback):
    """Print the training loss every ``every`` steps (a one-line log without a progress bar)."""

    def __init__(self, every: int, total: int) -> None:
        self.every, self.total = every, total

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total}: loss {float(outputs['loss']):.4f}", flush=True)


def _trainer(max_steps: int, root: str | Path | None, progress: bool, callbacks=()) -> L.Trainer:
    return L.Trainer(
        callbacks=list(callbacks),
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=1,  # one pass over the stream: max_steps batches
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        deterministic=True,
        default_root_dir=str(root) if root else None,
        num_sanity_val_steps=0,
    )


def pretrain(
    out: str | Path,
    seed: int = PRETRAIN_DEFAULTS["seed"],
    steps: int = PRETRAIN_DEFAULTS["steps"],
    batch_size: int = PRETRAIN_DEFAULTS["batch_size"],
    progress: bool = True,
    **hparams,
) -> DenseEncoder:
    """Pretrain the tiny model on generated native-size scenes and write its open_clip weights (float16).

    Args:
        out: the safetensors file to write (atomically).
        seed: seeds the initialisation and the scene stream.
        steps: optimiser steps.
        batch_size: scenes per step.
        progress: print the loss every 5% of the steps.
        **hparams: :class:`PretrainModule` arguments (default: those of :data:`PRETRAIN_DEFAULTS`).

    Returns:
        the encoder with the written (float16-rounded) weights loaded, in eval mode.
    """
    hparams = {**{k: PRETRAIN_DEFAULTS[k] for k in _MODULE_HPARAMS}, **hparams}
    L.seed_everything(seed, verbose=False)
    with quiet_lightning():
        module = PretrainModule(max_steps=steps, **hparams)
    data = SceneBatches(NATIVE, batch_size, steps, seed, "pretrain", labels=True)
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    with quiet_lightning():
        _trainer(steps, None, False, [PrintLoss(max(steps // 20, 1), steps)] if progress else []).fit(module, loader)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in module.encoder.model.state_dict().items()}
    recipe = {"seed": seed, "steps": steps, "batch_size": batch_size, **hparams}
    meta = {"format": "open_clip", "model": TINY_MODEL, "classes": ",".join(module.hparams.classes)}
    meta.update({k: str(v) for k, v in recipe.items()})
    save_safetensors(state, out, meta)
    return load_tiny(out)


# -- the experiment ---------------------------------------------------------------------------------------------------
Features = Callable[[torch.Tensor], torch.Tensor]


@torch.inference_mode()
def evaluate(
    features: Features,
    head: OpenVocabHead,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 4,
    *,
    normalize: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[float, float]:
    """Dataset-level mIoU (percent) and seconds per image of one way of computing dense features.

    Args:
        features: maps normalised images ``(B, 3, H, W)`` to dense features ``(B, C, h, w)``.
        head: the open-vocabulary head.
        images: ``(N, 3, H, W)`` in ``[0, 1]``.
        labels: ``(N, H, W)`` class indices.
        batch_size: images per call.
        normalize: the encoder's input normalisation.
    """
    metric = MulticlassJaccardIndex(num_classes=head.num_classes, average="macro", ignore_index=255)
    features(normalize(images[:1]))  # a warm-up call, outside the timing
    elapsed = 0.0
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        t0 = time.perf_counter()
        feats = features(normalize(x))
        mask = head.predict(feats, tuple(y.shape[-2:]))
        elapsed += time.perf_counter() - t0
        metric.update(mask, y)
    return float(metric.compute()) * 100, elapsed / len(images)


def distill(
    weights: str | Path,
    seed: int,
    steps: int = 120,
    batch_size: int = 2,
    lr: float = 5e-4,
    trainable: str = "blk_-1,blk_-2",
    root: str | Path | None = None,
    progress: bool = False,
    dense: str | None = None,
) -> DistillModule:
    """SPAR on unlabelled high-resolution scenes: :class:`DistillModule` (teacher crop 64, stride 24) through Lightning.

    Returns:
        the trained module (its ``student`` is the SPAR model).
    """
    L.seed_everything(seed, verbose=False)
    with quiet_lightning():
        module = DistillModule(
            backbone="maskclip",
            model_name=TINY_MODEL,
            pretrained=None,
            weights=str(weights),
            crop=NATIVE,
            stride=24,
            window_batch=128,
            trainable=trainable,
            lr=lr,
            weight_decay=1e-4,
            dense=dense,
        )
    data = SceneBatches(HIGH_RES, batch_size, steps, seed, "distill", labels=False)
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    with quiet_lightning():
        _trainer(steps, root, progress).fit(module, loader)
    module.student.eval()
    return module


def run_seed(
    weights: str | Path,
    seed: int,
    eval_images: int = 16,
    distill_steps: int = 120,
    distill_batch: int = 2,
    lr: float = 5e-4,
    log: Callable[[str], None] = print,
    dense: str | None = None,
    students: dict | None = None,
) -> dict[str, float]:
    """One seed of the experiment: held-out scenes of that seed, preconditions, SPAR distillation, the three methods.
    The distilled student is kept in ``students[seed]`` when ``students`` is given.

    Returns:
        mIoU (percent) and seconds per image of ``native``, ``single``, ``sliding`` and ``spar``, plus the
        distillation time ``distill_s``.
    """
    encoder = load_tiny(weights, dense=dense).eval()
    head = OpenVocabHead.from_encoder(encoder, SHAPE_CLASSES)
    teacher = SlidingWindowTeacher(encoder, crop=NATIVE, stride=24, window_batch=128)
    native_x, native_y = make_scenes(eval_images * 4, NATIVE, seed, "heldout-native")
    high_x, high_y = make_scenes(eval_images, HIGH_RES, seed, "heldout")
    r: dict[str, float] = {}
    r["native"], r["native_s"] = evaluate(encoder, head, native_x, native_y, batch_size=32, normalize=encoder.normalize)
    r["single"], r["single_s"] = evaluate(encoder, head, high_x, high_y, normalize=encoder.normalize)
    r["sliding"], r["sliding_s"] = evaluate(teacher, head, high_x, high_y, normalize=encoder.normalize)
    log(
        f"seed {seed}: native {NATIVE}px {r['native']:.1f} | {HIGH_RES}px single pass {r['single']:.1f}, "
        f"sliding window {r['sliding']:.1f}"
    )
    t0 = time.perf_counter()
    module = distill(weights, seed, distill_steps, distill_batch, lr, dense=dense, progress=True)
    r["distill_s"] = time.perf_counter() - t0
    if students is not None:
        students[seed] = module.student
    spar_head = OpenVocabHead.from_encoder(module.student, SHAPE_CLASSES)
    r["spar"], r["spar_s"] = evaluate(module.student, spar_head, high_x, high_y, normalize=module.student.normalize)
    log(f"seed {seed}: SPAR {r['spar']:.1f} after {distill_steps} distillation steps ({r['distill_s']:.0f}s)")
    return r


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


#: The tiny reproduction's preconditions: native held-out mIoU at least this (percent) ...
NATIVE_MIN = 60.0
#: ... and "clearly" below / above: by at least this many mIoU points (means over seeds).
CLEAR_MARGIN = 5.0


def preconditions(runs: dict[int, dict[str, float]]) -> list[tuple[str, bool]]:
    """The tiny reproduction's preconditions on the means over seeds: (description with numbers, whether it holds)."""
    mean = {k: statistics.fmean(r[k] for r in runs.values()) for k in ("native", "single", "sliding")}
    return [
        (f"native {NATIVE}px mIoU >= {NATIVE_MIN:g}: {mean['native']:.1f}", mean["native"] >= NATIVE_MIN),
        (
            f"single pass at {HIGH_RES}px clearly below native (>= {CLEAR_MARGIN:g} points): "
            f"{mean['single']:.1f} vs {mean['native']:.1f}",
            mean["single"] <= mean["native"] - CLEAR_MARGIN,
        ),
        (
            f"sliding window clearly above the single pass (>= {CLEAR_MARGIN:g} points): "
            f"{mean['sliding']:.1f} vs {mean['single']:.1f}",
            mean["sliding"] >= mean["single"] + CLEAR_MARGIN,
        ),
    ]


METHODS = (
    ("single", f"single pass at {HIGH_RES}px"),
    ("sliding", "sliding window (crop 64, stride 24)"),
    ("spar", "SPAR (distilled single pass)"),
)


def render_markdown(runs: dict[int, dict[str, float]], settings: str, elapsed: float) -> str:
    """The results page: preconditions, the table over seeds, per-seed rows."""
    seeds = sorted(runs)
    lines = [
        "# SPAR on a CPU: tiny reproduction",
        "",
        settings,
        "",
        "| method | mIoU (mean ± std over seeds) | s/img |",
        "|---|---|---|",
    ]
    for key, name in (("native", f"native {NATIVE}px single pass (precondition)"), *METHODS):
        m, s = mean_spread([runs[k][key] for k in seeds])
        t = statistics.fmean(runs[k][f"{key}_s"] for k in seeds)
        lines.append(f"| {name} | {m:.1f} ± {s:.1f} | {t:.4f} |")
    lines += ["", "| seed | native | single | sliding | SPAR | distillation s |", "|---|---|---|---|---|---|"]
    for k in seeds:
        r = runs[k]
        lines.append(
            f"| {k} | {r['native']:.1f} | {r['single']:.1f} | {r['sliding']:.1f} | {r['spar']:.1f} | "
            f"{r['distill_s']:.0f} |"
        )
    ok = all(runs[k]["single"] < runs[k]["sliding"] and runs[k]["single"] < runs[k]["spar"] for k in seeds)
    lines += ["", "Preconditions (means over seeds):", ""]
    lines += [f"- {text}: {'met' if held else 'NOT MET'}" for text, held in preconditions(runs)]
    lines += [
        "",
        f"Ordering single < sliding and single < SPAR on every seed: {'yes' if ok else 'NO'}. "
        f"Wall time {elapsed:.0f}s.",
        "",
    ]
    return "\n".join(lines)


def draw_figure(runs: dict[int, dict[str, float]], path: str | Path) -> Path:
    """A PNG drawn with matplotlib: held-out mIoU per method (bar = mean, whisker = ± std, dots = seeds, dashed line =
    the native-size precondition) beside its cost in seconds per image on a log axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from spar_pl.fileio import atomic_path

    seeds = sorted(runs)
    keys = [k for k, _ in METHODS]
    labels = ["single pass", "sliding window", "SPAR"]
    colours = ["#c85a50", "#5a78c8", "#46a05a"]
    means, stds = zip(*(mean_spread([runs[s][k] for s in seeds]) for k in keys))
    costs = [statistics.fmean(runs[s][f"{k}_s"] for s in seeds) for k in keys]
    native = mean_spread([runs[s]["native"] for s in seeds])[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8), layout="constrained")
    x = range(len(keys))
    left.bar(x, means, yerr=stds, capsize=5, color=colours)
    for i, key in enumerate(keys):
        left.scatter([i + 0.18] * len(seeds), [runs[s][key] for s in seeds], color="black", s=12, zorder=3)
        left.annotate(
            f"{means[i]:.1f}",
            (i, means[i] + stds[i]),
            ha="center",
            va="bottom",
            xytext=(0, 3),
            textcoords="offset points",
        )
    left.axhline(native, color="grey", linestyle="--", linewidth=1)
    left.annotate(f"native {NATIVE} px: {native:.1f}", (-0.4, native), va="bottom", color="dimgrey", fontsize=9)
    left.set(xticks=list(x), xticklabels=labels, ylabel="mIoU (%)", ylim=(0, max(native, *means) * 1.25))
    left.set_title(f"held-out mIoU at {HIGH_RES} px (mean ± std)")
    right.bar(x, costs, color=colours)
    right.set_yscale("log")
    for i, cost in enumerate(costs):
        right.annotate(f"{cost:.4f}", (i, cost), ha="center", va="bottom", xytext=(0, 3), textcoords="offset points")
    right.set(xticks=list(x), xticklabels=labels, ylabel="seconds per image (log scale)")
    right.set_ylim(min(costs) / 3, max(costs) * 3)
    right.set_title("cost")
    n = len(seeds)
    fig.suptitle(f"SPAR on a CPU: {n} seed{'s' if n != 1 else ''}; tiny ViT patch 8, native {NATIVE} px", fontsize=11)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _check_positive(**values: int) -> None:
    """``ValueError`` naming the option (``distill_steps`` as ``--distill-steps``) of the first value below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def reproduce_tiny(
    out: str | Path = "results",
    seeds: Sequence[int] = (0, 1, 2),
    weights: str | Path | None = None,
    eval_images: int = 16,
    distill_steps: int = 120,
    distill_batch: int = 2,
    lr: float = 5e-4,
    threads: int | None = 2,
    log: Callable[[str], None] = print,
    dense: str | None = None,
    students: dict | None = None,
) -> dict[int, dict[str, float]]:
    """Single pass vs sliding window vs SPAR on generated scenes at 4x the native side, with the shipped tiny
    pretrained model, over ``seeds``: prints the table, writes ``reproduce-tiny.md`` and ``reproduce-tiny.png``,
    returns each seed's numbers.

    Args:
        out: results folder; ``reproduce-tiny.md`` and ``reproduce-tiny.png`` are written here (checked first).
        seeds: experiment seeds (held-out scenes, distillation scenes and initialisation of each run).
        weights: the pretrained tiny model (default: the shipped one).
        eval_images: held-out 256 px scenes per seed (the native precondition uses 4x as many 64 px scenes).
        distill_steps: distillation steps per seed.
        distill_batch: unlabelled 256 px scenes per distillation step.
        lr: distillation AdamW learning rate.
        threads: torch CPU threads (``None``: leave as is).
        log: where progress lines go.
        dense: the last block's recipe (:mod:`spar_pl.recipes`) of the model, its teacher and SPAR's student; the
            files are then ``reproduce-tiny-<dense>.md`` and ``.png``.
        students: when given, receives each seed's distilled student (``students[seed]``).

    Raises:
        ValueError: no seed, a count below 1, a learning rate not above 0, or an unknown dense recipe.
        NotADirectoryError, PermissionError: an output folder that cannot be written (before any work).
    """
    from spar_pl.fileio import write_text
    from spar_pl.recipes import check_recipe
    from spar_pl.runner import check_writable

    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    _check_positive(eval_images=eval_images, distill_steps=distill_steps, distill_batch=distill_batch)
    if threads is not None:
        _check_positive(threads=threads)
    if not lr > 0:
        raise ValueError(f"--lr must be above 0, got {lr}")
    if dense is not None:
        check_recipe(dense)
    check_writable(out, "output folder (--out)")  # before minutes of work
    if threads:
        torch.set_num_threads(threads)
    weights = Path(weights) if weights else shipped_weights()
    t0 = time.perf_counter()
    runs = {
        s: run_seed(weights, s, eval_images, distill_steps, distill_batch, lr, log=log, dense=dense, students=students)
        for s in seeds
    }
    elapsed = time.perf_counter() - t0
    settings = (
        f"Model `{TINY_MODEL}` (MaskCLIP-style open_clip ViT, patch 8, 4 blocks, width 128, native 64 px) with "
        f"weights `{weights.name}`; {eval_images} held-out {HIGH_RES}px scenes per seed; SPAR: "
        f"`DistillModule` (crop 64, stride 24, trainable `blk_-1,blk_-2`, MSE, AdamW lr {lr:g}), "
        f"{distill_steps} steps x {distill_batch} unlabelled {HIGH_RES}px scenes; seeds {', '.join(map(str, seeds))}."
    ) + (f" Dense recipe `{dense}` in the last block (teacher and student)." if dense else "")
    text = render_markdown(runs, settings, elapsed)
    out = Path(out)
    stem = "reproduce-tiny" if dense is None else f"reproduce-tiny-{dense}"
    write_text(out / f"{stem}.md", text)
    draw_figure(runs, out / f"{stem}.png")
    log(text)
    log(f"wrote {out / f'{stem}.md'} and {out / f'{stem}.png'}")
    return runs


def pretrain_tiny(
    out: str | None = None,
    seed: int = PRETRAIN_DEFAULTS["seed"],
    steps: int = PRETRAIN_DEFAULTS["steps"],
    batch_size: int = PRETRAIN_DEFAULTS["batch_size"],
    threads: int = 2,
) -> Path:
    """Re-create the shipped tiny pretrained model (``spar-tiny-p8`` on shape scenes; :func:`pretrain` with the
    recipe of :data:`PRETRAIN_DEFAULTS`); prints the file written and returns it.

    Args:
        out: safetensors file (default: the package's shipped weights, :func:`shipped_weights`).
        seed: seeds the initialisation and the scene stream.
        steps: optimiser steps.
        batch_size: scenes per step.
        threads: torch CPU threads.

    Raises:
        ValueError: a count below 1.
        NotADirectoryError, PermissionError: an output folder that cannot be written (before any work).
        IsADirectoryError: ``out`` is a folder (before any work).
    """
    from spar_pl.runner import check_writable

    _check_positive(steps=steps, batch_size=batch_size, threads=threads)
    path = Path(out) if out else shipped_weights()
    if path.is_dir():
        raise IsADirectoryError(f"--out {path} is a folder: name the .safetensors file to write")
    check_writable(path.parent, "output folder")  # before minutes of work
    torch.set_num_threads(threads)
    pretrain(path, seed=seed, steps=steps, batch_size=batch_size)
    print(f"wrote {path}")
    return path
