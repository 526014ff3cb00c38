"""What each benchmark mode measures: the models, sizes and repeats of the full and the quick plan."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ModelSpec:
    """A dense encoder by backbone and open_clip model name, random weights."""

    backbone: str
    name: str
    label: str


@dataclass(frozen=True)
class Plan:
    """Sizes and models of one benchmark mode.

    Args:
        mode: ``full`` or ``quick``.
        repeats: timed repeats per measurement (medians are reported).
        heavy_repeats: repeats in all of a call whose first timed run takes over ``heavy_s`` seconds.
        heavy_s: that threshold.
        overhead_model: encoder of sections 1 and 2.
        overhead_size: image of sections 1 and 2 ``(H, W)``.
        window_batch: the teacher's windows per encoder call (sections 1 to 3, 6).
        compare: section 3, ``(model, sizes)`` pairs.
        max_teacher_s: on CPU, a teacher run estimated to take longer is extrapolated from the model's
            measured per-window time (``None``: measure everything).
        memory_model: encoder of section 4.
        memory_size: image of section 4.
        memory_batches: window batches of section 4.
        memory_real_chunks: on CPU, chunks that run the real encoder in section 4 (the others replay its
            output; ``None``: all real).
        memory_contrast: a smaller image and window batch, to show what the image size adds.
        memory_parallel: run the memory processes side by side (quick mode) rather than one at a time.
        cache_shape: teacher features of one image ``(C, h, w)``, section 5.
        cache_entries: images written and read, section 5.
        data_images: photo-like JPEGs generated for section 6.
        data_size: their nominal size ``(H, W)``.
        data_box: augmentation box override (``None``: the paper's).
        data_min_side: augmentation minimum side override.
        students: section 6 students ``(spec, crop)``.
    """

    mode: str
    repeats: int
    heavy_repeats: int
    heavy_s: float
    overhead_model: ModelSpec
    overhead_size: tuple[int, int]
    window_batch: int
    compare: tuple[tuple[ModelSpec, tuple[tuple[int, int], ...]], ...]
    max_teacher_s: float | None
    memory_model: ModelSpec
    memory_size: tuple[int, int]
    memory_batches: tuple[int, ...]
    memory_real_chunks: int | None
    memory_contrast: tuple[tuple[int, int], int]
    memory_parallel: bool
    cache_shape: tuple[int, int, int]
    cache_entries: int
    data_images: int
    data_size: tuple[int, int]
    data_box: tuple[int, int] | None
    data_min_side: int | None
    students: tuple[tuple[ModelSpec, int], ...]
    precision_model: ModelSpec | None = None
    precision_single: tuple[int, int] = (512, 1024)
    precision_teacher: tuple[int, int] = (256, 512)
    head_model: ModelSpec | None = None
    head_sizes: tuple[tuple[int, int], ...] = ((1024, 2048),)
    head_classes: str = "ade20k"


CLIP_B16 = ModelSpec("maskclip", "ViT-B-16", "MaskCLIP ViT-B/16 @224")
SIGLIP2_B16 = ModelSpec("siglip2", "ViT-B-16-SigLIP2-512", "SigLIP2 ViT-B/16 @512")
TINY_CLIP = ModelSpec("maskclip", "spar-tiny-clip", "tiny CLIP @64")
TINY_SL2 = ModelSpec("siglip2", "spar-tiny-sl2", "tiny SigLIP2 @64")

FULL = Plan(
    mode="full",
    repeats=3,
    heavy_repeats=2,
    heavy_s=20.0,
    overhead_model=CLIP_B16,
    overhead_size=(256, 512),
    window_batch=16,
    compare=((SIGLIP2_B16, ((512, 1024), (1024, 2048))), (CLIP_B16, ((512, 1024),))),
    max_teacher_s=60.0,
    memory_model=CLIP_B16,
    memory_size=(1024, 2048),
    memory_batches=(1, 16, 64),
    memory_real_chunks=2,
    memory_contrast=((512, 1024), 16),
    memory_parallel=False,
    cache_shape=(768, 64, 128),  # SigLIP2 ViT-B/16 features of a 1024x2048 image
    cache_entries=8,
    data_images=24,
    data_size=(1500, 2000),  # SA-1B-like sources
    data_box=None,
    data_min_side=None,
    students=((TINY_SL2, 64), (CLIP_B16, 224)),
    precision_model=CLIP_B16,
    head_model=SIGLIP2_B16,
    head_sizes=((1024, 2048), (2048, 4096)),  # the chunk budget binds at both: the difference is per-pixel state
)

#: The same sections at tiny scale (CI, a laptop): only what differs from the full plan.
QUICK = replace(
    FULL,
    mode="quick",
    overhead_model=TINY_CLIP,
    overhead_size=(128, 256),
    compare=((TINY_SL2, ((128, 256), (256, 512))), (TINY_CLIP, ((128, 256),))),
    max_teacher_s=None,
    memory_model=TINY_CLIP,
    memory_size=(256, 512),
    memory_real_chunks=None,
    memory_contrast=((128, 256), 16),
    memory_parallel=True,
    cache_shape=(768, 16, 32),
    cache_entries=4,
    data_images=4,
    data_size=(300, 400),
    data_box=(256, 128),
    data_min_side=64,
    students=((TINY_SL2, 64), (TINY_CLIP, 64)),
    precision_model=TINY_CLIP,
    precision_single=(256, 512),
    precision_teacher=(128, 256),
    head_model=TINY_SL2,
    head_sizes=((512, 1024), (1024, 2048)),
)
