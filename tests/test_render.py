"""Masks as pictures (spar_pl.render): the palette, label PNGs read back as indices, the overlay's legend."""

import numpy as np
import pytest
from PIL import Image

from spar_pl.render import label_image, legend_corner, overlay, palette, save_atomic


def test_palette_colours_are_distinct_and_fixed():
    colours = palette(21)
    assert colours.shape == (21, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours}) == 21 and np.array_equal(colours, palette(21))


def test_label_png_reads_back_as_the_class_indices(tmp_path):
    mask = np.arange(12).reshape(3, 4) % 7
    path = save_atomic(label_image(mask, 7), tmp_path / "labels.png")
    assert np.array_equal(np.asarray(Image.open(path)), mask)
    with pytest.raises(ValueError, match="at most 256 classes"):
        label_image(mask, 300)


def test_the_legend_goes_where_it_hides_least():
    mask = np.zeros((100, 100), np.int64)
    mask[:50, :50] = 1 + np.arange(50)[None] % 3  # a busy top-left corner
    mask[:50, 50:] = 4  # a uniform top-right corner, of another class than the image's most frequent
    assert legend_corner(mask, (20, 10)) == (80, 0)


def test_overlay_blends_and_lists_only_the_classes_present():
    image = Image.new("RGB", (200, 120), (0, 0, 0))
    mask = np.zeros((120, 200), np.int64)
    mask[:, 100:] = 2
    out = np.asarray(overlay(image, mask, ["a", "b", "c"], alpha=0.5)).astype(int)
    colours = palette(3).astype(int)
    assert out.shape == (120, 200, 3)
    assert np.abs(out[60, 60] - colours[0] // 2).max() <= 1 and np.abs(out[60, 140] - colours[2] // 2).max() <= 1
    tiny = overlay(Image.new("RGB", (4, 4)), np.zeros((4, 4), np.int64), ["a"])  # no room for a legend
    assert np.abs(np.asarray(tiny).astype(int) - palette(1)[0].astype(int) * 0.55).max() <= 1
