"""Pixel-adaptive mask refinement (PAMR), as NACLIP applies it to the class logits.

PAMR (Araslanov and Roth, CVPR 2020) repeatedly replaces every pixel's class logits by a weighted mean of its
neighbours' logits, the weights an image-dependent affinity. For dilations ``D`` (NACLIP: 8 and 16) the neighbours
of a pixel are the 8 pixels of a 3x3 grid with spacing ``d`` around it, for each ``d`` in ``D`` (image borders
replicated). With ``I`` the image (any per-channel affine normalisation gives the same affinity, up to the
``1e-8``), per channel ``c``:

* ``sigma_c`` = the standard deviation (unbiased) of the ``9 * len(D)`` values of the 3x3 grids of all dilations,
  the centre included once per dilation;
* ``a_n`` = ``softmax_n(mean_c(-|I_c - I_c[n]| / (1e-8 + 0.1 * sigma_c)))`` over the ``8 * len(D)`` neighbours;
* each of ``steps`` iterations: ``m <- sum_n a_n * m[n]`` (the centre itself is not among the neighbours).

Each class channel is refined on its own with the same affinity, so the refinement runs chunk by chunk of classes
(:class:`~spar_pl.openvocab.OpenVocabHead` does) and gives the same result as over all classes at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["PAMR_DILATIONS", "PAMR_STEPS", "pamr_affinity", "pamr_refine"]

#: NACLIP's defaults (``pamr_steps=10, pamr_stride=(8, 16)``).
PAMR_STEPS = 10
PAMR_DILATIONS = (8, 16)
#: Offsets of the 3x3 grid without its centre, in units of the dilation.
_RING = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _shifted(x: torch.Tensor, dy: int, dx: int, pad: int) -> torch.Tensor:
    """``x[..., i + dy, j + dx]`` with the border replicated, from a copy of ``x`` padded by ``pad``."""
    h, w = x.shape[-2] - 2 * pad, x.shape[-1] - 2 * pad
    return x[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]


def _replicate(x: torch.Tensor, pad: int) -> torch.Tensor:
    """``x`` ``(B, C, H, W)`` padded by ``pad`` on every side with its border values."""
    return F.pad(x, [pad] * 4, mode="replicate")


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int] = PAMR_DILATIONS) -> torch.Tensor:
    """The neighbour weights ``(B, 8 * len(dilations), H, W)`` of an image ``(B, 3, H, W)`` (they sum to one over
    dimension 1)."""
    image = image.float()
    pad = max(dilations)
    padded = _replicate(image, pad)
    grid = [_shifted(padded, dy * d, dx * d, pad) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    sigma = torch.stack(grid, dim=2).std(dim=2)  # (B, 3, H, W)
    scale = 1e-8 + 0.1 * sigma
    logits = [
        (-(image - _shifted(padded, dy * d, dx * d, pad)).abs() / scale).mean(dim=1)
        for d in dilations
        for dy, dx in _RING
    ]
    return torch.stack(logits, dim=1).softmax(dim=1)


def pamr_refine(
    masks: torch.Tensor, affinity: torch.Tensor, steps: int = PAMR_STEPS, dilations: Sequence[int] = PAMR_DILATIONS
) -> torch.Tensor:
    """Refine masks ``(B, K, H, W)`` (any K: class logits or scores) with an affinity of :func:`pamr_affinity`
    (the same ``dilations``) for ``steps`` iterations."""
    if masks.shape[-2:] != affinity.shape[-2:]:
        raise ValueError(f"masks of size {tuple(masks.shape[-2:])} for an affinity of {tuple(affinity.shape[-2:])}")
    pad = max(dilations)
    offsets = [(dy * d, dx * d) for d in dilations for dy, dx in _RING]
    if affinity.shape[1] != len(offsets):
        raise ValueError(f"affinity with {affinity.shape[1]} neighbours for dilations {tuple(dilations)}")
    weights = affinity[:, :, None].to(masks.dtype)  # (B, P, 1, H, W)
    for _ in range(steps):
        padded = _replicate(masks, pad)
        out = torch.zeros_like(masks)
        for n, (dy, dx) in enumerate(offsets):
            out += weights[:, n] * _shifted(padded, dy, dx, pad)
        masks = out
    return masks
