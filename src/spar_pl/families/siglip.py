"""SigLIP and SigLIP2 models with a timm trunk inside open_clip, of every size, patch 14 and 16: dense features with
the attention-pool latent query bypassed (value path only).

The image is padded bottom/right to a multiple of the patch, positional embeddings are always resized with
``size=(h, w)`` bicubic interpolation, ``h = ceil(H / p)``. ``docs/method.md`` section 1.
"""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from spar_pl.families.base import SIGLIP_MEAN, SIGLIP_STD, DenseEncoder
from spar_pl.families.registry import Family, register_family

__all__ = ["FAMILY", "SigLIP2Encoder"]


class SigLIP2Encoder(DenseEncoder):
    """SigLIP2 dense features from an open_clip model with a timm trunk (attention-pool bypass)."""

    family = "siglip"
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
        """Positional embedding ``(1, h * w, D)``, bicubic-resized to ``size=(h, w)`` without antialiasing (the
        reference's rule; timm's ``resample_abs_pos_embed`` computes it, and returns the grid as it is at its own
        size, where the bicubic resize is the identity). Bit-equal to the reference for float32 weights, which
        every mixed-precision run keeps; half-precision weights (``16-true``, ``bf16-true``) are resized in float32
        and rounded once, where the reference resizes in half precision (differences up to one half-precision
        step)."""
        pos = self.model.visual.trunk.pos_embed
        return resample_abs_pos_embed(pos, [h, w], num_prefix_tokens=0, interpolation="bicubic", antialias=False)

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


def _tiny_trunk(patch_size: int):
    def build(pretrained: bool = False, **kwargs) -> timm.models.vision_transformer.VisionTransformer:
        args = {"img_size": 64, "patch_size": patch_size, "embed_dim": 64, "depth": 2, "num_heads": 2}
        args.update(class_token=False, global_pool="map")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm factory bookkeeping
            kwargs.pop(key, None)
        return timm.models.vision_transformer.VisionTransformer(**{**args, **kwargs})

    build.__name__ = "spar_tiny_vit_siglip" + ("" if patch_size == 16 else f"_p{patch_size}")
    build.__doc__ = f"A 2-block, 64-wide SigLIP-style timm ViT at 64 px, patch {patch_size} (MAP pool, no class token)."
    return build


def register_tiny() -> None:
    """Register the tiny SigLIP-style timm trunks (patch 16: ``spar-tiny-sl2``; patch 14 at 64 px, a size the patch
    does not divide: ``spar-tiny-sl2-p14``) with timm, once."""
    for patch in (16, 14):
        trunk = _tiny_trunk(patch)
        if not timm.is_model(trunk.__name__):
            timm.models.register_model(trunk)


def _recognise(model: nn.Module) -> bool:
    """A timm ``VisionTransformer`` trunk with a MAP attention pool and neither class nor register tokens."""
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if not isinstance(trunk, timm.models.vision_transformer.VisionTransformer):
        return False
    tokens = getattr(trunk, "cls_token", None) is not None or getattr(trunk, "reg_token", None) is not None
    return getattr(trunk, "attn_pool", None) is not None and not tokens


def _recognise_config(cfg: dict) -> bool:
    """An open_clip config whose vision tower is a timm SigLIP ViT (``vit_*_siglip_*``) with the MAP pool."""
    vision = cfg.get("vision_cfg", {})
    name = str(vision.get("timm_model_name", ""))
    return "siglip" in name and "naflex" not in name and vision.get("timm_pool", "map") == "map"


FAMILY = register_family(
    Family(
        name="siglip",
        encoder=SigLIP2Encoder,
        summary="SigLIP / SigLIP2 timm ViT trunk (MAP pool): attention-pool value bypass",
        recognise=_recognise,
        recognise_config=_recognise_config,
        default_model="hf-hub:timm/ViT-B-16-SigLIP2-512",
        default_pretrained=None,
        tiny_model="spar-tiny-sl2",
        register_tiny=register_tiny,
        key_fragments=(("visual.trunk.", "a SigLIP2 model (timm trunk)"),),
        parity=(
            "the reference's positional resize (bit for bit), pool bypass vs timm's pool (tests/test_family_siglip.py)"
        ),
        order=40,
    )
)
