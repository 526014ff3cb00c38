"""Two families on a timm ``Eva`` trunk with rotary position embeddings (``docs/method.md``, "Eva-trunk families").

* ``eva02``: EVA02-CLIP (open_clip ``EVA02-B-16``, ``EVA02-L-14``, ``EVA02-L-14-336``; also EVA01, which has no
  RoPE): a class token pooled by the trunk (``global_pool="token"``). Dense features: every block but the last as
  the model runs it, the last block on its value path, the final norm and the projection, the class token dropped.
* ``pe``: the Perception Encoder (open_clip ``PE-Core-*``): an attention pool (``global_pool="map"``) and, but for
  bigG, a class token. Dense features: every block as the model runs it, the final norm, the attention pool bypassed
  on its value path (as for SigLIP2), the projection, the class token (if any) dropped.

Any input size: the patch grid is ``(H // p, W // p)`` (a remainder below one patch is dropped, as the patch
convolution does); the absolute positional embedding is resampled with timm's ``resample_abs_pos_embed`` and the
RoPE table is built for that grid with timm's own RoPE module (``get_embed(shape=...)``). EVA02 follows timm's own
dynamic-size rules (bicubic with antialiasing; RoPE positions rescaled onto the pretraining grid, EVA's rule); PE
follows Meta's reference implementation (bilinear without antialiasing; RoPE on integer positions, unscaled). At the
model's own size both are the model's own forward.
"""

from __future__ import annotations

import functools

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat
from timm.models import register_model
from timm.models.eva import Eva, EvaBlock
from torch import nn

from spar_pl.families.base import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, DenseEncoder
from spar_pl.families.registry import Family, register_family

__all__ = ["EVA02Encoder", "EvaTrunkEncoder", "PEEncoder", "register_tiny"]


def _trunk(model: nn.Module) -> nn.Module | None:
    return getattr(getattr(model, "visual", None), "trunk", None)


