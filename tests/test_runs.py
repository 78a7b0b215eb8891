"""The run registry and resume selection, on folders alone (no model): which run is finished, which runs
belong to a config, which checkpoint is complete, which one a resume takes and what it says about the
broken ones. `make mutation` runs these against pcbvlm.runs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import struct
import subprocess
import sys
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from conftest import ROOT, make_checkpoint
from pcbvlm.config import load_config
from pcbvlm.errors import UserError
from pcbvlm.runs import (
    COMPLETE_MARKER,
    LOCK_FILE,
    RunLock,
    _pid_alive,
    _read_pid,
    _unreadable_file,
    adapter_folder,
    checkpoint_problem,
    checkpoint_step,
    dataset_hash,
    full_model_folder,
    is_complete_checkpoint,
    is_finished,
    list_checkpoint_folders,
    list_runs,
    newest_complete_checkpoint,
    newest_finished_run,
    plan_run,
    run_identity,
    run_lock_holder,
    write_checkpoint_marker,
)

TINY = ROOT / "config" / "tiny.yaml"


def _adapter(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text("{}")
    return folder


def _full_model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    return folder


def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _marker(folder: Path, files: dict[str, int] | object) -> None:
    (folder / COMPLETE_MARKER).write_text(json.dumps({"step": 1, "files": files}))


# ------------------------------------------------------------------------------------------------------
# Finished runs (pcbvlm.runs)


def test_adapter_folder_is_the_folder_itself_or_the_runs_adapter(tmp_path):
    run = tmp_path / "20260101-000000-abc"
    assert adapter_folder(run) is None  # does not exist
    run.mkdir()
    (run / "adapter").mkdir()
    assert adapter_folder(run) is None  # adapter/ without its config: not an adapter yet
    adapter = _adapter(run / "adapter")
    assert adapter_folder(run) == adapter
    assert adapter_folder(adapter) == adapter
    # A folder that is itself an adapter wins over an adapter/ inside it.
    _adapter(run)
    assert adapter_folder(run) == run
    # adapter_config.json must be a file.
    odd = tmp_path / "odd"
    (odd / "adapter_config.json").mkdir(parents=True)
    assert adapter_folder(odd) is None


def test_full_model_folder_is_a_runs_model_folder_only(tmp_path):
    run = tmp_path / "20260101-000000-abc"
    run.mkdir()
    assert full_model_folder(run) is None
    (run / "model").mkdir()
    assert full_model_folder(run) is None  # model/ without config.json
    model = _full_model(run / "model")
    assert full_model_folder(run) == model
    assert full_model_folder(model) == model
    # A model folder not named model/ (a merged or quantized output) is not a full-training run's model.
    merged = _full_model(tmp_path / "merged")
    assert full_model_folder(merged) is None
    # config.json must be a file.
    odd = tmp_path / "odd"
    (odd / "model" / "config.json").mkdir(parents=True)
    assert full_model_folder(odd) is None


def test_a_run_is_finished_with_an_adapter_or_a_full_model_not_with_checkpoints(tmp_path):
    run = tmp_path / "20260101-000000-abc"
    make_checkpoint(run / "checkpoint-2", 2)
    assert not is_finished(run)
    (run / "adapter").mkdir()
    assert not is_finished(run)
    _adapter(run / "adapter")
    assert is_finished(run)
    full = tmp_path / "20260101-000001-abc"
    _full_model(full / "model")
    assert is_finished(full)
    assert not is_finished(tmp_path / "missing")


def test_list_runs_sorts_by_name_and_filters_by_identity(tmp_path):
    assert list_runs(tmp_path / "missing") == []
    assert list_runs(tmp_path / "missing", "abc") == []
    names = ["20260102-000000-abc", "20260101-000000-abc", "20260103-000000-xabc", "20260101-120000-def"]
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / "20260104-000000-abc").write_text("a file, not a run")
    assert [p.name for p in list_runs(tmp_path)] == sorted(names)
    assert list_runs(tmp_path, "abc") == [tmp_path / "20260101-000000-abc", tmp_path / "20260102-000000-abc"]
    assert list_runs(tmp_path, "def") == [tmp_path / "20260101-120000-def"]
    assert list_runs(tmp_path, "ghi") == []


def test_newest_finished_run_skips_newer_unfinished_runs(tmp_path):
    assert newest_finished_run(tmp_path) is None
    assert newest_finished_run(tmp_path / "missing") is None
    old = tmp_path / "20260101-000000-abc"
    _adapter(old / "adapter")
    full = tmp_path / "20260102-000000-def"
    _full_model(full / "model")
    running = tmp_path / "20260103-000000-abc"
    make_checkpoint(running / "checkpoint-2", 2)
    assert newest_finished_run(tmp_path) == full
    (full / "model" / "config.json").unlink()
    assert newest_finished_run(tmp_path) == old
    _adapter(running / "adapter")
    assert newest_finished_run(tmp_path) == running


# ------------------------------------------------------------------------------------------------------
# Files a checkpoint holds


def test_safetensors_header_and_length_are_checked(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    header["b"] = {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}
    good = _safetensors(tmp_path / "good.safetensors", header, b"\0" * 12)
    assert _unreadable_file(good) is None
    longer = _safetensors(tmp_path / "longer.safetensors", header, b"\0" * 13)
    assert _unreadable_file(longer) is None
    short = _safetensors(tmp_path / "short.safetensors", header, b"\0" * 11)
    assert _unreadable_file(short) == "truncated"
    empty = _safetensors(tmp_path / "empty.safetensors", {"__metadata__": {}}, b"")
    assert _unreadable_file(empty) is None
    # A header length past the end of the file (e.g. bytes overwritten): bad header, nothing read.
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    assert _unreadable_file(bad) == "unreadable (bad header)"
    # A header length up to the file's size is read (then found short); one byte more: bad header.
    blob = b"{}"
    exact = tmp_path / "exact.safetensors"
    exact.write_bytes(struct.pack("<Q", 10) + blob)  # 10 bytes claimed, the file has 10
    assert _unreadable_file(exact) == "truncated"
    over = tmp_path / "over.safetensors"
    over.write_bytes(struct.pack("<Q", 11) + blob)
    assert _unreadable_file(over) == "unreadable (bad header)"
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{x")
    assert _unreadable_file(garbage).startswith("unreadable (")
    no_offsets = _safetensors(tmp_path / "nooff.safetensors", {"a": {"dtype": "F32"}}, b"")
    assert _unreadable_file(no_offsets) == "unreadable (KeyError)"
    assert _unreadable_file(tmp_path / "missing.safetensors") == "unreadable (FileNotFoundError)"


def test_size_fields_are_little_endian(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    # A big-endian length reads as a huge number: the file does not hold it.
    path = tmp_path / "big.safetensors"
    path.write_bytes(len(header).to_bytes(8, "big") + header + b"\0" * 4)
    assert _unreadable_file(path) == "unreadable (bad header)"


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_archives_are_opened_and_a_cut_one_is_unreadable(tmp_path, suffix):
    path = tmp_path / f"state{suffix}"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("state/data.pkl", b"x" * 100)
    assert _unreadable_file(path) is None
    path.write_bytes(path.read_bytes()[:-30])
    assert _unreadable_file(path) == "unreadable (BadZipFile)"


def test_json_is_parsed_and_other_files_are_not_read(tmp_path):
    good = tmp_path / "state.json"
    good.write_text('{"step": 1}', encoding="utf-8")
    assert _unreadable_file(good) is None
    bad = tmp_path / "cut.json"
    bad.write_text('{"step": ', encoding="utf-8")
    assert _unreadable_file(bad) == "unreadable (JSONDecodeError)"
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"a": "\xe9"}')
    assert _unreadable_file(latin) == "unreadable (UnicodeDecodeError)"
    other = tmp_path / "rng_state.txt"
    other.write_bytes(b"\xff\x00 not json")
    assert _unreadable_file(other) is None


# ------------------------------------------------------------------------------------------------------
# Checkpoint completion


def test_checkpoint_problem_names_what_is_wrong(tmp_path):
    folder = make_checkpoint(tmp_path / "checkpoint-4", 4, complete=False)
    assert checkpoint_problem(folder) == "no checkpoint.json (the save did not finish)"
    (folder / COMPLETE_MARKER).mkdir()
    assert checkpoint_problem(folder) == "no checkpoint.json (the save did not finish)"
    (folder / COMPLETE_MARKER).rmdir()
    for content in ('{"step": 4', '{"step": 4}', '{"files": 3}', '{"files": [1, 2]}', "[]"):
        (folder / COMPLETE_MARKER).write_text(content)
        assert checkpoint_problem(folder) == "checkpoint.json unreadable", content
    sizes = {p.name: p.stat().st_size for p in folder.iterdir() if p.name != COMPLETE_MARKER}

    _marker(folder, {"adapter_model.safetensors": sizes["adapter_model.safetensors"]})
    assert checkpoint_problem(folder) == "lacks optimizer.pt, scheduler.pt, trainer_state.json"
    _marker(folder, {k: v for k, v in sizes.items() if k != "scheduler.pt"})
    assert checkpoint_problem(folder) == "lacks scheduler.pt"
    _marker(folder, {k: v for k, v in sizes.items() if k != "adapter_model.safetensors"})
    assert checkpoint_problem(folder) == (
        "lacks the weights (adapter_model.safetensors or model.safetensors or model.safetensors.index.json)"
    )
    _marker(folder, {**sizes, "rng_state.pth": 10})
    assert checkpoint_problem(folder) == "rng_state.pth missing"
    _marker(folder, {**sizes, "optimizer.pt": sizes["optimizer.pt"] + 1})
    assert (
        checkpoint_problem(folder)
        == f"optimizer.pt has {sizes['optimizer.pt']} bytes, {sizes['optimizer.pt'] + 1} when saved"
    )
    _marker(folder, sizes)
    assert checkpoint_problem(folder) is None
    assert is_complete_checkpoint(folder)
    # Problems are reported in file-name order: the first one found is named.
    _marker(folder, {**sizes, "optimizer.pt": 1, "scheduler.pt": 2})
    assert checkpoint_problem(folder).startswith("optimizer.pt has")
    _marker(folder, {**sizes, "trainer_state.json": 1, "scheduler.pt": 2})
    assert checkpoint_problem(folder).startswith("scheduler.pt has")
    # Same size, contents unreadable.
    _marker(folder, sizes)
    (folder / "trainer_state.json").write_text("{" + " " * (sizes["trainer_state.json"] - 1))
    assert checkpoint_problem(folder) == "trainer_state.json unreadable (JSONDecodeError)"
    assert not is_complete_checkpoint(folder)
    assert not is_complete_checkpoint(tmp_path / "checkpoint-9")


@pytest.mark.parametrize(
    "weights", ["adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json"]
)
def test_any_weight_file_layout_completes_a_checkpoint(tmp_path, weights):
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    header = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    if weights.endswith(".json"):
        (folder / weights).write_text('{"weight_map": {}}')
    else:
        _safetensors(folder / weights, header, b"\0" * 4)
    (folder / "trainer_state.json").write_text("{}")
    for name in ("optimizer.pt", "scheduler.pt"):
        with zipfile.ZipFile(folder / name, "w") as archive:
            archive.writestr("data.pkl", b"x")
    write_checkpoint_marker(folder, 1)
    assert checkpoint_problem(folder) is None


def test_a_deepspeed_checkpoint_keeps_its_optimizer_in_global_step(tmp_path):
    folder = tmp_path / "checkpoint-6"
    (folder / "global_step6").mkdir(parents=True)
    _safetensors(folder / "adapter_model.safetensors", {}, b"")
    (folder / "trainer_state.json").write_text("{}")
    with zipfile.ZipFile(folder / "global_step6" / "mp_rank_00_model_states.pt", "w") as archive:
        archive.writestr("data.pkl", b"x")
    write_checkpoint_marker(folder, 6)
    assert checkpoint_problem(folder) is None
    # Without its global_step folder the same checkpoint lacks the Trainer's optimizer and scheduler.
    (folder / "global_step6" / "mp_rank_00_model_states.pt").unlink()
    write_checkpoint_marker(folder, 6)
    assert checkpoint_problem(folder) == "lacks optimizer.pt, scheduler.pt"
    # A DeepSpeed checkpoint still needs the trainer state.
    with zipfile.ZipFile(folder / "global_step6" / "mp_rank_00_model_states.pt", "w") as archive:
        archive.writestr("data.pkl", b"x")
    (folder / "trainer_state.json").unlink()
    write_checkpoint_marker(folder, 6)
    assert checkpoint_problem(folder) == "lacks trainer_state.json"


def test_marker_records_nested_files_and_skips_hidden_ones_and_itself(tmp_path):
    folder = tmp_path / "checkpoint-3"
    (folder / "global_step3").mkdir(parents=True)
    (folder / "global_step3" / "state.pt").write_bytes(b"12345")
    (folder / "trainer_state.json").write_text("{}")
    (folder / ".partial").write_bytes(b"xx")
    (folder / COMPLETE_MARKER).write_text("old")
    before = datetime.now().astimezone()
    written = write_checkpoint_marker(folder, 3)
    assert written == folder / COMPLETE_MARKER
    record = json.loads(written.read_text())
    assert record["step"] == 3
    assert record["files"] == {"global_step3/state.pt": 5, "trainer_state.json": 2}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", record["written"])
    stamp = datetime.fromisoformat(record["written"])
    assert abs((stamp - before).total_seconds()) < 3600
    assert not list(tmp_path.rglob("*.tmp*"))


# ------------------------------------------------------------------------------------------------------
# Which checkpoint a resume takes


def test_checkpoints_are_listed_by_step_number_not_by_name(tmp_path):
    assert list_checkpoint_folders(tmp_path / "missing") == []
    for step in (10, 2, 100, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-best").mkdir()
    (tmp_path / "checkpoint-7.tmp").mkdir()
    (tmp_path / "checkpoint-").mkdir()
    (tmp_path / "checkpoint-50").write_text("a file")
    (tmp_path / "ckpt-60").mkdir()
    assert [p.name for p in list_checkpoint_folders(tmp_path)] == [
        "checkpoint-2",
        "checkpoint-9",
        "checkpoint-10",
        "checkpoint-100",
    ]
    assert checkpoint_step(tmp_path / "checkpoint-100") == 100


def test_newest_complete_checkpoint_by_step_and_a_warning_naming_each_broken_one(tmp_path, caplog):
    run = tmp_path / "run"
    assert newest_complete_checkpoint(run) is None
    for step in (9, 10):
        make_checkpoint(run / f"checkpoint-{step}", step)
    with caplog.at_level(logging.WARNING, logger="pcbvlm.runs"):
        assert newest_complete_checkpoint(run) == run / "checkpoint-10"  # 10 > 9 though "10" < "9"
    assert not caplog.records

    make_checkpoint(run / "checkpoint-11", 11, complete=False)
    with caplog.at_level(logging.WARNING, logger="pcbvlm.runs"):
        assert newest_complete_checkpoint(run) == run / "checkpoint-10"
    assert [r.getMessage() for r in caplog.records] == [
        "run: skipping broken checkpoint checkpoint-11 (no checkpoint.json (the save did not finish)); "
        "using checkpoint-10"
    ]
    assert caplog.records[0].levelno == logging.WARNING

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pcbvlm.runs"):
        assert newest_complete_checkpoint(run, warn=False) == run / "checkpoint-10"
    assert not caplog.records

    (run / "checkpoint-10" / "optimizer.pt").write_bytes(b"cut")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pcbvlm.runs"):
        assert newest_complete_checkpoint(run) == run / "checkpoint-9"
    assert caplog.records[0].getMessage().startswith("run: skipping broken checkpoints checkpoint-11 (")

    caplog.clear()
    (run / "checkpoint-9" / "scheduler.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="pcbvlm.runs"):
        assert newest_complete_checkpoint(run) is None
    assert [r.getMessage() for r in caplog.records] == [
        "run: skipping broken checkpoints checkpoint-11 (no checkpoint.json (the save did not finish)), "
        f"checkpoint-10 (optimizer.pt has 3 bytes, {(run / 'checkpoint-9' / 'optimizer.pt').stat().st_size} "
        "when saved), checkpoint-9 (scheduler.pt missing); using none"
    ]


@pytest.fixture
def runs_cfg(tmp_path):
    return load_config(TINY, [f"paths.runs_dir={tmp_path / 'runs'}"])


@pytest.fixture
def new_york(monkeypatch):
    """The machine's local time zone is five hours behind UTC (four in summer)."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_a_new_run_is_named_by_its_start_time_in_utc_and_identity(runs_cfg, tmp_path, new_york):
    plan = plan_run(runs_cfg, "abc123", "auto")
    assert plan.run_dir.parent == tmp_path / "runs"
    assert re.fullmatch(r"\d{8}-\d{6}-abc123", plan.run_dir.name)
    assert (plan.resume_from, plan.already_finished) == (None, False)
    stamp = datetime.strptime(plan.run_dir.name[:15], "%Y%m%d-%H%M%S")
    assert abs((datetime.now(UTC).replace(tzinfo=None) - stamp).total_seconds()) < 3600
    assert not plan.run_dir.exists()  # planning creates nothing
    assert plan_run(runs_cfg, "abc123", "no").run_dir.name.endswith("-abc123")


