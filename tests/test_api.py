"""The Python inference API (``spar_pl.load``): input kinds, conversions, sizes, modes, errors, files, notebook."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import spar_pl
from spar_pl import api, images
from spar_pl.api import ImageInputError, collect_images, output_stems, read_image
from spar_pl.openvocab import parse_classes
from spar_pl.scenes import scene_image
from spar_pl.sliding import SlidingWindowTeacher

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
CLASSES = ["sky", "grass, lawn", "house"]


def tiny(backbone: str, seed: int = 0) -> api.SPAR:
    torch.manual_seed(seed)
    return spar_pl.load(backbone, model_name={"siglip2": "spar-tiny-sl2", "maskclip": "spar-tiny-clip"}[backbone])


@pytest.fixture(scope="module")
def sl2() -> api.SPAR:
    return tiny("siglip2")


@pytest.fixture(scope="module")
def clip() -> api.SPAR:
    return tiny("maskclip")


@pytest.fixture(scope="module")
def scene() -> Image.Image:
    return scene_image(96, 144)


def test_load_is_exported_lazily():
    code = "import sys, spar_pl; print(sorted(m for m in ('torch', 'spar_pl.api') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert spar_pl.load is api.load and spar_pl.SPAR is api.SPAR
    with pytest.raises(AttributeError, match="nope"):
        spar_pl.nope  # noqa: B018


def test_every_input_kind_gives_the_same_features(sl2, scene, tmp_path):
    scene.save(tmp_path / "scene.png")
    rgb = np.asarray(scene)
    chw = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    inputs = {
        "path": tmp_path / "scene.png",
        "str path": str(tmp_path / "scene.png"),
        "PIL": scene,
        "uint8 HxWx3": rgb,
        "float HxWx3": rgb / 255.0,
        "uint16 HxWx3": rgb.astype(np.uint16) * 257,
        "opaque uint8 HxWx4": np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2),
        "tensor 3xHxW": chw,
        "tensor 1x3xHxW": chw[None],
        "uint8 tensor": torch.from_numpy(rgb).permute(2, 0, 1),
    }
    reference = sl2.features(scene)
    assert reference.shape == (1, 64, 6, 9) and reference.dtype == torch.float32
    for kind, image in inputs.items():
        torch.testing.assert_close(sl2.features(image), reference, atol=1e-5, rtol=1e-5, msg=kind)


def test_grayscale_rgba_16bit_and_palette_inputs(sl2, tmp_path):
    gray = (np.arange(40 * 50).reshape(40, 50) % 256).astype(np.uint8)
    for image in (Image.fromarray(gray), gray, gray[..., None]):
        x = read_image(image)
        assert x.shape == (3, 40, 50)
        torch.testing.assert_close(x[0], torch.from_numpy(gray).float() / 255)
        torch.testing.assert_close(x[0], x[2])

    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:10, :, 3] = 255  # top half opaque, bottom half transparent: composited over white
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    x = read_image(tmp_path / "rgba.png")
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([10, 20, 30]) / 255.0)
    torch.testing.assert_close(x[:, -1, -1], torch.ones(3))

    deep = np.linspace(0, 65535, 24 * 32).astype(np.uint16).reshape(24, 32)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    for image in (tmp_path / "deep.png", deep, Image.fromarray(deep.astype(np.int32))):
        x = read_image(image)
        assert x.shape == (3, 24, 32) and x.min() == 0 and x.max() == 1  # full 16-bit range -> [0, 1]
        torch.testing.assert_close(x[1], torch.from_numpy(deep.astype(np.float32)) / 65535)

    pal = Image.new("P", (16, 16))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 16, 8))
    pal.info["transparency"] = 1  # the blue half is transparent
    pal.save(tmp_path / "pal.png")
    x = read_image(tmp_path / "pal.png")
    torch.testing.assert_close(x[:, 0, 0], torch.ones(3))
    torch.testing.assert_close(x[:, -1, 0], torch.tensor([1.0, 0.0, 0.0]))

    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotated 90 degrees, displayed portrait
    Image.new("RGB", (40, 20)).save(tmp_path / "turned.jpg", exif=exif)
    assert read_image(tmp_path / "turned.jpg").shape == (3, 40, 20)

    for name in ("rgba.png", "deep.png", "pal.png"):
        size = Image.open(tmp_path / name).size
        assert sl2.segment(tmp_path / name, CLASSES).mask.shape == size[::-1]


@pytest.mark.parametrize("backbone", ["siglip2", "maskclip"])
@pytest.mark.parametrize("mode", ["single", "sliding", "sliding-features"])
def test_segment_is_at_the_original_size(backbone, mode, sl2, clip):
    model = {"siglip2": sl2, "maskclip": clip}[backbone]
    for height, width in ((37, 53), (70, 150)):
        image = np.random.default_rng(height).random((height, width, 3))
        result = model.segment(image, CLASSES, mode=mode, stride=24, return_probs=True)
        assert result.mask.shape == (height, width) and result.mask.dtype == np.int64
        assert result.probs.shape == (3, height, width) and result.image.size == (width, height)
        probs = result.probs.numpy()  # float16: the mask's class has the top score (ties allowed by rounding)
        assert result.probs.dtype == torch.float16
        np.testing.assert_array_equal(np.take_along_axis(probs, result.mask[None], 0)[0], probs.max(0))
        assert result.classes == ["sky", "grass", "house"] and result.synonyms[1] == ["grass", "lawn"]
        assert set(result.present()) == {result.classes[k] for k in np.unique(result.mask)}


def test_sliding_mode_is_the_teacher_and_single_mode_the_encoder(sl2, scene):
    x = sl2.encoder.normalize(read_image(scene)[None])
    with torch.no_grad():
        teacher = SlidingWindowTeacher(sl2.encoder, crop=None, stride=32)(x)
        single = sl2.encoder(x)
    sliding = sl2.features(scene, mode="sliding", stride=32)
    torch.testing.assert_close(sliding, teacher)
    torch.testing.assert_close(sl2.features(scene), single)
    assert not torch.allclose(sliding, single)  # 96x144 > the 64 px crop: several windows
    small = np.random.default_rng(0).random((48, 64, 3))  # within one crop: one window, the single pass
    torch.testing.assert_close(sl2.features(small, mode="sliding", stride=32), sl2.features(small))
    with pytest.raises(ValueError, match="mode 'tiled'"):
        sl2.features(scene, mode="tiled")
    with pytest.raises(ValueError, match="stride"):
        sl2.features(scene, mode="sliding", stride=0)


def test_max_side_and_upsample(sl2, clip, tmp_path):
    image = np.random.default_rng(1).random((200, 300, 3))
    assert sl2.features(image, max_side=100).shape == (1, 64, 5, 7)  # input 100x67 -> ceil(67/16), ceil(100/16)
    assert clip.features(image, max_side=100).shape == (1, 32, 4, 6)  # MaskCLIP drops the remainder
    assert sl2.features(image, max_side=100, upsample=True).shape == (1, 64, 200, 300)
    assert sl2.features(image, max_side=1000).shape == (1, 64, 13, 19)  # never upscaled
    result = sl2.segment(image, CLASSES, max_side=100, return_probs=True)
    assert result.mask.shape == (200, 300) and result.probs.shape == (3, 200, 300)
    path = sl2.write_features(image, tmp_path / "f.safetensors", max_side=100)
    with safe_open(path, "pt") as fh:
        meta = fh.metadata()
    assert (meta["image_height"], meta["image_width"], meta["input_height"], meta["input_width"]) == (
        "200",
        "300",
        "67",
        "100",
    )


def test_large_images_are_refused_with_a_hint(sl2, tmp_path, monkeypatch):
    wide = np.zeros((10, images.MAX_SIDE + 1), np.uint8)
    with pytest.raises(ImageInputError, match=r"numpy array of shape \(10, 16385\).*--max-side"):
        sl2.features(wide)
    assert sl2.segment(wide, CLASSES, max_side=4096).mask.shape == wide.shape
    monkeypatch.setattr(images, "MAX_PIXELS", 5000)
    Image.new("RGB", (100, 80)).save(tmp_path / "big.png")
    with pytest.raises(ImageInputError, match=r"big\.png: 100x80 pixels .*--max-side"):
        sl2.features(tmp_path / "big.png")
    assert sl2.features(tmp_path / "big.png", max_side=64).shape == (1, 64, 4, 4)


def test_bad_images_are_named(sl2, clip, tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image")
    with pytest.raises(ImageInputError, match="junk.jpg"):
        sl2.features(tmp_path / "junk.jpg")
    scene_image(64, 64).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageInputError, match="cannot read image .*cut.png"):
        sl2.segment(tmp_path / "cut.png", CLASSES)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        sl2.features(tmp_path / "missing.png")
    cases = {
        "channels first": (np.zeros((3, 40, 40), np.uint8), r"\(3, 40, 40\).*channels first"),
        "float range": (np.full((20, 20), 2.0), r"values in \[0, 1\], got \[2, 2\]"),
        "nan": (np.full((20, 20), np.nan), r"values in \[0, 1\]"),
        "dtype": (np.zeros((20, 20), np.int64), "unsupported dtype int64"),
        "batch": (torch.zeros(2, 3, 20, 20), "a batch of 2 images"),
        "ndim": (torch.zeros(20), r"tensor of shape \(20,\)"),
        "empty": (np.zeros((0, 20, 3), np.uint8), "empty"),
    }
    for image, message in cases.values():
        with pytest.raises(ImageInputError, match=message):
            sl2.features(image)
    with pytest.raises(ImageInputError, match=r"numpy array of shape \(10, 50, 3\).*smaller than one 16px patch"):
        clip.features(np.zeros((10, 50, 3), np.uint8))
    with pytest.raises(TypeError, match="list"):
        sl2.features([[0, 1]])


def test_class_lists_are_validated(sl2, scene, tmp_path):
    arguments = [" road", "person,pedestrian ", "sky"]
    assert parse_classes(arguments, option="--classes") == [["road"], ["person", "pedestrian"], ["sky"]]
    for args, message in (([], "empty"), ([" , "], "argument 1 is empty"), (["a", "b,,c"], "synonym is empty")):
        with pytest.raises(ValueError, match=message):
            parse_classes(args, option="--classes")
    bad = {
        "no classes": [],
        "name 'car' appears in classes 0 and 2": ["car", "sky", "car"],
        r"duplicate class name: 'Car' \(class 0\) and 'car' \(class 1\)": ["Car", "car, auto"],
        "has an empty name": ["road", "car, "],
        "a string but not a class file": "road, car",
        "'road, car' are synonyms of one class": ["road, car"],
        "at least two classes, got one;": ["road"],
    }
    for message, classes in bad.items():
        with pytest.raises(ValueError, match=message):
            sl2.segment(scene, classes)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        sl2.segment(scene, str(tmp_path / "nope.txt"))
    (tmp_path / "classes.txt").write_text("sky\ngrass, lawn\n\n", encoding="utf-8")
    assert parse_classes(tmp_path / "classes.txt") == [["sky"], ["grass", "lawn"]]
    assert sl2.segment(scene, "voc20").classes[0] == "aeroplane"


def test_checkpoints(tmp_path, scene):
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*absent\.ckpt"):
        spar_pl.load("siglip2", model_name="spar-tiny-sl2", checkpoint=tmp_path / "absent.ckpt")
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.ckpt is not a checkpoint"):
        spar_pl.load("siglip2", model_name="spar-tiny-sl2", checkpoint=tmp_path / "garbage.ckpt")
    source = tiny("siglip2", seed=1)
    save_file({k: v.contiguous() for k, v in source.encoder.model.state_dict().items()}, tmp_path / "s.safetensors")
    loaded = spar_pl.load("siglip2", model_name="spar-tiny-sl2", checkpoint=tmp_path / "s.safetensors")
    torch.testing.assert_close(loaded.features(scene), source.features(scene))
    assert not torch.allclose(tiny("siglip2", seed=2).features(scene), source.features(scene))
    with pytest.raises(ValueError, match=r"s\.safetensors does not match model 'spar-tiny-clip'"):
        spar_pl.load("maskclip", model_name="spar-tiny-clip", checkpoint=tmp_path / "s.safetensors")


def test_features_file_layout(sl2, scene, tmp_path):
    scene.save(tmp_path / "scene.png")
    path = sl2.write_features(tmp_path / "scene.png", tmp_path / "out" / "scene.safetensors")
    with safe_open(path, "pt") as fh:
        assert list(fh.keys()) == ["features"]
        feats, meta = fh.get_tensor("features"), fh.metadata()
    assert feats.shape == (1, 64, 6, 9) and feats.dtype == torch.float16
    torch.testing.assert_close(feats.float(), sl2.features(scene), atol=2e-3, rtol=2e-3)
    assert meta["layout"] == "NCHW" and meta["format"] == api.FEATURES_FORMAT
    assert (meta["backbone"], meta["model"], meta["mode"], meta["dtype"]) == (
        "siglip2",
        "spar-tiny-sl2",
        "single",
        "float16",
    )
    assert (meta["image_height"], meta["image_width"], meta["upsampled"], meta["stride"]) == ("96", "144", "false", "")
    assert meta["source"].endswith("scene.png")
    path = sl2.write_features(scene, tmp_path / "up.safetensors", mode="sliding", upsample=True, dtype=torch.float32)
    with safe_open(path, "pt") as fh:
        feats, meta = fh.get_tensor("features"), fh.metadata()
    assert feats.shape == (1, 64, 96, 144) and feats.dtype == torch.float32
    assert (meta["mode"], meta["stride"], meta["crop"], meta["upsampled"]) == ("sliding-features", "24", "64", "true")
    assert not list(tmp_path.rglob("*.tmp"))


def test_segmentation_files(sl2, scene, tmp_path):
    result = sl2.segment(scene, CLASSES, return_probs=True)
    paths = result.save(tmp_path, "scene", probs=True)
    assert [p.name for p in paths] == ["scene_overlay.png", "scene_labels.png", "scene_probs.safetensors"]
    assert Image.open(paths[0]).size == scene.size
    labels = Image.open(paths[1])
    assert labels.mode == "P" and np.array_equal(np.asarray(labels), result.mask)
    with safe_open(paths[2], "pt") as fh:
        probs, meta = fh.get_tensor("probs"), fh.metadata()
    assert probs.shape == (3, 96, 144) and probs.dtype == torch.float16
    assert json.loads(meta["classes"]) == ["sky", "grass", "house"]
    with pytest.raises(ValueError, match="return_probs"):
        sl2.segment(scene, CLASSES).save(tmp_path, "x", probs=True)


def test_collect_images_and_distinct_output_stems(tmp_path):
    for folder in ("a", "b", "empty"):
        (tmp_path / folder).mkdir()
    for name in ("a/x.jpg", "a/x.png", "b/x.png", "a/a_x.png", "a/.hidden.png", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"")
    paths, problems = collect_images([tmp_path / "a", tmp_path / "b", tmp_path / "a" / "x.jpg", tmp_path / "empty"])
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["a/a_x.png", "a/x.jpg", "a/x.png", "b/x.png"]
    assert problems == [(tmp_path / "empty", problems[0][1])] and "no image files" in problems[0][1]
    stems = output_stems(paths)
    assert len(set(stems.values())) == len(paths)
    assert stems[tmp_path / "a" / "a_x.png"] == "a_x" and stems[tmp_path / "b" / "x.png"] == "b_x"
    assert stems[tmp_path / "a" / "x.jpg"] == "a_x_jpg" and stems[tmp_path / "a" / "x.png"] == "a_x_png"


def test_segment_images_and_write_feature_files(tmp_path, capsys):
    """``spar-cli segment`` and ``features`` as Python calls: files per image, the count returned; a wrong argument
    is a ``UsageError`` (a ``ValueError``) before any file is written."""
    from spar_pl.runner import UsageError

    scene_image(64, 96).save(tmp_path / "a.png")
    tiny = spar_pl.ModelSpec("siglip2", "spar-tiny-sl2")
    done = api.segment_images([str(tmp_path / "a.png")], str(tmp_path / "s"), CLASSES, model=tiny, device="cpu")
    assert done == 1 and np.asarray(Image.open(tmp_path / "s" / "a_labels.png")).shape == (64, 96)
    assert "segment: 1 of 1 images done" in capsys.readouterr().out
    done = api.write_feature_files([str(tmp_path)], str(tmp_path / "f"), tiny, "cpu", "sliding", dtype="float32")
    with safe_open(str(tmp_path / "f" / "a.safetensors"), "pt") as fh:
        assert done == 1 and fh.metadata()["mode"] == "sliding-features" and fh.metadata()["dtype"] == "float32"
    image, out = [str(tmp_path / "a.png")], str(tmp_path / "x")
    for call, message in (
        (lambda: api.segment_images(image, out, model=tiny), "one of the arguments --classes --classes-file"),
        (lambda: api.segment_images(image, out, ["sky"], model=tiny), "at least two classes"),
        (lambda: api.segment_images(image, out, [f"c{k}" for k in range(257)], model=tiny), "257 classes"),
        (lambda: api.segment_images(image, out, CLASSES, model=tiny, mode="zigzag"), "unknown mode 'zigzag'"),
        (lambda: api.write_feature_files(image, out, tiny, mode="sliding-logits"), "unknown mode 'sliding-logits'"),
        (lambda: api.write_feature_files(image, out, tiny, mode="sliding", crop=30), "crop 30 is not a multiple"),
        (lambda: api.write_feature_files(image, out, tiny, max_side=0), "--max-side must be a positive integer"),
    ):
        with pytest.raises(UsageError, match=message):
            call()
    assert issubclass(UsageError, ValueError) and not (tmp_path / "x").exists()


def test_notebook_executes(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "clear the notebook's outputs"
    assert any("spar_pl.load(" in cell.source for cell in code)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    assert text.strip().splitlines()[-1] == sys.prefix  # the kernel ran this interpreter's environment
    assert "mask (320, 480) int64" in text
    assert any(
        "image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
    )
    written = sorted(p.name for p in (tmp_path / "results" / "notebook").iterdir())
    assert written == ["sample_labels.png", "sample_overlay.png", "sample_probs.safetensors"]
