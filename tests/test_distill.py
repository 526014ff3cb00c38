import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from spar_pl.cli import main
from spar_pl.distill import DistillModule
from spar_pl.encoders import build_encoder

from .helpers import ROOT, fit_args

SHIPPED = sorted(p for folder in ("distill", "eval", "backbones") for p in (ROOT / "configs" / folder).glob("*.yaml"))


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.name)  # fragments/ are read through these
def test_every_shipped_config_parses_offline(config, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--print_config"])
    assert exc.value.code == 0
    assert "class_path" in capsys.readouterr().out


def test_fast_dev_run(images, tmp_path):
    main(fit_args(images, tmp_path, "--trainer.fast_dev_run", "true"))


@pytest.mark.slow
def test_fit_survives_bad_images(images, tmp_path, monkeypatch):
    from PIL import Image

    train, val = tmp_path / "train", tmp_path / "val"
    for folder, source in ((train, images / "train"), (val, images / "val")):
        folder.mkdir()
        for p in sorted(source.iterdir()):
            (folder / p.name).write_bytes(p.read_bytes())
    Image.new("RGB", (600, 500)).save(train / "bomb.png")
    Image.new("RGB", (4000, 16)).save(train / "strip.png")
    Image.new("RGB", (15, 15)).save(val / "tiny.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    args = fit_args(images, tmp_path / "run", "--trainer.max_epochs", "1", "--data.init_args.num_images", "8")
    args[args.index(str(images / "train"))] = str(train)
    args[args.index(str(images / "val"))] = str(val)
    main(args)
    rows = next((tmp_path / "run").rglob("metrics.csv")).read_text().splitlines()
    col = rows[0].split(",").index("train/skipped_images")
    assert [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]] == [2.0]


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def tiny_module(**kwargs):
    torch.manual_seed(0)
    args = {"backbone": "siglip2", "model_name": "spar-tiny-sl2", "pretrained": None, "crop": 64, "lr": 1e-3}
    return DistillModule(**{**args, **kwargs})


def tiny_data(images, **kwargs):
    from spar_pl.data import DistillDataModule

    return DistillDataModule(str(images / "train"), box=(256, 128), min_side=64, shuffle_buffer=8, **kwargs)


def trainer(root, **kwargs):
    args = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False}
    args.update(enable_model_summary=False, default_root_dir=str(root))
    return L.Trainer(**{**args, **kwargs})


def test_loss_falls_and_teacher_stays_frozen(images, tmp_path):
    module = tiny_module()
    before = {k: v.clone() for k, v in module.teacher.encoder.state_dict().items()}
    recorder = LossRecorder()
    trainer(tmp_path, max_epochs=5, callbacks=[recorder], enable_checkpointing=False).fit(module, tiny_data(images))
    losses = recorder.losses
    assert len(losses) == 30
    assert np.mean(losses[-6:]) < 0.7 * np.mean(losses[:6])
    teacher = module.teacher
    assert not teacher.training and not teacher.encoder.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.encoder.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert dict(module.named_children())["teacher"] is teacher  # a registered child, kept out of checkpoints
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("trunk.blocks." in n for n in trainable)


def test_checkpoint_has_no_teacher_and_export_loads(images, tmp_path):
    main(fit_args(images, tmp_path, "--trainer.max_epochs", "1"))
    ckpts = sorted(tmp_path.rglob("last.ckpt"))
    assert len(ckpts) == 1
    state = torch.load(ckpts[0], map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(k.startswith("student.") for k in state)
    out = tmp_path / "student.safetensors"
    main(["export", str(ckpts[0]), str(out)])
    module = DistillModule.load_from_checkpoint(ckpts[0])
    encoder = build_encoder("siglip2", "spar-tiny-sl2", weights=out)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), module.student(x))


def test_checkpoint_starts_the_student_and_the_teacher_stays_pretrained(tmp_path):
    from safetensors.torch import save_file

    plain = tiny_module()
    trained = {k: v + 0.5 for k, v in plain.student.model.state_dict().items()}  # a "distilled" student
    save_file(trained, tmp_path / "student.safetensors")
    module = tiny_module(checkpoint=str(tmp_path / "student.safetensors"))
    student = module.student.model.state_dict()
    assert all(torch.equal(student[k], trained[k]) for k in trained)
    teacher, pretrained = module.teacher.encoder.model.visual, plain.teacher.encoder.model.visual
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), pretrained.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*missing.ckpt"):
        tiny_module(checkpoint=str(tmp_path / "missing.ckpt"))