def test_auto_resume_uses_the_newest_run_of_the_identity_only(runs_cfg, tmp_path):
    runs = tmp_path / "runs"
    older = make_checkpoint(runs / "20260101-000000-abc" / "checkpoint-4", 4)
    assert plan_run(runs_cfg, "abc", "auto").resume_from == older
    assert plan_run(runs_cfg, "abc", "auto").run_dir == older.parent
    assert plan_run(runs_cfg, "abc", "no").resume_from is None
    assert plan_run(runs_cfg, "abc", "no").run_dir != older.parent
    # A newer run of another config does not count; a newer run of this config with no checkpoint yet
    # starts afresh rather than going back to the older run.
    make_checkpoint(runs / "20260105-000000-def" / "checkpoint-9", 9)
    assert plan_run(runs_cfg, "abc", "auto").resume_from == older
    (runs / "20260102-000000-abc").mkdir()
    fresh = plan_run(runs_cfg, "abc", "auto")
    assert fresh.resume_from is None and fresh.run_dir.parent == runs
    assert fresh.run_dir.name not in ("20260101-000000-abc", "20260102-000000-abc")
    # A finished newest run is reported as such (nothing to train), not resumed.
    _adapter(runs / "20260102-000000-abc" / "adapter")
    plan = plan_run(runs_cfg, "abc", "auto")
    assert (plan.run_dir, plan.resume_from, plan.already_finished) == (
        runs / "20260102-000000-abc",
        None,
        True,
    )
    assert not plan_run(runs_cfg, "abc", "no").already_finished


