"""The paper's table: the 18 ``spar-cli test`` runs of one backbone (6 benchmarks x 3 rows) and its rendering.

:func:`table_runs` lists the runs (the packaged eval and backbone configs composed), :func:`run_table` runs them in
this process through :func:`spar_pl.runner.run_lightning` (each appends to ``results/<backbone>.json``) and
:func:`render_table` writes ``results/<backbone>.md``; :func:`table_tiny` does it all on generated data.
"""

from __future__ import annotations

import logging
from pathlib import Path

from spar_pl.callbacks import read_results
from spar_pl.fileio import write_text
from spar_pl.runner import config_path, run_lightning

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


def render_table(results: Path, out: Path | None = None, title: str | None = None) -> str:
    """The paper's table (rows x six benchmarks + mean + seconds per image) from a results file.

    The newest entry of each (row, dataset) counts; a missing cell is ``-`` and the mean is then omitted. The
    ``sources`` column numbers the footnotes that say where each cell came from (:func:`cell_source`).
    """
    if not Path(results).is_file():
        raise FileNotFoundError(f"results file not found: {results}")
    entries = read_results(Path(results))  # a damaged file is named in one line
    cells: dict[tuple[str, str], dict] = {}
    for e in entries:
        cells[(e["row"], e["dataset"])] = e
    rows = [r for r in ROWS if any(k[0] == r for k in cells)] + sorted({k[0] for k in cells} - set(ROWS))
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
    differs (:data:`EVAL_CONFIGS`: MaskCLIP on VOC21 is ``eval/voc21-maskclip.yaml``).
    """
    try:
        backbone_cfg = config_path(f"backbones/{backbone}.yaml")
    except FileNotFoundError:
        raise FileNotFoundError(f"no backbone config backbones/{backbone}.yaml") from None
    runs = []
    for dataset in TABLE_COLUMNS:
        eval_cfg = config_path(f"eval/{EVAL_CONFIGS.get(backbone, {}).get(dataset, dataset)}.yaml")
        args = ["test", "--config", str(eval_cfg), "--config", str(backbone_cfg)]
        args += ["--model.init_args.results_name", backbone, "--model.init_args.table", "true"]
        if roots is not None:
            args += ["--data.init_args.root", str(roots[dataset])]
        runs.append((dataset, ROWS[0], args))
        runs.append(
            (dataset, ROWS[1], [*args, "--model.init_args.mode", "sliding", "--model.init_args.stride", str(stride)])
        )
        if checkpoint:
            runs.append((dataset, ROWS[2], [*args, "--model.init_args.checkpoint", str(checkpoint)]))
    return runs


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
    table = render_table(results, Path(results_dir) / f"{backbone}.md", title=f"{backbone}: mIoU (%)")
    print(table)
    return table


def table_command(argv=None) -> str:
    """``spar-cli table --backbone B [--ckpt SPAR.ckpt] [--tiny]``: the paper's table for a backbone config.

    ``--tiny`` writes tiny versions of the six benchmarks in their official layouts, distils the tiny
    model for a SPAR checkpoint, and runs the whole table with ``configs/backbones/tiny.yaml`` on a CPU
    (``--backbone dinov3txt --tiny``: the DINOv3.txt tiny twin, ``configs/*/dinov3txt-tiny.yaml``).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="spar-cli table", description=table_command.__doc__)
    parser.add_argument(
        "--backbone", default="siglip2", help="a config in configs/backbones/ (siglip2, maskclip, dinov3txt, ...)"
    )
    parser.add_argument("--ckpt", default=None, help="SPAR checkpoint for the SPAR row")
    parser.add_argument("--results", default="results", help="results folder")
    parser.add_argument("--render-only", action="store_true", help="only render results/<backbone>.md")
    parser.add_argument("--tiny", action="store_true", help="tiny model and generated benchmarks (CPU, offline)")
    args = parser.parse_args(argv)
    if args.render_only:
        name = TINY_TWINS.get(args.backbone, "tiny") if args.tiny else args.backbone
        table = render_table(Path(args.results) / f"{name}.json", Path(args.results) / f"{name}.md")
        print(table)
        return table
    if not args.tiny:
        return run_table(args.backbone, args.ckpt, args.results)
    return table_tiny(Path(args.results), TINY_TWINS.get(args.backbone, "tiny"))


#: The tiny configs (``backbones/<name>.yaml`` and ``distill/<name>.yaml``) standing in for a backbone.
TINY_TWINS = {"dinov3txt": "dinov3txt-tiny"}


def table_tiny(results: Path, name: str = "tiny") -> str:
    """The whole table pipeline on generated data: tiny benchmarks, a tiny distillation, 18 evaluations.

    Args:
        results: results folder.
        name: the tiny configs to use (``tiny``: SigLIP2-shaped; ``dinov3txt-tiny``: the DINOv3.txt twin).
    """
    from spar_pl.testing import write_sample_images, write_tiny_benchmarks

    work = results / ("table-tiny" if name == "tiny" else f"table-{name}")
    roots = write_tiny_benchmarks(work / "data", images=2)
    write_sample_images(work / "distill-data", 8, seed=0)
    fit = ["fit", "--config", str(config_path(f"distill/{name}.yaml")), "--trainer.max_epochs", "2"]
    fit += ["--data.init_args.train_source", str(work / "distill-data"), "--data.init_args.val_source", "null"]
    fit += ["--trainer.default_root_dir", str(work / "distill"), "--trainer.enable_progress_bar", "false"]
    run_lightning(fit)
    checkpoint = max((work / "distill").rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")  # the distillation said "Seed set to 0"
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)
    try:
        return run_table(name, str(checkpoint), str(results), roots)
    finally:
        seed_log.setLevel(level)
