"""Generated shape scenes with dense labels: the data of the tiny CPU reproduction (``make reproduce-tiny``).

A scene is a flat random background colour with Gaussian noise and flat-coloured shapes of a few classes
(:data:`SHAPE_CLASSES`). Inside a shape a patch sees only a flat colour, so a shape's class shows only across
several patches: recognising it needs the spatial context that positional embeddings carry, which is what an
interpolated positional embedding at a larger grid disturbs (``docs/method.md``: the resolution gap SPAR closes).

Shapes sit one per cell of a square grid with a random phase, so they never overlap and a scene of any size has
the same local statistics: a ``64 x 64`` crop of a ``256 x 256`` scene looks like a ``64 x 64`` scene. Pure
tensor code, no Lightning: every scene is a function of its seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

#: Every shape the generator can draw, in a fixed order (an index into this tuple is a shape *kind*).
SHAPES: tuple[str, ...] = ("circle", "square", "ring", "triangle", "cross")
#: The shapes of the scenes by default (and of the shipped tiny model). Square and triangle are left out: at patch 8
#: the square is hard to tell from the circle (its corners span a few pixels), and in short pretraining pilots
#: (600 steps) native mIoU rose from 25 (five shapes) to 35 (four, no square) to 46 (these three).
SCENE_SHAPES: tuple[str, ...] = ("circle", "ring", "cross")
#: Class names of the default scenes, index = label value. Class 0 is the background.
SHAPE_CLASSES: tuple[str, ...] = ("background", *SCENE_SHAPES)


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn.

    Args:
        cell: side of the grid cell holding at most one shape, in pixels.
        fill: probability that a cell holds a shape.
        radius: range of shape radii in pixels (a shape fits in its ``2 r`` box, inside its cell).
        noise: standard deviation of the Gaussian noise added to the whole image.
        min_contrast: minimum L-infinity distance between a shape's colour and the background colour.
        shapes: the shapes drawn (names from :data:`SHAPES`); label ``k`` is ``shapes[k - 1]``, 0 the background.
    """

    cell: int = 44
    fill: float = 0.85
    radius: tuple[float, float] = (12.0, 20.0)
    noise: float = 0.1
    min_contrast: float = 0.25
    shapes: tuple[str, ...] = SCENE_SHAPES

    def __post_init__(self) -> None:
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown or not self.shapes:
            raise ValueError(f"SceneConfig.shapes: unknown or no shapes {unknown} (known: {', '.join(SHAPES)})")

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, index = label value (0: background)."""
        return ("background", *self.shapes)


def shape_masks(kind: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Whether each offset lies inside its shape.

    Args:
        kind: ``(N, 1, 1)`` indices into :data:`SHAPES` (0: circle, ..., 4: cross).
        u: ``(N, H, W)`` horizontal offsets from the shape centre, in units of its radius.
        v: ``(N, H, W)`` vertical offsets (downwards), in units of its radius.

    Returns:
        ``(N, H, W)`` boolean masks.
    """
    d2 = u * u + v * v
    au, av = u.abs(), v.abs()
    inside = torch.stack(
        [
            d2 <= 1.0,  # circle
            torch.maximum(au, av) <= 0.8,  # square
            (d2 <= 1.0) & (d2 >= 0.5**2),  # ring
            (v <= 0.75) & (au <= (v + 1.0) * 0.6),  # triangle, apex up
            ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0)),  # cross
        ]
    )  # (5, N, H, W)
    return inside.gather(0, kind.expand_as(u).unsqueeze(0)).squeeze(0)


