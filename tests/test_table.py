"""The paper's table (spar_pl.table): the 18 runs behind it and its rendering."""

import json
import logging
from pathlib import Path

import pytest

from spar_pl.table import render_table, table_runs


def test_table_runs_and_rendering(tmp_path):
    runs = table_runs("maskclip", "spar.ckpt")
    assert len(runs) == 18
    modes = {
        row: [a[a.index("--model.init_args.mode") + 1] if "--model.init_args.mode" in a else "single"][0]
        for _, row, a in runs
    }
    assert modes == {
        "pretrained, single pass": "single",
        "pretrained, sliding window s=24": "sliding",
        "SPAR": "single",
    }
    assert not any("--model.init_args.area_thd" in a for _, _, a in runs)  # the config carries the protocol
    evals = {d: Path(a[a.index("--config") + 1]).name for d, _, a in runs}
    assert evals["voc21"] == "voc21-maskclip.yaml" and evals["voc20"] == "voc20.yaml"
    for backbone, voc21 in (("maskclip-legacy", "voc21-maskclip.yaml"), ("siglip2", "voc21.yaml")):
        assert {Path(a[a.index("--config") + 1]).name for d, _, a in table_runs(backbone, None) if d == "voc21"} == {
            voc21
        }
    entries = [{"dataset": d, "row": r, "mIoU": 10.0 + i, "seconds_per_image": 0.5} for i, (d, r, _) in enumerate(runs)]
    (tmp_path / "b.json").write_text(json.dumps(entries))
    table = render_table(tmp_path / "b.json", tmp_path / "b.md")
    lines = table.splitlines()
    assert lines[2].split("|")[1:-1][1:8] == [" VOC21 ", " VOC20 ", " City ", " ADE ", " C60 ", " C59 ", " mean "]
    spar = next(line for line in lines if line.startswith("| SPAR"))
    assert spar.split("|")[2].strip() == "12.0" and (tmp_path / "b.md").read_text() == table


@pytest.mark.slow
def test_table_tiny_end_to_end(tmp_path, caplog):
    from spar_pl.table import table as paper_table

    with caplog.at_level(logging.INFO):
        table = paper_table(tiny=True, results=str(tmp_path))
    assert sum("Seed set to" in r.getMessage() for r in caplog.records) == 1  # said once, not by each of 19 runs
    rows = [line for line in table.splitlines() if line.startswith("| ") and "inference" not in line]
    assert [r.split("|")[1].strip() for r in rows] == [
        "pretrained, single pass",
        "pretrained, sliding window s=24",
        "SPAR",
    ]
    assert all(cell.strip() not in ("-", "") for r in rows for cell in r.split("|")[2:10])  # every cell filled
    assert (tmp_path / "tiny.md").is_file() and len(json.loads((tmp_path / "tiny.json").read_text())) == 18