class EvaTrunkEncoder(DenseEncoder):
    """Shared geometry of an open_clip model whose vision tower is a timm ``Eva`` (``visual.trunk``).

    Subclasses say how the last stage maps the tokens to the text-embedding space (:meth:`head_tokens`).

    Raises:
        TypeError: the vision tower is not a timm ``Eva`` with pre-norm blocks and, when it has RoPE, the axial
            ``RotaryEmbeddingCat`` (what EVA02-CLIP and the Perception Encoder use).
    """

    #: Any-size rules: the positional-embedding resampling (``resample_abs_pos_embed``'s ``interpolation`` and
    #: ``antialias``), and whether RoPE positions are rescaled onto the pretraining grid (the trunk's
    #: ``ref_feat_shape``) or stay integer grid positions.
    pos_interpolation: str = "bicubic"
    pos_antialias: bool = True
    rope_rescale: bool = True

    def __init__(self, model: nn.Module, tokenizer=None, mean=None, std=None) -> None:
        trunk = _trunk(model)
        name = type(self).__name__
        if not isinstance(trunk, Eva):
            kind = type(trunk if trunk is not None else getattr(model, "visual", None)).__name__
            raise TypeError(f"{name} needs an open_clip model whose vision tower is a timm Eva, got {kind}")
        if not all(type(b) is EvaBlock for b in trunk.blocks):
            raise TypeError(f"{name} supports pre-norm Eva blocks only (not post-norm blocks such as EVA02-E's)")
        if trunk.rope is not None and (trunk.rope_mixed or not isinstance(trunk.rope, RotaryEmbeddingCat)):
            raise TypeError(f"{name} supports the axial RotaryEmbeddingCat RoPE, not {type(trunk.rope).__name__}")
        super().__init__(model, tokenizer, mean, std)
        self.patch_size = int(trunk.patch_embed.proj.kernel_size[0])
        if trunk.patch_embed.proj.kernel_size[1] != self.patch_size:
            raise TypeError(f"{name} expects square patches, got {tuple(trunk.patch_embed.proj.kernel_size)}")
        # The trunk's RoPE caches its table for the pretraining grid only; a twin in timm's "bands" mode (the
        # trunk's own settings, no cached table) builds the table for any grid with get_embed(shape=...). Its
        # buffers are not persistent: the state dict stays the model's.
        self.rope = None if trunk.rope is None else self._grid_rope(trunk.rope)

    def _grid_rope(self, rope: RotaryEmbeddingCat) -> RotaryEmbeddingCat:
        """The trunk's RoPE settings without a cached table nor train-time coordinate augmentation (and without
        the rescaling onto the pretraining grid unless :attr:`rope_rescale`)."""
        return RotaryEmbeddingCat(
            dim=rope.dim,
            max_res=rope.max_res,
            temperature=rope.temperature,
            in_pixels=rope.in_pixels,
            linear_bands=rope.linear_bands,
            feat_shape=None,
            ref_feat_shape=rope.ref_feat_shape if self.rope_rescale else None,
            grid_offset=rope.grid_offset,
            grid_indexing=rope.grid_indexing,
            rotate_half=rope.rotate_half,
            grid_type=rope.grid_type,
            normalize_coords=rope.normalize_coords,
            device=rope.bands.device,
        )

    # -- geometry -------------------------------------------------------------------------------
    @property
    def trunk(self) -> Eva:
        """The timm ``Eva`` vision trunk."""
        return self.model.visual.trunk

    @property
    def embed_dim(self) -> int:
        linears = [m for m in (self.trunk.head, *self.model.visual.head.modules()) if isinstance(m, nn.Linear)]
        return int(linears[-1].out_features) if linears else int(self.trunk.embed_dim)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.trunk.blocks

    def positional_embedding(self, h: int, w: int) -> torch.Tensor | None:
        """Absolute positional embedding ``(1, prefix + h * w, D)`` for an ``h x w`` grid (``resample_abs_pos_embed``
        with the family's :attr:`pos_interpolation` and :attr:`pos_antialias`; the embedding itself at the
        pretraining grid)."""
        t = self.trunk
        if t.pos_embed is None:
            return None
        prefix = 0 if t.no_embed_class else t.num_prefix_tokens
        return resample_abs_pos_embed(
            t.pos_embed,
            new_size=(h, w),
            old_size=t.patch_embed.grid_size,
            num_prefix_tokens=prefix,
            interpolation=self.pos_interpolation,
            antialias=self.pos_antialias,
        )

    def rope_embedding(self, h: int, w: int) -> torch.Tensor | None:
        """RoPE table ``(h * w, 2 * head_dim)`` for an ``h x w`` grid (timm's ``get_embed(shape=(h, w))``)."""
        return None if self.rope is None else self.rope.get_embed(shape=[h, w])

    def tokens(self, images: torch.Tensor, depth: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens ``(B, prefix + h * w, D)`` after the first ``depth`` blocks (all but the last when ``None``),
        with the RoPE table for the grid, as the trunk computes them (``docs/method.md``, Eva-trunk families)."""
        t = self.trunk
        b, _, height, width = images.shape
        h, w = self.grid_size(height, width)
        if h == 0 or w == 0:
            raise ValueError(f"image {height}x{width} is smaller than one {self.patch_size}px patch")
        x = t.patch_embed.proj(images.to(t.patch_embed.proj.weight.dtype)).flatten(2).transpose(1, 2)
        x = t.patch_embed.norm(x)
        prefix = [] if t.cls_token is None else [t.cls_token.expand(b, -1, -1)]
        if t.reg_token is not None:
            prefix.append(t.reg_token.expand(b, -1, -1))
        pos = self.positional_embedding(h, w)
        if t.no_embed_class:
            x = torch.cat([*prefix, x if pos is None else x + pos], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1)
            x = x if pos is None else x + pos
        x = t.norm_pre(t.pos_drop(x))
        rope = self.rope_embedding(h, w)
        depth = len(t.blocks) - 1 if depth is None else depth
        for blk in t.blocks[:depth]:
            x = blk(x, rope=rope)
        return x, rope

    def head_tokens(self, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        """The family's last stage: tokens before the last block -> tokens in the text-embedding space."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Dense features ``(B, C, H // p, W // p)`` of a normalised image batch."""
        b, _, height, width = images.shape
        h, w = self.grid_size(height, width)
        x, rope = self.tokens(images)
        x = self.head_tokens(x, rope)[:, self.trunk.num_prefix_tokens :]
        return x.reshape(b, h, w, -1).permute(0, 3, 1, 2)

    def _projection(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's classifier-side norm and head (the text projection), then open_clip's adapter head."""
        t = self.trunk
        return self.model.visual.head(t.head(t.head_drop(t.fc_norm(x))))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        t = self.trunk
        groups = {"patchembed": list(t.patch_embed.parameters())}
        if t.pos_embed is not None:
            groups["posembed"] = [t.pos_embed]
        head = [*t.norm.parameters(), *t.fc_norm.parameters(), *t.head.parameters()]
        if t.attn_pool is not None:
            head += list(t.attn_pool.parameters())
        groups["head"] = head + list(self.model.visual.head.parameters())
        return groups

    def trainable_parameters(self, spec: str) -> dict[str, nn.Parameter]:
        if self.trunk.pos_embed is None and "posembed" in (s.strip() for s in spec.split(",")):
            raise ValueError(
                f"trainable spec {spec!r}: 'posembed' selects nothing: this Eva trunk has no learned absolute "
                "position embedding; use all, none, blk_<i>, patchembed or head"
            )
        return super().trainable_parameters(spec)


def value_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An Eva attention module (``EvaAttention`` or ``AttentionRope``) on its value path: ``proj(norm(v))``.

    ``v`` is the value projection of ``x`` (fused or separate, with its bias), key-value heads repeated for
    grouped-query attention, heads merged; then the module's inner scale norm, its gate when it has one, its
    output projection. RoPE acts on queries and keys only, so the value path needs none.
    """
    if attn.qkv is not None:
        dim = attn.qkv.weight.shape[0] // 3
        weight = attn.qkv.weight[2 * dim :]
        bias = attn.qkv.bias[2 * dim :] if attn.qkv.bias is not None else getattr(attn, "v_bias", None)
        v = F.linear(x, weight, bias)
    else:
        v = attn.v_proj(x)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        b, n, _ = v.shape
        v = v.reshape(b, n, -1, attn.head_dim).repeat_interleave(groups, dim=2).reshape(b, n, -1)
    v = attn.norm(v)
    if attn.gate is not None:
        v = v * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(v))


class EVA02Encoder(EvaTrunkEncoder):
    """EVA02-CLIP dense features: value path of the last block, final norm and projection (class token dropped)."""

    family = "eva02"
    default_mean = CLIP_MEAN
    default_std = CLIP_STD

    def __init__(self, model: nn.Module, tokenizer=None, mean=None, std=None) -> None:
        trunk = _trunk(model)
        if isinstance(trunk, Eva) and trunk.attn_pool is not None:
            raise TypeError("EVA02Encoder expects a class-token pool; an Eva trunk with an attention pool is 'pe'")
        if isinstance(trunk, Eva) and (trunk.cls_token is None or trunk.global_pool != "token"):
            raise TypeError("EVA02Encoder expects an Eva trunk with a class token and its class-token pool")
        super().__init__(model, tokenizer, mean, std)

    def head_tokens(self, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        blk = self.trunk.blocks[-1]
        y = value_attention(blk.attn, blk.norm1(x))
        x = x + (y if blk.gamma_1 is None else blk.gamma_1 * y)
        y = blk.mlp(blk.norm2(x))
        x = x + (y if blk.gamma_2 is None else blk.gamma_2 * y)
        return self._projection(self.trunk.norm(x))

    def unused_parameters(self) -> list[nn.Parameter]:
        """The last block's query and key projections (and their norms), which the value path skips."""
        attn = self.trunk.blocks[-1].attn
        unused = [*attn.q_norm.parameters(), *attn.k_norm.parameters()]
        if attn.qkv is None:
            unused += [*attn.q_proj.parameters(), *attn.k_proj.parameters()]
        elif getattr(attn, "q_bias", None) is not None:
            unused.append(attn.q_bias)
        return unused


class PEEncoder(EvaTrunkEncoder):
    """Perception Encoder dense features: every block, final norm, attention-pool value bypass, projection."""

    family = "pe"
    default_mean = SIGLIP_MEAN  # PE's preprocessing: mean = std = 0.5
    default_std = SIGLIP_STD
    pos_interpolation = "bilinear"  # Meta's reference: bilinear, align_corners=False, no antialiasing
    pos_antialias = False
    rope_rescale = False  # Meta's reference: RoPE on integer grid positions (from 1 with a class token, else 0)

    def __init__(self, model: nn.Module, tokenizer=None, mean=None, std=None) -> None:
        trunk = _trunk(model)
        if isinstance(trunk, Eva):
            if trunk.attn_pool is None:
                raise TypeError("PEEncoder needs an Eva trunk with an attention pool; a class-token pool is 'eva02'")
            if trunk.attn_pool.pos_embed is not None:
                raise TypeError("PEEncoder needs an attention pool without its own position embedding")
        super().__init__(model, tokenizer, mean, std)

    def head_tokens(self, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        t = self.trunk
        x = t.norm(t.blocks[-1](x, rope=rope))
        pool = t.attn_pool
        v = pool.kv(x)[..., x.shape[-1] :]
        v = pool.proj_drop(pool.proj(v))
        if pool.mlp is not None:
            v = v + pool.mlp(pool.norm(v))
        return self._projection(v)

    def unused_parameters(self) -> list[nn.Parameter]:
        """The attention pool's latent query and its projection and norms, which the value bypass skips."""
        pool = self.trunk.attn_pool
        return [pool.latent, *pool.q.parameters(), *pool.q_norm.parameters(), *pool.k_norm.parameters()]


# -- recognition ----------------------------------------------------------------------------------------------------
def _supported_trunk(trunk: nn.Module | None) -> bool:
    return (
        isinstance(trunk, Eva)
        and all(type(b) is EvaBlock for b in trunk.blocks)
        and (trunk.rope is None or (isinstance(trunk.rope, RotaryEmbeddingCat) and not trunk.rope_mixed))
    )


def _recognise_eva02(model: nn.Module) -> bool:
    trunk = _trunk(model)
    return _supported_trunk(trunk) and trunk.attn_pool is None and trunk.global_pool == "token"  # class-token pool


def _recognise_pe(model: nn.Module) -> bool:
    trunk = _trunk(model)
    return _supported_trunk(trunk) and trunk.attn_pool is not None and trunk.attn_pool.pos_embed is None


_EVA_MODULES = ("timm.models.eva", __name__)  # where the entrypoints of Eva trunks live


@functools.cache
def _config_trunk_kind(timm_name: str, pool: str) -> str:
    """``eva02``, ``pe`` or ``""`` for a timm model name, from its structure built on the meta device (no memory)."""
    if not timm.is_model(timm_name) or timm.models.model_entrypoint(timm_name).__module__ not in _EVA_MODULES:
        return ""
    try:
        with torch.device("meta"):
            trunk = timm.create_model(timm_name, pretrained=False, global_pool=pool)
    except Exception:
        return ""
    if not _supported_trunk(trunk):
        return ""
    if trunk.attn_pool is None and trunk.global_pool == "token":
        return "eva02"
    return "pe" if trunk.attn_pool is not None and trunk.attn_pool.pos_embed is None else ""


def _recognise_config(kind: str):
    def recognise(cfg: dict) -> bool:
        vision = cfg.get("vision_cfg", {})
        name = vision.get("timm_model_name")
        return bool(name) and _config_trunk_kind(str(name), str(vision.get("timm_pool", "avg"))) == kind

    return recognise


# -- tiny twins -----------------------------------------------------------------------------------------------------
def _tiny(args: dict, kwargs: dict) -> Eva:
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm factory bookkeeping
        kwargs.pop(key, None)
    return Eva(**{**args, **kwargs})


def spar_tiny_eva02(pretrained: bool = False, **kwargs) -> Eva:
    """A 3-block, 32-wide EVA02-CLIP-style Eva at 64 px with patch 14 (RoPE, SwiGLU, sub-LN, class-token pool)."""
    args = dict(img_size=64, patch_size=14, embed_dim=32, depth=3, num_heads=2, qkv_fused=False)
    args.update(mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True)
    args.update(use_rot_pos_emb=True, ref_feat_shape=(4, 4), global_pool=kwargs.pop("global_pool", "token"))
    return _tiny(args, kwargs)


def spar_tiny_pe(pretrained: bool = False, **kwargs) -> Eva:
    """A 3-block, 32-wide Perception-Encoder-style Eva at 64 px with patch 16 (RoPE, pre-norm, attention pool)."""
    args = dict(img_size=64, patch_size=16, embed_dim=32, depth=3, num_heads=2, mlp_ratio=4.0)
    args.update(attn_type="rope", use_pre_transformer_norm=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4))
    args.update(rope_grid_offset=1.0, rope_grid_indexing="xy", attn_pool_num_heads=2, attn_pool_mlp_ratio=4.0)
    args.update(global_pool=kwargs.pop("global_pool", "map"))
    return _tiny(args, kwargs)


def register_tiny() -> None:
    """Register the tiny Eva trunks of ``spar-tiny-eva02`` and ``spar-tiny-pe`` with timm, once."""
    for fn in (spar_tiny_eva02, spar_tiny_pe):
        if not timm.is_model(fn.__name__):
            register_model(fn)


#: No segmentation reference exists for these families; what the tests hold the dense path to.
PARITY = (
    "timm's own tokens up to the last block (forward_intermediates at the native size, the dynamic-size forward at "
    "any size) and the value paths against the modules' own single-token outputs (tests/test_family_eva.py)"
)

EVA02 = register_family(
    Family(
        name="eva02",
        encoder=EVA02Encoder,
        summary="EVA02-CLIP (timm Eva trunk, RoPE, class token): value path of the last block",
        recognise=_recognise_eva02,
        recognise_config=_recognise_config("eva02"),
        default_model="EVA02-B-16",
        default_pretrained="merged2b_s8b_b131k",
        tiny_model="spar-tiny-eva02",
        register_tiny=register_tiny,
        key_fragments=(("visual.trunk.blocks.0.attn.norm.", "an EVA02-CLIP model (timm Eva trunk, sub-LN)"),),
        parity=PARITY,
        order=30,
    )
)

PE = register_family(
    Family(
        name="pe",
        encoder=PEEncoder,
        summary="Perception Encoder (timm Eva trunk, RoPE, attention pool): attention-pool value bypass",
        recognise=_recognise_pe,
        recognise_config=_recognise_config("pe"),
        default_model="PE-Core-B-16",
        default_pretrained="meta",
        tiny_model="spar-tiny-pe",
        register_tiny=register_tiny,
        key_fragments=(("visual.trunk.norm_pre.", "a Perception Encoder model (timm Eva trunk, pre-norm)"),),
        parity=PARITY,
        order=29,
    )
)
