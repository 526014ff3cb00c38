"""Any-resolution dense encoders over open_clip vision-language models.

Every encoder maps a normalised image batch ``(B, 3, H, W)`` of any size to dense features
``(B, C, h, w)`` in the text-embedding space, one vector per patch, with the exact semantics of
the SPAR reference implementation (``docs/method.md`` section 1):

* :class:`MaskCLIPEncoder` wraps an open_clip ``VisionTransformer`` CLIP. Positional embeddings are
  resized with ``scale_factor=((h + 0.1) / g, (w + 0.1) / g)`` bicubic interpolation and the last
  block takes the value path only. ``h = H // 16`` (a remainder below one patch is dropped, as the
  patch convolution does).
* :class:`SigLIP2Encoder` wraps an open_clip model with a timm SigLIP(2) trunk. The image is padded
  bottom/right to a multiple of 16, positional embeddings are always resized with ``size=(h, w)``
  bicubic interpolation, and the attention-pool latent query is bypassed (value path only).
  ``h = ceil(H / 16)``.
* :class:`DinoTxtEncoder` runs DINOv3.txt (ViT-L/16 backbone + dino.txt text tower) natively on a timm
  ``Eva`` trunk and an open_clip ``TextTransformer``. The image is stretched bicubically to the next multiple
  of 16 and the dense features are the backbone's final-normed patch tokens. ``h = ceil(H / 16)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import open_clip
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from spar_pl.weights import load_checkpoint, load_state_strict, read_state_dict

__all__ = [
    "BACKBONES",
    "DenseEncoder",
    "DinoTxtEncoder",
    "DinoTxtModel",
    "MaskCLIPEncoder",
    "SigLIP2Encoder",
    "build_encoder",
    "load_checkpoint",
    "read_state_dict",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

LEGACY_MEAN = (0.5, 0.5, 0.5)
LEGACY_STD = (0.5, 0.5, 0.5)

#: Per backbone: encoder family, default open_clip model name and pretrained tag, normalisation (``docs/method.md``
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


class DenseEncoder(nn.Module):
    """Base class: a wrapped open_clip model, its tokenizer and normalisation, and dense features.

    Subclasses implement :meth:`forward` and name their parameter groups for :meth:`set_trainable`.

    Args:
        model: a built open_clip model (``CLIP`` or ``CustomTextCLIP``); kept as ``self.model``, so
            state-dict keys are the open_clip keys prefixed by ``model.``.
        tokenizer: the model's tokenizer, needed only to encode text; ``None`` uses open_clip's CLIP BPE
            tokenizer when the text tower has the CLIP vocabulary, else leaves none (dense features need
            none; :meth:`encode_text` then says what to pass).
        mean: per-channel normalisation mean; ``None`` takes the family's (``docs/method.md`` section 1).
            :func:`build_encoder` passes open_clip's preprocessing statistics of a pretrained model.
        std: per-channel normalisation std, likewise.
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

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map images in ``[0, 1]`` to the model's normalised input space."""
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std

    # -- weights --------------------------------------------------------------------------------
    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a checkpoint's keys (after its known prefix is removed) to ``self.model``'s keys.

        The identity here: open_clip checkpoints already carry the model's names. Backbones whose official
        files use other names (DINOv3.txt) override it.
        """
        return state

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


#: DINOv3.txt architectures: the vision trunk (timm ``vit_large_patch16_dinov3_qkvb`` overrides) and the
#: text tower (open_clip ``TextTransformer``). ``spar-tiny-dinotxt`` is the tiny twin for tests and CPU runs.
DINOTXT_ARCHS: dict[str, dict[str, dict[str, int]]] = {
    "dinov3_vitl16_dinotxt_tet1280d20h24l": {
        "vision": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
        "text": {"width": 1280, "heads": 20, "layers": 24},
    },
    "spar-tiny-dinotxt": {
        "vision": {"embed_dim": 32, "depth": 3, "num_heads": 2},
        "text": {"width": 32, "heads": 2, "layers": 1},
    },
}

#: The dino.txt vision head (two blocks and a final norm): the per-block key suffixes of the official file.
#: SPAR's dense features never use the head, so its keys are checked against this list and dropped.
DINOTXT_HEAD_BLOCK_KEYS = frozenset(
    f"{name}.{leaf}"
    for name, leaves in {
        "norm1": ("weight", "bias"),
        "attn.qkv": ("weight",),
        "attn.proj": ("weight", "bias"),
        "ls1": ("gamma",),
        "norm2": ("weight", "bias"),
        "mlp.w1": ("weight", "bias"),
        "mlp.w2": ("weight", "bias"),
        "mlp.w3": ("weight", "bias"),
        "ls2": ("gamma",),
    }.items()
    for leaf in leaves
)
DINOTXT_HEAD_BLOCKS = 2


class DinoTxtModel(nn.Module):
    """DINOv3.txt without its vision head: the DINOv3 backbone and the dino.txt text tower.

    Args:
        model_name: a key of :data:`DINOTXT_ARCHS`.

    Attributes:
        visual: the DINOv3 ViT as a timm ``Eva`` (class token, 4 register tokens, axial RoPE, q and v
            biases, LayerScale). Its ``rope.periods`` buffer is made persistent so that the official file's
            values (stored rounded to bfloat16) are loaded rather than recomputed.
        text: the CLIP-style causal text transformer, projecting to ``2 * embed_dim`` dims.
        logit_scale: the dino.txt contrastive temperature (loaded, unused by SPAR).
    """

    def __init__(self, model_name: str = "dinov3_vitl16_dinotxt_tet1280d20h24l") -> None:
        super().__init__()
        if model_name not in DINOTXT_ARCHS:
            raise ValueError(f"unknown DINOv3.txt model {model_name!r}; choose one of {', '.join(DINOTXT_ARCHS)}")
        arch = DINOTXT_ARCHS[model_name]
        # drop-path 0 and no train-time RoPE augmentation: the authors' student runs in eval mode (see DinoTxtEncoder)
        self.visual = timm.create_model(
            "vit_large_patch16_dinov3_qkvb", pretrained=False, num_classes=0, img_size=384, **arch["vision"]
        )
        rope = self.visual.rope
        rope.register_buffer("periods", rope.periods, persistent=True)
        self.embed_dim = int(arch["vision"]["embed_dim"])
        self.text = open_clip.transformer.TextTransformer(
            context_length=77,
            vocab_size=49408,
            mlp_ratio=4,
            ls_init_value=None,
            output_dim=2 * self.embed_dim,
            act_layer=nn.GELU,
            pool_type="argmax",
            proj_bias=False,
            **arch["text"],
        )
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.context_length = self.text.context_length
        self.vocab_size = self.text.vocab_size

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text embeddings ``(N, embed_dim)``: the last half of the text tower's output, as the authors' SPAR.

        Normalisation (when asked) happens after the slice.
        """
        features = self.text(text)[:, -self.embed_dim :]
        return F.normalize(features, dim=-1) if normalize else features


