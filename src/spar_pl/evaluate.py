"""Open-vocabulary evaluation: features -> text similarity -> mask -> mIoU, results files and the paper's tables.

:class:`SegEvalModule` evaluates an encoder (pretrained, a SPAR checkpoint or an exported student) in
single-pass or sliding-window mode on one benchmark (``SPAR.md`` section 4): predictions at the original
label resolution, dataset-level mIoU from torchmetrics' ``MulticlassJaccardIndex`` (macro, ignore index
255, classes absent from both prediction and label excluded), synchronised across DDP ranks. Every run
appends its numbers to ``results/<name>.json``; :func:`render_table` turns those into the paper's table.
"""

from __future__ import annotations

import json
import resource
import time
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassJaccardIndex

from spar_pl.callbacks import ResultsFile
from spar_pl.encoders import build_encoder
from spar_pl.fileio import write_text
from spar_pl.openvocab import SEGMENT_MODES, OpenVocabHead, parse_classes
from spar_pl.sliding import check_window

#: Column order of the paper's tables (``SPAR.md`` section 5) and their headers.
TABLE_COLUMNS = {
    "voc21": "VOC21",
    "voc20": "VOC20",
    "cityscapes": "City",
    "ade20k": "ADE",
    "context60": "C60",
    "context59": "C59",
}
ROWS = ("pretrained, single pass", "pretrained, sliding window s=24", "SPAR")
#: Evaluation modes: single pass, the authors' logits-level sliding window, the teacher's feature-level one.
MODES = SEGMENT_MODES


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
        protocol_overrides: per benchmark (the ``classes`` name), settings of the published protocol that differ
            for this backbone, e.g. MaskCLIP on VOC21 ``{"voc21": {"prob_thd": 0.1, "area_thd": 0.1}}`` (set in
            ``configs/backbones/maskclip*.yaml``); they replace ``logit_scale``/``prob_thd``/``area_thd`` for that
            benchmark, and the run says so. ``{}`` turns them off.
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
        protocol_overrides: dict[str, dict[str, float | None]] | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if stride < 1:
            raise ValueError(f"stride must be a positive number of pixels, got {stride}")
        self.save_hyperparameters()
        override = dict((protocol_overrides or {}).get(str(classes), {}))
        unknown = set(override) - {"logit_scale", "prob_thd", "area_thd"}
        if unknown:
            raise ValueError(f"protocol_overrides[{classes!r}]: unknown settings {', '.join(sorted(unknown))}")
        if override:
            settings = ", ".join(f"{k} {v}" for k, v in override.items())
            rank_zero_only(print)(f"{backbone} protocol for {classes}: {settings} (protocol_overrides)")
        logit_scale = override.get("logit_scale", logit_scale)
        prob_thd = override.get("prob_thd", prob_thd)
        area_thd = override.get("area_thd", area_thd)
        self.protocol = {"logit_scale": logit_scale, "prob_thd": prob_thd, "area_thd": area_thd}
        self.encoder = build_encoder(
            backbone,
            model_name,
            pretrained=pretrained,
            weights=weights,
            checkpoint=checkpoint,
            head_weights=head_weights,
        ).eval()
        if mode != "single":  # a window the fold cannot take fails here, before any data is read
            check_window(int(crop or self.encoder.native_size), stride, self.encoder.patch_size, window_batch)
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
        return self.build_head().segment(self.encoder, x, size, hp.mode, hp.crop, hp.stride, hp.window_batch)[0]

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
        reduce = self.trainer.strategy.reduce
        seconds = float(reduce(self.seconds.clone(), reduce_op="sum"))
        images = int(reduce(self.images.clone(), reduce_op="sum"))
        pixels = int(reduce(self.pixels.clone(), reduce_op="sum"))
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
            "config": {
                k: hp[k] for k in ("backbone", "model_name", "checkpoint", "weights", "head_weights", "mode", "stride")
            }
            | {"crop": (hp.crop or self.encoder.native_size) if hp.mode != "single" else None}
            | self.protocol,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def configure_callbacks(self) -> list[L.Callback]:
        """The results file of this run (``results_dir``/``results_name``.json), when ``results_dir`` is set."""
        hp = self.hparams
        return [ResultsFile(hp.results_dir, hp.results_name or hp.backbone)] if hp.results_dir else []