def test_explicit_resume_targets(runs_cfg, tmp_path, caplog):
    run = tmp_path / "elsewhere" / "20260101-000000-abc"
    four = make_checkpoint(run / "checkpoint-4", 4)
    make_checkpoint(run / "checkpoint-6", 6, complete=False)
    plan = plan_run(runs_cfg, "other-identity", str(four))
    assert (plan.run_dir, plan.resume_from, plan.already_finished) == (run, four, False)
    with caplog.at_level(logging.WARNING, logger="pcbvlm.runs"):
        plan = plan_run(runs_cfg, "other-identity", str(run))
    assert (plan.run_dir, plan.resume_from) == (run, four)
    assert "checkpoint-6" in caplog.text
    with pytest.raises(UserError) as err:
        plan_run(runs_cfg, "abc", str(run / "checkpoint-6"))
    assert str(err.value) == (
        f"RESUME={run / 'checkpoint-6'}: not a complete checkpoint: no checkpoint.json (the save did not finish)"
    )
    with pytest.raises(UserError) as err:
        plan_run(runs_cfg, "abc", str(run / "checkpoint-8"))
    assert str(err.value) == f"RESUME={run / 'checkpoint-8'}: not a complete checkpoint: no such folder"
    with pytest.raises(UserError) as err:
        plan_run(runs_cfg, "abc", str(tmp_path / "nope"))
    assert str(err.value) == f"RESUME={tmp_path / 'nope'}: no such run folder or checkpoint"
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(UserError) as err:
        plan_run(runs_cfg, "abc", str(empty))
    assert str(err.value) == f"RESUME={empty}: the run has no complete checkpoint to resume from"


