from pathlib import Path

import pytest
import torch

from spar_pl.cli import main
from spar_pl.testing import write_sample_images


def test_main_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["nope"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "unknown command 'nope'" in err and "quickstart" in err
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "quickstart" in capsys.readouterr().out


ROOT = Path(__file__).resolve().parents[1]
TINY_FIT = ["fit", "--config", str(ROOT / "configs/distill/tiny.yaml"), "--data.init_args.val_source", "null"]
TINY_TEST = [
    "test",
    "--config",
    str(ROOT / "configs/eval/voc21.yaml"),
    "--config",
    str(ROOT / "configs/backbones/tiny.yaml"),
]


def user_errors(tmp):
    """(arguments, text the one line must contain) for ordinary mistakes."""
    (tmp / "file").write_text("not a folder")
    (tmp / "bad.ckpt").write_bytes(b"junk")
    (tmp / "bad.parquet").write_bytes(b"not parquet")
    (tmp / "broken.yaml").write_text("trainer: [\n")
    torch.save({"a": torch.zeros(2)}, tmp / "plain.pth")
    write_sample_images(tmp / "imgs", 2, seed=0, size=(48, 64))
    imgs = ["--data.init_args.train_source", str(tmp / "imgs"), "--trainer.default_root_dir", str(tmp / "run")]
    return [
        ([*TINY_FIT, *imgs, "--ckpt_path", str(tmp / "bad.ckpt")], "bad.ckpt is not a checkpoint"),
        ([*TINY_FIT, *imgs, "--ckpt_path", str(tmp / "plain.pth")], "plain.pth is not a Lightning checkpoint"),
        ([*TINY_FIT, *imgs, "--ckpt_path=" + str(tmp / "none.ckpt")], "none.ckpt"),
        (["fit", "--config", str(tmp / "broken.yaml")], "broken.yaml is not valid YAML (line 2)"),
        ([*TINY_FIT, *imgs, "--model.init_args.nope", "1"], "'nope' is not accepted"),
        ([*TINY_FIT, "--data.init_args.train_source", str(tmp / "missing")], "missing"),
        (
            [*TINY_FIT, "--data.init_args.train_source", str(tmp / "bad.parquet"), "--data.init_args.num_images", "2"],
            "bad.parquet",
        ),
        ([*TINY_FIT, *imgs, "--trainer.default_root_dir", str(tmp / "file" / "out")], "file/out cannot be created"),
        ([*TINY_FIT, *imgs, "--model.init_args.stride", "0"], "stride=0"),
        ([*TINY_TEST, "--model.init_args.checkpoint", str(tmp / "bad.ckpt")], "bad.ckpt is not a checkpoint"),
        ([*TINY_TEST, "--model.init_args.results_dir", str(tmp / "file" / "r")], "file/r cannot be created"),
        (["cache", *TINY_FIT[1:], *imgs, "--model.init_args.teacher_cache", str(tmp / "file" / "c")], "file/c"),
        (["export", str(tmp / "bad.ckpt"), str(tmp / "x.safetensors")], "bad.ckpt"),
        (["table", "--render-only", "--results", str(tmp / "none")], "none/siglip2.json"),
        (["table", "--tiny", "--results", str(tmp / "file")], "results folder (--results)"),
        (["segment", str(tmp / "imgs"), "--classes", "a, b", "--out", str(tmp / "file")], "is a file, not a folder"),
        (["reproduce-tiny", "--out", str(tmp / "file" / "r")], "file/r cannot be created"),
        (["pretrain-tiny", "--out", str(tmp / "file" / "w.safetensors")], "is a file, not a folder"),
        (["pretrain-tiny", "--out", str(tmp / "imgs")], "imgs is a folder: name the .safetensors file"),
        (["table", "--ckpt", str(tmp / "none.ckpt"), "--results", str(tmp / "r")], "(--ckpt) not found: "),
        (["table", "--tiny", "--ckpt", str(tmp / "bad.ckpt")], "--ckpt and --tiny exclude each other"),
        (["reproduce-tiny", "--lr", "0", "--out", str(tmp / "r")], "--lr must be above 0, got 0.0"),
        (["tiny-data", str(tmp / "file" / "d")], "file/d cannot be created"),
        (["segment", str(tmp / "imgs"), "--classes", "a", "b", "--out", ""], "output folder (--out): an empty name"),
    ]


def test_user_errors_are_one_line_and_exit_non_zero(tmp_path, capsys):
    for args, expected in user_errors(tmp_path):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(args)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith(("spar-cli", "cannot"))]
        assert exc.value.code not in (0, None), args
        assert len(lines) == 1 and expected in lines[0], (args, err[-2000:])
        assert "Traceback" not in err and "Union subtypes" not in err, (args, err[-2000:])
    assert not list((tmp_path / "run").rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.csv"))  # no work done
    assert not list(tmp_path.rglob("config.yaml"))  # nothing left behind


def test_a_dataloader_worker_error_is_one_line(tmp_path, capsys):
    """A truncated label PNG read in a DataLoader worker (num_workers 2): its own message, no worker traceback."""
    from spar_pl.testing import write_tiny_benchmarks

    root = write_tiny_benchmarks(tmp_path / "bench", images=2)["voc21"]
    label = sorted((root / "SegmentationClass").glob("*.png"))[0]
    label.write_bytes(label.read_bytes()[:100])
    args = [*TINY_TEST, "--data.init_args.root", str(root), "--data.init_args.num_workers", "2"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--model.init_args.results_dir", str(tmp_path / "r"), "--trainer.enable_progress_bar", "false"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("spar-cli test")]
    assert exc.value.code == 1 and len(lines) == 1, err[-2000:]
    assert lines[0] == f"spar-cli test: error: cannot read label file {label}: Truncated File Read", lines
    assert "Traceback" not in err and "worker process" not in err


@pytest.mark.slow
def test_console_is_quiet_and_each_line_once(tmp_path):
    """A fit prints each log line once (no second root handler), no tips, no open_clip "No pretrained weights"
    line, no known-noise warnings; the progress bar shows small losses in 3 significant digits."""
    import subprocess
    import sys

    write_sample_images(tmp_path / "imgs", 2, seed=0, size=(48, 64))
    args = [*TINY_FIT, "--data.init_args.train_source", str(tmp_path / "imgs"), "--trainer.fast_dev_run", "true"]
    args += ["--trainer.default_root_dir", str(tmp_path / "run")]
    result = subprocess.run(
        [sys.executable, "-m", "spar_pl.cli", *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    logged = [line for line in lines if line.startswith(("INFO", "WARNING"))]
    assert len(logged) == len(set(logged)), logged
    text = "\n".join(lines)
    for noise in ("Tip:", "No pretrained weights", "INFO:lightning", "tensorboardX", "LeafSpec", "GPU available"):
        assert noise not in text, (noise, text[-2000:])
    from spar_pl.cli import lightning_cli

    cli = lightning_cli(args[1:], run=False)
    assert cli.trainer.progress_bar_callback.theme.metrics_format == ".3g"


def test_cache_and_fit_without_validation_raise_no_lightning_noise(tmp_path, recwarn):
    """``spar-cli cache`` names entries by image id (no "Couldn't infer the batch indices"); a fit without
    ``val_source`` has an empty validation list on purpose (no "Total length of `list` across ranks is zero")."""
    write_sample_images(tmp_path / "imgs", 2, seed=0, size=(48, 64))
    args = [*TINY_FIT[1:], "--data.init_args.train_source", str(tmp_path / "imgs"), "--trainer.max_epochs", "1"]
    args += ["--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false"]
    main(["cache", *args, "--model.init_args.teacher_cache", str(tmp_path / "cache")])
    main(["fit", *args, "--trainer.limit_train_batches", "1"])
    messages = [str(w.message) for w in recwarn]
    assert not [m for m in messages if "batch indices" in m or "across ranks is zero" in m], messages


def test_help_shows_no_docstring_markup(capsys):
    """``--help`` text comes from docstrings: without their Sphinx roles and double backquotes."""
    for argv in (["--help"], ["export", "--help"], ["segment", "--help"], ["models", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        out = capsys.readouterr().out
        assert exc.value.code == 0 and "``" not in out and ":func:" not in out and ":mod:" not in out, argv


def test_normalise_args_spellings_and_positionals():
    from spar_pl.cli import COMMANDS, _kinds, normalise_args
    from spar_pl.runner import UsageError

    segment = COMMANDS["segment"]
    kinds = _kinds(segment.function(), segment.skip)

    def norm(*argv):
        return normalise_args(argv, kinds, segment.positionals)

    assert norm("a.png", "--max-side", "9", "--out=o") == ["--max_side=9", "--out=o", '--inputs=["a.png"]']
    assert norm("--classes", "a", "b, c", "--logit-scale", "-1") == ['--classes=["a", "b, c"]', "--logit_scale=-1"]
    assert norm("--classes", '["a", "b"]') == ['--classes=["a", "b"]']
    assert norm("--save-probs") == ["--save_probs=true"] and norm("--save-probs", "false") == ["--save_probs=false"]
    assert norm("--no-save-probs") == ["--save_probs", "false"]
    assert norm("--out", "o", "--", "-x.png", "--y.png") == ["--out=o", '--inputs=["-x.png", "--y.png"]']
    assert norm("--out", "-dash folder") == ["--out=-dash folder"]
    tiny = COMMANDS["tiny-data"]
    with pytest.raises(UsageError, match="unexpected arguments: b c"):
        normalise_args(["a", "b", "c"], _kinds(tiny.function(), tiny.skip), tiny.positionals)
    reproduce = COMMANDS["reproduce-tiny"]
    with pytest.raises(UsageError, match="--seeds: 'a' is not an integer"):
        normalise_args(["--seeds", "0", "a"], _kinds(reproduce.function(), reproduce.skip), ())


def test_wrong_arguments_are_one_line_and_exit_2(tmp_path, capsys):
    write_sample_images(tmp_path / "imgs", 1, seed=0, size=(48, 64))
    for args, expected in [
        (["tiny-data", str(tmp_path / "d"), "extra"], "unexpected arguments: extra"),
        (["reproduce-tiny", "--seeds", "x"], "--seeds: 'x' is not an integer"),
        (
            ["segment", str(tmp_path / "imgs"), "--classes", "a", "b", "--stride", "2.5"],
            "--stride: expected an integer, got '2.5'",
        ),
        (["tiny-data", "--train", "many"], "--train: expected an integer, got 'many'"),
        (
            ["segment", "--classes", "a", "b", "c.png", "--out", "o"],
            "the following arguments are required: inputs (usage: ",
        ),
        (["segment", "--out", "o", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(args)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"spar-cli {args[0]}: error: {expected}")
