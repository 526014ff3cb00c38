"""DINOv3.txt, natively: the tiny twin, official key layouts, parameter counts, parity and the pipeline.

The official layouts are written here from the key list in ``shared/reference/DINOV3TXT.md`` (independently
of :meth:`DinoTxtEncoder.convert_state_dict`), so a wrong mapping fails these tests.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spar_pl.cli import main
from spar_pl.encoders import DinoTxtEncoder, DinoTxtModel, build_encoder
from spar_pl.scenes import scene_image

ROOT = Path(__file__).resolve().parents[1]
TINY_NAME = "spar-tiny-dinotxt"
TINY = ["--backbone", "dinov3txt", "--model-name", TINY_NAME]


def tiny(seed: int = 0) -> DinoTxtEncoder:
    torch.manual_seed(seed)
    return build_encoder("dinov3txt", TINY_NAME)


def randomise(encoder: DinoTxtEncoder, seed: int = 1) -> DinoTxtEncoder:
    """Non-trivial weights everywhere (q/v biases and LayerScale included); the text qkv bias stays zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in encoder.model.named_parameters():
            if name.endswith("in_proj_bias"):
                p.zero_()  # the official text tower has no qkv bias
            elif ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        periods = encoder.model.visual.rope.periods
        # the file stores periods rounded to bfloat16; perturbed so that recomputing them would differ
        periods.copy_((periods * 1.01).to(torch.bfloat16).float())
    return encoder


def official_files(encoder: DinoTxtEncoder) -> tuple[dict, dict]:
    """The (backbone file, dino.txt file) state dicts in the official key layouts, from a tiny model's weights."""
    m = encoder.model
    v, t = m.visual, m.text
    d = m.embed_dim
    g = torch.Generator().manual_seed(7)
    backbone = {
        "cls_token": v.cls_token,
        "storage_tokens": v.reg_token,
        "mask_token": torch.zeros(1, d),
        "patch_embed.proj.weight": v.patch_embed.proj.weight,
        "patch_embed.proj.bias": v.patch_embed.proj.bias,
        "rope_embed.periods": v.rope.periods.to(torch.bfloat16),
        "norm.weight": v.norm.weight,
        "norm.bias": v.norm.bias,
    }
    for i, blk in enumerate(v.blocks):
        a = blk.attn
        k_bias = torch.randn(d, generator=g)  # masked in the official model: must have no effect
        ones = torch.ones(d)
        backbone |= {
            f"blocks.{i}.norm1.weight": blk.norm1.weight,
            f"blocks.{i}.norm1.bias": blk.norm1.bias,
            f"blocks.{i}.attn.qkv.weight": a.qkv.weight,
            f"blocks.{i}.attn.qkv.bias": torch.cat([a.q_bias, k_bias, a.v_bias]),
            f"blocks.{i}.attn.qkv.bias_mask": torch.cat([ones, torch.zeros(d), ones]),
            f"blocks.{i}.attn.proj.weight": a.proj.weight,
            f"blocks.{i}.attn.proj.bias": a.proj.bias,
            f"blocks.{i}.ls1.gamma": blk.gamma_1,
            f"blocks.{i}.norm2.weight": blk.norm2.weight,
            f"blocks.{i}.norm2.bias": blk.norm2.bias,
            f"blocks.{i}.mlp.fc1.weight": blk.mlp.fc1.weight,
            f"blocks.{i}.mlp.fc1.bias": blk.mlp.fc1.bias,
            f"blocks.{i}.mlp.fc2.weight": blk.mlp.fc2.weight,
            f"blocks.{i}.mlp.fc2.bias": blk.mlp.fc2.bias,
            f"blocks.{i}.ls2.gamma": blk.gamma_2,
        }
    hidden = 2752 * d // 1024
    head = {"visual_model.head.ln_final.weight": torch.ones(d), "visual_model.head.ln_final.bias": torch.zeros(d)}
    for i in range(2):
        p = f"visual_model.head.blocks.{i}."
        head |= {
            p + "norm1.weight": torch.ones(d),
            p + "norm1.bias": torch.zeros(d),
            p + "attn.qkv.weight": torch.randn(3 * d, d, generator=g),
            p + "attn.proj.weight": torch.randn(d, d, generator=g),
            p + "attn.proj.bias": torch.zeros(d),
            p + "ls1.gamma": torch.ones(d),
            p + "norm2.weight": torch.ones(d),
            p + "norm2.bias": torch.zeros(d),
            p + "mlp.w1.weight": torch.randn(hidden, d, generator=g),
            p + "mlp.w1.bias": torch.zeros(hidden),
            p + "mlp.w2.weight": torch.randn(hidden, d, generator=g),
            p + "mlp.w2.bias": torch.zeros(hidden),
            p + "mlp.w3.weight": torch.randn(d, hidden, generator=g),
            p + "mlp.w3.bias": torch.zeros(d),
            p + "ls2.gamma": torch.ones(d),
        }
    text = {
        "logit_scale": m.logit_scale,
        "text_model.backbone.token_embedding.weight": t.token_embedding.weight,
        "text_model.backbone.positional_embedding": t.positional_embedding,
        "text_model.backbone.ln_final.weight": t.ln_final.weight,
        "text_model.backbone.ln_final.bias": t.ln_final.bias,
        "text_model.head.linear_projection.weight": t.text_projection.T,
    }
    for i, blk in enumerate(t.transformer.resblocks):
        p = f"text_model.backbone.blocks.{i}."
        text |= {
            p + "attention_norm.weight": blk.ln_1.weight,
            p + "attention_norm.bias": blk.ln_1.bias,
            p + "attention.qkv.weight": blk.attn.in_proj_weight,
            p + "attention.proj.weight": blk.attn.out_proj.weight,
            p + "attention.proj.bias": blk.attn.out_proj.bias,
            p + "ffn_norm.weight": blk.ln_2.weight,
            p + "ffn_norm.bias": blk.ln_2.bias,
            p + "feed_forward.fc1.weight": blk.mlp.c_fc.weight,
            p + "feed_forward.fc1.bias": blk.mlp.c_fc.bias,
            p + "feed_forward.fc2.weight": blk.mlp.c_proj.weight,
            p + "feed_forward.fc2.bias": blk.mlp.c_proj.bias,
        }
    clone = lambda state: {k: x.detach().clone().contiguous() for k, x in state.items()}  # noqa: E731
    return clone(backbone), clone(head | text)


