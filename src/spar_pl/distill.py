"""SPAR distillation: a frozen sliding-window teacher, a trainable single-pass student, MSE on features.

``SPAR.md`` section 3. The teacher is a frozen copy of the student's initial backbone wrapped in a
:class:`~spar_pl.sliding.SlidingWindowTeacher`. It is not a registered submodule: it follows the module's
device and dtype, stays in eval mode without gradients, and never enters a checkpoint.
"""

from __future__ import annotations

import copy
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from spar_pl.cache import TeacherCache, weights_identity
from spar_pl.encoders import DenseEncoder, build_encoder
from spar_pl.sliding import SlidingWindowTeacher


class DistillModule(L.LightningModule):
    """Distil the sliding-window teacher into the single-pass student.

    Args:
        backbone: ``maskclip`` or ``siglip2``.
        model_name: open_clip name or ``hf-hub:`` id (default: the backbone's).
        pretrained: open_clip pretrained tag (``"default"``: the backbone's).
        weights: local open_clip weights file (offline).
        crop: teacher window side (default: the model's pretraining size).
        stride: teacher window stride (the paper: 24).
        window_batch: teacher windows per encoder call.
        trainable: trainable-parameter spec of the student (``blk_-1,blk_-2``; ``all`` for SPAR ALL).
        lr: AdamW learning rate (constant).
        weight_decay: AdamW weight decay.
        teacher_cache: a teacher-feature cache folder (``spar-cli cache`` fills it); ``None`` runs the teacher
            in every training step. Entries missing, corrupt or written under another configuration are
            recomputed and rewritten. Needs the data module's ``fixed`` augmentation and batch size 1.
    """

    def __init__(
        self,
        backbone: str = "siglip2",
        model_name: str | None = None,
        pretrained: str | None = "default",
        weights: str | None = None,
        crop: int | None = None,
        stride: int = 24,
        window_batch: int = 16,
        trainable: str = "blk_-1,blk_-2",
        lr: float = 2e-5,
        weight_decay: float = 1e-4,
        teacher_cache: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.student: DenseEncoder = build_encoder(backbone, model_name, pretrained=pretrained, weights=weights)
        self.trainable_names = self.student.set_trainable(trainable)
        # The teacher copies the vision tower only; the text tower (frozen, unused by the loss) stays shared.
        model = self.student.model
        shared = {id(m): m for name, m in model.named_children() if name != "visual"}
        shared.update({id(p): p for p in model._parameters.values() if p is not None})
        teacher_encoder = copy.deepcopy(self.student, memo=shared).eval().requires_grad_(False)
        # Not an attribute nn.Module registers: kept out of state_dict, parameters() and checkpoints.
        teacher = SlidingWindowTeacher(teacher_encoder, crop, stride, window_batch).eval()
        object.__setattr__(self, "_teacher", teacher)
        self.student.train()
        self.cache: TeacherCache | None = None

    @property
    def teacher(self) -> SlidingWindowTeacher:
        """The frozen sliding-window teacher."""
        return self._teacher

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self._teacher._apply(fn, *args, **kwargs)  # follow .to(device) / .half() without being a child
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self._teacher.eval()
        return self

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher targets ``(B, C, H // p, W // p)`` of normalised images."""
        return self._teacher(images).float()

    def open_cache(self, datamodule, precision: str) -> TeacherCache:
        """The teacher cache for this model and the data module's augmentation (checks compatibility)."""
        hp, data = self.hparams, datamodule.hparams
        if data.mode != "fixed" or data.batch_size != 1:
            raise ValueError(
                f"teacher_cache needs the data module's fixed augmentation and batch_size 1 (got mode={data.mode!r}, "
                f"batch_size={data.batch_size}); fresh augmentation needs the in-step teacher (teacher_cache: null)"
            )
        manifest = {
            "backbone": hp.backbone,
            "model_name": self.student.model_name,
            "weights": weights_identity(self.student.model_name, hp.pretrained, hp.weights),
            "crop": self._teacher.crop,
            "stride": self._teacher.stride,
            "seed": data.seed,
            "augmentation": repr(datamodule.augmentation),
            "precision": str(precision),  # the trainer precision the teacher ran under (its autocast)
        }
        return TeacherCache(hp.teacher_cache, manifest)

    def setup(self, stage: str) -> None:
        if self.hparams.teacher_cache and stage == "fit":
            self.cache = self.open_cache(self.trainer.datamodule, self.trainer.precision)

    def targets(self, images: torch.Tensor, ids: list[str] | None = None, train: bool = False) -> torch.Tensor:
        """Teacher targets for normalised images: from the cache when training with one, else computed."""
        if self.cache is None or not train or ids is None:
            return self.teacher_features(images)
        p = self.student.patch_size
        shape = (images.shape[-2] // p, images.shape[-1] // p)
        cached = [self.cache.load(i, shape) for i in ids]
        if any(c is None for c in cached):
            computed = self.teacher_features(images)
            for k, image_id in enumerate(ids):
                if cached[k] is None:
                    self.cache.save(image_id, computed[k])
            return computed
        return torch.stack(cached).to(images.device)

    def feature_loss(self, images01: torch.Tensor, ids: list[str] | None = None, train: bool = False) -> torch.Tensor:
        """MSE between student and teacher features of a batch of ``[0, 1]`` images."""
        images = self.student.normalize(images01)
        targets = self.targets(images, ids, train)
        preds = self.student(images)[..., : targets.shape[-2], : targets.shape[-1]]
        return F.mse_loss(preds.float(), targets)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.feature_loss(batch["image"], batch.get("id"), train=True)
        # synchronised, so that "lowest train/loss_epoch" is the global mean on every rank (one checkpoint choice)
        size = len(batch["image"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.feature_loss(batch["image"])
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(batch["image"]))
        return loss

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """``spar-cli predict``: the student's dense features of each image, with its id."""
        with torch.no_grad():
            return {"id": batch.get("id"), "features": self.student(self.student.normalize(batch["image"])).cpu()}

    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        skipped = getattr(getattr(self.trainer, "datamodule", None), "skipped", 0)
        total = int(self.trainer.strategy.reduce(torch.tensor(float(skipped), device=self.device), reduce_op="sum"))
        self.log("train/skipped_images", float(total), sync_dist=False)
        if total and self.trainer.is_global_zero:
            warnings.warn(f"epoch {self.current_epoch}: skipped {total} unreadable images (named above)", stacklevel=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.student.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


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
