"""``spar-cli demo`` (:func:`serve`): open-vocabulary segmentation in the browser (Gradio; ``pip install
'spar-pl[demo]'``).

Upload an image or pick a generated shape scene, type the classes (one class a line, commas list synonyms: the
syntax of class files and of ``--classes``), choose single pass, sliding window and/or a SPAR student, and see the
overlays side by side with their time per image and a legend; the label PNGs can be downloaded.

Bounded like the CLI: the server takes images as decoded pixels (it never opens a path a client sends); an upload
over ``max_file_mb`` megabytes or ``max_pixels`` pixels is refused with a message; the model input is downscaled to
the user's max side (at most the server's); one request runs at a time (a queue). The device is CUDA when available.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spar_pl.encoders import ModelSpec

__all__ = ["DemoModels", "build_app", "launch_options", "load_models", "segment_request", "serve"]

#: The modes a user can tick, in display order: (label, which model, segment mode).
SINGLE, SLIDING, STUDENT = "single pass", "sliding window", "SPAR student"


@dataclass
class DemoModels:
    """What the demo serves: the base model (single pass and sliding window), an optional SPAR student, the
    default classes and example images, and the bounds of a request.

    Attributes:
        base: the pretrained model (:class:`~spar_pl.api.SPAR`).
        student: the distilled student, or ``None`` (the "SPAR student" choice is then absent).
        classes: the class entries shown at start.
        examples: example images (generated on the server).
        stride: sliding-window stride.
        crop: sliding-window side (``None``: the model's native size).
        max_side: the largest max side a user may choose (and the default one).
        max_pixels: an uploaded image with more pixels is refused.
        max_file_mb: an upload larger than this is refused by the server.
        name: what the page calls the model.
    """

    base: object
    student: object | None = None
    classes: list[str] = field(default_factory=list)
    examples: list[Image.Image] = field(default_factory=list)
    stride: int = 24
    crop: int | None = None
    max_side: int = 512
    max_pixels: int = 40_000_000
    max_file_mb: int = 20
    name: str = ""

    def modes(self) -> list[str]:
        return [SINGLE, SLIDING] + ([STUDENT] if self.student is not None else [])


def parse_class_text(text: str) -> list[str]:
    """Class entries from the demo's text box: one class a line (blank lines skipped), commas list synonyms.

    Raises:
        ValueError: fewer than two classes, an empty synonym or a duplicate name (the message says which).
    """
    from spar_pl.openvocab import parse_classes

    lines = [line for line in (text or "").splitlines() if line.strip()]
    if len(lines) < 2:
        raise ValueError("segmentation needs at least two classes: type one class a line (commas list synonyms)")
    return [", ".join(names) for names in parse_classes(lines, 2, option="classes")]


def segment_request(
    models: DemoModels,
    image: np.ndarray | None,
    class_text: str,
    modes: Sequence[str],
    max_side: float | None,
    out: Path,
) -> tuple[list[tuple[Image.Image, str]], str, list[str]]:
    """One demo request: the overlays (with captions), a markdown summary (times, legend) and label PNG paths.

    Raises:
        ValueError: no image, an image over the pixel limit, bad classes, no mode, or a mode not served; the
            message is what the user sees.
    """
    from spar_pl.render import palette, save_atomic

    if image is None:
        raise ValueError("no image: upload one or pick an example")
    height, width = image.shape[:2]
    if height * width > models.max_pixels:
        raise ValueError(
            f"the image is {width}x{height} = {height * width:,} pixels; this demo takes at most {models.max_pixels:,}"
        )
    classes = parse_class_text(class_text)
    if len(classes) > 256:
        raise ValueError(f"{len(classes)} classes: the label PNG holds at most 256")
    if not modes:
        raise ValueError(f"choose at least one of: {', '.join(models.modes())}")
    unknown = [m for m in modes if m not in models.modes()]
    if unknown:
        raise ValueError(f"unknown mode {unknown[0]!r}; choose from {', '.join(models.modes())}")
    side = int(max_side or models.max_side)
    if not 16 <= side <= models.max_side:
        raise ValueError(f"max side must be between 16 and {models.max_side}, got {side}")
    gallery, rows, files = [], [], []
    for mode in [m for m in models.modes() if m in modes]:
        model = models.student if mode == STUDENT else models.base
        segment_mode = "sliding" if mode == SLIDING else "single"
        start = time.perf_counter()
        result = model.segment(image, classes, segment_mode, stride=models.stride, crop=models.crop, max_side=side)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        gallery.append((result.overlay(), f"{mode}: {seconds:.3f} s"))
        path = save_atomic(result.labels(), out / f"labels_{mode.replace(' ', '_')}.png")
        files.append(str(path))
        rows.append(f"| {mode} | {seconds:.3f} | {', '.join(result.present()[:6])} |")
    colours = palette(len(classes))
    legend = " ".join(
        f'<span style="background: rgb{tuple(int(c) for c in colours[k])}; padding: 0 0.4em">{k}</span> {name}'
        for k, name in enumerate(classes)
    )
    summary = "\n".join(
        [
            f"image {width}x{height}, model input at most {side} px a side",
            "",
            "| mode | seconds per image | classes found (largest first) |",
            "|---|---|---|",
            *rows,
            "",
            f"legend (label value, class): {legend}",
        ]
    )
    return gallery, summary, files


def build_app(models: DemoModels):
    """The Gradio app of :func:`segment_request` (one request at a time: ``concurrency_limit=1``)."""
    import gradio as gr

    workdir = Path(tempfile.mkdtemp(prefix="spar-demo-"))
    counter = {"n": 0}

    def run(image, class_text, modes, max_side):
        counter["n"] += 1
        out = workdir / f"request-{counter['n']}"
        for old in sorted(workdir.glob("request-*"), key=lambda p: int(p.name.split("-")[1]))[:-8]:
            shutil.rmtree(old, ignore_errors=True)  # the label files of the last few requests stay downloadable
        try:
            return segment_request(models, image, class_text, modes, max_side, out)
        except ValueError as err:  # ImageInputError included: the user's mistake, said in one line
            raise gr.Error(str(err), print_exception=False) from None

    with gr.Blocks(title="spar-pl demo") as app:
        gr.Markdown(
            f"## SPAR: open-vocabulary segmentation\nmodel: `{models.name}` on {models.base.device}. One class a line; "
            "commas list synonyms (`person, pedestrian`)."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="image", type="numpy", image_mode="RGB", sources=["upload", "clipboard"])
                classes = gr.Textbox(label="classes", value="\n".join(models.classes), lines=6)
                modes = gr.CheckboxGroup(models.modes(), value=models.modes(), label="inference")
                side = gr.Slider(16, models.max_side, value=models.max_side, step=16, label="max side (px)")
                button = gr.Button("Segment", variant="primary")
                if models.examples:
                    gr.Examples([[np.asarray(e)] for e in models.examples], inputs=[image], label="generated scenes")
            with gr.Column():
                gallery = gr.Gallery(label="overlays", columns=3, height="auto", format="png", object_fit="contain")
                summary = gr.Markdown()
                labels = gr.File(label="label PNGs", file_count="multiple")
        button.click(
            run,
            [image, classes, modes, side],
            [gallery, summary, labels],
            api_name="segment",
            concurrency_limit=1,
        )
    app.workdir = workdir
    return app


def load_models(
    model: ModelSpec | None = None,
    student: str | None = None,
    device: str | None = None,
    precision: str = "32-true",
    scene: tuple[Sequence[str], Image.Image] | None = None,
    **bounds,
) -> DemoModels:
    """The models the demo serves (:func:`serve`'s arguments): the shipped tiny model when ``model`` names none
    (:func:`spar_pl.reproduce.shipped_spec`, with generated shape scenes); a named model starts with ``scene`` (its
    classes and example image), if given. The student is the base model's architecture with a SPAR checkpoint's
    weights, or an exported student (``hf-hub:``/``local-dir:``). ``bounds``: :class:`DemoModels`' window and
    request bounds (``stride``, ``crop``, ``max_side``, ``max_pixels``, ``max_file_mb``)."""
    from spar_pl.api import load
    from spar_pl.hub import HUB_SCHEMES
    from spar_pl.reproduce import TINY_MODEL, shipped_spec

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shipped = shipped_spec(model)
    spec = shipped or model
    base = load(spec, device=device, precision=precision)
    if shipped is not None:
        from spar_pl.images import to_pil
        from spar_pl.scenes import SHAPE_CLASSES, make_scenes

        classes = list(SHAPE_CLASSES)
        examples = [to_pil(image) for image in make_scenes(3, 256, 0, "demo")[0]]
        name = f"{TINY_MODEL} (shipped tiny model, pretrained on generated shape scenes)"
    else:
        classes, examples = (list(scene[0]), [scene[1]]) if scene is not None else ([], [])
        name = base.model_name
    distilled = None
    if student is not None:
        if student.startswith(HUB_SCHEMES):
            distilled = load(student, device=device, precision=precision)
        else:  # the base model's architecture with the checkpoint's weights
            shape = dataclasses.replace(spec, checkpoint=student, weights=None, head_weights=None)
            distilled = load(shape, device=device, precision=precision)
    return DemoModels(base, distilled, classes, examples, name=name, **bounds)


def serve(
    model: ModelSpec | None = None,
    student: str | None = None,
    device: str | None = None,
    precision: str = "32-true",
    stride: int = 24,
    crop: int | None = None,
    max_side: int = 512,
    max_pixels: int = 40_000_000,
    max_file_mb: int = 20,
    host: str = "127.0.0.1",
    port: int = 7860,
    scene: tuple[Sequence[str], Image.Image] | None = None,
):
    """Open-vocabulary segmentation in the browser (Gradio; pip install 'spar-pl[demo]'): the shipped tiny model
    spar-tiny-p8 on generated scenes when no model is named, else the named model; serves until Ctrl+C.

    Args:
        model: the model (default: the shipped tiny pretrained model).
        student: a SPAR checkpoint (the model's architecture with its weights), or the ``hf-hub:``/``local-dir:``
            id of an exported student: the "SPAR student" choice.
        device: ``cuda``, ``cpu``, ... (default: ``cuda`` when available).
        precision: ``32-true``, ``bf16-mixed`` or ``16-mixed`` (autocast of the encoder).
        stride: sliding-window stride.
        crop: sliding-window side (default: the model's native size).
        max_side: the largest max side a user may pick.
        max_pixels: uploads with more pixels are refused.
        max_file_mb: uploads larger than this (megabytes) are refused.
        host: where the server listens (``0.0.0.0`` serves other machines too).
        port: the server's port.
        scene: the classes and example image a named model starts with (default: a generated shape scene).

    Returns:
        The Gradio app, once the server stops.

    Raises:
        ValueError: a size below 1 or a port out of range.
        SystemExit: Gradio is not installed, or the models cannot be loaded (one line).
    """
    bounds = {
        "stride": stride,
        "crop": crop,
        "max_side": max_side,
        "max_pixels": max_pixels,
        "max_file_mb": max_file_mb,
    }
    for key, value in bounds.items():
        if value is not None and value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {value}")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {port}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit("spar-cli demo needs Gradio: pip install 'spar-pl[demo]'") from None
    if scene is None:
        from spar_pl.scenes import SHAPE_CLASSES, scene_image

        scene = (SHAPE_CLASSES, scene_image())  # a named model starts on a generated scene
    try:
        models = load_models(model, student, device, precision, scene, **bounds)
    except (OSError, ValueError, RuntimeError) as err:
        raise SystemExit(str(err)) from err
    app = build_app(models)
    print(f"spar-cli demo: {models.name} on {models.base.device}; http://{host}:{port} (Ctrl+C stops)")
    app.queue(max_size=16).launch(**launch_options(models, host, port))
    return app


def launch_options(models: DemoModels, host: str, port: int) -> dict:
    """``launch`` arguments of the demo's server: where it listens and the upload size limit it enforces."""
    return {"server_name": host, "server_port": port, "max_file_size": f"{models.max_file_mb}mb", "show_error": True}