# ------------------------------------------------------------------------------------------------------
# Run identity: which settings make a run, and which data


def _data(folder: Path, train: str = '{"id": 1}\n', val: str | None = '{"id": 2}\n') -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text(train)
    if val is not None:
        (folder / "val.jsonl").write_text(val)
    return folder


def test_dataset_hash_changes_with_the_train_and_val_files_only(tmp_path):
    data = _data(tmp_path / "data")
    first = dataset_hash(data)
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    assert dataset_hash(_data(tmp_path / "copy")) == first  # same files elsewhere: same data
    # Files that training does not read do not count.
    (data / "test.jsonl").write_text('{"id": 3}\n')
    (data / "stats.json").write_text("{}")
    assert dataset_hash(data) == first
    (data / "train.jsonl").write_text('{"id": 1}\n{"id": 4}\n')
    changed_train = dataset_hash(data)
    assert changed_train != first
    (data / "train.jsonl").write_text('{"id": 1}\n')
    assert dataset_hash(data) == first
    (data / "val.jsonl").write_text('{"id": 5}\n')
    assert dataset_hash(data) not in (first, changed_train)
    # A line moved from train to val is a different split of the same lines.
    moved = _data(tmp_path / "moved", train='{"id": 1}\n{"id": 2}\n', val="")
    assert dataset_hash(moved) != first
    # No val.jsonl (val_fraction=0) is not the same as an empty one, and neither is an error.
    no_val = dataset_hash(_data(tmp_path / "no-val", val=None))
    assert re.fullmatch(r"[0-9a-f]{16}", no_val)
    assert no_val != dataset_hash(_data(tmp_path / "empty-val", val=""))
    assert dataset_hash(tmp_path / "missing") != no_val