@pytest.fixture(scope="module")
def source() -> DinoTxtEncoder:
    return randomise(tiny(0))


@pytest.fixture(scope="module")
def files(source, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dinotxt")
    backbone, dinotxt = official_files(source)
    torch.save(backbone, root / "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth")
    torch.save(dinotxt, root / "dinov3_vitl16_dinotxt_vision_head_and_text_encoder-a442d8f5.pth")
    return root / "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth", root / (
        "dinov3_vitl16_dinotxt_vision_head_and_text_encoder-a442d8f5.pth"
    )


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
    enc = tiny()
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
    enc = randomise(tiny())
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
    enc = randomise(tiny())
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
    enc = tiny()
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
    trained = randomise(tiny(), seed=5)  # e.g. SPAR-trained blocks: other weights, non-zero q/v biases
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


# -- the pipeline with the tiny twin ---------------------------------------------------------------------------------


def test_segment_and_features_cli(files, tmp_path, capsys):
    scene_image(50, 70).save(tmp_path / "a.png")
    weights = ["--weights", str(files[0]), "--head-weights", str(files[1])]
    main(
        ["segment", str(tmp_path / "a.png"), *TINY, *weights, "--classes", "sky", "grass", "--out", str(tmp_path / "s")]
    )
    assert (tmp_path / "s" / "a_overlay.png").is_file() and (tmp_path / "s" / "a_labels.png").is_file()
    main(["features", str(tmp_path / "a.png"), *TINY, *weights, "--dtype", "float32", "--out", str(tmp_path / "f")])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "f" / "a.safetensors"), "pt") as fh:
        feats = fh.get_tensor("features")
    assert feats.shape == (1, 32, 4, 5)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["features", str(tmp_path / "a.png"), *TINY, "--weights", str(files[1]), "--head-weights", str(files[0]),
              "--out", str(tmp_path / "g")])  # fmt: skip
    assert exc.value.code == 1 and "is not a DINOv3 backbone file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["features", str(tmp_path / "a.png"), *TINY, "--weights", str(tmp_path / "nowhere.pth"),
              "--head-weights", str(files[1]), "--out", str(tmp_path / "g")])  # fmt: skip
    assert exc.value.code == 1 and "nowhere.pth" in capsys.readouterr().err


