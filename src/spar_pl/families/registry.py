"""The backbone-family registry: each family described once, everything else reads the description.

A :class:`Family` says how to recognise its vision tower (in a built open_clip model and in an open_clip model
config), which :class:`~spar_pl.families.base.DenseEncoder` computes its dense features, its default model, tag
and tiny twin, and how its weight files look. Family modules (``spar_pl/families/<name>.py``) call
:func:`register_family` when :mod:`spar_pl.families` imports them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from spar_pl.families.base import DenseEncoder

__all__ = [
    "Family",
    "config_geometry",
    "families",
    "family_of_config",
    "family_of_keys",
    "family_of_model",
    "get_family",
    "register_family",
]


@dataclass(frozen=True)
class Family:
    """One backbone family.

    Args:
        name: short lowercase name (``clip``, ``siglip``, ``dinotxt``); also accepted where a backbone is named.
        encoder: the dense encoder class, ``encoder(model, tokenizer=None, mean=None, std=None)``.
        summary: one line for ``spar-cli models`` and the docs: the towers it takes and its dense forward.
        recognise: whether a built open_clip model (``CLIP`` / ``CustomTextCLIP``) has this family's vision tower.
        recognise_config: whether an open_clip model config (``open_clip.get_model_config(name)``) describes this
            family's vision tower, without building it.
        default_model: the model built when the family is named without a model.
        default_pretrained: the open_clip pretrained tag of ``default_model`` (``None``: none or a hub id).
        tiny_model: the tiny randomly initialised twin (a ``spar-tiny-*`` name) for tests and CPU runs.
        register_tiny: registers what the tiny twin needs beyond its open_clip JSON config (a timm trunk), or
            ``None``; :func:`spar_pl.testing.register_tiny_models` calls it.
        key_fragments: ``(fragment, description)`` pairs: a weight file holding a key containing ``fragment``
            looks like ``description`` (checked across families in :attr:`order`).
        parity: what the tests check exact parity with (a reference implementation or the reference's semantics)
            and where, or ``""`` when nothing is checked.
        build: a builder for models open_clip cannot create, ``build(model_name, pretrained, weights,
            head_weights, has_checkpoint) -> DenseEncoder``; ``None`` builds with ``open_clip.create_model``.
        model_names: the names ``build`` knows (families with a builder only).
        geometry: ``(patch, native size)`` of a model ``build`` knows, without building it (families with a builder
            only; open_clip models take theirs from their config, :func:`config_geometry`).
        release_weights: ``weights=`` names the family's released pretrained files, never a SPAR export.
        order: recognition order, lower first: a more specific recogniser comes before a more general one.
    """

    name: str
    encoder: type[DenseEncoder]
    summary: str
    recognise: Callable[[nn.Module], bool]
    recognise_config: Callable[[dict], bool]
    default_model: str
    default_pretrained: str | None
    tiny_model: str
    register_tiny: Callable[[], None] | None = None
    key_fragments: tuple[tuple[str, str], ...] = ()
    parity: str = ""
    build: Callable[..., DenseEncoder] | None = None
    model_names: tuple[str, ...] = ()
    geometry: Callable[[str], tuple[int, int]] | None = None
    release_weights: bool = False
    order: int = 100


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add a family to the registry (a family module's last statement); returns it.

    Raises:
        ValueError: another family of that name is registered.
    """
    known = _FAMILIES.get(family.name)
    if known is not None and known is not family:
        raise ValueError(f"backbone family {family.name!r} is already registered ({known.encoder.__name__})")
    if family.encoder.family != family.name:
        raise ValueError(f"{family.encoder.__name__}.family is {family.encoder.family!r}, not {family.name!r}")
    _FAMILIES[family.name] = family
    return family


def families() -> list[Family]:
    """Every registered family, in recognition order."""
    return sorted(_FAMILIES.values(), key=lambda f: (f.order, f.name))


def get_family(name: str) -> Family:
    """The family called ``name``.

    Raises:
        ValueError: no such family (the message lists them).
    """
    if name not in _FAMILIES:
        raise ValueError(f"unknown backbone family {name!r}; choose one of {', '.join(f.name for f in families())}")
    return _FAMILIES[name]


def _vision_kind(model: nn.Module) -> str:
    visual = getattr(model, "visual", None)
    trunk = getattr(visual, "trunk", None)
    return type(trunk if trunk is not None else visual).__name__


def family_of_model(model: nn.Module, name: str = "the model") -> Family:
    """The family whose :attr:`Family.recognise` accepts a built model, first in recognition order.

    Raises:
        ValueError: no family recognises the model's vision tower (the message names it and the families).
    """
    for family in families():
        if family.recognise(model):
            return family
    raise ValueError(
        f"no backbone family recognises {name} (vision tower {_vision_kind(model)}); known families: "
        + ", ".join(f"{f.name} ({f.summary})" for f in families())
    )


def family_of_config(cfg: dict) -> Family | None:
    """The family whose :attr:`Family.recognise_config` accepts an open_clip model config, or ``None``."""
    return next((f for f in families() if f.recognise_config(cfg)), None)


def config_geometry(cfg: dict) -> tuple[int | None, int | None]:
    """``(patch, native size)`` of an open_clip model config, without building it: ``vision_cfg``'s ``patch_size``
    or the ``patch<N>`` of its timm model name, and its ``image_size`` (``None`` where the config does not say)."""
    vision = cfg.get("vision_cfg", {})
    patch = vision.get("patch_size")
    if not patch:
        found = re.search(r"patch(\d+)", str(vision.get("timm_model_name", "")))
        patch = int(found.group(1)) if found else None
    size = vision.get("image_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    return (int(patch) if patch else None), (int(size) if size else None)


def family_of_keys(keys: Iterable[str]) -> tuple[Family | None, str]:
    """``(family, description)`` of the backbone a weight file's keys look like (``(None, "an unknown model")``)."""
    keys = list(keys)
    for family in families():
        for fragment, description in family.key_fragments:
            if any(fragment in k for k in keys):
                return family, f"{description}: it holds {fragment}* keys"
    return None, "an unknown model"
