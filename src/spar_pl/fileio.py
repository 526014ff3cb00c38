"""Atomic file writes: every output goes to a temporary file in its folder, then is renamed into place,
so a crash or a full disk never leaves a half-written file where a complete one is expected."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it takes the place of ``path`` (an existing folder there
    is moved aside, then removed), on error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; give the permissions mkdir would
        if not path.exists():
            os.replace(tmp, path)
            return
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
        try:
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / path.name, path)
                raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone after a successful replace


_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """The SHA-256 hex digest of a file, kept per (path, size, modification time) for the life of the process."""
    file = Path(path)
    stat = file.stat()
    key = (str(file.absolute()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with file.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write tensors (moved to CPU, made contiguous) as a safetensors file, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}


@contextmanager
def safetensors_writer(
    path: str | Path, name: str, shape: tuple[int, ...], dtype: torch.dtype, metadata: dict[str, str] | None = None
) -> Iterator:
    """Write one tensor of ``shape`` to a safetensors file in pieces, atomically.

    Yields ``write(piece)``: pieces are consecutive slices along the first dimension of size above one (row-major
    order), so a tensor larger than memory can be written as it is computed. The file is complete only if the pieces add
    up to ``shape``; otherwise nothing is left behind.
    """
    import json

    import numpy as np

    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"unsupported dtype {dtype} for a streamed safetensors file")
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    header = {name: {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}}
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the header is padded to 8 bytes, as the safetensors library writes it
    written = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)

        def write(piece: torch.Tensor) -> None:
            nonlocal written
            lead = next((i for i, n in enumerate(shape) if n != 1), 0)  # pieces split this dimension
            if tuple(piece.shape[lead + 1 :]) != tuple(shape[lead + 1 :]) or piece.dtype != dtype:
                raise ValueError(f"piece {tuple(piece.shape)} {piece.dtype} does not fit {tuple(shape)} {dtype}")
            data = piece.detach().cpu().contiguous()
            fh.write(data.view(torch.uint8).numpy().tobytes() if dtype == torch.bfloat16 else data.numpy().tobytes())
            written += data.numel() * data.element_size()

        yield write
        if written != nbytes:
            raise ValueError(f"{path}: wrote {written} of {nbytes} bytes")
