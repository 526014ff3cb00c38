"""What belongs to the training and evaluation loops, as Lightning callbacks.

The tasks (:class:`~spar_pl.distill.DistillModule`, :class:`~spar_pl.evaluate.SegEvalModule`) compute; these
callbacks do the loop's bookkeeping around them, and the tasks attach the ones they need through
``configure_callbacks``:

* :class:`DataEpoch` gives the data module the epoch (its shuffle and, in ``fresh`` mode, augmentation);
* :class:`SkippedImages` counts the unusable images the stream skipped, over all ranks, and says so;
* :class:`LastCheckpoint` writes ``last.ckpt`` every N steps and at every epoch's end (resumable runs);
* :class:`CacheWriter` writes the teacher cache from ``spar-cli cache``'s predictions;
* :class:`ResultsFile` appends an evaluation's numbers to ``results/<name>.json``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint

from spar_pl.fileio import write_text


class DataEpoch(L.Callback):
    """Tell the data module (if it has ``set_epoch``) which epoch starts: every rank shuffles alike."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(trainer.current_epoch)


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
    (:class:`~spar_pl.data.ResumableLoader`), so a resumed run continues with the next image. Lightning's
    ``ModelCheckpoint`` takes either a step or an epoch interval, not both; this one does both and keeps no other
    file.

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
            every_n_epochs=None if every_n_train_steps else 1,
            save_on_train_epoch_end=True,
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # skips a step that was just saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


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
