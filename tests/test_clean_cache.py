"""Storage cleanup on a fake Hugging Face cache (the real on-disk layout) and fake training runs:
a real run removes exactly what its dry run listed, and never a final model unless named."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import make_checkpoint, run_job
from pcbvlm.cache import execute_plan, folder_size, hub_cache_dir, list_checkpoints, plan_cleanup
from pcbvlm.config import load_config
from pcbvlm.errors import UserError
from pcbvlm.runs import RunLock

BASE = "Qwen/Qwen3-VL-32B-Instruct"
SHA_NEW = "a" * 40
SHA_OLD = "b" * 40
SHA_OTHER = "c" * 40


def _blob(repo: Path, name: str, size: int) -> str:
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "blobs" / name).write_bytes(os.urandom(size))
    return name


def _snapshot(repo: Path, sha: str, files: dict[str, str], ref: str | None = None) -> None:
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    for filename, blob in files.items():
        (snap / filename).symlink_to(Path("..") / ".." / "blobs" / blob)
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(sha)


def make_hub(hub: Path) -> None:
    """The base model with two revisions sharing config.json's blob, and an unrelated model."""
    base = hub / "models--Qwen--Qwen3-VL-32B-Instruct"
    config = _blob(base, "1" * 64, 100)
    new = _blob(base, "2" * 64, 5000)
    old = _blob(base, "3" * 64, 3000)
    _snapshot(base, SHA_NEW, {"config.json": config, "model.safetensors": new}, ref="main")
    _snapshot(base, SHA_OLD, {"config.json": config, "model.safetensors": old})
    other = hub / "models--other--keep"
    _snapshot(other, SHA_OTHER, {"config.json": _blob(other, "4" * 64, 200)}, ref="main")


def make_runs(runs: Path, outputs: Path) -> None:
    for run, steps, final in (
        ("run-a", (10, 20, 30), "adapter"),
        ("run-b", (5, 7), None),
        ("run-c", (100,), "final"),
    ):
        for step in steps:
            make_checkpoint(runs / run / f"checkpoint-{step}", step)
        if final:
            (runs / run / final).mkdir()
            (runs / run / final / "adapter_model.safetensors").write_bytes(b"z" * 1000)
    for name in ("merged", "quantized"):
        (outputs / name).mkdir(parents=True)
        (outputs / name / "model.safetensors").write_bytes(b"m" * 4000)


@pytest.fixture
def world(tmp_path, repo_root, clean_env):
    hf, runs, outputs = tmp_path / "hf", tmp_path / "runs", tmp_path / "outputs"
    make_hub(hf / "hub")
    make_runs(runs, outputs)
    overrides = [f"paths.hf_home={hf}", f"paths.runs_dir={runs}", f"paths.outputs_dir={outputs}"]
    cfg = load_config(repo_root / "config" / "config.yaml", overrides)
    return cfg, overrides, tmp_path


