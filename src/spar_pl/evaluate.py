"""Open-vocabulary evaluation: features -> text similarity -> mask -> mIoU, and the results files.

:class:`SegEvalModule` evaluates an encoder (pretrained, a SPAR checkpoint or an exported student) in
single-pass or sliding-window mode on one benchmark (``SPAR.md`` section 4): predictions at the original
label resolution, dataset-level mIoU from torchmetrics' ``MulticlassJaccardIndex`` (macro, ignore index
255, classes absent from both prediction and label excluded), synchronised across DDP ranks. Every run
appends its numbers to ``results/<name>.json``; :func:`spar_pl.table.render_table` turns those into the paper's
table.
"""

from __future__ import annotations

import json
import resource
import time
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from spar_pl.encoders import build_encoder
from spar_pl.fileio import write_text
from spar_pl.openvocab import OpenVocabHead
from spar_pl.sliding import SlidingWindowTeacher

#: Evaluation modes: single pass, the authors' logits-level sliding window, the teacher's feature-level one.
MODES = ("single", "sliding", "sliding-features")


class SegEvalModule(L.LightningModule):
    """Open-vocabulary segmentation evaluation of one encoder on one benchmark.

    Args:
        backbone: ``maskclip``, ``maskclip-legacy``, ``siglip2`` or ``dinov3txt``.
        model_name: open_clip name or ``hf-hub:`` id (default: the backbone's).
        pretrained: open_clip pretrained tag (``"default"``: the backbone's).
        weights: local open_clip weights file (e.g. a ``spar-cli export`` file); for ``dinov3txt`` the DINOv3
            backbone file.
        head_weights: ``dinov3txt`` only: the dino.txt vision-head and text-encoder file.
        checkpoint: a SPAR checkpoint (the authors' ``.ckpt``, a ``spar-cli fit`` checkpoint, ...).
        mode: ``single`` (one pass); ``sliding`` (the authors' evaluation baseline: logits-level sliding window,
            :class:`~spar_pl.sliding.SlidingWindowLogits`); or ``sliding-features`` (the distillation teacher's
            feature-level sliding window, :class:`~spar_pl.sliding.SlidingWindowTeacher`, then the head).
        crop: sliding-window side (default: the model's pretraining size).
        stride: sliding-window stride.
        window_batch: windows per encoder call (the authors' evaluation: 60).
        classes: benchmark class list name or class-file path.
        logit_scale: similarity scale before the softmax.
        prob_thd: pixels whose best score is below this become class 0.
        area_thd: optional area threshold (``OpenVocabHead``).
        results_dir: folder of the results files (``None``: write none).
        results_name: results file stem (default: the backbone).
    """

    def __init__(
        self,
        backbone: str = "siglip2",
        model_name: str | None = None,
        pretrained: str | None = "default",
        weights: str | None = None,
        head_weights: str | None = None,
        checkpoint: str | None = None,
        mode: str = "single",
        crop: int | None = None,
        stride: int = 24,
        window_batch: int = 16,
        classes: str = "voc21",
        logit_scale: float = 40.0,
        prob_thd: float = 0.0,
        area_thd: float | None = None,
        results_dir: str | None = "results",
        results_name: str | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if stride < 1:
            raise ValueError(f"stride must be a positive number of pixels, got {stride}")
        self.save_hyperparameters()
        self.encoder = build_encoder(
            backbone,
            model_name,
            pretrained=pretrained,
            weights=weights,
            checkpoint=checkpoint,
            head_weights=head_weights,
        ).eval()
        self.teacher = SlidingWindowTeacher(self.encoder, crop, stride, window_batch) if mode != "single" else None
        self.head = OpenVocabHead(self.encoder, classes, logit_scale=logit_scale, prob_thd=prob_thd, area_thd=area_thd)
        k = self.head.num_classes
        self.miou = MulticlassJaccardIndex(k, average="macro", ignore_index=255, validate_args=False)
        self.iou = MulticlassJaccardIndex(k, average="none", ignore_index=255, validate_args=False)
        self.register_buffer("seconds", torch.zeros(()), persistent=False)
        self.register_buffer("images", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("pixels", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def row(self) -> str:
        """The table row this configuration belongs to."""
        hp = self.hparams
        # dinov3txt's weights are the released backbone; SPAR weights come as a checkpoint
        trained = hp.checkpoint or (hp.weights and hp.backbone != "dinov3txt")
        if hp.mode != "single":
            kind = "sliding window" if hp.mode == "sliding" else "feature-level sliding window"
            return f"{'SPAR' if trained else 'pretrained'}, {kind} s={hp.stride}"
        return "SPAR" if trained else "pretrained, single pass"

    @torch.no_grad()
    def predict_mask(self, image01: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Class-index mask ``(H0, W0)`` of one test-resized ``[0, 1]`` image, at the label size."""
        x = self.encoder.normalize(image01[None].to(self.device))
        if self.hparams.mode == "sliding":
            t = self.teacher
            return self.head.predict_sliding(self.encoder, x, size, t.crop, t.stride, t.window_batch)[0]
        feats = self.teacher(x) if self.teacher is not None else self.encoder(x)
        return self.head.predict(feats, size)[0]

    def test_step(self, batch: dict, batch_idx: int) -> None:
        for image, label in zip(batch["image"], batch["label"]):
            label = label.to(self.device)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            pred = self.predict_mask(image, tuple(label.shape))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds += time.perf_counter() - start
            self.images += 1
            self.pixels += (label != 255).sum()
            self.miou.update(pred, label)
            self.iou.update(pred, label)

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """``spar-cli predict``: the class-index mask of each image at its label size, with its name."""
        return [
            {"name": name, "mask": self.predict_mask(image, tuple(label.shape)).cpu()}
            for name, image, label in zip(batch["name"], batch["image"], batch["label"])
        ]

    def peak_memory_mb(self) -> float:
        """Peak accelerator memory (CUDA) or the process's peak resident memory (CPU), in MiB."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def on_test_epoch_end(self) -> None:
        reduce = self.trainer.strategy.reduce
        seconds = float(reduce(self.seconds.clone(), reduce_op="sum"))
        images = int(reduce(self.images.clone(), reduce_op="sum"))
        pixels = int(reduce(self.pixels.clone(), reduce_op="sum"))
        miou = float(self.miou.compute())
        per_class = self.iou.compute().tolist()
        names = [synonyms[0] for synonyms in self.head.classes]
        self.log("test/mIoU", miou * 100)
        self.log("test/seconds_per_image", seconds / max(images, 1))
        self.log("test/peak_memory_mb", self.peak_memory_mb())
        for name, value in zip(names, per_class):
            self.log(f"test/IoU/{name}", value * 100)
        hp = self.hparams
        if hp.results_dir and self.trainer.is_global_zero:
            dataset = getattr(getattr(self.trainer, "datamodule", None), "hparams", {}).get("dataset", hp.classes)
            entry = {
                "dataset": dataset,
                "row": self.row,
                "mIoU": miou * 100,
                "per_class_IoU": dict(zip(names, (v * 100 for v in per_class))),
                "images": images,
                "pixels": pixels,
                "seconds_per_image": seconds / max(images, 1),
                "peak_memory_mb": self.peak_memory_mb(),
                "devices": self.trainer.world_size,
                "config": {
                    k: hp[k]
                    for k in ("backbone", "model_name", "checkpoint", "weights", "head_weights", "mode", "stride")
                }
                | {"crop": self.teacher.crop if self.teacher is not None else None}
                | {k: hp[k] for k in ("logit_scale", "prob_thd", "area_thd")},
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            append_result(Path(hp.results_dir) / f"{hp.results_name or hp.backbone}.json", entry)


def append_result(path: Path, entry: dict) -> None:
    """Append one entry to a JSON list file, atomically (temporary file, then rename)."""
    entries = json.loads(path.read_text()) if path.is_file() else []
    entries.append(entry)
    write_text(path, json.dumps(entries, indent=1))
