"""Storage housekeeping (`make clean-cache`): Hugging Face cache entries and stale training checkpoints.

`plan_cleanup` builds the whole plan first (what is deleted, what is kept and why) without touching
anything; `execute_plan` deletes exactly the plan's entries. A dry run prints the same plan, so what a
dry run lists is what a real run removes.

What is deleted:
- cached hub repos (or single revisions, `org/name@rev`) whose id matches a glob pattern (default: the
  configured base model), through huggingface_hub's own delete strategy, so blobs that another kept
  revision still links are kept;
- checkpoints `<runs_dir>/<run>/checkpoint-N` beyond the newest `keep` complete ones of each run, and
  broken ones (a save cut short, a file that does not load: see `runs.checkpoint_problem`) where
  the run has a complete checkpoint or a final adapter.

What is never deleted unless named exactly with `delete=[path]`: a run's final adapter
(`<run>/adapter`, `<run>/final`), anything in `outputs_dir` (merged, quantized models, reports); a run
without a final adapter always keeps its newest complete checkpoint, its only result (never a newer,
broken one in its place); and a run being trained (its lock held) keeps all its checkpoints.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pcbvlm.config import Config
from pcbvlm.errors import UserError
from pcbvlm.runs import checkpoint_problem, run_lock_holder

CHECKPOINT = re.compile(r"checkpoint-(\d+)")
FINAL_NAMES = ("adapter", "final")


def hub_cache_dir(cfg: Config) -> Path:
    """The hub cache folder: paths.hf_home/hub, else $HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub (huggingface_hub's own order)."""
    if cfg.paths.hf_home is not None:
        return Path(cfg.paths.hf_home).expanduser() / "hub"
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def folder_size(path: Path) -> int:
    """Bytes of the files under `path` (symbolic links are not followed, hard-linked files count once)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total, seen = 0, set()
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


@dataclass
class Entry:
    """One line of the plan: a cached repo or revision, a checkpoint, a final model."""

    kind: Literal["hf-repo", "hf-revision", "checkpoint", "final", "output", "named"]
    label: str
    path: Path
    size: int
    action: Literal["delete", "keep"]
    reason: str


@dataclass
class CleanupPlan:
    entries: list[Entry] = field(default_factory=list)
    hf_cache_dir: Path | None = None
    hf_strategy: Any = None  # huggingface_hub DeleteCacheStrategy of the hub entries to delete
    hf_hashes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def to_delete(self) -> list[Entry]:
        return [e for e in self.entries if e.action == "delete"]

    @property
    def bytes_to_free(self) -> int:
        hf = int(self.hf_strategy.expected_freed_size) if self.hf_strategy is not None else 0
        return hf + sum(e.size for e in self.to_delete if not e.kind.startswith("hf-"))

    def deleted_paths(self) -> set[Path]:
        """Every path the plan removes (hub repo folders, snapshots, refs and blobs; checkpoint folders)."""
        paths = {e.path for e in self.to_delete if not e.kind.startswith("hf-")}
        if self.hf_strategy is not None:
            s = self.hf_strategy
            paths |= set(s.repos) | set(s.snapshots) | set(s.refs) | set(s.blobs)
        return paths


def list_checkpoints(runs_dir: Path) -> dict[str, list[tuple[int, Path]]]:
    """{run name: [(step, folder), ...] oldest first} for `<runs_dir>/<run>/checkpoint-N`."""
    runs: dict[str, list[tuple[int, Path]]] = {}
    if not runs_dir.is_dir():
        return runs
    for run in sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.is_symlink()):
        steps = []
        for child in run.iterdir():
            match = CHECKPOINT.fullmatch(child.name)
            if match and child.is_dir() and not child.is_symlink():
                steps.append((int(match.group(1)), child))
        runs[run.name] = sorted(steps)
    return runs


def _split_pattern(pattern: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); the revision is a commit-hash prefix or a ref name."""
    repo, sep, rev = pattern.rpartition("@")
    return (repo, rev) if sep and repo else (pattern, None)


def _scan_hf(cache_dir: Path, plan: CleanupPlan) -> Any:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    if not cache_dir.is_dir():
        plan.notes.append(f"no Hugging Face cache at {cache_dir}")
        return None
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        plan.notes.append(f"no Hugging Face cache at {cache_dir}")
        return None
    for warning in info.warnings:
        plan.notes.append(f"HF cache: {str(warning).splitlines()[0]}")
    return info


def _resolve_named(path: str, cfg: Config) -> Path:
    """A `--delete` path, accepted only when it names one entry exactly: outputs_dir/<name>,
    runs_dir/<run>, or runs_dir/<run>/<adapter|final|checkpoint-N>."""
    target = Path(path).expanduser().absolute()
    outputs = Path(cfg.paths.outputs_dir).expanduser().absolute()
    runs = Path(cfg.paths.runs_dir).expanduser().absolute()
    if not target.exists():
        raise UserError(f"--delete {path}: no such file or folder")
    ok = target.parent == outputs or target.parent == runs
    ok = ok or (
        target.parent.parent == runs
        and (target.name in FINAL_NAMES or CHECKPOINT.fullmatch(target.name) is not None)
    )
    if not ok:
        raise UserError(
            f"--delete {path}: refusing; name exactly one entry of {cfg.paths.outputs_dir}/ or "
            f"{cfg.paths.runs_dir}/<run>/ (e.g. {cfg.paths.outputs_dir}/merged)"
        )
    return target


def plan_cleanup(
    cfg: Config,
    pattern: str | None = None,
    keep: int = 1,
    delete: list[str] | tuple[str, ...] = (),
    cache_dir: Path | None = None,
) -> CleanupPlan:
    """Build the plan; deletes nothing. `pattern` None means the configured base model id; "" means no
    hub deletions. `keep` checkpoints per run survive (the newest). `delete` names final models to
    remove as well."""
    if keep < 0:
        raise UserError(f"--keep {keep}: must be 0 or more")
    plan = CleanupPlan()
    named = {_resolve_named(p, cfg) for p in delete}

    # Hugging Face cache.
    cache_dir = cache_dir or hub_cache_dir(cfg)
    plan.hf_cache_dir = cache_dir
    if pattern is None:
        name = cfg.model.name_or_path
        hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists()
        pattern = name if hub_id and not cfg.model.build_tiny_if_missing else ""
        if not pattern:
            plan.notes.append(
                f"model.name_or_path {name!r} is a local folder: no hub entries match by default"
            )
    info = _scan_hf(cache_dir, plan)
    if info is not None:
        repo_glob, rev = _split_pattern(pattern)
        for repo in sorted(info.repos, key=lambda r: r.repo_id):
            label = f"{repo.repo_type}:{repo.repo_id}" if repo.repo_type != "model" else repo.repo_id
            matched = bool(pattern) and fnmatch.fnmatch(repo.repo_id.lower(), repo_glob.lower())
            if not matched:
                plan.entries.append(
                    Entry("hf-repo", label, repo.repo_path, repo.size_on_disk, "keep", "no match")
                )
                continue
            if rev is None:
                revisions = list(repo.revisions)
            else:
                revisions = [r for r in repo.revisions if r.commit_hash.startswith(rev) or rev in r.refs]
                if not revisions:
                    plan.notes.append(f"{repo.repo_id}: no cached revision matches @{rev}")
            if rev is None or len(revisions) == len(repo.revisions):
                plan.entries.append(
                    Entry(
                        "hf-repo", label, repo.repo_path, repo.size_on_disk, "delete", f"matches {pattern!r}"
                    )
                )
            else:
                for r in sorted(revisions, key=lambda r: r.commit_hash):
                    refs = ",".join(sorted(r.refs)) or "no ref"
                    plan.entries.append(
                        Entry(
                            "hf-revision",
                            f"{label}@{r.commit_hash[:12]} ({refs})",
                            r.snapshot_path,
                            r.size_on_disk,
                            "delete",
                            f"matches {pattern!r}",
                        )
                    )
                plan.entries.append(
                    Entry(
                        "hf-repo",
                        f"{label} (other revisions)",
                        repo.repo_path,
                        0,
                        "keep",
                        "revision not matched",
                    )
                )
            plan.hf_hashes += [r.commit_hash for r in revisions]
        if plan.hf_hashes:
            plan.hf_strategy = info.delete_revisions(*plan.hf_hashes)

    # Training runs: stale and broken checkpoints go, final adapters and what a resume needs stay.
    runs_dir = Path(cfg.paths.runs_dir)
    for run, steps in list_checkpoints(runs_dir).items():
        if (runs_dir / run).absolute() in named:
            continue  # the whole run goes, listed once below
        finals = [runs_dir / run / n for n in FINAL_NAMES if (runs_dir / run / n).is_dir()]
        keep_here = keep if finals or keep > 0 else 1
        training_pid = run_lock_holder(runs_dir / run)
        problems = {step: checkpoint_problem(folder) for step, folder in steps}
        complete = [step for step, _ in steps if problems[step] is None]
        kept_complete = complete[-keep_here:] if keep_here else []
        broken = [f"{folder.name} ({problems[step]})" for step, folder in steps if problems[step] is not None]
        if broken:
            plan.notes.append(f"{run}: broken checkpoint{'s' if len(broken) > 1 else ''} {', '.join(broken)}")
        for step, folder in steps:
            problem = problems[step]
            if folder.absolute() in named:
                action, reason = "delete", "named by --delete"
            elif training_pid is not None:
                action, reason = "keep", f"run in progress (process {training_pid or '?'})"
            elif problem is not None and (complete or finals):
                action, reason = "delete", f"broken: {problem}"
            elif problem is not None:
                action, reason = "keep", f"broken: {problem}; the run has no complete checkpoint"
            elif step in kept_complete:
                action = "keep"
                reason = (
                    f"newest {keep_here} complete"
                    if keep_here == keep
                    else "newest complete checkpoint; the run has no final adapter"
                )
            else:
                action, reason = "delete", f"older than the newest {keep} complete"
            plan.entries.append(
                Entry("checkpoint", f"{run}/{folder.name}", folder, folder_size(folder), action, reason)
            )
        for final in finals:
            action = "delete" if final.absolute() in named else "keep"
            reason = "named by --delete" if action == "delete" else "final adapter (delete only by name)"
            plan.entries.append(
                Entry("final", f"{run}/{final.name}", final, folder_size(final), action, reason)
            )

    outputs = Path(cfg.paths.outputs_dir)
    if outputs.is_dir():
        for item in sorted(outputs.iterdir()):
            action = "delete" if item.absolute() in named else "keep"
            reason = "named by --delete" if action == "delete" else "output (delete only by name)"
            plan.entries.append(Entry("output", str(item), item, folder_size(item), action, reason))

    # A named run folder (runs_dir/<run>) is listed here, once.
    listed = {e.path.absolute() for e in plan.entries if e.action == "delete"}
    for target in sorted(named - listed):
        plan.entries.append(
            Entry("named", str(target), target, folder_size(target), "delete", "named by --delete")
        )
    return plan


def _protected(plan: CleanupPlan) -> set[Path]:
    return {e.path.absolute() for e in plan.entries if e.kind in ("final", "output") and e.action == "keep"}


def execute_plan(plan: CleanupPlan) -> int:
    """Delete exactly the plan's entries; return the bytes freed."""
    protected = _protected(plan)
    freed = 0
    for entry in plan.to_delete:
        if entry.kind.startswith("hf-"):
            continue
        target = entry.path.absolute()
        # Defence in depth: a checkpoint entry must be a checkpoint folder holding no kept final model.
        if entry.kind == "checkpoint" and not CHECKPOINT.fullmatch(target.name):
            raise UserError(f"refusing to delete {target}: not a checkpoint folder")
        if any(p == target or target in p.parents for p in protected):
            raise UserError(f"refusing to delete {target}: it holds a final model")
        try:
            if target.is_symlink() or target.is_file():
                target.unlink()
            elif target.is_dir():
                shutil.rmtree(target)
        except OSError as err:
            raise UserError(f"could not delete {target}: {err.strerror or err}") from None
        freed += entry.size
    if plan.hf_strategy is not None:
        try:
            plan.hf_strategy.execute()
        except OSError as err:
            raise UserError(
                f"could not delete from the HF cache {plan.hf_cache_dir}: {err.strerror or err}"
            ) from None
        freed += int(plan.hf_strategy.expected_freed_size)
    return freed
