"""The SigLIP family (spar_pl.families.siglip, ``SigLIP2Encoder``) on its tiny twin: padding to the patch, the
reference's positional resize, the attention-pool bypass, trainable specs and their gradients, no tokenizer needed."""

import math

import pytest
import torch
import torch.nn.functional as F

from spar_pl.encoders import SigLIP2Encoder

from .helpers import visual_names


def test_siglip2_not_multiple_of_patch_pads_bottom_right(siglip_encoder):
    x = torch.randn(1, 3, 70, 50)
    with torch.no_grad():
        out = siglip_encoder(x)
        padded = siglip_encoder(F.pad(x, (0, 14, 0, 10)))
    assert out.shape[-2:] == (math.ceil(70 / 16), math.ceil(50 / 16)) == (5, 4)
    torch.testing.assert_close(out, padded)  # zero padding bottom/right, as timm's dynamic_img_pad


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


def test_trainable_specs_siglip2(siglip_encoder):
    assert set(siglip_encoder.trainable_parameters("blk_-2")) == visual_names(siglip_encoder, "trunk.blocks.0.")
    assert set(siglip_encoder.trainable_parameters("posembed,patchembed")) == {
        "model.visual.trunk.pos_embed",
        "model.visual.trunk.patch_embed.proj.weight",
        "model.visual.trunk.patch_embed.proj.bias",
    }
    assert "model.visual.trunk.attn_pool.kv.weight" in siglip_encoder.trainable_parameters("head")


def test_gradients_flow_to_selected_blocks(siglip_encoder):
    siglip_encoder.set_trainable("blk_-1")
    siglip_encoder(torch.randn(1, 3, 48, 80)).square().mean().backward()
    for name, p in siglip_encoder.model.named_parameters():
        assert (p.grad is not None) == ("trunk.blocks.1." in name), name


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
