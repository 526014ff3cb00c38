"""The training-free recipes' configs, distillation and tables (spar_pl.table, configs/*/<recipe>*.yaml)."""

from __future__ import annotations

import json

import pytest
import torch

from spar_pl.cli import main
from spar_pl.distill import DistillModule
from spar_pl.table import PUBLISHED, RECIPE_TITLES, TABLE_COLUMNS, recipe_rows, render_table, table_runs

from .helpers import ROOT

RECIPES = list(RECIPE_TITLES)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dataset", list(TABLE_COLUMNS))
def test_recipe_eval_config_composes_with_its_backbone(recipe, dataset, capsys):
    configs = ROOT / "configs"
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "test",
                "--config",
                str(configs / "eval" / f"{dataset}-{recipe}.yaml"),
                "--config",
                str(configs / "backbones" / f"{recipe}.yaml"),
                "--print_config",
            ]
        )
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"dense: {recipe}" in out and "model_name: ViT-B-16-quickgelu" in out and "pretrained: openai" in out
    assert ("pamr_steps: 10" in out) == (recipe == "naclip")


def test_recipe_table_runs_rows_and_protocols():
    runs = table_runs("naclip-tiny", "spar.ckpt")
    assert len(runs) == 24
    assert [row for dataset, row, _ in runs if dataset == "voc21"] == list(recipe_rows("naclip"))
    by = {(dataset, row): args for dataset, row, args in runs}
    own = by[("cityscapes", "pretrained, NACLIP protocol")]
    assert any(a.endswith("eval/cityscapes-naclip.yaml") for a in own)
    assert "--model.init_args.mode" not in own  # the config's own mode (NACLIP: sliding; single pass on VOC)
    # 64 / 224 of NACLIP's crop 224, stride 112 and Cityscapes short side 560
    assert own[own.index("--model.init_args.crop") + 1] == "64"
    assert own[own.index("--model.init_args.stride") + 1] == "32"
    assert own[own.index("--data.init_args.max_sides") + 1] == "[2048, 160]"
    spar = by[("voc21", "SPAR")]
    assert spar[-4:] == ["--model.init_args.mode", "single", "--model.init_args.checkpoint", "spar.ckpt"]
    window = by[("ade20k", "pretrained, sliding window s=24")]
    assert window[-6:] == [
        *["--model.init_args.mode", "sliding", "--model.init_args.stride", "24"],
        *["--model.init_args.crop", "null"],
    ]
    full = table_runs("clearclip", None)  # the full-size table: the configs' own crop and resize, no SPAR row
    assert len(full) == 18 and not any("--model.init_args.crop" in args[:-2] for _, _, args in full)


def test_render_table_prints_published_rows(tmp_path):
    entries = [
        {"row": row, "dataset": d, "mIoU": 10.0 + k, "seconds_per_image": 0.5}
        for k, row in enumerate(recipe_rows("sclip"))
        for d in TABLE_COLUMNS
    ]
    results = tmp_path / "sclip.json"
    results.write_text(json.dumps(entries))
    table = render_table(results, None, "t", recipe_rows("sclip"), PUBLISHED["sclip"])
    rows = [line.split("|")[1].strip() for line in table.splitlines()[4:] if line.startswith("| ")]
    assert rows == [*recipe_rows("sclip"), "published SCLIP (README)", "published SCLIP (third-party table)"]
    published = (
        "| published SCLIP (third-party table) | 59.1 | 80.4 | 32.2 | 16.1 | 30.4 | 34.2 | 42.1 | - | published |"
    )
    assert published in table


def test_distill_module_uses_the_recipe_for_teacher_and_student():
    module = DistillModule(backbone="maskclip", model_name="spar-tiny-clip", pretrained=None, crop=64, dense="naclip")
    assert module.student.dense == "naclip" and module.teacher.encoder.dense == "naclip"
    last = len(module.student.blocks) - 1
    assert not any(n.startswith(f"model.visual.transformer.resblocks.{last}.mlp.") for n in module.trainable_names)
    loss = module.feature_loss(torch.rand(1, 3, 96, 128))
    loss.backward()
    assert all(p.grad is not None for p in module.student.parameters() if p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_table_tiny_end_to_end(recipe, tmp_path):
    """distill -> test: the whole recipe table on tiny generated data, every cell filled."""
    from spar_pl.table import table as paper_table

    table = paper_table(recipe, tiny=True, results=str(tmp_path))
    lines = [line for line in table.splitlines() if line.startswith("| ") and "inference" not in line]
    measured = [line for line in lines if not line.startswith("| published")]
    assert [r.split("|")[1].strip() for r in measured] == list(recipe_rows(recipe))
    assert all(cell.strip() not in ("-", "") for r in measured for cell in r.split("|")[2:10])
    entries = json.loads((tmp_path / f"{recipe}-tiny.json").read_text())
    assert len(entries) == 24 and {e["config"]["dense"] for e in entries} == {recipe}
    assert all(("pamr_steps" in e["config"]) == (recipe == "naclip") for e in entries)
