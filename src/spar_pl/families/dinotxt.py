"""DINOv3.txt (ViT-L/16 backbone + dino.txt text tower), built natively on a timm ``Eva`` trunk and an open_clip
``TextTransformer``: the backbone's final-normed patch tokens of the image stretched bicubically to the next
multiple of the patch, ``h = ceil(H / p)``. Its weights are the two official files (or a SPAR checkpoint), read
through :meth:`DinoTxtEncoder.convert_state_dict`. ``docs/method.md`` section 1.
"""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import timm
import torch
import torch.nn.functional as F
from torch import nn

from spar_pl.families.base import IMAGENET_MEAN, IMAGENET_STD, DenseEncoder
from spar_pl.families.registry import Family, register_family
from spar_pl.weights import load_state_strict, read_state_dict

__all__ = [
    "DINOTXT_ARCHS",
    "DINOTXT_FILES",
    "FAMILY",
    "DinoTxtEncoder",
    "DinoTxtModel",
    "build_dinotxt",
    "describe_state_dict",
]

#: The DINOv3.txt model of the paper's configuration.
DEFAULT_MODEL = "dinov3_vitl16_dinotxt_tet1280d20h24l"

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

    family = "dinotxt"
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
    name = model_name or DEFAULT_MODEL
    if name not in DINOTXT_ARCHS:
        raise ValueError(f"unknown DINOv3.txt model {name!r}; choose one of {', '.join(DINOTXT_ARCHS)}")
    if (weights is None) != (head_weights is None):
        given, missing = ("weights", "head_weights") if head_weights is None else ("head_weights", "weights")
        raise ValueError(
            f"dinov3txt needs both weight files; {given} is set but {missing} is missing "
            f"(weights={DINOTXT_FILES[0]}, head_weights={DINOTXT_FILES[1]})"
        )
    random_ok = pretrained is None or has_checkpoint or name != DEFAULT_MODEL
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


FAMILY = register_family(
    Family(
        name="dinotxt",
        encoder=DinoTxtEncoder,
        summary="DINOv3.txt (timm Eva trunk + dino.txt text tower, local files): final-normed patch tokens",
        recognise=lambda model: isinstance(model, DinoTxtModel),
        recognise_config=lambda cfg: False,  # not an open_clip model
        default_model=DEFAULT_MODEL,
        default_pretrained=None,
        tiny_model="spar-tiny-dinotxt",
        key_fragments=(
            ("visual_model.backbone.", "a DINOv3.txt model (official names)"),
            ("visual.rope.periods", "a DINOv3.txt model"),
        ),
        parity=(
            "the official DINOv3.txt code, full size "
            "(tests/test_family_dinotxt.py::test_parity_with_the_official_dinotxt)"
        ),
        build=build_dinotxt,
        model_names=tuple(DINOTXT_ARCHS),
        geometry=lambda name: (16, 384),  # ViT-L/16; 384: the teacher crop of the authors' configuration
        release_weights=True,
        order=10,
    )
)
