"""Open-vocabulary segmentation head: class names with synonyms, text embeddings and the mask rule.

``docs/method.md`` section 4: each synonym's embedding is the L2-normalised mean over the 80 OpenAI
ImageNet templates of L2-normalised text features (open_clip's zero-shot classifier builder);
dense features are L2-normalised per location, compared with every synonym, upsampled bilinearly
to the original image size, scaled by ``logit_scale`` and softmaxed over synonyms; a class scores
the max over its synonyms; an optional area threshold suppresses small classes; pixels whose top
score is below ``prob_thd`` become class 0.

Memory: the rule runs over chunks of whole classes at the original size (:meth:`OpenVocabHead.predict`):
a running maximum, its synonym and a running log-sum-exp per pixel, never a full ``K x H x W`` tensor;
the argmax of the synonym-max probabilities is the class of the largest logit (softmax is monotone), and
a class's probability is ``exp(scale * max logit - logsumexp)``. Probabilities, when asked for, are handed
out chunk by chunk (float16 files written in pieces).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip import OPENAI_IMAGENET_TEMPLATES, build_zero_shot_classifier
from torch import nn

from spar_pl.pamr import PAMR_DILATIONS, pamr_affinity, pamr_refine
from spar_pl.sliding import SEGMENT_MODES, SlidingWindowLogits, default_crop, dense_features, resolve_mode

#: The six benchmark class files shipped with the package (same content as the reference's).
BENCHMARK_CLASSES = ("voc21", "voc20", "context60", "context59", "cityscapes", "ade20k")


def benchmark_class_file(name: str) -> Path:
    """Path of a shipped benchmark class file (``voc21``, ``voc20``, ``context60``, ``context59``,
    ``cityscapes``, ``ade20k``)."""
    if name not in BENCHMARK_CLASSES:
        raise ValueError(f"unknown benchmark class list {name!r}; choose one of {', '.join(BENCHMARK_CLASSES)}")
    return Path(str(resources.files("spar_pl") / "classes" / f"{name}.txt"))


def parse_classes(
    classes: str | Path | Sequence[str], min_classes: int = 1, option: str | None = None
) -> list[list[str]]:
    """Classes as lists of synonyms: the one parser of class lists (configs, the API, the command line, class files).

    Args:
        classes: a sequence of class entries, each a name or ``"name, synonym, ..."``, or already a list of
            synonyms (what this function returns parses to itself); or a path to a class file with one such entry
            per line; or a benchmark name (``voc21`` ...).
        min_classes: the fewest classes accepted; segmentation needs two (one class segments nothing, and a
            single entry with commas is most often a class list mistaken for synonyms).
        option: the command-line option the entries come from (``--classes``): each entry is then one argument,
            commas inside it separate synonyms whatever the spaces around them, and an empty argument or synonym
            is named.

    Raises:
        ValueError: too few classes, an empty entry or name, a class name that repeats (names differing only in
            case count as one), or a string with commas that is not a class file.
        TypeError: an entry that is neither a string nor a list of strings.
        FileNotFoundError: a class file path does not exist.
    """
    source = "class list"
    if option is not None:
        classes = _argument_entries(classes, option)
    elif isinstance(classes, str) and "," in classes and not Path(classes).is_file():
        raise ValueError(
            f"classes {classes!r} is a string but not a class file; pass a list of class names, e.g. "
            f"['road', 'car', 'sky'], a class-file path or a benchmark name ({', '.join(BENCHMARK_CLASSES)})"
        )
    if isinstance(classes, (str, Path)):
        path = benchmark_class_file(str(classes)) if str(classes) in BENCHMARK_CLASSES else Path(classes)
        if not path.is_file():
            raise FileNotFoundError(f"class file not found: {path}")
        source = str(path)
        classes = path.read_text(encoding="utf-8").splitlines()
        while classes and not classes[-1].strip():
            classes.pop()
    # The reference splits on ", " and keeps each name as written (a trailing space reaches the prompt too).
    parsed = []
    for k, entry in enumerate(classes):
        if isinstance(entry, str):
            parsed.append(entry.rstrip("\r\n").split(", "))
        elif isinstance(entry, (list, tuple)) and all(isinstance(name, str) for name in entry):
            if not entry:
                raise ValueError(f"{source}: class {k} has no name")
            parsed.append(list(entry))  # already split into synonyms
        else:
            raise TypeError(f"{source}: class {k} is {entry!r}; expected a name, 'name, synonym' or a list of names")
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
    if len(parsed) < min_classes:
        hint = f": {', '.join(parsed[0])!r} are synonyms of one class" if len(parsed[0]) > 1 else ""
        raise ValueError(
            f"segmentation needs at least {_count(min_classes)} classes, got {_count(len(parsed))}{hint}; give one "
            "entry per class "
            "(command line: one argument per class, e.g. --classes road car sky; commas inside an entry list its "
            "synonyms)"
        )
    return parsed


def _count(n: int) -> str:
    return {1: "one", 2: "two", 3: "three"}.get(n, str(n))


def _argument_entries(arguments: Sequence[str], option: str) -> list[str]:
    """Class entries from command-line arguments (:func:`parse_classes` with ``option``)."""
    if not arguments:
        raise ValueError(f'{option} is empty: give one class per argument, e.g. {option} road car "person, pedestrian"')
    entries = []
    for k, argument in enumerate(arguments, 1):
        names = [name.strip() for name in str(argument).split(",")]
        if not any(names):
            raise ValueError(f"{option}: argument {k} is empty")
        if not all(names):
            raise ValueError(f"{option} {argument!r}: a synonym is empty (two commas in a row or a trailing comma?)")
        entries.append(", ".join(names))
    return entries


def text_embeddings(
    encoder: nn.Module,
    names: Sequence[str],
    templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Embeddings ``(S, C)`` (float32, L2-normalised) of ``names`` from an encoder's text tower: per name, the
    L2-normalised mean over ``templates`` of L2-normalised text features (open_clip's zero-shot classifier).

    Args:
        encoder: a :class:`~spar_pl.encoders.DenseEncoder` (its ``model`` and ``tokenizer``).
        names: one entry per synonym.
        device: where the text tower runs (default: the encoder's device).
    """
    model = encoder.model
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):  # the text tower in float32, whatever the encoder runs
            weights = build_zero_shot_classifier(
                model, encoder.tokenizer, list(names), tuple(templates), num_classes_per_batch=10, device=device
            )
    finally:
        model.train(was_training)
    return weights.T.float().contiguous()