def test_run_identity_depends_on_what_training_computes_not_on_how_it_is_watched(tmp_path):
    def identity(*overrides: str, data_hash: str = "0123456789abcdef") -> str:
        return run_identity(load_config(TINY, list(overrides)), data_hash)

    base = identity()
    assert re.fullmatch(r"[0-9a-f]{10}", base)
    assert identity() == base
    # Settings that change the trained weights: a new run.
    for override in (
        "model.name_or_path=other/model",
        "model.attn_implementation=eager",
        "data.max_pixels=32768",
        "data.split_seed=1",
        "lora.r=4",
        "lora.alpha=8",
        "train.lr=1.0e-3",
        "train.epochs=2",
        "train.micro_batch=2",
        "train.seed=7",
    ):
        assert identity(override) != base, override
    assert identity(data_hash="fedcba9876543210") != base
    # Settings that only change how a run is watched, stored or where files go: the same run.
    for override in (
        "train.save_steps=3",
        "train.eval_steps=3",
        "train.logging_steps=1",
        "train.save_total_limit=5",
        "train.num_workers=2",
        "train.disk_reserve_gb=50",
        "train.accelerate_profile=a800",
        f"paths.runs_dir={tmp_path / 'runs'}",
        f"paths.outputs_dir={tmp_path / 'outputs'}",
        "eval.batch_size=2",
        "quantize.group_size=64",
    ):
        assert identity(override) == base, override


