"""Reference implementations and helpers for tests and benchmarks.

Not used by the library's own code paths. The references here are written plainly from the method's
description (``docs/method.md``), independently of the optimised code they check: they import nothing from
:mod:`spar_pl.sliding`, so a mistake there cannot hide in the reference as well.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["naive_teacher", "naive_upsample_factor", "naive_window_starts"]


def naive_window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Window starts along one axis (``docs/method.md`` section 2, step 1).

    ``range(0, size - crop + 1, stride)``, plus one window flush with the far edge when the last start is not
    already there. A side shorter than the crop (where the reference crashes) gets one window at 0 that covers
    the whole side, as ``spar_pl`` documents.
    """
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop + 1, stride))
    if starts[-1] != size - crop:
        starts.append(size - crop)
    return starts


def naive_upsample_factor(patch: int, stride: int) -> int:
    """The smallest ``u`` in ``1..patch`` with ``patch % u == 0`` and ``stride % (patch // u) == 0`` (step 2)."""
    for u in range(1, patch + 1):
        if patch % u == 0 and stride % (patch // u) == 0:
            return u
    raise AssertionError("unreachable: u = patch always qualifies")


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
    f = p // naive_upsample_factor(p, stride)
    ch, cw = min(crop, height), min(crop, width)
    out = []
    for img in images:
        canvas = count = None
        for top in naive_window_starts(height, crop, stride):
            for left in naive_window_starts(width, crop, stride):
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