class OpenVocabHead(nn.Module):
    """Scores dense features against class-name text embeddings and turns them into masks.

    The head holds the synonyms' text embeddings (a buffer), not an encoder: build it from an encoder's text
    tower with :meth:`from_encoder`, or from embeddings computed elsewhere.

    Args:
        text: synonym embeddings ``(S, C)``, L2-normalised, one row per synonym of ``classes`` in order.
        classes: class entries, a class-file path or a benchmark name (:func:`parse_classes`).
        logit_scale: multiplier on cosine similarities before the softmax.
        prob_thd: pixels whose best class score is below this become class 0.
        area_thd: if set, classes other than 0 covering at most this fraction of the non-class-0
            predicted pixels of an image are suppressed (their scores zeroed) before the argmax.
        pamr_steps: iterations of pixel-adaptive mask refinement of the cosine logits at the original size before
            the mask rule (:mod:`spar_pl.pamr`; NACLIP's protocol: 10); 0 turns it off. It needs the image: pass
            ``images`` to :meth:`predict` (:meth:`segment` does).
        pamr_dilations: PAMR's neighbourhood dilations (NACLIP's: 8 and 16).
    """

    def __init__(
        self,
        text: torch.Tensor,
        classes: str | Path | Sequence[str],
        logit_scale: float = 40.0,
        prob_thd: float = 0.0,
        area_thd: float | None = None,
        pamr_steps: int = 0,
        pamr_dilations: Sequence[int] = PAMR_DILATIONS,
    ) -> None:
        super().__init__()
        if pamr_steps < 0 or not pamr_dilations or min(pamr_dilations) < 1:
            raise ValueError(
                f"PAMR needs pamr_steps >= 0 and positive dilations, got {pamr_steps} and {tuple(pamr_dilations)}"
            )
        self.classes = parse_classes(classes)
        self.synonyms = [name for names in self.classes for name in names]
        if text.ndim != 2 or text.shape[0] != len(self.synonyms):
            raise ValueError(
                f"text embeddings of shape {tuple(text.shape)} for {len(self.synonyms)} synonyms; expected "
                f"({len(self.synonyms)}, C)"
            )
        self.register_buffer("text", text.detach().float().contiguous(), persistent=False)
        #: index of each class's first synonym, and the synonym count last: class k is synonyms starts[k]:starts[k+1]
        self.starts = [0, *itertools.accumulate(len(names) for names in self.classes)]
        self.register_buffer(
            "synonym_class",
            torch.tensor([k for k, names in enumerate(self.classes) for _ in names]),
            persistent=False,
        )
        self.logit_scale = float(logit_scale)
        self.prob_thd = float(prob_thd)
        self.area_thd = area_thd
        self.pamr_steps = int(pamr_steps)
        self.pamr_dilations = tuple(int(d) for d in pamr_dilations)

    @classmethod
    def from_encoder(
        cls,
        encoder: nn.Module,
        classes: str | Path | Sequence[str],
        templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES,
        device: torch.device | str | None = None,
        **kwargs,
    ) -> OpenVocabHead:
        """The head of ``classes`` with embeddings from ``encoder``'s text tower (:func:`text_embeddings`), computed
        once, on ``device`` (default: the encoder's); ``kwargs``: ``logit_scale``, ``prob_thd``, ``area_thd``,
        ``pamr_steps``, ``pamr_dilations``."""
        parsed = parse_classes(classes)
        text = text_embeddings(encoder, [name for names in parsed for name in names], templates, device)
        return cls(text, parsed, **kwargs)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def synonym_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Cosine similarities ``(B, S, h, w)`` of L2-normalised features with every synonym."""
        text = self.text.to(feats.device)
        with torch.autocast(feats.device.type, enabled=False):  # float32 under a mixed-precision encoder
            return torch.einsum("bchw,sc->bshw", F.normalize(feats.float(), dim=1), text)

    def forward(self, feats: torch.Tensor, size: tuple[int, int], images: torch.Tensor | None = None) -> torch.Tensor:
        """Per-class scores ``(B, K, H0, W0)``: softmax over synonyms at ``size``, max over each class's synonyms.

        This holds the whole ``K x H0 x W0`` tensor; :meth:`predict` computes masks (and, if asked, the same
        scores chunk by chunk) in bounded memory. ``images``: see :meth:`predict` (PAMR only).
        """
        logits = F.interpolate(self.synonym_logits(feats), size=tuple(size), mode="bilinear", align_corners=False)
        if self.pamr_steps:
            logits = self._refined(lambda s0, s1: logits[:, s0:s1], images, tuple(size))(0, logits.shape[1])
        return self.class_scores((logits * self.logit_scale).softmax(dim=1))

    def class_scores(self, probs: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Max over each class's synonyms of synonym probabilities ``(B, S', H, W)`` for the classes from ``first``."""
        if len(self.synonyms) == self.num_classes:
            return probs
        index = self.synonym_class.to(probs.device)[self.starts[first] :][: probs.shape[1]] - first
        out = probs.new_zeros(probs.shape[0], int(index.max()) + 1, *probs.shape[2:])
        index = index.view(1, -1, 1, 1).expand_as(probs)
        return out.scatter_reduce_(1, index, probs, reduce="amax", include_self=False)

    def class_chunks(self, pixels: int, budget_bytes: int = 1 << 26) -> list[tuple[int, int]]:
        """Ranges ``(k0, k1)`` of whole classes whose synonyms' float32 maps of ``pixels`` fit ``budget_bytes``."""
        per = max(1, budget_bytes // max(4 * pixels, 1))
        chunks, start, count = [], 0, 0
        for k, names in enumerate(self.classes):
            if count and count + len(names) > per:
                chunks.append((start, k))
                start, count = k, 0
            count += len(names)
        chunks.append((start, self.num_classes))
        return chunks

    def predict(
        self,
        feats: torch.Tensor,
        size: tuple[int, int],
        probs_out: Callable[[int, int, torch.Tensor], None] | None = None,
        images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class-index masks ``(B, H0, W0)`` (int64) after the area and probability thresholds, in bounded memory.

        Args:
            feats: dense features ``(B, C, h, w)``.
            size: the original image size ``(H0, W0)``; logits are resized bilinearly to it.
            probs_out: called as ``probs_out(k0, k1, scores)`` with the per-class scores ``(B, k1 - k0, H0, W0)``
                (float32, as :meth:`forward` gives them) of consecutive chunks of classes, in order.
            images: the (normalised) image batch the features are of, at any size; needed only by PAMR.
        """
        logits = self.synonym_logits(feats)
        size = tuple(size)

        def chunk(s0: int, s1: int) -> torch.Tensor:
            return F.interpolate(logits[:, s0:s1], size=size, mode="bilinear", align_corners=False)

        return self.predict_chunked(chunk, logits.shape[0], size, logits.device, probs_out, images=images)

    def predict_sliding(
        self,
        encoder: nn.Module,
        images: torch.Tensor,
        size: tuple[int, int],
        crop: int,
        stride: int,
        window_batch: int = 16,
        probs_out: Callable[[int, int, torch.Tensor], None] | None = None,
        budget_bytes: int = 1 << 26,
    ) -> torch.Tensor:
        """Class-index masks of the logits-level sliding window of the authors' evaluation
        (:class:`~spar_pl.sliding.SlidingWindowLogits`): window logits averaged on a full-resolution canvas,
        resized to ``size``, then the mask rule, all in chunks of classes."""
        source = SlidingWindowLogits(encoder, images, self.text, crop, stride, window_batch, size)
        # the canvas is at the input size, which may exceed the output size: size chunks for the larger
        scale = (size[0] * size[1]) / max(size[0] * size[1], images.shape[-2] * images.shape[-1])
        budget = int(budget_bytes * scale)
        return self.predict_chunked(source, images.shape[0], size, images.device, probs_out, budget, images)

    def segment(
        self,
        encoder: nn.Module,
        images: torch.Tensor,
        size: tuple[int, int],
        mode: str = "single",
        crop: int | None = None,
        stride: int = 24,
        window_batch: int = 16,
        probs_out: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Class-index masks ``(B, H0, W0)`` of normalised images through ``encoder``: every caller's one road from
        an image batch to masks.

        Args:
            mode: ``single`` (one pass, then :meth:`predict`); ``sliding-logits`` (the authors' evaluation
                baseline, :meth:`predict_sliding`); ``sliding-features`` (the teacher's features,
                :func:`~spar_pl.sliding.dense_features`, then :meth:`predict`); ``sliding``: ``sliding-logits``
                (:func:`~spar_pl.sliding.resolve_mode`).
            crop: window side (default: :func:`~spar_pl.sliding.default_crop`, the largest multiple of the patch
                within the encoder's pretraining size); stride, window_batch: the window's.
            size, probs_out: see :meth:`predict`.
        """
        mode = resolve_mode(mode, SEGMENT_MODES)
        if mode == "sliding-logits":
            crop = int(crop or default_crop(encoder))
            return self.predict_sliding(encoder, images, size, crop, stride, window_batch, probs_out)
        feats = dense_features(encoder, images, mode, crop, stride, window_batch)
        return self.predict(feats, size, probs_out, images)

    def predict_chunked(
        self,
        logits: Callable[[int, int], torch.Tensor],
        batch: int,
        size: tuple[int, int],
        device: torch.device,
        probs_out: Callable[[int, int, torch.Tensor], None] | None = None,
        budget_bytes: int = 1 << 26,
        images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mask rule over logits given chunk by chunk: ``logits(s0, s1)`` are the cosine logits
        ``(B, s1 - s0, H0, W0)`` of synonyms ``s0:s1`` at the original size (called for whole classes).

        Pass 1 keeps per pixel the largest scaled logit, its synonym and the log-sum-exp over all synonyms;
        the area threshold needs a second pass over the kept classes, probabilities a pass of their own. With PAMR
        on, every chunk's logits are refined (:func:`~spar_pl.pamr.pamr_refine`) with the affinity of ``images``
        resized bilinearly to the original size, as NACLIP does.
        """
        if self.pamr_steps:
            logits, budget_bytes = self._refined(logits, images, size), budget_bytes // 4  # PAMR's working copies
        synonym_class = self.synonym_class.to(device)
        chunks = self.class_chunks(batch * size[0] * size[1], budget_bytes)
        best = torch.full((batch, *size), -torch.inf, device=device)
        best_syn = torch.zeros((batch, *size), dtype=torch.long, device=device)
        lse = torch.full((batch, *size), -torch.inf, device=device)
        for k0, k1 in chunks:
            s0, s1 = self.starts[k0], self.starts[k1]
            z = logits(s0, s1).float() * self.logit_scale
            top, arg = z.max(dim=1)
            better = top > best  # strict: ties keep the earlier synonym, hence the lower class, as argmax does
            best = torch.where(better, top, best)
            best_syn = torch.where(better, arg + s0, best_syn)
            lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1))
            del z
        pred = synonym_class[best_syn]
        if self.area_thd is not None:
            k = self.num_classes
            flat = pred.flatten(1) + torch.arange(batch, device=device)[:, None] * k
            area = torch.bincount(flat.flatten(), minlength=batch * k).view(batch, k)[:, 1:]  # pixels per class but 0
            keep = torch.cat([area.new_ones(batch, 1, dtype=torch.bool), area > self.area_thd * area.sum(1, True)], 1)
            if not bool(keep.all()):
                best = torch.full_like(best, -torch.inf)
                for k0, k1 in chunks:
                    s0, s1 = self.starts[k0], self.starts[k1]
                    z = logits(s0, s1).float() * self.logit_scale
                    kept = keep[:, synonym_class[s0:s1]]  # (B, s1 - s0): suppressed classes score 0
                    z = z.masked_fill(~kept[:, :, None, None], -torch.inf)
                    top, arg = z.max(dim=1)
                    better = top > best
                    best = torch.where(better, top, best)
                    pred = torch.where(better, synonym_class[arg + s0], pred)
                    del z
        pred = pred.masked_fill(torch.exp(best - lse) < self.prob_thd, 0)
        if probs_out is not None:
            for k0, k1 in chunks:
                s0, s1 = self.starts[k0], self.starts[k1]
                probs = torch.exp(logits(s0, s1).float() * self.logit_scale - lse[:, None])
                probs_out(k0, k1, self.class_scores(probs, k0))
        return pred

    def _refined(
        self, logits: Callable[[int, int], torch.Tensor], images: torch.Tensor | None, size: tuple[int, int]
    ) -> Callable[[int, int], torch.Tensor]:
        """``logits`` with PAMR applied to every chunk (the affinity of ``images`` at ``size`` computed once)."""
        if images is None:
            raise ValueError("PAMR (pamr_steps > 0) needs the images: pass images= to predict")
        with torch.autocast(images.device.type, enabled=False):
            resized = F.interpolate(images.float(), size=tuple(size), mode="bilinear", align_corners=False)
            affinity = pamr_affinity(resized, self.pamr_dilations)

        def refined(s0: int, s1: int) -> torch.Tensor:
            with torch.autocast(affinity.device.type, enabled=False):
                return pamr_refine(logits(s0, s1).float(), affinity, self.pamr_steps, self.pamr_dilations)

        return refined

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