def tree(root: Path) -> set[Path]:
    """Every file, folder and link under root."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.add(Path(dirpath) / name)
    return out


def expand(paths: set[Path], before: set[Path]) -> set[Path]:
    """The paths and everything under them, as they were before the deletion."""
    return {p for p in before if any(p == q or q in p.parents for q in paths)}


def test_hub_cache_dir_follows_config_then_env(world, monkeypatch):
    cfg, _, tmp = world
    assert hub_cache_dir(cfg) == tmp / "hf" / "hub"
    bare = cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"hf_home": None})})
    monkeypatch.setenv("HF_HUB_CACHE", "/x/hub-cache")
    assert hub_cache_dir(bare) == Path("/x/hub-cache")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", "/y")
    assert hub_cache_dir(bare) == Path("/y/hub")


def test_plan_defaults_base_model_and_keep_one(world):
    cfg, _, tmp = world
    plan = plan_cleanup(cfg)
    deleted = {e.label for e in plan.to_delete}
    assert deleted == {BASE, "run-a/checkpoint-10", "run-a/checkpoint-20", "run-b/checkpoint-5"}
    kept = {e.label: e.reason for e in plan.entries if e.action == "keep"}
    assert kept["other/keep"] == "no match"
    assert {
        "run-a/checkpoint-30",
        "run-a/adapter",
        "run-b/checkpoint-7",
        "run-c/checkpoint-100",
        "run-c/final",
    } <= set(kept)
    assert "final adapter" in kept["run-a/adapter"]
    stale = ("run-a/checkpoint-10", "run-a/checkpoint-20", "run-b/checkpoint-5")
    checkpoint_bytes = sum(folder_size(tmp / "runs" / name) for name in stale)
    assert plan.bytes_to_free == 100 + 5000 + 3000 + checkpoint_bytes


def test_real_run_removes_exactly_what_the_dry_run_listed(world, capsys):
    cfg, overrides, tmp = world
    from pcbvlm.commands import clean_cache as job

    args = [a for o in overrides for a in ("--set", o)]

    before = tree(tmp)
    assert job.main(["--dry-run", *args]) == 0
    dry = capsys.readouterr().out
    assert tree(tmp) == before, "a dry run deleted something"
    assert "dry run: would free" in dry and "nothing deleted" in dry
    listed = plan_cleanup(cfg)  # the plan the dry run printed
    for entry in listed.to_delete:
        assert entry.label in dry

    assert job.main(args) == 0
    out = capsys.readouterr().out
    removed = before - tree(tmp)
    assert removed == expand(listed.deleted_paths(), before)
    assert f"freed {listed.bytes_to_free / 1024**3:.2f} GiB (4 entries)" in out
    # What must stay, stayed.
    assert (tmp / "runs" / "run-a" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp / "runs" / "run-a" / "checkpoint-30").is_dir()
    assert (tmp / "outputs" / "merged" / "model.safetensors").is_file()
    assert (tmp / "hf" / "hub" / "models--other--keep" / "snapshots" / SHA_OTHER / "config.json").is_file()
    assert not (tmp / "hf" / "hub" / "models--Qwen--Qwen3-VL-32B-Instruct").exists()


def test_keep_zero_never_deletes_final_models(world):
    cfg, _, tmp = world
    plan = plan_cleanup(cfg, pattern="", keep=0)
    assert not any(e.kind.startswith("hf-") and e.action == "delete" for e in plan.entries)
    freed = execute_plan(plan)
    assert freed == plan.bytes_to_free
    assert list_checkpoints(tmp / "runs") == {
        "run-a": [],
        "run-b": [(7, tmp / "runs" / "run-b" / "checkpoint-7")],  # no final adapter: its only result
        "run-c": [],
    }
    assert (tmp / "runs" / "run-a" / "adapter").is_dir() and (tmp / "runs" / "run-c" / "final").is_dir()
    assert (tmp / "outputs" / "merged").is_dir() and (tmp / "outputs" / "quantized").is_dir()
    assert (tmp / "hf" / "hub" / "models--Qwen--Qwen3-VL-32B-Instruct").is_dir()


def test_final_model_deleted_only_when_named_exactly(world):
    cfg, _, tmp = world
    merged = tmp / "outputs" / "merged"
    plan = plan_cleanup(cfg, pattern="", keep=1, delete=[str(merged)])
    assert [e.label for e in plan.to_delete if e.kind == "output"] == [str(merged)]
    execute_plan(plan)
    assert not merged.exists() and (tmp / "outputs" / "quantized").is_dir()
    for bad in (
        tmp / "outputs",
        tmp / "runs" / "run-a" / "adapter" / "adapter_model.safetensors",
        tmp / "hf",
    ):
        with pytest.raises(UserError, match="refusing"):
            plan_cleanup(cfg, delete=[str(bad)])
    run_c = tmp / "runs" / "run-c"
    plan = plan_cleanup(cfg, pattern="", keep=1, delete=[str(run_c)])
    # The stale checkpoints went with the plan above; the run is one entry, its final adapter inside it.
    assert [(e.kind, e.label) for e in plan.to_delete] == [("named", str(run_c))]
    execute_plan(plan)
    assert not run_c.exists() and (tmp / "runs" / "run-a" / "adapter").is_dir()
    with pytest.raises(UserError, match="no such file"):
        plan_cleanup(cfg, delete=[str(tmp / "outputs" / "nothing")])


def test_one_revision_keeps_shared_blobs(world):
    cfg, _, tmp = world
    repo = tmp / "hf" / "hub" / "models--Qwen--Qwen3-VL-32B-Instruct"
    plan = plan_cleanup(cfg, pattern=f"{BASE}@{SHA_OLD[:8]}", keep=99)
    assert [e.kind for e in plan.to_delete] == ["hf-revision"]
    assert plan.bytes_to_free == 3000  # the old weights; config.json's blob is shared with main
    execute_plan(plan)
    assert not (repo / "snapshots" / SHA_OLD).exists()
    assert (repo / "snapshots" / SHA_NEW / "config.json").read_bytes()  # the link still resolves
    assert not (repo / "blobs" / ("3" * 64)).exists()


def test_glob_pattern_and_missing_cache(world, tmp_path):
    cfg, _, _ = world
    plan = plan_cleanup(cfg, pattern="other/*", keep=99)
    assert [e.label for e in plan.to_delete] == ["other/keep"]
    empty = plan_cleanup(cfg, cache_dir=tmp_path / "no-cache", keep=99)
    assert empty.to_delete == [] and any("no Hugging Face cache" in n for n in empty.notes)
    with pytest.raises(UserError, match="--keep -1"):
        plan_cleanup(cfg, keep=-1)


def test_cli_dry_run_deletes_nothing(world):
    _, overrides, tmp = world
    before = tree(tmp)
    proc = run_job("clean-cache", "--dry-run", *[a for o in overrides for a in ("--set", o)])
    assert proc.returncode == 0, proc.stderr
    assert "dry run: would free" in proc.stdout
    assert tree(tmp) == before
    bad = run_job(
        "clean-cache", "--delete", str(tmp / "outputs"), *[a for o in overrides for a in ("--set", o)]
    )
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: --delete") and "Traceback" not in bad.stderr
    negative = run_job("clean-cache", "--keep", "-1", *[a for o in overrides for a in ("--set", o)])
    assert negative.returncode == 2 and "--keep: must be 0 or more" in negative.stderr


def test_unfinished_run_keeps_its_newest_complete_checkpoint_not_a_broken_newer_one(world):
    """A kill -9 mid-save leaves the newest folder incomplete; a truncated file breaks another. The newest
    complete checkpoint is what a resume needs: it stays, the broken ones go."""
    cfg, _, tmp = world
    run = tmp / "runs" / "run-d"
    for step in (3, 6):
        make_checkpoint(run / f"checkpoint-{step}", step)
    truncated = make_checkpoint(run / "checkpoint-9", 9)
    optimizer = truncated / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    make_checkpoint(run / "checkpoint-12", 12, complete=False)  # killed before the marker
    only_broken = make_checkpoint(tmp / "runs" / "run-e" / "checkpoint-4", 4, complete=False)

    plan = plan_cleanup(cfg, pattern="", keep=1)
    actions = {e.label: (e.action, e.reason) for e in plan.entries if e.label.startswith(("run-d", "run-e"))}
    assert actions["run-d/checkpoint-6"] == ("keep", "newest 1 complete")
    assert actions["run-d/checkpoint-3"] == ("delete", "older than the newest 1 complete")
    action, reason = actions["run-d/checkpoint-9"]
    assert action == "delete" and reason.startswith("broken: optimizer.pt has"), reason
    assert actions["run-d/checkpoint-12"] == (
        "delete",
        "broken: no checkpoint.json (the save did not finish)",
    )
    assert any(n.startswith("run-d: broken checkpoints checkpoint-9 (optimizer.pt has") for n in plan.notes)
    # A run with nothing complete keeps what it has: nothing better exists to resume from.
    assert actions["run-e/checkpoint-4"][0] == "keep"
    execute_plan(plan)
    assert [p.name for p in sorted(run.iterdir())] == ["checkpoint-6"]
    assert only_broken.is_dir()


def test_run_being_trained_keeps_all_its_checkpoints(world):
    cfg, _, tmp = world
    run = tmp / "runs" / "run-b"
    lock = RunLock(run).acquire()
    try:
        plan = plan_cleanup(cfg, pattern="", keep=0)
        entries = {e.label: e for e in plan.entries if e.label.startswith("run-b/")}
        assert {e.action for e in entries.values()} == {"keep"}
        assert entries["run-b/checkpoint-5"].reason == f"run in progress (process {os.getpid()})"
    finally:
        lock.release()
    plan = plan_cleanup(cfg, pattern="", keep=0)
    assert "run-b/checkpoint-5" in {e.label for e in plan.to_delete}
