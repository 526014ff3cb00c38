"""The CLIP family (spar_pl.families.clip, ``MaskCLIPEncoder``) on its tiny twin: the remainder dropped, the
reference's positional resize, the value path in the last block, trainable specs."""

import torch
import torch.nn.functional as F

from .helpers import visual_names


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


def test_trainable_specs_maskclip(clip_encoder):
    blocks = "transformer.resblocks."
    assert set(clip_encoder.trainable_parameters("blk_-1")) == visual_names(clip_encoder, blocks + "1.")
    both = set(clip_encoder.trainable_parameters("blk_-1,blk_-2"))
    assert both == visual_names(clip_encoder, blocks)
    assert set(clip_encoder.trainable_parameters("posembed")) == {"model.visual.positional_embedding"}
    assert set(clip_encoder.trainable_parameters("patchembed")) == {"model.visual.conv1.weight"}
    assert set(clip_encoder.trainable_parameters("all")) == visual_names(clip_encoder, "")
    names = clip_encoder.set_trainable("blk_-1,blk_-2")
    assert set(names) == both
    trainable = {f"model.{n}" for n, p in clip_encoder.model.named_parameters() if p.requires_grad}
    assert trainable == both  # everything else, the text tower included, is frozen