class DinoTxtEncoder(DenseEncoder):
    """DINOv3.txt dense features: the backbone's final-normed patch tokens of a bicubically stretched image.

    An image whose sides are not multiples of 16 is resized (bicubic, ``align_corners=False``) up to
    ``ceil(H / 16) * 16 x ceil(W / 16) * 16``, as the authors' wrapper does; class and register tokens are
    dropped. Text embeddings are :meth:`DinoTxtModel.encode_text`.

    The vision tower never leaves eval mode (:meth:`train` keeps it there): the authors' student was trained
    with its modules in eval mode, so drop-path and the train-time RoPE coordinate rescaling stay off during
    distillation. Gradients flow as usual.

    Official weights load through :meth:`convert_state_dict` from the backbone file, the dino.txt file and the
    authors' SPAR checkpoints alike.
    """

    default_mean = IMAGENET_MEAN
    default_std = IMAGENET_STD

    def __init__(self, model: DinoTxtModel, tokenizer=None, mean=None, std=None) -> None:
        if not isinstance(model, DinoTxtModel):
            raise TypeError(f"DinoTxtEncoder needs a DinoTxtModel, got {type(model).__name__}")
        if tokenizer is None:
            tokenizer = open_clip.SimpleTokenizer(context_length=model.context_length)  # dino.txt's BPE ids
        super().__init__(model, tokenizer, mean, std)
        self.patch_size = int(model.visual.patch_embed.proj.kernel_size[0])
        self.model.eval()

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def native_size(self) -> int:
        """The teacher crop of the authors' DINOv3.txt configuration."""
        return 384

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.visual.blocks

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return math.ceil(height / self.patch_size), math.ceil(width / self.patch_size)

    def train(self, mode: bool = True) -> DinoTxtEncoder:
        """Set the module flag but keep the model in eval mode (no drop-path, no RoPE jitter), as the authors'."""
        super().train(mode)
        self.model.eval()
        return self

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        v = self.model.visual
        return {"patchembed": list(v.patch_embed.parameters()), "head": list(v.norm.parameters())}

    def trainable_parameters(self, spec: str) -> dict[str, nn.Parameter]:
        if "posembed" in (t.strip() for t in spec.split(",")):
            raise ValueError(
                f"trainable spec {spec!r}: 'posembed' selects nothing for dinov3txt, whose backbone has no learned "
                "position embedding (axial RoPE); use all, none, blk_<i>, patchembed or head"
            )
        return super().trainable_parameters(spec)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Dense features ``(B, C, ceil(H / p), ceil(W / p))`` of a normalised image batch."""
        v = self.model.visual
        b, _, height, width = images.shape
        h, w = self.grid_size(height, width)
        if h == 0 or w == 0:
            raise ValueError(f"image {height}x{width} has no pixels")
        p = self.patch_size
        if (h * p, w * p) != (height, width):
            images = F.interpolate(images, size=(h * p, w * p), mode="bicubic", align_corners=False)
        x = v.forward_features(images.to(v.patch_embed.proj.weight.dtype))
        return x[:, v.num_prefix_tokens :].reshape(b, h, w, -1).permute(0, 3, 1, 2)

    # -- official weights ---------------------------------------------------------------------------
    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Official DINOv3.txt names to this model's names; keys already in this model's names pass through.

        ``visual_model.backbone.*`` (the backbone file's keys under that prefix) become the timm trunk's keys:
        ``qkv.bias`` is split into the q and v biases (its k third is masked by ``bias_mask`` in the official
        model, so it never acts), ``ls1/ls2.gamma`` become ``gamma_1/gamma_2``, ``storage_tokens`` the register
        tokens, ``rope_embed.periods`` the RoPE periods; ``mask_token`` (pretraining only) and ``bias_mask`` are
        dropped after checking the mask. ``text_model.*`` become open_clip's text keys (a zero ``in_proj_bias``
        is added: the official qkv has no bias). ``visual_model.head.*`` (the dino.txt vision head, unused by
        SPAR's dense path) are checked against the official layout and dropped. Anything else is kept as is,
        so that a strict load reports it.
        """
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key.startswith("visual_model.backbone."):
                self._convert_backbone_key(key[len("visual_model.backbone.") :], value, out)
            elif key.startswith("visual_model.head."):
                if not self._is_head_key(key[len("visual_model.head.") :]):
                    out[key] = value  # not the official head layout: left for the strict load to report
            elif key.startswith("text_model."):
                self._convert_text_key(key[len("text_model.") :], value, out)
            else:
                out[key] = value
        return out

    @staticmethod
    def _is_head_key(key: str) -> bool:
        if key in ("ln_final.weight", "ln_final.bias"):
            return True
        parts = key.split(".", 3)
        return (
            len(parts) == 4
            and parts[0] == "blocks"
            and parts[1] in {str(i) for i in range(DINOTXT_HEAD_BLOCKS)}
            and f"{parts[2]}.{parts[3]}" in DINOTXT_HEAD_BLOCK_KEYS
        )

    @staticmethod
    def _convert_backbone_key(key: str, value: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
        if key == "mask_token":
            return
        if key.endswith("attn.qkv.bias_mask"):
            q, k, v = value.chunk(3)
            if not (bool((q == 1).all()) and bool((k == 0).all()) and bool((v == 1).all())):
                raise ValueError(f"visual_model.backbone.{key}: expected the k-bias mask (ones, zeros, ones)")
            return
        if key.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3)
            out["visual." + key.replace("qkv.bias", "q_bias")] = q
            out["visual." + key.replace("qkv.bias", "v_bias")] = v
            return
        if key == "rope_embed.periods":
            out["visual.rope.periods"] = value
            return
        key = key.replace("storage_tokens", "reg_token").replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2")
        out[f"visual.{key}"] = value

    @staticmethod
    def _convert_text_key(key: str, value: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
        if key == "head.linear_projection.weight":
            out["text.text_projection"] = value.T.contiguous()
            return
        if key.startswith("backbone.blocks."):
            key = "transformer.resblocks." + key[len("backbone.blocks.") :]
            for old, new in (
                ("attention_norm.", "ln_1."),
                ("ffn_norm.", "ln_2."),
                ("attention.qkv.weight", "attn.in_proj_weight"),
                ("attention.qkv.bias", "attn.in_proj_bias"),
                ("attention.proj.", "attn.out_proj."),
                ("feed_forward.fc1.", "mlp.c_fc."),
                ("feed_forward.fc2.", "mlp.c_proj."),
            ):
                key = key.replace(old, new)
            if key.endswith("attn.in_proj_weight"):
                out.setdefault(f"text.{key[: -len('weight')]}bias", value.new_zeros(value.shape[0]))
            out[f"text.{key}"] = value
            return
        if key.startswith("backbone."):
            key = key[len("backbone.") :]  # token_embedding, positional_embedding, ln_final
        out[f"text.{key}"] = value


ENCODERS: dict[str, type[DenseEncoder]] = {
    "maskclip": MaskCLIPEncoder,
    "siglip2": SigLIP2Encoder,
    "dinov3txt": DinoTxtEncoder,
}


def build_encoder(
    backbone: str = "siglip2",
    model_name: str | None = None,
    pretrained: str | None = "default",
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    checkpoint: str | Path | None = None,
    head_weights: str | Path | None = None,
) -> DenseEncoder:
    """Build a dense encoder the way users name models.

    Args:
        backbone: a :data:`BACKBONES` key: ``maskclip``, ``maskclip-legacy`` (mean = std = 0.5, for the
            authors' legacy MaskCLIP weights), ``siglip2`` or ``dinov3txt``.
        model_name: open_clip model name or ``hf-hub:org/repo`` id; defaults to the backbone's model
            (``docs/method.md`` section 1). ``spar-tiny-clip`` / ``spar-tiny-sl2`` / ``spar-tiny-dinotxt`` build tiny
            random models.
        pretrained: open_clip pretrained tag; ``"default"`` takes the backbone's tag for its default
            model, ``None`` leaves the weights random. Ignored for ``hf-hub:`` ids. For ``dinov3txt`` only
            ``None`` matters: it allows the full-size model without weight files (random weights).
        weights: a local open_clip weights file (``.safetensors``, ``.pt``, ``.bin``), for offline use;
            overrides ``pretrained``. For ``dinov3txt``: the DINOv3 ViT-L/16 backbone file
            (``dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth``).
        device: where to put the model.
        checkpoint: a SPAR checkpoint loaded strictly over the whole model
            (:func:`spar_pl.weights.load_checkpoint`, never unpickling code): the authors' Lightning ``.ckpt``
            (``segmentor.net.model.`` + the model's keys), a ``spar-cli fit`` checkpoint, a ``spar-cli export``
            file or a plain state dict. The pretrained weights are then not fetched.
        head_weights: ``dinov3txt`` only: the dino.txt file with the vision head and the text tower
            (``dinov3_vitl16_dinotxt_vision_head_and_text_encoder-a442d8f5.pth``).
    """
    if backbone not in BACKBONES or BACKBONES[backbone]["family"] not in ENCODERS:
        choices = ", ".join(k for k, v in BACKBONES.items() if v["family"] in ENCODERS)
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {choices}")
    for path in (weights, checkpoint, head_weights):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"weights file for backbone {backbone!r} not found: {path}")
    if backbone == "dinov3txt":
        encoder = build_dinotxt(model_name, pretrained, weights, head_weights, checkpoint is not None)
        encoder.to(device)
    else:
        if head_weights is not None:
            raise ValueError(f"head_weights is for backbone 'dinov3txt' only, not {backbone!r}")
        encoder = _build_open_clip(backbone, model_name, pretrained, weights, device, checkpoint)
    encoder.backbone = backbone
    if checkpoint is not None:
        load_checkpoint(encoder, checkpoint)
    return encoder


