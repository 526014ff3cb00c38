"""Hugging Face Hub look-ups that fail at once when the Hub cannot be reached.

Without a network, ``huggingface_hub`` retries each download for tens of seconds and logs every retry before the
model build fails. :func:`check_hub` runs before a model's weights or config are fetched: when they are not in the
local cache and the Hub cannot be reached (``HF_HUB_OFFLINE`` is set, or no connection within a few seconds) it
raises one ``OSError`` that says how to work offline.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

#: How to work without the Hub, appended to the error.
OFFLINE_HINT = (
    "run once with network to fill the cache, or work offline with local files: --weights FILE (open_clip weights) "
    "or the shipped tiny model (--backbone maskclip --model-name spar-tiny-p8)"
)


@functools.lru_cache(maxsize=1)
def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be reached (``"HF_HUB_OFFLINE is set"``, a connection error), or ``None`` when it can (or
    when a proxy is configured: the connection then cannot be tried directly)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return None
    except OSError as err:
        return f"no connection to {url.hostname}: {err.strerror or err}"


def hub_repo(model_name: str, pretrained: str | None) -> str | None:
    """The Hub repository an open_clip model name and pretrained tag are fetched from (``None``: nothing is)."""
    if model_name.startswith("hf-hub:"):
        return model_name[len("hf-hub:") :]
    if not pretrained:
        return None
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
    return (cfg.get("hf_hub") or "").strip("/") or None


def cached(repo: str) -> bool:
    """Whether the local Hugging Face cache holds files of model repository ``repo``."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
    return folder.is_dir() and any(folder.iterdir())


def check_hub(model_name: str, pretrained: str | None) -> None:
    """Raise ``OSError`` (one line, with how to work offline) when building ``model_name`` with ``pretrained``
    needs the Hub, its files are not cached and the Hub cannot be reached."""
    repo = hub_repo(model_name, pretrained)
    if repo is None or cached(repo):
        return
    reason = hub_unreachable()
    if reason is not None:
        raise OSError(f"{repo} is needed from the Hugging Face Hub and is not cached; {reason}: {OFFLINE_HINT}")
