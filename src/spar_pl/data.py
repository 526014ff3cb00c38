"""Streaming high-resolution images for distillation: sources, the SPAR augmentation, the DataModule.

Images stream through Hugging Face ``datasets`` (streaming mode) from a local image folder, parquet or
webdataset shards, or a hub dataset id; they are split across DDP ranks with ``split_dataset_by_node``
and across loader workers the same way, shuffled with a buffer whose seed changes every epoch, decoded
here (so a corrupt file is skipped with a warning naming it, never stopping training), and augmented
with albumentations following ``docs/method.md`` section 3.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
from datasets import Features, IterableDataset, Value, load_dataset
from datasets import Image as ImageFeature
from datasets.distributed import split_dataset_by_node
from PIL import Image
from torchdata.stateful_dataloader import StatefulDataLoader

from spar_pl.images import IMAGE_SUFFIXES, read_rgb8


@dataclass(frozen=True)
class AugmentConfig:
    """The SPAR augmentation (``docs/method.md`` section 3); the defaults are the paper's.

    Args:
        box: random resize into this (long, short) box, keeping the aspect ratio.
        ratio: range of the random box scale.
        min_side: a short side below this is upscaled to it; crops are at least this.
        keep_full_p: probability of keeping the full image rather than cropping.
        crop_range: each crop side is uniform in this fraction of the image side.
        multiple: sides are floored to a multiple of this (the student's patch size: :class:`DistillDataModule` sets
            it from the model).
        flip_p: horizontal flip probability.
        max_pixels: an image whose resized size (before the crop) would exceed this many pixels is refused
            (``ValueError``, so the stream skips and names it): an extreme aspect ratio upscaled to ``min_side``
            would otherwise grow without bound. Default: four times the box.
    """

    box: tuple[int, int] = (2048, 1024)
    ratio: tuple[float, float] = (0.5, 1.0)
    min_side: int = 512
    keep_full_p: float = 0.5
    crop_range: tuple[float, float] = (0.4, 1.0)
    multiple: int = 16
    flip_p: float = 0.5
    max_pixels: int | None = None

    @property
    def pixel_cap(self) -> int:
        """The most pixels the resize before the crop may produce."""
        return self.max_pixels if self.max_pixels is not None else 4 * self.box[0] * self.box[1]


PRESETS = {"paper": AugmentConfig(), "extended": AugmentConfig(box=(2560, 2560), ratio=(0.2, 1.0))}


def with_multiple(cfg: AugmentConfig | None, multiple: int) -> AugmentConfig | None:
    """``cfg`` with its sides floored to ``multiple`` (``None`` stays ``None``)."""
    return cfg if cfg is None or cfg.multiple == multiple else replace(cfg, multiple=multiple)


def augment_params(height: int, width: int, rng: random.Random, cfg: AugmentConfig) -> dict:
    """Sample one augmentation: resized size, crop box ``(x0, y0, x1, y1)`` in the resized image, flip.

    An image upscaled to ``min_side`` keeps its whole short side, and its long side is cropped to at most the box's
    long side, so the output never exceeds ``min_side x max(box)``. Raises ``ValueError`` when the resize itself
    would exceed :attr:`AugmentConfig.pixel_cap` (an extreme aspect ratio).
    """
    r = rng.uniform(*cfg.ratio)
    long_box, short_box = max(cfg.box) * r, min(cfg.box) * r
    scale = min(long_box / max(height, width), short_box / min(height, width))
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    if min(h, w) < cfg.min_side:
        up = cfg.min_side / min(h, w)
        h, w = max(cfg.min_side, round(h * up)), max(cfg.min_side, round(w * up))
        if h * w > cfg.pixel_cap:
            raise ValueError(
                f"extreme aspect ratio {width}x{height}: upscaling its short side to {cfg.min_side} gives {w}x{h}, "
                f"over the {cfg.pixel_cap:,} pixel cap"
            )
        ch, cw = min(h, max(cfg.box)), min(w, max(cfg.box))
    elif rng.random() < cfg.keep_full_p:
        ch, cw = h, w
    else:
        ch = min(h, max(cfg.min_side, round(h * rng.uniform(*cfg.crop_range))))
        cw = min(w, max(cfg.min_side, round(w * rng.uniform(*cfg.crop_range))))
    ch, cw = max(cfg.multiple, ch // cfg.multiple * cfg.multiple), max(cfg.multiple, cw // cfg.multiple * cfg.multiple)
    y0, x0 = rng.randint(0, h - ch), rng.randint(0, w - cw)
    return {"size": (h, w), "box": (x0, y0, x0 + cw, y0 + ch), "flip": rng.random() < cfg.flip_p}


def augment(image: np.ndarray, params: dict) -> np.ndarray:
    """Apply sampled parameters with albumentations (resize, crop, flip) to an ``(H, W, 3)`` uint8 image."""
    (h, w), (x0, y0, x1, y1) = params["size"], params["box"]
    pipeline = A.Compose(
        [
            A.Resize(h, w, interpolation=cv2.INTER_LINEAR),
            A.Crop(x_min=x0, y_min=y0, x_max=x1, y_max=y1),
            A.HorizontalFlip(p=1.0 if params["flip"] else 0.0),
        ]
    )
    return pipeline(image=image)["image"]


def image_rng(seed: int, image_id: str, epoch: int | None = None) -> random.Random:
    """A generator seeded by (seed, image id[, epoch]): the same augmentation wherever and whenever it runs."""
    key = f"{seed}:{image_id}" + ("" if epoch is None else f":{epoch}")
    return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))


def open_source(source: str, split: str = "train"):
    """A streaming ``datasets.IterableDataset`` of undecoded images, and the name of its image column.

    ``source`` is a local folder of images, a glob or file of ``.parquet`` or ``.tar`` (webdataset) shards, or
    a hub dataset id.
    """
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {path}")
        # One shard per file, so DDP ranks and loader workers split the folder by files.
        features = Features({"image": ImageFeature(decode=False), "__key__": Value("string")})
        kwargs = {"files": files, "root": str(path)}
        ds = IterableDataset.from_generator(_folder_records, features=features, gen_kwargs=kwargs)
    elif source.endswith((".parquet", ".tar")):
        builder = "parquet" if source.endswith(".parquet") else "webdataset"
        try:
            ds = load_dataset(builder, data_files={split: source}, split=split, streaming=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # a damaged shard: name it
            raise ValueError(f"cannot read image source {source} ({builder}): {err}") from err
    else:
        try:
            ds = load_dataset(source, split=split, streaming=True)
        except Exception as err:
            raise FileNotFoundError(
                f"image source {source!r} is not a folder, a .parquet/.tar shard pattern, or a reachable hub dataset: "
                f"{err}"
            ) from err
    features = ds.features or {}
    column = next((k for k, v in features.items() if isinstance(v, ImageFeature)), None)
    if column is None:
        column = next((k for k in ("image", "jpg", "jpeg", "png", "webp") if k in features), None)
    if column is None:
        raise ValueError(f"image source {source!r} has no image column (columns: {', '.join(features)})")
    if isinstance(features[column], ImageFeature):
        ds = ds.cast_column(column, ImageFeature(decode=False))
    return ds, column


def _folder_records(files: list[str], root: str) -> Iterator[dict]:
    for path in files:  # the key (image id) is the path under the folder: a/1.jpg and b/1.jpg stay apart
        yield {"image": {"path": path, "bytes": None}, "__key__": str(Path(path).relative_to(root))}


def count_images(source: str) -> int | None:
    """Number of images of a folder source (cheap), else ``None``."""
    path = Path(source)
    if path.is_dir():
        return sum(1 for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return None


def decode(record, column: str) -> tuple[str, np.ndarray, str]:
    """(image id, RGB uint8 array, content hash) of a record.

    The content hash is a SHA-256 prefix of the source bytes (the encoded file), so anything keyed on it (the
    teacher cache) notices an image replaced under the same name. Decoding is :func:`~spar_pl.images.read_rgb8`'s (the
    one image reader). Raises ``OSError``/``ValueError`` if the image cannot be used, one over the reader's size
    limit (:data:`~spar_pl.images.MAX_PIXELS`) included.
    """
    value = record[column]
    path = value.get("path") if isinstance(value, dict) else None
    data = value.get("bytes") if isinstance(value, dict) else value
    if data is None and path:
        data = Path(path).read_bytes()
    if isinstance(data, Image.Image):
        content = hashlib.sha256(data.tobytes()).hexdigest()[:32]
    else:
        content = hashlib.sha256(data).hexdigest()[:32]
    name = record.get("__key__") or (Path(path).name if path else content[:16])
    array = read_rgb8(data, name=str(name))
    return str(name), array, content


class StreamingImages(torch.utils.data.IterableDataset):
    """Augmented images from a streaming source, exactly ``per_rank`` samples per rank and epoch.

    Equal sample counts on every rank keep DDP in step even when the source does not split evenly or a
    file is corrupt: a rank whose share runs out early continues from its shard again (next epoch seed).

    The stream is deterministic for an epoch, and it is stateful in each loader worker (the protocol torchdata's
    ``StatefulDataLoader`` calls there, :meth:`state_dict`/:meth:`load_state_dict`): its state is the epoch and the
    samples this worker has delivered of it, and a restored worker passes over exactly those (decoding them, without
    augmentation) before it yields the next one.

    Args:
        source: see :func:`open_source`.
        per_rank: samples this rank yields per epoch; ``None``: one pass over this rank's share, each usable
            image exactly once (``spar-cli cache``: the ranks' shares are disjoint and cover the source).
        rank: this rank; world_size: number of ranks.
        augmentation: an :class:`AugmentConfig`, or ``None`` for none (images floored to ``multiple``).
        mode: ``fixed`` (augmentation fixed per image id and seed, as the paper's offline augmentation) or
            ``fresh`` (new augmentation every epoch).
        seed: the shuffle and augmentation seed.
        shuffle_buffer: size of the streaming shuffle buffer (0: no shuffle).
    """

    def __init__(
        self,
        source: str,
        per_rank: int | None,
        rank: int = 0,
        world_size: int = 1,
        augmentation: AugmentConfig | None = None,
        mode: str = "fixed",
        seed: int = 0,
        shuffle_buffer: int = 256,
        multiple: int = 16,
    ) -> None:
        super().__init__()
        if mode not in ("fixed", "fresh"):
            raise ValueError(f"augmentation mode must be 'fixed' or 'fresh', got {mode!r}")
        self.source, self.per_rank, self.rank, self.world_size = source, per_rank, rank, world_size
        self.augmentation, self.mode, self.seed = augmentation, mode, seed
        self.shuffle_buffer, self.multiple = shuffle_buffer, multiple
        self.epoch = 0
        self._opened = None
        self.delivered = 0  # samples this process (loader worker) has delivered of the epoch
        self.resume_at = 0  # samples the next iteration passes over (load_state_dict), then 0 again
        self.skipped = multiprocessing.Value("i", 0)  # shared with forked loader workers

    def __len__(self) -> int:
        if self.per_rank is None:
            raise TypeError("a one-pass stream has no length known in advance")
        return self.per_rank

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffle (and, in ``fresh`` mode, augmentation); resets the skipped count."""
        self.epoch = epoch
        with self.skipped.get_lock():
            self.skipped.value = 0

    def state_dict(self) -> dict:
        """The epoch and the samples this process (loader worker) has delivered of it."""
        return {"epoch": self.epoch, "delivered": self.delivered}

    def load_state_dict(self, state: dict) -> None:
        """Continue ``state``'s epoch after the samples it had delivered (the next iteration passes over them)."""
        self.epoch, self.resume_at = int(state["epoch"]), int(state["delivered"])

    def _rank_stream(self, epoch: int):
        """This rank's share of the source, shuffled for the epoch (loader workers then split it by shards)."""
        if self._opened is None:  # list the folder / resolve the shards once per process, not every pass
            self._opened = open_source(self.source)
        ds, column = self._opened
        if self.shuffle_buffer:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        ds.set_epoch(epoch)  # on the split dataset: split_dataset_by_node does not carry the epoch over
        return ds, column

    def _stream(self, epoch: int, skip: int, bad: set[str]) -> Iterator[dict | None]:
        """The rank's usable samples of one pass; the first ``skip`` are decoded only (so that unreadable images
        are recognised) and yielded as ``None``. Unusable images are counted and named once per epoch (``bad``)."""
        ds, column = self._rank_stream(epoch)
        for record in ds:
            value = record[column]
            where = (value.get("path") if isinstance(value, dict) else None) or record.get("__key__") or "a record"
            try:
                image_id, image, content = decode(record, column)
                sample = None if skip > 0 else self._sample(image_id, image, content, epoch)
            except (OSError, ValueError, SyntaxError) as err:
                if where not in bad and skip <= 0:
                    bad.add(where)
                    with self.skipped.get_lock():
                        self.skipped.value += 1
                    warnings.warn(
                        f"epoch {self.epoch}: skipping unusable image {where} in {self.source}: {err}", stacklevel=2
                    )
                continue
            skip -= 1
            yield sample

    def _sample(self, image_id: str, image: np.ndarray, content: str, epoch: int) -> dict:
        if self.augmentation is not None:
            rng = image_rng(self.seed, image_id, epoch if self.mode == "fresh" else None)
            image = augment(image, augment_params(image.shape[0], image.shape[1], rng, self.augmentation))
        else:
            m = self.multiple
            if image.shape[0] < m or image.shape[1] < m:
                raise ValueError(f"{image.shape[1]}x{image.shape[0]} is smaller than one {m}x{m} patch")
            image = image[: image.shape[0] // m * m, : image.shape[1] // m * m]
        tensor = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div_(255.0)
        return {"image": tensor, "id": image_id, "content": content}

    def worker_quotas(self, num_workers: int) -> list[int]:
        """Samples each loader worker yields per epoch (``datasets`` hands each worker whole shards and idles
        workers beyond the shard count)."""
        active = min(max(1, num_workers), self._rank_stream(0)[0].num_shards)
        return [self.per_rank // active + (1 if w < self.per_rank % active else 0) for w in range(active)]

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.per_rank is None:  # one pass; datasets hands each loader worker its own shards
            return (s for s in self._stream(self.epoch * 1000, 0, set()) if s is not None)
        quotas = self.worker_quotas(num_workers)
        if worker >= len(quotas):
            return iter(())
        skip, self.resume_at = self.resume_at, 0
        self.delivered = skip
        if skip >= quotas[worker]:
            return iter(())
        return self._samples(worker, quotas[worker], skip)

    def _samples(self, worker: int, quota: int, skip: int) -> Iterator[dict]:
        produced, passes, bad = 0, 0, set()
        while produced < quota:
            before = produced
            for sample in self._stream(self.epoch * 1000 + passes, skip - produced, bad):
                produced += 1
                if sample is not None:
                    self.delivered = produced  # before the yield: a snapshot taken after this sample includes it
                    yield sample
                if produced == quota:
                    return
            passes += 1
            if produced == before:
                raise RuntimeError(f"no readable images for rank {self.rank} worker {worker} in {self.source}")


def collate(samples: list[dict]) -> dict:
    """Stack a batch; images of different sizes are centre-cropped to the smallest common size."""
    h = min(s["image"].shape[1] for s in samples)
    w = min(s["image"].shape[2] for s in samples)
    crops = []
    for s in samples:
        top, left = (s["image"].shape[1] - h) // 2, (s["image"].shape[2] - w) // 2
        crops.append(s["image"][:, top : top + h, left : left + w])
    return {"image": torch.stack(crops), "id": [s["id"] for s in samples], "content": [s["content"] for s in samples]}


class TrainingLoader(StatefulDataLoader):
    """The training loader: torchdata's ``StatefulDataLoader``, whose position Lightning saves in checkpoints and
    restores before a resumed run's first batch.

    torchdata keeps the position: the batches delivered, the worker that delivered the last one (a resumed iteration
    continues the workers' rotation from the next), and each worker's :class:`StreamingImages` state, sent with every
    batch (``snapshot_every_n_steps=1``, so a checkpoint at any step restores without replaying a batch). The run
    trains on the images an uninterrupted run would, in the same order, with the same augmentation. Around torchdata's
    state this loader keeps the epoch and ``num_workers``: a position in an epoch that the data module has since
    completed is not restored (the run starts the next epoch from its first image, with any ``num_workers``), and
    resuming mid-epoch with another ``num_workers`` is a ``ValueError`` naming both. Its dataset is a
    :class:`StreamingImages`; the arguments are ``StatefulDataLoader``'s.
    """

    def state_dict(self) -> dict:
        """The stream's epoch, ``num_workers`` and torchdata's position (``position``)."""
        return {"epoch": self.dataset.epoch, "num_workers": self.num_workers, "position": super().state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` was taken, unless its epoch is not the stream's (complete: start afresh)."""
        if not isinstance(state, dict) or not {"epoch", "num_workers", "position"} <= state.keys():
            raise ValueError(
                "the checkpoint's training loader state is not a spar_pl.data.TrainingLoader's (it needs epoch, "
                "num_workers and position): resume from a checkpoint of this version, or start the run afresh"
            )
        if state["epoch"] != self.dataset.epoch:
            return
        if state["num_workers"] != self.num_workers:
            raise ValueError(
                f"the checkpoint's training loader had num_workers={state['num_workers']}; resuming mid-epoch "
                f"needs the same (got {self.num_workers}): set data.init_args.num_workers back"
            )
        super().load_state_dict(state["position"])


class DistillDataModule(L.LightningDataModule):
    """Streams high-resolution images for distillation (no labels).

    Args:
        train_source: image folder, ``.parquet``/``.tar`` shard pattern, or hub dataset id.
        val_source: held-out images for the validation feature MSE (not augmented), or ``None``.
        num_images: images in ``train_source`` (counted for folders; needed for other sources).
        preset: ``paper`` or ``extended`` augmentation, or ``none``.
        box: override the preset's resize box (long, short), e.g. for small CPU runs.
        min_side: override the preset's minimum side.
        mode: ``fixed`` (the paper's augment-once, cache-compatible) or ``fresh`` (every epoch).
        batch_size: images per batch; above 1, images are centre-cropped to the batch's common size.
        num_workers: loader worker processes.
        shuffle_buffer: streaming shuffle buffer size.
        seed: shuffle and augmentation seed.
        multiple: image sides are floored to a multiple of this; ``None``: the model's (the student's patch, the
            module's ``crop_multiple``), 16 without one.
    """

    def __init__(
        self,
        train_source: str,
        val_source: str | None = None,
        num_images: int | None = None,
        preset: str = "paper",
        box: tuple[int, int] | None = None,
        min_side: int | None = None,
        mode: str = "fixed",
        batch_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 256,
        seed: int = 0,
        multiple: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if multiple is not None and multiple < 1:
            raise ValueError(f"multiple must be a positive number of pixels, got {multiple}")
        if preset not in (*PRESETS, "none"):
            raise ValueError(f"unknown augmentation preset {preset!r}; choose paper, extended or none")
        cfg = PRESETS.get(preset)
        if cfg is not None and (box is not None or min_side is not None):
            overrides = {"box": tuple(box or cfg.box), "min_side": min_side or cfg.min_side}
            cfg = AugmentConfig(**{**cfg.__dict__, **overrides})
        self.augmentation = cfg
        #: the training stream's epoch; saved in checkpoints (:meth:`state_dict`), so a resumed run continues with it
        self.epoch = 0
        self.train_set: StreamingImages | None = None
        self.val_set: StreamingImages | None = None

    def crop_multiple(self) -> int:
        """The multiple image sides are floored to: ``multiple``, else the model's ``crop_multiple`` (the student's
        patch), else 16."""
        if self.hparams.multiple is not None:
            return int(self.hparams.multiple)
        module = self.trainer.lightning_module if self.trainer is not None else None
        return int(getattr(module, "crop_multiple", None) or 16)

    def training_augmentation(self) -> AugmentConfig | None:
        """The training augmentation with its sides floored to :meth:`crop_multiple`."""
        return with_multiple(self.augmentation, self.crop_multiple())

    def _dataset(self, source: str, count: int | None, train: bool) -> StreamingImages:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        count = count if count is not None else count_images(source)
        if count is None:
            raise ValueError(
                f"image source {source!r} is not an existing folder: if it is shards or a hub dataset id, set "
                "num_images (every DDP rank must run the same number of steps); if it is a folder, it does not exist"
            )
        # training: the same number on every rank (DDP steps in lockstep); validation: this rank's exact share
        per_rank = count // world if train else count // world + (1 if rank < count % world else 0)
        if count < world:  # a rank without images would leave the others waiting in collective calls
            raise ValueError(f"{source}: {count} images cannot feed {world} ranks")
        hp = self.hparams
        stream = StreamingImages(
            source,
            per_rank,
            rank,
            world,
            augmentation=self.training_augmentation() if train else None,
            mode=hp.mode,
            seed=hp.seed,
            shuffle_buffer=hp.shuffle_buffer if train else 0,
            multiple=self.crop_multiple(),
        )
        stream.worker_quotas(hp.num_workers)  # open the source now: a missing or damaged one is an error in setup
        return stream

    def training_stream(self) -> StreamingImages:
        """The augmented training stream of this rank."""
        return self._dataset(self.hparams.train_source, self.hparams.num_images, train=True)

    def cache_dataloader(
        self, rank: int = 0, world_size: int = 1, multiple: int | None = None
    ) -> torch.utils.data.DataLoader:
        """The training images with their training augmentation, for ``spar-cli cache``: one pass over the share of
        ``rank`` out of ``world_size`` (the ranks' shares are disjoint and cover the source), in source order, batch
        size 1, sides floored to ``multiple`` (default: :meth:`crop_multiple`)."""
        hp = self.hparams
        multiple = multiple or self.crop_multiple()
        stream = StreamingImages(
            hp.train_source,
            None,
            rank,
            world_size,
            with_multiple(self.augmentation, multiple),
            hp.mode,
            hp.seed,
            shuffle_buffer=0,
            multiple=multiple,
        )
        return torch.utils.data.DataLoader(stream, batch_size=1, num_workers=hp.num_workers, collate_fn=collate)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit"):
            self.train_set = self.training_stream()
        if hp.val_source and stage in (None, "fit", "validate", "predict"):
            self.val_set = self._dataset(hp.val_source, None, train=False)

    def set_epoch(self, epoch: int) -> None:
        """Start training epoch ``epoch`` (its shuffle and, in ``fresh`` mode, augmentation)."""
        self.epoch = epoch
        if self.train_set is not None:
            self.train_set.set_epoch(epoch)

    def end_epoch(self, epoch: int) -> None:
        """Training epoch ``epoch`` is complete: a run resumed from here starts with the next one."""
        self.epoch = epoch + 1

    def state_dict(self) -> dict:
        """The training stream's epoch (Lightning saves it in checkpoints; the loader saves its position)."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state.get("epoch", 0))

    @property
    def skipped(self) -> int:
        """Unreadable images skipped so far by the training stream on this rank."""
        return self.train_set.skipped.value if self.train_set is not None else 0

    def train_dataloader(self) -> TrainingLoader:
        # Lightning creates the first iterator (and starts loader workers) before on_train_epoch_start: set the epoch
        # now (restored from a checkpoint: the epoch the run continues with; the loader then restores its position)
        self.train_set.set_epoch(self.epoch)
        hp = self.hparams
        return TrainingLoader(self.train_set, batch_size=hp.batch_size, num_workers=hp.num_workers, collate_fn=collate)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        if self.val_set is None:
            return []
        workers = self.hparams.num_workers
        return torch.utils.data.DataLoader(self.val_set, batch_size=1, num_workers=workers, collate_fn=collate)

    predict_dataloader = val_dataloader
