"""One image reader for training, evaluation and inference (``spar_pl.images``)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from spar_pl import api, data, images, segdata, testing


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def rotated_jpeg() -> bytes:
    """A 6x4 JPEG whose EXIF orientation (6: rotate 90 degrees clockwise) shows it as 4x6."""
    img = Image.new("RGB", (6, 4), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(img, "JPEG", exif=exif, quality=100)


def sources() -> dict[str, bytes]:
    rgba = Image.new("RGBA", (5, 3), (255, 0, 0, 0))  # fully transparent red: white, as a viewer shows it
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    deep = Image.fromarray(np.full((3, 4), 65535 // 3, dtype=np.uint16))  # 16-bit grayscale
    gray = Image.new("L", (4, 2), 77)
    return {
        "exif.jpg": rotated_jpeg(),
        "alpha.png": encoded(rgba, "PNG"),
        "deep.png": encoded(deep, "PNG"),
        "gray.png": encoded(gray, "PNG"),
        "palette.png": encoded(Image.new("RGB", (5, 4), (10, 200, 30)).convert("P"), "PNG"),
        "cmyk.jpg": encoded(Image.new("CMYK", (6, 3), (20, 40, 60, 0)), "JPEG"),
    }


def test_the_reader_handles_orientation_alpha_depth_and_gray():
    src = sources()
    assert tuple(images.read_image(src["exif.jpg"]).shape) == (3, 6, 4)  # EXIF applied: portrait
    alpha = images.read_image(src["alpha.png"])
    torch.testing.assert_close(alpha[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(alpha[:, 1, 1], torch.ones(3))
    deep = images.read_image(src["deep.png"])
    assert deep.shape == (3, 3, 4) and torch.allclose(deep, torch.full_like(deep, (65535 // 3) / 65535))
    gray = images.read_image(src["gray.png"])
    assert gray.shape == (3, 2, 4) and torch.all(gray == 77 / 255)
    with pytest.raises(images.ImageInputError, match="cannot read image broken.jpg"):
        images.read_image(src["exif.jpg"][:40], name="broken.jpg")


def test_training_evaluation_and_inference_read_alike(tmp_path):
    """Training (``data.decode``), evaluation (``SegDataset``) and inference (``api.read_image``) see the same
    pixels of the same file: once they drifted (only inference applied EXIF and composited alpha)."""
    for name, payload in sources().items():
        path = tmp_path / name
        path.write_bytes(payload)
        inference = api.read_image(path)
        image_id, train, _ = data.decode({"image": {"path": str(path), "bytes": None}, "__key__": name}, "image")
        assert image_id == name and train.dtype == np.uint8
        np.testing.assert_array_equal(train, images.to_rgb8(inference))
    # an 8-bit RGB file comes back exactly as stored
    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    (tmp_path / "exact.png").write_bytes(encoded(Image.fromarray(rgb), "PNG"))
    np.testing.assert_array_equal(images.read_rgb8(tmp_path / "exact.png"), rgb)


def test_evaluation_images_go_through_the_reader(tmp_path):
    roots = testing.write_tiny_benchmarks(tmp_path, images=1)
    ds = segdata.SegDataset("ade20k", roots["ade20k"])
    image_path, label_path, _ = ds.samples[0]
    # rotate the stored pixels and say so in EXIF: the reader shows the upright image, which matches the label
    upright = Image.open(image_path).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera writes before tagging orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(image_path, "JPEG", exif=exif, quality=95)
    sample = ds[0]
    assert sample["label"].shape == tuple(np.asarray(Image.open(label_path)).shape)  # no size mismatch raised
