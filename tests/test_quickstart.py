"""``spar-cli quickstart`` (:mod:`spar_pl.quickstart`): the model it picks, its files and numbers, its picture."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from spar_pl.cli import main
from spar_pl.encoders import ModelSpec
from spar_pl.quickstart import quickstart, quickstart_model, side_by_side
from spar_pl.reproduce import TINY_MODEL, shipped_weights


def test_the_model_it_runs():
    """No model named: the shipped tiny model; a backbone alone: its tiny random twin; a model named: that model."""
    for spec in (None, ModelSpec(), ModelSpec(dense="sclip")):
        shipped, is_shipped = quickstart_model(spec)
        assert is_shipped and (shipped.backbone, shipped.model_name) == ("maskclip", TINY_MODEL)
        assert shipped.pretrained is None  # the weights come from the shipped file
        assert shipped.weights == str(shipped_weights()) and shipped.dense == (spec.dense if spec else None)
    assert quickstart_model(ModelSpec("siglip2")) == (ModelSpec("siglip2", "spar-tiny-sl2"), False)
    assert quickstart_model(ModelSpec(pretrained=None)) == (ModelSpec("siglip2", "spar-tiny-sl2", None), False)
    named = ModelSpec(model_name="ViT-B-16", pretrained="openai")
    assert quickstart_model(named) == (named, False)
    with_weights = quickstart_model(ModelSpec("maskclip", weights="w.safetensors"))[0]
    assert with_weights.model_name == "ViT-B-16"  # the backbone's default model, its weights from the file


@pytest.mark.slow  # distils, evaluates and renders end to end (about 25 s on 2 CPUs)
def test_quickstart_writes_overlays(tmp_path, capsys):
    numbers = quickstart(ModelSpec("siglip2"), out=str(tmp_path), classes=["sky", "grass, lawn", "house"])
    assert numbers["heldout_mse_after"] < numbers["heldout_mse_before"]
    assert list((tmp_path / "distill").rglob("last.ckpt"))
    assert "| SPAR |" in numbers["table"] and (tmp_path / "tiny.md").is_file()
    for name in ("overlay_single.png", "overlay_sliding.png", "labels_single.png", "labels_sliding.png"):
        img = Image.open(tmp_path / name)
        assert img.size == (480, 320)
    labels = np.asarray(Image.open(tmp_path / "labels_sliding.png"))
    assert labels.max() < 3
    assert numbers["sliding_window_s"] > 0 and -1 <= numbers["feature_cosine"] <= 1
    assert "windows" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.slow
def test_quickstart_default_segments_with_the_shipped_model(tmp_path, capsys):
    """No model named: the shipped pretrained tiny model segments a generated scene, then the one-seed table."""
    from spar_pl.scenes import make_scenes

    numbers = quickstart(out=str(tmp_path))
    _, truth = make_scenes(1, 256, 0, "quickstart")
    for tag in ("single", "sliding"):
        labels = np.asarray(Image.open(tmp_path / f"labels_{tag}.png"))
        assert labels.shape == (256, 256) and labels.max() < 6
        numbers[f"accuracy_{tag}"] = float((labels == truth[0].numpy()).mean())
    # meaningful masks: 0.92 pixel accuracy measured (background alone covers 0.67); the single pass is worse
    assert numbers["accuracy_sliding"] > 0.85 and numbers["accuracy_sliding"] > numbers["accuracy_single"]
    assert (tmp_path / "reproduce-tiny.md").is_file() and (tmp_path / "reproduce-tiny.png").is_file()
    assert numbers["reproduce_sliding"] > numbers["reproduce_single"]
    assert "SPAR" in capsys.readouterr().out
    assert {"image_mIoU_single", "image_mIoU_sliding", "image_mIoU_spar"} <= set(numbers)
    assert Image.open(tmp_path / "quickstart.png").size == (1450, 340)  # image, truth, single, sliding, SPAR


def test_quickstart_picture_shows_each_method_with_its_miou_and_time(tmp_path):
    """The picture: image, ground truth and one panel per method, each scored on this image."""
    from spar_pl.scenes import make_scenes, scene_image

    truth = make_scenes(1, 256, 0, "quickstart")[1][0].numpy()
    masks = {"single": np.zeros_like(truth), "sliding": truth.copy(), "spar": truth.copy()}
    masks["spar"][:128] = 0
    seconds = {"single": 0.1, "sliding": 1.0, "spar": 0.1}
    scores = side_by_side(
        scene_image(256, 256, 0, "quickstart"),
        truth,
        masks,
        seconds,
        ["background", "circle", "ring", "cross"],
        tmp_path / "q.png",
    )
    assert scores["sliding"] == pytest.approx(100.0) and scores["single"] < scores["spar"] < 100.0
    assert Image.open(tmp_path / "q.png").size == (1450, 340)


def test_quickstart_on_a_user_image_and_bad_image(tmp_path, capsys):
    Image.new("RGB", (100, 70), (10, 200, 30)).save(tmp_path / "me.jpg")
    main(["quickstart", "--backbone", "maskclip", "--image", str(tmp_path / "me.jpg"), "--out", str(tmp_path / "o"),
          "--no-distill"])  # fmt: skip
    assert Image.open(tmp_path / "o" / "overlay_single.png").size == (100, 70)
    assert "random weights" in capsys.readouterr().out
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="bad.jpg"):
        quickstart(image=str(tmp_path / "bad.jpg"), out=str(tmp_path / "o"), distill=False)


def test_the_shipped_model_on_a_user_image(tmp_path, capsys):
    """The shipped model on the user's image: its masks at the image's size; no ground truth, so no mIoU."""
    Image.new("RGB", (90, 60), (200, 30, 30)).save(tmp_path / "me.png")
    numbers = quickstart(image=str(tmp_path / "me.png"), out=str(tmp_path / "o"), distill=False)
    assert np.asarray(Image.open(tmp_path / "o" / "labels_sliding.png")).shape == (60, 90)
    assert not [k for k in numbers if k.startswith("image_mIoU")] and "shipped" in capsys.readouterr().out


def test_quickstart_user_errors_are_one_line(tmp_path, capsys):
    """A class list of one class, an output folder that is a file: one line, status 1, nothing written."""
    (tmp_path / "file").write_text("not a folder")
    for argv, message in (
        (["--classes", "sky", "--out", str(tmp_path / "o")], "needs at least two classes, got one"),
        (["--out", str(tmp_path / "file")], "is a file, not a folder"),
        (["--stride", "0", "--out", str(tmp_path / "o")], "--stride must be a positive integer, got 0"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["quickstart", *argv])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 1 and len(err.splitlines()) == 1 and message in err, (argv, err)
    assert not (tmp_path / "o").exists()