def test_quickstart_with_the_twin(tmp_path, capsys):
    main(["quickstart", "--backbone", "dinov3txt", "--no-distill", "--out", str(tmp_path)])
    assert (tmp_path / "overlay_single.png").is_file() and "spar-tiny-dinotxt" in capsys.readouterr().out


def test_eval_module_rows_and_test_run(files, tmp_path):
    import lightning as L

    from spar_pl.evaluate import SegEvalModule
    from spar_pl.segdata import SegDataModule
    from spar_pl.testing import write_tiny_benchmarks

    args = {"backbone": "dinov3txt", "model_name": TINY_NAME, "crop": 64, "classes": "voc20", "results_dir": None}
    pretrained = SegEvalModule(**args, weights=str(files[0]), head_weights=str(files[1]))
    assert pretrained.row == "pretrained, single pass"  # the released backbone is not a SPAR model
    bench = write_tiny_benchmarks(tmp_path / "bench", images=2)
    module = SegEvalModule(**{**args, "results_dir": str(tmp_path), "mode": "sliding"})
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    metrics = trainer.test(module, SegDataModule("voc20", str(bench["voc20"])), verbose=False)[0]
    assert 0.0 <= metrics["test/mIoU"] <= 100.0
    entry = json.loads((tmp_path / "dinov3txt-test.json").read_text())[-1]  # an ad-hoc run, not the table's
    assert entry["row"] == "pretrained, sliding window s=24" and entry["images"] == 2


def test_fit_keeps_the_student_in_eval_mode_and_trains_two_blocks(tmp_path):
    from spar_pl.distill import DistillModule
    from spar_pl.testing import write_sample_images

    write_sample_images(tmp_path / "train", 2, seed=0)
    config = ROOT / "configs" / "distill" / "dinov3txt-tiny.yaml"
    main(["fit", "--config", str(config), "--data.init_args.train_source", str(tmp_path / "train"),
          "--data.init_args.val_source", "null", "--trainer.fast_dev_run", "true",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"])  # fmt: skip
    module = DistillModule(backbone="dinov3txt", model_name=TINY_NAME, pretrained=None, crop=64)
    module.train()
    assert not module.student.model.training and not module.teacher.encoder.training
    assert all(n.startswith(("model.visual.blocks.1.", "model.visual.blocks.2.")) for n in module.trainable_names)
    assert module.on_save_checkpoint(ckpt := {"state_dict": module.state_dict()}) is None
    assert ckpt["state_dict"] and all(k.startswith("student.") for k in ckpt["state_dict"])


@pytest.mark.slow
def test_table_three_rows_with_the_twin(tmp_path):
    from spar_pl.table import table_command

    table = table_command(["--backbone", "dinov3txt", "--tiny", "--results", str(tmp_path)])
    rows = [line for line in table.splitlines() if line.startswith("| ") and "inference" not in line]
    assert [r.split("|")[1].strip() for r in rows] == [
        "pretrained, single pass",
        "pretrained, sliding window s=24",
        "SPAR",
    ]
    assert all(cell.strip() not in ("-", "") for r in rows for cell in r.split("|")[2:10])  # every cell filled
    entries = json.loads((tmp_path / "dinov3txt-tiny.json").read_text())
    assert len(entries) == 18 and {e["config"]["backbone"] for e in entries} == {"dinov3txt"}
