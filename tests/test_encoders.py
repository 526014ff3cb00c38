import math

import pytest
import torch
import torch.nn.functional as F

from spar_pl.encoders import MaskCLIPEncoder, SigLIP2Encoder, build_encoder


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (96, 64), (128, 160), (32, 224)])
def test_shapes_multiples_of_patch(encoder, size):
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = encoder(x)
    assert out.shape == (2, encoder.embed_dim, size[0] // 16, size[1] // 16)
    assert torch.isfinite(out).all()


def test_siglip2_not_multiple_of_patch_pads_bottom_right(siglip_encoder):
    x = torch.randn(1, 3, 70, 50)
    with torch.no_grad():
        out = siglip_encoder(x)
        padded = siglip_encoder(F.pad(x, (0, 14, 0, 10)))
    assert out.shape[-2:] == (math.ceil(70 / 16), math.ceil(50 / 16)) == (5, 4)
    torch.testing.assert_close(out, padded)  # zero padding bottom/right, as timm's dynamic_img_pad


def test_maskclip_not_multiple_of_patch_drops_remainder(clip_encoder):
    x = torch.randn(1, 3, 70, 50)
    with torch.no_grad():
        out = clip_encoder(x)
        cropped = clip_encoder(x[..., :64, :48])
    assert out.shape[-2:] == (4, 3)
    torch.testing.assert_close(out, cropped)


def test_maskclip_native_square_size_uses_positional_embedding_unchanged(clip_encoder):
    pos = clip_encoder.model.visual.positional_embedding
    assert clip_encoder.positional_embedding(4, 4) is pos


def test_maskclip_positional_embedding_resize_rule(clip_encoder):
    pos = clip_encoder.model.visual.positional_embedding.detach()
    h, w = 5, 7
    got = clip_encoder.positional_embedding(h, w).detach()
    grid = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    by_scale = F.interpolate(grid, scale_factor=((h + 0.1) / 4, (w + 0.1) / 4), mode="bicubic", align_corners=False)
    by_size = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    assert got.shape == (1 + h * w, pos.shape[1])
    torch.testing.assert_close(got[0], pos[0])
    torch.testing.assert_close(got[1:], by_scale.flatten(2)[0].T)
    assert not torch.allclose(got[1:], by_size.flatten(2)[0].T, atol=1e-4)  # the rule matters
    # a square grid of another size also resizes (token count differs from pretraining)
    assert clip_encoder.positional_embedding(6, 6).shape == (37, pos.shape[1])


def test_siglip2_native_size_positional_embedding_is_identity(siglip_encoder):
    pos = siglip_encoder.model.visual.trunk.pos_embed.detach()
    torch.testing.assert_close(siglip_encoder.positional_embedding(4, 4).detach(), pos, atol=1e-6, rtol=1e-6)
    grid = pos.reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(3, 9), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(siglip_encoder.positional_embedding(3, 9).detach(), expected)
    # the reference's rule, bit for bit, through timm's resampler: up, down (no antialiasing) and mixed
    for h, w in ((4, 4), (3, 9), (2, 3), (7, 2), (16, 11)):
        ref = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=False)
        assert torch.equal(siglip_encoder.positional_embedding(h, w).detach(), ref.flatten(2).transpose(1, 2))


