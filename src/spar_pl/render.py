"""Turning label masks into pictures: a palette, a colour overlay with a legend, atomic PNG writes."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from spar_pl.fileio import atomic_path


def palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """A fixed ``(num_classes, 3)`` uint8 palette of well separated colours (golden-ratio hues)."""
    hues = (np.arange(num_classes) * 0.618033988749895 + 0.11 * seed) % 1.0
    sat = 0.65 + 0.35 * (np.arange(num_classes) % 2)
    hsv = np.stack([hues * 255, sat * 255, np.full(num_classes, 230)], axis=1).astype(np.uint8)
    return np.asarray(Image.fromarray(hsv[None], mode="HSV").convert("RGB"))[0]


@functools.lru_cache(maxsize=1)
def font_file() -> tuple[str | None, frozenset[int]]:
    """matplotlib's DejaVu Sans (Latin, Greek, Cyrillic, many symbols) and the code points it covers; ``(None,
    empty)`` where it cannot be found (Pillow's own font is used then)."""
    try:
        import matplotlib
        from fontTools.ttLib import TTFont

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        with TTFont(str(path), lazy=True) as font:
            return str(path), frozenset(font.getBestCmap())
    except (ImportError, OSError):
        return None, frozenset()


def legend_font(image_size: tuple[int, int]) -> ImageFont.ImageFont:
    """A font whose height follows the image: about 1/40 of the shorter side, 9 to 64 px (DejaVu Sans)."""
    size = int(min(64, max(9, round(min(image_size) / 40))))
    path, _ = font_file()
    try:
        return ImageFont.truetype(path, size) if path else ImageFont.load_default(size=size)
    except (OSError, TypeError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def drawable(text: str) -> str:
    """``text`` with each character the legend font cannot draw (CJK, emoji, ... outside DejaVu Sans) written as its
    code point, ``<U+732B>``: readable and unambiguous instead of a row of boxes."""
    path, covered = font_file()
    if path is None:
        return text.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if ord(c) in covered or c.isspace() else f"<U+{ord(c):04X}>" for c in text)


def ellipsise(text: str, width: float, measure) -> str:
    """``text`` cut at the end with "…" so that ``measure(text) <= width`` (at least the first character)."""
    if measure(text) <= width:
        return text
    lo, hi = 1, len(text)
    while lo < hi:  # the longest prefix that fits with the ellipsis
        mid = (lo + hi + 1) // 2
        if measure(text[:mid].rstrip() + "…") <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "…"


def legend_corner(mask: np.ndarray, box: tuple[int, int]) -> tuple[int, int]:
    """Top-left ``(x, y)`` of the image corner where a legend of ``box = (width, height)`` hides least: the corner
    whose covered pixels are most uniform (fewest pixels of classes other than the corner's most frequent one)."""
    height, width = mask.shape
    bw, bh = min(box[0], width), min(box[1], height)
    best, corner = None, (0, 0)
    for x, y in ((0, 0), (width - bw, 0), (0, height - bh), (width - bw, height - bh)):
        patch = mask[y : y + bh, x : x + bw]
        hidden = patch.size - int(np.bincount(patch.ravel()).max()) if patch.size else 0
        if best is None or hidden < best:
            best, corner = hidden, (x, y)
    return corner


def overlay(
    image: Image.Image,
    mask: np.ndarray,
    class_names: Sequence[str],
    alpha: float = 0.55,
    max_area: float = 0.25,
    grey: bool = True,
) -> Image.Image:
    """Blend a colour-coded mask over an RGB image and add a legend of the classes present.

    The mask colours are blended over a grey version of the image (``grey``), so the image's own colours never read
    as classes. The legend's text (DejaVu Sans: Latin, Greek, Cyrillic; other characters as ``<U+XXXX>``) scales
    with the image, sits in the corner where it hides least (:func:`legend_corner`) and covers at most ``max_area``
    of the image beyond its first line: long names end in "…", classes that do not fit are summarised as "+N more"
    (largest areas first). Only an image too small for one line of text gets no legend.

    Args:
        image: the RGB image, same size as ``mask``.
        mask: ``(H, W)`` integer class indices.
        class_names: a display name per class index.
        alpha: weight of the mask colour.
        max_area: the largest fraction of the image the legend may cover (its first line always shows).
        grey: blend over the image's luminance instead of its colours.
    """
    colours = palette(len(class_names))
    base = image.convert("L").convert("RGB") if grey else image.convert("RGB")
    rgb = np.asarray(base, dtype=np.float32)
    blended = (1 - alpha) * rgb + alpha * colours[mask].astype(np.float32)
    out = Image.fromarray(blended.clip(0, 255).astype(np.uint8))
    present, counts = np.unique(mask, return_counts=True)
    order = list(present[np.argsort(-counts, kind="stable")])
    draw = ImageDraw.Draw(out)
    font = legend_font(out.size)
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (10, 2)
    line = ascent + descent + max(2, (ascent + descent) // 4)
    pad = max(2, line // 4)
    swatch = max(4, ascent - 1)

    def measure(text: str) -> float:
        return draw.textlength(text, font=font)

    room = max(out.width // 2, out.width - pad * 3 - swatch) - pad * 3 - swatch  # text width of a row
    rows = [ellipsise(drawable(str(class_names[k])), room, measure) for k in order]

    def box_for(labels: list[str]) -> tuple[int, int]:
        text = max((int(measure(r)) for r in labels), default=0)
        return pad * 3 + swatch + text, pad * 2 + line * len(labels)

    shown = len(rows)
    while True:
        labels = rows[:shown] + ([f"+{len(rows) - shown} more"] if shown < len(rows) else [])
        bw, bh = box_for(labels)
        fits = bw * bh <= max_area * out.width * out.height and bh <= out.height
        if fits or shown == 1:
            break
        shown -= 1
    if shown == 1 and not fits:
        labels = rows[:1]
        bw, bh = box_for(labels)
    if bh > out.height or bw > out.width:
        return out  # the image is too small for one line of text
    x0, y0 = legend_corner(mask, (bw, bh))
    panel = Image.new("RGBA", (bw, bh), (0, 0, 0, 170))
    out.paste(panel, (x0, y0), panel)
    for row, label in enumerate(labels):
        y = y0 + pad + row * line
        if row < shown:
            colour = tuple(int(c) for c in colours[order[row]])
            draw.rectangle(
                [x0 + pad, y + (line - swatch) // 2, x0 + pad + swatch, y + (line + swatch) // 2], fill=colour
            )
        draw.text((x0 + pad * 2 + swatch, y), label, fill=(255, 255, 255), font=font)
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


def panel_figure(panels: Sequence[tuple[str, Image.Image]], path: str | Path, title: str = "") -> Path:
    """Pictures side by side with a title each (matplotlib), written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.9 * len(panels), 3.4), layout="constrained", squeeze=False)
    for ax, (name, picture) in zip(axes[0], panels):
        ax.imshow(np.asarray(picture.convert("RGB")))
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
