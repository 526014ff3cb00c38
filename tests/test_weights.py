"""Weight files: the authors' released layout, safe reading (no code from a file ever runs), clear errors."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

import spar_pl
from spar_pl.cli import main
from spar_pl.encoders import build_encoder
from spar_pl.scenes import scene_image
from spar_pl.weights import CheckpointError, load_checkpoint, read_state_dict

TINY = {"siglip2": "spar-tiny-sl2", "maskclip": "spar-tiny-clip"}


class OpenCLIPWrapper(nn.Module):
    """The authors' model wrapper: the open_clip model is its ``model`` child."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


class Segmentor(nn.Module):
    """The authors' mmseg segmentor: the wrapper is its ``net`` child (mean/std are non-persistent buffers)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.net = OpenCLIPWrapper(model)
        self.register_buffer("mean", torch.full((3, 1, 1), 127.5), persistent=False)


class AuthorsModule(L.LightningModule):
    """The authors' LightningSegmentor: ``segmentor.net.model.<open_clip key>``, trained with MSE, AdamW."""

    def __init__(self, model: nn.Module, run: argparse.Namespace | None = None, out: Path | None = None) -> None:
        super().__init__()
        self.segmentor = Segmentor(model)
        # hyper-parameters that pickle objects beyond tensors (a Namespace, a Path), as Lightning files often do
        self.save_hyperparameters({"run": run, "out": out})

    def training_step(self, batch, batch_idx):
        visual = self.segmentor.net.model.visual
        return sum(p.square().mean() for p in visual.parameters() if p.requires_grad)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(range(2), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4, weight_decay=1e-4)


def authors_checkpoint(backbone: str, path: Path, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """A released-style ``.ckpt``: the authors' module tree trained one step and saved by Lightning."""
    torch.manual_seed(seed)
    model = build_encoder(backbone, TINY[backbone]).model
    module = AuthorsModule(model, argparse.Namespace(name="spar", lr=2e-5), path.parent / "run")
    trainer = L.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module)
    trainer.save_checkpoint(path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


class Payload:
    """An object whose unpickling would copy a file to a marker path (a harmless stand-in for any command)."""

    def __init__(self, source: Path, marker: Path) -> None:
        self.source, self.marker = str(source), str(marker)

    def __reduce__(self):
        return shutil.copyfile, (self.source, self.marker)


class ShellPayload(Payload):
    """The classic payload: ``os.system`` runs a shell command."""

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def load_own(path: Path) -> dict:
    """A checkpoint :func:`authors_checkpoint` wrote, read weights-only with the two classes its hyper-parameters
    pickle allowed (``argparse.Namespace`` and a path), as its writer knows them."""
    with torch.serialization.safe_globals([argparse.Namespace, type(Path())]):
        return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    return authors_checkpoint("siglip2", tmp_path_factory.mktemp("released") / "spar_siglip2.ckpt")


def test_released_layout_has_whole_model_and_lightning_entries(released):
    path, weights = released
    ckpt = load_own(path)
    assert set(ckpt["state_dict"]) == {f"segmentor.net.model.{k}" for k in weights}
    assert any(k.startswith("segmentor.net.model.text.") for k in ckpt["state_dict"])  # text tower included
    assert "segmentor.net.model.logit_bias" in ckpt["state_dict"]
    assert {"epoch", "global_step", "loops", "optimizer_states", "hyper_parameters"} <= set(ckpt)
    with pytest.raises(Exception):  # noqa: B017 - plain weights-only loading refuses it (Namespace, Path)
        torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("backbone", ["siglip2", "maskclip"])
def test_released_checkpoint_loads_strictly(tmp_path, backbone):
    path, weights = authors_checkpoint(backbone, tmp_path / f"spar_{backbone}.ckpt", seed=1)
    torch.manual_seed(99)
    encoder = build_encoder(backbone, TINY[backbone], checkpoint=path)
    for key, value in encoder.model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["plain", "safetensors", "fit_ckpt", "encoder_state"])
