"""Model families as plug-ins: everything the jobs need to know about a model architecture, one file each.

`FAMILIES` maps a config.json `model_type` to its `ModelFamily` (pcbvlm.families.base). Which family a
model belongs to (`family_for`), the simplest rule that also works before a download:

1. the model's config.json, where it is at hand (a local folder, or the Hugging Face cache for a hub id):
   its `model_type`;
2. otherwise the name: the one family whose `name_pattern` matches `model.name_or_path`
   (`Qwen/Qwen2.5-VL-32B-Instruct`, `models/tiny-qwen3-vl`: the tiny model is built from its name).

A model of another type is refused with one line that names its type and the known ones.

Adding a family: a new `families/<model_type>.py` with a `ModelFamily` subclass and `FAMILY = ...`, and
its line in `FAMILIES` below (README: "Adding a model family").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pcbvlm.errors import UserError
from pcbvlm.families import qwen2_5_vl, qwen3_vl
from pcbvlm.families.base import ModelFamily

FAMILIES: dict[str, ModelFamily] = {
    qwen3_vl.FAMILY.model_type: qwen3_vl.FAMILY,
    qwen2_5_vl.FAMILY.model_type: qwen2_5_vl.FAMILY,
}

__all__ = ["FAMILIES", "ModelFamily", "family_for", "family_of_model", "get_family"]


def get_family(model_type: str | None, where: str = "the model") -> ModelFamily:
    """The family registered for `model_type`; a UserError naming it and the known types otherwise."""
    family = FAMILIES.get(model_type or "")
    if family is None:
        raise UserError(
            f"{where}: model_type {model_type!r} is not a supported model family "
            f"(known: {', '.join(sorted(FAMILIES))}; see README 'Adding a model family')"
        )
    return family


def _config_at_hand(name_or_path: str | Path, revision: str | None) -> tuple[dict[str, Any], str] | None:
    """(config.json, its path) of a local folder or a hub id in the Hugging Face cache; None if neither."""
    local = Path(name_or_path) / "config.json"
    if local.is_file():
        path = local
    elif Path(name_or_path).exists():
        return None
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(str(name_or_path), "config.json", revision=revision)
        except ValueError:  # not a valid hub id (a relative path that does not exist yet)
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable model config ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a model config (a JSON object)")
    return config, str(path)


def family_for(name_or_path: str | Path, revision: str | None = None) -> ModelFamily:
    """The family of a model folder or hub id (the rule in the module docstring)."""
    found = _config_at_hand(name_or_path, revision)
    if found is not None:
        config, path = found
        return get_family(config.get("model_type"), path)
    matches = [f for f in FAMILIES.values() if f.name_pattern.search(str(name_or_path))]
    if len(matches) == 1:
        return matches[0]
    raise UserError(
        f"model.name_or_path: {name_or_path} has no config.json at hand and its name matches "
        f"{'several' if matches else 'no'} model famil{'ies' if matches else 'y'} "
        f"(known: {', '.join(sorted(FAMILIES))})"
    )


def family_of_model(model) -> ModelFamily:
    """The family of a loaded transformers model (or a peft model around one)."""
    config = getattr(model, "config", None)
    return get_family(getattr(config, "model_type", None), type(model).__name__)
