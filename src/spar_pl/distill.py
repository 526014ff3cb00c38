"""SPAR distillation: a frozen sliding-window teacher, a trainable single-pass student, MSE on features.

``docs/method.md`` section 3. The teacher is a frozen copy of the student's initial backbone wrapped in a
:class:`~spar_pl.sliding.SlidingWindowTeacher`: a registered child (model summaries, device moves and wrapping
policies see it) in eval mode without gradients, kept out of checkpoints by :meth:`DistillModule.on_save_checkpoint`.
"""

from __future__ import annotations

import copy
import dataclasses

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from spar_pl.cache import TeacherCache, weights_fingerprint
from spar_pl.callbacks import CacheWriter, DataEpoch, SkippedImages
from spar_pl.data import with_multiple
from spar_pl.encoders import DenseEncoder, ModelSpec
from spar_pl.images import READER_VERSION
from spar_pl.sliding import SlidingWindowTeacher
from spar_pl.weights import load_checkpoint

#: the checkpoint entry holding the running epoch's training-loss sums
TRAIN_LOSS_KEY = "train_loss_sums"


class DistillModule(L.LightningModule):
    """Distil the sliding-window teacher into the single-pass student.

    The student is the model its :class:`~spar_pl.encoders.ModelSpec` fields name (``backbone``, ``model_name``,
    ``pretrained``, ``weights``, ``head_weights``, ``checkpoint``, ``dense``: flat keys under ``model.init_args``);
    the teacher is a frozen copy of the pretrained model (``dense``: the recipe of both). A ``checkpoint`` (a SPAR
    student to distil further) is loaded into the student only: the teacher stays the pretrained model's sliding
    window, the paper's target, so its weights are needed as without a checkpoint.

    Args:
        crop: teacher window side (default: the largest multiple of the student's patch within the model's
            pretraining size, e.g. 378 for a 384 px, patch-14 model).
        stride: teacher window stride (the paper: 24).
        window_batch: teacher windows per encoder call.
        trainable: trainable-parameter spec of the student (``blk_-1,blk_-2``; ``all`` for SPAR ALL).
        lr: AdamW learning rate (constant).
        weight_decay: AdamW weight decay.
        teacher_cache: a teacher-feature cache folder (``spar-cli cache`` fills it); ``None`` runs the teacher
            in every training step. Entries missing, corrupt or written under another configuration are
            recomputed and rewritten. Needs the data module's ``fixed`` augmentation and batch size 1.
        model: the :class:`~spar_pl.encoders.ModelSpec` fields of the student.
    """

    def __init__(
        self,
        crop: int | None = None,
        stride: int = 24,
        window_batch: int = 16,
        trainable: str = "blk_-1,blk_-2",
        lr: float = 2e-5,
        weight_decay: float = 1e-4,
        teacher_cache: str | None = None,
        **model,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        #: the student's model (the teacher is a frozen copy of it without the checkpoint)
        self.spec = ModelSpec(**model)
        self.spec.check_files()  # a missing checkpoint is named before the pretrained model is built
        self.student: DenseEncoder = dataclasses.replace(self.spec, checkpoint=None).build()
        self.trainable_names = self.student.set_trainable(trainable)
        # The teacher copies the vision tower only; the text tower (frozen, unused by the loss) stays shared.
        model = self.student.model
        shared = {id(m): m for name, m in model.named_children() if name != "visual"}
        shared.update({id(p): p for _, p in model.named_parameters(recurse=False)})
        teacher_encoder = copy.deepcopy(self.student, memo=shared).eval().requires_grad_(False)
        self.teacher = SlidingWindowTeacher(teacher_encoder, crop, stride, window_batch).eval()
        if self.spec.checkpoint is not None:
            load_checkpoint(self.student, self.spec.checkpoint)
        self.student.train()
        self.cache: TeacherCache | None = None
        #: the epoch's mean training loss (``train/loss_epoch``); its state is saved in checkpoints, so an epoch
        #: resumed mid-way reports the mean over all of its steps
        self.train_loss = MeanMetric()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: dropout and the like stay off while the student trains
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the teacher out of checkpoints (it is the initial backbone, rebuilt from the configuration); keep the
        running epoch's loss sums, summed over the ranks (every rank writes the checkpoint's contents)."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]
        with self.train_loss.sync_context():
            checkpoint[TRAIN_LOSS_KEY] = {k: v.detach().cpu().clone() for k, v in self.train_loss.metric_state.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Put this module's own teacher back into a checkpoint's state dict (saved without it), so that strict
        loading checks every student key and the teacher stays the frozen initial backbone; restore the running
        epoch's loss sums (on global rank 0, as they are summed over the ranks)."""
        state = checkpoint["state_dict"]
        for key, value in self.teacher.state_dict(prefix="teacher.").items():
            state.setdefault(key, value)
        self.train_loss.reset()
        sums = checkpoint.get(TRAIN_LOSS_KEY)
        if sums and self.global_rank == 0:
            self.train_loss.merge_state({k: v.to(self.device) for k, v in sums.items()})

    @property
    def crop_multiple(self) -> int:
        """The side multiple of training images: the student's patch (the data module floors crops to it)."""
        return int(self.student.patch_size)

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher targets ``(B, C, H // p, W // p)`` of normalised images."""
        return self.teacher(images).float()

    def check_cache_data(self, datamodule) -> None:
        """Raise ``ValueError`` unless the data module can use a teacher cache (fixed augmentation, batch size 1)."""
        data = datamodule.hparams
        if not self.hparams.teacher_cache:
            raise ValueError("set --model.init_args.teacher_cache DIR (or teacher_cache in the config)")
        if data.mode != "fixed" or data.batch_size != 1:
            raise ValueError(
                f"teacher_cache needs the data module's fixed augmentation and batch_size 1 (got mode={data.mode!r}, "
                f"batch_size={data.batch_size}); fresh augmentation needs the in-step teacher (teacher_cache: null)"
            )

    def open_cache(self, datamodule, precision: str, owner: bool = True) -> TeacherCache:
        """The teacher cache for this model and the data module's augmentation (checks compatibility); ``owner``:
        see :class:`~spar_pl.cache.TeacherCache` (under DDP, global rank 0 only)."""
        self.check_cache_data(datamodule)
        hp, data = self.hparams, datamodule.hparams
        manifest = {
            "backbone": self.student.backbone,
            "model_name": self.student.model_name,
            "weights": weights_fingerprint(self.teacher.encoder.model.visual),  # the values, whatever their name
            "crop": self.teacher.crop,
            "stride": self.teacher.stride,
            "seed": data.seed,
            "augmentation": repr(with_multiple(datamodule.augmentation, self.crop_multiple)),
            "precision": str(precision),  # the trainer precision the teacher ran under (its autocast)
            "reader": READER_VERSION,  # how the images were decoded
        }
        if self.spec.dense not in (None, "maskclip"):  # another last block: other teacher features
            manifest["dense"] = self.spec.dense
        return TeacherCache(hp.teacher_cache, manifest, owner)

    def setup(self, stage: str) -> None:
        if self.hparams.teacher_cache and stage == "fit":
            # one owner cleans and writes the manifest before any rank writes: Lightning holds a barrier after setup
            self.cache = self.open_cache(self.trainer.datamodule, self.trainer.precision, self.trainer.is_global_zero)

    def targets(
        self,
        images: torch.Tensor,
        ids: list[str] | None = None,
        contents: list[str] | None = None,
        train: bool = False,
    ) -> torch.Tensor:
        """Teacher targets for normalised images: from the cache when training with one, else computed.

        ``ids`` and ``contents`` (the content hashes of the source images) key the cache entries.
        """
        if self.cache is None or not train or ids is None or contents is None:
            return self.teacher_features(images)
        p = self.student.patch_size
        shape = (images.shape[-2] // p, images.shape[-1] // p)
        cached = [self.cache.load(i, c, shape) for i, c in zip(ids, contents)]
        if any(c is None for c in cached):
            computed = self.teacher_features(images)
            for k, (image_id, content) in enumerate(zip(ids, contents)):
                if cached[k] is None:
                    self.cache.save(image_id, content, computed[k])
            return computed
        return torch.stack(cached).to(images.device)

    def feature_loss(self, images01: torch.Tensor, batch: dict | None = None, train: bool = False) -> torch.Tensor:
        """MSE between student and teacher features of a batch of ``[0, 1]`` images (``batch``: its ids and
        content hashes, for the teacher cache)."""
        images = self.student.normalize(images01)
        batch = batch or {}
        targets = self.targets(images, batch.get("id"), batch.get("content"), train)
        preds = self.student(images)[..., : targets.shape[-2], : targets.shape[-1]]
        return F.mse_loss(preds.float(), targets)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.feature_loss(batch["image"], batch, train=True)
        size = len(batch["image"])
        self.log("train/loss_step", loss, prog_bar=True, sync_dist=True, batch_size=size)
        self.train_loss.update(loss.detach(), weight=size)
        return loss

    def on_train_epoch_end(self) -> None:
        # the mean over every rank's steps (the metric synchronises), so "lowest train/loss_epoch" is one checkpoint
        # choice on every rank; reset before the epoch-end checkpoint, which the next epoch then starts from
        self.log("train/loss_epoch", self.train_loss.compute(), prog_bar=True, sync_dist=True)
        self.train_loss.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.feature_loss(batch["image"])
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(batch["image"]))
        return loss

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """``spar-cli predict``: the student's dense features of each image, with its id."""
        with torch.no_grad():
            return {"id": batch.get("id"), "features": self.student(self.student.normalize(batch["image"])).cpu()}

    def configure_callbacks(self) -> list[L.Callback]:
        """The loop's work for this task: the data module's epoch, and the count of skipped images."""
        return [DataEpoch(), SkippedImages()]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.student.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class TeacherCacheTask(L.LightningModule):
    """``spar-cli cache`` as a Lightning predict run: every rank of the trainer's strategy (DDP over ``devices`` and
    ``num_nodes``) runs the teacher over its own disjoint share of the training images, under the trainer's
    precision (the autocast of the in-step teacher). Entries already valid are kept after a header-only check;
    :class:`CacheWriter` writes the others. Resumable: a re-run computes only what is missing or stale.

    Args:
        distill: the model whose teacher fills the cache (``teacher_cache`` set).
        datamodule: the :class:`~spar_pl.data.DistillDataModule` whose training images and augmentation are cached.
    """

    def __init__(self, distill: DistillModule, datamodule) -> None:
        super().__init__()
        distill.check_cache_data(datamodule)
        self.distill = distill
        self.data = datamodule
        self.store: TeacherCache | None = None
        self.loader = None

    def setup(self, stage: str) -> None:
        # one owner cleans and writes the manifest before any rank writes: Lightning holds a barrier after setup
        self.store = self.distill.open_cache(self.data, self.trainer.precision, self.trainer.is_global_zero)

    @property
    def crop_multiple(self) -> int:
        """The side multiple of the cached images: the student's patch."""
        return self.distill.crop_multiple

    def predict_dataloader(self):
        # this rank's share, floored to the student's patch
        self.loader = self.data.cache_dataloader(self.global_rank, self.trainer.world_size, self.crop_multiple)
        return self.loader

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """The teacher features of one image, or ``None`` features when its valid entry is kept."""
        image_id, content, image = batch["id"][0], batch["content"][0], batch["image"]
        p = self.distill.student.patch_size
        shape = (image.shape[-2] // p, image.shape[-1] // p)
        out = {"id": image_id, "content": content, "shape": shape, "features": None}
        if not self.store.is_valid(image_id, content, shape):
            out["features"] = self.distill.teacher_features(self.distill.student.normalize(image))[0]
        return out


def fill_teacher_cache(model: DistillModule, datamodule, trainer: L.Trainer) -> dict:
    """Run the teacher once over the training set into ``model.teacher_cache`` with ``trainer``: its device(s),
    strategy (DDP over ``devices`` x ``num_nodes``, each rank a disjoint share of the images) and precision
    (``spar-cli cache``, :class:`TeacherCacheTask` and :class:`~spar_pl.callbacks.CacheWriter`). Resumable: valid
    entries are kept after a header check; missing, corrupt or stale ones are computed. Rank 0 prints one summary for
    the whole job.

    Args:
        model: the distillation model whose teacher fills the cache (``teacher_cache`` set).
        datamodule: the :class:`~spar_pl.data.DistillDataModule` whose training images are cached.
        trainer: the trainer of the run (a :class:`~spar_pl.callbacks.CacheWriter` is added to its callbacks).

    Returns:
        the counts over all ranks (``written``, ``kept``, ``recomputed``, ``skipped``), ``bytes_per_image`` (float16
        safetensors entries), ``float32_bytes_per_image`` (the raw features) and ``per_rank_written``.
    """
    task = TeacherCacheTask(model, datamodule)
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
