"""Open-vocabulary evaluation: features -> text similarity -> mask -> mIoU, and the results files.

:class:`SegEvalModule` evaluates an encoder (pretrained, a SPAR checkpoint or an exported student) in
single-pass or sliding-window mode on one benchmark (``docs/method.md`` section 4): predictions at the original
label resolution, dataset-level mIoU from torchmetrics' ``MulticlassJaccardIndex`` (macro, ignore index
255, classes absent from both prediction and label excluded), synchronised across DDP ranks. Every run
appends its numbers to ``results/<name>.json`` (:class:`~spar_pl.callbacks.ResultsFile`);
:func:`spar_pl.table.render_table` turns those into the paper's table.
"""

from __future__ import annotations

import resource
import time
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
from torchmetrics import MetricCollection, SumMetric
from torchmetrics.classification import MulticlassJaccardIndex

from spar_pl.callbacks import ResultsFile
from spar_pl.encoders import ModelSpec
from spar_pl.families import get_family
from spar_pl.fileio import file_sha256
from spar_pl.openvocab import OpenVocabHead, parse_classes
from spar_pl.sliding import SEGMENT_MODES, check_window, resolve_mode


def file_record(path: str | Path) -> dict:
    """``{"path": absolute path, "sha256": hex digest}`` of a weight file (a hub id or a missing file: no digest).
    Digests are kept per (path, size, modification time) for the life of the process: a table hashes each
    checkpoint once."""
    file = Path(path)
    if not file.is_file():
        return {"path": str(path), "sha256": None}
    return {"path": str(file.absolute()), "sha256": file_sha256(file)}


