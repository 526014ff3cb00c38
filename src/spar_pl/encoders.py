"""Any-resolution dense encoders over vision-language models: the public entry point :func:`build_encoder`.

Every encoder maps a normalised image batch ``(B, 3, H, W)`` of any size to dense features ``(B, C, h, w)`` in
the text-embedding space, one vector per patch. Each backbone family (:mod:`spar_pl.families`) describes its
vision tower, dense forward, defaults and weight layout once; this module builds a model by the names users give
(an open_clip model name and tag, a paper preset of :data:`BACKBONES`, local files) and wraps it in its family's
encoder. The family follows from the built model's structure unless a backbone is named.

The paper's three backbones, with the exact semantics of the SPAR reference (``docs/method.md`` section 1):

* :class:`MaskCLIPEncoder` (family ``clip``) wraps an open_clip ``VisionTransformer`` CLIP: reference positional
  resize, value path in the last block, ``h = H // p``.
* :class:`SigLIP2Encoder` (family ``siglip``) wraps an open_clip model with a timm SigLIP(2) trunk: padding to a
  multiple of the patch, ``size=(h, w)`` positional resize, attention-pool bypass, ``h = ceil(H / p)``.
* :class:`DinoTxtEncoder` (family ``dinotxt``) runs DINOv3.txt natively on a timm ``Eva`` trunk and an open_clip
  ``TextTransformer``: the image stretched to the next multiple of the patch, final-normed patch tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from spar_pl.families import BACKBONES, Family, backbone_family, families, family_of_model, get_family
from spar_pl.families.base import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LEGACY_MEAN,
    LEGACY_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    DenseEncoder,
)
from spar_pl.families.clip import MaskCLIPEncoder
from spar_pl.families.dinotxt import (
    DINOTXT_ARCHS,
    DINOTXT_FILES,
    DinoTxtEncoder,
    DinoTxtModel,
    build_dinotxt,
    describe_state_dict,
)
from spar_pl.families.siglip import SigLIP2Encoder
from spar_pl.hub import HUB_SCHEMES
from spar_pl.recipes import check_recipe
from spar_pl.weights import load_checkpoint, load_state_strict, read_state_dict

__all__ = [
    "BACKBONES",
    "CLIP_MEAN",
    "CLIP_STD",
    "DINOTXT_ARCHS",
    "DINOTXT_FILES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LEGACY_MEAN",
    "LEGACY_STD",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "DenseEncoder",
    "DinoTxtEncoder",
    "DinoTxtModel",
    "MaskCLIPEncoder",
    "ModelSpec",
    "SigLIP2Encoder",
    "build_dinotxt",
    "build_encoder",
    "describe_state_dict",
    "load_checkpoint",
    "model_spec",
    "read_state_dict",
    "shipped_weights",
    "without_open_clip_random_notice",
]

log = logging.getLogger(__name__)


#: Shipped pretrained weights of tiny models: ``<model name>-<what it learned>.safetensors``.
PRETRAINED_DIR = Path(__file__).parent / "pretrained"


def shipped_weights(model_name: str) -> Path | None:
    """The weights file shipped for a ``spar-tiny-*`` model (``pretrained/<name>-*.safetensors``), or ``None``."""
    if not model_name.startswith("spar-tiny-"):
        return None
    return next(iter(sorted(PRETRAINED_DIR.glob(f"{model_name}-*.safetensors"))), None)


@dataclass(frozen=True)
class ModelSpec:
    """The model: what every entry point's model options name.

    The one description of a model that :func:`build_encoder`, :func:`spar_pl.load`,
    :class:`~spar_pl.distill.DistillModule`, :class:`~spar_pl.evaluate.SegEvalModule`, the demo and the ``spar-cli``
    commands share. Its fields are their model options: keyword arguments in Python, flat keys under
    ``model.init_args`` in configs, ``--backbone``, ``--model-name``, ... on the command line. How a model runs
    (device, precision) is not part of it.

    Args:
        backbone: a paper preset of :data:`BACKBONES` (``maskclip``, ``maskclip-legacy`` (mean = std = 0.5, for
            the authors' legacy MaskCLIP weights), ``siglip2``, ``dinov3txt``) or a family name
            (:func:`spar_pl.families.families`: ``clip``, ``siglip``, ``dinotxt``, ...), whose defaults (model, tag,
            normalisation) apply. ``None``: the family follows from the built model's structure; with no model
            named either, the ``siglip2`` preset.
        model_name: open_clip model name or ``hf-hub:org/repo`` id; defaults to the backbone's model
            (``docs/method.md`` section 1). ``spar-tiny-*`` names build the tiny models (each family's twin, and
            ``spar-tiny-p8``, which loads its shipped weights). An ``hf-hub:ORG/NAME`` or ``local-dir:PATH`` folder
            written by ``spar-cli export --hub-dir`` (:mod:`spar_pl.hub`) loads with the backbone and dense semantics
            of its spar-pl config.
        pretrained: open_clip pretrained tag; ``"default"`` takes the backbone's tag for its default model (a tiny
            model's shipped weights); ``None`` (or ``"none"``) leaves the weights random. Ignored for ``hf-hub:``
            ids. For ``dinov3txt`` only ``None`` matters: it allows the full-size model without weight files. A model
            built without any weights says "random weights" in one logged warning.
        weights: a local open_clip weights file (``.safetensors``, ``.pt``, ``.bin``), for offline use;
            overrides ``pretrained``. For ``dinov3txt``: the DINOv3 ViT-L/16 backbone file
            (``dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth``).
        checkpoint: a SPAR checkpoint loaded strictly over the whole model
            (:func:`spar_pl.weights.load_checkpoint`, never unpickling code): the authors' Lightning ``.ckpt``
            (``segmentor.net.model.`` + the model's keys), a ``spar-cli fit`` checkpoint, a ``spar-cli export``
            file or a plain state dict. The pretrained weights are then not fetched.
        head_weights: ``dinov3txt`` only: the dino.txt file with the vision head and the text tower
            (``dinov3_vitl16_dinotxt_vision_head_and_text_encoder-a442d8f5.pth``).
        dense: the last block's dense recipe (:mod:`spar_pl.recipes`: ``maskclip``, ``sclip``, ``clearclip``,
            ``naclip``) for the open_clip ViT CLIP family (``clip``); ``None`` keeps the family's own dense path
            (MaskCLIP's for ``clip``). Other families have one fixed dense path: a recipe there is an error.

    Raises:
        ValueError: an unknown backbone or dense recipe, or a recipe for a named family it does not apply to (at
            construction, before any work).
    """

    backbone: str | None = None
    model_name: str | None = None
    pretrained: str | None = "default"
    weights: str | None = None
    head_weights: str | None = None
    checkpoint: str | None = None
    dense: str | None = None

    def __post_init__(self) -> None:
        if self.model_name is None and self.backbone is not None and self.backbone.startswith(HUB_SCHEMES):
            # ModelSpec("hf-hub:ORG/NAME"): an exported student, whose spar-pl config sets the backbone
            object.__setattr__(self, "model_name", self.backbone)
            object.__setattr__(self, "backbone", None)
        if isinstance(self.pretrained, str) and self.pretrained.lower() in ("none", "null", ""):
            object.__setattr__(self, "pretrained", None)  # the command line's and configs' spelling of "random"
        family = backbone_family(self.backbone) if self.backbone is not None else None  # unknown: ValueError
        if self.dense is not None:
            check_recipe(self.dense)
            if family is not None:  # a family known before building fails before any work
                check_dense_family(family, self.dense, self.backbone)

    def check_files(self) -> None:
        """``FileNotFoundError`` naming the first weights, head-weights or checkpoint file that does not exist."""
        files = {"checkpoint": self.checkpoint, "weights file": self.weights, "head weights file": self.head_weights}
        for kind, path in files.items():
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{kind} not found: {path}")

    def build(self, device: str | torch.device = "cpu") -> DenseEncoder:
        """The dense encoder this names, on ``device``; a model built without any weights says "random weights" in
        one logged warning.

        Raises:
            ValueError: an open_clip model name or pretrained tag open_clip does not know, a model whose vision tower
                the named backbone's family does not take, a dense recipe for a family it does not apply to, or a
                backbone that contradicts an exported model's config.
            FileNotFoundError: a weights, checkpoint or head-weights file that does not exist (:meth:`check_files`).
            RuntimeError: open_clip could not build the model (the message names it and the weights).
        """
        backbone, model_name, pretrained = self.backbone, self.model_name, self.pretrained
        weights, head_weights, checkpoint, dense = self.weights, self.head_weights, self.checkpoint, self.dense
        self.check_files()
        if model_name is not None and model_name.startswith(HUB_SCHEMES):
            from spar_pl.hub import hub_encoder

            exported = hub_encoder(model_name, device)  # None: an ordinary open_clip model, built below
            if exported is not None:  # a spar-pl export: its spar-pl config sets the backbone and the dense semantics
                if weights is not None or head_weights is not None:
                    raise ValueError(f"{model_name} holds its own weights: drop the weights files")
                if backbone is not None and backbone not in (exported.backbone, exported.family):
                    raise ValueError(
                        f"--backbone {backbone} contradicts {model_name}, exported as {exported.backbone!r} "
                        f"({exported.family} family): drop the backbone"
                    )
                if dense is not None:
                    check_dense_family(get_family(exported.family), dense, model_name)
                    exported.dense = dense
                if checkpoint is not None:
                    load_checkpoint(exported, checkpoint)
                return exported
        if backbone is None and model_name is None:
            backbone = "siglip2"
        family = backbone_family(backbone) if backbone is not None else _builder_family(model_name)
        label = backbone or model_name
        if head_weights is not None and (family is None or family.build is None):
            raise ValueError(f"head_weights is for backbone 'dinov3txt' only, not {label!r}")
        defaults = backbone_defaults(backbone, family)
        if family is not None and family.build is not None:
            name = model_name or defaults["model_name"]
            encoder = family.build(name, pretrained, weights, head_weights, checkpoint is not None)
            encoder.to(device)
            loaded = weights is not None
        else:
            encoder, loaded = _build_open_clip(
                backbone, family, defaults, model_name, pretrained, weights, device, checkpoint
            )
        encoder.backbone = backbone or encoder.family
        if dense is not None:
            check_dense_family(get_family(encoder.family), dense, backbone or encoder.model_name)
            encoder.dense = dense
        if checkpoint is not None:
            load_checkpoint(encoder, checkpoint)
        elif not loaded:
            log.warning(
                "%s: random weights (%s family; no pretrained tag, weights file or checkpoint): features mean "
                "nothing%s",
                encoder.model_name,
                encoder.family,
                _tags_hint(encoder.model_name),
            )
        return encoder


def model_spec(spec: ModelSpec | str | None = None, **fields) -> ModelSpec:
    """A :class:`ModelSpec` from a spec, a backbone name or an ``hf-hub:``/``local-dir:`` id, with ``fields``
    (:class:`ModelSpec`'s field names) set over it."""
    if isinstance(spec, ModelSpec):
        return dataclasses.replace(spec, **fields) if fields else spec
    if spec is not None:
        if fields.get("backbone") is not None:
            raise ValueError(f"two backbones: {spec!r} and backbone={fields['backbone']!r}")
        fields["backbone"] = spec
    return ModelSpec(**fields)


def build_encoder(
    spec: ModelSpec | str | None = None, model_name: str | None = None, *, device: str | torch.device = "cpu", **fields
) -> DenseEncoder:
    """Build a dense encoder the way users name models: ``model_spec(spec, model_name=..., **fields).build(device)``.

    Args:
        spec: a :class:`ModelSpec`, or the backbone (a paper preset of :data:`BACKBONES` or a family name) or an
            ``hf-hub:``/``local-dir:`` id of an exported student.
        model_name: open_clip model name or ``hf-hub:`` id (:attr:`ModelSpec.model_name`).
        device: where to put the model.
        fields: the other :class:`ModelSpec` fields (``pretrained``, ``weights``, ``head_weights``, ``checkpoint``,
            ``dense``).
    """
    if model_name is not None:
        fields["model_name"] = model_name
    return model_spec(spec, **fields).build(device)


def check_dense_family(family: Family, dense: str, label: str) -> None:
    """``ValueError`` unless the dense recipe ``dense`` applies to ``family`` (the open_clip ViT CLIP family);
    ``label`` names the model as the user did."""
    if family.name != "clip":
        raise ValueError(
            f"dense recipe {dense!r} replaces the last block of an open_clip ViT CLIP (family clip), not of "
            f"{label!r} (family {family.name}), which has its own dense path: {family.summary}"
        )


@contextlib.contextmanager
def without_open_clip_random_notice():
    """Drop open_clip's "No pretrained weights loaded" record (a root-logger warning) while it builds a model."""

    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _builder_family(model_name: str) -> Family | None:
    """The family whose own builder knows ``model_name`` (DINOv3.txt), or ``None``: open_clip builds it."""
    return next((f for f in families() if f.build is not None and model_name in f.model_names), None)


def backbone_defaults(backbone: str | None, family: Family | None) -> dict:
    """The default ``model_name`` and ``pretrained`` tag (and, for a preset that sets one, the normalisation) of a
    paper preset, else of ``family``; ``{}`` when neither is known."""
    if backbone in BACKBONES:
        return BACKBONES[backbone]
    if family is None:
        return {}
    return {"model_name": family.default_model, "pretrained": family.default_pretrained}


def _tags_hint(model_name: str) -> str:
    tags = [t for n, t in open_clip.list_pretrained() if n == model_name]
    shown = ", ".join(tags[:5]) + (f", ... ({len(tags)} in all: spar-cli models)" if len(tags) > 5 else "")
    return f"; open_clip's pretrained tags for it: {shown}" if tags else ""


def _build_open_clip(
    backbone: str | None,
    family: Family | None,
    defaults: dict,
    model_name: str | None,
    pretrained: str | None,
    weights: str | Path | None,
    device: str | torch.device,
    checkpoint: str | Path | None,
) -> tuple[DenseEncoder, bool]:
    """The encoder of an open_clip model, and whether weights were loaded (a tag, a hub id or a file)."""
    name = model_name or defaults["model_name"]
    if name.startswith("spar-tiny-"):  # the tiny models register with open_clip and timm when asked for
        from spar_pl.testing import register_tiny_models

        register_tiny_models()
        if pretrained == "default" and weights is None and checkpoint is None:
            weights = shipped_weights(name)
    if pretrained == "default":
        pretrained = defaults.get("pretrained") if name == defaults.get("model_name") else None
    if name.startswith("hf-hub:"):
        pretrained = None  # the hub repo holds config and weights
    weights = Path(weights) if weights is not None else None
    big_vision = weights is not None and weights.suffix in (".npz", ".npy")  # numpy arrays: nothing is unpickled
    state = read_state_dict(weights) if weights is not None and not big_vision else None  # safe, before building
    source = f"weights file {weights}" if weights is not None else f"pretrained={pretrained!r}"
    fetch = weights is None and checkpoint is None
    if not name.startswith(HUB_SCHEMES) and open_clip.get_model_config(name) is None:
        raise ValueError(f"open_clip has no model {name!r}; spar-cli models lists the models each family takes")
    if fetch and pretrained and not Path(pretrained).is_file() and not open_clip.get_pretrained_cfg(name, pretrained):
        known = _tags_hint(name) or "; it has none (--pretrained none: random weights)"
        raise ValueError(f"open_clip has no pretrained tag {pretrained!r} for model {name!r}{known}")
    from spar_pl.offline import check_hub

    check_hub(name, pretrained if fetch else None)  # offline: one line at once, not a minute of retries
    try:
        with without_open_clip_random_notice():  # build_encoder says it once, or loads weights next
            model = open_clip.create_model(
                name, pretrained=pretrained if fetch else None, load_weights=fetch, device=device
            )
        if big_vision:
            open_clip.load_checkpoint(model, str(weights), device=device)
    except Exception as err:
        raise RuntimeError(f"could not build open_clip model {name!r} with {source}: {err}") from err
    detected = family_of_model(model, f"open_clip model {name!r}") if family is None else None
    if family is not None and not family.recognise(model):
        try:
            other = f"; it is a {family_of_model(model).name} model: drop the backbone to use it"
        except ValueError:
            other = ""
        raise ValueError(f"backbone {backbone!r} ({family.name} family) does not take open_clip model {name!r}{other}")
    family = family or detected
    if state is not None:
        _load_open_clip_weights(model, state, weights, name, backbone or family.name)
    try:
        tokenizer, tokenizer_error = open_clip.get_tokenizer(name), None
    except Exception as err:  # e.g. a hub tokenizer offline: dense features need none, text says why it failed
        tokenizer, tokenizer_error = None, f"could not load the tokenizer of {name!r}: {err}"
    # Normalisation: the backbone's own where it sets one (maskclip-legacy); else open_clip's preprocessing config
    # when open_clip knows the weights (a pretrained tag or a hub id: for the paper's models it equals the
    # reference's statistics); else the family's defaults (random or local weights).
    known = getattr(model.visual, "preprocess_cfg", None) if (pretrained or name.startswith("hf-hub:")) else None
    mean = defaults.get("mean") or (known or {}).get("mean")
    std = defaults.get("std") or (known or {}).get("std")
    encoder = family.encoder(model.eval(), tokenizer=tokenizer, mean=mean, std=std)
    encoder.tokenizer_error = tokenizer_error if encoder.tokenizer is None else None
    encoder.model_name = name
    loaded = weights is not None or (fetch and (bool(pretrained) or name.startswith("hf-hub:")))
    return encoder, loaded


def _load_open_clip_weights(
    model: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str, backbone: str
) -> None:
    """Load an open_clip weights file read by :func:`~spar_pl.weights.read_state_dict` strictly into ``model``,
    with the adjustments ``open_clip.load_checkpoint`` makes: text-tower keys in open_clip's custom layout, the
    logit scale and bias in the model's shapes, positional embeddings resized to the model's."""
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    from spar_pl.weights import LAYOUTS, CheckpointError

    prefix = next((p for p in ("segmentor.net.model.", "student.model.") if all(k.startswith(p) for k in state)), None)
    if prefix is not None:
        raise CheckpointError(f"{path} is {LAYOUTS[prefix]}: pass it as the checkpoint (--checkpoint), not as weights")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        target = getattr(model, key, None)
        if key in state and target is not None and state[key].ndim != target.ndim:
            state[key] = state[key].reshape(target.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)

    load_state_strict(model, state, f"weights file {path}", name, backbone)