def render_table(results: Path, out: Path | None = None, title: str | None = None) -> str:
    """The paper's table (rows x six benchmarks + mean + seconds per image) from a results file.

    The newest entry of each (row, dataset) counts; a missing cell is ``-`` and the mean is then omitted.
    """
    entries = json.loads(Path(results).read_text())
    cells: dict[tuple[str, str], dict] = {}
    for e in entries:
        cells[(e["row"], e["dataset"])] = e
    rows = [r for r in ROWS if any(k[0] == r for k in cells)] + sorted({k[0] for k in cells} - set(ROWS))
    header = ["inference", *TABLE_COLUMNS.values(), "mean", "s/img"]
    lines = [f"## {title or Path(results).stem}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = [cells.get((row, d), {}).get("mIoU") for d in TABLE_COLUMNS]
        secs = [cells[(row, d)]["seconds_per_image"] for d in TABLE_COLUMNS if (row, d) in cells]
        mean = sum(values) / len(values) if all(v is not None for v in values) else None
        shown = ["-" if v is None else f"{v:.1f}" for v in (*values, mean)]
        s_img = f"{sum(secs) / len(secs):.3f}" if secs else "-"
        lines.append("| " + " | ".join([row, *shown, s_img]) + " |")
    text = "\n".join(lines) + "\n"
    if out is not None:
        write_text(out, text)
    return text


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def table_runs(
    backbone: str, checkpoint: str | None, roots: dict[str, Path] | None = None, stride: int = 24
) -> list[tuple[str, str, list[str]]]:
    """The ``spar-cli test`` argument lists behind one table: (dataset, row, args) for 6 benchmarks x 3 rows."""
    backbone_cfg = CONFIGS / "backbones" / f"{backbone}.yaml"
    if not backbone_cfg.is_file():
        raise FileNotFoundError(f"no backbone config {backbone_cfg}")
    runs = []
    for dataset in TABLE_COLUMNS:
        args = ["test", "--config", str(CONFIGS / "eval" / f"{dataset}.yaml"), "--config", str(backbone_cfg)]
        if roots is not None:
            args += ["--data.init_args.root", str(roots[dataset])]
        runs.append((dataset, ROWS[0], args))
        runs.append(
            (dataset, ROWS[1], [*args, "--model.init_args.mode", "sliding", "--model.init_args.stride", str(stride)])
        )
        if checkpoint:
            runs.append((dataset, ROWS[2], [*args, "--model.init_args.checkpoint", str(checkpoint)]))
    return runs


def run_table(backbone: str, checkpoint: str | None, results_dir: str = "results", roots=None, extra=()) -> str:
    """Run the 18 evaluations of one backbone in this process and render ``results/<backbone>.md``."""
    from spar_pl.cli import main

    runs = table_runs(backbone, checkpoint, roots)
    for k, (dataset, row, args) in enumerate(runs, 1):
        print(f"[{k}/{len(runs)}] {dataset}: {row}", flush=True)
        quiet = ["--trainer.enable_progress_bar", "false", "--verbose", "false"]  # the table is the summary
        main([*args, "--model.init_args.results_dir", results_dir, *quiet, *extra])
    results = Path(results_dir) / f"{backbone}.json"
    table = render_table(results, Path(results_dir) / f"{backbone}.md", title=f"{backbone}: mIoU (%)")
    print(table)
    return table


def table_command(argv=None) -> str:
    """``spar-cli table --backbone B [--ckpt SPAR.ckpt] [--tiny]``: the paper's table for a backbone config.

    ``--tiny`` writes tiny versions of the six benchmarks in their official layouts, distils the tiny
    model for a SPAR checkpoint, and runs the whole table with ``configs/backbones/tiny.yaml`` on a CPU
    (``--backbone dinov3txt --tiny``: the DINOv3.txt tiny twin, ``configs/*/dinov3txt-tiny.yaml``).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="spar-cli table", description=table_command.__doc__)
    parser.add_argument(
        "--backbone", default="siglip2", help="a config in configs/backbones/ (siglip2, maskclip, dinov3txt)"
    )
    parser.add_argument("--ckpt", default=None, help="SPAR checkpoint for the SPAR row")
    parser.add_argument("--results", default="results", help="results folder")
    parser.add_argument("--render-only", action="store_true", help="only render results/<backbone>.md")
    parser.add_argument("--tiny", action="store_true", help="tiny model and generated benchmarks (CPU, offline)")
    args = parser.parse_args(argv)
    if args.render_only:
        table = render_table(Path(args.results) / f"{args.backbone}.json", Path(args.results) / f"{args.backbone}.md")
        print(table)
        return table
    if not args.tiny:
        return run_table(args.backbone, args.ckpt, args.results)
    return table_tiny(Path(args.results), TINY_TWINS.get(args.backbone, "tiny"))


#: The tiny configs (``configs/backbones/<name>.yaml`` and ``configs/distill/<name>.yaml``) standing in for a backbone.
TINY_TWINS = {"dinov3txt": "dinov3txt-tiny"}


def table_tiny(results: Path, name: str = "tiny") -> str:
    """The whole table pipeline on generated data: tiny benchmarks, a tiny distillation, 18 evaluations.

    Args:
        results: results folder.
        name: the tiny configs to use (``tiny``: SigLIP2-shaped; ``dinov3txt-tiny``: the DINOv3.txt twin).
    """
    from spar_pl.cli import main
    from spar_pl.data import write_sample_images
    from spar_pl.segdata import write_tiny_benchmarks

    work = results / ("table-tiny" if name == "tiny" else f"table-{name}")
    roots = write_tiny_benchmarks(work / "data", images=2)
    write_sample_images(work / "distill-data", 8, seed=0)
    fit = ["fit", "--config", str(CONFIGS / "distill" / f"{name}.yaml"), "--trainer.max_epochs", "2"]
    fit += ["--data.init_args.train_source", str(work / "distill-data"), "--data.init_args.val_source", "null"]
    fit += ["--trainer.default_root_dir", str(work / "distill"), "--trainer.enable_progress_bar", "false"]
    main(fit)
    checkpoint = max((work / "distill").rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    return run_table(name, str(checkpoint), str(results), roots)
