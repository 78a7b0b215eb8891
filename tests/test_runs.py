"""The run registry and resume selection, on folders alone (no model): which run is finished, which runs
belong to a config, which checkpoint is complete, which one a resume takes and what it says about the
broken ones. `make mutation` runs these against pcbvlm.runs.
"""

from __future__ import annotations

import json
import logging
import re
import struct
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
    _unreadable_file,
    adapter_folder,
    checkpoint_problem,
    checkpoint_step,
    full_model_folder,
    is_complete_checkpoint,
    is_finished,
    list_checkpoint_folders,
    list_runs,
    newest_complete_checkpoint,
    newest_finished_run,
    plan_run,
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
