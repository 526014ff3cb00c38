"""``spar-cli demo``: open-vocabulary segmentation in the browser (Gradio; ``pip install 'spar-pl[demo]'``).

Upload an image or pick a generated shape scene, type the classes (one class a line, commas list synonyms: the
syntax of class files and of ``--classes``), choose single pass, sliding window and/or a SPAR student, and see the
overlays side by side with their time per image and a legend; the label PNGs can be downloaded.

Bounded like the CLI: the server takes images as decoded pixels (it never opens a path a client sends); an upload
over ``max_file_mb`` megabytes or ``max_pixels`` pixels is refused with a message; the model input is downscaled to
the user's max side (at most the server's); one request runs at a time (a queue). The device is CUDA when available.
"""

from __future__ import annotations

import argparse
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

__all__ = ["DemoModels", "build_app", "demo", "launch_options", "load_models", "segment_request"]

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


def load_models(args: argparse.Namespace, scene: tuple[Sequence[str], Image.Image] | None = None) -> DemoModels:
    """The models of ``spar-cli demo``'s options: the shipped tiny model when no model is named (with generated
    shape scenes); a named model starts with ``scene`` (its classes and example image), if given."""
    from spar_pl.api import SPAR, load
    from spar_pl.hub import HUB_SCHEMES

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shipped = all(v is None for v in (args.backbone, args.model_name, args.weights, args.pretrained))
    pretrained = args.pretrained if args.pretrained is not None else "default"
    if shipped:
        from spar_pl.images import to_pil
        from spar_pl.reproduce import TINY_MODEL, load_tiny
        from spar_pl.scenes import SHAPE_CLASSES, make_scenes

        base = SPAR(load_tiny(device=device), "maskclip", precision=args.precision)
        backbone, model_name, classes = "maskclip", TINY_MODEL, list(SHAPE_CLASSES)
        scenes = make_scenes(3, 256, 0, "demo")[0]
        examples = [to_pil(scene) for scene in scenes]
        name = f"{TINY_MODEL} (shipped tiny model, pretrained on generated shape scenes)"
    else:
        backbone, model_name = args.backbone, args.model_name
        base = load(backbone, None, device, model_name, pretrained, args.weights, args.head_weights, args.precision)
        classes, examples = (list(scene[0]), [scene[1]]) if scene is not None else ([], [])
        name = base.model_name
    student = None
    if args.student is not None:
        if args.student.startswith(HUB_SCHEMES):
            student = load(args.student, device=device, precision=args.precision)
        else:  # the base model's architecture with the checkpoint's weights
            tag = None if shipped else pretrained
            student = load(backbone, args.student, device, model_name, tag, None, None, args.precision)
    return DemoModels(
        base,
        student,
        classes,
        examples,
        stride=args.stride,
        crop=args.crop,
        max_side=args.max_side,
        max_pixels=args.max_pixels,
        max_file_mb=args.max_file_mb,
        name=name,
    )


def demo(argv: Sequence[str] | None = None, scene: tuple[Sequence[str], Image.Image] | None = None):
    """``spar-cli demo``: the browser demo (the shipped tiny model by default; the usual model options). ``scene``:
    the classes and example image a named model starts with."""
    from spar_pl.families import backbone_names
    from spar_pl.runner import command_help, positive_int

    parser = argparse.ArgumentParser(prog="spar-cli demo", description=command_help(__doc__.split("\n\n")[0]))
    parser.add_argument(
        "--backbone",
        default=None,
        choices=backbone_names(),
        help="a paper preset or a family (default: the family of --model-name's model; nothing named: the shipped "
        "tiny model spar-tiny-p8 on generated scenes)",
    )
    parser.add_argument("--model-name", default=None, help="open_clip name, hf-hub:ORG/NAME or local-dir:PATH")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag (default: the backbone's)")
    parser.add_argument("--weights", default=None, help="local open_clip weights file; dinov3txt: the backbone .pth")
    parser.add_argument("--head-weights", default=None, help="dinov3txt: the dino.txt head and text encoder .pth")
    parser.add_argument("--student", default=None, help="a SPAR checkpoint, or hf-hub:/local-dir: id of a student")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed", "16-mixed"))
    parser.add_argument("--stride", type=positive_int, default=24, help="sliding-window stride")
    parser.add_argument("--crop", type=positive_int, default=None, help="sliding-window side (default: native)")
    parser.add_argument("--max-side", type=positive_int, default=512, help="the largest max side a user may pick")
    parser.add_argument("--max-pixels", type=positive_int, default=40_000_000, help="uploads over this are refused")
    parser.add_argument("--max-file-mb", type=positive_int, default=20, help="uploads over this are refused")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit("spar-cli demo needs Gradio: pip install 'spar-pl[demo]'") from None
    try:
        models = load_models(args, scene)
    except (OSError, ValueError, RuntimeError) as err:
        raise SystemExit(str(err)) from err
    app = build_app(models)
    print(f"spar-cli demo: {models.name} on {models.base.device}; http://{args.host}:{args.port} (Ctrl+C stops)")
    app.queue(max_size=16).launch(**launch_options(models, args.host, args.port))
    return app


def launch_options(models: DemoModels, host: str, port: int) -> dict:
    """``launch`` arguments of the demo's server: where it listens and the upload size limit it enforces."""
    return {"server_name": host, "server_port": port, "max_file_size": f"{models.max_file_mb}mb", "show_error": True}
