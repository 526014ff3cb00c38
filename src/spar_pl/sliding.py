"""The sliding-window teacher: fine-stride crops through an encoder, folded back by plain averaging.

``docs/method.md`` section 2, exactly: window starts ``range(0, L - c + 1, s)`` plus one window flush with
the far edge; each window's ``(C, c/p, c/p)`` features bilinearly upsampled to ``(c/f, c/f)``
(``f = p // u``, :func:`upsample_factor`); summed into a ``(C, H//f, W//f)`` canvas with a count map;
the average bilinearly resized to the patch grid ``(H//p, W//p)``.

An image smaller than the crop along an axis gets one window spanning that whole axis (the
reference crashes there): a small image is then encoded in a single pass.

:class:`SlidingWindowLogits` is the sliding window of the authors' *evaluation* with class names: it slides
at the level of logits, not features (``docs/method.md`` section 4 baseline). Each window's L2-normalised features
are compared with every synonym's text embedding, the window's logits are resized bilinearly to the window's
pixel size and summed into a full-resolution canvas with a count map (no sub-patch reduction); the average is
then resized to the original image size. The released code passes no size to the per-window resize (a crash);
this implements the evident intent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window start offsets along one axis, the last window flush with the far edge.

    Args:
        length: image side in pixels.
        crop: window side; a side shorter than the crop gets the single start 0.
        stride: step between window starts.
    """
    check_window(crop, stride)
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop + 1, stride))
    if starts[-1] != length - crop:
        starts.append(length - crop)
    return starts