def _build_open_clip(
    backbone: str,
    model_name: str | None,
    pretrained: str | None,
    weights: str | Path | None,
    device: str | torch.device,
    checkpoint: str | Path | None,
) -> DenseEncoder:
    defaults = BACKBONES[backbone]
    name = model_name or defaults["model_name"]
    if name.startswith("spar-tiny-"):  # the tiny models register with open_clip and timm when asked for
        from spar_pl.testing import register_tiny_models

        register_tiny_models()
    if pretrained == "default":
        pretrained = defaults["pretrained"] if name == defaults["model_name"] else None
    if name.startswith("hf-hub:"):
        pretrained = None  # the hub repo holds config and weights
    weights = Path(weights) if weights is not None else None
    big_vision = weights is not None and weights.suffix in (".npz", ".npy")  # numpy arrays: nothing is unpickled
    state = read_state_dict(weights) if weights is not None and not big_vision else None  # safe, before building
    source = f"weights file {weights}" if weights is not None else f"pretrained={pretrained!r}"
    fetch = weights is None and checkpoint is None
    from spar_pl.offline import check_hub

    check_hub(name, pretrained if fetch else None)  # offline: one line at once, not a minute of retries
    try:
        model = open_clip.create_model(
            name, pretrained=pretrained if fetch else None, load_weights=fetch, device=device
        )
        if big_vision:
            open_clip.load_checkpoint(model, str(weights), device=device)
    except Exception as err:
        raise RuntimeError(f"could not build open_clip model {name!r} with {source}: {err}") from err
    if state is not None:
        _load_open_clip_weights(model, state, weights, name, backbone)
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
    encoder = ENCODERS[defaults["family"]](model.eval(), tokenizer=tokenizer, mean=mean, std=std)
    encoder.tokenizer_error = tokenizer_error if encoder.tokenizer is None else None
    encoder.model_name = name
    return encoder


