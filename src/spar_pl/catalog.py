"""``spar-cli models``: the models each backbone family takes, read from open_clip's configs without building any.

For every open_clip model name (``open_clip.list_models()``), the family recognising its config
(:func:`spar_pl.families.family_of_config`), its patch and pretraining size (:func:`spar_pl.families.config_geometry`),
the default teacher crop (the largest multiple of the patch within the pretraining size) and the pretrained tags
open_clip offers (``open_clip.list_pretrained()``); families building their own models (DINOv3.txt) list theirs.
"""

from __future__ import annotations

import open_clip

from spar_pl.families import config_geometry, families, family_of_config, get_family

__all__ = ["format_catalog", "model_catalog", "models"]


def _crop(patch: int | None, native: int | None) -> int | None:
    return max(patch, native // patch * patch) if patch and native else None


def model_catalog(family: str | None = None, include_untagged: bool = False) -> list[dict]:
    """One row per model a family takes: ``family``, ``model``, ``patch``, ``native``, ``crop``, ``tags``.

    Args:
        family: only this family's models.
        include_untagged: also the open_clip models without a pretrained tag (random weights only).
    """
    wanted = get_family(family).name if family is not None else None
    tags: dict[str, list[str]] = {}
    for name, tag in open_clip.list_pretrained():
        tags.setdefault(name, []).append(tag)
    rows = []
    for fam in families():
        if fam.build is None or (wanted and fam.name != wanted):
            continue
        for name in (n for n in fam.model_names if not n.startswith("spar-tiny-")):
            patch, native = fam.geometry(name) if fam.geometry else (None, None)
            rows.append({"family": fam.name, "model": name, "patch": patch, "native": native, "tags": ["local files"]})
    for name in open_clip.list_models():
        if name.startswith("spar-tiny-") or not (include_untagged or name in tags):
            continue
        fam = family_of_config(open_clip.get_model_config(name) or {})
        if fam is None or (wanted and fam.name != wanted):
            continue
        patch, native = config_geometry(open_clip.get_model_config(name))
        rows.append({"family": fam.name, "model": name, "patch": patch, "native": native, "tags": tags.get(name, [])})
    for row in rows:
        row["crop"] = _crop(row["patch"], row["native"])
    order = {f.name: i for i, f in enumerate(families())}
    return sorted(rows, key=lambda r: (order[r["family"]], r["model"].lower()))


def unsupported_models() -> list[str]:
    """open_clip models with pretrained tags that no family takes (ResNets, CoCa, ...)."""
    tagged = {name for name, _ in open_clip.list_pretrained()}
    return sorted(n for n in tagged if family_of_config(open_clip.get_model_config(n) or {}) is None)


def format_catalog(rows: list[dict]) -> str:
    """The rows as text: per family its summary and reference-parity test, then one line per model."""
    lines = []
    for fam in families():
        mine = [r for r in rows if r["family"] == fam.name]
        if not mine:
            continue
        parity = f"exact parity tested: {fam.parity}" if fam.parity else "no exact parity with a reference tested"
        lines += ["", f"{fam.name}: {fam.summary}", f"  {parity}; tiny twin {fam.tiny_model}"]
        width = max(len(r["model"]) for r in mine)
        lines.append(f"  {'model':<{width}}  patch  native  crop  pretrained tags")
        for r in mine:
            geometry = [str(r[k]) if r[k] is not None else "?" for k in ("patch", "native", "crop")]
            tags = ", ".join(r["tags"]) or "(none: random weights only)"
            lines.append(f"  {r['model']:<{width}}  {geometry[0]:>5}  {geometry[1]:>6}  {geometry[2]:>4}  {tags}")
    return "\n".join(lines[1:]) + "\n"


def models(family: str | None = None, all: bool = False) -> str:
    """The backbone families and the open_clip models and pretrained tags each takes, with patch, pretraining
    (native) size and default teacher crop, printed and returned (``spar-cli models``); offline, nothing is built.

    Args:
        family: only this family (``clip``, ``siglip``, ``dinotxt``, ``eva02``, ``pe``).
        all: also open_clip models without a pretrained tag.
    """
    if family is not None:
        get_family(family)  # an unknown family: one line naming the known ones
    text = format_catalog(model_catalog(family, all))
    others = unsupported_models()
    if family is None and others:
        text += f"\nno family takes {len(others)} tagged open_clip models (ResNets, CoCa, ...): {', '.join(others)}\n"
    print(text, end="")
    return text
