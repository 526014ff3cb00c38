"""SPAR students on the Hugging Face Hub: an exported folder, loading it back by id, publishing it.

:func:`export_hub_dir` turns a SPAR checkpoint (a ``spar-cli fit`` checkpoint or the authors' released ``.ckpt``)
into a folder a Hub model repository can hold:

* ``open_clip_config.json`` (``model_cfg`` and ``preprocess_cfg``) and ``open_clip_model.safetensors``: open_clip's
  own Hub layout, so ``open_clip.create_model("hf-hub:ORG/NAME")`` loads the student as a plain open_clip model;
  tokenizer files beside them when the model's tokenizer is a Hugging Face one (as open_clip's own export writes);
* ``spar_pl_config.json`` (:data:`SPAR_CONFIG`): what spar-pl needs for the dense semantics (backbone and family,
  dense recipe, normalisation, patch) and what the checkpoint records of its training (the teacher's crop and
  stride, the recipe, the data);
* ``README.md``: a model card with the Hub's YAML metadata and, from results files, the mIoU table.

:func:`hub_encoder` loads such a folder by ``hf-hub:ORG/NAME`` (through ``huggingface_hub``: online, or from its
local cache with ``HF_HUB_OFFLINE=1``) or ``local-dir:PATH``; :func:`~spar_pl.encoders.build_encoder` hands it
those ids. An id without a spar-pl config is an ordinary open_clip model and is left to open_clip.
:func:`push_hub_dir` uploads a folder with ``huggingface_hub``'s ``HfApi``. :func:`export` (``spar-cli export``)
writes a checkpoint's weights file, its folder, or both, and uploads the folder.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

__all__ = [
    "HUB_SCHEMES",
    "OPEN_CLIP_CONFIG",
    "OPEN_CLIP_WEIGHTS",
    "SPAR_CONFIG",
    "export",
    "export_hub_dir",
    "hub_encoder",
    "hub_token",
    "check_out_dir",
    "check_repo_id",
    "push_hub_dir",
    "read_spar_config",
    "resolve_model_id",
]

#: Model ids naming an exported folder: on the Hub, or on this machine.
HUB_SCHEMES = ("hf-hub:", "local-dir:")
#: open_clip's Hub file names (``open_clip.constants``).
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
#: spar-pl's own file in an exported folder.
SPAR_CONFIG = "spar_pl_config.json"
SPAR_FORMAT = "spar-pl/hub/v1"
#: Files :func:`resolve_model_id` fetches from a Hub repository holding a spar-pl config.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "README.md"]


# -- reading a checkpoint's record ------------------------------------------------------------------------------------


def _plain(value: object) -> object:
    """A JSON-able copy of a value read from a checkpoint (placeholders of unknown classes become their name)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 16 else f"tensor{tuple(value.shape)}"
    if isinstance(value, Path):
        return str(value)
    return type(value).__name__


def read_checkpoint_record(path: str | Path) -> dict:
    """What a Lightning checkpoint records besides its weights, read as safely as the weights are.

    Returns a dict with ``hyper_parameters`` and ``datamodule_hyper_parameters`` (``{}`` when absent),
    ``epoch`` and ``global_step`` (``None`` when absent); a safetensors file records none of them.

    Raises:
        FileNotFoundError: no such file.
        spar_pl.weights.CheckpointError: not a checkpoint, or unsafe.
    """
    from spar_pl.weights import read_checkpoint

    obj = read_checkpoint(path)
    obj = obj if isinstance(obj, dict) else {}
    record = {}
    for key in ("hyper_parameters", "datamodule_hyper_parameters"):
        value = obj.get(key)
        record[key] = _plain(value) if isinstance(value, dict) else {}
    for key in ("epoch", "global_step"):
        value = obj.get(key)
        record[key] = value if isinstance(value, int) else None
    return record


# -- export -----------------------------------------------------------------------------------------------------------


