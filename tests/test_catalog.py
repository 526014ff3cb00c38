"""``spar-cli models`` (read from open_clip's configs, nothing built) and the big models' geometry, checked on shrunk
copies of their configs (same patch, pretraining size and tower kind; tiny widths) built and run on the CPU."""

from __future__ import annotations

import json

import open_clip
import pytest
import timm
import torch

from spar_pl.catalog import model_catalog
from spar_pl.cli import main
from spar_pl.encoders import build_encoder
from spar_pl.sliding import SlidingWindowTeacher


def _rows(text: str) -> dict[str, tuple[str, list[str]]]:
    """``model -> (family, fields)`` of the ``spar-cli models`` text."""
    rows, family = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            family = line.split(":", 1)[0]
        elif line.startswith("  ") and not line.startswith("  model") and family and len(line.split()) >= 4:
            fields = line.split(None, 4)
            rows[fields[0]] = (family, fields[1:])
    return rows


def test_models_lists_families_geometry_and_tags_without_building(monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("spar-cli models built a model")

    monkeypatch.setattr(open_clip, "create_model", refuse)
    monkeypatch.setattr(timm, "create_model", refuse)
    main(["models"])
    text = capsys.readouterr().out
    rows = _rows(text)
    assert rows["ViT-SO400M-14-SigLIP-384"][0] == "siglip"
    assert rows["ViT-SO400M-14-SigLIP-384"][1][:3] == ["14", "384", "378"]
    assert rows["ViT-L-16-SigLIP2-512"][1][:3] == ["16", "512", "512"]
    assert rows["ViT-B-32"][0] == "clip" and rows["ViT-B-32"][1][:3] == ["32", "224", "224"]
    assert rows["ViT-L-14-336"][1][:3] == ["14", "336", "336"] and "openai" in rows["ViT-L-14-336"][1][3]
    assert rows["ViT-H-14"][1][:3] == ["14", "224", "224"] and "dfn5b" in rows["ViT-H-14"][1][3]
    assert rows["ViT-B-16-quickgelu"][0] == "clip"
    assert rows["dinov3_vitl16_dinotxt_tet1280d20h24l"][0] == "dinotxt"
    assert "exact parity tested: the official DINOv3.txt code" in text
    assert not any(name.startswith("spar-tiny-") for name in rows)
    assert "no family takes" in text and "RN50" in text.splitlines()[-1]


def test_models_of_one_family():
    rows = model_catalog("clip")
    assert rows and {r["family"] for r in rows} == {"clip"}
    assert all(r["tags"] for r in rows)  # by default, only models open_clip has weights for
    assert len(model_catalog("clip", include_untagged=True)) > len(rows)
    with pytest.raises(ValueError, match="unknown backbone family 'nope'"):
        model_catalog("nope")


def _tiny_trunk(name: str, patch: int, size: int):
    def build(pretrained: bool = False, **kwargs):
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        args = {"img_size": size, "patch_size": patch, "embed_dim": 32, "depth": 1, "num_heads": 2}
        return timm.models.vision_transformer.VisionTransformer(
            **{**args, "class_token": False, "global_pool": "map", **kwargs}
        )

    build.__name__ = name
    if not timm.is_model(name):
        timm.models.register_model(build)


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory):
    """Shrunk copies of big open_clip configs, registered as ``spar-tiny-shrunk-<name>``."""
    folder = tmp_path_factory.mktemp("shrunk")
    names = {}
    for name in ("ViT-L-14", "ViT-H-14", "ViT-L-14-336", "ViT-B-32-quickgelu", "ViT-SO400M-14-SigLIP-384"):
        cfg = open_clip.get_model_config(name)
        vision, text = cfg["vision_cfg"], cfg["text_cfg"]
        if "timm_model_name" in vision:  # a tiny trunk with the model's patch and pretraining size
            trunk = f"spar_shrunk_{vision['timm_model_name']}"
            _tiny_trunk(trunk, *open_clip_geometry(name))
            vision["timm_model_name"] = trunk
        else:
            vision.update(layers=2, width=64, head_width=32)
        text.update(width=32, heads=2, layers=1)
        text.pop("hf_tokenizer_name", None)
        text.pop("tokenizer_kwargs", None)
        cfg["embed_dim"] = 32
        (folder / f"spar-tiny-shrunk-{name}.json").write_text(json.dumps(cfg))
        names[name] = f"spar-tiny-shrunk-{name}"
    open_clip.add_model_config(folder)
    return names


def open_clip_geometry(name: str) -> tuple[int, int]:
    row = next(r for r in model_catalog() if r["model"] == name)
    return row["patch"], row["native"]


@pytest.mark.parametrize(
    ("name", "family", "crop"),
    [
        ("ViT-L-14", "clip", 224),
        ("ViT-H-14", "clip", 224),
        ("ViT-L-14-336", "clip", 336),
        ("ViT-B-32-quickgelu", "clip", 224),
        ("ViT-SO400M-14-SigLIP-384", "siglip", 378),
    ],
)
def test_big_models_geometry_on_shrunk_configs(shrunk, name, family, crop):
    torch.manual_seed(0)
    encoder = build_encoder(model_name=shrunk[name], pretrained=None)
    patch, native = open_clip_geometry(name)
    assert (encoder.family, encoder.patch_size, encoder.native_size, encoder.default_crop) == (
        family,
        patch,
        native,
        crop,
    )
    height, width = crop + 2 * patch + 3, crop + 24
    images = torch.randn(1, 3, height, width)
    with torch.no_grad():
        single = encoder(images)
        teacher = SlidingWindowTeacher(encoder, stride=24, window_batch=8)(images)
    assert teacher.shape[-2:] == (height // patch, width // patch)
    assert single.shape[:2] == teacher.shape[:2] == (1, encoder.embed_dim)
