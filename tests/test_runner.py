"""Running LightningCLI and finding configs (spar_pl.runner): packaged configs outside a checkout, written configs
that stand alone, a resumed run continuing its version."""

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


def test_a_written_config_is_self_contained_and_runs_elsewhere(tmp_path, monkeypatch, capsys):
    """``spar-cli config distill/tiny.yaml > mine.yaml`` in a folder without configs/: it parses and trains."""
    monkeypatch.chdir(tmp_path)
    main(["config", "distill/tiny.yaml"])
    (tmp_path / "mine.yaml").write_text(capsys.readouterr().out)
    assert "../fragments" not in (tmp_path / "mine.yaml").read_text()
    for name in ("distill/siglip2.yaml", "eval/voc21.yaml"):  # every fragment kind: callbacks, data, trainer
        main(["config", name])
        assert "../fragments/" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", "mine.yaml", "--print_config"])
    assert exc.value.code == 0 and "LastCheckpoint" in capsys.readouterr().out
    main(["tiny-data", "data/tiny", "--train", "2", "--val", "1"])
    main(["fit", "--config", "mine.yaml", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"])
    assert list((tmp_path / "results/distill-tiny").rglob("last.ckpt"))


def test_a_resumed_run_shows_its_version_number(tmp_path):
    """``--ckpt_path last`` continues version_0 and the progress bar's ``v_num`` is 0, not ``on_0``."""
    from spar_pl.runner import continue_last_run

    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").write_bytes(b"x")
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    trainer = L.Trainer(logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_model_summary=False)
    assert continue_last_run(trainer, {"save_dir": str(tmp_path)}) == checkpoints / "last.ckpt"
    assert trainer.logger.version == 0 and trainer.logger.log_dir == str(tmp_path / "lightning_logs" / "version_0")