def check_out_dir(out_dir: str | Path, force: bool = False, inputs: Sequence[str | Path] = ()) -> Path:
    """The output folder of an export, refused when it exists and is not an empty folder (unless ``force``), and
    always when it holds the current folder or one of the export's ``inputs`` (``force`` would delete them).

    Raises:
        ValueError: ``out_dir`` is a file, a folder with files and ``force`` is off, the current folder or one above
            it, or a folder holding an input file.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--hub-dir {out} is a file, not a folder")
    if not out.is_dir():
        return out
    resolved = out.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise ValueError(f"--hub-dir {out} holds the current folder; write the export to a folder of its own")
    for path in inputs:
        if resolved in Path(path).resolve().parents:
            raise ValueError(f"--hub-dir {out} holds {path}, an input of the export; write it to another folder")
    if any(out.iterdir()) and not force:
        raise ValueError(f"--hub-dir {out} exists and is not empty; pass --force to replace it")
    return out


def _base_model_id(model_name: str, pretrained: str | None) -> str | None:
    """The Hub id of the base model (``base_model`` of the card), where open_clip knows one."""
    import open_clip

    if model_name.startswith("hf-hub:"):
        return model_name[len("hf-hub:") :]
    if pretrained:
        cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
        hub = str(cfg.get("hf_hub") or "").strip("/")
        return hub or None
    return None


def _hub_dataset(source: object) -> str | None:
    """A training source that is a Hub dataset id (``org/name``, not a local path or shard pattern), else ``None``."""
    if not isinstance(source, str) or source.endswith((".parquet", ".tar")) or Path(source).exists():
        return None
    return source if re.fullmatch(r"[\w.-]+/[\w.-]+", source) else None


def _choose_backbone(state_keys, hp: dict, backbone: str | None, path: Path) -> str | None:
    """The checkpoint's backbone: given, recorded in its hyperparameters, or read from its keys; ``None`` when the
    recorded model name alone decides (the family follows from the built model)."""
    from spar_pl.families import BACKBONES, backbone_family
    from spar_pl.weights import describe_keys

    recorded = hp.get("backbone")
    if backbone is not None and recorded is not None and backbone != recorded:
        raise ValueError(f"--backbone {backbone} contradicts checkpoint {path}, which was trained as {recorded!r}")
    backbone = backbone or recorded
    if backbone is None and not hp.get("model_name"):
        family, looks = describe_keys(state_keys)
        if family is None or family == "clip":  # MaskCLIP checkpoints exist with two normalisations: no guessing
            choices = ", ".join(k for k, v in BACKBONES.items() if backbone_family(k).build is None)
            raise ValueError(f"checkpoint {path} records no backbone ({looks}); pass --backbone ({choices})")
        backbone = next((k for k, v in BACKBONES.items() if v["family"] == family), family)
    if backbone is not None and backbone_family(backbone).build is not None:
        raise ValueError(
            f"--hub-dir writes open_clip models; a {backbone} student is not one: export its weights with "
            "spar-cli export CKPT OUT.safetensors"
        )
    return backbone


def results_table(paths: Sequence[str | Path]) -> str:
    """The mIoU tables (markdown) of results files written by ``spar-cli test`` / ``spar-cli table``.

    Raises:
        FileNotFoundError: a results file does not exist.
        ValueError: a results file is not a list of result entries.
    """
    from spar_pl.table import render_table

    parts = []
    for path in paths:
        text = render_table(Path(path))  # the paper's rows: the base model (single pass, sliding window) and SPAR
        parts.append(text.replace("## ", "### ", 1))
    return "\n".join(parts)


def model_card(spar_config: dict, repo_id: str | None, license_id: str, results: str, title: str = "") -> str:
    """The ``README.md`` of an exported folder: the Hub's YAML metadata, usage, the recipe and the results; the
    title is the repository's name, else ``title``."""
    base = spar_config["base_model"]
    meta: dict = {
        "library_name": "open_clip",
        "pipeline_tag": "image-segmentation",
        "license": license_id,
        "tags": ["spar-pl", "spar", "open-vocabulary-segmentation", "semantic-segmentation", "clip", "distillation"],
    }
    if base.get("hub_id"):
        meta["base_model"] = base["hub_id"]
    if spar_config["datasets"]:
        meta["datasets"] = list(spar_config["datasets"])
    name = repo_id or "ORG/NAME"
    teacher, training = spar_config["teacher"], spar_config["training"]
    tag = f" ({base['pretrained']})" if base.get("pretrained") else ""
    base_name = base.get("hub_id") or base["model_name"] + tag
    rows = [
        ("backbone (family)", f"{spar_config['backbone']} ({spar_config['family']})"),
        ("dense recipe", spar_config["dense"] or "the family's value path"),
        ("base model", base_name),
        ("normalisation", f"mean {spar_config['mean']}, std {spar_config['std']}"),
        ("patch / native side", f"{spar_config['patch_size']} px / {spar_config['native_size']} px"),
        ("teacher", f"sliding window, crop {teacher['crop']} px, stride {teacher['stride']} px"),
        ("trainable", str(training.get("trainable", "not recorded"))),
        ("lr, weight decay", f"{training.get('lr', '?')}, {training.get('weight_decay', '?')}"),
        ("steps (epochs)", f"{training.get('global_step', '?')} ({training.get('epoch', '?')})"),
        ("training images", str(spar_config["data"].get("train_source", "not recorded"))),
        ("exported from", f"{spar_config['source']['checkpoint']} ({spar_config['source']['layout']})"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    results_text = results or "No results files were given to the export (`spar-cli export ... --results FILE.json`)."
    header = yaml.safe_dump(meta, sort_keys=False).strip()
    return f"""---
{header}
---

# {name.split("/")[-1] if repo_id else (title or "NAME")}

A SPAR student (Single-Pass Any-Resolution ViT, arXiv 2604.02252) of **{base_name}**, distilled with
spar-pl: its single forward pass at any resolution is trained to match the sliding-window
features of its base model, for open-vocabulary semantic segmentation.

## Use

With spar-pl (the dense features and segmentation, with the semantics in `{SPAR_CONFIG}`):

```python
import spar_pl

model = spar_pl.load("hf-hub:{name}")
result = model.segment("image.jpg", ["road", "car", "person, pedestrian", "sky"])
result.overlay().save("overlay.png")
```

```bash
spar-cli segment image.jpg --model-name hf-hub:{name} --classes road car "person, pedestrian" sky --out out/
```

With open_clip alone (a plain open_clip model; dense features need spar-pl's recipe):

```python
import open_clip

model = open_clip.create_model("hf-hub:{name}")
```

## Recipe

| | |
|---|---|
{table}

## Results (mIoU %)

{results_text}
"""


def _preprocess_cfg(encoder) -> dict:
    """open_clip's ``preprocess_cfg`` of the student, with the normalisation the dense features use."""
    cfg = dict(getattr(encoder.model.visual, "preprocess_cfg", None) or {})
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    cfg["mean"], cfg["std"] = list(encoder.mean), list(encoder.std)
    return cfg


def export_hub_dir(
    checkpoint: str | Path,
    out_dir: str | Path,
    backbone: str | None = None,
    model_name: str | None = None,
    results: Sequence[str | Path] = (),
    license_id: str = "other",
    repo_id: str | None = None,
    force: bool = False,
) -> Path:
    """Write a SPAR checkpoint as a Hub model folder (module notes), atomically: a temporary folder, then a rename.

    Args:
        checkpoint: a ``spar-cli fit`` checkpoint or an authors' ``.ckpt`` (read safely, loaded strictly).
        out_dir: the folder to write; refused when it holds files, unless ``force``.
        backbone: the backbone, where the checkpoint records none (the authors' files); else it must agree.
        model_name: the base open_clip model (default: the one recorded, else the backbone's).
        results: results files (``spar-cli test`` / ``spar-cli table`` JSON) for the card's mIoU table.
        license_id: the card's ``license`` (a Hub license id; the weights inherit the base model's terms).
        repo_id: ``ORG/NAME`` shown in the card's usage (default: a placeholder).
        force: replace a folder that holds files.

    Raises:
        FileNotFoundError: the checkpoint or a results file does not exist.
        ValueError: an unreadable checkpoint, one that does not match the model, a dinov3txt student, a bad
            results file, or an output folder that holds files.
    """
    import open_clip

    from spar_pl import __version__
    from spar_pl.encoders import backbone_defaults, build_encoder
    from spar_pl.families import backbone_family
    from spar_pl.fileio import atomic_dir, file_sha256, save_safetensors, write_text
    from spar_pl.weights import LAYOUTS, read_state_dict, strip_layout

    path = Path(checkpoint)
    out = check_out_dir(out_dir, force, [path, *results])
    results_text = results_table(results)  # a bad results file fails before the model is built
    state = read_state_dict(path)
    prefix = strip_layout(state, set())[1]
    record = read_checkpoint_record(path)
    hp = record["hyper_parameters"] if prefix == "student.model." else {}
    backbone = _choose_backbone(list(state), hp, backbone, path)
    defaults = backbone_defaults(backbone, backbone_family(backbone) if backbone is not None else None)
    model_name = model_name or hp.get("model_name") or defaults.get("model_name")
    encoder = build_encoder(backbone, model_name, pretrained=None, checkpoint=path)
    backbone = encoder.backbone
    defaults = backbone_defaults(backbone, backbone_family(backbone))
    pretrained = hp.get("pretrained", "default")
    if pretrained == "default":  # the tag of the preset's or family's default model; none for another model
        pretrained = defaults["pretrained"] if model_name == defaults["model_name"] else None
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(f"open_clip has no config for model {model_name!r}; pass --model-name")
    data = {k: v for k, v in record["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    # the recipe the student was distilled with (as recorded), else the encoder's; the weights do not depend on it
    dense = hp.get("dense") or getattr(encoder, "dense", "maskclip" if encoder.family == "clip" else None)
    spar_config = {
        "format": SPAR_FORMAT,
        "spar_pl_version": __version__,
        "backbone": backbone,
        "family": encoder.family,
        "dense": dense,
        "mean": list(encoder.mean),
        "std": list(encoder.std),
        "patch_size": encoder.patch_size,
        "native_size": encoder.native_size,
        "embed_dim": encoder.embed_dim,
        "base_model": {
            "model_name": model_name,
            "pretrained": pretrained,
            "hub_id": _base_model_id(model_name, pretrained),
        },
        "teacher": {
            "crop": hp.get("crop") or encoder.default_crop,
            "stride": hp.get("stride", 24),
            "window_batch": hp.get("window_batch"),
        },
        "training": {
            **{k: hp[k] for k in ("trainable", "lr", "weight_decay") if k in hp},
            "epoch": record["epoch"],
            "global_step": record["global_step"],
        },
        "data": data,
        "datasets": [d for d in [_hub_dataset(data.get("train_source"))] if d],
        "source": {"checkpoint": path.name, "layout": LAYOUTS[prefix], "sha256": file_sha256(path)},
    }
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.model.state_dict().items()}
    with atomic_dir(out) as tmp:
        save_safetensors(weights, tmp / OPEN_CLIP_WEIGHTS, {"format": "pt"})
        config = {"model_cfg": model_cfg, "preprocess_cfg": _preprocess_cfg(encoder)}
        write_text(tmp / OPEN_CLIP_CONFIG, json.dumps(config, indent=2) + "\n")
        write_text(tmp / SPAR_CONFIG, json.dumps(spar_config, indent=2) + "\n")
        write_text(tmp / "README.md", model_card(spar_config, repo_id, license_id, results_text, out.name))
        if hasattr(encoder.tokenizer, "save_pretrained"):  # a Hugging Face tokenizer (SigLIP2): as open_clip saves it
            encoder.tokenizer.save_pretrained(str(tmp))
    return out


# -- loading by id ----------------------------------------------------------------------------------------------------


def resolve_model_id(model_name: str) -> Path | None:
    """The local folder of an exported model named ``hf-hub:ORG/NAME`` or ``local-dir:PATH``; ``None`` when the
    id names an ordinary open_clip model (no :data:`SPAR_CONFIG`).

    ``hf-hub:`` ids go through ``huggingface_hub``: downloaded into (or, with ``HF_HUB_OFFLINE=1``, read from) its
    cache. An ``hf-hub:`` repository whose spar-pl config cannot be fetched (offline and not cached, or no such
    file) is left to open_clip, which names the problem.

    Raises:
        FileNotFoundError: a ``local-dir:`` folder that does not exist.
    """
    if model_name.startswith("local-dir:"):
        folder = Path(model_name[len("local-dir:") :]).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder not found: {model_name}")
        return folder if (folder / SPAR_CONFIG).is_file() else None
    if not model_name.startswith("hf-hub:"):
        return None
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    from spar_pl.offline import cached, hub_unreachable

    repo_id = model_name[len("hf-hub:") :]
    if not cached(repo_id) and hub_unreachable() is not None:
        return None  # the build's check_hub says so in one line, without huggingface_hub's retries and warnings
    try:
        config = Path(hf_hub_download(repo_id, SPAR_CONFIG))
    except (HfHubHTTPError, EntryNotFoundError, LocalEntryNotFoundError):  # no such file or repo; offline, not cached
        return None
    folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    return folder if (folder / SPAR_CONFIG).is_file() else config.parent


def read_spar_config(folder: str | Path) -> dict:
    """The spar-pl config of an exported folder, checked.

    Raises:
        ValueError: not valid JSON, another format, an unknown backbone or dense recipe, or no mean and std.
    """
    from spar_pl.families import backbone_names
    from spar_pl.recipes import RECIPES

    path = Path(folder) / SPAR_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("format") != SPAR_FORMAT:
        raise ValueError(f"{path} is not a spar-pl model config (format {SPAR_FORMAT!r})")
    if config.get("backbone") not in backbone_names():
        raise ValueError(
            f"{path}: unknown backbone {config.get('backbone')!r}; choose one of {', '.join(backbone_names())}"
        )
    for key in ("mean", "std"):
        value = config.get(key)
        numbers = isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
        if not numbers or len(value) != 3:
            raise ValueError(f"{path}: {key} must be a list of 3 numbers, got {value!r}")
    dense = config.get("dense")
    if dense is not None and dense not in RECIPES:
        raise ValueError(f"{path}: unknown dense recipe {dense!r}; choose one of {', '.join(RECIPES)} or null")
    return config


def hub_encoder(model_name: str, device: str | torch.device = "cpu"):
    """The dense encoder of an exported folder named by ``hf-hub:ORG/NAME`` or ``local-dir:PATH``, with the
    backbone, dense recipe and normalisation of its spar-pl config and its weights loaded strictly (read by
    :func:`spar_pl.weights.read_state_dict`); ``None`` when the id names an ordinary open_clip model.

    Raises:
        FileNotFoundError: a ``local-dir:`` folder, or a file in it, that does not exist.
        ValueError: a bad spar-pl config, weights that do not match it, or a dense recipe this spar-pl lacks.
    """
    import open_clip

    from spar_pl.encoders import without_open_clip_random_notice
    from spar_pl.families import backbone_family
    from spar_pl.weights import load_state_strict, read_state_dict

    folder = resolve_model_id(model_name)
    if folder is None:
        return None
    config = read_spar_config(folder)
    backbone = config["backbone"]
    base = str((config.get("base_model") or {}).get("model_name") or "")
    if base.startswith("spar-tiny-"):  # tiny models may name a timm trunk of their own
        from spar_pl.testing import register_tiny_models

        register_tiny_models()
    weights = folder / OPEN_CLIP_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    local = f"local-dir:{folder}"
    try:
        with without_open_clip_random_notice():  # the weights are loaded strictly next
            model = open_clip.create_model(local, load_weights=False, device=device)
    except Exception as err:
        raise ValueError(f"could not build the open_clip model of {model_name} from {folder}: {err}") from err
    load_state_strict(model, read_state_dict(weights), f"weights file {weights}", model_name, backbone)
    try:
        tokenizer, tokenizer_error = open_clip.get_tokenizer(local), None
    except Exception as err:  # dense features need none; text says why it failed
        tokenizer, tokenizer_error = None, f"could not load the tokenizer of {model_name}: {err}"
    dense = config.get("dense")
    kwargs = {"dense": dense} if dense not in (None, "maskclip") else {}
    try:
        encoder = backbone_family(backbone).encoder(
            model.eval(), tokenizer=tokenizer, mean=config["mean"], std=config["std"], **kwargs
        )
    except TypeError as err:
        raise ValueError(f"{model_name}: this spar-pl has no dense recipe {dense!r} for {backbone}") from err
    encoder.tokenizer_error = tokenizer_error if encoder.tokenizer is None else None
    encoder.model_name = model_name
    encoder.backbone = backbone
    encoder.spar_config = config  # marks a distilled student (evaluation rows say "SPAR")
    return encoder.to(device)


# -- publishing -------------------------------------------------------------------------------------------------------


def hub_token() -> str:
    """The Hugging Face token from the usual places (``HF_TOKEN``, ``hf auth login``'s file), via ``huggingface_hub``.

    Raises:
        ValueError: no token is set.
    """
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ValueError("no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again")
    return token


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a Hub repository id ``ORG/NAME``; else ``ValueError`` naming it."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo_id):
        raise ValueError(f"--push-to-hub {repo_id!r} is not a Hub repository id ORG/NAME")
    return repo_id


def push_hub_dir(folder: str | Path, repo_id: str, token: str, private: bool = False) -> str:
    """Upload an exported folder to the Hub model repository ``repo_id`` (created if needed) with ``HfApi``'s
    ``create_repo`` and ``upload_folder``; returns the repository's URL."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message="Add SPAR student")
    return str(url)


# -- spar-cli export --------------------------------------------------------------------------------------------------


def export(
    checkpoint: str,
    out: str | None = None,
    hub_dir: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    backbone: str | None = None,
    model_name: str | None = None,
    results: list[str] | None = None,
    license: str = "other",
    force: bool = False,
) -> Path:
    """A distilled student out of a SPAR checkpoint (a ``spar-cli fit`` checkpoint's student, an authors' ``.ckpt``,
    ...), read safely, never unpickled: its open_clip weights as one safetensors file (``out``), and/or a Hugging Face
    Hub model folder (open_clip's Hub files, a spar-pl config and a model card; :func:`export_hub_dir`) written to
    ``hub_dir`` and/or uploaded with ``huggingface_hub`` (``push_to_hub``).

    Every check comes before any work (the repository id and token, the Hub folder and its parent), and a failed
    export writes nothing: with both ``out`` and a Hub target, the weights file is written after the folder.

    Args:
        checkpoint: a SPAR checkpoint (``.ckpt`` of ``spar-cli fit`` or of the authors).
        out: output ``.safetensors`` file, for ``build_encoder(weights=...)``.
        hub_dir: write a Hub model folder here (refused if it holds files).
        push_to_hub: upload the Hub folder to this repository, ``ORG/NAME`` (token: ``HF_TOKEN`` or
            ``hf auth login``).
        private: create the Hub repository private.
        backbone: the backbone, for checkpoints recording none (the authors'); Hub targets only.
        model_name: base open_clip model (default: the checkpoint's); Hub targets only.
        results: ``spar-cli test`` / ``spar-cli table`` results files (JSON) for the model card; Hub targets only.
        license: the model card's license id.
        force: replace a ``hub_dir`` that holds files.

    Returns:
        the weights file when only ``out`` is given, else the Hub folder (``hub_dir``), else the repository id.

    Raises:
        ValueError: no output named, a Hub option without a Hub target, a bad repository id, no token, a Hub folder
            that holds files, or a checkpoint that does not match its model.
        FileNotFoundError: the checkpoint or a results file does not exist.
        SystemExit: a model that needs the network, a failed upload, a full disk (its one line).
    """
    from spar_pl.families import backbone_family
    from spar_pl.runner import check_writable
    from spar_pl.weights import export_weights

    results = list(results or [])
    to_hub = hub_dir is not None or push_to_hub is not None
    if out is None and not to_hub:
        raise ValueError("give OUT (a .safetensors file), --hub-dir DIR and/or --push-to-hub ORG/NAME")
    hub_only = {"--backbone": backbone, "--model-name": model_name, "--results": results or None}
    hub_only.update({"--force": force or None, "--private": private or None})
    if not to_hub and any(v is not None for v in hub_only.values()):
        given = ", ".join(k for k, v in hub_only.items() if v is not None)
        raise ValueError(f"{given}: for --hub-dir / --push-to-hub only")
    if backbone is not None:
        backbone_family(backbone)  # an unknown backbone: one line naming the known ones
    token = None
    if push_to_hub is not None:  # before any work: a bad id or a missing token
        check_repo_id(push_to_hub)
        token = hub_token()
    if hub_dir is not None:
        check_out_dir(hub_dir, force, [checkpoint, *results])
        check_writable(Path(hub_dir).absolute().parent, "parent folder of --hub-dir")
    if not to_hub:
        return export_weights(checkpoint, out)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            folder = export_hub_dir(
                checkpoint,
                hub_dir or Path(scratch) / "model",
                backbone=backbone,
                model_name=model_name,
                results=results,
                license_id=license,
                repo_id=push_to_hub,
                force=force,
            )
            if hub_dir is not None:
                files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                print(f"wrote {folder}: {', '.join(files)}")
            if out is not None:  # after the Hub folder, whose checks come first: a failed export writes nothing
                export_weights(checkpoint, out)
            if push_to_hub is not None:
                url = push_hub_dir(folder, push_to_hub, token, private)
                print(f"uploaded to {url}")
    except FileNotFoundError:  # a missing checkpoint or results file: spar-cli's main names it
        raise
    except (OSError, RuntimeError) as err:  # a model that needs the network, a failed upload, a full disk
        raise SystemExit(str(err)) from err  # spar-cli's main prints it once, as "spar-cli export: error: ..."
    return Path(hub_dir) if hub_dir else Path(push_to_hub)
