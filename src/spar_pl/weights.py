"""Reading weight files safely and matching their key layouts to a model.

Files users download are untrusted. :func:`read_state_dict` never runs the unrestricted unpickler:

* safetensors files are read as they are (recognised by their header, whatever the suffix);
* PyTorch files (``torch.save`` zip files, and the legacy format) are read with ``weights_only=True``;
  when a file also pickles other objects (a Lightning checkpoint's hyper-parameters, a ``Namespace``, a
  ``pathlib`` path, or a payload ...), every global it names that PyTorch does not allow is replaced by an
  inert placeholder class, so the tensors load and nothing from the file is called. Globals from ``os``,
  ``sys``, ``posix`` and ``nt`` are refused by PyTorch outright: such a file is reported as unsafe, never read;
* anything else (random bytes, an image) is "not a checkpoint".

:func:`load_checkpoint` then finds the file's layout (:data:`LAYOUTS`): exactly one known prefix carried by
every key, removed, and the rest loaded strictly. Keys are never dropped by guessing; on a mismatch the
error says which backbone the file looks like before listing the keys.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "LAYOUTS",
    "CheckpointError",
    "describe_keys",
    "export_weights",
    "load_checkpoint",
    "load_state_strict",
    "read_checkpoint",
    "read_state_dict",
    "sniff_format",
    "strip_layout",
]

#: Key prefixes of known checkpoint layouts, in front of the model's own (open_clip) keys.
LAYOUTS: dict[str, str] = {
    "segmentor.net.model.": "the authors' SPAR Lightning checkpoint",
    "student.model.": "a spar-cli fit checkpoint",
    "model.": "a dense encoder's state dict",
    "": "a plain state dict of the model (a spar-cli export file, open_clip weights)",
}

_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"RIFF": "a RIFF file"}
_CONVERT = "only if you trust the file, convert it once to safetensors (README: Checkpoints and safety) and pass that"
#: Modules PyTorch's weights-only unpickler never loads from, even allowlisted: files naming them are refused.
_BLOCKED = ("os", "sys", "posix", "nt")


class CheckpointError(ValueError):
    """A weight file that cannot be used: unreadable, unsafe, not a checkpoint, or not matching the model."""


class _Inert:
    """Stands in for a class or function a checkpoint pickles: takes any arguments and state, does nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        self.args = args

    def __setstate__(self, state) -> None:
        self.state = state


def _placeholders(names: list[str]) -> list[tuple[type, str]]:
    return [(type(name.rsplit(".", 1)[-1], (_Inert,), {"__module__": "spar_pl.weights.inert"}), name) for name in names]


def sniff_format(path: Path) -> str:
    """``zip`` (torch.save), ``legacy`` (old torch.save pickle), ``safetensors``, or raise "not a checkpoint"."""
    with path.open("rb") as fh:
        head = fh.read(16)
    if zipfile.is_zipfile(path):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "legacy"
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 1 << 30:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        raise CheckpointError(f"cannot read checkpoint {path}: a damaged or truncated PyTorch (zip) file")
    what = next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)
    detail = what or ("an empty file" if not head else f"it starts with {head[:8]!r}")
    raise CheckpointError(f"{path} is not a checkpoint: neither a PyTorch nor a safetensors file ({detail})")


def _torch_load(path: Path, kind: str) -> object:
    """``torch.load(weights_only=True)``, with inert placeholders for the non-tensor globals the file pickles."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    if kind != "zip":
        raise CheckpointError(
            f"{path}: cannot be read safely: an old-format PyTorch file pickling objects besides tensors; {_CONVERT}"
        )
    try:
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as err:  # a damaged zip, a TorchScript archive
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    blocked = [n for n in names if n.split(".", 1)[0] in _BLOCKED]
    if blocked:  # PyTorch refuses these modules outright; say so in our words
        raise CheckpointError(
            f"{path}: refusing to read it: its pickle calls {', '.join(blocked)}, which runs commands; a checkpoint of "
            f"weights never needs that. {_CONVERT}"
        )
    try:  # every other global becomes an inert placeholder: stored, never called
        with torch.serialization.safe_globals(_placeholders(names)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).split("\n", 1)[0][:200]
        raise CheckpointError(f"{path}: cannot be read safely ({reason}); {_CONVERT}") from err


def _check_zip_records(path: Path) -> None:
    """Raise :class:`CheckpointError` when a record of a PyTorch zip file does not match its CRC-32: a file damaged
    inside its data, which PyTorch reads without complaint. Records saved without a CRC (stored as 0: PyTorch's
    ``compute_crc32`` off) are not checked."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    continue
                with archive.open(info) as record:  # reading to the end checks the CRC
                    while record.read(1 << 22):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: a damaged PyTorch (zip) file ({err})") from err


