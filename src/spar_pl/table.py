"""The paper's table: the 18 ``spar-cli test`` runs of one backbone (6 benchmarks x 3 rows) and its rendering.

:func:`table_runs` lists the runs (the packaged eval and backbone configs composed), :func:`run_table` runs them in
this process through :func:`spar_pl.runner.run_lightning` (each appends to ``results/<backbone>.json``) and
:func:`render_table` writes ``results/<backbone>.md``; :func:`table_tiny` does it all on generated data;
:func:`table` (``spar-cli table``) is the one call for either.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from spar_pl.callbacks import read_results
from spar_pl.fileio import write_text
from spar_pl.runner import check_writable, config_path, run_lightning

#: Column order of the paper's tables (``docs/method.md`` section 5) and their headers.
TABLE_COLUMNS = {
    "voc21": "VOC21",
    "voc20": "VOC20",
    "cityscapes": "City",
    "ade20k": "ADE",
    "context60": "C60",
    "context59": "C59",
}
ROWS = ("pretrained, single pass", "pretrained, sliding window s=24", "SPAR")
#: Benchmarks whose published protocol differs for a backbone config: ``eval/<name>.yaml`` replaces
#: ``eval/<dataset>.yaml`` (``docs/method.md`` section 4: MaskCLIP on VOC21 uses prob_thd 0.1 and area_thd 0.1).
EVAL_CONFIGS = {
    "maskclip": {"voc21": "voc21-maskclip"},
    "maskclip-legacy": {"voc21": "voc21-maskclip"},
}

#: The training-free recipes' tables (``docs/method.md`` section "Dense recipes"): ``backbones/<recipe>.yaml``
#: (``<recipe>-tiny`` for ``--tiny``) evaluated with ``eval/<dataset>-<recipe>.yaml``, the method's own protocol, in
#: every row.
RECIPE_TITLES = {"sclip": "SCLIP", "clearclip": "ClearCLIP", "naclip": "NACLIP"}
#: Published ViT-B/16 mIoU of each method at its own protocol (sources in ``docs/method.md`` section "Dense recipes").
PUBLISHED = {
    "sclip": [
        ("published SCLIP (README)", (59.63, 81.54, 32.34, 16.45, 31.74, 34.46)),
        ("published SCLIP (third-party table)", (59.1, 80.4, 32.2, 16.1, 30.4, 34.2)),
    ],
    "clearclip": [("published ClearCLIP", (51.8, 80.9, 30.0, 16.7, 32.6, 35.9))],
    "naclip": [
        ("published NACLIP with PAMR (README)", (64.07, 83.03, 38.27, 19.05, 34.99, 38.35)),
        ("published NACLIP without PAMR", (58.9, 79.7, 35.5, 17.4, 32.2, 35.2)),
    ],
}
"""Per recipe: (label, mIoU in :data:`TABLE_COLUMNS` order: VOC21, VOC20, City, ADE, C60, C59)."""


def recipe_of(backbone: str) -> str | None:
    """The recipe whose table a backbone config is (``naclip``, ``naclip-tiny`` -> ``naclip``), else ``None``."""
    name = backbone.removesuffix("-tiny")
    return name if name in RECIPE_TITLES else None


def recipe_rows(recipe: str) -> tuple[str, ...]:
    """The measured rows of a recipe's table, in order."""
    return (ROWS[0], f"pretrained, {RECIPE_TITLES[recipe]} protocol", ROWS[1], ROWS[2])


