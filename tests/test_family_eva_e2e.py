"""The Eva-trunk families end to end through the library, on their tiny twins: the family follows from the model
(``build_encoder``, ``spar_pl.load``), weight files are recognised, and fit -> export -> test -> segment -> features."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import spar_pl
from spar_pl.cli import main
from spar_pl.distill import DistillModule
from spar_pl.encoders import build_encoder
from spar_pl.families import eva, family_of_keys, get_family
from spar_pl.testing import TINY_MODELS, write_sample_images, write_tiny_benchmarks

from .helpers import fit_args

TWINS = {"spar-tiny-eva02": ("eva02", eva.EVA02Encoder, 14, 32), "spar-tiny-pe": ("pe", eva.PEEncoder, 16, 48)}


@pytest.mark.parametrize("name", sorted(TWINS))
def test_the_family_follows_from_the_model_and_its_weight_files(name, caplog):
    family, cls, patch, dim = TWINS[name]
    with caplog.at_level(logging.WARNING):
        encoder = build_encoder(model_name=name, pretrained=None)
    assert type(encoder) is cls and (encoder.family, encoder.backbone) == (family, family)
    assert (encoder.patch_size, encoder.native_size, encoder.default_crop) == (patch, 64, 64 // patch * patch)
    assert sum("random weights" in r.getMessage() for r in caplog.records) == 1
    assert TINY_MODELS[family] == name and get_family(family).tiny_model == name
    found, description = family_of_keys(encoder.model.state_dict())
    assert found is get_family(family), description
    assert type(build_encoder(family, pretrained=None, model_name=name)) is cls  # the family named as a backbone
    out = encoder(torch.randn(1, 3, 50, 70))
    assert out.shape == (1, dim, 50 // patch, 70 // patch)


@pytest.mark.parametrize("name", sorted(TWINS))
def test_fit_export_test_segment_features(name, tmp_path):
    family, _, patch, dim = TWINS[name]
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
    student = DistillModule.load_from_checkpoint(ckpt).student
    assert student.family == family and student.default_crop == 64 // patch * patch
    exported = tmp_path / "student.safetensors"
    main(["export", str(ckpt), str(exported)])
    encoder = build_encoder(model_name=name, checkpoint=exported)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), student(x))

    from spar_pl.evaluate import SegEvalModule
    from spar_pl.segdata import SegDataModule

    bench = write_tiny_benchmarks(tmp_path / "bench", images=1)
    evaluator = SegEvalModule(model_name=name, checkpoint=str(exported), classes="voc20", mode="sliding")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    metrics = trainer.test(evaluator, SegDataModule("voc20", str(bench["voc20"])), verbose=False)[0]
    assert 0.0 <= metrics["test/mIoU"] <= 100.0

    Image.new("RGB", (70, 50), (30, 120, 200)).save(tmp_path / "a.png")
    common = ["--model-name", name, "--checkpoint", str(exported)]
    main(["segment", str(tmp_path / "a.png"), *common, "--classes", "sky", "grass", "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "a_overlay.png").is_file() and (tmp_path / "s" / "a_labels.png").is_file()
    main(["features", str(tmp_path / "a.png"), *common, "--dtype", "float32", "--out", str(tmp_path / "f")])
    with safe_open(str(tmp_path / "f" / "a.safetensors"), "pt") as fh:
        assert fh.get_tensor("features").shape == (1, dim, 50 // patch, 70 // patch)

    spar = spar_pl.load(model_name=name, checkpoint=exported, device="cpu")
    result = spar.segment(Image.open(tmp_path / "a.png"), ["sky", "grass"])
    assert result.mask.shape == (50, 70) and set(result.present()) <= {"sky", "grass"}
    assert tuple(spar.features(Image.open(tmp_path / "a.png")).shape[-2:]) == (50 // patch, 70 // patch)
