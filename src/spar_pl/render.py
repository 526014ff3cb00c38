"""Turning label masks into pictures: a palette, a colour overlay with a legend, atomic PNG writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from spar_pl.fileio import atomic_path


def palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """A fixed ``(num_classes, 3)`` uint8 palette of well separated colours (golden-ratio hues)."""
    hues = (np.arange(num_classes) * 0.618033988749895 + 0.11 * seed) % 1.0
    sat = 0.65 + 0.35 * (np.arange(num_classes) % 2)
    hsv = np.stack([hues * 255, sat * 255, np.full(num_classes, 230)], axis=1).astype(np.uint8)
    return np.asarray(Image.fromarray(hsv[None], mode="HSV").convert("RGB"))[0]


def overlay(image: Image.Image, mask: np.ndarray, class_names: Sequence[str], alpha: float = 0.55) -> Image.Image:
    """Blend a colour-coded mask over an RGB image and add a legend of the classes present.

    Args:
        image: the RGB image, same size as ``mask``.
        mask: ``(H, W)`` integer class indices.
        class_names: a display name per class index.
        alpha: weight of the mask colour.
    """
    colours = palette(len(class_names))
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = (1 - alpha) * rgb + alpha * colours[mask].astype(np.float32)
    out = Image.fromarray(blended.clip(0, 255).astype(np.uint8))
    present, counts = np.unique(mask, return_counts=True)
    order = present[np.argsort(-counts)]
    draw = ImageDraw.Draw(out)
    line = 14
    width = max([len(class_names[k]) for k in order] + [1]) * 7 + 24
    draw.rectangle([0, 0, width, line * len(order) + 6], fill=(0, 0, 0))
    for row, k in enumerate(order):
        y = 3 + row * line
        draw.rectangle([4, y + 2, 14, y + 11], fill=tuple(int(c) for c in colours[k]))
        draw.text((20, y), class_names[k], fill=(255, 255, 255))
    return out


def label_image(mask: np.ndarray, num_classes: int) -> Image.Image:
    """A palette PNG image of class indices (readable back as indices with PIL)."""
    if num_classes > 256:
        raise ValueError(f"a palette PNG holds at most 256 classes, got {num_classes}")
    img = Image.fromarray(mask.astype(np.uint8)).convert("L")
    img = Image.frombytes("P", img.size, img.tobytes())  # indices as they are, no palette quantisation
    img.putpalette(palette(num_classes).flatten().tolist())
    return img


def save_atomic(image: Image.Image, path: str | Path) -> Path:
    """Save a PIL image through a temporary file in the same folder, then rename: never half-written."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG")
    return path
