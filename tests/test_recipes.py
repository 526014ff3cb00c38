"""Dense recipes (spar_pl.recipes) on a tiny CLIP against a plain re-implementation of their definitions.

The reference below is written from the definitions (``docs/method.md`` section "Dense recipes"), token by token
and head by head with explicit softmaxes and loops over grid positions, independently of ``spar_pl.recipes``.
"""

from __future__ import annotations

import math

import pytest
import torch

from spar_pl.encoders import MaskCLIPEncoder, build_encoder
from spar_pl.recipes import RECIPES, neighbourhood_prior


def _tiny(dense: str = "maskclip", seed: int = 0) -> MaskCLIPEncoder:
    torch.manual_seed(seed)
    encoder = build_encoder("maskclip", "spar-tiny-clip", pretrained=None, dense=dense)
    with torch.no_grad():  # sharper attention than the random init, so that the recipes differ clearly
        for blk in encoder.blocks:
            blk.attn.in_proj_weight.mul_(4)
            blk.attn.in_proj_bias.normal_(0, 0.1)
        encoder.model.visual.positional_embedding.mul_(5)
    return encoder.eval()


def reference_features(encoder: MaskCLIPEncoder, image: torch.Tensor, recipe: str) -> torch.Tensor:
    """Dense features ``(C, h, w)`` of one image ``(3, H, W)`` from the recipes' table, written out plainly."""
    v = encoder.model.visual
    p = v.conv1.kernel_size[0]
    h, w = image.shape[1] // p, image.shape[2] // p
    patches = [
        (v.conv1.weight * image[:, i * p : (i + 1) * p, j * p : (j + 1) * p]).sum((1, 2, 3))
        for i in range(h)
        for j in range(w)
    ]
    x = torch.stack([v.class_embedding, *patches]) + encoder.positional_embedding(h, w)
    x = v.ln_pre(x)[None]
    for blk in encoder.blocks[:-1]:
        x = blk(x)
    x = x[0]
    blk = encoder.blocks[-1]
    attn = blk.attn
    dim, heads = x.shape[-1], attn.num_heads
    hd = dim // heads
    y = blk.ln_1(x)
    wq, wk, wv = attn.in_proj_weight.split(dim)
    bq, bk, bv = attn.in_proj_bias.split(dim)
    q, k, val = y @ wq.T + bq, y @ wk.T + bk, y @ wv.T + bv
    n = x.shape[0]

    def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
        e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        return e / e.sum(dim=1, keepdim=True)

    omega = torch.zeros(n, n)
    for a in range(1, n):
        for b in range(1, n):
            (ya, xa), (yb, xb) = divmod(a - 1, w), divmod(b - 1, w)
            omega[a, b] = math.exp(-((ya - yb) ** 2 + (xa - xb) ** 2) / (2 * 5.0**2))
    outs = []
    for head in range(heads):
        sl = slice(head * hd, (head + 1) * hd)
        qh, kh, vh = q[:, sl], k[:, sl], val[:, sl]
        s = hd**-0.5
        if recipe == "maskclip":
            weights = torch.eye(n)
        elif recipe == "sclip":
            weights = softmax_rows(qh @ qh.T * s) + softmax_rows(kh @ kh.T * s)
        elif recipe == "clearclip":
            weights = softmax_rows(qh @ qh.T * s)
        else:
            weights = softmax_rows(kh @ kh.T * s + omega)
        outs.append(weights @ vh)
    out = attn.out_proj(torch.cat(outs, dim=1))
    if recipe in ("maskclip", "sclip"):
        x = x + out
        x = x + blk.mlp(blk.ln_2(x))
    else:
        x = out
    feats = v.ln_post(x) @ v.proj
    return feats[1:].T.reshape(-1, h, w)


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_recipe_matches_plain_definition(recipe, size):
    encoder = _tiny(recipe)
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = encoder(image)[0]
        want = reference_features(encoder, image[0], recipe)
        baseline = _tiny("maskclip")(image)[0]
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    if recipe != "maskclip":  # the perturbed weights make every recipe visibly different from MaskCLIP
        assert (got - baseline).norm() > 0.05 * baseline.norm()


def test_maskclip_default_is_bit_identical():
    image = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    default, explicit = _tiny(), _tiny("maskclip")
    assert default.dense == "maskclip"
    with torch.no_grad():
        assert torch.equal(default(image), explicit(image))


def test_neighbourhood_prior_values():
    omega = neighbourhood_prior(2, 3, std=2.0)
    assert omega.shape == (7, 7)
    assert torch.all(omega[0] == 0) and torch.all(omega[:, 0] == 0)
    assert torch.allclose(omega[1:, 1:].diagonal(), torch.ones(6))
    # patches (0, 0) and (1, 2): squared distance 1 + 4
    assert omega[1, 6].item() == pytest.approx(math.exp(-5 / 8))


def test_recipe_on_other_family_is_an_error():
    with pytest.raises(ValueError, match="siglip2.*attention.pool"):
        build_encoder("siglip2", "spar-tiny-sl2", pretrained=None, dense="naclip")
    with pytest.raises(ValueError, match="dinov3txt"):
        build_encoder("dinov3txt", "spar-tiny-dinotxt", pretrained=None, dense="sclip")
    with pytest.raises(ValueError, match="unknown dense recipe 'gem'"):
        build_encoder("maskclip", "spar-tiny-clip", pretrained=None, dense="gem")


@pytest.mark.parametrize("recipe", ["clearclip", "naclip"])
def test_attention_only_recipes_train_what_they_use(recipe):
    encoder = _tiny(recipe)
    names = encoder.set_trainable("blk_-1")
    last = f"model.visual.transformer.resblocks.{len(encoder.blocks) - 1}."
    assert f"{last}attn.in_proj_weight" in names and f"{last}attn.out_proj.weight" in names
    assert f"{last}ln_1.weight" in names
    assert not any(n.startswith(f"{last}mlp.") or n.startswith(f"{last}ln_2.") for n in names)
    # every trainable parameter gets a gradient (DDP would wait forever for one that does not)
    encoder(torch.randn(1, 3, 64, 64)).square().mean().backward()
    for name, param in encoder.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name


def test_cli_dense_on_another_family_is_one_line(tmp_path, capsys):
    from PIL import Image

    from spar_pl.cli import main

    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (90, 120, 200)).save(image)
    args = ["segment", str(image), "--classes", "sky", "grass", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--backbone", "siglip2", "--model-name", "spar-tiny-sl2", "--dense", "naclip"])
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dense recipe 'naclip'" in err[0] and "siglip2" in err[0]
    main([*args, "--backbone", "maskclip", "--model-name", "spar-tiny-clip", "--dense", "naclip"])
    assert (tmp_path / "out" / "a_labels.png").is_file()
