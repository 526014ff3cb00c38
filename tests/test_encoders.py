"""Building encoders (spar_pl.encoders: ``build_encoder``, presets, local weights, normalisation, errors). The contract
every family's encoder shares: ``tests/test_family_base.py``; each family's own semantics:
``tests/test_family_<family>.py``."""

import pytest
import torch

from spar_pl.encoders import MaskCLIPEncoder, SigLIP2Encoder, build_encoder


def test_backbone_defaults_mean_std(clip_encoder, siglip_encoder):
    assert clip_encoder.mean == (0.48145466, 0.4578275, 0.40821073)
    assert siglip_encoder.mean == siglip_encoder.std == (0.5, 0.5, 0.5)


def test_wrapping_a_built_model_and_rejecting_the_wrong_kind(clip_encoder, siglip_encoder):
    assert isinstance(MaskCLIPEncoder(clip_encoder.model), MaskCLIPEncoder)
    assert isinstance(SigLIP2Encoder(siglip_encoder.model, tokenizer=siglip_encoder.tokenizer), SigLIP2Encoder)
    with pytest.raises(TypeError, match="MaskCLIPEncoder"):
        MaskCLIPEncoder(siglip_encoder.model)
    with pytest.raises(TypeError, match="SigLIP2Encoder"):
        SigLIP2Encoder(clip_encoder.model)


def test_local_weights_file_round_trip(tmp_path, clip_encoder):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in clip_encoder.model.state_dict().items()}, str(path))
    torch.manual_seed(123)
    loaded = build_encoder("maskclip", "spar-tiny-clip", weights=path)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), clip_encoder(x))


def test_build_errors_name_the_model_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        build_encoder("maskclip", "spar-tiny-clip", weights=tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.safetensors is not a checkpoint"):
        build_encoder("maskclip", "spar-tiny-clip", weights=bad)
    with pytest.raises(ValueError, match="open_clip has no model 'no-such-model'"):
        build_encoder("maskclip", "no-such-model")
    with pytest.raises(ValueError, match="dinov3txt needs its two local weight files"):
        build_encoder("dinov3txt")
    with pytest.raises(ValueError, match="unknown backbone 'vit'"):
        build_encoder("vit")


def test_legacy_maskclip_normalisation():
    legacy = build_encoder("maskclip-legacy", "spar-tiny-clip")
    assert legacy.mean == legacy.std == (0.5, 0.5, 0.5) and legacy.backbone == "maskclip-legacy"
    x = torch.rand(1, 3, 2, 2)
    torch.testing.assert_close(legacy.normalize(x), x * 2 - 1)
    assert build_encoder("maskclip", "spar-tiny-clip").mean == (0.48145466, 0.4578275, 0.40821073)


def test_normalisation_comes_from_open_clip_for_pretrained_weights(monkeypatch):
    """A model open_clip knows the weights of (a pretrained tag, a hub id) is normalised with open_clip's
    preprocessing statistics; for the paper's MaskCLIP weights they are the reference's; ``maskclip-legacy``
    keeps its own; random weights take the family's."""
    import open_clip

    from spar_pl import encoders

    assert open_clip.get_pretrained_cfg("ViT-B-16", "laion2b_s34b_b88k")["mean"] == encoders.CLIP_MEAN
    assert open_clip.get_pretrained_cfg("ViT-B-16", "laion2b_s34b_b88k")["std"] == encoders.CLIP_STD
    create = open_clip.create_model

    def offline(name, pretrained=None, **kwargs):  # stands in for a download: the tiny model, a known config
        model = create(name, pretrained=None, **kwargs)
        model.visual.preprocess_cfg = {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
        return model

    monkeypatch.setattr(open_clip, "create_model", offline)
    known = {"url": "https://example.invalid/w.bin"}  # open_clip knows the tag (a download stands in above)
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: known if tag == "some-tag" else {})
    tagged = encoders.build_encoder("maskclip", "spar-tiny-clip", pretrained="some-tag")
    assert (tagged.mean, tagged.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    legacy = encoders.build_encoder("maskclip-legacy", "spar-tiny-clip", pretrained="some-tag")
    assert legacy.mean == legacy.std == encoders.LEGACY_MEAN
    random = encoders.build_encoder("siglip2", "spar-tiny-sl2", pretrained=None)
    assert (random.mean, random.std) == (encoders.SIGLIP_MEAN, encoders.SIGLIP_STD)


def test_tiny_models_register_only_when_asked_for():
    """Importing the library leaves timm's and open_clip's registries alone; building a ``spar-tiny-*`` model
    registers the tiny models (once)."""
    import subprocess
    import sys

    code = (
        "import spar_pl, spar_pl.api, spar_pl.cli, spar_pl.evaluate, spar_pl.distill, spar_pl.table\n"
        "import open_clip, timm\n"
        "print(timm.is_model('spar_tiny_vit_siglip'), 'spar-tiny-sl2' in open_clip.list_models())\n"
        "from spar_pl.encoders import build_encoder\n"
        "build_encoder('siglip2', 'spar-tiny-sl2', pretrained=None)\n"
        "print(timm.is_model('spar_tiny_vit_siglip'), 'spar-tiny-sl2' in open_clip.list_models())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["False False", "True True"]


def test_unknown_model_and_tag_are_one_short_line():
    """A model name open_clip does not know, or a tag it does not know for the model, fails before building, in
    one line naming it (not open_clip's list of every model)."""
    with pytest.raises(ValueError, match="open_clip has no model 'not-a-model'; spar-cli models") as err:
        build_encoder(None, "not-a-model")
    assert len(str(err.value)) < 200
    with pytest.raises(ValueError, match="no pretrained tag 'bogus' for model 'spar-tiny-clip'; it has none"):
        build_encoder(None, "spar-tiny-clip", pretrained="bogus")
    with pytest.raises(ValueError, match="no pretrained tag 'bogus' for model 'ViT-B-16'; open_clip's pretrained tags"):
        build_encoder("maskclip", pretrained="bogus")
