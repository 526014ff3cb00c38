"""The Eva-trunk families (``eva02``: EVA02-CLIP, ``pe``: Perception Encoder) on their tiny twins.

The tiny twins build through ``open_clip.create_model`` from their JSON configs like the real models, so the tests
exercise the real construction path: a timm ``Eva`` trunk (RoPE, class token) inside open_clip's ``TimmModel``.
"""

from __future__ import annotations

import functools

import open_clip
import pytest
import timm.models.eva
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from spar_pl.families import eva
from spar_pl.testing import MODEL_CONFIGS

TINY = {"spar-tiny-eva02": eva.EVA02Encoder, "spar-tiny-pe": eva.PEEncoder}


def _build(name: str, seed: int = 0) -> eva.EvaTrunkEncoder:
    eva.register_tiny()
    if name not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIGS)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    with torch.no_grad():  # timm zero-initialises biases and the q/v biases: random ones make the checks sharper
        for p in model.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return TINY[name](model.eval())


@pytest.fixture(scope="module", params=sorted(TINY))
def encoder(request) -> eva.EvaTrunkEncoder:
    return _build(request.param)


def _dynamic_twin(encoder: eva.EvaTrunkEncoder, monkeypatch):
    """The same trunk built by timm with ``dynamic_img_size=True`` (timm's own any-size forward), same weights.

    For PE, set to Meta's reference rules (RoPE on unscaled grid positions, bilinear positional embedding)."""
    trunk = encoder.trunk
    if isinstance(encoder, eva.EVA02Encoder):
        twin = eva.spar_tiny_eva02(dynamic_img_size=True, num_classes=trunk.num_classes)
    else:
        twin = eva.spar_tiny_pe(dynamic_img_size=True, num_classes=trunk.num_classes, ref_feat_shape=None)
        bilinear = functools.partial(resample_abs_pos_embed, interpolation="bilinear", antialias=False)
        monkeypatch.setattr(timm.models.eva, "resample_abs_pos_embed", bilinear)
    twin.load_state_dict(trunk.state_dict(), strict=True)
    return twin.eval()


def test_tiny_twins_are_recognised_from_structure_and_config():
    for name, cls in TINY.items():
        enc = _build(name)
        assert eva._recognise_eva02(enc.model) is (cls is eva.EVA02Encoder)
        assert eva._recognise_pe(enc.model) is (cls is eva.PEEncoder)
        cfg = open_clip.get_model_config(name)
        assert eva._recognise_config("eva02")(cfg) is (cls is eva.EVA02Encoder)
        assert eva._recognise_config("pe")(cfg) is (cls is eva.PEEncoder)
    other = open_clip.get_model_config("ViT-B-16")
    assert not eva._recognise_config("eva02")(other) and not eva._recognise_config("pe")(other)
    with pytest.raises(TypeError, match="attention pool"):
        eva.EVA02Encoder(_build("spar-tiny-pe").model)
    with pytest.raises(TypeError, match="class-token pool"):
        eva.PEEncoder(_build("spar-tiny-eva02").model)


def test_rope_twin_builds_the_trunks_own_table_at_the_native_grid(encoder):
    trunk = encoder.trunk
    h, w = trunk.patch_embed.grid_size
    torch.testing.assert_close(encoder.rope_embedding(h, w), trunk.rope.get_embed(), atol=1e-6, rtol=0)
    assert not any("rope" in k for k in encoder.state_dict())  # nothing added to the checkpoint layout


def test_pe_any_size_rules_are_metas_reference():
    """PE: RoPE on integer grid positions (a larger grid's top-left corner is the native table) and the patch
    part of the positional embedding resized bilinearly (align_corners=False, no antialiasing), the class
    token's entry kept; EVA02 rescales RoPE positions onto the pretraining grid instead."""
    pe, eva02 = _build("spar-tiny-pe"), _build("spar-tiny-eva02")
    d = pe.rope.get_embed(shape=[4, 4]).shape[-1]
    big = pe.rope_embedding(7, 9).reshape(7, 9, d)[:4, :4].reshape(16, d)
    torch.testing.assert_close(big, pe.trunk.rope.get_embed(), atol=1e-6, rtol=0)
    big = eva02.rope_embedding(7, 9).reshape(7, 9, -1)[:4, :4].reshape(16, -1)
    assert not torch.allclose(big, eva02.trunk.rope.get_embed(), atol=1e-3)
    pos = pe.trunk.pos_embed
    grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(7, 9), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pe.positional_embedding(7, 9), torch.cat([pos[:, :1], want], dim=1))


