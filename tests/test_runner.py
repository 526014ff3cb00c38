"""Running LightningCLI and finding configs (spar_pl.runner): packaged configs outside a checkout."""

import pytest

from spar_pl.cli import main


def test_packaged_configs_outside_a_checkout(tmp_path, monkeypatch, capsys):
    """A wheel install has no ``configs/`` folder: ``--config configs/...`` reads the packaged file, said in one line;
    ``spar-cli config`` lists and prints the shipped configs."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["test", "--config", "configs/eval/voc21-maskclip.yaml", "--config=configs/backbones/tiny.yaml"])
    captured = capsys.readouterr()
    assert exc.value.code not in (0, None)  # no data here: the run gets as far as the dataset
    notes = [line for line in captured.err.splitlines() if "packaged copy" in line]
    assert len(notes) == 1 and "configs/eval/voc21-maskclip.yaml, configs/backbones/tiny.yaml" in notes[0]
    assert "data/VOCdevkit/VOC2012" in captured.err  # the packaged eval config's root, relative to this folder
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", "configs/distill/siglip2.yaml", "--print_config"])
    assert exc.value.code == 0 and "LastCheckpoint" in capsys.readouterr().out  # its fragments resolved too
    main(["config"])
    listed = capsys.readouterr().out
    assert "distill/siglip2.yaml" in listed and "eval/voc21-maskclip.yaml" in listed
    main(["config", "configs/eval/voc21-maskclip.yaml"])
    assert "area_thd: 0.1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["config", "eval/nope.yaml"])
    assert "no packaged config eval/nope.yaml" in capsys.readouterr().err
