"""Teacher-feature cache: one float16 safetensors file per image, validated before every use.

Each entry ``<dir>/<image id>.safetensors`` holds ``features`` ``(C, h, w)`` in float16 and, in its
safetensors metadata, the manifest that produced it (backbone, model, weights identity, crop, stride,
image id, augmentation seed and preset, teacher precision, shape) plus a SHA-256 of the tensor bytes. ``manifest.json``
in the folder records the configuration. An entry is used only if it reads back, its checksum matches
and its manifest equals the current one; anything else is recomputed. Writes go to a temporary file
renamed into place, so an interrupted run leaves no half-written entry and a re-run resumes.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from spar_pl.fileio import save_safetensors, write_text

MANIFEST_KEYS = ("backbone", "model_name", "weights", "crop", "stride", "seed", "augmentation", "precision")


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def weights_identity(model_name: str | None, pretrained: str | None, weights: str | None) -> str:
    """A string naming the teacher's weights: the file's size and SHA-256 prefix, or name and tag."""
    if weights:
        path = Path(weights)
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        return f"file:{path.name}:{path.stat().st_size}:{h.hexdigest()[:16]}"
    return f"{model_name}:{pretrained}"


class TeacherCache:
    """A folder of teacher features keyed by image id.

    Args:
        root: the cache folder (created).
        manifest: the configuration every entry must match (keys :data:`MANIFEST_KEYS`).
    """

    def __init__(self, root: str | Path, manifest: dict) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest = {k: str(manifest[k]) for k in MANIFEST_KEYS}
        self.rejected = 0
        write_text(self.root / "manifest.json", json.dumps(self.manifest, indent=2))

    def path(self, image_id: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", image_id)
        return self.root / f"{safe}.safetensors"

    def load(self, image_id: str, shape: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Features ``(C, h, w)`` (float32) of an image, or ``None`` if absent, corrupt or stale."""
        path = self.path(image_id)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                feats = fh.get_tensor("features")
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError):
            self.rejected += 1
            return None
        expected = {**self.manifest, "image_id": image_id}
        stale = any(meta.get(k) != v for k, v in expected.items())
        if stale or meta.get("sha256") != _digest(feats) or (shape is not None and tuple(feats.shape[1:]) != shape):
            self.rejected += 1
            return None
        return feats.float()

    def save(self, image_id: str, features: torch.Tensor) -> Path:
        """Write one entry atomically (temporary file, then rename)."""
        feats = features.detach().to("cpu", torch.float16).contiguous()
        meta = {**self.manifest, "image_id": image_id, "shape": "x".join(map(str, feats.shape))}
        meta["sha256"] = _digest(feats)
        return save_safetensors({"features": feats}, self.path(image_id), meta)