def test_other_layouts_load_strictly(tmp_path, siglip_encoder, layout):
    from safetensors.torch import save_file

    state = siglip_encoder.model.state_dict()
    path = tmp_path / f"{layout}.bin"
    if layout == "plain":
        torch.save(state, path)
    elif layout == "safetensors":  # recognised by its header, whatever the suffix
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif layout == "fit_ckpt":
        torch.save({"state_dict": {f"student.model.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    else:
        torch.save(siglip_encoder.state_dict(), path)
    torch.manual_seed(5)
    loaded = build_encoder("siglip2", "spar-tiny-sl2", checkpoint=path)
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), siglip_encoder(x))


def test_prefix_handling_is_exact(tmp_path, siglip_encoder):
    state = {f"segmentor.net.model.{k}": v for k, v in siglip_encoder.model.state_dict().items()}
    state["segmentor.data_preprocessor.mean"] = torch.zeros(3)  # one key outside the layout: never dropped
    torch.save({"state_dict": state}, tmp_path / "mixed.ckpt")
    with pytest.raises(CheckpointError, match="unexpected keys: segmentor.data_preprocessor.mean"):
        load_checkpoint(siglip_encoder, tmp_path / "mixed.ckpt")
    short = {f"segmentor.net.{k}": v for k, v in siglip_encoder.model.state_dict().items()}  # a prefix too short
    torch.save({"state_dict": short}, tmp_path / "short.ckpt")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(siglip_encoder, tmp_path / "short.ckpt")


def test_mismatch_names_the_backbone_the_file_looks_like(released, clip_encoder):
    path, _ = released
    with pytest.raises(CheckpointError) as err:
        build_encoder("maskclip", "spar-tiny-clip", checkpoint=path)
    message = str(err.value)
    assert "SigLIP2" in message and "visual.trunk.*" in message and "backbone 'maskclip' was given" in message
    assert message.index("SigLIP2") < message.index("missing keys")


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n" + bytes(100), os.urandom(256), b""])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "file.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="is not a checkpoint") as err:
        read_state_dict(path)
    assert "trust" not in str(err.value)


def test_an_image_as_checkpoint_or_weights_is_not_a_checkpoint(tmp_path):
    scene_image(40, 60).save(tmp_path / "photo.png")
    with pytest.raises(CheckpointError, match="not a checkpoint.*a PNG image"):
        build_encoder("siglip2", "spar-tiny-sl2", checkpoint=tmp_path / "photo.png")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        build_encoder("siglip2", "spar-tiny-sl2", weights=tmp_path / "photo.png")


def hostile_checkpoint(tmp_path: Path, released: Path, payload_cls: type) -> tuple[Path, Path]:
    """The released checkpoint with a payload object in its hyper-parameters."""
    ckpt = load_own(released)
    marker = tmp_path / "PWNED"
    ckpt["hyper_parameters"]["payload"] = payload_cls(released, marker)
    path = tmp_path / f"hostile-{payload_cls.__name__}.ckpt"
    torch.save(ckpt, path)
    return path, marker


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        if not isinstance(exc.code, int):
            print(exc.code)
    except ValueError as exc:  # LightningCLI wraps errors raised while it instantiates the model
        code = 1
        print(exc)
    out, err = capsys.readouterr()
    return code, out + err


def entry_points(path: Path, tmp_path: Path) -> dict[str, list[str]]:
    scene_image(64, 96).save(tmp_path / "scene.png")
    common = ["--backbone", "siglip2", "--model-name", "spar-tiny-sl2", "--checkpoint", str(path)]
    return {
        "segment": ["segment", str(tmp_path / "scene.png"), "--classes", "sky", "grass", *common, "--out", "seg"],
        "features": ["features", str(tmp_path / "scene.png"), *common, "--out", str(tmp_path / "feats")],
        "export": ["export", str(path), str(tmp_path / "exported.safetensors")],
        "export --hub-dir": ["export", str(path), "--hub-dir", str(tmp_path / "hub"), "--force", *common[2:4]],
    }