def read_checkpoint(path: str | Path) -> object:
    """The whole content of a weight file, read safely: a safetensors file's tensors, or what a PyTorch/Lightning
    file holds (non-tensor globals as inert placeholders).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a checkpoint, unsafe or damaged.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    kind = sniff_format(path)
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if kind == "zip":
            _check_zip_records(path)
        return _torch_load(path, kind)
    except CheckpointError:
        raise
    except Exception as err:  # damaged files raise many kinds (struct.error, EOFError, SafetensorError, ...)
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weight file: a safetensors file, or a PyTorch/Lightning file (its ``state_dict`` if present).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a checkpoint, unsafe, damaged, or holding no state dict of tensors.
    """
    obj = read_checkpoint(path)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors")
    if not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"checkpoint {path} holds a state dict whose keys are not all names")
    return dict(state)


def describe_keys(keys) -> tuple[str | None, str]:
    """``(family, description)`` of the backbone a set of keys looks like (``(None, "an unknown model")``): the
    first family of the registry (:func:`spar_pl.families.family_of_keys`) one of whose key fragments occurs."""
    from spar_pl.families import family_of_keys  # the family modules read weight files through this module

    family, description = family_of_keys(keys)
    return (family.name if family is not None else None), description


def strip_layout(state: dict[str, torch.Tensor], expected: set[str]) -> tuple[dict[str, torch.Tensor], str]:
    """Remove the known layout prefix (:data:`LAYOUTS`) that every key carries; returns ``(state, prefix)``.

    Of the prefixes every key carries, the longest whose removal gives keys of the model wins; if none does,
    the longest is removed (the strict load then reports the mismatch). A key is never dropped.
    """
    carried = [p for p in sorted(LAYOUTS, key=len, reverse=True) if all(k.startswith(p) for k in state)]
    prefix = next((p for p in carried if {k[len(p) :] for k in state} & expected), carried[0])
    return {k[len(prefix) :]: v for k, v in state.items()}, prefix


def export_weights(checkpoint: str | Path, out: str | Path) -> Path:
    """The model's open_clip weights out of a SPAR checkpoint (any layout of :data:`LAYOUTS` but a plain state dict)
    as one safetensors file, for ``build_encoder(weights=...)``; prints what it wrote and returns the file.

    Args:
        checkpoint: a SPAR checkpoint (a ``spar-cli fit`` checkpoint, an authors' ``.ckpt``, ...), read safely.
        out: the ``.safetensors`` file to write (atomically).

    Raises:
        FileNotFoundError: no such checkpoint.
        CheckpointError: not a checkpoint, or unsafe.
        ValueError: a plain state dict (no layout to remove: it is already loadable as weights).
    """
    from spar_pl.fileio import save_safetensors

    path = Path(checkpoint)
    state, prefix = strip_layout(read_state_dict(path), set())
    if not prefix:
        raise ValueError(
            f"{path} carries no known checkpoint layout ({', '.join(p for p in LAYOUTS if p)}); a plain state dict "
            "is already loadable with --weights"
        )
    weights = {k: v.contiguous() for k, v in state.items()}
    written = save_safetensors(weights, out, {"source": str(path), "format": "open_clip", "layout": prefix})
    print(f"wrote {len(weights)} tensors ({LAYOUTS[prefix]}) to {written}")
    return written


def _show(keys: list[str]) -> str:
    return (", ".join(keys[:10]) + (f" ... ({len(keys)} in all)" if len(keys) > 10 else "")) or "none"


def load_state_strict(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    model_name: str = "?",
    backbone: str | None = None,
    file_keys: Iterable[str] | None = None,
) -> None:
    """Load ``state`` (the model's names) strictly into ``model``.

    Raises:
        CheckpointError: missing or unexpected keys, or mismatched shapes; the message names ``source`` and
            ``model_name``, and says which backbone ``file_keys`` (the keys as the file holds them; default:
            ``state``'s) look like, against ``backbone``.
    """
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    lines = [f"{source} does not match model {model_name!r}"]
    family, looks = describe_keys(list(file_keys if file_keys is not None else state))
    if family is not None and backbone is not None and family != _family_name(backbone):
        lines.append(f"it looks like {looks}, while backbone {backbone!r} was given")
    else:
        lines.append(f"it looks like {looks}")
    if missing or unexpected:
        lines.append(f"missing keys: {_show(missing)}; unexpected keys: {_show(unexpected)}")
        raise CheckpointError("; ".join(lines))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shapes: e.g. a ViT-B file for a ViT-L model
        lines.append(str(err).replace("\n", " "))
        raise CheckpointError("; ".join(lines)) from err


def _family_name(backbone: str) -> str | None:
    from spar_pl.families import backbone_family

    try:
        return backbone_family(str(backbone)).name
    except ValueError:
        return None


def load_checkpoint(encoder: nn.Module, path: str | Path) -> None:
    """Load a SPAR checkpoint strictly into ``encoder.model`` (any layout of :data:`LAYOUTS`).

    ``encoder.convert_state_dict`` maps the file's names to the model's (the identity for open_clip models).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable, unsafe, or not matching; a mismatch names the backbone the file looks like.
    """
    state = read_state_dict(path)
    stripped = strip_layout(state, set(encoder.model.state_dict()))[0]
    name, backbone = getattr(encoder, "model_name", "?"), getattr(encoder, "backbone", None)
    load_state_strict(encoder.model, encoder.convert_state_dict(stripped), f"checkpoint {path}", name, backbone, state)
