"""Families and geometries end to end, each tiny twin named by model alone: patch 14 (SigLIP at a pretraining size the
patch does not divide), patch 32, and the Eva-trunk families (EVA02-CLIP, the Perception Encoder), through fit ->
export -> test -> segment -> features."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import spar_pl
from spar_pl.cli import main
from spar_pl.distill import DistillModule
from spar_pl.encoders import build_encoder
from spar_pl.evaluate import SegEvalModule
from spar_pl.segdata import SegDataModule
from spar_pl.testing import TINY_GEOMETRIES, write_sample_images, write_tiny_benchmarks

from .helpers import fit_args


@pytest.mark.parametrize(
    "name", ["spar-tiny-clip-p14", "spar-tiny-sl2-p14", "spar-tiny-clip-p32", "spar-tiny-eva02", "spar-tiny-pe"]
)
def test_fit_export_test_segment_features(name, tmp_path):
    family, patch, native = TINY_GEOMETRIES[name]
    crop = native // patch * patch
    images = tmp_path / "images"
    write_sample_images(images / "train", 3, seed=0, size=(80, 100))
    write_sample_images(images / "val", 1, seed=1, size=(80, 100))
    model = [
        "--model.init_args.backbone",
        "null",
        "--model.init_args.model_name",
        name,
        "--model.init_args.crop",
        "null",
    ]
    main(fit_args(images, tmp_path / "run", *model, "--trainer.max_epochs", "1"))
    ckpt = sorted((tmp_path / "run").rglob("last.ckpt"))[0]
    distill = DistillModule.load_from_checkpoint(ckpt)
    student = distill.student
    assert (student.family, student.patch_size, distill.teacher.crop) == (family, patch, crop)
    exported = tmp_path / "student.safetensors"
    main(["export", str(ckpt), str(exported)])
    encoder = build_encoder(model_name=name, checkpoint=exported)
    x = torch.randn(1, 3, 2 * patch, 3 * patch)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), student(x))

    bench = write_tiny_benchmarks(tmp_path / "bench", images=1)
    evaluator = SegEvalModule(model_name=name, checkpoint=str(exported), classes="voc20", mode="sliding")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    metrics = trainer.test(evaluator, SegDataModule("voc20", str(bench["voc20"])), verbose=False)[0]
    assert 0.0 <= metrics["test/mIoU"] <= 100.0 and evaluator.encoder.default_crop == crop

    Image.new("RGB", (90, 60), (30, 120, 200)).save(tmp_path / "a.png")
    common = ["--model-name", name, "--checkpoint", str(exported)]
    main(
        [
            "segment",
            str(tmp_path / "a.png"),
            *common,
            "--classes",
            "sky",
            "grass",
            "--mode",
            "sliding",
            "--out",
            str(tmp_path / "w"),
        ]
    )
    main(["segment", str(tmp_path / "a.png"), *common, "--classes", "sky", "grass", "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "a_overlay.png").is_file() and (tmp_path / "s" / "a_labels.png").is_file()
    main(["features", str(tmp_path / "a.png"), *common, "--mode", "sliding", "--out", str(tmp_path / "f")])
    with safe_open(str(tmp_path / "f" / "a.safetensors"), "pt") as fh:
        assert fh.get_tensor("features").shape[1:] == (student.embed_dim, 60 // patch, 90 // patch)
        assert fh.metadata()["crop"] == str(crop) and fh.metadata()["patch_size"] == str(patch)

    spar = spar_pl.load(model_name=name, checkpoint=exported, device="cpu")
    result = spar.segment(Image.open(tmp_path / "a.png"), ["sky", "grass"])
    assert result.mask.shape == (60, 90) and set(result.present()) <= {"sky", "grass"}
    assert tuple(spar.features(Image.open(tmp_path / "a.png")).shape[-2:]) == spar.encoder.grid_size(60, 90)
