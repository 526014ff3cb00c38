"""The DINOv3.txt family (spar_pl.families.dinotxt), natively on its tiny twin: shapes, dense features and text,
trainable specs, the official key layouts and weight files, full-size parameter counts, and (opt-in) parity with the
official code.

The official layouts come from :func:`tests.helpers.official_files`, written from the key list in
``shared/reference/DINOV3TXT.md`` independently of :meth:`DinoTxtEncoder.convert_state_dict`, so a wrong mapping fails
these tests. The pipeline with the twin (segment, features, quickstart, test, fit, table):
``tests/test_family_dinotxt_e2e.py``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spar_pl.encoders import DinoTxtEncoder, DinoTxtModel, build_encoder

from .helpers import official_files, randomise, tiny_dinotxt, write_official_files

TINY_NAME = "spar-tiny-dinotxt"


@pytest.fixture(scope="module")
def source() -> DinoTxtEncoder:
    return randomise(tiny_dinotxt(0))


@pytest.fixture(scope="module")
def files(source, tmp_path_factory) -> tuple[Path, Path]:
    return write_official_files(source, tmp_path_factory.mktemp("dinotxt"))


def assert_same_model(a: DinoTxtEncoder, b: DinoTxtEncoder) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert torch.equal(a.encode_text(["a cat", "sky"]), b.encode_text(["a cat", "sky"]))


# -- shapes, text, stretching, trainable specs ------------------------------------------------------------------


def test_tiny_twin_shapes_and_contract():
    enc = tiny_dinotxt()
    assert isinstance(enc.model.visual, type(build_encoder("dinov3txt", TINY_NAME).model.visual))
    assert type(enc.model.visual).__name__ == "Eva" and type(enc.model.text).__name__ == "TextTransformer"
    assert enc.mean == (0.485, 0.456, 0.406) and enc.std == (0.229, 0.224, 0.225)
    assert enc.patch_size == 16 and enc.native_size == 384 and enc.embed_dim == 32 and len(enc.blocks) == 3
    assert enc.model_name == TINY_NAME
    with torch.no_grad():
        for h, w in [(64, 64), (50, 70), (16, 33), (7, 7)]:
            assert enc(torch.randn(2, 3, h, w)).shape == (2, 32, math.ceil(h / 16), math.ceil(w / 16))
    with pytest.raises(ValueError, match="no pixels"):
        enc(torch.randn(1, 3, 0, 32))


def test_dense_features_are_final_normed_patch_tokens_of_the_stretched_image():
    enc = randomise(tiny_dinotxt())
    x = torch.randn(2, 3, 50, 70)
    stretched = F.interpolate(x, size=(64, 80), mode="bicubic", align_corners=False)
    seen = {}
    enc.model.visual.blocks[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("last", o))
    with torch.no_grad():
        feats = enc(x)
        last = seen["last"]  # the last block's tokens: [cls, 4 registers, patches]
        assert torch.equal(feats, enc(stretched))
        assert not torch.allclose(feats, enc(F.pad(x, (0, 10, 0, 14))), atol=1e-3)  # stretched, not padded
        assert last.shape == (2, 5 + 4 * 5, 32)
        expected = enc.model.visual.norm(last)[:, 5:]
    assert torch.equal(feats.flatten(2).transpose(1, 2), expected)


def test_text_is_the_last_half_normalised_after_slicing():
    enc = randomise(tiny_dinotxt())
    tokens = enc.tokenizer(["a photo of a cat.", "road"])
    assert tokens.shape == (2, 77)
    with torch.no_grad():
        full = enc.model.text(tokens)
        text = enc.encode_text(["a photo of a cat.", "road"])
        raw = enc.encode_text(tokens, normalize=False)
    assert full.shape == (2, 64) and text.shape == (2, 32)
    assert torch.allclose(text, F.normalize(full[:, 32:], dim=-1), atol=1e-6)
    assert torch.equal(raw, full[:, 32:])
    assert not torch.allclose(text, F.normalize(full, dim=-1)[:, 32:], atol=1e-3)  # sliced first, then normalised
    assert torch.allclose(text.norm(dim=-1), torch.ones(2))


def test_trainable_specs_and_eval_mode_kept():
    enc = tiny_dinotxt()
    names = enc.set_trainable("blk_-1,blk_-2")
    assert names and all(n.startswith(("model.visual.blocks.1.", "model.visual.blocks.2.")) for n in names)
    assert any(n.endswith("attn.q_bias") for n in names) and any(n.endswith("attn.v_bias") for n in names)
    assert {n for n, p in enc.model.named_parameters() if p.requires_grad} == {n[len("model.") :] for n in names}
    assert set(enc.set_trainable("head")) == {"model.visual.norm.weight", "model.visual.norm.bias"}
    assert set(enc.set_trainable("patchembed")) == {
        "model.visual.patch_embed.proj.weight",
        "model.visual.patch_embed.proj.bias",
    }
    everything = enc.set_trainable("all")
    assert "model.visual.cls_token" in everything and not any(".text." in n for n in everything)
    with pytest.raises(ValueError, match="posembed.*RoPE"):
        enc.set_trainable("blk_-1,posembed")
    with pytest.raises(ValueError, match="blk_7"):
        enc.set_trainable("blk_7")
    enc.train()
    assert enc.training and not enc.model.training
    assert not any(m.training for m in enc.model.modules())


# -- official layouts ------------------------------------------------------------------------------------------------


def test_the_two_official_files_load_strictly(source, files):
    loaded = build_encoder("dinov3txt", TINY_NAME, weights=files[0], head_weights=files[1])
    assert_same_model(source, loaded)
    assert loaded.blocks[-1].attn.q_bias.abs().sum() > 0 and loaded.blocks[-1].attn.v_bias.abs().sum() > 0
    assert torch.equal(loaded.model.visual.rope.periods, source.model.visual.rope.periods)
    assert not torch.equal(loaded.model.visual.rope.periods, loaded.model.visual.rope._compute_periods())


def test_authors_spar_checkpoint_loads_strictly(source, files, tmp_path):
    backbone, dinotxt = official_files(source)
    trained = randomise(tiny_dinotxt(), seed=5)  # e.g. SPAR-trained blocks: other weights, non-zero q/v biases
    tb, tt = official_files(trained)
    state = {f"segmentor.net.model.visual_model.backbone.{k}": v for k, v in tb.items()}
    state |= {f"segmentor.net.model.{k}": v for k, v in tt.items()}
    torch.save({"state_dict": state, "epoch": 9, "global_step": 100}, tmp_path / "spar.ckpt")
    enc = build_encoder(
        "dinov3txt", TINY_NAME, weights=files[0], head_weights=files[1], checkpoint=tmp_path / "spar.ckpt"
    )
    assert_same_model(trained, enc)
    alone = build_encoder("dinov3txt", TINY_NAME, checkpoint=tmp_path / "spar.ckpt")  # the files are optional here
    assert_same_model(trained, alone)
    # an unknown key, or a head key outside the official layout, is reported, never dropped silently
    for extra in (
        "segmentor.net.model.visual_model.extra.weight",
        "segmentor.net.model.visual_model.head.blocks.2.ls1.gamma",
    ):
        torch.save({"state_dict": {**state, extra: torch.zeros(1)}}, tmp_path / "bad.ckpt")
        with pytest.raises(ValueError, match=r"unexpected keys: .*" + extra.split("model.", 2)[-1].replace(".", r"\.")):
            build_encoder("dinov3txt", TINY_NAME, checkpoint=tmp_path / "bad.ckpt")
    missing = {k: v for k, v in state.items() if not k.endswith("blocks.2.attn.qkv.bias")}
    torch.save({"state_dict": missing}, tmp_path / "short.ckpt")
    with pytest.raises(ValueError, match="missing keys: visual.blocks.2.attn.q_bias"):
        build_encoder("dinov3txt", TINY_NAME, checkpoint=tmp_path / "short.ckpt")


def test_project_checkpoints_round_trip(source, tmp_path):
    from safetensors.torch import save_file

    state = source.model.state_dict()
    torch.save({"state_dict": {f"student.model.{k}": v for k, v in state.items()}}, tmp_path / "fit.ckpt")
    assert_same_model(source, build_encoder("dinov3txt", TINY_NAME, checkpoint=tmp_path / "fit.ckpt"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "student.safetensors"))
    assert_same_model(source, build_encoder("dinov3txt", TINY_NAME, checkpoint=tmp_path / "student.safetensors"))


def test_files_missing_swapped_or_foreign_say_what_they_are(files, tmp_path):
    from safetensors.torch import save_file

    backbone, head = files
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_encoder("dinov3txt", TINY_NAME, weights=tmp_path / "nowhere.pth", head_weights=head)
    with pytest.raises(ValueError, match="is not a DINOv3 backbone file: it looks like a dino.txt"):
        build_encoder("dinov3txt", TINY_NAME, weights=head, head_weights=backbone)
    with pytest.raises(
        ValueError, match="head_weights file .* is not a dino.txt file: it looks like a DINOv3 backbone"
    ):
        build_encoder("dinov3txt", TINY_NAME, weights=backbone, head_weights=backbone)
    siglip = build_encoder("siglip2", "spar-tiny-sl2")
    save_file({k: v.contiguous() for k, v in siglip.model.state_dict().items()}, str(tmp_path / "sl2.safetensors"))
    with pytest.raises(ValueError, match="sl2.safetensors is not a DINOv3 backbone file: it looks like an open_clip"):
        build_encoder("dinov3txt", TINY_NAME, weights=tmp_path / "sl2.safetensors", head_weights=head)
    with pytest.raises(ValueError, match="head_weights is missing"):
        build_encoder("dinov3txt", TINY_NAME, weights=backbone)
    with pytest.raises(ValueError, match="dinov3txt needs its two local weight files"):
        build_encoder("dinov3txt")
    with pytest.raises(ValueError, match="head_weights is for backbone 'dinov3txt' only"):
        build_encoder("siglip2", "spar-tiny-sl2", head_weights=head)


def test_full_size_parameter_counts_on_meta():
    with torch.device("meta"):
        model = DinoTxtModel()
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(model.visual) == pytest.approx(303.1e6, rel=0.005)
    assert count(model.text) == pytest.approx(538.0e6, rel=0.005)
    v = model.visual
    assert (len(v.blocks), v.embed_dim, v.num_prefix_tokens, v.blocks[0].attn.num_heads) == (24, 1024, 5, 16)
    assert v.blocks[0].mlp.fc1.out_features == 4096 and v.rope.periods.shape == (16,)
    t = model.text
    assert (t.width, t.heads, len(t.transformer.resblocks), t.text_projection.shape) == (1280, 20, 24, (1280, 2048))
    # the head's size from the official layout (dropped, not built): 2 blocks + final norm
    d, hidden = 1024, 2752
    block = 2 * d + 3 * d * d + d * d + d + d + 2 * d + 2 * (hidden * d + hidden) + d * hidden + d + d
    assert 2 * block + 2 * d == pytest.approx(25.2e6, rel=0.01)


# -- parity with the official code (opt-in) --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("SPAR_DINOV3_REPO"), reason="set SPAR_DINOV3_REPO to a facebookresearch/dinov3 checkout"
)
def test_parity_with_the_official_dinotxt(monkeypatch):
    """Random full-size weights in the official model; the same weights through this project's loader."""
    import open_clip

    monkeypatch.syspath_prepend(os.environ["SPAR_DINOV3_REPO"])
    from dinov3.hub.dinotxt import dinov3_vitl16_dinotxt_tet1280d20h24l

    bpe = str(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz")
    torch.manual_seed(0)
    official, tokenizer = dinov3_vitl16_dinotxt_tet1280d20h24l(pretrained=False, bpe_path_or_url=bpe)
    official.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in official.named_parameters():  # non-trivial everywhere: biases, LayerScale, k bias (masked)
            scale = 0.02 if p.dim() > 1 else 0.1
            base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=g))
        rope = official.visual_model.backbone.rope_embed
        rope.periods.copy_(rope.periods.to(torch.bfloat16).float())  # as stored in the released file
    state = official.state_dict()
    backbone = {
        k[len("visual_model.backbone.") :]: v for k, v in state.items() if k.startswith("visual_model.backbone.")
    }
    head = {k: v for k, v in state.items() if not k.startswith("visual_model.backbone.")}
    assert len(backbone) == 368

    encoder = DinoTxtEncoder(DinoTxtModel())
    encoder.model.load_state_dict(
        encoder.convert_state_dict({**{f"visual_model.backbone.{k}": v for k, v in backbone.items()}, **head}),
        strict=True,
    )
    texts = ["a photo of a cat.", "a photo of the large building, with a red roof and many windows.", "sky"]
    ids = tokenizer.tokenize(texts)
    assert torch.equal(ids, encoder.tokenizer(texts))
    x = torch.randn(1, 3, 224, 320, generator=g)
    with torch.no_grad():
        ref = official.visual_model.get_class_and_patch_tokens(x)[2]
        ours = encoder(x).flatten(2).transpose(1, 2)
        ref_text = F.normalize(official.encode_text(ids)[:, 1024:], dim=-1)
        ours_text = encoder.encode_text(texts)
    dense_err = (ours - ref).abs().max().item() / ref.abs().max().item()
    text_err = (ours_text - ref_text).abs().max().item()
    cosine = F.cosine_similarity(ours, ref, dim=-1).min().item()
    # sensitivity: timm's own float32 periods instead of the file's bfloat16-rounded ones must show up
    periods = encoder.model.visual.rope.periods
    periods.copy_(encoder.model.visual.rope._compute_periods())
    with torch.no_grad():
        recomputed_err = (encoder(x).flatten(2).transpose(1, 2) - ref).abs().max().item() / ref.abs().max().item()
    print(
        f"parity: dense max rel err {dense_err:.2e} (with recomputed RoPE periods {recomputed_err:.2e}), "
        f"min cosine {cosine:.7f}; text max abs err {text_err:.2e}"
    )
    assert dense_err < 1e-6 and cosine > 0.99999 and recomputed_err > 10 * dense_err  # 3e-5 with wrong periods
    assert text_err < 1e-5
