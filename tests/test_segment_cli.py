"""``spar-cli segment`` and ``spar-cli features`` with tiny models: outputs, directories, bad inputs, exit codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from spar_pl.cli import main
from spar_pl.scenes import scene_image

TINY = ["--backbone", "siglip2", "--model-name", "spar-tiny-sl2"]


@pytest.fixture
def folder(tmp_path):
    """Images of different sizes and kinds, a corrupt JPEG and a text file."""
    images = tmp_path / "images"
    images.mkdir()
    scene_image(80, 120).save(images / "scene.jpg")
    scene_image(50, 70).convert("L").save(images / "gray.png")
    rgba = np.asarray(scene_image(40, 90).convert("RGBA")).copy()
    rgba[:10, :, 3] = 0
    Image.fromarray(rgba).save(images / "logo.png")
    Image.fromarray((np.random.default_rng(0).random((33, 47)) * 65535).astype(np.uint16)).save(images / "depth.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (images / "readme.txt").write_text("not an image")
    return images


def run(argv, capsys):
    """``main(argv)``; returns (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_segment_directory_continues_past_a_corrupt_file(folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run(
        ["segment", str(folder), "--classes", "sky", "grass", "house", *TINY, "--out", str(out), "--save-probs"], capsys
    )
    assert code == 1
    assert "segment: 4 of 5 images done" in stdout
    assert "1 input(s) failed" in stderr and "broken.jpg" in stderr and "readme.txt" not in stderr
    for stem, name in (("scene", "scene.jpg"), ("gray", "gray.png"), ("logo", "logo.png"), ("depth", "depth.png")):
        width, height = Image.open(folder / name).size
        assert Image.open(out / f"{stem}_overlay.png").size == (width, height)
        labels = Image.open(out / f"{stem}_labels.png")
        assert labels.mode == "P" and labels.size == (width, height) and np.asarray(labels).max() < 3
        with safe_open(str(out / f"{stem}_probs.safetensors"), "pt") as fh:
            probs = fh.get_tensor("probs")
        assert probs.shape == (3, height, width) and probs.dtype == torch.float16
    assert not list(out.glob("broken*")) and not list(out.glob(".*"))


def test_segment_class_file_sliding_and_max_side(tmp_path, capsys):
    scene_image(100, 160).save(tmp_path / "a.png")
    (tmp_path / "classes.txt").write_text("sky\ngrass, lawn\nhouse, building\n", encoding="utf-8")
    argv = ["segment", str(tmp_path / "a.png"), "--classes-file", str(tmp_path / "classes.txt"), *TINY]
    argv += ["--mode", "sliding", "--stride", "32", "--max-side", "96", "--out", str(tmp_path / "o")]
    code, stdout, _ = run(argv, capsys)
    assert code == 0 and "3 classes (sky; grass, lawn; house, building), mode sliding" in stdout
    assert Image.open(tmp_path / "o" / "a_overlay.png").size == (160, 100)
    assert not (tmp_path / "o" / "a_probs.safetensors").exists()


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        (["--classes", ""], "--classes: argument 1 is empty"),
        (["--classes", "road", "car, , auto"], "a synonym is empty"),
        (["--classes", "car", "sky", "car"], "name 'car' appears in classes 0 and 2"),
        (["--classes", "Car", "car"], "duplicate class name"),
        (["--classes", "road, car, sky"], "'road, car, sky' are synonyms of one class"),
        (["--classes-file", "missing-classes.txt"], "class file not found: missing-classes.txt"),
        ([], "one of the arguments --classes --classes-file is required"),
    ],
)
def test_segment_rejects_bad_class_lists(classes, message, tmp_path, capsys):
    code, _, stderr = run(["segment", "x.png", *classes, *TINY, "--out", str(tmp_path)], capsys)
    assert code == 2 and message in stderr