def _load_open_clip_weights(
    model: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str, backbone: str
) -> None:
    """Load an open_clip weights file read by :func:`~spar_pl.weights.read_state_dict` strictly into ``model``,
    with open_clip's own adjustments of its older formats (as ``open_clip.load_checkpoint`` makes them)."""
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


DINOTXT_FILES = (
    "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
    "dinov3_vitl16_dinotxt_vision_head_and_text_encoder-a442d8f5.pth",
)


def describe_state_dict(state: dict[str, torch.Tensor]) -> str:
    """What a weights file looks like, from its keys, for messages about a file of the wrong kind."""
    keys = list(state)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("segmentor.net.") or has("student.model."):
        return "a SPAR checkpoint (pass it as the checkpoint)"
    if "storage_tokens" in state and has("blocks.0.attn.qkv."):
        return "a DINOv3 backbone file (weights=...)"
    if has("text_model.") and has("visual_model.head."):
        return "a dino.txt vision-head and text-encoder file (head_weights=...)"
    if has("visual.trunk.") or has("visual.transformer.") or has("text.transformer.") or has("transformer.resblocks."):
        return "an open_clip model (CLIP or SigLIP/SigLIP2), not a DINOv3.txt file"
    shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
    return f"an unknown layout ({len(keys)} tensors: {shown})"


