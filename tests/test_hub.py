"""Hugging Face Hub folders: export (``spar-cli export --hub-dir``), loading back by ``hf-hub:`` / ``local-dir:``
offline from a cache laid out as ``huggingface_hub`` lays it out, and the upload up to ``HfApi``'s calls."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from safetensors.torch import load_file

import spar_pl
from spar_pl import hub
from spar_pl.cli import main
from spar_pl.scenes import make_scenes
from spar_pl.weights import read_state_dict
from tests.helpers import ROOT, fit_args
from tests.test_weights import authors_checkpoint

REPO = "spar-test/tiny-student"
TINY_CLIP = "spar-tiny-clip"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def fit_ckpt(tmp_path_factory, images) -> Path:
    """A real ``spar-cli fit`` checkpoint: the tiny MaskCLIP-family student after 2 distillation steps."""
    root = tmp_path_factory.mktemp("fit")
    args = ["--model.init_args.backbone", "maskclip", "--model.init_args.model_name", "spar-tiny-clip"]
    main(fit_args(images, root, *args, "--trainer.max_steps", "2", "--data.init_args.val_source", "null"))
    return next(root.rglob("last.ckpt"))


@pytest.fixture(scope="module")
def exported(fit_ckpt, tmp_path_factory) -> Path:
    """The checkpoint exported with a results file for the card."""
    tmp = tmp_path_factory.mktemp("export")
    rows = (("pretrained, single pass", 11.5), ("pretrained, sliding window s=24", 20.5), ("SPAR", 30.75))
    entries = [{"dataset": "voc21", "row": row, "mIoU": value, "seconds_per_image": 0.5} for row, value in rows]
    (tmp / "maskclip.json").write_text(json.dumps(entries))
    out = tmp / "hub"
    main(["export", str(fit_ckpt), "--hub-dir", str(out), "--results", str(tmp / "maskclip.json"), "--license", "mit"])
    return out


def student_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = read_state_dict(ckpt)
    return {k[len("student.model.") :]: v for k, v in state.items() if k.startswith("student.model.")}


def scene() -> torch.Tensor:
    return make_scenes(1, 96, 3, "hub")[0][0]


def test_export_writes_open_clip_hub_layout_spar_config_and_card(exported, fit_ckpt):
    files = sorted(p.name for p in exported.iterdir())
    assert files == ["README.md", "open_clip_config.json", "open_clip_model.safetensors", "spar_pl_config.json"]
    weights = load_file(str(exported / "open_clip_model.safetensors"))
    expected = student_weights(fit_ckpt)
    assert set(weights) == set(expected) and all(torch.equal(weights[k], expected[k]) for k in expected)
    config = json.loads((exported / "open_clip_config.json").read_text())
    tiny_cfg = json.loads((ROOT / "src/spar_pl/model_configs/spar-tiny-clip.json").read_text())
    assert config["model_cfg"] == tiny_cfg
    assert config["preprocess_cfg"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    spar = json.loads((exported / "spar_pl_config.json").read_text())
    assert (spar["backbone"], spar["family"], spar["dense"]) == ("maskclip", "clip", "maskclip")
    assert spar["patch_size"] == 16
    assert spar["teacher"] == {"crop": 64, "stride": 24, "window_batch": 32}
    assert spar["training"]["trainable"] == "blk_-1,blk_-2" and spar["training"]["global_step"] == 2
    assert spar["data"]["train_source"].endswith("train") and spar["source"]["layout"] == "a spar-cli fit checkpoint"
    card = (exported / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "open_clip" and front["pipeline_tag"] == "image-segmentation"
    assert front["license"] == "mit" and "spar-pl" in front["tags"] and "\n# hub\n" in card  # titled by the folder
    assert "| pretrained, single pass | 11.5 | - |" in card
    assert "| SPAR | 30.8 |" in card and "crop 64 px, stride 24 px" in card
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_local_dir_loads_the_student_bit_for_bit(exported, fit_ckpt):
    reference = spar_pl.load("maskclip", model_name="spar-tiny-clip", checkpoint=fit_ckpt, device="cpu")
    loaded = spar_pl.load(f"local-dir:{exported}", device="cpu")
    assert loaded.backbone == "maskclip" and loaded.encoder.mean == reference.encoder.mean
    assert torch.equal(loaded.features(scene()), reference.features(scene()))
    assert torch.equal(loaded.features(scene(), "sliding", 24, 64), reference.features(scene(), "sliding", 24, 64))
    classes = ["background", "circle", "square"]
    assert (loaded.segment(scene(), classes).mask == reference.segment(scene(), classes).mask).all()
    plain = open_clip.create_model(f"local-dir:{exported}")  # a plain open_clip model, weights and all
    expected = student_weights(fit_ckpt)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in expected.items())


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def put_in_hf_cache(folder: Path, cache: Path, repo_id: str) -> Path:
    """The folder as ``huggingface_hub`` caches a downloaded repo: blobs named by their hash (sha256 for LFS
    files, the git blob sha otherwise), snapshot files linking to them, ``refs/main`` naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        data = path.read_bytes()
        blob = hashlib.sha256(data).hexdigest() if path.suffix == ".safetensors" else git_blob_sha(data)
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return repo


