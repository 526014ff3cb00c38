"""The contract every family's encoder shares (spar_pl.families.base, ``DenseEncoder``), on the tiny CLIP and SigLIP
twins: dense feature shapes, text embeddings and metadata, trainable-spec errors."""

import pytest
import torch


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (96, 64), (128, 160), (32, 224)])
def test_shapes_multiples_of_patch(encoder, size):
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = encoder(x)
    assert out.shape == (2, encoder.embed_dim, size[0] // 16, size[1] // 16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("spec", ["blk_7", "blk_x", "posembd", "blk_-3"])
def test_trainable_spec_errors_name_the_item(clip_encoder, spec):
    with pytest.raises(ValueError, match=spec):
        clip_encoder.trainable_parameters(spec)


def test_encode_text_and_metadata(encoder):
    emb = encoder.encode_text(["a cat", "a dog"])
    assert emb.shape == (2, encoder.embed_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    assert encoder.patch_size == 16 and encoder.native_size == 64
    assert len(encoder.mean) == len(encoder.std) == 3