def final_weights(root):
    found = list(root.rglob("last.ckpt"))
    assert len(found) == 1, found  # one run folder: the resumed run continued in it
    ckpt = torch.load(found[0], map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt["global_step"]


def trained_ids(folder):
    return [line.split() for line in (folder / "rank0.txt").read_text().splitlines()]


def record(folder):
    return ["--trainer.callbacks+=tests.helpers.RecordIds", f"--trainer.callbacks.out={folder}"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)


FRESH_WORKERS = ("--data.init_args.mode", "fresh", "--data.init_args.num_workers", "2")


def test_ckpt_path_last_resumes_in_the_same_root(images, tmp_path, monkeypatch):
    """The README's resume command (``spar-cli fit --config CFG --ckpt_path last``) continues the last run, with
    loader workers and a new augmentation every epoch (workers start before the epoch hook)."""
    monkeypatch.chdir(ROOT)  # tests.helpers importable by the CLI
    main(fit_args(images, tmp_path / "straight", "--trainer.max_epochs", "2", *FRESH_WORKERS, *record(tmp_path / "a")))
    root = tmp_path / "resumed"
    main(fit_args(images, root, "--trainer.max_epochs", "1", *FRESH_WORKERS, *record(tmp_path / "b")))
    main(
        fit_args(
            images, root, "--trainer.max_epochs", "2", *FRESH_WORKERS, *record(tmp_path / "b"), "--ckpt_path", "last"
        )
    )
    straight, step_a = final_weights(tmp_path / "straight")
    resumed, step_b = final_weights(root)
    assert step_a == step_b == 12
    assert trained_ids(tmp_path / "b") == trained_ids(tmp_path / "a")
    assert_same_weights(straight, resumed)
    assert [p.name for p in (root / "lightning_logs").iterdir()] == ["version_0"]
    rows = (root / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    col = rows[0].split(",").index("train/loss_epoch")
    assert sum(1 for r in rows[1:] if r.split(",")[col]) == 2  # both epochs' losses in the run's one metrics.csv


def test_resume_from_the_last_batch_starts_the_next_epoch(images, tmp_path, monkeypatch):
    """A 4-image epoch with last.ckpt every 4 steps: the checkpoint of the epoch's last batch (written before the
    epoch's end) resumes with the next epoch, on the images of an uninterrupted run; at that boundary num_workers
    may change."""
    monkeypatch.chdir(ROOT)
    four = ("--data.init_args.num_images", "4", *FRESH_WORKERS)
    main(fit_args(images, tmp_path / "straight", "--trainer.max_epochs", "2", *four, *record(tmp_path / "a")))
    root = tmp_path / "resumed"
    main(fit_args(images, root, "--trainer.max_epochs", "1", *four, *record(tmp_path / "b")))
    assert torch.load(next(root.rglob("last.ckpt")), weights_only=True)["global_step"] == 4
    main(fit_args(images, root, "--trainer.max_epochs", "2", *four, *record(tmp_path / "b"), "--ckpt_path", "last"))
    assert trained_ids(tmp_path / "b") == trained_ids(tmp_path / "a")
    assert final_weights(root)[1] == 8
    other = tmp_path / "other"
    main(fit_args(images, other, "--trainer.max_epochs", "1", *four))
    main(fit_args(images, other, "--trainer.max_epochs", "2", *four[:-1], "0", "--ckpt_path", "last"))
    assert final_weights(other)[1] == 8


def metrics_rows(root):
    """The rows of a run's one metrics.csv, as dicts of the non-empty values."""
    import csv

    (found,) = root.rglob("metrics.csv")
    with found.open(newline="") as fh:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "kill"), [(0, False), (2, False), (0, True)], ids=["error", "workers", "kill-9"])
