"""Benchmark readers for open-vocabulary evaluation, in the datasets' official folder layouts.

``docs/method.md`` section 4: VOC21 / VOC20 (VOC2012), Context60 / Context59 (VOC2010 with the Context labels),
Cityscapes (``labelTrainIds``) and ADE20K. Images are resized for the model with the test rule (keep the
ratio, long side <= 2048 and short side <= 672, Cityscapes 2048 / 1024; upscaling happens), labels stay at
their original resolution, where predictions are made. ``reduce_zero_label`` maps 0 to 255 (ignored) and
k to k - 1. Every image is read, never skipped: a missing or corrupt label is an error naming the file.

Under DDP every rank reads a disjoint stride of the images, without the padding duplicates a
``DistributedSampler`` adds, so a dataset-level metric counts each image exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image

from spar_pl.images import read_image


@dataclass(frozen=True)
class Benchmark:
    """Layout and protocol of one benchmark."""

    name: str
    default_root: str
    layout: str
    classes: str
    reduce_zero_label: bool
    max_sides: tuple[int, int] = (2048, 672)


BENCHMARKS = {
    "voc21": Benchmark(
        "voc21",
        "data/VOCdevkit/VOC2012",
        "JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/val.txt",
        "voc21",
        False,
    ),
    "voc20": Benchmark(
        "voc20",
        "data/VOCdevkit/VOC2012",
        "JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/val.txt",
        "voc20",
        True,
    ),
    "context60": Benchmark(
        "context60",
        "data/VOCdevkit/VOC2010",
        "JPEGImages/<id>.jpg, SegmentationClassContext/<id>.png, ImageSets/SegmentationContext/val.txt",
        "context60",
        False,
    ),
    "context59": Benchmark(
        "context59",
        "data/VOCdevkit/VOC2010",
        "JPEGImages/<id>.jpg, SegmentationClassContext/<id>.png, ImageSets/SegmentationContext/val.txt",
        "context59",
        True,
    ),
    "cityscapes": Benchmark(
        "cityscapes",
        "data/cityscapes",
        "leftImg8bit/val/<city>/<name>_leftImg8bit.png, gtFine/val/<city>/<name>_gtFine_labelTrainIds.png",
        "cityscapes",
        False,
        (2048, 1024),
    ),
    "ade20k": Benchmark(
        "ade20k",
        "data/ade/ADEChallengeData2016",
        "images/validation/<id>.jpg, annotations/validation/<id>.png",
        "ade20k",
        True,
    ),
}


def eval_size(height: int, width: int, max_long: int = 2048, max_short: int = 672) -> tuple[int, int]:
    """The test resize: keep the ratio, long side <= ``max_long``, short side <= ``max_short``, rounded."""
    scale = min(max_long / max(height, width), max_short / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def list_samples(benchmark: Benchmark, root: str | Path, split: str = "val") -> list[tuple[Path, Path, str]]:
    """``(image, label, name)`` triples of a split, checked against the official layout."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{benchmark.name}: dataset root not found: {root} (expected layout under it: {benchmark.layout})"
        )
    name = benchmark.name
    if name.startswith(("voc", "context")):
        sets, labels = (
            ("Segmentation", "SegmentationClass")
            if name.startswith("voc")
            else ("SegmentationContext", "SegmentationClassContext")
        )
        split_file = root / "ImageSets" / sets / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"{name}: split file not found: {split_file} (layout: {benchmark.layout})")
        ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        return [(root / "JPEGImages" / f"{i}.jpg", root / labels / f"{i}.png", i) for i in ids]
    if name == "cityscapes":
        image_dir = root / "leftImg8bit" / split
        if not image_dir.is_dir():
            raise FileNotFoundError(f"{name}: image folder not found: {image_dir} (layout: {benchmark.layout})")
        samples = []
        for image in sorted(image_dir.glob("*/*_leftImg8bit.png")):
            stem = image.name[: -len("_leftImg8bit.png")]
            label = root / "gtFine" / split / image.parent.name / f"{stem}_gtFine_labelTrainIds.png"
            samples.append((image, label, stem))
        return samples
    split_dir = {"val": "validation", "train": "training"}.get(split, split)
    image_dir = root / "images" / split_dir
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{name}: image folder not found: {image_dir} (layout: {benchmark.layout})")
    return [(p, root / "annotations" / split_dir / f"{p.stem}.png", p.stem) for p in sorted(image_dir.glob("*.jpg"))]


