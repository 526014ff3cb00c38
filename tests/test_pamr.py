"""PAMR (spar_pl.pamr) and its place in the open-vocabulary head."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spar_pl.openvocab import OpenVocabHead
from spar_pl.pamr import pamr_affinity, pamr_refine


def two_regions(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose left part (columns < 27) is dark and right part bright, with slight noise, and its labels."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(size, size, dtype=torch.long)
    labels[:, 27:] = 1
    image = torch.where(labels.bool(), 0.8, 0.2).expand(1, 3, size, size) + 0.01 * torch.randn(
        1, 3, size, size, generator=gen
    )
    return image, labels


def noisy_logits(labels: torch.Tensor) -> torch.Tensor:
    """Two-class logits whose boundary is blurred and shifted 6 pixels right of the true edge, plus noise."""
    size = labels.shape[-1]
    gen = torch.Generator().manual_seed(1)
    coarse = torch.zeros(1, 1, size, size)
    coarse[..., 33:] = 1  # the edge at 33 instead of 27
    coarse = F.avg_pool2d(coarse, 9, stride=1, padding=4, count_include_pad=False)
    right = coarse + 0.3 * torch.randn(1, 1, size, size, generator=gen)
    return torch.cat([1 - right, right], dim=1)


def test_affinity_is_a_distribution_that_avoids_the_edge():
    image, _ = two_regions()
    affinity = pamr_affinity(image, (8, 16))
    assert affinity.shape == (1, 16, 64, 64)
    assert torch.allclose(affinity.sum(1), torch.ones(1, 64, 64), atol=1e-5)
    # a pixel just left of the edge: neighbours across the edge (offsets +8, +16 in x) get almost no weight
    row, col = 32, 24
    offsets = [(dy * d, dx * d) for d in (8, 16) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    across = [n for n, (_, dx) in enumerate(offsets) if col + dx >= 27]
    assert float(affinity[0, across, row, col].sum()) < 1e-3


def test_pamr_cleans_a_noisy_mask_along_the_image_edge():
    image, labels = two_regions()
    logits = noisy_logits(labels)
    before = (logits.argmax(1)[0] == labels).float().mean()
    refined = pamr_refine(logits, pamr_affinity(image, (8, 16)), steps=10, dilations=(8, 16))
    after = (refined.argmax(1)[0] == labels).float().mean()
    assert before < 0.93
    assert after > 0.99
    # zero steps change nothing; constant masks stay constant (the weights sum to one)
    assert torch.equal(pamr_refine(logits, pamr_affinity(image), steps=0), logits)
    flat = torch.full((1, 2, 64, 64), 0.3)
    assert torch.allclose(pamr_refine(flat, pamr_affinity(image)), flat)


def test_head_applies_pamr_when_asked():
    image, labels = two_regions()
    # features whose cosine logits are noisy_logits: two orthogonal text embeddings, features = logits
    text = torch.eye(2)
    logits = noisy_logits(labels)
    feats = F.avg_pool2d(logits, 4)  # a 16x16 feature grid, upsampled by the head
    plain = OpenVocabHead(text, ["left", "right"], logit_scale=40)
    refined = OpenVocabHead(text, ["left", "right"], logit_scale=40, pamr_steps=10)
    got_plain = plain.predict(feats, (64, 64))[0]
    got = refined.predict(feats, (64, 64), images=image)[0]
    assert (got == labels).float().mean() > (got_plain == labels).float().mean() + 0.05
    # predict (chunked) and forward (all classes at once) agree
    assert torch.equal(refined(feats, (64, 64), images=image).argmax(1)[0], got)
    with pytest.raises(ValueError, match="PAMR.*images"):
        refined.predict(feats, (64, 64))
    with pytest.raises(ValueError, match="pamr_steps"):
        OpenVocabHead(text, ["left", "right"], pamr_steps=-1)


@pytest.mark.skipif(not os.environ.get("SPAR_NACLIP_REPO"), reason="set SPAR_NACLIP_REPO to a sinahmr/NACLIP checkout")
def test_pamr_matches_naclip():
    spec = importlib.util.spec_from_file_location("naclip_pamr", Path(os.environ["SPAR_NACLIP_REPO"]) / "pamr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 70, 90, generator=gen)
    masks = torch.randn(2, 5, 70, 90, generator=gen)
    theirs = module.PAMR(10, dilations=[8, 16])(image, masks)
    ours = pamr_refine(masks, pamr_affinity(image, (8, 16)), 10, (8, 16))
    error = float((ours - theirs).norm() / theirs.norm())
    print(f"PAMR relative error against NACLIP's pamr.py: {error:.2e}")
    assert error <= 1e-5
