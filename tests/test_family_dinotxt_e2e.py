"""The DINOv3.txt family through the pipeline with its tiny twin: ``spar-cli segment`` and ``features`` on the official
weight files, quickstart, the evaluation module's rows and a test run, a fit, and (slow) the three-row table. The
family's model code and weight files: ``tests/test_family_dinotxt.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spar_pl.cli import main
from spar_pl.scenes import scene_image

from .helpers import randomise, tiny_dinotxt, write_official_files

ROOT = Path(__file__).resolve().parents[1]
TINY_NAME = "spar-tiny-dinotxt"
TINY = ["--backbone", "dinov3txt", "--model-name", TINY_NAME]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    return write_official_files(randomise(tiny_dinotxt(0)), tmp_path_factory.mktemp("dinotxt"))


def test_segment_and_features_cli(files, tmp_path, capsys):
    scene_image(50, 70).save(tmp_path / "a.png")
    weights = ["--weights", str(files[0]), "--head-weights", str(files[1])]
    main(
        ["segment", str(tmp_path / "a.png"), *TINY, *weights, "--classes", "sky", "grass", "--out", str(tmp_path / "s")]
    )
    assert (tmp_path / "s" / "a_overlay.png").is_file() and (tmp_path / "s" / "a_labels.png").is_file()
    main(["features", str(tmp_path / "a.png"), *TINY, *weights, "--dtype", "float32", "--out", str(tmp_path / "f")])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "f" / "a.safetensors"), "pt") as fh:
        feats = fh.get_tensor("features")
    assert feats.shape == (1, 32, 4, 5)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["features", str(tmp_path / "a.png"), *TINY, "--weights", str(files[1]), "--head-weights", str(files[0]),
              "--out", str(tmp_path / "g")])  # fmt: skip
    assert exc.value.code == 1 and "is not a DINOv3 backbone file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["features", str(tmp_path / "a.png"), *TINY, "--weights", str(tmp_path / "nowhere.pth"),
              "--head-weights", str(files[1]), "--out", str(tmp_path / "g")])  # fmt: skip
    assert exc.value.code == 1 and "nowhere.pth" in capsys.readouterr().err


def test_quickstart_with_the_twin(tmp_path, capsys):
    main(["quickstart", "--backbone", "dinov3txt", "--no-distill", "--out", str(tmp_path)])
    assert (tmp_path / "overlay_single.png").is_file() and "spar-tiny-dinotxt" in capsys.readouterr().out


def test_eval_module_rows_and_test_run(files, tmp_path):
    import lightning as L

    from spar_pl.evaluate import SegEvalModule
    from spar_pl.segdata import SegDataModule
    from spar_pl.testing import write_tiny_benchmarks

    args = {"backbone": "dinov3txt", "model_name": TINY_NAME, "crop": 64, "classes": "voc20", "results_dir": None}
    pretrained = SegEvalModule(**args, weights=str(files[0]), head_weights=str(files[1]))
    assert pretrained.row == "pretrained, single pass"  # the released backbone is not a SPAR model
    bench = write_tiny_benchmarks(tmp_path / "bench", images=2)
    module = SegEvalModule(**{**args, "results_dir": str(tmp_path), "mode": "sliding"})
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    metrics = trainer.test(module, SegDataModule("voc20", str(bench["voc20"])), verbose=False)[0]
    assert 0.0 <= metrics["test/mIoU"] <= 100.0
    entry = json.loads((tmp_path / "dinov3txt-test.json").read_text())[-1]  # an ad-hoc run, not the table's
    assert entry["row"] == "pretrained, sliding window s=24" and entry["images"] == 2


def test_fit_keeps_the_student_in_eval_mode_and_trains_two_blocks(tmp_path):
    from spar_pl.distill import DistillModule
    from spar_pl.testing import write_sample_images

    write_sample_images(tmp_path / "train", 2, seed=0)
    config = ROOT / "configs" / "distill" / "dinov3txt-tiny.yaml"
    main(["fit", "--config", str(config), "--data.init_args.train_source", str(tmp_path / "train"),
          "--data.init_args.val_source", "null", "--trainer.fast_dev_run", "true",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])  # fmt: skip
    module = DistillModule(backbone="dinov3txt", model_name=TINY_NAME, pretrained=None, crop=64)
    module.train()
    assert not module.student.model.training and not module.teacher.encoder.training
    assert all(n.startswith(("model.visual.blocks.1.", "model.visual.blocks.2.")) for n in module.trainable_names)
    assert module.on_save_checkpoint(ckpt := {"state_dict": module.state_dict()}) is None
    assert ckpt["state_dict"] and all(k.startswith("student.") for k in ckpt["state_dict"])


@pytest.mark.slow
def test_table_three_rows_with_the_twin(tmp_path):
    from spar_pl.table import table as paper_table

    table = paper_table("dinov3txt", tiny=True, results=str(tmp_path))
    rows = [line for line in table.splitlines() if line.startswith("| ") and "inference" not in line]
    assert [r.split("|")[1].strip() for r in rows] == [
        "pretrained, single pass",
        "pretrained, sliding window s=24",
        "SPAR",
    ]
    assert all(cell.strip() not in ("-", "") for r in rows for cell in r.split("|")[2:10])  # every cell filled
    entries = json.loads((tmp_path / "dinov3txt-tiny.json").read_text())
    assert len(entries) == 18 and {e["config"]["backbone"] for e in entries} == {"dinov3txt"}