class SegEvalModule(L.LightningModule):
    """Open-vocabulary segmentation evaluation of one encoder on one benchmark.

    The encoder is the model its :class:`~spar_pl.encoders.ModelSpec` fields name (``backbone``, ``model_name``,
    ``pretrained``, ``weights``, ``head_weights``, ``checkpoint``, ``dense``: flat keys under ``model.init_args``).
    With a ``dense`` recipe, results go to ``<backbone>-<dense>.json`` unless ``results_name`` is set.

    Args:
        mode: ``single`` (one pass); ``sliding-logits`` (the authors' evaluation baseline: logits-level sliding
            window, :class:`~spar_pl.sliding.SlidingWindowLogits`); or ``sliding-features`` (the distillation
            teacher's feature-level sliding window, :class:`~spar_pl.sliding.SlidingWindowTeacher`, then the head);
            ``sliding``: ``sliding-logits`` (:func:`~spar_pl.sliding.resolve_mode`).
        crop: sliding-window side (default: the largest multiple of the patch within the model's pretraining size).
        stride: sliding-window stride.
        window_batch: windows per encoder call (the authors' evaluation: 60).
        classes: benchmark class list name or class-file path.
        logit_scale: similarity scale before the softmax.
        prob_thd: pixels whose best score is below this become class 0.
        area_thd: optional area threshold (``OpenVocabHead``).
        results_dir: folder of the results files (``None``: write none).
        results_name: results file stem (default: the backbone, with ``-test`` unless ``table``).
        pamr_steps: PAMR iterations on the logits before the mask rule (``OpenVocabHead``; NACLIP's protocol: 10);
            0: none.
        pamr_dilations: PAMR's dilations (NACLIP's: 8 and 16).
        row_label: the table row of this run (default: from mode, stride and checkpoint; :attr:`row`).
        table: this run is a cell of ``spar-cli table`` (recorded in its results entry; the table sets it).
        model: the :class:`~spar_pl.encoders.ModelSpec` fields of the encoder.
    """

    def __init__(
        self,
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
        pamr_steps: int = 0,
        pamr_dilations: tuple[int, ...] = (8, 16),
        row_label: str | None = None,
        table: bool = False,
        **model,
    ) -> None:
        super().__init__()
        #: the evaluation mode, ``sliding`` resolved to ``sliding-logits``
        self.mode = resolve_mode(mode, SEGMENT_MODES)
        self.save_hyperparameters()
        #: the mask rule's settings (``configs/eval/*.yaml``: the published protocol of each benchmark)
        self.protocol = {"logit_scale": logit_scale, "prob_thd": prob_thd, "area_thd": area_thd}
        if pamr_steps:  # NACLIP's post-processing (recorded in the results only when on)
            self.protocol |= {"pamr_steps": pamr_steps, "pamr_dilations": list(pamr_dilations)}
        #: the evaluated model
        self.spec = ModelSpec(**model)
        self.encoder = self.spec.build().eval()
        if self.mode != "single":  # a window the fold cannot take fails here, before any data is read
            check_window(int(crop or self.encoder.default_crop), stride, self.encoder.patch_size, window_batch)
        # The head's text embeddings are computed once the module is on its device (:meth:`build_head`): the
        # encoder is the only module holding weights, so the state dict holds the backbone once.
        self.classes = parse_classes(classes)
        self.head: OpenVocabHead | None = None
        k = len(self.classes)
        jaccard = {"ignore_index": 255, "validate_args": False}
        # one confusion matrix for both (a compute group): mIoU (macro) and the per-class IoU
        self.metrics = MetricCollection(
            {
                "mIoU": MulticlassJaccardIndex(k, average="macro", **jaccard),
                "IoU": MulticlassJaccardIndex(k, average="none", **jaccard),
            },
            compute_groups=[["mIoU", "IoU"]],
        )
        #: totals over every rank's test images (the metrics synchronise when computed)
        self.seconds, self.images, self.pixels = (SumMetric().set_dtype(torch.float64) for _ in range(3))
        #: the config files of the run (``spar-cli`` sets them; recorded in the results entry)
        self.config_files: list[str] = []

    @property
    def row(self) -> str:
        """The table row this configuration belongs to."""
        hp = self.hparams
        if hp.row_label:
            return hp.row_label
        # a family whose weights file is its released backbone (dinov3txt) has SPAR weights only as a checkpoint
        spec = self.spec
        trained = spec.checkpoint or (spec.weights and not get_family(self.encoder.family).release_weights)
        trained = trained or getattr(self.encoder, "spar_config", None) is not None  # a SPAR student's Hub folder
        if self.mode != "single":
            kind = "sliding window" if self.mode == "sliding-logits" else "feature-level sliding window"
            return f"{'SPAR' if trained else 'pretrained'}, {kind} s={hp.stride}"
        return "SPAR" if trained else "pretrained, single pass"

    def build_head(self) -> OpenVocabHead:
        """The open-vocabulary head, its text embeddings computed on the module's device on first use."""
        if self.head is None:
            self.head = OpenVocabHead.from_encoder(self.encoder, self.classes, device=self.device, **self.protocol)
        return self.head

    def on_test_start(self) -> None:
        self.build_head()

    def on_predict_start(self) -> None:
        self.build_head()

    @torch.no_grad()
    def predict_mask(self, image01: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Class-index mask ``(H0, W0)`` of one test-resized ``[0, 1]`` image, at the label size."""
        hp = self.hparams
        x = self.encoder.normalize(image01[None].to(self.device))
        return self.build_head().segment(self.encoder, x, size, self.mode, hp.crop, hp.stride, hp.window_batch)[0]

    def test_step(self, batch: dict, batch_idx: int) -> None:
        for image, label in zip(batch["image"], batch["label"]):
            label = label.to(self.device)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            pred = self.predict_mask(image, tuple(label.shape))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds.update(time.perf_counter() - start)
            self.images.update(1)
            self.pixels.update((label != 255).sum())
            self.metrics.update(pred, label)

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
        seconds, images, pixels = float(self.seconds.compute()), int(self.images.compute()), int(self.pixels.compute())
        computed = self.metrics.compute()
        miou, per_class = float(computed["mIoU"]), computed["IoU"].tolist()
        names = [synonyms[0] for synonyms in self.classes]
        self.log("test/mIoU", miou * 100)
        self.log("test/seconds_per_image", seconds / max(images, 1))
        self.log("test/peak_memory_mb", self.peak_memory_mb())
        for name, value in zip(names, per_class):
            self.log(f"test/IoU/{name}", value * 100)
        hp = self.hparams
        dataset = getattr(getattr(self.trainer, "datamodule", None), "hparams", {}).get("dataset", hp.classes)
        #: this run's numbers, the entry :class:`~spar_pl.callbacks.ResultsFile` appends to the results file
        self.results = {
            "dataset": dataset,
            "row": self.row,
            "mIoU": miou * 100,
            "per_class_IoU": dict(zip(names, (v * 100 for v in per_class))),
            "images": images,
            "pixels": pixels,
            "seconds_per_image": seconds / max(images, 1),
            "peak_memory_mb": self.peak_memory_mb(),
            "devices": self.trainer.world_size,
            "config": {k: getattr(self.spec, k) for k in ("model_name", "checkpoint", "weights", "head_weights")}
            | {"stride": hp.stride, "backbone": self.encoder.backbone}
            | ({"dense": self.spec.dense} if self.spec.dense is not None else {})
            | {"mode": self.mode, "crop": (hp.crop or self.encoder.default_crop) if self.mode != "single" else None}
            | self.protocol,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **(self.provenance() if self.trainer.is_global_zero else {}),
        }

    def provenance(self) -> dict:
        """Where this run's numbers come from: the weight files (path and SHA-256), the data root, the config files
        and the command (``spar-cli table`` or an ad-hoc ``spar-cli test``)."""
        hp = self.hparams
        datamodule = getattr(self.trainer, "datamodule", None)
        root = getattr(getattr(datamodule, "data", None), "root", None)
        paths = {k: getattr(self.spec, k) for k in ("checkpoint", "weights", "head_weights")}
        files = {k: file_record(path) for k, path in paths.items() if path}
        return {
            "source": "spar-cli table" if hp.table else "spar-cli test",
            "files": files,
            "data_root": str(Path(root).absolute()) if root is not None else None,
            "config_files": [str(Path(f).absolute()) for f in self.config_files],
        }

    def configure_callbacks(self) -> list[L.Callback]:
        """The results file of this run (``results_dir``/``results_name``.json), when ``results_dir`` is set."""
        hp = self.hparams
        dense = self.spec.dense
        default = self.encoder.backbone if dense is None else f"{self.encoder.backbone}-{dense}"
        default += "" if hp.table else "-test"  # a table's cells come only from the table's own runs
        return [ResultsFile(hp.results_dir, hp.results_name or default)] if hp.results_dir else []
