"""Provenance and `MODEL=auto` over two training runs and their merges (tiny model, CPU): every model
folder records what it was made from, and a stale merged or quantized model is announced, not used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, run_job, tiny_overrides
from pcbvlm.generate import resolve_model_ref
from pcbvlm.merge import MERGE_REPORT, merge_adapter
from pcbvlm.provenance import (
    ADAPTER_PROVENANCE,
    QUANTIZE_REPORT,
    folder_sha256,
    quantized_provenance,
    write_adapter_provenance,
)
from test_merge import make_adapter, tiny_cfg


def train_run(cfg, name: str, seed: int) -> Path:
    """What `make train` leaves: <runs>/<name>/adapter/ with its provenance.json."""
    runs = Path(cfg.paths.runs_dir)
    adapter = make_adapter(cfg, runs / name / "adapter", seed=seed)
    write_adapter_provenance(adapter, name)
    return runs / name


def fake_quantize(cfg, merged: Path) -> Path:
    """What `make quantize` leaves, as far as MODEL=auto reads it (the real job: tests/test_quantize.py)."""
    target = Path(cfg.paths.outputs_dir) / "quantized"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / QUANTIZE_REPORT).write_text(json.dumps({"source": str(merged), **quantized_provenance(merged)}))
    return target


@pytest.fixture(scope="module")
def cfg(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    return tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path_factory.mktemp("provenance"))


def auto(cfg, capsys) -> tuple[str, list[str]]:
    """MODEL=auto: the path, and the lines it printed on stderr."""
    capsys.readouterr()  # what came before (merge progress bars)
    path = resolve_model_ref(cfg, "auto")
    err = capsys.readouterr().err.splitlines()
    assert sum(line.startswith("model: ") for line in err) == 1, err
    return path, err


def test_auto_picks_the_newest_consistent_chain_over_two_runs(cfg, capsys):

    run_a = train_run(cfg, "20260101-000000-aaaa", seed=0)
    recorded = json.loads((run_a / "adapter" / ADAPTER_PROVENANCE).read_text())
    assert recorded["run"] == run_a.name
    assert recorded["adapter_sha256"] == folder_sha256(run_a / "adapter")

    merged = merge_adapter(cfg).out_dir
    merge_a = json.loads((merged / MERGE_REPORT).read_text())
    assert merge_a["run"] == run_a.name
    assert merge_a["adapter_sha256"] == recorded["adapter_sha256"]
    assert merge_a["adapter"] == str(run_a / "adapter") and merge_a["base"] == str(cfg.model.name_or_path)
    quantized = fake_quantize(cfg, merged)
    assert json.loads((quantized / QUANTIZE_REPORT).read_text())["source_id"] == merge_a["id"]

    path, err = auto(cfg, capsys)
    assert path == str(quantized)
    assert err == [f"model: {quantized} (from merged {merge_a['id']}, run {run_a.name})"]

    # A second training run: merged and quantized were made from run A, so the run itself is used.
    run_b = train_run(cfg, "20260202-000000-bbbb", seed=1)
    path, err = auto(cfg, capsys)
    assert path == str(run_b)
    assert err[-1].startswith(f"model: {run_b} (run {run_b.name}, adapter ")
    assert any(
        f"{merged} was made from run {run_a.name}, not the newest finished run {run_b.name}" in w for w in err
    )
    assert any(f"{quantized} was made from the stale {merged}" in w for w in err)

    # Merged again from run B: the quantized model is older than it, announced and skipped.
    merge_b = json.loads((merge_adapter(cfg).out_dir / MERGE_REPORT).read_text())
    assert merge_b["run"] == run_b.name and merge_b["id"] != merge_a["id"]
    path, err = auto(cfg, capsys)
    assert path == str(merged)
    assert err == [
        f"warning: {quantized} was made from merged {merge_a['id']}, not from the current {merged} "
        f"({merge_b['id']}): not used (run `make quantize`)",
        f"model: {merged} (merged {merge_b['id']}, from run {run_b.name})",
    ]

    # Quantized again: the whole chain is consistent.
    fake_quantize(cfg, merged)
    path, err = auto(cfg, capsys)
    assert path == str(quantized) and err == [
        f"model: {quantized} (from merged {merge_b['id']}, run {run_b.name})"
    ]

    # Run B's adapter replaced in place (same run id, other weights): merged and quantized are stale.
    shutil.rmtree(run_b / "adapter")
    train_run(cfg, run_b.name, seed=2)
    path, err = auto(cfg, capsys)
    assert path == str(run_b)
    assert any(f"{merged} was made from an earlier adapter of run {run_b.name}" in w for w in err)


def test_quantized_without_provenance_is_not_used(cfg, tmp_path, capsys):
    """A quantize.json from before provenance was recorded cannot show it matches the merged model."""
    cfg = cfg.model_copy(deep=True)
    cfg.paths.runs_dir = tmp_path / "no-runs"
    cfg.paths.outputs_dir = tmp_path / "outputs"
    for name, report in (("merged", MERGE_REPORT), ("quantized", QUANTIZE_REPORT)):
        (tmp_path / "outputs" / name).mkdir(parents=True)
        (tmp_path / "outputs" / name / "config.json").write_text("{}")
        (tmp_path / "outputs" / name / report).write_text(
            json.dumps({"id": "m1"} if name == "merged" else {})
        )
    path, err = auto(cfg, capsys)
    assert path == str(tmp_path / "outputs" / "merged")
    assert "made from merged unknown (no provenance in quantize.json)" in err[0]
    assert err[1] == f"model: {tmp_path / 'outputs' / 'merged'} (merged m1, from run unknown)"

    # Without a merged folder (deleted to save disk) and without runs, the quantized model is all there is.
    shutil.rmtree(tmp_path / "outputs" / "merged")
    path, err = auto(cfg, capsys)
    assert path == str(tmp_path / "outputs" / "quantized") and len(err) == 1


def test_a_training_run_records_its_id_and_adapter_hash(tiny_model_dir, tiny_data_dir, tmp_path):
    runs = tmp_path / "runs"
    steps = {"max_steps": 1, "save_steps": 100, "eval_steps": 100}
    overrides = tiny_overrides(tiny_model_dir, tiny_data_dir, runs, **steps)
    proc = run_job("pcbvlm.commands.train", "--config", str(ROOT / "config" / "tiny.yaml"), *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = runs.iterdir()
    recorded = json.loads((run / "adapter" / ADAPTER_PROVENANCE).read_text())
    assert recorded["run"] == run.name
    assert recorded["adapter_sha256"] == folder_sha256(run / "adapter")


def test_auto_follows_a_full_parameter_run_through_its_merge(cfg, capsys):
    """train.method=full leaves <run>/model/ instead of adapter/: its merged copy records the run and the
    weights hash, and MODEL=auto picks it (not the run, not a stale quantized model)."""
    from transformers import Qwen3VLForConditionalGeneration

    from pcbvlm.merge import publish_full_model
    from pcbvlm.processing import load_processor
    from pcbvlm.training import save_full_model

    run = Path(cfg.paths.runs_dir) / "20260303-000000-full"
    model = Qwen3VLForConditionalGeneration.from_pretrained(cfg.model.name_or_path)
    processor = load_processor(cfg.model.name_or_path, cfg.data.min_pixels, cfg.data.max_pixels)
    folder = save_full_model(model, processor, run / "model")
    recorded = json.loads((folder / ADAPTER_PROVENANCE).read_text())
    assert recorded == {**recorded, "run": run.name, "adapter_sha256": folder_sha256(folder)}

    merged = Path(cfg.paths.outputs_dir) / "merged"
    publish_full_model(cfg, folder, merged)
    report = json.loads((merged / MERGE_REPORT).read_text())
    assert report["run"] == run.name and report["adapter_sha256"] == recorded["adapter_sha256"]

    path, err = auto(cfg, capsys)
    assert path == str(merged), err
    assert err[-1].startswith(f"model: {merged} ") and run.name in err[-1]
