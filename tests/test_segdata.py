"""The benchmarks' readers (spar_pl.segdata): the official layouts, the evaluation size rule, label values."""

import numpy as np
import pytest
from PIL import Image

from spar_pl.segdata import BENCHMARKS, SegDataset, eval_size, read_label


def test_eval_size_rule():
    assert eval_size(375, 500) == (672, 896)  # VOC is upscaled
    assert eval_size(1024, 2048, 2048, 1024) == (1024, 2048)  # Cityscapes native
    assert eval_size(512, 683) == (672, 896)
    assert eval_size(3000, 1000) == (2016, 672)


def test_reduce_zero_label(tmp_path):
    path = tmp_path / "l.png"
    Image.fromarray(np.array([[0, 1, 2], [255, 150, 3]], np.uint8)).save(path)
    assert read_label(path, reduce_zero_label=True).tolist() == [[255, 0, 1], [255, 149, 2]]
    assert read_label(path).tolist() == [[0, 1, 2], [255, 150, 3]]


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_each_reader_on_its_official_layout(bench, name):
    data = SegDataset(name, bench[name])
    assert len(data) == 3
    sample = data[0]
    label, image = sample["label"], sample["image"]
    h, w = label.shape
    assert image.shape[1:] == eval_size(h, w, *BENCHMARKS[name].max_sides)
    assert 0 <= image.min() and image.max() <= 1
    valid = label[label != 255]
    assert valid.numel() > 0 and valid.max() < {"voc21": 21, "voc20": 20, "context60": 60}.get(name, 150)
    if name == "voc21":  # palette PNG read as indices, 255 border kept
        assert (label[:2] == 255).all()


def test_missing_layout_errors_name_the_path(bench, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*JPEGImages"):
        SegDataset("voc21", tmp_path / "nowhere")
    (tmp_path / "VOC2012").mkdir()
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Segmentation/val.txt"):
        SegDataset("voc21", tmp_path / "VOC2012")
    root = bench["voc20"]
    data = SegDataset("voc20", root)
    label = data.samples[1][1]
    saved = label.read_bytes()
    try:
        label.write_bytes(b"broken")
        with pytest.raises(ValueError, match=label.name):
            data[1]
        label.unlink()
        with pytest.raises(FileNotFoundError, match=label.name):
            data[1]
    finally:
        label.write_bytes(saved)