def test_interrupted_mid_epoch_resumes_without_replay_or_skip(images, tmp_path, monkeypatch, workers, kill):
    """last.ckpt every 4 steps (tiny.yaml): a run stopped (an error, or kill -9 of its process) at step 5 of a 6-step
    epoch resumes from step 4 and trains on exactly the images, crops and order of an uninterrupted run, ending with
    equal weights; the interrupted epoch's train/loss_epoch is the uninterrupted run's (the mean over all of its
    steps, not only those after the resume) and metrics.csv holds every step once."""
    monkeypatch.chdir(ROOT)
    data = ("--data.init_args.mode", "fresh", "--data.init_args.num_workers", str(workers))
    main(fit_args(images, tmp_path / "straight", "--trainer.max_epochs", "2", *data, *record(tmp_path / "a")))
    root = tmp_path / "resumed"
    stop = ["--trainer.callbacks+=tests.helpers.Interrupt", "--trainer.callbacks.step=5"]
    interrupted = fit_args(images, root, "--trainer.max_epochs", "2", *data, *record(tmp_path / "b"), *stop)
    if kill:
        cmd = [sys.executable, "-m", "spar_pl.cli", *interrupted, "--trainer.callbacks.kill=true"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert result.returncode == -9, result.stderr[-3000:]
    else:
        with pytest.raises(RuntimeError, match="interrupted at step 5"):
            main(interrupted)
    assert torch.load(next(root.rglob("last.ckpt")), weights_only=True)["global_step"] == 4
    main(fit_args(images, root, "--trainer.max_epochs", "2", *data, *record(tmp_path / "c"), "--ckpt_path", "last"))
    straight, resumed = trained_ids(tmp_path / "a"), trained_ids(tmp_path / "c")
    assert trained_ids(tmp_path / "b")[:4] == straight[:4]
    assert resumed == straight[4:]  # steps 4.. again, nothing replayed or skipped
    (a, step_a), (b, step_b) = final_weights(tmp_path / "straight"), final_weights(root)
    assert step_a == step_b == 12
    assert_same_weights(a, b)
    rows_a, rows_b = metrics_rows(tmp_path / "straight"), metrics_rows(root)
    epoch_a = [float(r["train/loss_epoch"]) for r in rows_a if "train/loss_epoch" in r]
    epoch_b = [float(r["train/loss_epoch"]) for r in rows_b if "train/loss_epoch" in r]
    assert len(epoch_a) == len(epoch_b) == 2
    # bitwise in one process; the killed run's own process may round its float32 losses in another order
    assert epoch_b == (pytest.approx(epoch_a, rel=1e-6, abs=0) if kill else epoch_a), (epoch_a, epoch_b)
    logged_a, logged_b = (
        [(int(r["step"]), k) for r in rows for k in r if k not in ("step", "epoch")] for rows in (rows_a, rows_b)
    )
    assert len(logged_b) == len(set(logged_b)), sorted(k for k in logged_b if logged_b.count(k) > 1)  # no step twice
    assert logged_b == sorted(logged_b, key=lambda item: item[0])  # in step order
    assert sorted(logged_b) == sorted(logged_a)  # the whole run's history, the steps before the checkpoint included


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(images, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "spar_pl.cli",
        *fit_args(images, tmp_path, "--trainer.max_epochs", "4"),
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.callbacks+=tests.helpers.RecordIds",
        f"--trainer.callbacks.out={tmp_path / 'ids'}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(tmp_path.rglob("last.ckpt"))) == 1
    metrics = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()
    header = metrics[0].split(",")
    col = header.index("train/loss_epoch")
    epoch_losses = [float(r.split(",")[col]) for r in metrics[1:] if r.split(",")[col]]
    assert len(epoch_losses) == 4 and epoch_losses[-1] < epoch_losses[0], epoch_losses
    seen = [[line.split() for line in (tmp_path / "ids" / f"rank{r}.txt").read_text().splitlines()] for r in (0, 1)]
    for epoch in "0123":
        ids = [{i for e, i in rank if e == epoch} for rank in seen]
        assert len(ids[0]) == len(ids[1]) == 3 and not ids[0] & ids[1], (epoch, ids)


def test_teacher_copies_only_the_vision_tower():
    module = tiny_module()
    teacher, student = module.teacher.encoder.model, module.student.model
    assert teacher.visual is not student.visual
    assert teacher.text is student.text  # text tower shared, not duplicated
    torch.testing.assert_close(teacher.visual.trunk.pos_embed, student.visual.trunk.pos_embed)
    module.student.model.visual.trunk.pos_embed.data.add_(1.0)
    assert not torch.equal(teacher.visual.trunk.pos_embed, student.visual.trunk.pos_embed)


def test_predict_gives_student_features(images):
    from spar_pl.data import DistillDataModule

    data = DistillDataModule(str(images / "train"), val_source=str(images / "val"))
    out = trainer(Path("."), enable_checkpointing=False).predict(tiny_module(), data)
    assert len(out) == 2 and out[0]["features"].shape[:2] == (1, 64)