def make_scene(
    height: int, width: int, generator: torch.Generator, config: SceneConfig = SceneConfig()
) -> tuple[torch.Tensor, torch.Tensor]:
    """One scene.

    Args:
        height: image height in pixels.
        width: image width in pixels.
        generator: the random source (the scene is a function of its state).
        config: drawing parameters.

    Returns:
        ``image`` ``(3, H, W)`` float32 in ``[0, 1]`` and ``label`` ``(H, W)`` int64 class indices.
    """
    c = config.cell
    g = generator
    phase = torch.randint(0, c, (2,), generator=g)
    # cells covering the image, shifted by the phase (cell k spans [k c - phase, (k + 1) c - phase))
    rows, cols = (height + 2 * c - 1) // c, (width + 2 * c - 1) // c
    n = rows * cols
    r = torch.empty(n).uniform_(*config.radius, generator=g)
    slack = (c / 2 - r).clamp(min=0)
    jitter = (torch.rand(n, 2, generator=g) * 2 - 1) * slack[:, None]
    grid = torch.cartesian_prod(torch.arange(rows), torch.arange(cols)).float()
    centre = grid * c - phase.float() + c / 2 + jitter  # (n, 2): y, x
    kind = torch.randint(1, len(config.shapes) + 1, (n,), generator=g)  # label values
    present = torch.rand(n, generator=g) < config.fill
    background = torch.rand(3, generator=g)
    colour = torch.rand(n, 3, generator=g)
    # push colours that are too close to the background away from it, along the largest channel difference
    diff = colour - background
    weak = diff.abs().amax(dim=1) < config.min_contrast
    shift = torch.where(background > 0.5, -1.0, 1.0) * config.min_contrast * 1.5
    colour = torch.where(weak[:, None], (background + shift).clamp(0, 1), colour)
    noise = torch.randn(3, height, width, generator=g) * config.noise

    keep = present & (centre[:, 0] + r > 0) & (centre[:, 0] - r < height) & (centre[:, 1] + r > 0)
    keep &= centre[:, 1] - r < width
    centre, r, kind, colour = centre[keep], r[keep], kind[keep], colour[keep]
    yy = torch.arange(height, dtype=torch.float32) + 0.5
    xx = torch.arange(width, dtype=torch.float32) + 0.5
    v = (yy.view(1, -1, 1) - centre[:, 0].view(-1, 1, 1)) / r.view(-1, 1, 1)
    u = (xx.view(1, 1, -1) - centre[:, 1].view(-1, 1, 1)) / r.view(-1, 1, 1)
    shape_kind = torch.tensor([SHAPES.index(name) for name in config.shapes])[kind - 1]
    inside = shape_masks(shape_kind.view(-1, 1, 1), u.expand(-1, height, -1), v.expand(-1, -1, width))
    label = (inside.long() * kind.view(-1, 1, 1)).amax(dim=0) if len(kind) else torch.zeros(height, width).long()
    image = background.view(3, 1, 1).expand(3, height, width).clone()
    if len(kind):
        which = (inside.float() * torch.arange(1, len(kind) + 1).view(-1, 1, 1)).amax(dim=0).long()  # 0: none
        palette = torch.cat([background.view(1, 3), colour])
        image = palette[which].permute(2, 0, 1)
    return (image + noise).clamp(0, 1), label


def make_scenes(
    count: int, size: int, seed: int, stream: str = "eval", start: int = 0, config: SceneConfig = SceneConfig()
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` square scenes of side ``size``: scene ``i`` is drawn from :func:`scene_seed` ``(stream, seed, i)``.

    Args:
        count: number of scenes.
        size: image side in pixels.
        seed: the experiment seed.
        stream: a name separating independent streams (pretraining, distillation, evaluation).
        start: index of the first scene (a training stream continues where the last batch ended).
        config: drawing parameters.

    Returns:
        ``images`` ``(count, 3, size, size)`` and ``labels`` ``(count, size, size)``.
    """
    images, labels = [], []
    for i in range(start, start + count):
        g = torch.Generator().manual_seed(scene_seed(stream, seed, i))
        image, label = make_scene(size, size, g, config)
        images.append(image)
        labels.append(label)
    return torch.stack(images), torch.stack(labels)


def scene_seed(stream: str, seed: int, index: int) -> int:
    """A 63-bit generator seed for scene ``index`` of ``stream`` under ``seed`` (a hash: streams do not overlap)."""
    digest = hashlib.sha256(f"{stream}/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def scene_image(height: int = 320, width: int = 480, seed: int = 0, stream: str = "example"):
    """One generated scene as an RGB PIL image (scene 0 of ``stream`` under ``seed``; for a square side, the first
    image :func:`make_scenes` gives): an example input that needs no file."""
    from spar_pl.images import to_pil

    image, _ = make_scene(height, width, torch.Generator().manual_seed(scene_seed(stream, seed, 0)))
    return to_pil(image)
