"""Teacher-feature cache: one float16 safetensors file per image, keyed on what the teacher saw.

Each entry ``<dir>/<SHA-256 of the image id, 32 hex>.safetensors`` holds ``features`` ``(C, h, w)`` in float16
and, in its safetensors metadata, the manifest that produced it (backbone, model, a fingerprint of the teacher's
actual weights, crop, stride, augmentation seed and preset, teacher precision), the image id, the content hash
of the image's source bytes, the shape, and a SHA-256 of the tensor bytes. ``manifest.json`` in the folder
records the configuration. File names are hashes, so any two ids (``a/b.jpg`` and ``a_b.jpg``, non-ASCII, ids of
any length) get their own files.

An entry is used only if its manifest, image id, content hash and shape equal the current ones and, when training
reads it, its checksum matches; anything else is recomputed. An image replaced under the same name, another
seed of a randomly initialised teacher, or other weights under the same name are all noticed. Writes go to a
temporary file renamed into place; :meth:`TeacherCache.clean_temporary` removes those a killed writer left.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from spar_pl.fileio import save_safetensors, write_text

#: What every entry must match. ``reader``: the image decoding rules (:data:`spar_pl.images.READER_VERSION`); a cache
#: written under other rules (another orientation or transparency handling, say) is stale.
MANIFEST_KEYS = ("backbone", "model_name", "weights", "crop", "stride", "seed", "augmentation", "precision", "reader")
_ERRORS = (SafetensorError, OSError, ValueError, KeyError, RuntimeError, struct.error, json.JSONDecodeError)


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A SHA-256 prefix of a module's parameters and buffers (names, dtypes, shapes, values).

    What the teacher computes depends on these values, not on the names they were loaded under: a random
    initialisation under another seed, or another file under the same name, gives another fingerprint.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"sha256:{h.hexdigest()[:32]}"


class TeacherCache:
    """A folder of teacher features keyed by image id and content.

    Args:
        root: the cache folder (created).
        manifest: the configuration every entry must match (keys :data:`MANIFEST_KEYS`).
        owner: whether this process owns the folder: it removes what killed writers left (:meth:`clean_temporary`)
            and writes ``manifest.json``. Under DDP only global rank 0 is the owner, and the other ranks write no
            entry before a barrier; two owners at once would remove each other's temporary files.
    """

    def __init__(self, root: str | Path, manifest: dict, owner: bool = True) -> None:
        self.root = Path(root)
        self.manifest = {k: str(manifest[k]) for k in MANIFEST_KEYS}
        self.rejected = 0
        if not owner:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_temporary()
        text = json.dumps(self.manifest, indent=2)
        manifest_file = self.root / "manifest.json"
        if not manifest_file.is_file() or manifest_file.read_text(encoding="utf-8") != text:
            write_text(manifest_file, text)

    def clean_temporary(self) -> int:
        """Remove temporary files a killed writer left behind; returns how many. The owner calls it on opening,
        before any writer starts (under DDP, global rank 0 before a barrier)."""
        stale = list(self.root.glob(".*.safetensors.*.tmp")) + list(self.root.glob(".manifest.json.*.tmp"))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def path(self, image_id: str) -> Path:
        """The entry file of an image id: a hash, so that distinct ids never share a file."""
        return self.root / f"{hashlib.sha256(image_id.encode('utf-8')).hexdigest()[:32]}.safetensors"

    def _expected(self, image_id: str, content: str) -> dict:
        return {**self.manifest, "image_id": image_id, "content": content}

    def is_valid(self, image_id: str, content: str, shape: tuple[int, int] | None = None) -> bool:
        """Whether an entry exists for this image, content and configuration, reading only its header.

        The file's size must match its header (a truncated file fails); the tensor checksum is verified when
        training reads the entry (:meth:`load`). This keeps a resumed ``spar-cli cache`` from reading every
        valid entry's tensor just to skip it.
        """
        path = self.path(image_id)
        if not path.is_file():
            return False
        try:
            with path.open("rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(header_len))
            size = path.stat().st_size
        except _ERRORS:
            self.rejected += 1
            return False
        meta = header.get("__metadata__") or {}
        info = header.get("features") or {}
        ok = (
            all(meta.get(k) == v for k, v in self._expected(image_id, content).items())
            and "sha256" in meta
            and info.get("dtype") == "F16"
            and len(info.get("shape", ())) == 3
            and (shape is None or tuple(info["shape"][1:]) == tuple(shape))
            and size == 8 + header_len + info.get("data_offsets", [0, -1])[1]
        )
        if not ok:
            self.rejected += 1
        return ok

    def load(self, image_id: str, content: str, shape: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Features ``(C, h, w)`` (float32) of an image, or ``None`` if absent, corrupt or stale."""
        path = self.path(image_id)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                feats = fh.get_tensor("features")
        except _ERRORS:
            self.rejected += 1
            return None
        stale = any(meta.get(k) != v for k, v in self._expected(image_id, content).items())
        if stale or meta.get("sha256") != _digest(feats) or (shape is not None and tuple(feats.shape[1:]) != shape):
            self.rejected += 1
            return None
        return feats.float()

    def save(self, image_id: str, content: str, features: torch.Tensor) -> Path:
        """Write one entry atomically (temporary file, then rename)."""
        feats = features.detach().to("cpu", torch.float16).contiguous()
        meta = {**self._expected(image_id, content), "shape": "x".join(map(str, feats.shape))}
        meta["sha256"] = _digest(feats)
        return save_safetensors({"features": feats}, self.path(image_id), meta)