def build_dinotxt(
    model_name: str | None = None,
    pretrained: str | None = "default",
    weights: str | Path | None = None,
    head_weights: str | Path | None = None,
    has_checkpoint: bool = False,
) -> DinoTxtEncoder:
    """DINOv3.txt from its two local files (``weights``: backbone, ``head_weights``: dino.txt), on the CPU.

    Both files or neither: without them the weights stay random, which needs ``pretrained=None``, the tiny
    twin or a SPAR checkpoint to load next (``has_checkpoint``). A file of the other kind is reported as such.
    """
    name = model_name or str(BACKBONES["dinov3txt"]["model_name"])
    if name not in DINOTXT_ARCHS:
        raise ValueError(f"unknown DINOv3.txt model {name!r}; choose one of {', '.join(DINOTXT_ARCHS)}")
    if (weights is None) != (head_weights is None):
        given, missing = ("weights", "head_weights") if head_weights is None else ("head_weights", "weights")
        raise ValueError(
            f"dinov3txt needs both weight files; {given} is set but {missing} is missing "
            f"(weights={DINOTXT_FILES[0]}, head_weights={DINOTXT_FILES[1]})"
        )
    random_ok = pretrained is None or has_checkpoint or name != BACKBONES["dinov3txt"]["model_name"]
    if weights is None and not random_ok:
        raise ValueError(
            f"dinov3txt needs its two local weight files (DINOv3 License, downloaded from Meta): "
            f"weights={DINOTXT_FILES[0]} and head_weights={DINOTXT_FILES[1]}, or a SPAR checkpoint; "
            "pretrained=None builds random weights"
        )
    encoder = DinoTxtEncoder(DinoTxtModel(name))
    encoder.model_name = name
    if weights is not None:
        state: dict[str, torch.Tensor] = {}
        for path, want, prefix in (
            (weights, "DINOv3 backbone", "visual_model.backbone."),
            (head_weights, "dino.txt", ""),
        ):
            tensors = read_state_dict(path)
            looks = describe_state_dict(tensors)
            if not looks.startswith(f"a {want}"):
                role = "weights" if prefix else "head_weights"
                raise ValueError(f"{role} file {path} is not a {want} file: it looks like {looks}")
            state.update((prefix + k, v) for k, v in tensors.items())
        state = encoder.convert_state_dict(state)
        load_state_strict(encoder.model, state, f"weight files {weights} and {head_weights}", name, "dinov3txt")
    return encoder.eval()
