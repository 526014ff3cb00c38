"""Tiny models, generated data and reference implementations: for tests, benchmarks and CPU runs.

Not used by the library's own code paths.

* Tiny randomly initialised models (:data:`TINY_MODELS`) are registered with timm and open_clip only when asked
  for (:func:`register_tiny_models`; :func:`spar_pl.encoders.build_encoder` asks when a ``spar-tiny-*`` name is
  built): importing ``spar_pl`` leaves the global registries alone.
* Generated data in the real layouts: training images (:func:`write_sample_images`, ``spar-cli tiny-data``) and
  the six benchmarks (:func:`write_tiny_benchmarks`, ``spar-cli table --tiny``).
* References written plainly from the method's description (``docs/method.md``), independently of the optimised
  code they check: they import nothing from :mod:`spar_pl.sliding`, so a mistake there cannot hide in the
  reference as well.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from spar_pl.families import BACKBONES, families, get_family
from spar_pl.render import save_atomic

__all__ = [
    "TINY_GEOMETRIES",
    "TINY_MODELS",
    "naive_teacher",
    "register_tiny_models",
    "write_sample_images",
    "write_tiny_benchmarks",
]

#: Tiny randomly initialised models for tests, the quickstart and CPU smoke runs: each paper preset's and each
#: family's tiny twin (:attr:`spar_pl.families.Family.tiny_model`).
# (``sl2``, not ``siglip2``: open_clip picks the Gemma tokenizer, a download, for names containing "siglip").
TINY_MODELS: dict[str, str] = {
    **{name: get_family(preset["family"]).tiny_model for name, preset in BACKBONES.items()},
    **{f.name: f.tiny_model for f in families()},
}

#: Tiny twins of other geometries (patch 8, 14, 32; a pretraining size the patch does not divide), each
#: ``(family, patch, native size)``: the geometry tests run over them.
TINY_GEOMETRIES: dict[str, tuple[str, int, int]] = {
    "spar-tiny-clip": ("clip", 16, 64),
    "spar-tiny-p8": ("clip", 8, 64),
    "spar-tiny-clip-p14": ("clip", 14, 70),
    "spar-tiny-clip-p32": ("clip", 32, 64),
    "spar-tiny-sl2": ("siglip", 16, 64),
    "spar-tiny-sl2-p14": ("siglip", 14, 64),
    "spar-tiny-eva02": ("eva02", 14, 64),
    "spar-tiny-pe": ("pe", 16, 64),
}

#: open_clip configs of the tiny models (``spar-tiny-clip``, ``spar-tiny-sl2``, ...) and of the shipped pretrained
#: ``spar-tiny-p8`` (:mod:`spar_pl.reproduce`)
MODEL_CONFIGS = Path(__file__).parent / "model_configs"


def register_tiny_models() -> None:
    """Register the tiny models with open_clip (their JSON configs) and what each family's twin needs beyond its
    config (:attr:`spar_pl.families.Family.register_tiny`: the SigLIP-style timm trunks), once.

    The tiny models then build through ``open_clip.create_model`` like the real models, so tests exercise the real
    construction path.
    """
    for family in families():
        if family.register_tiny is not None:
            family.register_tiny()
    if "spar-tiny-clip" not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIGS)


def naive_teacher(
    encoder: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, crop: int, stride: int
) -> torch.Tensor:
    """Sliding-window teacher features, the per-window loop of ``docs/method.md`` section 2 written plainly.

    One encoder call per window, each window's features bilinearly upsampled (align_corners False) to
    ``crop / f`` cells a side, summed into a canvas with a count map in a Python loop, the canvas divided by the
    count (clamped to at least 1) and resized bilinearly to the patch grid. Slow on purpose: the fast teacher
    (:class:`spar_pl.sliding.SlidingWindowTeacher`) is checked against it.

    Args:
        encoder: a dense encoder with a ``patch_size`` attribute, ``(1, 3, h, w) -> (1, C, h/p, w/p)``.
        images: normalised images ``(B, 3, H, W)``.
        crop: the window side.
        stride: the window stride in pixels.

    Returns:
        Features ``(B, C, H // p, W // p)`` in float32.
    """
    _, _, height, width = images.shape
    p = encoder.patch_size
    f = math.gcd(p, stride)  # the largest cell dividing both the patch and the stride: p // u of step 2

    def starts(side: int) -> list[int]:  # every offset that starts a whole window on the stride, and the far edge's
        last = max(side - crop, 0)
        return [t for t in range(last + 1) if t % stride == 0 or t == last]

    ch, cw = min(crop, height), min(crop, width)
    out = []
    for img in images:
        canvas = count = None
        for top in starts(height):
            for left in starts(width):
                feat = encoder(img[None, :, top : top + ch, left : left + cw])
                feat = F.interpolate(feat.float(), size=(ch // f, cw // f), mode="bilinear", align_corners=False)[0]
                if canvas is None:
                    canvas = feat.new_zeros(feat.shape[0], height // f, width // f)
                    count = feat.new_zeros(1, height // f, width // f)
                rows, cols = slice(top // f, top // f + ch // f), slice(left // f, left // f + cw // f)
                canvas[:, rows, cols] += feat
                count[:, rows, cols] += 1
        avg = (canvas / count.clamp(min=1))[None]
        out.append(F.interpolate(avg, size=(height // p, width // p), mode="bilinear", align_corners=False))
    return torch.cat(out)


# -- generated data ---------------------------------------------------------------------------------------------
def write_sample_images(out: str | Path, count: int, seed: int = 0, size: tuple[int, int] = (192, 256)) -> list[Path]:
    """Write ``count`` generated JPEG scenes (random shapes on gradients) of varying sizes to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        h, w = int(size[0] * rng.uniform(0.75, 1.25)), int(size[1] * rng.uniform(0.75, 1.25))
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.uniform(0, 255, 3)[None, None] * (yy[..., None] / h) + rng.uniform(0, 255, 3)[None, None] * (
            xx[..., None] / w
        )
        image = (base / 2).astype(np.uint8)
        for _ in range(4):
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(8, max(9, min(h, w) // 3))
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.integers(0, 255, 3)
        path = out / f"sample_{i:04d}.jpg"
        save_atomic(Image.fromarray(image), path)
        paths.append(path)
    return paths


def write_tiny_data(out: str = "data/tiny", train: int = 12, val: int = 4) -> Path:
    """Generated ``train/`` and ``val/`` images under ``out`` for the tiny distillation config
    (``configs/distill/tiny.yaml``; ``spar-cli tiny-data``).

    Args:
        out: the folder to write.
        train: training images.
        val: validation images.

    Raises:
        ValueError: a count below 0.
        NotADirectoryError, PermissionError: a folder that cannot be written (before any image).
    """
    from spar_pl.runner import check_writable

    for name, count in (("train", train), ("val", val)):
        if count < 0:
            raise ValueError(f"--{name} must be at least 0, got {count}")
    check_writable(out, "output folder")
    write_sample_images(Path(out) / "train", train, seed=0)
    write_sample_images(Path(out) / "val", val, seed=1)
    print(f"wrote {train} train and {val} val images under {out}")
    return Path(out)


VOC_PALETTE = np.array(
    [
        [(i >> 0 & 1) * 128 + (i >> 3 & 1) * 64, (i >> 1 & 1) * 128 + (i >> 4 & 1) * 64, (i >> 2 & 1) * 128]
        for i in range(256)
    ],
    dtype=np.uint8,
)


def write_tiny_benchmarks(root: str | Path, images: int = 3, seed: int = 0) -> dict[str, Path]:
    """Write tiny versions of the six benchmarks in their official layouts (roots returned per benchmark).

    Images are small generated scenes; labels are blocks of valid classes with an ignored (255) border,
    palette PNGs for VOC and Context, grayscale PNGs for Cityscapes train ids and ADE20K.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)

    def scene(h: int, w: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
        label = np.zeros((h, w), np.uint8)
        image = np.zeros((h, w, 3), np.uint8)
        for _ in range(4):
            y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
            cls = int(rng.integers(0, classes))
            label[y0 : y0 + h // 2, x0 : x0 + w // 2] = cls
            image[y0 : y0 + h // 2, x0 : x0 + w // 2] = rng.integers(0, 255, 3)
        label[:2] = 255
        return image, label

    def put(image: np.ndarray, label: np.ndarray, image_path: Path, label_path: Path, palette: bool) -> None:
        save_atomic(Image.fromarray(image), image_path)
        lab = Image.fromarray(label)
        if palette:
            lab = Image.frombytes("P", lab.size, lab.tobytes())
            lab.putpalette(VOC_PALETTE.flatten().tolist())
        save_atomic(lab, label_path)

    roots = {}
    for year, label_dir, sets, classes in (
        ("VOC2012", "SegmentationClass", "Segmentation", 21),
        ("VOC2010", "SegmentationClassContext", "SegmentationContext", 60),
    ):
        base = root / "VOCdevkit" / year
        ids = [f"2008_{k:06d}" for k in range(images)]
        for i in ids:
            image, label = scene(75, 100, classes)
            put(image, label, base / "JPEGImages" / f"{i}.jpg", base / label_dir / f"{i}.png", palette=True)
        (base / "ImageSets" / sets).mkdir(parents=True, exist_ok=True)
        (base / "ImageSets" / sets / "val.txt").write_text("\n".join(ids) + "\n")
        for name in ("voc21", "voc20") if year == "VOC2012" else ("context60", "context59"):
            roots[name] = base
    base = root / "cityscapes"
    for k in range(images):
        city = ("frankfurt", "lindau")[k % 2]
        stem = f"{city}_000000_{k:06d}"
        image, label = scene(64, 128, 19)
        put(
            image,
            label,
            base / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png",
            base / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png",
            palette=False,
        )
    roots["cityscapes"] = base
    base = root / "ade" / "ADEChallengeData2016"
    for k in range(images):
        image, label = scene(80, 96, 151)
        label[label == 255] = 0  # ADE20K marks "other" with 0, which reduce_zero_label ignores
        stem = f"ADE_val_{k:08d}"
        put(
            image,
            label,
            base / "images" / "validation" / f"{stem}.jpg",
            base / "annotations" / "validation" / f"{stem}.png",
            palette=False,
        )
    roots["ade20k"] = base
    return roots