def read_label(path: Path, reduce_zero_label: bool = False) -> np.ndarray:
    """Class indices of a label PNG (palette PNGs read as indices), with optional ``reduce_zero_label``."""
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L", "I", "I;16"):
                raise ValueError(f"label {path} has mode {img.mode}; expected class indices (palette or grayscale)")
            label = np.array(img).astype(np.int64)
    except (OSError, SyntaxError) as err:
        raise ValueError(f"cannot read label file {path}: {err}") from err
    if reduce_zero_label:
        label = np.where(label == 0, 255, label - 1)
        label[label == 254] = 255
    return label


class SegDataset(torch.utils.data.Dataset):
    """One benchmark split: test-resized images in ``[0, 1]`` and labels at the original resolution.

    Args:
        dataset: benchmark name (``voc21``, ``voc20``, ``context60``, ``context59``, ``cityscapes``, ``ade20k``).
        root: the dataset root (the benchmark's default under ``data/`` if ``None``).
        split: the split name (``val``).
        max_sides: the test resize's limits ``(long, short)`` (default: the benchmark's; the training-free methods'
            protocols use a short side of 336 or 448).
    """

    def __init__(
        self, dataset: str, root: str | Path | None = None, split: str = "val", max_sides: Sequence[int] | None = None
    ) -> None:
        if dataset not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {dataset!r}; choose one of {', '.join(BENCHMARKS)}")
        self.benchmark = BENCHMARKS[dataset]
        self.root = Path(root or self.benchmark.default_root)
        self.max_sides = tuple(max_sides) if max_sides is not None else self.benchmark.max_sides
        if len(self.max_sides) != 2 or min(self.max_sides) < 1:
            raise ValueError(f"max_sides must be two positive sides (long, short), got {max_sides}")
        self.samples = list_samples(self.benchmark, self.root, split)
        if not self.samples:
            raise FileNotFoundError(f"{dataset}: no images found under {self.root} ({self.benchmark.layout})")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        image_path, label_path, name = self.samples[index]
        label = read_label(label_path, self.benchmark.reduce_zero_label)
        image = read_image(image_path)  # the one image reader (ImageInputError, a ValueError, names the file)
        if tuple(image.shape[1:]) != label.shape:
            raise ValueError(
                f"image {image_path} is {tuple(image.shape[1:])} but its label {label_path} is {label.shape}"
            )
        size = eval_size(*label.shape, *self.max_sides)
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        return {"image": image, "label": torch.from_numpy(label), "name": name}


def collate_lists(samples: list[dict]) -> dict:
    """Keep images and labels as lists: their sizes differ, and each is evaluated at its own size."""
    return {key: [s[key] for s in samples] for key in samples[0]}


class SegDataModule(L.LightningDataModule):
    """Test data of one benchmark in its official layout.

    Args:
        dataset: benchmark name.
        root: dataset root (default: the benchmark's folder under ``data/``).
        split: split name.
        batch_size: images per batch (results do not depend on it).
        num_workers: loader worker processes.
        max_sides: the test resize's limits ``(long, short)`` (default: the benchmark's).
    """

    def __init__(
        self,
        dataset: str = "voc21",
        root: str | None = None,
        split: str = "val",
        batch_size: int = 1,
        num_workers: int = 0,
        max_sides: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data: SegDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        self.data = SegDataset(hp.dataset, hp.root, hp.split, hp.max_sides)

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        """This rank's share, every image exactly once over the ranks (Lightning's unrepeated sampler: ranks take
        every ``world_size``-th image from their rank on; none is padded in, so no image counts twice)."""
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = None
        if world > 1:
            if len(self.data) < world:
                raise ValueError(
                    f"{self.hparams.dataset}: {len(self.data)} images cannot be shared by {world} processes; "
                    f"use at most {len(self.data)} devices"
                )
            sampler = UnrepeatedDistributedSampler(self.data, num_replicas=world, rank=rank, shuffle=False)
        return torch.utils.data.DataLoader(
            self.data,
            sampler=sampler,
            batch_size=self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            collate_fn=collate_lists,
        )

    predict_dataloader = test_dataloader
    val_dataloader = test_dataloader
