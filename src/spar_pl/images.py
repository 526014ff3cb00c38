"""Images in: one reader for training, evaluation and inference.

Every image, whatever its source (a file, the bytes of one in a dataset shard, a PIL image, an array or a tensor),
becomes one float RGB tensor ``(3, H, W)`` in ``[0, 1]`` (:func:`read_image`), or its 8-bit rounding
(:func:`read_rgb8`) for the training augmentation:

* files (any format PIL reads) are decoded at once (a truncated file fails, naming it) and their EXIF
  orientation applied;
* grayscale is repeated over the three channels; 16-bit data (``I;16`` PNGs, uint16 arrays) is scaled from
  ``[0, 65535]`` to ``[0, 1]``, 32-bit integer images (mode ``I``) are clipped to that range first;
  transparency (RGBA, LA, palette images with a transparent colour) is composited over white
  (:data:`ALPHA_BACKGROUND`), as an image viewer shows it;
* arrays ``HxW``, ``HxWx1``, ``HxWx3``, ``HxWx4`` (uint8, uint16, bool, or floats in ``[0, 1]``) and tensors
  ``(3, H, W)`` or ``(1, 3, H, W)`` (also 1 or 4 channels) are taken as they are;
* an image larger than :data:`MAX_SIDE` pixels on a side or :data:`MAX_PIXELS` pixels in all (after the
  caller's ``max_side``) is refused before it is decoded.

Folders contribute the files with one of :data:`IMAGE_SUFFIXES`, everywhere.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor

#: Version of the decoding rules above; anything that stores what was computed from decoded pixels (the teacher
#: cache) records it, so that a change of the rules makes such stores stale instead of silently reused.
READER_VERSION = "spar_pl.images/1"
#: Largest model-input side and pixel count accepted in one pass (after ``max_side``).
MAX_SIDE = 16384
MAX_PIXELS = 100_000_000
#: Colour that transparent pixels are composited over.
ALPHA_BACKGROUND = (1.0, 1.0, 1.0)
#: File suffixes taken from a directory (case-insensitive); files named explicitly are always tried.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


class ImageInputError(ValueError):
    """An image the API cannot use (unreadable, unsupported layout or dtype, too large); the message names it."""


def describe(image: object) -> str:
    """A short name for an image input, used in every error message about it."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, Image.Image):
        source = getattr(image, "filename", "") or "PIL image"
        return f"{source} ({image.mode} {image.width}x{image.height})"
    if isinstance(image, (np.ndarray, torch.Tensor)):
        kind = "numpy array" if isinstance(image, np.ndarray) else "tensor"
        return f"{kind} of shape {tuple(image.shape)} and dtype {image.dtype}"
    return type(image).__name__


