"""open_clip ViT CLIPs of every size and patch (OpenAI, LAION, DataComp, MetaCLIP, DFN weights; QuickGELU variants):
MaskCLIP dense features, the value path of the last block.

Positional embeddings are resized with ``scale_factor=((h + 0.1) / g, (w + 0.1) / g)`` bicubic interpolation (the
SPAR reference's rule) and the last block takes the value path only; ``h = H // p`` (a remainder below one patch
is dropped, as the patch convolution does). ``docs/method.md`` section 1.
"""

from __future__ import annotations

import math

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from spar_pl.families.base import CLIP_MEAN, CLIP_STD, DenseEncoder
from spar_pl.families.registry import Family, register_family
from spar_pl.recipes import RECIPES, check_recipe, unused_block_parameters

__all__ = ["FAMILY", "MaskCLIPEncoder"]


class MaskCLIPEncoder(DenseEncoder):
    """Dense features from an open_clip ViT CLIP: MaskCLIP's value path in the last block, or another dense recipe.

    Args:
        dense: the last block's recipe (:data:`spar_pl.recipes.RECIPES`): ``maskclip`` (value path, SPAR's),
            ``sclip``, ``clearclip`` or ``naclip``.
    """

    family = "clip"
    default_mean = CLIP_MEAN
    default_std = CLIP_STD

    def __init__(self, model: nn.Module, tokenizer=None, mean=None, std=None, dense: str = "maskclip") -> None:
        check_recipe(dense)
        visual = getattr(model, "visual", None)
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise TypeError(f"MaskCLIPEncoder needs an open_clip ViT CLIP, got a vision tower {type(visual).__name__}")
        last = visual.transformer.resblocks[-1]
        if not isinstance(getattr(last, "attn", None), nn.MultiheadAttention):
            raise TypeError("MaskCLIPEncoder supports blocks with nn.MultiheadAttention (standard open_clip ViTs)")
        super().__init__(model, tokenizer, mean, std)
        self.patch_size = int(visual.conv1.kernel_size[0])
        self.dense = dense

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
        x = RECIPES[self.dense](self.blocks[-1], x, h, w)
        x = v.ln_post(x) @ v.proj
        return x[:, 1:].reshape(b, h, w, -1).permute(0, 3, 1, 2)

    def unused_parameters(self) -> list[nn.Parameter]:
        """The last block's feed-forward (and ``ln_2``) under a recipe that drops it (ClearCLIP, NACLIP)."""
        return unused_block_parameters(self.dense, self.blocks[-1])


def _recognise(model: nn.Module) -> bool:
    """An open_clip ``VisionTransformer`` with ``nn.MultiheadAttention`` blocks and no attention pool (not CoCa)."""
    visual = getattr(model, "visual", None)
    if not isinstance(visual, open_clip.transformer.VisionTransformer) or getattr(visual, "attn_pool", None):
        return False
    return isinstance(getattr(visual.transformer.resblocks[-1], "attn", None), nn.MultiheadAttention)


def _recognise_config(cfg: dict) -> bool:
    """An open_clip config of a ViT CLIP: a built-in ViT vision tower (no timm or HF trunk, not a ResNet, no
    attention pool) and no multimodal decoder (CoCa)."""
    vision = cfg.get("vision_cfg", {})
    if any(k in vision for k in ("timm_model_name", "hf_model_name", "eva_model_name")) or "multimodal_cfg" in cfg:
        return False
    return isinstance(vision.get("layers", 12), int) and not vision.get("attentional_pool", False)


FAMILY = register_family(
    Family(
        name="clip",
        encoder=MaskCLIPEncoder,
        summary="open_clip ViT CLIP (OpenAI, LAION, DataComp, MetaCLIP, DFN; QuickGELU): MaskCLIP value path",
        recognise=_recognise,
        recognise_config=_recognise_config,
        default_model="ViT-B-16",
        default_pretrained="laion2b_s34b_b88k",
        tiny_model="spar-tiny-clip",
        key_fragments=(("visual.transformer.resblocks.", "an OpenCLIP ViT CLIP model (MaskCLIP)"),),
        parity="the reference's positional resize and value path vs open_clip's own blocks (tests/test_family_clip.py)",
        order=50,
    )
)
