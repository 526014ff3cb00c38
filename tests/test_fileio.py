"""Atomic files (spar_pl.fileio): all or nothing, safetensors written whole or in pieces."""

import pytest
import torch
from safetensors.torch import load_file

from spar_pl.fileio import atomic_dir, atomic_path, file_sha256, safetensors_writer, save_safetensors, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text(tmp_path / "sub" / "a.txt", "first")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("midway")
    assert path.read_text() == "first" and [p.name for p in path.parent.iterdir()] == ["a.txt"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_pieces_make_the_same_file_as_one_write(tmp_path, dtype):
    tensor = torch.randn(5, 3, 4).to(dtype)
    whole = save_safetensors({"x": tensor}, tmp_path / "whole.safetensors", {"k": "v"})
    with safetensors_writer(tmp_path / "pieces.safetensors", "x", tuple(tensor.shape), dtype, {"k": "v"}) as write:
        for piece in tensor.split(2):
            write(piece)
    assert torch.equal(load_file(str(tmp_path / "pieces.safetensors"))["x"], load_file(str(whole))["x"])


def test_pieces_that_do_not_add_up_leave_nothing(tmp_path):
    with pytest.raises(ValueError, match="wrote 48 of 96 bytes"):
        with safetensors_writer(tmp_path / "x.safetensors", "x", (2, 3, 4), torch.float32) as write:
            write(torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="does not fit"):
        with safetensors_writer(tmp_path / "y.safetensors", "x", (2, 3, 4), torch.float32) as write:
            write(torch.zeros(1, 4, 3))
    assert not list(tmp_path.iterdir())


def test_a_folder_is_replaced_whole_or_left_as_it_was(tmp_path):
    out = tmp_path / "hub"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert [p.name for p in out.iterdir()] == ["a.txt"] and (out.stat().st_mode & 0o777) != 0o700
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_dir(out) as tmp:
            (tmp / "b.txt").write_text("half")
            raise RuntimeError("midway")
    assert [p.name for p in out.iterdir()] == ["a.txt"] and [p.name for p in tmp_path.iterdir()] == ["hub"]
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("second")
    assert [p.name for p in out.iterdir()] == ["b.txt"] and [p.name for p in tmp_path.iterdir()] == ["hub"]


def test_file_sha256_is_the_digest_and_follows_a_change(tmp_path):
    import hashlib

    path = write_text(tmp_path / "w.bin", "one")
    assert file_sha256(path) == hashlib.sha256(b"one").hexdigest()
    write_text(path, "two, longer")
    assert file_sha256(path) == hashlib.sha256(b"two, longer").hexdigest()