def test_missing_checkpoint_and_unknown_model(tmp_path, capsys):
    scene_image(32, 32).save(tmp_path / "a.png")
    missing = tmp_path / "nowhere" / "spar.ckpt"
    for command, extra in ((["segment"], ["--classes", "sky", "grass"]), (["features"], [])):
        argv = [*command, str(tmp_path / "a.png"), *extra, *TINY, "--checkpoint", str(missing)]
        argv += ["--out", str(tmp_path / "o")]
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 1 and f"checkpoint not found: {missing}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["features", str(tmp_path / "a.png"), "--backbone", "dinov3txt", "--out", str(tmp_path / "o")])
    assert exc.value.code != 0 and "dinov3txt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_features_command(tmp_path, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    scene_image(64, 96).save(tmp_path / "a" / "img.png")
    scene_image(48, 40).save(tmp_path / "b" / "img.png")
    out = tmp_path / "f"
    code, stdout, _ = run(["features", str(tmp_path / "a"), str(tmp_path / "b"), *TINY, "--out", str(out)], capsys)
    assert code == 0 and "features: 2 of 2 images done" in stdout
    shapes = {}
    for stem in ("a_img", "b_img"):  # same stem in two folders: distinct outputs
        with safe_open(str(out / f"{stem}.safetensors"), "pt") as fh:
            shapes[stem] = (tuple(fh.get_tensor("features").shape), fh.get_tensor("features").dtype)
            meta = fh.metadata()
        assert meta["layout"] == "NCHW" and meta["backbone"] == "siglip2" and meta["model"] == "spar-tiny-sl2"
    assert shapes == {"a_img": ((1, 64, 4, 6), torch.float16), "b_img": ((1, 64, 3, 3), torch.float16)}
    argv = ["features", str(tmp_path / "a" / "img.png"), *TINY, "--out", str(out), "--dtype", "float32", "--upsample"]
    argv += ["--mode", "sliding"]
    assert run(argv, capsys)[0] == 0
    with safe_open(str(out / "img.safetensors"), "pt") as fh:
        feats, meta = fh.get_tensor("features"), fh.metadata()
    assert feats.shape == (1, 64, 64, 96) and feats.dtype == torch.float32
    assert (meta["mode"], meta["stride"], meta["upsampled"], meta["dtype"]) == (
        "sliding-features",
        "24",
        "true",
        "float32",
    )
    code, _, stderr = run(["features", str(tmp_path / "nothing.png"), *TINY, "--out", str(out)], capsys)
    assert code == 1 and "image not found: " in stderr and "nothing.png" in stderr


def test_empty_directory_fails(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, stdout, stderr = run(["features", str(tmp_path / "empty"), *TINY, "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "0 of 0 images" in stdout and "no image files" in stderr


def test_legend_always_shows_and_names_every_script_readably(tmp_path):
    """A long class name is ellipsised, not a reason to drop the legend; Latin, Greek and Cyrillic are drawn with
    DejaVu Sans; characters it lacks (CJK, emoji) become their code points instead of boxes."""
    import numpy as np
    from PIL import Image

    from spar_pl.render import drawable, ellipsise, font_file, overlay

    path, covered = font_file()
    assert path.endswith("DejaVuSans.ttf") and {ord(c) for c in "éßкотγάτα…"} <= covered
    assert drawable("猫 кот γάτα 🦜") == "<U+732B> кот γάτα <U+1F99C>"
    assert ellipsise("a very long class name", 50, lambda t: 10 * len(t)) == "a ve…"
    image = Image.new("RGB", (200, 150), (120, 120, 120))
    mask = np.zeros((150, 200), dtype=np.int64)
    mask[:, 100:] = 1
    names = ["background", "an extremely long class name that is wider than the whole image " * 3]
    shown = np.asarray(overlay(image, mask, names))
    plain = np.asarray(overlay(image, mask, names, max_area=0.0))  # the first line shows at any max_area
    grey = 0.45 * 120 + 0.55 * np.asarray([[230, 81, 81]])  # class 0's colour blended over the grey image
    for picture in (shown, plain):
        legend = np.abs(picture.astype(int) - np.round(grey).astype(int)).sum(-1) > 3
        assert legend[:, :100].sum() > 200
    green = Image.new("RGB", (200, 150), (0, 255, 0))  # the image's own colours do not show through
    as_grey = green.convert("L").convert("RGB")
    assert (np.asarray(overlay(green, mask, names)) == np.asarray(overlay(as_grey, mask, names))).all()
