"""The dense-encoder contract every backbone family implements, and the normalisation statistics they use.

A :class:`DenseEncoder` maps a normalised image batch ``(B, 3, H, W)`` of any size to dense features
``(B, C, h, w)`` in the text-embedding space, one vector per patch (class and register tokens dropped). Each
family (:mod:`spar_pl.families`) subclasses it with its dense forward, its geometry and its trainable groups.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import open_clip
import torch
from torch import nn

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LEGACY_MEAN",
    "LEGACY_STD",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "DenseEncoder",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The mean and std of ``maskclip-legacy`` (the reference segmentor's default normalisation).
LEGACY_MEAN = (0.5, 0.5, 0.5)
LEGACY_STD = (0.5, 0.5, 0.5)


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
    backbone: str | None = None  # set by build_encoder: the preset (BACKBONES key) or family name it was built as
    family: str = "custom"  # the registry's family name (spar_pl.families), set by each family's encoder class
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

    @property
    def default_crop(self) -> int:
        """The default sliding-window (teacher) crop: the largest multiple of the patch within the pretraining size
        (378 for a 384 px, patch-14 model; the pretraining size itself when the patch divides it), at least one
        patch."""
        return max(self.patch_size, self.native_size // self.patch_size * self.patch_size)

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