@torch.no_grad()
def test_tokens_match_the_models_own_forward_at_native_size(encoder):
    """Up to the last block (where the value path departs), the dense path's tokens are timm's own."""
    trunk = encoder.trunk
    x = torch.randn(2, 3, 64, 64)
    depth = len(trunk.blocks)
    for k in range(depth):
        ours, _ = encoder.tokens(x, depth=k + 1)
        spatial, prefix = trunk.forward_intermediates(
            x, indices=[k], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )[0]
        torch.testing.assert_close(ours, torch.cat([prefix, spatial], dim=1), atol=1e-5, rtol=1e-5)
    if isinstance(encoder, eva.PEEncoder):  # PE keeps the whole last block: the final norm agrees as well
        ours, rope = encoder.tokens(x)
        torch.testing.assert_close(
            trunk.norm(trunk.blocks[-1](ours, rope=rope)), trunk.forward_features(x), atol=1e-5, rtol=1e-5
        )


@torch.no_grad()
@pytest.mark.parametrize("size", [(45, 100), (64, 64), (100, 37), (129, 97)])
def test_tokens_match_timms_dynamic_size_forward_at_any_size(encoder, size, monkeypatch):
    """At any size, positional embedding and RoPE follow timm's own dynamic-size rules (same weights); a remainder
    below one patch is dropped (timm's dynamic forward then equals it on the image cropped to the grid)."""
    twin = _dynamic_twin(encoder, monkeypatch)
    x = torch.randn(1, 3, *size)
    depth = len(twin.blocks) - 1
    ours, _ = encoder.tokens(x)
    h, w = encoder.grid_size(*size)
    spatial, prefix = twin.forward_intermediates(
        x[..., : h * encoder.patch_size, : w * encoder.patch_size],
        indices=[depth - 1],
        output_fmt="NLC",
        intermediates_only=True,
        return_prefix_tokens=True,
    )[0]
    torch.testing.assert_close(ours, torch.cat([prefix, spatial], dim=1), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_value_paths_are_the_modules_own_output_on_a_single_token(encoder):
    """Attention over one token is its value path: the last block's attention and the PE pool, each on every token
    alone, reproduce ``value_attention`` and the pool bypass exactly (RoPE is never applied to values)."""
    trunk = encoder.trunk
    x, _ = encoder.tokens(torch.randn(2, 3, 64, 64))
    b, n, d = x.shape
    attn = trunk.blocks[-1].attn
    alone = x.reshape(b * n, 1, d)
    torch.testing.assert_close(
        eva.value_attention(attn, x).reshape(b * n, 1, -1), attn(alone, rope=None), atol=1e-5, rtol=1e-5
    )
    if isinstance(encoder, eva.PEEncoder):
        full = trunk.norm(trunk.blocks[-1](x, rope=encoder.rope_embedding(4, 4)))
        pooled = trunk.attn_pool(full.reshape(b * n, 1, d)).reshape(b, n, -1)
        ours = encoder.head_tokens(x, encoder.rope_embedding(4, 4))
        torch.testing.assert_close(ours, encoder.model.visual.head(trunk.head(pooled)), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_dense_features_at_native_size_follow_the_documented_semantics(encoder):
    """The whole dense forward, restated plainly from timm's own modules (docs/method.md, Eva-trunk families)."""
    trunk = encoder.trunk
    x = torch.randn(2, 3, 64, 64)
    npt = trunk.num_prefix_tokens
    tokens = trunk.forward_intermediates(
        x, indices=[len(trunk.blocks) - 2], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
    )[0]
    t = torch.cat([tokens[1], tokens[0]], dim=1)
    blk = trunk.blocks[-1]
    if isinstance(encoder, eva.EVA02Encoder):
        attn = blk.attn
        v = attn.proj(attn.norm(attn.v_proj(blk.norm1(t))))  # EVA02-CLIP: separate q/k/v projections, sub-LN
        t = t + v
        t = trunk.norm(t + blk.mlp(blk.norm2(t)))
    else:
        t = trunk.norm(blk(t, rope=trunk.rope.get_embed()))
        pool = trunk.attn_pool
        t = pool.proj(pool.kv(t)[..., t.shape[-1] :])
        t = t + pool.mlp(pool.norm(t))
    want = trunk.head(t)[:, npt:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(encoder(x), want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("size", [(64, 64), (45, 100), (100, 37), (17, 200)])
def test_dense_features_any_size(encoder, size):
    h, w = size
    out = encoder(torch.randn(2, 3, h, w))
    p = encoder.patch_size
    assert out.shape == (2, encoder.embed_dim, h // p, w // p)
    assert torch.isfinite(out).all()
    assert encoder.grid_size(h, w) == (h // p, w // p)
    with pytest.raises(ValueError, match="smaller than one"):
        encoder(torch.randn(1, 3, p - 1, 64))


def test_geometry_of_the_tiny_twins():
    eva02, pe = _build("spar-tiny-eva02"), _build("spar-tiny-pe")
    assert (eva02.patch_size, eva02.native_size, eva02.default_crop, eva02.embed_dim) == (14, 64, 56, 32)
    assert (pe.patch_size, pe.native_size, pe.default_crop, pe.embed_dim) == (16, 64, 64, 48)


def _names(encoder, prefix: str) -> set[str]:
    return {f"model.visual.{n}" for n, _ in encoder.model.visual.named_parameters() if n.startswith(prefix)}


def test_trainable_groups_and_unused_parameters(encoder):
    trunk = "trunk."
    last = len(encoder.blocks) - 1
    unused = {n for n, p in encoder.model.visual.named_parameters() if any(p is u for u in encoder.unused_parameters())}
    unused = {f"model.visual.{n}" for n in unused}
    assert set(encoder.trainable_parameters("blk_-2")) == _names(encoder, f"{trunk}blocks.{last - 1}.")
    assert set(encoder.trainable_parameters("blk_-1")) == _names(encoder, f"{trunk}blocks.{last}.") - unused
    assert set(encoder.trainable_parameters("posembed")) == {"model.visual.trunk.pos_embed"}
    assert set(encoder.trainable_parameters("patchembed")) == _names(encoder, f"{trunk}patch_embed.")
    head = _names(encoder, f"{trunk}norm.") | _names(encoder, f"{trunk}head.") | _names(encoder, f"{trunk}attn_pool.")
    assert set(encoder.trainable_parameters("head")) == head - unused
    assert set(encoder.trainable_parameters("all")) == _names(encoder, "") - unused
    if isinstance(encoder, eva.EVA02Encoder):  # the value path skips the last block's query and key projections
        assert unused == _names(encoder, f"{trunk}blocks.{last}.attn.q_proj.") | _names(
            encoder, f"{trunk}blocks.{last}.attn.k_proj."
        )
    else:  # the pool bypass skips the latent query and its projection
        assert unused == _names(encoder, f"{trunk}attn_pool.latent") | _names(encoder, f"{trunk}attn_pool.q.")


def test_every_trainable_parameter_gets_a_gradient_and_no_unused_one_does(encoder):
    """What 'all' selects is exactly what the dense path uses: DDP never waits for a gradient."""
    enc = _build(type(encoder).__name__ == "EVA02Encoder" and "spar-tiny-eva02" or "spar-tiny-pe", seed=1)
    names = enc.set_trainable("all")
    enc(torch.randn(1, 3, 45, 100)).square().mean().backward()
    params = dict(enc.named_parameters())
    missing = [n for n in names if params[n].grad is None]
    assert not missing
    assert all(u.grad is None for u in enc.unused_parameters())


@torch.no_grad()
def test_pe_without_a_class_token():
    """PE bigG's trunk has no class token (and RoPE from position 0): tokens are timm's own, features any size."""
    encoder = _build("spar-tiny-pe")
    model = encoder.model
    torch.manual_seed(2)
    model.visual.trunk = eva.spar_tiny_pe(class_token=False, rope_grid_offset=0.0, num_classes=48).eval()
    encoder = eva.PEEncoder(model)
    assert eva._recognise_pe(model) and encoder.trunk.num_prefix_tokens == 0
    trunk = encoder.trunk
    x = torch.randn(2, 3, 64, 64)
    ours, _ = encoder.tokens(x)
    theirs = trunk.forward_intermediates(x, indices=[len(trunk.blocks) - 2], output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(ours, theirs[0], atol=1e-5, rtol=1e-5)
    assert encoder(torch.randn(1, 3, 45, 100)).shape == (1, 48, 2, 6)
    model = _build("spar-tiny-eva02").model
    model.visual.trunk = eva.spar_tiny_eva02(class_token=False, global_pool="avg", num_classes=32)
    assert not eva._recognise_eva02(model) and not eva._recognise_pe(model)
    with pytest.raises(TypeError, match="class token"):
        eva.EVA02Encoder(model)