def test_maskclip_last_block_is_value_path(clip_encoder):
    """Independent check: attention over a single token is exactly its value path, so running open_clip's
    own last block on every token alone must reproduce the encoder at the native size."""
    v = clip_encoder.model.visual
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = v._embeds(x)
        for blk in v.transformer.resblocks[:-1]:
            tokens = blk(tokens)
        b, n, d = tokens.shape
        tokens = v.transformer.resblocks[-1](tokens.reshape(b * n, 1, d)).reshape(b, n, d)
        expected = (v.ln_post(tokens) @ v.proj)[:, 1:].reshape(b, 4, 4, -1).permute(0, 3, 1, 2)
        got = clip_encoder(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and it is not the ordinary attention output
        full = v.transformer(v._embeds(x))
    assert not torch.allclose((v.ln_post(full) @ v.proj)[:, 1:].reshape(b, 4, 4, -1).permute(0, 3, 1, 2), got)


def test_siglip2_attention_pool_bypass_is_value_path(siglip_encoder):
    """The MAP pool over a single token is exactly proj(value) + mlp(norm(.)): timm's own pool on each
    token alone, after timm's own forward_features, must reproduce the encoder at the native size."""
    trunk = siglip_encoder.model.visual.trunk
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = trunk.forward_features(x)
        b, n, d = tokens.shape
        pooled = trunk.attn_pool(tokens.reshape(b * n, 1, d)).reshape(b, 4, 4, -1).permute(0, 3, 1, 2)
        got = siglip_encoder(x)
    torch.testing.assert_close(got, pooled, atol=1e-5, rtol=1e-5)


def _visual_names(encoder, prefix: str) -> set[str]:
    return {f"model.visual.{n}" for n, _ in encoder.model.visual.named_parameters() if n.startswith(prefix)}


def test_trainable_specs_maskclip(clip_encoder):
    blocks = "transformer.resblocks."
    assert set(clip_encoder.trainable_parameters("blk_-1")) == _visual_names(clip_encoder, blocks + "1.")
    both = set(clip_encoder.trainable_parameters("blk_-1,blk_-2"))
    assert both == _visual_names(clip_encoder, blocks)
    assert set(clip_encoder.trainable_parameters("posembed")) == {"model.visual.positional_embedding"}
    assert set(clip_encoder.trainable_parameters("patchembed")) == {"model.visual.conv1.weight"}
    assert set(clip_encoder.trainable_parameters("all")) == _visual_names(clip_encoder, "")
    names = clip_encoder.set_trainable("blk_-1,blk_-2")
    assert set(names) == both
    trainable = {f"model.{n}" for n, p in clip_encoder.model.named_parameters() if p.requires_grad}
    assert trainable == both  # everything else, the text tower included, is frozen


def test_trainable_specs_siglip2(siglip_encoder):
    assert set(siglip_encoder.trainable_parameters("blk_-2")) == _visual_names(siglip_encoder, "trunk.blocks.0.")
    assert set(siglip_encoder.trainable_parameters("posembed,patchembed")) == {
        "model.visual.trunk.pos_embed",
        "model.visual.trunk.patch_embed.proj.weight",
        "model.visual.trunk.patch_embed.proj.bias",
    }
    assert "model.visual.trunk.attn_pool.kv.weight" in siglip_encoder.trainable_parameters("head")


@pytest.mark.parametrize("spec", ["blk_7", "blk_x", "posembd", "blk_-3"])
def test_trainable_spec_errors_name_the_item(clip_encoder, spec):
    with pytest.raises(ValueError, match=spec):
        clip_encoder.trainable_parameters(spec)


def test_gradients_flow_to_selected_blocks(siglip_encoder):
    siglip_encoder.set_trainable("blk_-1")
    siglip_encoder(torch.randn(1, 3, 48, 80)).square().mean().backward()
    for name, p in siglip_encoder.model.named_parameters():
        assert (p.grad is not None) == ("trunk.blocks.1." in name), name


def test_encode_text_and_metadata(encoder):
    emb = encoder.encode_text(["a cat", "a dog"])
    assert emb.shape == (2, encoder.embed_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    assert encoder.patch_size == 16 and encoder.native_size == 64
    assert len(encoder.mean) == len(encoder.std) == 3


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


def test_siglip2_specs_skip_parameters_the_bypass_never_uses(siglip_encoder):
    selected = siglip_encoder.trainable_parameters("all")
    assert "model.visual.trunk.attn_pool.latent" not in selected
    assert not any(".attn_pool.q." in n for n in selected)
    siglip_encoder.set_trainable("all")
    siglip_encoder(torch.randn(1, 3, 48, 64)).sum().backward()
    assert all(p.grad is not None for p in selected.values())  # DDP finds no unused trainable parameter


def test_dense_features_need_no_tokenizer(siglip_encoder):
    """The public contract ``SigLIP2Encoder(model)``: a model whose text tower is not CLIP's builds without one."""
    model = siglip_encoder.model
    model.text.vocab_size = 32000  # as a Gemma-tokenised SigLIP2 text tower
    encoder = SigLIP2Encoder(model)
    assert encoder.tokenizer is None
    assert encoder(torch.randn(1, 3, 32, 48)).shape == (1, encoder.embed_dim, 2, 3)
    with pytest.raises(ValueError, match="no tokenizer.*open_clip.get_tokenizer"):
        encoder.encode_text(["a cat"])
    assert encoder.encode_text(torch.zeros(1, 16, dtype=torch.long)).shape == (1, encoder.embed_dim)


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
