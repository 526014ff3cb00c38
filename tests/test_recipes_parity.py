"""Opt-in parity of the dense recipes with the official code of SCLIP, ClearCLIP and NACLIP.

Each test is skipped unless an environment variable points to a local checkout of the method's repository:
``SPAR_SCLIP_REPO`` (wangf3014/SCLIP), ``SPAR_CLEARCLIP_REPO`` (mc-lan/ClearCLIP), ``SPAR_NACLIP_REPO``
(sinahmr/NACLIP). Their model code is imported from the checkout (never copied into the project), built from the
same random ``ViT-B-16-quickgelu`` weights as the recipe under test, and both dense features are compared at 224x224
and at 448x336 (positional-embedding resize included): relative error at most 1e-4.

Shims, all here: ``torchvision`` (imported by their modules, unused by the code compared) is stubbed when absent;
ClearCLIP's vendored ``open_clip`` is loaded under another package name (it would clash with the real one) without
its ``__init__`` (which imports the training and hub code).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import open_clip
import pytest
import torch

from spar_pl.encoders import MaskCLIPEncoder

SIZES = [(224, 224), (448, 336)]
TOLERANCE = 1e-4


def _stub_torchvision(monkeypatch) -> None:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        tv = types.ModuleType("torchvision")
        transforms = types.ModuleType("torchvision.transforms")
        functional = types.ModuleType("torchvision.transforms.functional")
        ops = types.ModuleType("torchvision.ops")
        misc = types.ModuleType("torchvision.ops.misc")
        misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
        tv.transforms, transforms.functional, tv.ops, ops.misc = transforms, functional, ops, misc
        for name, module in {
            "torchvision": tv,
            "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional,
            "torchvision.ops": ops,
            "torchvision.ops.misc": misc,
        }.items():
            monkeypatch.setitem(sys.modules, name, module)


def _load_module(name: str, path: Path, monkeypatch, package_dir: Path | None = None) -> types.ModuleType:
    """Import ``path`` as module ``name`` (inside a synthetic package rooted at ``package_dir`` when given)."""
    if package_dir is not None:
        package = name.rsplit(".", 1)[0]
        pkg = types.ModuleType(package)
        pkg.__path__ = [str(package_dir)]
        monkeypatch.setitem(sys.modules, package, pkg)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def _repo(var: str) -> Path:
    return Path(os.environ[var])


def shared_weights(seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """An open_clip ViT-B-16-quickgelu with random weights, perturbed so the recipes clearly differ, rounded to
    float16-representable values (the official builders cast to float16); the model and its state dict."""
    torch.manual_seed(seed)
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    state = model.state_dict()
    gen = torch.Generator().manual_seed(seed + 1)
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        if key.startswith("visual.") and ("in_proj_weight" in key or "positional_embedding" in key):
            value = value * 2 + 0.02 * torch.randn(value.shape, generator=gen)  # sharper attention, varied positions
        elif key.startswith("visual.") and key.endswith("bias"):
            value = value + 0.05 * torch.randn(value.shape, generator=gen)
        state[key] = value.half().float()
    model.load_state_dict(state)
    return model, state


def ours(model: torch.nn.Module, dense: str, image: torch.Tensor) -> torch.Tensor:
    """Our dense features ``(B, h * w, C)`` of a normalised image."""
    with torch.no_grad():
        feats = MaskCLIPEncoder(model, dense=dense)(image)
    return feats.flatten(2).transpose(1, 2)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def images() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(1, 3, h, w, generator=gen) for h, w in SIZES]


def _check(name: str, reference, model: torch.nn.Module, dense: str) -> list[float]:
    errors = []
    for image in images():
        with torch.no_grad():
            theirs = reference(image).float()
        mine = ours(model, dense, image)
        assert mine.shape == theirs.shape
        errors.append(relative_error(mine, theirs))
        # the recipes must differ clearly on these weights, or the comparison proves little
        assert relative_error(ours(model, "maskclip", image), theirs) > 0.1
    print(f"{name}: relative errors at {SIZES}: {[f'{e:.2e}' for e in errors]}")
    assert max(errors) <= TOLERANCE, errors
    return errors


def _official_clip(var: str, monkeypatch, state: dict[str, torch.Tensor], name: str):
    """The official ``clip/model.py`` of SCLIP or NACLIP, its CLIP built from ``state`` and cast back to float32."""
    _stub_torchvision(monkeypatch)
    module = _load_module(f"{name}_clip_model", _repo(var) / "clip" / "model.py", monkeypatch)
    return module.build_model({k: v.clone() for k, v in state.items()}).float().eval()


@pytest.mark.skipif(not os.environ.get("SPAR_SCLIP_REPO"), reason="set SPAR_SCLIP_REPO to a wangf3014/SCLIP checkout")
def test_sclip_matches_official(monkeypatch):
    model, state = shared_weights()
    clip = _official_clip("SPAR_SCLIP_REPO", monkeypatch, state, "sclip")
    _check("sclip", lambda x: clip.encode_image(x, return_all=True, csa=True)[:, 1:], model, "sclip")


@pytest.mark.skipif(not os.environ.get("SPAR_NACLIP_REPO"), reason="set SPAR_NACLIP_REPO to a sinahmr/NACLIP checkout")
def test_naclip_matches_official(monkeypatch):
    model, state = shared_weights()
    clip = _official_clip("SPAR_NACLIP_REPO", monkeypatch, state, "naclip")
    clip.visual.set_params("reduced", "naclip", 5.0)  # NACLIP's defaults (naclip.py)
    _check("naclip", lambda x: clip.encode_image(x, return_all=True)[:, 1:], model, "naclip")


@pytest.mark.skipif(
    not os.environ.get("SPAR_CLEARCLIP_REPO"), reason="set SPAR_CLEARCLIP_REPO to a mc-lan/ClearCLIP checkout"
)
def test_clearclip_matches_official(monkeypatch):
    model, state = shared_weights()
    _stub_torchvision(monkeypatch)
    root = _repo("SPAR_CLEARCLIP_REPO") / "open_clip"
    transformer = _load_module("clearclip_open_clip.transformer", root / "transformer.py", monkeypatch, root)
    cfg = model.visual
    visual = transformer.VisionTransformer(
        image_size=224,
        patch_size=16,
        width=768,
        layers=12,
        heads=12,
        mlp_ratio=4.0,
        output_dim=512,
        act_layer=transformer.QuickGELU,
    )
    visual.load_state_dict({k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")})
    visual.eval()
    assert visual.transformer.resblocks[-1].attn.num_heads == cfg.transformer.resblocks[-1].attn.num_heads
    # ClearCLIP's method: encode_image(x, 'ClearCLIP', ignore_residual=True) -> visual(x, 'ClearCLIP', True)
    _check("clearclip", lambda x: visual(x, model_type="ClearCLIP", ignore_residual=True), model, "clearclip")
