"""Inference on your own images: :func:`load` returns a :class:`SPAR` with ``.features`` and ``.segment``.

:func:`segment_images` and :func:`write_feature_files` are ``spar-cli segment`` and ``spar-cli features``: the same
model over files and folders of images (collecting image files, output names that never collide, a run that
continues past bad files).

Input images of any kind become one float RGB tensor ``(3, H, W)`` in ``[0, 1]`` through the one image reader
shared with training and evaluation (:func:`spar_pl.images.read_image`: EXIF orientation, transparency over white,
16-bit and grayscale, size limits); ``max_side`` then downscales the image (keeping its aspect ratio, bicubic with
antialiasing) before the model; masks, probabilities and upsampled features still come out at the original size.
An image whose model input exceeds :data:`~spar_pl.images.MAX_SIDE` pixels on a side or
:data:`~spar_pl.images.MAX_PIXELS` in all is refused with a message suggesting ``max_side``, rather than tiled:
tiles would change what the single-pass model sees, and a ViT over that many patches is impractical anyway.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from spar_pl.encoders import DenseEncoder, ModelSpec, model_spec
from spar_pl.fileio import safetensors_writer, save_safetensors
from spar_pl.images import (
    IMAGE_SUFFIXES,
    ImageInput,
    ImageInputError,
    describe,
    fit_size,
    read_image,
    to_pil,
)
from spar_pl.openvocab import OpenVocabHead, parse_classes
from spar_pl.render import label_image, overlay, save_atomic
from spar_pl.runner import UsageError, check_writable
from spar_pl.sliding import FEATURE_MODES, SEGMENT_MODES, check_window, dense_features, resolve_mode

__all__ = [
    "SPAR",
    "ModelSpec",
    "ImageInputError",
    "Segmentation",
    "collect_images",
    "load",
    "output_stems",
    "read_image",
    "run_images",
    "segment_images",
    "write_feature_files",
]

#: ``format`` metadata of the features files written by :meth:`SPAR.write_features`.
FEATURES_FORMAT = "spar-pl/features/v1"


# -- results ---------------------------------------------------------------------------------------------


@dataclass
class Segmentation:
    """An open-vocabulary segmentation of one image, at the image's original size.

    Attributes:
        mask: ``(H, W)`` int64 class indices into :attr:`classes`.
        classes: a display name per class (the first synonym).
        synonyms: every class's names, as given.
        image: the RGB input image (what :meth:`overlay` draws on).
        probs: ``(K, H, W)`` float16 per-class scores (max over synonyms), when asked for.
    """

    mask: np.ndarray
    classes: list[str]
    synonyms: list[list[str]]
    image: Image.Image
    probs: torch.Tensor | None = None

    def present(self) -> list[str]:
        """Names of the classes in the mask, largest area first."""
        values, counts = np.unique(self.mask, return_counts=True)
        return [self.classes[k] for k in values[np.argsort(-counts, kind="stable")]]

    def overlay(self, alpha: float = 0.55) -> Image.Image:
        """The image with the colour-coded mask blended over it and a legend of the classes present."""
        return overlay(self.image, self.mask, self.classes, alpha=alpha)

    def labels(self) -> Image.Image:
        """The mask as a palette PNG image (pixel values are class indices)."""
        return label_image(self.mask, len(self.classes))

    def save(self, out_dir: str | Path, stem: str, probs: bool = False, name: str = "{stem}_{kind}") -> list[Path]:
        """Write ``<stem>_overlay.png``, ``<stem>_labels.png`` and, with ``probs``, ``<stem>_probs.safetensors``.

        Every file is written atomically. The probabilities are float16 ``(K, H, W)`` under the key ``probs``,
        with the class names (JSON) in the metadata. ``name`` spells the file names (``{kind}_{stem}`` gives
        ``overlay_<stem>.png`` ...).
        """
        out = Path(out_dir)
        paths = [
            save_atomic(self.overlay(), out / f"{name.format(stem=stem, kind='overlay')}.png"),
            save_atomic(self.labels(), out / f"{name.format(stem=stem, kind='labels')}.png"),
        ]
        if probs:
            if self.probs is None:
                raise ValueError("no probabilities to save: call segment(..., return_probs=True)")
            meta = {"classes": json.dumps(self.classes), "synonyms": json.dumps(self.synonyms), "layout": "KHW"}
            path = out / f"{name.format(stem=stem, kind='probs')}.safetensors"
            paths.append(save_safetensors({"probs": self.probs.half()}, path, meta))
        return paths


# -- the model -------------------------------------------------------------------------------------------


def load(
    spec: ModelSpec | str | None = None,
    *,
    device: str | torch.device | None = None,
    precision: str = "32-true",
    **fields,
) -> SPAR:
    """Build a SPAR model for inference: ``load("siglip2", checkpoint="spar_siglip2.ckpt")``.

    Args:
        spec: a :class:`~spar_pl.encoders.ModelSpec`, a backbone (a paper preset, ``siglip2``, ``maskclip``,
            ``maskclip-legacy``, ``dinov3txt``, or a family name) or an ``hf-hub:ORG/NAME`` / ``local-dir:PATH`` id
            of an exported student.
        device: ``cuda`` when available, else ``cpu``, by default.
        precision: Lightning's names: ``32-true`` (float32), ``bf16-mixed`` or ``16-mixed`` (autocast around the
            encoder and the sliding window; the text similarity and mask rule stay float32).
        fields: :class:`~spar_pl.encoders.ModelSpec` fields set over ``spec``: ``model_name``, ``pretrained``,
            ``weights``, ``head_weights``, ``checkpoint`` (a SPAR checkpoint, loaded strictly; none keeps the
            pretrained, not distilled, weights), ``dense`` (the clip family's last-block recipe).

    Raises:
        FileNotFoundError: the checkpoint or weights file does not exist (the message names it).
        ValueError: the checkpoint is unreadable or does not match the model.
    """
    spec = model_spec(spec, **fields)
    spec.check_files()
    autocast(precision, "cpu")  # an unknown precision fails before the model is built
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = spec.build(device)
    return SPAR(encoder, encoder.backbone, checkpoint=spec.checkpoint, precision=precision)


#: Inference precisions, by Lightning's names.
PRECISIONS = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast context of a precision (Lightning's names) on a device; ``32-true`` runs none."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class SPAR:
    """A dense encoder ready for inference: features and open-vocabulary segmentation of single images.

    Args:
        encoder: the :class:`~spar_pl.encoders.DenseEncoder` (put in eval mode).
        backbone: its backbone name, recorded in written files.
        checkpoint: the checkpoint it was loaded from, recorded in written files.
        precision: ``32-true``, ``bf16-mixed`` or ``16-mixed`` (:func:`autocast` around the encoder).
    """

    def __init__(
        self, encoder: DenseEncoder, backbone: str, checkpoint: str | Path | None = None, precision: str = "32-true"
    ) -> None:
        autocast(precision, "cpu")
        self.encoder = encoder.eval()
        self.backbone = backbone
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.precision = precision
        self._head: OpenVocabHead | None = None

    def __repr__(self) -> str:
        return f"SPAR(backbone={self.backbone!r}, model={self.model_name!r}, device={str(self.device)!r})"

    @property
    def model_name(self) -> str:
        return self.encoder.model_name

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def _input(self, image: ImageInput, max_side: int | None) -> tuple[torch.Tensor, torch.Tensor, str]:
        """The original pixels ``(3, H, W)``, the normalised model input ``(1, 3, h, w)`` and the input's name."""
        pixels = read_image(image, max_side)
        height, width = pixels.shape[-2:]
        w, h = fit_size(width, height, max_side)
        x = pixels[None].to(self.device)
        if (h, w) != (height, width):
            x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        return pixels, self.encoder.normalize(x), describe(image)

    def _encode(self, x: torch.Tensor, name: str, mode: str, stride: int, crop: int | None) -> torch.Tensor:
        """Single-pass (``single``) or sliding-window teacher (``sliding-features``) features of a normalised input."""
        try:
            with torch.inference_mode(), autocast(self.precision, x.device):
                return dense_features(self.encoder, x, mode, crop, stride).float()
        except ValueError as err:  # e.g. an image smaller than one patch: say which image
            raise ImageInputError(f"{name}: {err}") from err

    def check_mode(self, mode: str, stride: int, modes: Sequence[str], crop: int | None = None) -> str:
        """``mode`` resolved among ``modes`` (:func:`~spar_pl.sliding.resolve_mode`: ``sliding`` is the context's
        sliding window), its window checked (:func:`~spar_pl.sliding.check_window`). Raises ``ValueError``."""
        mode = resolve_mode(mode, tuple(modes))
        if mode != "single":
            check_window(int(crop or self.encoder.default_crop), stride, self.encoder.patch_size)
        return mode

    def features(
        self,
        image: ImageInput,
        mode: str = "single",
        stride: int = 24,
        crop: int | None = None,
        upsample: bool = False,
        max_side: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Dense features ``(1, C, h, w)`` (NCHW) of one image, on the model's device.

        Args:
            image: a path, PIL image, numpy array or tensor (see the module notes).
            mode: ``single`` (one pass, SPAR's point) or ``sliding-features`` (the sliding-window teacher;
                ``sliding`` for short).
            stride: window stride of the sliding mode.
            crop: window side of the sliding mode (default: the largest multiple of the patch within the model's
                pretraining size).
            upsample: resize the features bilinearly to the original image size ``(H, W)``, as the segmentation
                head resizes its logits; otherwise ``h, w`` is the patch grid of the model input.
            max_side: downscale the image so that its long side is at most this before the model.
            dtype: dtype of the result; upsampling runs in channel chunks, so a float16 result never needs a
                full-size float32 copy.
        """
        return self._features(image, mode, stride, crop, upsample, max_side, dtype)[0]

    def _features(self, image, mode, stride, crop, upsample, max_side, dtype) -> tuple[torch.Tensor, dict[str, str]]:
        """:meth:`features` and a description of the run (the metadata of :meth:`write_features`)."""
        feats, info = self._encoded(image, mode, stride, crop, upsample, max_side, dtype)
        if upsample:
            out = feats.new_empty((1, feats.shape[1], int(info["image_height"]), int(info["image_width"])), dtype=dtype)
            for start, part in self._upsampled(feats, out.shape[-2:], dtype):
                out[:, start : start + part.shape[1]] = part
            feats = out
        return feats.to(dtype), info

    @staticmethod
    def _upsampled(feats: torch.Tensor, size, dtype: torch.dtype, channels: int = 64):
        """``(start, piece)`` of the features resized to ``size``, in chunks of channels (bounded memory)."""
        for start in range(0, feats.shape[1], channels):
            part = feats[:, start : start + channels]
            part = F.interpolate(part, size=tuple(size), mode="bilinear", align_corners=False)
            yield start, part.to(dtype)

    def _encoded(self, image, mode, stride, crop, upsample, max_side, dtype) -> tuple[torch.Tensor, dict[str, str]]:
        """Patch-grid features of an image (float32) and the metadata of the run."""
        mode = self.check_mode(mode, stride, FEATURE_MODES, crop)
        pixels, x, name = self._input(image, max_side)
        feats = self._encode(x, name, mode, stride, crop)
        size = tuple(pixels.shape[-2:])
        sliding = mode != "single"
        info = {
            "format": FEATURES_FORMAT,
            "layout": "NCHW",
            "backbone": self.backbone,
            "model": self.model_name,
            "checkpoint": self.checkpoint or "",
            "mode": mode,
            "stride": str(stride) if sliding else "",
            "crop": str(crop or self.encoder.default_crop) if sliding else "",
            "image_height": str(size[0]),
            "image_width": str(size[1]),
            "input_height": str(x.shape[-2]),
            "input_width": str(x.shape[-1]),
            "patch_size": str(self.encoder.patch_size),
            "upsampled": str(bool(upsample)).lower(),
            "dtype": str(dtype).removeprefix("torch."),
            "precision": self.precision,
            "source": name,
        }
        return feats, info

    def write_features(
        self,
        image: ImageInput,
        path: str | Path,
        mode: str = "single",
        stride: int = 24,
        crop: int | None = None,
        upsample: bool = False,
        max_side: int | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> Path:
        """Compute :meth:`features` and write them to a safetensors file (atomically).

        The file holds one tensor, ``features`` ``(1, C, h, w)`` in ``dtype``, and string metadata: ``format``,
        ``layout`` (``NCHW``), ``backbone``, ``model``, ``checkpoint``, ``mode``, ``stride`` and ``crop``
        (sliding mode only, else empty), ``image_height``/``image_width`` (the original image),
        ``input_height``/``input_width`` (what the model saw, after ``max_side``), ``patch_size``, ``upsampled``
        (``true``: ``h, w`` = the image size), ``dtype`` and ``source`` (the input's name).
        """
        feats, info = self._encoded(image, mode, stride, crop, upsample, max_side, dtype)
        if not upsample:
            return save_safetensors({"features": feats.to(dtype)}, path, info)
        size = (int(info["image_height"]), int(info["image_width"]))
        with safetensors_writer(path, "features", (1, feats.shape[1], *size), dtype, info) as write:
            for _, part in self._upsampled(feats, size, dtype):  # written in pieces: never the whole C x H x W
                write(part)
        return Path(path)

    def head(self, classes: str | Path | Sequence[str], logit_scale: float = 40.0, prob_thd: float = 0.0):
        """The :class:`~spar_pl.openvocab.OpenVocabHead` for these classes; the last one is reused (and its text
        embeddings with it) while the classes and settings stay the same.

        Raises:
            ValueError: a bad class list, or a single class (nothing to segment; commas in an entry list synonyms).
        """
        parsed = parse_classes(classes, min_classes=2)
        head = self._head
        if head is None or (head.classes, head.logit_scale, head.prob_thd) != (parsed, logit_scale, prob_thd):
            entries = [", ".join(names) for names in parsed]
            head = self._head = OpenVocabHead.from_encoder(
                self.encoder, entries, logit_scale=logit_scale, prob_thd=prob_thd
            )
        return head

    def segment(
        self,
        image: ImageInput,
        classes: str | Path | Sequence[str],
        mode: str = "single",
        stride: int = 24,
        crop: int | None = None,
        logit_scale: float = 40.0,
        prob_thd: float = 0.0,
        max_side: int | None = None,
        return_probs: bool = False,
        probs_file: str | Path | None = None,
        window_batch: int = 16,
    ) -> Segmentation:
        """Open-vocabulary segmentation of one image (``docs/method.md`` section 4), at the image's original size.

        Memory is bounded whatever the number of classes and the image size: the mask rule runs over chunks of
        classes (:meth:`~spar_pl.openvocab.OpenVocabHead.predict`), never a full ``K x H x W`` float32 tensor.

        Args:
            image: a path, PIL image, numpy array or tensor (see the module notes).
            classes: class entries (``"name"`` or ``"name, synonym, ..."``), a class-file path or a benchmark
                name; at least one, no name twice.
            mode: ``single`` (one pass); ``sliding-logits`` (the authors' evaluation baseline: logits-level sliding
                window; ``sliding`` for short); ``sliding-features`` (the distillation teacher's sliding-window
                features, then the head).
            stride, crop, max_side: as in :meth:`features`.
            logit_scale: multiplier on cosine similarities before the softmax over synonyms.
            prob_thd: pixels whose best class score is below this become class 0.
            return_probs: keep the ``(K, H, W)`` float16 per-class scores on the result (``2 K H W`` bytes).
            probs_file: write the float16 ``(K, H, W)`` scores to this safetensors file in pieces (key ``probs``,
                class names in the metadata), without holding them in memory.
            window_batch: windows per encoder call in the sliding modes.
        """
        mode = self.check_mode(mode, stride, SEGMENT_MODES, crop)
        head = self.head(classes, logit_scale, prob_thd)  # first: a bad class list fails before any compute
        pixels, x, name = self._input(image, max_side)
        size = tuple(pixels.shape[-2:])
        names = [names[0] for names in head.classes]
        probs = torch.empty((head.num_classes, *size), dtype=torch.float16) if return_probs else None
        with contextlib.ExitStack() as stack:
            write = None
            if probs_file is not None:
                meta = {"classes": json.dumps(names), "synonyms": json.dumps(head.classes), "layout": "KHW"}
                write = stack.enter_context(
                    safetensors_writer(probs_file, "probs", (head.num_classes, *size), torch.float16, meta)
                )

            def keep(k0: int, k1: int, scores: torch.Tensor) -> None:
                part = scores[0].to(torch.float16).cpu()
                if probs is not None:
                    probs[k0:k1] = part
                if write is not None:
                    write(part)

            out = keep if (probs is not None or write is not None) else None
            try:
                with torch.inference_mode(), autocast(self.precision, x.device):
                    mask = head.segment(self.encoder, x, size, mode, crop, stride, window_batch, probs_out=out)
            except ImageInputError:
                raise
            except ValueError as err:  # e.g. an image smaller than one patch: say which image
                raise ImageInputError(f"{name}: {err}") from err
        return Segmentation(
            mask=mask[0].cpu().numpy().astype(np.int64),
            classes=names,
            synonyms=[list(names) for names in head.classes],
            image=to_pil(pixels),
            probs=probs,
        )


# -- batches of files (spar-cli segment / features) --------------------------------------------------------


def collect_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files to process, and problems found on the way.

    A directory contributes its image files (:data:`IMAGE_SUFFIXES`, not hidden, not recursive), sorted by
    name; a directory without any is a problem. Any other input is taken as a file, even if it does not exist
    (reading it then fails, naming it). The same file named twice is processed once.
    """
    files: list[Path] = []
    problems: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p
                for p in path.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                problems.append((path, f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in directory {path}"))
            files.extend(found)
        else:
            files.append(path)
    unique: dict[Path, Path] = {}
    for path in files:
        unique.setdefault(path.resolve(), path)
    return list(unique.values()), problems


def output_stems(paths: Sequence[Path]) -> dict[Path, str]:
    """A distinct output stem per input: its file stem, or, where several inputs share a stem, one qualified by
    its folder and then its suffix (``a/img.jpg`` -> ``a_img``; ``a/img.png`` next to it -> ``a_img_png``),
    then a counter; no input's outputs overwrite another's."""
    counts = Counter(p.stem for p in paths)
    taken = {stem for stem, n in counts.items() if n == 1}
    stems: dict[Path, str] = {}
    for path in paths:
        if counts[path.stem] == 1:
            stems[path] = path.stem
            continue
        base = f"{path.resolve().parent.name or 'root'}_{path.stem}"
        qualified = f"{base}_{path.suffix.lstrip('.').lower()}"
        candidates = itertools.chain([base, qualified], (f"{qualified}-{n}" for n in itertools.count(2)))
        stems[path] = next(c for c in candidates if c not in taken)
        taken.add(stems[path])
    return stems


def run_images(paths: Sequence[Path], work: Callable[[Path], object], desc: str) -> list[tuple[Path, str]]:
    """Call ``work`` on every path under a tqdm progress bar; a file that fails is reported on stderr and the run
    goes on. Returns ``(path, message)`` per failure."""
    from tqdm import tqdm

    failures: list[tuple[Path, str]] = []
    for path in tqdm(paths, desc=desc, unit="img", disable=len(paths) < 2, file=sys.stderr):
        try:
            work(path)
        except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: e.g. out of memory on a huge image
            message = str(err) if str(path) in str(err) else f"{path}: {err}"
            failures.append((path, message))
            tqdm.write(f"failed: {message}", file=sys.stderr)
    return failures


def segment_images(
    inputs: list[str],
    out: str,
    classes: list[str] | None = None,
    classes_file: str | None = None,
    model: ModelSpec | None = None,
    device: str | None = None,
    mode: str = "single",
    stride: int = 24,
    crop: int | None = None,
    max_side: int | None = None,
    precision: str = "32-true",
    logit_scale: float = 40.0,
    prob_thd: float = 0.0,
    save_probs: bool = False,
) -> int:
    """Per image a colour overlay with a legend (``<stem>_overlay.png``), the palette label PNG
    (``<stem>_labels.png``) and, with ``save_probs``, float16 class probabilities (``<stem>_probs.safetensors``),
    all at the image's original size.

    The arguments are checked before the model is built and the model's window before any image is read; a file
    that fails is reported and the run goes on.

    Args:
        inputs: image files and folders of images.
        out: output folder.
        classes: one class per entry; commas list synonyms: ``road "person, man"``.
        classes_file: a class file, one class a line, synonyms ``name, synonym`` (or a benchmark name: ``voc21``
            ...). Exactly one of ``classes`` and ``classes_file``.
        model: the model (default: the ``siglip2`` preset).
        device: ``cuda``, ``cpu``, ... (default: ``cuda`` when available).
        mode: ``single`` (one pass) or ``sliding`` (a sliding window: ``sliding-logits``, the authors' evaluation
            baseline; ``sliding-features``, the distillation teacher's features).
        stride: sliding-window stride.
        crop: sliding-window side (default: the model's native size).
        max_side: downscale longer sides to this first.
        precision: ``32-true``, ``bf16-mixed`` or ``16-mixed`` (autocast of the encoder).
        logit_scale: multiplier on cosine similarities before the softmax over synonyms.
        prob_thd: pixels scoring below this become class 0.
        save_probs: also write ``<stem>_probs.safetensors`` (K, H, W).

    Returns:
        The number of images done.

    Raises:
        UsageError: a bad class list (or none, or both), more than 256 classes, an unknown mode or precision, a
            window that cannot run, a size below 1.
        FileNotFoundError: a weights or checkpoint file that does not exist.
        ValueError: a checkpoint that does not match the model.
        SystemExit: any other failure to build the model (one line), or an input failed (status 1, after the run).
    """
    mode = _check_batch_options(mode, SEGMENT_MODES, stride, crop, max_side, precision)
    if (classes is None) == (classes_file is None):
        raise UsageError(
            "one of the arguments --classes --classes-file is required"
            if classes is None
            else "argument --classes-file: not allowed with argument --classes"
        )
    check_writable(out, "output folder (--out)")
    try:
        if classes is not None:
            parsed = parse_classes(classes, min_classes=2, option="--classes")
        else:
            parsed = parse_classes(classes_file, min_classes=2)
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from err
    if len(parsed) > 256:
        raise UsageError(f"{len(parsed)} classes: the label PNG holds at most 256")
    entries = [", ".join(names) for names in parsed]
    spar = _batch_model(model, device, precision, mode, stride, crop, SEGMENT_MODES)
    shown = "; ".join(entries[:12]) + (f"; ... ({len(entries) - 12} more)" if len(entries) > 12 else "")
    print(f"{spar}: {len(entries)} classes ({shown}), mode {mode}, precision {precision}")

    def work(path: Path, stem: str) -> None:
        probs_file = Path(out) / f"{stem}_probs.safetensors" if save_probs else None
        result = spar.segment(
            path,
            entries,
            mode,
            stride,
            crop,
            logit_scale,
            prob_thd,
            max_side,
            probs_file=probs_file,  # written in pieces while the mask is computed
        )
        result.save(out, stem)

    return _run_batch(inputs, out, work, "segment")


def write_feature_files(
    inputs: list[str],
    out: str,
    model: ModelSpec | None = None,
    device: str | None = None,
    mode: str = "single",
    stride: int = 24,
    crop: int | None = None,
    max_side: int | None = None,
    precision: str = "32-true",
    dtype: str = "float16",
    upsample: bool = False,
) -> int:
    """Dense features per image as ``<stem>.safetensors``: tensor ``features`` (1, C, h, w) (NCHW) with metadata
    (backbone, model, mode, stride, image and input sizes, dtype; :meth:`SPAR.write_features`).

    The arguments are checked before the model is built and the model's window before any image is read; a file
    that fails is reported and the run goes on.

    Args:
        inputs: image files and folders of images.
        out: output folder.
        model: the model (default: the ``siglip2`` preset).
        device: ``cuda``, ``cpu``, ... (default: ``cuda`` when available).
        mode: ``single`` (one pass) or ``sliding`` (the sliding-window teacher, ``sliding-features``).
        stride: sliding-window stride.
        crop: sliding-window side (default: the model's native size).
        max_side: downscale longer sides to this first.
        precision: ``32-true``, ``bf16-mixed`` or ``16-mixed`` (autocast of the encoder).
        dtype: ``float16`` or ``float32``, the dtype of the written features.
        upsample: resize the features to the image size (H, W).

    Returns:
        The number of images done.

    Raises:
        UsageError: an unknown mode, precision or dtype, a window that cannot run, a size below 1.
        FileNotFoundError: a weights or checkpoint file that does not exist.
        ValueError: a checkpoint that does not match the model.
        SystemExit: any other failure to build the model (one line), or an input failed (status 1, after the run).
    """
    mode = _check_batch_options(mode, FEATURE_MODES, stride, crop, max_side, precision)
    if dtype not in ("float16", "float32"):
        raise UsageError(f"--dtype: unknown dtype {dtype!r}; choose one of float16, float32")
    check_writable(out, "output folder (--out)")
    spar = _batch_model(model, device, precision, mode, stride, crop, FEATURE_MODES)
    print(f"{spar}: mode {mode}, {dtype}{', upsampled to the image size' if upsample else ''}")

    def work(path: Path, stem: str) -> None:
        spar.write_features(
            path, Path(out) / f"{stem}.safetensors", mode, stride, crop, upsample, max_side, getattr(torch, dtype)
        )

    return _run_batch(inputs, out, work, "features")


def _check_batch_options(
    mode: str, modes: Sequence[str], stride: int, crop: int | None, max_side: int | None, precision: str
) -> str:
    """The mode resolved among ``modes``; ``UsageError`` for it, a size below 1 or an unknown precision."""
    for option, value in (("--stride", stride), ("--crop", crop), ("--max-side", max_side)):
        if value is not None and value < 1:
            raise UsageError(f"{option} must be a positive integer, got {value}")
    try:
        autocast(precision, "cpu")
        return resolve_mode(mode, tuple(modes))
    except ValueError as err:
        raise UsageError(str(err)) from err


def _batch_model(
    model: ModelSpec | None,
    device: str | None,
    precision: str,
    mode: str,
    stride: int,
    crop: int | None,
    modes: Sequence[str],
) -> SPAR:
    """The model of a batch, its window checked (``UsageError``) before any image is read. A missing file or a
    model that does not match raises as :func:`load` does; any other failure to build it (no network for a Hub
    model, open_clip's own errors) is one line (``SystemExit``)."""
    try:
        spar = load(model, device=device, precision=precision)
    except (FileNotFoundError, ValueError):
        raise
    except (OSError, RuntimeError, NotImplementedError) as err:
        raise SystemExit(str(err)) from err  # spar-cli prints it once, as "spar-cli segment: error: ..."
    try:
        spar.check_mode(mode, stride, modes, crop)
    except ValueError as err:
        raise UsageError(str(err)) from err
    return spar


def _run_batch(inputs: Sequence[str], out: str, work: Callable[[Path, str], object], desc: str) -> int:
    """Run ``work(path, stem)`` over the inputs; print a summary; exit 1 after the run if any input failed."""
    paths, failures = collect_images(inputs)
    stems = output_stems(paths)
    failed = run_images(paths, lambda path: work(path, stems[path]), desc)
    print(f"{desc}: {len(paths) - len(failed)} of {len(paths)} images done, outputs in {out}")
    failures += failed
    if failures:
        print(f"{len(failures)} input(s) failed:", file=sys.stderr)
        for _, message in failures:
            print(f"  {message}", file=sys.stderr)
        raise SystemExit(1)
    return len(paths)