def fit_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """``(width, height)`` scaled down, keeping the aspect ratio, so that the long side is at most ``max_side``."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    if max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side}")
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def check_size(width: int, height: int, max_side: int | None, name: str) -> None:
    """Refuse an image whose model input (after ``max_side``) is larger than :data:`MAX_SIDE` / :data:`MAX_PIXELS`."""
    if width < 1 or height < 1:
        raise ImageInputError(f"{name}: the image is empty ({width}x{height})")
    w, h = fit_size(width, height, max_side)
    if max(w, h) > MAX_SIDE or w * h > MAX_PIXELS:
        raise ImageInputError(
            f"{name}: {w}x{h} pixels ({w * h / 1e6:.1f} MP) is above the single-pass limit of {MAX_SIDE} px a side "
            f"and {MAX_PIXELS / 1e6:.0f} MP; downscale it with --max-side N (max_side=N in Python), e.g. 4096"
        )


def read_image(image: ImageInput | bytes, max_side: int | None = None, name: str | None = None) -> torch.Tensor:
    """Any supported image input as a float RGB tensor ``(3, H, W)`` in ``[0, 1]`` at its original size.

    ``max_side`` only enters the size check (:func:`check_size`), made before a file is decoded.

    Args:
        image: a path, the encoded bytes of a file, a PIL image, a numpy array or a tensor.
        max_side: the long side the caller will downscale to (inference), for the size check.
        name: how errors name the input (default: :func:`describe`; bytes: ``"image bytes"``).

    Raises:
        FileNotFoundError: a path that does not exist.
        ImageInputError: an unreadable file or an unsupported layout, dtype or value range, naming the input.
        TypeError: an object that is no image input.
    """
    encoded = _encoded(image, name)
    if encoded is not None:
        opener, name = encoded
        return _from_pil(_open(opener, name, max_side), name, max_side)
    name = name or describe(image)
    if isinstance(image, Image.Image):
        check_size(image.width, image.height, max_side, name)
        return _from_pil(image, name, max_side)
    if isinstance(image, torch.Tensor):
        image = _tensor_to_array(image, name)
    if isinstance(image, np.ndarray):
        return _from_array(image, name, max_side)
    raise TypeError(f"unsupported image input {name}; pass a path, a PIL image, a numpy array or a torch tensor")


def read_rgb8(image: ImageInput | bytes, name: str | None = None) -> np.ndarray:
    """:func:`read_image` as an ``H x W x 3`` uint8 array (the training augmentation's input): the same decoding
    (EXIF orientation, transparency over white, 16-bit and grayscale), rounded to 8 bits; an 8-bit RGB file comes
    back exactly as stored. Plain 8-bit images (RGB, grayscale, palettes without transparency) skip the float
    round trip, which would give the same bytes."""
    encoded = _encoded(image, name)
    if encoded is not None:
        opener, name = encoded
        image = _open(opener, name, None)
    if isinstance(image, Image.Image) and not _needs_float(image):
        check_size(image.width, image.height, None, name or describe(image))
        return np.asarray(_to_rgb(image, name or describe(image)))
    return to_rgb8(read_image(image, name=name))


def to_rgb8(pixels: torch.Tensor) -> np.ndarray:
    """A float RGB tensor ``(3, H, W)`` in ``[0, 1]`` as an ``H x W x 3`` uint8 array."""
    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(array)


def _encoded(image: object, name: str | None) -> tuple[Callable[[], object], str] | None:
    """How to open an encoded image (a path or the bytes of a file) and its name; ``None`` for decoded inputs."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return (lambda: io.BytesIO(image)), name or "image bytes"
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if path.is_dir():
            raise ImageInputError(f"{path} is a directory, not an image")
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        return (lambda: path), name or str(path)
    return None


def _open(source: Callable[[], object], name: str, max_side: int | None) -> Image.Image:
    """Open, size-check, decode and orient (EXIF) one encoded image; every failure names it."""
    try:
        with warnings.catch_warnings():  # our own size limit applies; PIL's bomb warning would only add noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source()) as img:
                check_size(img.width, img.height, max_side, name)
                img.load()  # decode now, so that a truncated file fails here, naming the file
                return ImageOps.exif_transpose(img)
    except ImageInputError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageInputError(f"cannot read image {name}: {err}") from err


def _needs_float(img: Image.Image) -> bool:
    """Whether a PIL image needs more than an 8-bit RGB conversion: 16- or 32-bit data, or transparency."""
    mode = img.mode
    transparent = (mode == "P" and "transparency" in img.info) or mode in ("RGBA", "LA", "PA", "RGBa", "La")
    return mode.startswith("I;16") or mode in ("I", "F") or transparent


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageInputError(f"{name}: cannot convert PIL mode {img.mode} to RGB: {err}") from err


def _from_pil(img: Image.Image, name: str, max_side: int | None) -> torch.Tensor:
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        return _from_array(np.asarray(img).clip(0, 65535).astype(np.uint16), name, max_side)
    if mode == "F":
        return _from_array(np.asarray(img, dtype=np.float32), name, max_side)
    if _needs_float(img):  # transparency
        return _from_array(np.asarray(img.convert("RGBA")), name, max_side)
    return _from_array(np.asarray(_to_rgb(img, name)), name, max_side)


def _tensor_to_array(image: torch.Tensor, name: str) -> np.ndarray:
    t = image.detach().cpu()
    if t.ndim == 4:
        if t.shape[0] != 1:
            raise ImageInputError(f"{name}: a batch of {t.shape[0]} images; pass one image at a time")
        t = t[0]
    if t.ndim == 3 and t.shape[0] in (1, 3, 4):
        t = t.permute(1, 2, 0)
    elif t.ndim != 2:
        raise ImageInputError(f"{name}: expected a tensor (3, H, W) or (1, 3, H, W)")
    return (t.float() if t.is_floating_point() else t).contiguous().numpy()


def _from_array(array: np.ndarray, name: str, max_side: int | None = None) -> torch.Tensor:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or array.ndim == 3 and array.shape[2] in (3, 4)):
        hint = " (channels first? transpose it to H x W x C)" if array.ndim == 3 and array.shape[0] in (1, 3, 4) else ""
        raise ImageInputError(f"{name}: expected an image array H x W, H x W x 3 or H x W x 4{hint}")
    check_size(array.shape[1], array.shape[0], max_side, name)
    if array.dtype == np.uint8:
        x = torch.from_numpy(array.astype(np.float32)) / 255.0
    elif array.dtype.kind == "u" and array.dtype.itemsize == 2:  # uint16, either byte order
        x = torch.from_numpy(array.astype(np.float32)) / 65535.0
    elif array.dtype == np.bool_:
        x = torch.from_numpy(array.astype(np.float32))
    elif np.issubdtype(array.dtype, np.floating):
        x = torch.from_numpy(array.astype(np.float32))
        low, high = (float(x.min()), float(x.max())) if x.numel() else (0.0, 0.0)
        if not (0.0 <= low and high <= 1.0):  # also false for NaN
            raise ImageInputError(f"{name}: float images must hold values in [0, 1], got [{low:g}, {high:g}]")
    else:
        raise ImageInputError(f"{name}: unsupported dtype {array.dtype}; use uint8, uint16 or floats in [0, 1]")
    if x.ndim == 2:
        x = x[..., None].expand(-1, -1, 3)
    elif x.shape[2] == 4:
        alpha = x[..., 3:]
        x = x[..., :3] * alpha + x.new_tensor(ALPHA_BACKGROUND) * (1 - alpha)
    return x.permute(2, 0, 1).contiguous()


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """A float RGB tensor ``(3, H, W)`` in ``[0, 1]`` as an 8-bit PIL image."""
    return Image.fromarray(to_rgb8(pixels))