def render_table(
    results: Path,
    out: Path | None = None,
    title: str | None = None,
    order: tuple[str, ...] = ROWS,
    published: list[tuple[str, tuple[float, ...]]] | None = None,
) -> str:
    """The paper's table (rows x six benchmarks + mean + seconds per image) from a results file.

    The newest entry of each (row, dataset) counts; a missing cell is ``-`` and the mean is then omitted. The
    ``sources`` column numbers the footnotes that say where each cell came from (:func:`cell_source`).
    ``order``: the rows first shown, in order (others follow, sorted); ``published``: rows of published numbers
    (label, mIoU per column of :data:`TABLE_COLUMNS`) printed after the measured ones.
    """
    if not Path(results).is_file():
        raise FileNotFoundError(f"results file not found: {results}")
    entries = read_results(Path(results))  # a damaged file is named in one line
    cells: dict[tuple[str, str], dict] = {}
    for e in entries:
        cells[(e["row"], e["dataset"])] = e
    rows = [r for r in order if any(k[0] == r for k in cells)] + sorted({k[0] for k in cells} - set(order))
    header = ["inference", *TABLE_COLUMNS.values(), "mean", "s/img", "sources"]
    lines = [f"## {title or Path(results).stem}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes: list[str] = []
    for row in rows:
        values = [cells.get((row, d), {}).get("mIoU") for d in TABLE_COLUMNS]
        secs = [cells[(row, d)]["seconds_per_image"] for d in TABLE_COLUMNS if (row, d) in cells]
        mean = sum(values) / len(values) if all(v is not None for v in values) else None
        shown = ["-" if v is None else f"{v:.1f}" for v in (*values, mean)]
        s_img = f"{sum(secs) / len(secs):.3f}" if secs else "-"
        marks = []
        for dataset, column in TABLE_COLUMNS.items():
            if (row, dataset) in cells:
                notes.append(f"{len(notes) + 1}. {row}, {column}: {cell_source(cells[(row, dataset)])}")
                marks.append(str(len(notes)))
        lines.append("| " + " | ".join([row, *shown, s_img, ",".join(marks) or "-"]) + " |")
    for label, numbers in published or []:
        shown = [f"{v:.1f}" for v in (*numbers, sum(numbers) / len(numbers))]
        lines.append("| " + " | ".join([label, *shown, "-", "published"]) + " |")
    if notes:
        lines += ["", f"Sources (the newest entry of each cell in {Path(results).name}):", "", *notes]
    text = "\n".join(lines) + "\n"
    if out is not None:
        write_text(out, text)
    return text


def cell_source(entry: dict) -> str:
    """One line saying where a table cell came from: the command, weight files (name and SHA-256 prefix), data root,
    config files and time of its results entry."""
    if "source" not in entry:
        return f"no provenance recorded (entry of {entry.get('time', 'unknown time')})"
    files = [
        f"{kind} {Path(f['path']).name}" + (f" (sha256 {f['sha256'][:12]})" if f.get("sha256") else "")
        for kind, f in entry.get("files", {}).items()
    ]
    configs = " + ".join(Path(c).name for c in entry.get("config_files", [])) or "no config file"
    parts = [entry["source"], *files, f"data {entry.get('data_root')}", f"config {configs}", entry.get("time", "")]
    return "; ".join(p for p in parts if p)


def table_runs(
    backbone: str, checkpoint: str | None, roots: dict[str, Path] | None = None, stride: int = 24
) -> list[tuple[str, str, list[str]]]:
    """The ``spar-cli test`` argument lists behind one table: (dataset, row, args) for 6 benchmarks x 3 rows.

    Each benchmark's eval config is ``eval/<dataset>.yaml``, or the backbone's own protocol where the published one
    differs (:data:`EVAL_CONFIGS`: MaskCLIP on VOC21 is ``eval/voc21-maskclip.yaml``). A recipe's backbone config
    (:data:`RECIPE_TITLES`) gets :func:`recipe_table_runs`.
    """
    if recipe_of(backbone) is not None:
        return recipe_table_runs(backbone, checkpoint, roots, stride)
    try:
        backbone_cfg = config_path(f"backbones/{backbone}.yaml")
    except FileNotFoundError:
        raise FileNotFoundError(f"no backbone config backbones/{backbone}.yaml") from None
    runs = []
    for dataset in TABLE_COLUMNS:
        eval_cfg = config_path(f"eval/{EVAL_CONFIGS.get(backbone, {}).get(dataset, dataset)}.yaml")
        args = ["test", "--config", str(eval_cfg), "--config", str(backbone_cfg), *table_cell(backbone)]
        if roots is not None:
            args += ["--data.init_args.root", str(roots[dataset])]
        runs.append((dataset, ROWS[0], args))
        runs.append(
            (dataset, ROWS[1], [*args, "--model.init_args.mode", "sliding", "--model.init_args.stride", str(stride)])
        )
        if checkpoint:
            runs.append((dataset, ROWS[2], [*args, "--model.init_args.checkpoint", str(checkpoint)]))
    return runs


def table_cell(backbone: str) -> list[str]:
    """The arguments that make a ``spar-cli test`` run a cell of ``backbone``'s table: its results go to
    ``<backbone>.json``, marked as the table's (ad-hoc runs go to ``<backbone>-test.json``)."""
    return ["--model.init_args.results_name", backbone, "--model.init_args.table", "true"]


def recipe_table_runs(
    backbone: str, checkpoint: str | None, roots: dict[str, Path] | None = None, stride: int = 24
) -> list[tuple[str, str, list[str]]]:
    """A recipe's table: 6 benchmarks x 4 rows, each with ``eval/<dataset>-<recipe>.yaml`` (the method's test resize,
    thresholds, logit scale and PAMR) and ``backbones/<backbone>.yaml``: single pass, the method's own inference
    (its sliding window, or NACLIP's single pass on VOC), SPAR's sliding window (native crop, ``stride``) and SPAR
    (the checkpoint's single pass). A ``-tiny`` backbone (64 px native) scales the method's crop, stride and test
    resize by 64 / 224."""
    import yaml

    recipe = recipe_of(backbone)
    try:
        backbone_cfg = config_path(f"backbones/{backbone}.yaml")
    except FileNotFoundError:
        raise FileNotFoundError(f"no backbone config backbones/{backbone}.yaml") from None
    rows = recipe_rows(recipe)
    runs = []
    for dataset in TABLE_COLUMNS:
        eval_cfg = config_path(f"eval/{dataset}-{recipe}.yaml")
        args = ["test", "--config", str(eval_cfg), "--config", str(backbone_cfg), *table_cell(backbone)]
        if backbone.endswith("-tiny"):
            cfg = yaml.safe_load(Path(eval_cfg).read_text())
            model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
            scale = 64 / 224
            args += ["--model.init_args.crop", str(round(model["crop"] * scale))]
            args += ["--model.init_args.stride", str(round(model["stride"] * scale))]
            long, short = data["max_sides"]
            args += ["--data.init_args.max_sides", f"[{long}, {round(short * scale)}]"]
        if roots is not None:
            args += ["--data.init_args.root", str(roots[dataset])]
        runs.append((dataset, rows[0], [*args, "--model.init_args.mode", "single"]))
        runs.append((dataset, rows[1], [*args, "--model.init_args.row_label", rows[1]]))
        window = ["--model.init_args.mode", "sliding", "--model.init_args.stride", str(stride)]
        runs.append((dataset, rows[2], [*args, *window, "--model.init_args.crop", "null"]))
        if checkpoint:
            spar = ["--model.init_args.mode", "single", "--model.init_args.checkpoint", str(checkpoint)]
            runs.append((dataset, rows[3], [*args, *spar]))
    return runs


def table_rows(backbone: str) -> tuple[tuple[str, ...], list | None]:
    """The row order and published rows of a backbone's table (a recipe's: :func:`recipe_rows`, :data:`PUBLISHED`)."""
    recipe = recipe_of(backbone)
    return (recipe_rows(recipe), PUBLISHED[recipe]) if recipe else (ROWS, None)


def run_table(backbone: str, checkpoint: str | None, results_dir: str = "results", roots=None, extra=()) -> str:
    """Run the 18 evaluations of one backbone in this process and render ``results/<backbone>.md``."""
    runs = table_runs(backbone, checkpoint, roots)
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")  # "Seed set to 0": said by the first run only
    level = seed_log.level
    try:
        for k, (dataset, row, args) in enumerate(runs, 1):
            print(f"[{k}/{len(runs)}] {dataset}: {row}", flush=True)
            quiet = ["--trainer.enable_progress_bar", "false", "--verbose", "false"]  # the table is the summary
            run_lightning([*args, "--model.init_args.results_dir", results_dir, *quiet, *extra])
            seed_log.setLevel(logging.WARNING)
    finally:
        seed_log.setLevel(level)
    results = Path(results_dir) / f"{backbone}.json"
    table = render_table(results, Path(results_dir) / f"{backbone}.md", f"{backbone}: mIoU (%)", *table_rows(backbone))
    print(table)
    return table


def table(
    backbone: str = "siglip2",
    ckpt: str | None = None,
    results: str = "results",
    render_only: bool = False,
    tiny: bool = False,
) -> str:
    """The paper's table for a backbone config: its evaluations run in this process, rendered as
    ``<results>/<backbone>.md``, printed and returned.

    ``tiny`` writes tiny versions of the six benchmarks in their official layouts, distils the tiny
    model for a SPAR checkpoint, and runs the whole table with ``configs/backbones/tiny.yaml`` on a CPU
    (``--backbone dinov3txt --tiny``: the DINOv3.txt tiny twin, ``configs/*/dinov3txt-tiny.yaml``).

    Args:
        backbone: a config in ``configs/backbones/`` (``siglip2``, ``maskclip``, ``dinov3txt``, ``sclip``, ...).
        ckpt: SPAR checkpoint for the SPAR row (none: the table has no SPAR row).
        results: results folder (checked writable before any evaluation, unless ``render_only``).
        render_only: only render ``<results>/<backbone>.md`` from its results file.
        tiny: tiny model and generated benchmarks (CPU, offline).

    Raises:
        FileNotFoundError: no such backbone config, no ``ckpt`` file, or (``render_only``) no results file.
        ValueError: ``ckpt`` with ``tiny`` (which distils its own).
        NotADirectoryError, PermissionError: a results folder that cannot be written.
    """
    folder = Path(results)
    if tiny and ckpt is not None:
        raise ValueError("--ckpt and --tiny exclude each other: the tiny table distils its own SPAR checkpoint")
    if ckpt is not None and not render_only and not Path(ckpt).is_file():
        raise FileNotFoundError(f"checkpoint (--ckpt) not found: {ckpt}")  # before the hours of the other rows
    if render_only:
        name = tiny_twin(backbone)[0] if tiny else backbone
        text = render_table(folder / f"{name}.json", folder / f"{name}.md", None, *table_rows(name))
        print(text)
        return text
    check_writable(folder, "results folder (--results)")  # a finished evaluation must not be lost to it
    if not tiny:
        return run_table(backbone, ckpt, results)
    name, overrides = tiny_twin(backbone)
    return table_tiny(folder, name, overrides)


def tiny_twin(backbone: str) -> tuple[str, list[str]]:
    """The tiny configs (``backbones/<name>.yaml`` and ``distill/<name>.yaml``) standing in for a backbone, and the
    arguments that adapt them: a recipe's own tiny configs, a family's where it has some (:data:`TINY_TWINS`:
    DINOv3.txt's), else the SigLIP2-shaped ``tiny`` configs, given the family's tiny twin
    (:attr:`~spar_pl.families.Family.tiny_model`) and its default crop when it is another model."""
    from spar_pl.families import backbone_family

    if backbone in RECIPE_TITLES:  # a training-free recipe's tables: its own tiny configs
        return f"{backbone}-tiny", []
    family = backbone_family(backbone)
    if family.name in TINY_TWINS:
        return TINY_TWINS[family.name], []
    if family.tiny_model == "spar-tiny-sl2":
        return "tiny", []
    model = ["--model.init_args.backbone", family.name, "--model.init_args.model_name", family.tiny_model]
    return "tiny", [*model, "--model.init_args.crop", "null"]


#: Tiny configs of a family, by family name (:func:`tiny_twin`).
TINY_TWINS = {"dinotxt": "dinov3txt-tiny"}


def table_tiny(results: Path, name: str = "tiny", overrides: Sequence[str] = ()) -> str:
    """The whole table pipeline on generated data: tiny benchmarks, a tiny distillation, 18 evaluations.

    Args:
        results: results folder.
        name: the tiny configs to use (``tiny``: SigLIP2-shaped; ``dinov3txt-tiny``: the DINOv3.txt twin).
        overrides: arguments added to the distillation and every evaluation (another family's tiny twin).
    """
    from spar_pl.testing import write_sample_images, write_tiny_benchmarks

    work = results / ("table-tiny" if name == "tiny" else f"table-{name}")
    roots = write_tiny_benchmarks(work / "data", images=2)
    write_sample_images(work / "distill-data", 8, seed=0)
    fit = ["fit", "--config", str(config_path(f"distill/{name}.yaml")), "--trainer.max_epochs", "2"]
    fit += ["--data.init_args.train_source", str(work / "distill-data"), "--data.init_args.val_source", "null"]
    fit += ["--trainer.default_root_dir", str(work / "distill"), "--trainer.enable_progress_bar", "false"]
    run_lightning([*fit, *overrides])
    checkpoint = max((work / "distill").rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")  # the distillation said "Seed set to 0"
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)
    try:
        return run_table(name, str(checkpoint), str(results), roots, overrides)
    finally:
        seed_log.setLevel(level)
