"""Finished training runs, as the later stages (merge, generate, eval, infer) find them.

A run folder `<runs_dir>/<YYYYmmdd-HHMMSS>-<identity>/` is finished when it holds `adapter/` (LoRA, QLoRA)
or `model/` (train.method=full). The training job writes them (`pcbvlm.training`); this module only reads,
so that no stage has to import the training stage to find its output.
"""

from __future__ import annotations

from pathlib import Path

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"  # the output of a full-parameter run


def adapter_folder(path: Path) -> Path | None:
    """The peft adapter folder that `path` names: the folder itself, or a run folder's adapter/."""
    for folder in (path, path / ADAPTER_DIR):
        if (folder / "adapter_config.json").is_file():
            return folder
    return None


def full_model_folder(path: Path) -> Path | None:
    """The model folder of a full-parameter run that `path` names: a run folder's model/, or model/ itself."""
    for folder in (path / MODEL_DIR, path):
        if folder.name == MODEL_DIR and (folder / "config.json").is_file():
            return folder
    return None


def is_finished(run_dir: Path) -> bool:
    return (run_dir / ADAPTER_DIR / "adapter_config.json").is_file() or full_model_folder(run_dir) is not None


def list_runs(runs_dir: Path, identity: str | None = None) -> list[Path]:
    if not runs_dir.is_dir():
        return []
    runs = [
        p for p in runs_dir.iterdir() if p.is_dir() and (identity is None or p.name.endswith(f"-{identity}"))
    ]
    return sorted(runs, key=lambda p: p.name)


def newest_finished_run(runs_dir: Path) -> Path | None:
    finished = [r for r in list_runs(runs_dir) if is_finished(r)]
    return finished[-1] if finished else None
