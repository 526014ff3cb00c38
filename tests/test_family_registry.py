"""The backbone-family registry (spar_pl.families.registry, the presets of spar_pl.families): recognition from the
built model, presets over families, weight-file detection, the one "random weights" line, shipped tiny weights."""

from __future__ import annotations

import logging

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from spar_pl.encoders import BACKBONES, build_encoder, shipped_weights
from spar_pl.families import (
    Family,
    backbone_family,
    backbone_names,
    families,
    family_of_config,
    family_of_keys,
    family_of_model,
    get_family,
    register_family,
)
from spar_pl.testing import TINY_GEOMETRIES, TINY_MODELS, register_tiny_models
from spar_pl.weights import describe_keys


def _random_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "random weights" in r.getMessage()]


def test_every_preset_and_family_is_registered_with_a_tiny_twin():
    names = {f.name for f in families()}
    assert {"clip", "siglip", "dinotxt"} <= names
    assert {BACKBONES[b]["family"] for b in BACKBONES} <= names
    for family in families():
        assert family.encoder.family == family.name
        assert TINY_MODELS[family.name] == family.tiny_model
    assert backbone_family("maskclip-legacy").name == "clip"
    assert backbone_family("siglip2").name == "siglip"
    assert backbone_family("dinotxt").name == "dinotxt"
    assert backbone_names()[:4] == list(BACKBONES)
    with pytest.raises(ValueError, match="unknown backbone 'nope'; choose one of maskclip"):
        backbone_family("nope")


@pytest.mark.parametrize("name", sorted(TINY_GEOMETRIES))
def test_the_family_follows_from_the_built_model(name, caplog):
    family, patch, native = TINY_GEOMETRIES[name]
    with caplog.at_level(logging.WARNING):
        encoder = build_encoder(model_name=name, pretrained=None)
    assert type(encoder) is get_family(family).encoder
    assert (encoder.family, encoder.backbone, encoder.model_name) == (family, family, name)
    assert (encoder.patch_size, encoder.native_size) == (patch, native)
    assert encoder.default_crop == native // patch * patch
    assert encoder.model.visual is not None and all(k.startswith("model.") for k in encoder.state_dict())
    assert len(_random_lines(caplog)) == 1  # random weights, said once
    register_tiny_models()
    assert family_of_config(open_clip.get_model_config(name)).name == family


def test_a_named_backbone_must_take_the_model():
    with pytest.raises(ValueError, match="backbone 'siglip2' \\(siglip family\\) does not take .*it is a clip model"):
        build_encoder("siglip2", "spar-tiny-clip")


def test_an_unrecognised_vision_tower_is_named():
    model = torch.nn.Module()
    model.visual = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no backbone family recognises my model \\(vision tower Linear\\)"):
        family_of_model(model, "my model")


def test_a_family_name_is_registered_once():
    clip = get_family("clip")
    assert register_family(clip) is clip
    with pytest.raises(ValueError, match="already registered"):
        register_family(Family(**{**clip.__dict__, "summary": "another"}))


@pytest.mark.parametrize("backbone", ["maskclip", "siglip2", "dinov3txt"])
def test_weight_files_are_recognised_by_their_family(backbone):
    encoder = build_encoder(backbone, TINY_MODELS[backbone], pretrained=None)
    keys = list(encoder.model.state_dict())
    family, description = family_of_keys(keys)
    assert family is backbone_family(backbone)
    assert describe_keys(keys) == (family.name, description)
    assert family_of_keys(["foo.weight"]) == (None, "an unknown model")


def test_tiny_p8_loads_its_shipped_weights_and_says_random_only_without_them(caplog):
    from spar_pl.weights import read_state_dict

    path = shipped_weights("spar-tiny-p8")
    assert path is not None and path.is_file() and shipped_weights("spar-tiny-clip") is None
    with caplog.at_level(logging.WARNING):
        shipped = build_encoder(model_name="spar-tiny-p8")
    assert _random_lines(caplog) == []
    state = read_state_dict(path)
    assert all(torch.equal(shipped.model.state_dict()[k], v) for k, v in state.items())
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_encoder(model_name="spar-tiny-p8", pretrained=None)
    assert len(_random_lines(caplog)) == 1


def test_no_random_line_when_a_checkpoint_is_loaded(tmp_path, caplog):
    import spar_pl

    source = build_encoder(model_name="spar-tiny-sl2")
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(tmp_path / "sl2.safetensors"))
    with caplog.at_level(logging.WARNING):
        model = spar_pl.load(model_name="spar-tiny-sl2", checkpoint=tmp_path / "sl2.safetensors", device="cpu")
    assert _random_lines(caplog) == []
    assert model.backbone == "siglip" and model.encoder.family == "siglip"
    for key, value in source.model.state_dict().items():
        assert torch.equal(model.encoder.model.state_dict()[key], value)


def test_random_line_names_open_clip_tags_when_it_knows_some(caplog, monkeypatch):
    from spar_pl import encoders

    monkeypatch.setattr(open_clip, "list_pretrained", lambda: [("spar-tiny-clip", "tagA"), ("other", "tagB")])
    with caplog.at_level(logging.WARNING):
        build_encoder(model_name="spar-tiny-clip")
    (line,) = _random_lines(caplog)
    assert line.startswith("spar-tiny-clip: random weights (clip family") and line.endswith("for it: tagA")
    assert encoders.log.name == "spar_pl.encoders"


def test_cli_model_name_alone_picks_the_family_and_pretrained_none_says_random_once(tmp_path, capsys, caplog):
    from PIL import Image

    from spar_pl.cli import main
    from spar_pl.weights import read_state_dict

    Image.new("RGB", (90, 60), (120, 30, 200)).save(tmp_path / "a.png")
    args = ["features", str(tmp_path / "a.png"), "--model-name", "spar-tiny-clip-p14", "--pretrained", "none"]
    with caplog.at_level(logging.WARNING):  # conftest quiets the root logger; the CLI's console shows warnings
        main([*args, "--mode", "sliding", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert "SPAR(backbone='clip', model='spar-tiny-clip-p14'" in captured.out
    assert sum("random weights" in line for line in captured.err.splitlines()) == 1
    assert read_state_dict(tmp_path / "out" / "a.safetensors")["features"].shape[-2:] == (60 // 14, 90 // 14)


def test_table_tiny_twin_reads_the_registry():
    from spar_pl.table import tiny_twin

    assert tiny_twin("siglip2") == ("tiny", [])
    assert tiny_twin("dinov3txt") == tiny_twin("dinotxt") == ("dinov3txt-tiny", [])
    name, extra = tiny_twin("maskclip")
    assert name == "tiny" and extra[extra.index("--model.init_args.model_name") + 1] == "spar-tiny-clip"
    assert extra[extra.index("--model.init_args.backbone") + 1] == "clip"
