"""Open-vocabulary segmentation head: class names with synonyms, text embeddings and the mask rule.

``SPAR.md`` section 4: each synonym's embedding is the L2-normalised mean over the 80 OpenAI
ImageNet templates of L2-normalised text features (open_clip's zero-shot classifier builder);
dense features are L2-normalised per location, compared with every synonym, upsampled bilinearly
to the original image size, scaled by ``logit_scale`` and softmaxed over synonyms; a class scores
the max over its synonyms; an optional area threshold suppresses small classes; pixels whose top
score is below ``prob_thd`` become class 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip import OPENAI_IMAGENET_TEMPLATES, build_zero_shot_classifier
from torch import nn

#: The six benchmark class files shipped with the package (same content as the reference's).
BENCHMARK_CLASSES = ("voc21", "voc20", "context60", "context59", "cityscapes", "ade20k")


def benchmark_class_file(name: str) -> Path:
    """Path of a shipped benchmark class file (``voc21``, ``voc20``, ``context60``, ``context59``,
    ``cityscapes``, ``ade20k``)."""
    if name not in BENCHMARK_CLASSES:
        raise ValueError(f"unknown benchmark class list {name!r}; choose one of {', '.join(BENCHMARK_CLASSES)}")
    return Path(str(resources.files("spar_pl") / "classes" / f"{name}.txt"))


def parse_classes(classes: str | Path | Sequence[str]) -> list[list[str]]:
    """Classes as lists of synonyms.

    Args:
        classes: a sequence of class entries, each a name or ``"name, synonym, ..."``; or a path to a
            class file with one such entry per line; or a benchmark name (``voc21`` ...).

    Raises:
        ValueError: the list is empty, an entry is empty, or a class name repeats.
        FileNotFoundError: a class file path does not exist.
    """
    source = "class list"
    if isinstance(classes, (str, Path)):
        path = benchmark_class_file(str(classes)) if str(classes) in BENCHMARK_CLASSES else Path(classes)
        if not path.is_file():
            raise FileNotFoundError(f"class file not found: {path}")
        source = str(path)
        classes = path.read_text(encoding="utf-8").splitlines()
        while classes and not classes[-1].strip():
            classes.pop()
    # The reference splits on ", " and keeps each name as written (a trailing space reaches the prompt too).
    parsed = [str(entry).rstrip("\r\n").split(", ") for entry in classes]
    if not parsed:
        raise ValueError(f"{source}: no classes")
    seen: dict[str, tuple[int, str]] = {}  # names that differ only in case or surrounding spaces are one name
    for k, synonyms in enumerate(parsed):
        if not all(name.strip() for name in synonyms):
            raise ValueError(f"{source}: class {k} ({', '.join(synonyms)!r}) has an empty name")
        for name in synonyms:
            key = name.strip().casefold()
            if key in seen and seen[key][0] != k:
                first, prev = seen[key]
                raise ValueError(
                    f"{source}: duplicate class name: {prev!r} (class {first}) and {name!r} (class {k}); "
                    f"name {name!r} appears in classes {first} and {k}"
                )
            seen[key] = (k, name)
    return parsed


class OpenVocabHead(nn.Module):
    """Scores dense features against class-name text embeddings and turns them into masks.

    Args:
        encoder: the :class:`~spar_pl.encoders.DenseEncoder` whose text tower embeds the names.
        classes: class entries, a class-file path or a benchmark name (:func:`parse_classes`).
        logit_scale: multiplier on cosine similarities before the softmax.
        prob_thd: pixels whose best class score is below this become class 0.
        area_thd: if set, classes other than 0 covering at most this fraction of the non-class-0
            predicted pixels of an image are suppressed (their scores zeroed) before the argmax.
        templates: prompt templates; the 80 OpenAI ImageNet templates by default.
    """

    def __init__(
        self,
        encoder: nn.Module,
        classes: str | Path | Sequence[str],
        logit_scale: float = 40.0,
        prob_thd: float = 0.0,
        area_thd: float | None = None,
        templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.classes = parse_classes(classes)
        self.synonyms = [name for names in self.classes for name in names]
        self.register_buffer(
            "synonym_class",
            torch.tensor([k for k, names in enumerate(self.classes) for _ in names]),
            persistent=False,
        )
        self.logit_scale = float(logit_scale)
        self.prob_thd = float(prob_thd)
        self.area_thd = area_thd
        self.templates = tuple(templates)
        self._text_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def text_embeddings(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Synonym embeddings ``(S, C)``, computed once per device and dtype."""
        device = torch.device(device)
        key = (device, dtype)
        if key not in self._text_cache:
            model = self.encoder.model
            was_training = model.training
            model.eval()
            weights = build_zero_shot_classifier(
                model, self.encoder.tokenizer, self.synonyms, self.templates, num_classes_per_batch=10, device=device
            )
            model.train(was_training)
            self._text_cache[key] = weights.T.to(dtype).contiguous()
        return self._text_cache[key]

    def synonym_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Cosine similarities ``(B, S, h, w)`` of L2-normalised features with every synonym."""
        text = self.text_embeddings(feats.device)
        return torch.einsum("bchw,sc->bshw", F.normalize(feats.float(), dim=1), text)

    def forward(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Per-class scores ``(B, K, H0, W0)``: softmax over synonyms at ``size``, max over each class's synonyms."""
        logits = F.interpolate(self.synonym_logits(feats), size=tuple(size), mode="bilinear", align_corners=False)
        probs = (logits * self.logit_scale).softmax(dim=1)
        if len(self.synonyms) == self.num_classes:
            return probs
        b, _, h, w = probs.shape
        index = self.synonym_class.view(1, -1, 1, 1).expand_as(probs)
        out = probs.new_zeros(b, self.num_classes, h, w)
        return out.scatter_reduce_(1, index, probs, reduce="amax", include_self=False)

    def predict(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Class-index masks ``(B, H0, W0)`` (int64) after the area and probability thresholds."""
        return self.mask(self(feats, size))

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Apply the area threshold, argmax and probability threshold to per-class scores ``(B, K, H, W)``."""
        if self.area_thd is not None:
            b, k = scores.shape[:2]
            pred = scores.argmax(dim=1).flatten(1) + torch.arange(b, device=scores.device)[:, None] * k
            area = torch.bincount(pred.flatten(), minlength=b * k).view(b, k)[:, 1:]  # pixels per class but 0
            keep = area > self.area_thd * area.sum(dim=1, keepdim=True)
            scores = torch.cat([scores[:, :1], scores[:, 1:] * keep[:, :, None, None].to(scores.dtype)], dim=1)
        top, pred = scores.max(dim=1)
        return pred.masked_fill(top < self.prob_thd, 0)