def test_hf_hub_id_loads_offline_from_the_cache_bit_for_bit(exported, fit_ckpt, tmp_path):
    """A user's run: ``spar-cli features --model-name hf-hub:ORG/NAME`` and ``spar_pl.load("hf-hub:ORG/NAME")`` in a
    fresh process with ``HF_HUB_OFFLINE=1`` and the cache above; open_clip loads the same id as a plain model."""
    put_in_hf_cache(exported, tmp_path / "hf" / "hub", REPO)
    image = tmp_path / "scene.png"
    from spar_pl.images import to_pil

    to_pil(scene()).save(image)
    script = f"""
import sys, torch, open_clip, spar_pl
from spar_pl.cli import main
main(["features", {str(image)!r}, "--model-name", "hf-hub:{REPO}", "--dtype", "float32",
      "--out", {str(tmp_path / "out")!r}])
model = spar_pl.load("hf-hub:{REPO}", device="cpu")
plain = open_clip.create_model("hf-hub:{REPO}")
torch.save({{"backbone": model.backbone, "features": model.features({str(image)!r}),
             "plain": plain.state_dict()}}, {str(tmp_path / "loaded.pt")!r})
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    reference = spar_pl.load("maskclip", model_name="spar-tiny-clip", checkpoint=fit_ckpt, device="cpu")
    expected = reference.features(image)
    cli = load_file(str(tmp_path / "out" / "scene.safetensors"))["features"]
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    assert loaded["backbone"] == "maskclip"
    assert torch.equal(cli, expected) and torch.equal(loaded["features"], expected)  # bit for bit
    weights = student_weights(fit_ckpt)
    assert all(torch.equal(loaded["plain"][k], v) for k, v in weights.items())
    assert not any((tmp_path / "hf" / "hub").glob("models--*/blobs/*.incomplete"))  # nothing was downloaded


def test_hf_hub_id_without_a_cached_copy_offline_names_the_model(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="spar-test/absent is needed from the Hugging Face Hub and is not cached"):
        spar_pl.load("hf-hub:spar-test/absent", device="cpu")


def test_authors_ckpt_exports_the_same_way(tmp_path):
    path, weights = authors_checkpoint("maskclip", tmp_path / "spar_maskclip.ckpt", seed=3)
    with pytest.raises(SystemExit) as exc:  # MaskCLIP with two normalisations: the backbone must be named
        main(["export", str(path), "--hub-dir", str(tmp_path / "a")])
    assert exc.value.code == 1 and not (tmp_path / "a").exists()
    with pytest.raises(SystemExit):
        main(["export", str(path), "--hub-dir", str(tmp_path / "a"), "--backbone", "dinov3txt"])
    assert not (tmp_path / "a").exists()
    out = tmp_path / "b"
    main(["export", str(path), "--hub-dir", str(out), "--backbone", "maskclip-legacy", "--model-name", TINY_CLIP])
    stored = load_file(str(out / "open_clip_model.safetensors"))
    assert all(torch.equal(stored[k], v) for k, v in weights.items()) and set(stored) == set(weights)
    spar = json.loads((out / "spar_pl_config.json").read_text())
    assert spar["backbone"] == "maskclip-legacy" and spar["mean"] == [0.5, 0.5, 0.5]
    assert spar["source"]["layout"] == "the authors' SPAR Lightning checkpoint" and "lr" not in spar["training"]
    loaded = spar_pl.load(f"local-dir:{out}", device="cpu")
    reference = spar_pl.load("maskclip-legacy", model_name="spar-tiny-clip", checkpoint=path, device="cpu")
    assert torch.equal(loaded.features(scene()), reference.features(scene()))


def test_export_refuses_a_folder_with_files_before_work_and_force_replaces_it(fit_ckpt, tmp_path, capsys):
    out = tmp_path / "hub"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        main(["export", str(fit_ckpt), "--hub-dir", str(out)])
    assert exc.value.code == 1 and "exists and is not empty; pass --force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    main(["export", str(fit_ckpt), "--hub-dir", str(out), "--force"])
    assert (out / "open_clip_model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]  # no temporary or old folder left


def test_export_never_replaces_the_current_folder_or_one_holding_its_inputs(fit_ckpt, tmp_path, capsys, monkeypatch):
    """``--force`` replaces a folder of files, but not the folder the command runs in (or one above it), nor one
    holding the checkpoint or a results file: that would delete them."""
    inside = tmp_path / "work"
    inside.mkdir()
    ckpt = inside / "last.ckpt"
    ckpt.write_bytes(fit_ckpt.read_bytes())
    monkeypatch.chdir(inside)
    for out, message in ((".", "holds the current folder"), (str(tmp_path), "holds the current folder")):
        with pytest.raises(SystemExit) as exc:
            main(["export", str(ckpt), "--hub-dir", out, "--force"])
        assert exc.value.code == 1 and message in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["export", str(ckpt), "--hub-dir", str(inside), "--force"])
    assert exc.value.code == 1 and "an input of the export" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and [p.name for p in inside.iterdir()] == [
        "last.ckpt"
    ]


def test_a_damaged_export_folder_is_one_line_naming_the_file(exported, tmp_path, capsys):
    import shutil

    for name, damage, message in (
        ("nomean", lambda c: c.pop("mean"), "mean must be a list of 3 numbers"),
        ("recipe", lambda c: c.update(dense="bogus"), "unknown dense recipe 'bogus'"),
        ("noweights", None, "weights file not found"),
    ):
        folder = tmp_path / name
        shutil.copytree(exported, folder)
        if damage is None:
            (folder / "open_clip_model.safetensors").unlink()
        else:
            config = json.loads((folder / "spar_pl_config.json").read_text())
            damage(config)
            (folder / "spar_pl_config.json").write_text(json.dumps(config))
        argv = ["features", str(tmp_path / "absent.png"), "--model-name", f"local-dir:{folder}"]
        argv += ["--out", str(tmp_path / "o")]
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 1 and message in err and str(folder) in err and len(err.splitlines()) == 1
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--results", "absent.json"], "results file not found: absent.json"),
        (["--backbone", "siglip2"], "contradicts checkpoint"),
    ],
)
def test_export_errors_are_one_line(fit_ckpt, tmp_path, capsys, extra, message):
    for out in ([], [str(tmp_path / "student.safetensors")]):  # with OUT too: a failed export writes neither
        with pytest.raises(SystemExit) as exc:
            main(["export", str(fit_ckpt), *out, "--hub-dir", str(tmp_path / "hub"), *extra])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 1 and message in err and len(err.splitlines()) == 1
        assert sorted(tmp_path.iterdir()) == []


def test_export_needs_an_output_and_hub_options_need_a_hub_target(fit_ckpt, tmp_path, capsys):
    """``spar-cli export CKPT`` names no output; ``--backbone``, ``--model-name``, ``--results``, ``--force`` and
    ``--private`` shape a Hub folder only; an unknown backbone is named. Each is one line before any work."""
    out = str(tmp_path / "student.safetensors")
    for extra, message in (
        ([], "give OUT (a .safetensors file), --hub-dir DIR and/or --push-to-hub ORG/NAME"),
        ([out, "--results", "a.json", "b.json"], "--results: for --hub-dir / --push-to-hub only"),
        ([out, "--model-name", TINY_CLIP, "--force", "--private"], "--model-name, --force, --private: for --hub-dir"),
        ([out, "--hub-dir", str(tmp_path / "hub"), "--backbone", "nope"], "unknown backbone 'nope'; choose one of"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["export", str(fit_ckpt), *extra])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 1 and message in err and len(err.splitlines()) == 1, err
    assert sorted(tmp_path.iterdir()) == []


class RecordingApi:
    """Stands in for ``huggingface_hub.HfApi``: records the calls and what the folder held at upload time."""

    calls: list = []

    def __init__(self, token=None) -> None:
        self.calls.append(("init", token))

    def create_repo(self, repo_id, repo_type=None, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))
        return f"https://hub.example/{repo_id}"

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        card = (Path(folder_path) / "README.md").read_text()
        self.calls.append(("upload_folder", repo_id, repo_type, files, f"hf-hub:{repo_id}" in card))


def test_push_to_hub_uploads_with_hfapi(fit_ckpt, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    RecordingApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    main(["export", str(fit_ckpt), "--hub-dir", str(tmp_path / "hub"), "--push-to-hub", REPO, "--private"])
    files = ["README.md", "open_clip_config.json", "open_clip_model.safetensors", "spar_pl_config.json"]
    assert RecordingApi.calls == [
        ("init", "hf_test_token"),
        ("create_repo", REPO, "model", True, True),
        ("upload_folder", REPO, "model", files, True),
    ]
    assert f"uploaded to https://hub.example/{REPO}" in capsys.readouterr().out
    RecordingApi.calls = []
    main(["export", str(fit_ckpt), "--push-to-hub", REPO])  # no --hub-dir: a temporary folder is uploaded
    assert RecordingApi.calls[-1] == ("upload_folder", REPO, "model", files, True)


def test_push_to_hub_without_a_token_or_with_a_bad_id_stops_before_work(fit_ckpt, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(SystemExit) as exc:
        main(["export", str(fit_ckpt), "--hub-dir", str(tmp_path / "hub"), "--push-to-hub", REPO])
    assert exc.value.code == 1 and "no Hugging Face token" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(fit_ckpt), "--hub-dir", str(tmp_path / "hub"), "--push-to-hub", "not an id"])
    assert "is not a Hub repository id ORG/NAME" in capsys.readouterr().err
    assert not (tmp_path / "hub").exists()


def test_resolve_model_id_leaves_plain_open_clip_ids_alone(tmp_path):
    assert hub.resolve_model_id("ViT-B-16") is None
    (tmp_path / "plain").mkdir()
    assert hub.resolve_model_id(f"local-dir:{tmp_path / 'plain'}") is None
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        hub.resolve_model_id(f"local-dir:{tmp_path / 'absent'}")


def test_configs_load_an_exported_student_by_model_name(exported, fit_ckpt):
    """``spar-cli test --config eval/voc21.yaml --config backbones/maskclip.yaml --model.init_args.model_name
    local-dir:DIR``: the evaluation builds the student from its folder and files its numbers as SPAR."""
    from spar_pl.cli import lightning_cli

    configs = ROOT / "configs"
    argv = ["--config", str(configs / "eval/voc21.yaml"), "--config", str(configs / "backbones/maskclip.yaml")]
    cli = lightning_cli([*argv, "--model.init_args.model_name", f"local-dir:{exported}"], run=False)
    assert cli.model.encoder.backbone == "maskclip" and cli.model.row == "SPAR"
    reference = spar_pl.load("maskclip", model_name="spar-tiny-clip", checkpoint=fit_ckpt, device="cpu")
    with torch.no_grad():
        x = reference.encoder.normalize(scene()[None])
        assert torch.equal(cli.model.encoder(x), reference.encoder(x))


def test_a_backbone_that_contradicts_the_export_is_an_error(exported):
    """The export's config sets the backbone; naming another one is a mistake said in one line, not ignored."""
    with pytest.raises(ValueError, match="--backbone siglip2 contradicts local-dir:.*exported as 'maskclip'"):
        spar_pl.load("siglip2", model_name=f"local-dir:{exported}", device="cpu")
    for same in ("maskclip", "clip"):
        assert spar_pl.load(same, model_name=f"local-dir:{exported}", device="cpu").encoder.backbone == "maskclip"


def test_loading_an_export_logs_no_random_weights_notice(exported, caplog, monkeypatch):
    """open_clip builds the folder's model without weights and logs "initialized randomly"; the weights are loaded
    strictly right after, so that notice would be false (in Python too, where spar-cli's console filter is not)."""
    import logging

    monkeypatch.setattr(logging.getLogger(), "filters", [])  # spar-cli's main (the fixtures ran it) adds one
    caplog.set_level("WARNING")
    spar_pl.load(f"local-dir:{exported}", device="cpu")
    assert "No pretrained weights loaded" not in caplog.text and "random" not in caplog.text