def upsample_factor(patch: int, stride: int) -> int:
    """Smallest ``u`` in ``1..patch`` with ``patch % u == 0`` and ``stride % (patch // u) == 0``.

    Window features are upsampled by ``u`` so that every window start lands on the canvas grid
    of cell ``f = patch // u`` pixels (stride 24, patch 16: ``u = 2``, ``f = 8``).
    """
    for u in range(1, patch + 1):
        if patch % u == 0 and stride % (patch // u) == 0:
            return u
    raise AssertionError("unreachable: u = patch always qualifies")


def window_boxes(height: int, width: int, crop: int, stride: int) -> torch.Tensor:
    """All windows as an ``(N, 2)`` tensor of ``(top, left)`` starts, row-major."""
    tops = torch.tensor(window_starts(height, crop, stride))
    lefts = torch.tensor(window_starts(width, crop, stride))
    return torch.cartesian_prod(tops, lefts)


def check_window(crop: int, stride: int, patch_size: int = 1, window_batch: int = 1) -> None:
    """Raise ``ValueError`` for a sliding window that cannot run: a crop or stride below 1, a crop that is not a
    multiple of the patch, or fewer than one window per encoder call. Every sliding window is checked here.

    Args:
        crop: window side in pixels; stride: step between windows.
        patch_size: the encoder's patch side, which the crop must be a multiple of (1: any crop).
        window_batch: windows per encoder call.
    """
    if window_batch < 1:
        raise ValueError(f"window_batch must be >= 1, got {window_batch}")
    if stride < 1 or crop < 1:
        raise ValueError(f"sliding-window crop and stride must be positive, got crop={crop}, stride={stride}")
    if crop % patch_size:
        raise ValueError(f"crop {crop} is not a multiple of the patch size {patch_size}")


def default_crop(encoder) -> int:
    """The default window side of an encoder: its ``default_crop`` (the largest multiple of the patch within the
    pretraining size, :class:`~spar_pl.encoders.DenseEncoder`), computed the same way for any object with
    ``patch_size`` and ``native_size`` attributes."""
    crop = getattr(encoder, "default_crop", None)
    if crop is None:
        p = int(encoder.patch_size)
        crop = max(p, int(encoder.native_size) // p * p)
    return int(crop)


def sliding_window(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    crop: int,
    stride: int,
    patch_size: int,
    window_batch: int = 16,
) -> torch.Tensor:
    """Dense features ``(B, C, H // p, W // p)`` from sliding ``crop x crop`` windows, averaged on a fine canvas.

    The encoder is called on batches of at most ``window_batch`` windows, so memory is bounded by the chunk
    whatever the image size; the fold is one ``index_add_`` per chunk.

    Args:
        encoder: any callable mapping normalised crops ``(n, 3, c, c)`` to features ``(n, C, c/p, c/p)``.
        images: normalised images ``(B, 3, H, W)``.
        crop: window side in pixels (a multiple of ``patch_size``).
        stride: step between windows (the reference uses 24 for every backbone).
        patch_size: the encoder's patch side ``p``.
        window_batch: windows per encoder call.
    """
    check_window(crop, stride, patch_size, window_batch)
    b, _, height, width = images.shape
    f, p = patch_size // upsample_factor(patch_size, stride), patch_size
    ch, cw = min(crop, height), min(crop, width)  # window size (smaller images: whole side)
    hf, wf = height // f, width // f
    boxes = window_boxes(height, width, crop, stride).to(images.device)
    n_win = boxes.shape[0]
    # Canvas offsets of each window's (ch/f, cw/f) cells, flattened: (n_win, ch/f * cw/f).
    rows = (boxes[:, :1] // f + torch.arange(ch // f, device=images.device)).unsqueeze(2)
    cols = (boxes[:, 1:] // f + torch.arange(cw // f, device=images.device)).unsqueeze(1)
    cells = (rows * wf + cols).flatten(1)
    count = torch.zeros(hf * wf, device=images.device).index_add_(
        0, cells.flatten(), torch.ones(cells.numel(), device=images.device)
    )
    # Pixel indices of each window, for batched extraction without a loop over windows.
    pix_r = boxes[:, 0, None] + torch.arange(ch, device=images.device)
    pix_c = boxes[:, 1, None] + torch.arange(cw, device=images.device)

    canvas = None
    pairs = torch.cartesian_prod(torch.arange(b, device=images.device), torch.arange(n_win, device=images.device))
    for chunk in pairs.split(window_batch):
        bi, wi = chunk[:, 0], chunk[:, 1]
        crops = images[bi[:, None, None], :, pix_r[wi][:, :, None], pix_c[wi][:, None, :]]  # (n, ch, cw, 3)
        feats = encoder(crops.permute(0, 3, 1, 2).contiguous())  # a contiguous batch runs faster
        feats = F.interpolate(feats.float(), size=(ch // f, cw // f), mode="bilinear", align_corners=False)
        if canvas is None:
            canvas = feats.new_zeros(b * hf * wf, feats.shape[1])
        index = (bi[:, None] * (hf * wf) + cells[wi]).flatten()
        canvas.index_add_(0, index, feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]))  # cells x C rows
    canvas = canvas.view(b, hf * wf, -1) / count.clamp(min=1).view(1, -1, 1)
    canvas = canvas.transpose(1, 2).reshape(b, -1, hf, wf)
    return F.interpolate(canvas, size=(height // p, width // p), mode="bilinear", align_corners=False)


#: :func:`dense_features` modes: one pass, or the sliding-window teacher's folded features.
FEATURE_MODES = ("single", "sliding-features")
#: :meth:`~spar_pl.openvocab.OpenVocabHead.segment` modes: one pass; the logits-level sliding window of the authors'
#: evaluation (:class:`SlidingWindowLogits`); the teacher's feature-level sliding window, then the head.
SEGMENT_MODES = ("single", "sliding-logits", "sliding-features")


def resolve_mode(mode: str, modes: tuple[str, ...]) -> str:
    """``mode`` checked against ``modes`` (:data:`FEATURE_MODES` or :data:`SEGMENT_MODES`).

    ``sliding`` is accepted as the short name of each context's sliding window, the spelling of the shipped commands
    and configs: ``sliding-logits`` (the authors' evaluation baseline) where masks are asked for,
    ``sliding-features`` where features are.

    Raises:
        ValueError: a mode that is not one of ``modes``, naming them.
    """
    if mode == "sliding":
        mode = "sliding-logits" if "sliding-logits" in modes else "sliding-features"
    if mode not in modes:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(modes)}")
    return mode


def dense_features(
    encoder: nn.Module,
    images: torch.Tensor,
    mode: str = "single",
    crop: int | None = None,
    stride: int = 24,
    window_batch: int = 16,
) -> torch.Tensor:
    """Dense features of normalised images ``(B, 3, H, W)``: every caller's one road from an encoder to features.

    Args:
        encoder: a :class:`~spar_pl.encoders.DenseEncoder` (``patch_size`` and ``native_size`` attributes).
        mode: ``single`` (one pass at the input size, interpolated positional embeddings) or ``sliding-features``
            (:func:`sliding_window`, the distillation teacher's features; :func:`resolve_mode`).
        crop: window side (default: :func:`default_crop`, the largest multiple of the patch within the encoder's
            pretraining size); stride, window_batch: see :func:`sliding_window`.
    """
    if resolve_mode(mode, FEATURE_MODES) == "single":
        return encoder(images)
    crop = int(crop or default_crop(encoder))
    return sliding_window(encoder, images, crop, stride, encoder.patch_size, window_batch)


class SlidingWindowTeacher(nn.Module):
    """The distillation teacher: an encoder (a registered child) run through :func:`sliding_window`.

    Args:
        encoder: a :class:`~spar_pl.encoders.DenseEncoder` (anything mapping ``(n, 3, c, c)`` to
            ``(n, C, c/p, c/p)`` with a ``patch_size`` attribute).
        crop: window side in pixels; ``None`` takes :func:`default_crop` (the largest multiple of the patch within
            the encoder's pretraining size).
        stride: step between windows (the reference uses 24 for every backbone).
        window_batch: windows per encoder call.
    """

    def __init__(self, encoder: nn.Module, crop: int | None = None, stride: int = 24, window_batch: int = 16) -> None:
        super().__init__()
        self.encoder = encoder
        self.crop = int(crop or default_crop(encoder))
        self.stride = int(stride)
        self.window_batch = int(window_batch)
        self.patch_size = int(encoder.patch_size)
        check_window(self.crop, self.stride, self.patch_size, self.window_batch)
        self.cell = self.patch_size // upsample_factor(self.patch_size, self.stride)

    def extra_repr(self) -> str:
        return f"crop={self.crop}, stride={self.stride}, window_batch={self.window_batch}, cell={self.cell}"

    def num_windows(self, height: int, width: int) -> int:
        """Windows per image of ``height x width``."""
        return len(window_starts(height, self.crop, self.stride)) * len(window_starts(width, self.crop, self.stride))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher features ``(B, C, H // p, W // p)`` of a normalised image batch ``(B, 3, H, W)``."""
        return sliding_window(self.encoder, images, self.crop, self.stride, self.patch_size, self.window_batch)


class SlidingWindowLogits:
    """Logits-level sliding window of the authors' evaluation, served in chunks of synonyms.

    The encoder runs once over all windows; each window's cosine logits are kept at its patch grid
    (``windows x S x c/p x c/p`` floats, small). Calling the object with a synonym range builds the
    full-resolution canvas for those synonyms only, so memory is bounded by the chunk whatever the number of
    classes. Windows form a grid (every row start with every column start) and bilinear resizing is separable,
    so the canvas is built one row of windows at a time: each window resized along its width and summed into
    the row's band, the band resized along its height once and added to the canvas. That is the sum of the
    windows resized to their pixel size (up to float rounding), at a fraction of the cost, and the count map is
    the outer product of the row and column counts.

    Args:
        encoder: maps ``(n, 3, ch, cw)`` normalised crops to ``(n, C, gh, gw)`` features.
        images: normalised images ``(B, 3, H, W)`` (the test-resized input).
        text: synonym embeddings ``(S, C)``, L2-normalised.
        crop: window side; stride: step between windows; window_batch: windows per encoder call.
        size: the output size ``(H0, W0)`` (the original image); the canvas is resized to it.
    """

    def __init__(
        self,
        encoder,
        images: torch.Tensor,
        text: torch.Tensor,
        crop: int,
        stride: int,
        window_batch: int = 16,
        size: tuple[int, int] | None = None,
    ) -> None:
        check_window(crop, stride, 1, window_batch)
        b, _, height, width = images.shape
        self.batch, self.height, self.width = b, height, width
        self.size = tuple(size) if size is not None else (height, width)
        self.window = (min(crop, height), min(crop, width))
        ch, cw = self.window
        device = images.device
        self.tops = torch.tensor(window_starts(height, crop, stride), device=device)
        self.lefts = torch.tensor(window_starts(width, crop, stride), device=device)
        rows = torch.bincount((self.tops[:, None] + torch.arange(ch, device=device)).flatten(), minlength=height)
        cols = torch.bincount((self.lefts[:, None] + torch.arange(cw, device=device)).flatten(), minlength=width)
        self.count = (rows[:, None] * cols[None, :]).clamp(min=1).to(torch.float32)  # windows covering each pixel
        self.num_windows = len(self.tops) * len(self.lefts)
        boxes = window_boxes(height, width, crop, stride).to(device)  # row-major: (top, left) pairs
        pairs = torch.cartesian_prod(torch.arange(b, device=device), torch.arange(self.num_windows, device=device))
        text = text.to(device=device, dtype=torch.float32)
        logits = []
        for chunk in pairs.split(window_batch):
            bi, wi = chunk[:, 0], chunk[:, 1]
            r = boxes[wi, :1] + torch.arange(ch, device=device)
            c = boxes[wi, 1:] + torch.arange(cw, device=device)
            crops = images[bi[:, None, None], :, r[:, :, None], c[:, None, :]].permute(0, 3, 1, 2)
            feats = encoder(crops.contiguous())
            with torch.autocast(feats.device.type, enabled=False):  # similarities in float32 under autocast
                logits.append(torch.einsum("nchw,sc->nshw", F.normalize(feats.float(), dim=1), text))
        grid = torch.cat(logits)  # (B * n, S, gh, gw), windows row-major
        self.logits = grid.view(b, len(self.tops), len(self.lefts), *grid.shape[1:])

    def __call__(self, s0: int, s1: int) -> torch.Tensor:
        """Logits ``(B, s1 - s0, H0, W0)`` of synonyms ``s0:s1``: windows resized to their pixel size, averaged
        on the full-resolution canvas, resized to the output size."""
        ch, cw = self.window
        k = s1 - s0
        gh = self.logits.shape[-2]
        columns = (self.lefts[:, None] + torch.arange(cw, device=self.lefts.device)).flatten()
        canvas = self.logits.new_zeros(self.batch, k, self.height, self.width)
        for b in range(self.batch):
            for i, top in enumerate(self.tops.tolist()):  # one row of windows at a time (a handful of rows)
                row = self.logits[b, i, :, s0:s1]  # (n_left, k, gh, gw)
                wide = F.interpolate(row, size=(gh, cw), mode="bilinear", align_corners=False)  # width only
                band = row.new_zeros(k, gh, self.width)
                band.index_add_(2, columns, wide.permute(1, 2, 0, 3).reshape(k, gh, -1))
                tall = F.interpolate(band[None], size=(ch, self.width), mode="bilinear", align_corners=False)  # height
                canvas[b, :, top : top + ch] += tall[0]
        canvas /= self.count
        if self.size == (self.height, self.width):
            return canvas
        return F.interpolate(canvas, size=self.size, mode="bilinear", align_corners=False)
