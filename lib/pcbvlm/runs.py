"""The run registry: run folders, their identity, checkpoints, the run lock, and finished runs.

A run folder `<runs_dir>/<YYYYmmdd-HHMMSS>-<identity>/` is finished when it holds `adapter/` (LoRA, QLoRA)
or `model/` (train.method=full); while it trains it holds `checkpoint-N/` folders and `run.lock`. The
training stage (`pcbvlm.training`) writes them; merge, generate, eval, infer and clean-cache find and
check them here, so that no stage imports another stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pcbvlm.config import Config
from pcbvlm.errors import UserError
from pcbvlm.io import atomic_write_json

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"  # the output of a full-parameter run
CHECKPOINT_PREFIX = "checkpoint-"
# Files a Trainer checkpoint must hold to be resumable: these, and the weights (WEIGHT_FILES: the adapter
# of a peft model, or the whole model of a full-parameter run, in one file or sharded).
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
# Written last, by the main process, after the Trainer has saved everything (CheckpointMarkerCallback):
# a checkpoint folder without it was cut short (kill -9 or a crash mid-save).
COMPLETE_MARKER = "checkpoint.json"
# Held (flock) by the process that trains a run; the file holds its PID.
LOCK_FILE = "run.lock"
# Settings that change how a run is watched or stored, not what it computes: not part of its identity.
OPERATIONAL_TRAIN_KEYS = {
    "disk_reserve_gb",
    "num_workers",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "accelerate_profile",
}


# ------------------------------------------------------------------------------------------------------
# Runs and checkpoints


def dataset_hash(data_dir: Path) -> str:
    digest = hashlib.sha256()
    for split in ("train", "val"):
        path = data_dir / f"{split}.jsonl"
        if path.is_file():
            digest.update(split.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run_identity(cfg: Config, data_hash: str) -> str:
    train = {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in OPERATIONAL_TRAIN_KEYS}
    blob = {
        "model": cfg.model.model_dump(mode="json"),
        "data": cfg.data.model_dump(mode="json"),
        "lora": cfg.lora.model_dump(mode="json"),
        "train": train,
        "dataset": data_hash,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:10]


def _unreadable_file(path: Path) -> str | None:
    """Why `path` cannot be loaded, or None. Cheap: reads headers and zip directories, never the tensors."""
    import zipfile

    try:
        if path.suffix == ".safetensors":
            with path.open("rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                if size > path.stat().st_size:
                    return "unreadable (bad header)"
                header = json.loads(fh.read(size))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if path.stat().st_size < 8 + size + end:
                return "truncated"
        elif path.suffix in (".pt", ".pth", ".bin"):
            # torch.save writes a zip archive; a cut file has no central directory at its end.
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        return f"unreadable ({type(err).__name__})"
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder `path` cannot be resumed from, or None when it can: its completion marker
    must be there, every file it lists must have the recorded size, and the files must open."""
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} (the save did not finish)"
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        files = dict(record["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{COMPLETE_MARKER} unreadable"
    required = set(CHECKPOINT_FILES)
    if any(name.startswith("global_step") for name in files):
        required -= {"optimizer.pt", "scheduler.pt"}  # DeepSpeed keeps them in global_stepN/
    missing = sorted(required - set(files))
    if missing:
        return f"lacks {', '.join(missing)}"
    if not any(name in files for name in WEIGHT_FILES):
        return f"lacks the weights ({' or '.join(WEIGHT_FILES)})"
    for name, size in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{name} missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} when saved"
        problem = _unreadable_file(file)
        if problem:
            return f"{name} {problem}"
    return None


def is_complete_checkpoint(path: Path) -> bool:
    return path.is_dir() and checkpoint_problem(path) is None


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def list_checkpoint_folders(run_dir: Path) -> list[Path]:
    """`checkpoint-N` folders of a run, oldest first."""
    if not run_dir.is_dir():
        return []
    folders = [
        p
        for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(folders, key=checkpoint_step)


def newest_complete_checkpoint(run_dir: Path, warn: bool = True) -> Path | None:
    """The newest checkpoint that can be resumed from. Newer ones that cannot (a kill mid-save, a truncated
    file) are skipped with one warning naming each and why."""
    skipped = []
    for folder in reversed(list_checkpoint_folders(run_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            break
        skipped.append(f"{folder.name} ({problem})")
    else:
        folder = None
    if skipped and warn:
        log.warning(
            "%s: skipping broken checkpoint%s %s; using %s",
            run_dir.name,
            "s" if len(skipped) > 1 else "",
            ", ".join(skipped),
            folder.name if folder else "none",
        )
    return folder


def write_checkpoint_marker(path: Path, step: int) -> Path:
    """Record that `path` is complete: every file under it with its size (checked on resume)."""
    files = {
        str(p.relative_to(path)): p.stat().st_size
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != COMPLETE_MARKER and not p.name.startswith(".")
    }
    written = datetime.now(UTC).isoformat(timespec="seconds")
    return atomic_write_json(path / COMPLETE_MARKER, {"step": step, "written": written, "files": files})


@dataclass
class RunPlan:
    run_dir: Path
    resume_from: Path | None
    already_finished: bool = False


def plan_run(cfg: Config, identity: str, resume: str) -> RunPlan:
    runs_dir = Path(cfg.paths.runs_dir)
    if resume not in ("auto", "no"):
        target = Path(resume)
        if target.name.startswith(CHECKPOINT_PREFIX):
            problem = checkpoint_problem(target) if target.is_dir() else "no such folder"
            if problem:
                raise UserError(f"RESUME={resume}: not a complete checkpoint: {problem}")
            return RunPlan(target.parent, target)
        if not target.is_dir():
            raise UserError(f"RESUME={resume}: no such run folder or checkpoint")
        checkpoint = newest_complete_checkpoint(target)
        if checkpoint is None:
            raise UserError(f"RESUME={resume}: the run has no complete checkpoint to resume from")
        return RunPlan(target, checkpoint)
    if resume == "auto":
        runs = list_runs(runs_dir, identity)
        if runs:
            newest = runs[-1]
            if is_finished(newest):
                return RunPlan(newest, None, already_finished=True)
            checkpoint = newest_complete_checkpoint(newest)
            if checkpoint is not None:
                return RunPlan(newest, checkpoint)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return RunPlan(runs_dir / f"{stamp}-{identity}", None)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class RunLock:
    """An exclusive lock on a run folder for the process that trains it (flock on `<run>/run.lock`, which
    holds its PID). The kernel drops a flock when its process dies, so a lock left by a killed run is free;
    its PID file is taken over with a warning."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self._fh = None

    def acquire(self) -> RunLock:
        import fcntl

        self.run_dir.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            pid = _read_pid(self.path)
            holder = f"process {pid}" if pid else "another process"
            raise UserError(
                f"run {self.run_dir.name} is being trained by {holder} (lock {self.path}); "
                "wait for it, stop it, or start a new run with RESUME=no"
            ) from None
        previous = _read_pid(self.path)
        if previous and previous != os.getpid():
            state = "no longer running" if not _pid_alive(previous) else "lock released"
            log.warning(
                "%s: taking over the lock left by process %d (%s)", self.run_dir.name, previous, state
            )
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            # Emptied, not removed: removing would let a waiter lock the old file while a third locks a new one.
            with contextlib.suppress(OSError):
                self._fh.seek(0)
                self._fh.truncate()
            self._fh.close()  # closing drops the flock
            self._fh = None


def run_lock_holder(run_dir: Path) -> int | None:
    """The PID training `run_dir` now, or None when nobody holds its lock (0 when the PID is unknown)."""
    import fcntl

    path = run_dir / LOCK_FILE
    if not path.is_file():
        return None
    with path.open("r") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(path) or 0
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


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
