"""What each model folder was made from, and which chain `MODEL=auto` may use.

The chain is run -> adapter -> merged -> quantized. Each link records its source:
- `<run>/adapter/provenance.json`: the run id (the run folder's name) and the adapter's hash;
- `merged/merge.json`: its own `id`, the `run`, the adapter path and `adapter_sha256`, the base model;
- `quantized/quantize.json`: `source` (the merged folder), `source_id` (that merge's id), `run`,
  `adapter_sha256`.

`choose_auto` walks the chain from the most finished form down and takes the first one that was made
from the newest finished run (and, for the quantized model, from the merged model now on disk). A form
made from something else is skipped with a warning naming why: after a new `make train` + `make merge`,
an old `outputs/quantized` is announced, never loaded silently.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ADAPTER_PROVENANCE = "provenance.json"
MERGE_REPORT = "merge.json"
QUANTIZE_REPORT = "quantize.json"


def folder_sha256(folder: Path, skip: tuple[str, ...] = (ADAPTER_PROVENANCE,)) -> str:
    """sha256 over the names and bytes of the files in `folder` (sorted, recursive), except `skip`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in skip):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def write_adapter_provenance(adapter_dir: Path, run_id: str) -> dict[str, Any]:
    """Record in a freshly saved adapter folder which run made it, and the hash of its files."""
    from pcbvlm.io import atomic_write_json

    record = {
        "run": run_id,
        "adapter_sha256": folder_sha256(adapter_dir),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(adapter_dir / ADAPTER_PROVENANCE, record)
    return record


def adapter_provenance(adapter_dir: Path) -> dict[str, Any]:
    """`run` and `adapter_sha256` of an adapter folder: as recorded, else derived (the run is the parent
    folder of a run's `adapter/`; the hash is computed)."""
    recorded = read_json(adapter_dir / ADAPTER_PROVENANCE)
    # A run's output is adapter/ (LoRA, QLoRA) or model/ (train.method=full); either names its run folder.
    run = recorded.get("run") or (
        adapter_dir.parent.name if adapter_dir.name in ("adapter", "model") else None
    )
    return {"run": run, "adapter_sha256": recorded.get("adapter_sha256") or folder_sha256(adapter_dir)}


def new_model_id() -> str:
    """An id for a merged model: its time, then random hex (two merges in one second still differ)."""
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"


def merged_provenance(adapter_dir: Path) -> dict[str, Any]:
    """The fields merge.json gets: a new id, and the run and adapter hash it was made from."""
    return {"id": new_model_id(), **adapter_provenance(adapter_dir)}


def quantized_provenance(source: Path) -> dict[str, Any]:
    """The fields quantize.json gets: the merge id (and run, adapter hash) of the source folder."""
    merge = read_json(source / MERGE_REPORT)
    return {
        "source_id": merge.get("id"),
        "run": merge.get("run"),
        "adapter_sha256": merge.get("adapter_sha256"),
    }


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when it is missing or unreadable (a folder without provenance)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _merged_run(merge: dict[str, Any]) -> str | None:
    """The run of a merge.json; one written before provenance was recorded names only the adapter path."""
    if merge.get("run"):
        return merge["run"]
    adapter = merge.get("adapter")
    return Path(adapter).parent.name if adapter and Path(adapter).name == "adapter" else None


@dataclass
class Choice:
    """What `MODEL=auto` loads (`path`), the line that says so, and why better forms were skipped."""

    path: str
    kind: str  # quantized | merged | run | base
    line: str
    warnings: list[str] = field(default_factory=list)


def _short(value: str | None) -> str:
    return value[:12] if value else "unknown"


def choose_auto(outputs_dir: Path, run: Path | None, base: str) -> Choice:
    """The newest consistent chain: quantized, else merged, else the run `run` (the newest finished
    one), else the base model. A form is consistent when it was made from `run` (same run id and, when
    recorded, the same adapter hash) and a quantized model from the merged model now in `outputs_dir`."""
    warnings: list[str] = []
    run_id = run.name if run is not None else None
    run_output = (
        None if run is None else next((run / n for n in ("adapter", "model") if (run / n).is_dir()), None)
    )
    run_hash = adapter_provenance(run_output)["adapter_sha256"] if run_output is not None else None

    def from_other_run(folder: Path, made_run: str | None, made_hash: str | None) -> str | None:
        """Why `folder` does not belong to the newest run, or None when it does (or no run exists)."""
        if run_id is None:
            return None
        if made_run != run_id:
            return f"{folder} was made from run {made_run or 'unknown (no provenance recorded)'}, not the newest finished run {run_id}"
        if made_hash and made_hash != run_hash:
            return f"{folder} was made from an earlier adapter of run {run_id} (adapter {_short(made_hash)}, now {_short(run_hash)})"
        return None

    merged_dir, quantized_dir = outputs_dir / "merged", outputs_dir / "quantized"
    merged = read_json(merged_dir / MERGE_REPORT) if (merged_dir / "config.json").is_file() else None
    quantized = (
        read_json(quantized_dir / QUANTIZE_REPORT) if (quantized_dir / "config.json").is_file() else None
    )

    merged_ok = False
    if merged is not None:
        why = from_other_run(merged_dir, _merged_run(merged), merged.get("adapter_sha256"))
        merged_ok = why is None
        if why:
            warnings.append(f"{why}: not used (run `make merge`)")

    if quantized is not None:
        if merged is not None:
            if not quantized.get("source_id") or quantized.get("source_id") != merged.get("id"):
                made = quantized.get("source_id") or "unknown (no provenance in quantize.json)"
                why = f"{quantized_dir} was made from merged {made}, not from the current {merged_dir} ({merged.get('id') or 'no id'})"
            elif not merged_ok:
                why = f"{quantized_dir} was made from the stale {merged_dir}"
            else:
                why = None
        else:
            why = from_other_run(quantized_dir, quantized.get("run"), quantized.get("adapter_sha256"))
        if why is None:
            return Choice(
                str(quantized_dir),
                "quantized",
                f"model: {quantized_dir} (from merged {quantized.get('source_id') or 'unknown'}, run {quantized.get('run') or 'unknown'})",
                warnings,
            )
        warnings.append(f"{why}: not used (run `make quantize`)")

    if merged is not None and merged_ok:
        return Choice(
            str(merged_dir),
            "merged",
            f"model: {merged_dir} (merged {merged.get('id') or 'unknown'}, from run {_merged_run(merged) or 'unknown'})",
            warnings,
        )
    if run is not None:
        return Choice(str(run), "run", f"model: {run} (run {run_id}, adapter {_short(run_hash)})", warnings)
    return Choice(base, "base", f"model: {base} (the base model: nothing trained yet)", warnings)
