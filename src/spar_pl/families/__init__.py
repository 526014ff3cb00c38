"""Backbone families: each described once (:class:`~spar_pl.families.registry.Family`), read by everything else.

Every module of this package other than ``base`` and ``registry`` is a family module, imported here, that
registers its family: adding a backbone family is one module (``docs/backbones.md``). The paper's named
configurations (``maskclip``, ``maskclip-legacy``, ``siglip2``, ``dinov3txt``) are presets over these families
(:data:`BACKBONES`).
"""

from __future__ import annotations

import importlib
import pkgutil

from spar_pl.families.base import LEGACY_MEAN, LEGACY_STD, DenseEncoder
from spar_pl.families.registry import (
    Family,
    config_geometry,
    families,
    family_of_config,
    family_of_keys,
    family_of_model,
    get_family,
    register_family,
)

__all__ = [
    "BACKBONES",
    "DenseEncoder",
    "Family",
    "backbone_family",
    "backbone_names",
    "config_geometry",
    "families",
    "family_of_config",
    "family_of_keys",
    "family_of_model",
    "get_family",
    "register_family",
]

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in ("base", "registry") and not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")

#: The paper's named configurations (``docs/method.md`` section 1): a family, its default open_clip model name and
#: pretrained tag, and (where the preset sets one) its normalisation. ``maskclip-legacy`` is MaskCLIP with the
#: reference segmentor's default normalisation (mean = std = 0.5), which the authors' "SPAR MaskCLIP (Legacy)"
#: weights, the paper's MaskCLIP numbers, were trained with; the "SPAR MaskCLIP" release uses CLIP's statistics.
BACKBONES: dict[str, dict] = {
    "maskclip": {"family": "clip", "model_name": "ViT-B-16", "pretrained": "laion2b_s34b_b88k"},
    "maskclip-legacy": {
        "family": "clip",
        "model_name": "ViT-B-16",
        "pretrained": "laion2b_s34b_b88k",
        "mean": LEGACY_MEAN,
        "std": LEGACY_STD,
    },
    "siglip2": {"family": "siglip", "model_name": "hf-hub:timm/ViT-B-16-SigLIP2-512", "pretrained": None},
    "dinov3txt": {"family": "dinotxt", "model_name": "dinov3_vitl16_dinotxt_tet1280d20h24l", "pretrained": None},
}


def backbone_family(backbone: str) -> Family:
    """The family of a backbone name: a preset of :data:`BACKBONES` or a family name.

    Raises:
        ValueError: neither (the message lists both).
    """
    if backbone in BACKBONES:
        return get_family(BACKBONES[backbone]["family"])
    try:
        return get_family(backbone)
    except ValueError:
        names = [*BACKBONES, *(f.name for f in families())]
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(names)}") from None


def backbone_names() -> list[str]:
    """Every name a backbone may be given as: the presets, then the family names."""
    return [*BACKBONES, *(f.name for f in families() if f.name not in BACKBONES)]
