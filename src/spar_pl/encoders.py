"""Any-resolution dense encoders over open_clip vision-language models.

Every encoder maps a normalised image batch ``(B, 3, H, W)`` of any size to dense features
``(B, C, h, w)`` in the text-embedding space, one vector per patch, with the exact semantics of
the SPAR reference implementation (``SPAR.md`` section 1):

* :class:`MaskCLIPEncoder` wraps an open_clip ``VisionTransformer`` CLIP. Positional embeddings are
  resized with ``scale_factor=((h + 0.1) / g, (w + 0.1) / g)`` bicubic interpolation and the last
  block takes the value path only. ``h = H // 16`` (a remainder below one patch is dropped, as the
  patch convolution does).
* :class:`SigLIP2Encoder` wraps an open_clip model with a timm SigLIP(2) trunk. The image is padded
  bottom/right to a multiple of 16, positional embeddings are always resized with ``size=(h, w)``
  bicubic interpolation, and the attention-pool latent query is bypassed (value path only).
  ``h = ceil(H / 16)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from spar_pl.weights import load_checkpoint, read_state_dict, sniff_format

__all__ = [
    "BACKBONES",
    "TINY_MODELS",
    "DenseEncoder",
    "MaskCLIPEncoder",
    "SigLIP2Encoder",
    "build_encoder",
    "load_checkpoint",
    "read_state_dict",
    "spar_tiny_vit_siglip",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

LEGACY_MEAN = (0.5, 0.5, 0.5)
LEGACY_STD = (0.5, 0.5, 0.5)

#: Per backbone: encoder family, default open_clip model name and pretrained tag, normalisation (``SPAR.md``
#: section 1). ``maskclip-legacy`` is MaskCLIP with the reference segmentor's default normalisation (mean = std =
#: 0.5), which the authors' "SPAR MaskCLIP (Legacy)" weights, the paper's MaskCLIP numbers, were trained with;
#: the newer "SPAR MaskCLIP" release uses CLIP's statistics (``maskclip``).
BACKBONES: dict[str, dict] = {
    "maskclip": {"family": "maskclip", "model_name": "ViT-B-16", "pretrained": "laion2b_s34b_b88k"},
    "maskclip-legacy": {
        "family": "maskclip",
        "model_name": "ViT-B-16",
        "pretrained": "laion2b_s34b_b88k",
        "mean": LEGACY_MEAN,
        "std": LEGACY_STD,
    },
    "siglip2": {"family": "siglip2", "model_name": "hf-hub:timm/ViT-B-16-SigLIP2-512", "pretrained": None},
    "dinov3txt": {"family": "dinov3txt", "model_name": "dinov3_vitl16_dinotxt_tet1280d20h24l", "pretrained": None},
}

#: Tiny randomly initialised models for tests, the quickstart and CPU smoke runs.
# (``sl2``, not ``siglip2``: open_clip picks the Gemma tokenizer, a download, for names containing "siglip").
TINY_MODELS = {"maskclip": "spar-tiny-clip", "maskclip-legacy": "spar-tiny-clip", "siglip2": "spar-tiny-sl2"}


@register_model
def spar_tiny_vit_siglip(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A 2-block, 64-wide SigLIP-style timm ViT at 64 px (MAP pool, no class token) for tests."""
    args = {"img_size": 64, "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2}
    args.update(class_token=False, global_pool="map")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm factory bookkeeping
        kwargs.pop(key, None)
    return VisionTransformer(**{**args, **kwargs})


# ``spar-tiny-clip`` (2-block CLIP ViT at 64 px) and ``spar-tiny-sl2`` (the trunk above) build through
# ``open_clip.create_model`` like the real models, so tests exercise the real construction path.
open_clip.add_model_config(Path(__file__).parent / "model_configs")


class DenseEncoder(nn.Module):
    """Base class: a wrapped open_clip model, its tokenizer and normalisation, and dense features.

    Subclasses implement :meth:`forward` and name their parameter groups for :meth:`set_trainable`.

    Args:
        model: a built open_clip model (``CLIP`` or ``CustomTextCLIP``); kept as ``self.model``, so
            state-dict keys are the open_clip keys prefixed by ``model.``.
        tokenizer: the model's tokenizer, needed only to encode text; ``None`` uses open_clip's CLIP BPE
            tokenizer when the text tower has the CLIP vocabulary, else leaves none (dense features need
            none; :meth:`encode_text` then says what to pass).
        mean: per-channel normalisation mean; ``None`` takes the backbone's (``SPAR.md`` section 1).
        std: per-channel normalisation std; ``None`` takes the backbone's.
    """

    model_name: str = "custom"  # set by build_encoder; a wrapped model is "custom"
    backbone: str | None = None  # set by build_encoder (BACKBONES key); names the family in error messages
    default_mean: tuple[float, float, float] = CLIP_MEAN
    default_std: tuple[float, float, float] = CLIP_STD

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.mean = tuple(mean or self.default_mean)
        self.std = tuple(std or self.default_std)
        self.tokenizer = tokenizer if tokenizer is not None else self._default_tokenizer()
        self.tokenizer_error: str | None = None  # why build_encoder could not load the tokenizer, if it could not

    # -- geometry -------------------------------------------------------------------------------
    patch_size: int = 16

    @property
    def embed_dim(self) -> int:
        """Channels of the dense features (the text-embedding size)."""
        raise NotImplementedError

    @property
    def native_size(self) -> int:
        """Pretraining image side in pixels (the natural sliding-window crop)."""
        size = getattr(self.model.visual, "image_size", 224)
        return int(size[0] if isinstance(size, Sequence) else size)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Feature-grid size for an input of ``height x width`` pixels."""
        return height // self.patch_size, width // self.patch_size

    # -- text -----------------------------------------------------------------------------------
    def _default_tokenizer(self):
        text = getattr(self.model, "text", self.model)  # CustomTextCLIP keeps its text tower in .text
        vocab = getattr(text, "vocab_size", None)
        if vocab == 49408:
            return open_clip.SimpleTokenizer(context_length=int(self.model.context_length))
        return None

    def encode_text(self, texts: Sequence[str] | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text embeddings ``(N, C)`` for strings or already tokenized ids.

        Raises:
            ValueError: strings were given and the encoder has no tokenizer.
        """
        if not isinstance(texts, torch.Tensor):
            if self.tokenizer is None:
                reason = f" ({self.tokenizer_error})" if self.tokenizer_error else ""
                raise ValueError(
                    f"{type(self).__name__} of {self.model_name!r} has no tokenizer{reason}: text needs one; pass "
                    "tokenizer=open_clip.get_tokenizer(model_name) when wrapping a model (dense features need none)"
                )
            texts = self.tokenizer(list(texts))
        device = next(self.model.parameters()).device
        return self.model.encode_text(texts.to(device), normalize=normalize)

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a checkpoint's model keys (layout prefix removed) to ``self.model``'s; open_clip models: as they are."""
        return state

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map images in ``[0, 1]`` to the model's normalised input space."""
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std

    # -- trainable parameters -------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks of the vision tower, in order."""
        raise NotImplementedError

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named groups for trainable-parameter specs besides ``blk_<i>`` and ``all``."""
        raise NotImplementedError

    def trainable_parameters(self, spec: str) -> dict[str, nn.Parameter]:
        """Parameters of the vision tower selected by a spec string.

        The spec is a comma-separated list of ``all`` (every vision-tower parameter), ``blk_<i>``
        (transformer block ``i``, Python indexing: ``blk_-1`` is the last), ``posembed``,
        ``patchembed`` and ``head`` (final norm and projection / attention pool), or ``none``.
        """
        visual = self.model.visual
        names = {id(p): f"model.visual.{n}" for n, p in visual.named_parameters()}
        groups = self.parameter_groups()
        chosen: dict[int, nn.Parameter] = {}
        for token in (t.strip() for t in spec.split(",")):
            if token == "all":
                params: Iterable[nn.Parameter] = visual.parameters()
            elif token == "none" or token == "":
                params = []
            elif token.startswith("blk_"):
                try:
                    params = self.blocks[int(token[4:])].parameters()
                except (ValueError, IndexError):
                    raise ValueError(
                        f"trainable spec {spec!r}: {token!r} does not name one of the {len(self.blocks)} blocks"
                    ) from None
            elif token in groups:
                params = groups[token]
            else:
                raise ValueError(
                    f"trainable spec {spec!r}: unknown item {token!r}; use all, none, blk_<i>, {', '.join(groups)}"
                )
            chosen.update((id(p), p) for p in params)
        unused = {id(p) for p in self.unused_parameters()}
        return {names[i]: p for i, p in chosen.items() if i not in unused}

    def unused_parameters(self) -> list[nn.Parameter]:
        """Vision-tower parameters the dense path never uses: never trainable (DDP would wait for their grads)."""
        return []

    def set_trainable(self, spec: str) -> list[str]:
        """Freeze the whole model, then unfreeze the parameters the spec selects; returns their names."""
        selected = self.trainable_parameters(spec)
        self.model.requires_grad_(False)
        for p in selected.values():
            p.requires_grad_(True)
        return sorted(selected)


class MaskCLIPEncoder(DenseEncoder):
    """MaskCLIP dense features from an open_clip ViT CLIP (value path in the last block)."""

    default_mean = CLIP_MEAN
    default_std = CLIP_STD

    def __init__(self, model: nn.Module, tokenizer=None, mean=None, std=None) -> None:
        visual = getattr(model, "visual", None)
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise TypeError(f"MaskCLIPEncoder needs an open_clip ViT CLIP, got a vision tower {type(visual).__name__}")
        last = visual.transformer.resblocks[-1]
        if not isinstance(getattr(last, "attn", None), nn.MultiheadAttention):
            raise TypeError("MaskCLIPEncoder supports blocks with nn.MultiheadAttention (standard open_clip ViTs)")
        super().__init__(model, tokenizer, mean, std)
        self.patch_size = int(visual.conv1.kernel_size[0])

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.proj.shape[1])

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.visual.transformer.resblocks

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        v = self.model.visual
        return {
            "posembed": [v.positional_embedding],
            "patchembed": list(v.conv1.parameters()),
            "head": [*v.ln_post.parameters(), v.proj],
        }

    def positional_embedding(self, h: int, w: int) -> torch.Tensor:
        """Positional embedding ``(1 + h * w, D)`` for an ``h x w`` patch grid (reference resize rule)."""
        pos = self.model.visual.positional_embedding
        if pos.shape[0] == h * w + 1 and h == w:
            return pos
        g = math.isqrt(pos.shape[0] - 1)
        grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(
            grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic", align_corners=False, antialias=False
        )
        grid = grid.reshape(pos.shape[1], h * w).T
        return torch.cat([pos[:1], grid], dim=0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Dense features ``(B, C, H // p, W // p)`` of a normalised image batch."""
        v = self.model.visual
        b, _, height, width = images.shape
        h, w = self.grid_size(height, width)
        if h == 0 or w == 0:
            raise ValueError(f"image {height}x{width} is smaller than one {self.patch_size}px patch")
        x = v.conv1(images.to(v.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding(h, w).to(x.dtype)
        x = v.ln_pre(v.patch_dropout(x))
        batch_first = getattr(v.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for blk in self.blocks[:-1]:
            x = blk(x)
        if not batch_first:
            x = x.transpose(0, 1)
        x = self._value_block(self.blocks[-1], x)
        x = v.ln_post(x) @ v.proj
        return x[:, 1:].reshape(b, h, w, -1).permute(0, 3, 1, 2)

    @staticmethod
    def _value_block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The last block with attention replaced by its value projection (MaskCLIP)."""
        attn: nn.MultiheadAttention = blk.attn
        dim = x.shape[-1]
        value = F.linear(blk.ln_1(x), attn.in_proj_weight[2 * dim :], attn.in_proj_bias[2 * dim :])
        x = x + blk.ls_1(attn.out_proj(value))
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


class SigLIP2Encoder(DenseEncoder):
    """SigLIP2 dense features from an open_clip model with a timm trunk (attention-pool bypass)."""

    default_mean = SIGLIP_MEAN
    default_std = SIGLIP_STD

    def __init__(self, model: nn.Module, tokenizer=None, mean=None, std=None) -> None:
        trunk = getattr(getattr(model, "visual", None), "trunk", None)
        if trunk is None or getattr(trunk, "attn_pool", None) is None:
            raise TypeError("SigLIP2Encoder needs an open_clip model whose vision tower is a timm ViT with a MAP pool")
        if getattr(trunk, "cls_token", None) is not None or getattr(trunk, "reg_token", None) is not None:
            raise TypeError("SigLIP2Encoder expects a trunk without class or register tokens (SigLIP)")
        super().__init__(model, tokenizer, mean, std)
        self.patch_size = int(trunk.patch_embed.proj.kernel_size[0])

    @property
    def embed_dim(self) -> int:
        head = [m for m in self.model.visual.head.modules() if isinstance(m, nn.Linear)]
        return int(head[-1].out_features) if head else int(self.model.visual.trunk.embed_dim)

    @property
    def blocks(self) -> nn.Sequential:
        return self.model.visual.trunk.blocks

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return math.ceil(height / self.patch_size), math.ceil(width / self.patch_size)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        t = self.model.visual.trunk
        return {
            "posembed": [t.pos_embed],
            "patchembed": list(t.patch_embed.parameters()),
            "head": [*t.norm.parameters(), *t.attn_pool.parameters(), *self.model.visual.head.parameters()],
        }

    def unused_parameters(self) -> list[nn.Parameter]:
        pool = self.model.visual.trunk.attn_pool  # the bypass skips the latent query and its projection
        return [pool.latent, *pool.q.parameters(), *pool.q_norm.parameters(), *pool.k_norm.parameters()]

    def positional_embedding(self, h: int, w: int) -> torch.Tensor:
        """Positional embedding ``(1, h * w, D)``, always bicubic-resized to ``size=(h, w)``."""
        pos = self.model.visual.trunk.pos_embed
        g = math.isqrt(pos.shape[1])
        grid = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=False)
        return grid.flatten(2).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Dense features ``(B, C, ceil(H / p), ceil(W / p))`` of a normalised image batch."""
        t = self.model.visual.trunk
        b, _, height, width = images.shape
        h, w = self.grid_size(height, width)
        p = self.patch_size
        x = F.pad(images, (0, w * p - width, 0, h * p - height))
        x = t.patch_embed.proj(x.to(t.patch_embed.proj.weight.dtype)).flatten(2).transpose(1, 2)
        x = t.patch_embed.norm(x)
        x = t.pos_drop(x + self.positional_embedding(h, w).to(x.dtype))
        x = t.norm(t.blocks(t.norm_pre(t.patch_drop(x))))
        pool = t.attn_pool
        x = pool.kv(x)[..., x.shape[-1] :]
        x = pool.proj_drop(pool.proj(x))
        x = x + pool.mlp(pool.norm(x))
        x = self.model.visual.head(x)
        return x.reshape(b, h, w, -1).permute(0, 3, 1, 2)


ENCODERS: dict[str, type[DenseEncoder]] = {"maskclip": MaskCLIPEncoder, "siglip2": SigLIP2Encoder}


def build_encoder(
    backbone: str = "siglip2",
    model_name: str | None = None,
    pretrained: str | None = "default",
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    checkpoint: str | Path | None = None,
) -> DenseEncoder:
    """Build a dense encoder the way users name models.

    Args:
        backbone: a :data:`BACKBONES` key: ``maskclip``, ``maskclip-legacy`` (mean = std = 0.5, for the
            authors' legacy MaskCLIP weights), ``siglip2`` or ``dinov3txt`` (not available yet).
        model_name: open_clip model name or ``hf-hub:org/repo`` id; defaults to the backbone's model
            (``SPAR.md`` section 1). ``spar-tiny-clip`` / ``spar-tiny-sl2`` build tiny random models.
        pretrained: open_clip pretrained tag; ``"default"`` takes the backbone's tag for its default
            model, ``None`` leaves the weights random. Ignored for ``hf-hub:`` ids.
        weights: a local open_clip weights file (``.safetensors``, ``.pt``, ``.bin``), for offline use;
            overrides ``pretrained``.
        device: where to put the model.
        checkpoint: a SPAR checkpoint loaded strictly over the whole model
            (:func:`spar_pl.weights.load_checkpoint`, never unpickling code): the authors' Lightning ``.ckpt``
            (``segmentor.net.model.`` + open_clip keys), a ``spar-cli fit`` checkpoint, a ``spar-cli export``
            file or a plain state dict. The pretrained weights are then not fetched.
    """
    if backbone == "dinov3txt":
        raise NotImplementedError(
            "backbone 'dinov3txt' is not available yet: it needs a local facebookresearch/dinov3 checkout and "
            "its dino.txt weight files; use 'maskclip' or 'siglip2'"
        )
    if backbone not in BACKBONES or BACKBONES[backbone]["family"] not in ENCODERS:
        choices = ", ".join(k for k, v in BACKBONES.items() if v["family"] in ENCODERS)
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {choices}")
    defaults = BACKBONES[backbone]
    name = model_name or defaults["model_name"]
    if pretrained == "default":
        pretrained = defaults["pretrained"] if name == defaults["model_name"] else None
    if name.startswith("hf-hub:"):
        pretrained = None  # the hub repo holds config and weights
    for path in (weights, checkpoint):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"weights file for model {name!r} not found: {path}")
    weights = Path(weights) if weights is not None else None
    if weights is not None and weights.suffix not in (".npz", ".npy"):
        sniff_format(weights)  # "not a checkpoint" for an image or random bytes; open_clip reads weights_only=True
    source = f"weights file {weights}" if weights is not None else f"pretrained={pretrained!r}"
    fetch = weights is None and checkpoint is None
    try:
        model = open_clip.create_model(
            name, pretrained=pretrained if fetch else None, load_weights=fetch, device=device
        )
        if weights is not None:
            open_clip.load_checkpoint(model, str(weights), device=device)
    except Exception as err:
        raise RuntimeError(f"could not build open_clip model {name!r} with {source}: {err}") from err
    try:
        tokenizer, tokenizer_error = open_clip.get_tokenizer(name), None
    except Exception as err:  # e.g. a hub tokenizer offline: dense features need none, text says why it failed
        tokenizer, tokenizer_error = None, f"could not load the tokenizer of {name!r}: {err}"
    encoder = ENCODERS[defaults["family"]](
        model.eval(), tokenizer=tokenizer, mean=defaults.get("mean"), std=defaults.get("std")
    )
    encoder.tokenizer_error = tokenizer_error if encoder.tokenizer is None else None
    encoder.model_name, encoder.backbone = name, backbone
    if checkpoint is not None:
        load_checkpoint(encoder, checkpoint)
    return encoder