def test_run_identity_recipe_is_stable(tmp_path):
    """The identity is part of every run folder's name, so `make train` after an update of the code finds
    the runs made before it only if the recipe stays: the first 10 hex digits of the SHA-256 of the
    sorted-key JSON of the model, data, lora and train settings (less the operational ones) and the data."""
    cfg = load_config(TINY, [])
    train = cfg.train.model_dump(mode="json")
    for key in ("disk_reserve_gb", "num_workers", "logging_steps", "eval_steps", "save_steps"):
        del train[key]
    del train["save_total_limit"], train["accelerate_profile"]
    blob = {
        "data": cfg.data.model_dump(mode="json"),
        "dataset": "0123456789abcdef",
        "lora": cfg.lora.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
        "train": train,
    }
    text = json.dumps(blob, sort_keys=True)
    assert run_identity(cfg, "0123456789abcdef") == hashlib.sha256(text.encode()).hexdigest()[:10]


# ------------------------------------------------------------------------------------------------------
# The run lock


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_pid_alive_asks_without_disturbing_the_process(monkeypatch):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _pid_alive(sleeper.pid)
        time.sleep(0.2)
        assert sleeper.poll() is None  # asking sent no signal that stops it
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not _pid_alive(sleeper.pid)
    assert _pid_alive(os.getpid())

    def not_ours(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", not_ours)  # another user's process: alive, though we may not signal it
    assert _pid_alive(12345)


def test_read_pid_reads_a_pid_and_nothing_else(tmp_path):
    path = tmp_path / "run.lock"
    assert _read_pid(path) is None  # missing
    path.write_text("4321\n")
    assert _read_pid(path) == 4321
    path.write_text("  77 \n")
    assert _read_pid(path) == 77
    for content in ("", "\n", "abc\n", "-5\n", "12 34\n", "1.5\n"):
        path.write_text(content)
        assert _read_pid(path) is None, content
    path.unlink()
    path.mkdir()  # unreadable: not a file
    assert _read_pid(path) is None


def test_run_lock_holds_the_pid_refuses_a_second_writer_and_empties_on_release(tmp_path, caplog):
    run = tmp_path / "runs" / "20260101-000000-abc"  # neither the run nor its parent exist yet
    assert run_lock_holder(run) is None
    lock = RunLock(run)
    assert lock.path == run / LOCK_FILE
    lock.release()  # before acquire: nothing to do (callers release in `finally`)
    with caplog.at_level(logging.WARNING, logger="pcbvlm.runs"):
        assert lock.acquire() is lock
    assert not caplog.records  # a fresh lock is no takeover
    assert (run / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert run_lock_holder(run) == os.getpid()
    assert run_lock_holder(run) == os.getpid()  # asking does not take the lock away
    with pytest.raises(UserError) as err:
        RunLock(run).acquire()  # flock is per open file: a second open refuses, even in this process
    assert str(err.value) == (
        f"run {run.name} is being trained by process {os.getpid()} (lock {run / LOCK_FILE}); "
        "wait for it, stop it, or start a new run with RESUME=no"
    )
    assert (run / LOCK_FILE).read_text() == f"{os.getpid()}\n"  # the refused writer changed nothing
    # A holder whose PID cannot be read is still a holder.
    (run / LOCK_FILE).write_text("")
    assert run_lock_holder(run) == 0
    with pytest.raises(UserError, match=r"is being trained by another process \(lock "):
        RunLock(run).acquire()
    lock.release()
    assert (run / LOCK_FILE).is_file() and (run / LOCK_FILE).read_text() == ""  # emptied, not removed
    assert run_lock_holder(run) is None
    lock.release()  # twice: harmless
    # Released: the next writer gets it without a takeover warning (nothing left in the file).
    with caplog.at_level(logging.WARNING, logger="pcbvlm.runs"):
        again = RunLock(run).acquire()
    assert not caplog.records
    assert run_lock_holder(run) == os.getpid()
    again.release()
    # Re-acquiring the lock of an existing run folder.
    third = RunLock(run).acquire()
    assert (run / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    third.release()


class _UnwritableFile:
    """A lock file whose emptying fails (a full or read-only-remounted disk)."""

    def __init__(self, fh):
        self._fh = fh

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def truncate(self, *args):
        raise OSError(errno.EIO, "Input/output error")


def test_release_drops_the_lock_even_when_the_pid_cannot_be_erased(tmp_path, caplog):
    run = tmp_path / "20260101-000000-abc"
    lock = RunLock(run).acquire()
    lock._fh = _UnwritableFile(lock._fh)
    lock.release()  # runs in `finally` after a failed run: must not raise a second error
    assert run_lock_holder(run) is None
    assert (run / LOCK_FILE).read_text() == f"{os.getpid()}\n"  # left behind, harmless
    with caplog.at_level(logging.WARNING, logger="pcbvlm.runs"):
        RunLock(run).acquire().release()  # our own PID: taken back without a warning
    assert not caplog.records


def test_a_lock_left_by_a_dead_or_released_process_is_taken_over_with_a_warning(tmp_path, caplog):
    run = tmp_path / "20260101-000000-abc"
    run.mkdir()
    dead = _dead_pid()
    (run / LOCK_FILE).write_text(f"{dead}\n")  # kill -9: the kernel dropped the flock, the PID stayed
    assert run_lock_holder(run) is None
    with caplog.at_level(logging.WARNING, logger="pcbvlm.runs"):
        lock = RunLock(run).acquire()
    assert [r.getMessage() for r in caplog.records] == [
        f"{run.name}: taking over the lock left by process {dead} (no longer running)"
    ]
    assert (run / LOCK_FILE).read_text() == f"{os.getpid()}\n"  # the old PID replaced, not appended to
    lock.release()
    # A live process's PID in a lock nobody holds: it let go (e.g. a file copied from elsewhere).
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_FILE).write_text(f"{sleeper.pid}\n")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pcbvlm.runs"):
            lock = RunLock(run).acquire()
        assert [r.getMessage() for r in caplog.records] == [
            f"{run.name}: taking over the lock left by process {sleeper.pid} (lock released)"
        ]
        lock.release()
    finally:
        sleeper.kill()
        sleeper.wait()
    # This process's own PID (a lock released and taken again): no warning.
    (run / LOCK_FILE).write_text(f"{os.getpid()}\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pcbvlm.runs"):
        RunLock(run).acquire().release()
    assert not caplog.records


_HOLD = """
import fcntl, os, sys
fh = open(sys.argv[1], "a+")
fcntl.flock(fh, fcntl.LOCK_EX)
fh.write(f"{os.getpid()}\\n")
fh.flush()
print("locked", flush=True)
sys.stdin.read()
"""


def test_another_process_holding_the_lock_is_named_until_it_dies(tmp_path, caplog):
    run = tmp_path / "20260101-000000-abc"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(run / LOCK_FILE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_lock_holder(run) == holder.pid
        with pytest.raises(UserError, match=f"is being trained by process {holder.pid} "):
            RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert run_lock_holder(run) is None
    with caplog.at_level(logging.WARNING, logger="pcbvlm.runs"):
        lock = RunLock(run).acquire()
    assert f"taking over the lock left by process {holder.pid} (no longer running)" in caplog.text
    assert run_lock_holder(run) == os.getpid()
    lock.release()


def test_run_lock_holder_of_folders_without_a_lock_file(tmp_path):
    assert run_lock_holder(tmp_path / "missing") is None
    assert run_lock_holder(tmp_path) is None
    (tmp_path / LOCK_FILE).mkdir()  # not a file: no lock
    assert run_lock_holder(tmp_path) is None