@pytest.mark.parametrize("payload_cls", [Payload, ShellPayload], ids=["copyfile", "os.system"])
def test_payload_never_runs_at_any_entry_point(tmp_path, released, payload_cls, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, marker = hostile_checkpoint(tmp_path, released[0], payload_cls)
    inert = payload_cls is Payload  # a global we can stub: the weights load, the payload is an inert placeholder
    for name, argv in entry_points(path, tmp_path).items():
        code, output = run_cli(argv, capsys)
        assert not marker.exists(), name
        if inert:
            assert code == 0, (name, output)
        else:
            assert code != 0 and "refusing to read" in output and "posix.system" in output, (name, output)
            assert "add_safe_globals" not in output and "weights_only=False" not in output
    try:
        spar_pl.load("siglip2", checkpoint=path, model_name="spar-tiny-sl2", device="cpu")
    except CheckpointError as err:
        assert not inert and "refusing" in str(err)
    assert not marker.exists()


@pytest.mark.slow
def test_payload_never_runs_through_spar_cli_test(tmp_path, released, capsys):
    from spar_pl.testing import write_tiny_benchmarks

    roots = write_tiny_benchmarks(tmp_path / "bench", images=1)
    root = Path(__file__).resolve().parents[1] / "configs"
    for payload_cls in (Payload, ShellPayload):
        path, marker = hostile_checkpoint(tmp_path, released[0], payload_cls)
        argv = ["test", "--config", str(root / "eval" / "voc20.yaml")]
        argv += ["--config", str(root / "backbones" / "tiny.yaml")]
        argv += ["--data.init_args.root", str(roots["voc20"]), "--model.init_args.checkpoint", str(path)]
        argv += ["--model.init_args.results_dir", str(tmp_path / "results"), "--trainer.enable_progress_bar", "false"]
        code, output = run_cli(argv, capsys)
        assert not marker.exists()
        assert (code == 0) == (payload_cls is Payload), output[-2000:]


class BuiltinPayload(Payload):
    """``exec`` through the builtins module: allowlisted as an inert placeholder, never called."""

    def __reduce__(self):
        import builtins

        return builtins.exec, (f"open({self.marker!r}, 'w').write('x')",)


def test_builtin_payload_is_inert_and_the_weights_load(tmp_path, released):
    path, marker = hostile_checkpoint(tmp_path, released[0], BuiltinPayload)
    torch.manual_seed(3)
    encoder = build_encoder("siglip2", "spar-tiny-sl2", checkpoint=path)
    assert not marker.exists()
    torch.testing.assert_close(encoder.model.visual.trunk.pos_embed, released[1]["visual.trunk.pos_embed"])


def test_damaged_files_and_odd_state_dicts(tmp_path, released):
    data = released[0].read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        read_state_dict(tmp_path / "cut.ckpt")
    torch.save({"state_dict": {1: torch.zeros(1)}}, tmp_path / "int-keys.ckpt")
    with pytest.raises(CheckpointError, match="keys are not all names"):
        read_state_dict(tmp_path / "int-keys.ckpt")


def test_a_zip_damaged_inside_a_tensor_is_refused_and_one_saved_without_crc_reads(tmp_path):
    """PyTorch reads a zip file whose tensor bytes were overwritten without complaint; its CRC-32 says so. A file
    saved with ``compute_crc32`` off (CRC 0) still reads."""
    import zipfile

    from torch.utils.serialization import config

    torch.save({"state_dict": {"w": torch.arange(4096.0)}}, tmp_path / "good.ckpt")
    with zipfile.ZipFile(tmp_path / "good.ckpt") as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size == 4096 * 4)
    data = bytearray((tmp_path / "good.ckpt").read_bytes())
    local = data[info.header_offset : info.header_offset + 30]  # the local header: its name and extra lengths
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    data[start + 100 : start + 104] = b"\xff" * 4
    (tmp_path / "bad.ckpt").write_bytes(bytes(data))
    assert torch.load(tmp_path / "bad.ckpt", weights_only=True)["state_dict"]["w"][25] != 25  # torch reads it
    with pytest.raises(CheckpointError, match=r"bad.ckpt: a damaged PyTorch \(zip\) file \(Bad CRC-32"):
        read_state_dict(tmp_path / "bad.ckpt")
    old = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        torch.save({"w": torch.ones(3)}, tmp_path / "no-crc.pt")
    finally:
        config.save.compute_crc32 = old
    assert torch.equal(read_state_dict(tmp_path / "no-crc.pt")["w"], torch.ones(3))


def test_weights_option_reads_safely_and_redirects_checkpoints(tmp_path, released, siglip_encoder):
    with pytest.raises(CheckpointError, match="the authors' SPAR Lightning checkpoint: pass it as the checkpoint"):
        build_encoder("siglip2", "spar-tiny-sl2", weights=released[0])
    state = load_own(released[0])
    state["state_dict"] = {k[len("segmentor.net.model.") :]: v for k, v in state["state_dict"].items()}
    marker = tmp_path / "PWNED"
    state["hyper_parameters"]["payload"] = Payload(released[0], marker)
    torch.save(state, tmp_path / "weights.pt")  # open_clip keys, hyper-parameters with a payload
    encoder = build_encoder("siglip2", "spar-tiny-sl2", weights=tmp_path / "weights.pt")
    assert not marker.exists()
    torch.testing.assert_close(encoder.model.visual.trunk.pos_embed, released[1]["visual.trunk.pos_embed"])
