"""What belongs to the training and evaluation loops, as Lightning callbacks.

The tasks (:class:`~spar_pl.distill.DistillModule`, :class:`~spar_pl.evaluate.SegEvalModule`) compute; these
callbacks do the loop's bookkeeping around them, and the tasks attach the ones they need through
``configure_callbacks``:

* :class:`DataEpoch` gives the data module the epoch (its shuffle and, in ``fresh`` mode, augmentation);
* :class:`SkippedImages` counts the unusable images the stream skipped, over all ranks, and says so;
* :class:`LastCheckpoint` writes ``last.ckpt`` every N steps and at every epoch's end (resumable runs);
* :class:`MetricsHistory` keeps a resumed run's ``metrics.csv`` history (each step once);
* :class:`CacheWriter` writes the teacher cache from ``spar-cli cache``'s predictions;
* :class:`ResultsFile` appends an evaluation's numbers to ``results/<name>.json``.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint

from spar_pl.fileio import write_text


class DataEpoch(L.Callback):
    """Tell the data module (if it has ``set_epoch``/``end_epoch``) which epoch starts and which is complete: every
    rank shuffles alike, and a checkpoint records the epoch a resumed run continues with.

    An epoch is complete after its last batch (before the checkpoint callbacks, which Lightning runs last, save a
    checkpoint at that step), or at its end when the loader ran out sooner.
    """

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(trainer.current_epoch)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            self.on_train_epoch_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if hasattr(datamodule, "end_epoch"):
            datamodule.end_epoch(trainer.current_epoch)


class SkippedImages(L.Callback):
    """At each epoch's end, log ``train/skipped_images`` (summed over ranks) and warn once when it is not zero."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        skipped = getattr(getattr(trainer, "datamodule", None), "skipped", 0)
        local = torch.tensor(float(skipped), device=pl_module.device)
        total = int(trainer.strategy.reduce(local, reduce_op="sum"))
        pl_module.log("train/skipped_images", float(total), sync_dist=False)
        if total and trainer.is_global_zero:
            warnings.warn(
                f"epoch {trainer.current_epoch}: skipped {total} unreadable images (named above)", stacklevel=1
            )


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` steps and at every epoch's end: what ``--ckpt_path last`` resumes.

    A long epoch is not lost to a stop mid-epoch: the checkpoint holds the training loader's position
    (:class:`~spar_pl.data.TrainingLoader`), so a resumed run continues with the next image. Lightning's
    ``ModelCheckpoint`` takes either a step or an epoch interval, not both: the step interval is its own, the
    epoch end is written here with ``Trainer.save_checkpoint`` (once, when the step interval did not just write
    it). No other file is kept. A ``ModelCheckpoint`` still, so that Lightning's ``ckpt_path="last"`` finds it.

    Args:
        every_n_train_steps: steps between mid-epoch checkpoints (0: at epoch ends only).
        dirpath: the checkpoint folder (default: the logger's run folder, ``.../version_N/checkpoints``).
    """

    def __init__(self, every_n_train_steps: int = 1000, dirpath: str | None = None) -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=every_n_train_steps or None,
            save_on_train_epoch_end=True,
        )
        self.step_interval = every_n_train_steps
        self.written_step = -1

    def written_at(self, step: int) -> bool:
        """Whether ``last.ckpt`` holds global step ``step`` (the step interval's save or this callback's)."""
        return bool(self.step_interval and step and step % self.step_interval == 0) or step == self.written_step

    def write_last(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` now (every rank calls it; the strategy writes the file once)."""
        path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
        self.last_model_path = path  # part of the callback's state in the checkpoint: set before saving
        trainer.save_checkpoint(path, self.save_weights_only)
        self.written_step = trainer.global_step
        for logger in trainer.loggers:
            logger.after_save_checkpoint(self)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (trainer.fast_dev_run or trainer.sanity_checking or self.written_at(trainer.global_step)):
            self.write_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (trainer.fast_dev_run or self.written_at(trainer.global_step)):
            self.write_last(trainer)  # a run stopped between epoch ends (max_steps) ends with its last step


class MetricsHistory(L.Callback):
    """Log a resumed run's metrics history again, so that its ``metrics.csv`` holds the whole run once.

    A CSV logger replaces the ``metrics.csv`` of the run folder it continues; this callback holds that file's text
    (read before the logger opened it) and, when training starts from the checkpoint, logs its rows before the
    checkpoint's global step through the logger, in order. Rows from the checkpoint's step on are left out: the
    resumed run logs those steps itself (no step twice).

    Args:
        text: the run's ``metrics.csv`` as it was; logger: the run's (CSV) logger.
    """

    def __init__(self, text: str, logger) -> None:
        self.text, self.logger = text, logger

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for row in csv.DictReader(io.StringIO(self.text)):
            step = row.pop("step", "")
            if not step or int(step) >= trainer.global_step:
                continue
            values = {key: _number(value) for key, value in row.items() if key and value not in ("", None)}
            if values:
                self.logger.log_metrics(values, step=int(step))
        self.logger.save()


def _number(text: str) -> int | float:
    return int(text) if text.lstrip("-").isdigit() else float(text)


CACHE_COUNTS = ("written", "kept", "recomputed", "skipped", "bytes", "float32_bytes")


class CacheWriter(BasePredictionWriter):
    """Writes :class:`~spar_pl.distill.TeacherCacheTask` predictions as cache entries, counts them, and sums the
    counts over the ranks at the end (``totals`` and ``per_rank`` on every rank)."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.counts = dict.fromkeys(CACHE_COUNTS, 0)
        self.totals: dict[str, int] = {}
        self.per_rank: list[dict[str, int]] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        store, counts = pl_module.store, self.counts
        if prediction["features"] is None:
            counts["kept"] += 1
        else:
            store.save(prediction["id"], prediction["content"], prediction["features"])
            counts["written"] += 1
        h, w = prediction["shape"]
        counts["bytes"] += store.path(prediction["id"]).stat().st_size
        counts["float32_bytes"] += 4 * pl_module.distill.student.embed_dim * h * w

    def on_predict_end(self, trainer, pl_module) -> None:
        self.counts["recomputed"] = pl_module.store.rejected
        self.counts["skipped"] = pl_module.loader.dataset.skipped.value
        local = torch.tensor([float(self.counts[k]) for k in CACHE_COUNTS], device=pl_module.device)
        gathered = trainer.strategy.all_gather(local).reshape(-1, len(CACHE_COUNTS)).cpu()
        self.per_rank = [dict(zip(CACHE_COUNTS, map(int, row.tolist()))) for row in gathered]
        self.totals = {k: sum(r[k] for r in self.per_rank) for k in CACHE_COUNTS}


class ResultsFile(L.Callback):
    """After a test run, append the task's ``results`` entry to ``<folder>/<name>.json`` (global rank 0 only).

    Args:
        folder: the results folder; name: the file stem (``spar-cli table`` renders one table per file).
    """

    def __init__(self, folder: str | Path, name: str) -> None:
        self.path = Path(folder) / f"{name}.json"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "test" and trainer.is_global_zero:
            read_results(self.path)  # a damaged results file fails now, not after the evaluation

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        entry = getattr(pl_module, "results", None)
        if entry is not None and trainer.is_global_zero:
            append_result(self.path, entry)


def read_results(path: Path) -> list[dict]:
    """The entries of a results file (``[]`` if there is none). Raises ``ValueError`` naming a file that is not
    a JSON list of entries."""
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"results file {path} is not valid JSON ({err}); move it away or fix it") from err
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"results file {path} is not a list of result entries; move it away or fix it")
    return entries


def append_result(path: Path, entry: dict) -> None:
    """Append one entry to a JSON list file, atomically (temporary file, then rename)."""
    entries = read_results(path)
    entries.append(entry)
    write_text(path, json.dumps(entries, indent=1))
