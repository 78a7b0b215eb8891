"""Training on the tiny model (CPU): label masking, learning, checkpoints, resume, disk guard, multi-process."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, make_checkpoint, run_job, tiny_overrides
from pcbvlm.collator import IGNORE_INDEX, TrainCollator
from pcbvlm.config import load_config
from pcbvlm.deeppcb import load_samples
from pcbvlm.errors import EXIT_DISK_GUARD, UserError
from pcbvlm.modeling import apply_lora, load_base_model
from pcbvlm.runs import (
    ADAPTER_DIR,
    COMPLETE_MARKER,
    LOCK_FILE,
    RunLock,
    checkpoint_problem,
    checkpoint_step,
    list_checkpoint_folders,
    newest_complete_checkpoint,
    plan_run,
    run_lock_holder,
)
from pcbvlm.training import allow_indexed_cpu_map_location

TINY = ROOT / "config" / "tiny.yaml"


@pytest.fixture(scope="module")
def cfg(tiny_train_cfg):
    return tiny_train_cfg


@pytest.fixture(scope="module")
def processor(tiny_processor):
    return tiny_processor


def test_labels_are_exactly_the_answer_and_its_end_token(cfg, processor, tiny_data_dir):
    sample = load_samples(tiny_data_dir, "train")[0]
    answer = sample["messages"][-1]["content"][0]["text"]
    encoded = TrainCollator(processor).encode(sample)
    ids, labels = encoded["input_ids"].tolist(), encoded["labels"].tolist()
    tok = processor.tokenizer
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    n = len(answer_ids) + 1
    # Token by token: every prompt position is ignored, every answer position is learned, in order.
    assert labels[:-n] == [IGNORE_INDEX] * (len(ids) - n)
    assert labels[-n:] == answer_ids + [end_id]
    assert ids[-n:] == answer_ids + [end_id]
    # The learned tokens start right after the generation prompt "<|im_start|>assistant\n".
    prompt_tail = tok.decode(ids[: len(ids) - n][-3:])
    assert prompt_tail.endswith("<|im_start|>assistant\n")
    assert tok.decode(ids[-n:]) == answer + "<|im_end|>"
    # Visual tokens are marked for the model: mm_token_type_ids is 1 exactly at <|image_pad|>.
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    marked = encoded["mm_token_type_ids"].tolist()
    assert [int(i == image_pad) for i in ids] == marked
    assert sum(marked) == int(encoded["image_grid_thw"].prod(dim=-1).sum()) // 4


def test_batch_pads_on_the_right_and_ignores_pads(cfg, processor, tiny_data_dir):
    samples = load_samples(tiny_data_dir, "train")[:3]
    collator = TrainCollator(processor)
    batch = collator(samples)
    lengths = [len(collator.encode(s)["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == (3, max(lengths))
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all()
    assert batch["image_grid_thw"].shape == (3, 3)
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(dim=-1).sum())


def test_lora_targets_the_language_model_only(cfg):
    model = apply_lora(load_base_model(cfg), cfg)
    lora_modules = {name for name, _ in model.named_modules() if name.endswith("lora_A")}
    assert lora_modules, "no LoRA modules"
    assert all(".language_model.layers." in name for name in lora_modules)
    assert not any("visual" in name for name in lora_modules)
    # 2 layers x 7 linears (q k v o gate up down)
    assert len(lora_modules) == 14
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with_merger = load_config(
        TINY, [f"model.name_or_path={cfg.model.name_or_path}", "lora.train_merger=true"]
    )
    merger_model = apply_lora(load_base_model(with_merger), with_merger)
    assert any("visual.merger" in n and n.endswith("lora_A") for n, _ in merger_model.named_modules())


def test_loss_decreases_over_30_steps_on_a_fixed_batch(cfg, processor, tiny_data_dir):
    torch.manual_seed(0)
    model = apply_lora(load_base_model(cfg), cfg)
    batch = TrainCollator(processor)(load_samples(tiny_data_dir, "train")[:4])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # The tiny random model (frozen random lm_head, hidden 64) plateaus near 5.3 nats from 6.2; measured
    # drop of the 5-step means: 0.6 nats. A broken label mask or a frozen adapter gives ~0.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert losses[-1] < losses[0]


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / ADAPTER_DIR / "adapter_model.safetensors")


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _single_run(runs_dir: Path) -> Path:
    runs = [p for p in runs_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_kill_after_checkpoint_then_resume_matches_uninterrupted(tiny_model_dir, tiny_data_dir, tmp_path):
    """kill -9 in the second epoch, resume: the same batches, losses and adapter as an uninterrupted run."""
    steps = dict(max_steps=24, save_steps=3, eval_steps=100)
    steps_per_epoch = -(-len(load_samples(tiny_data_dir, "train")) // 2)  # micro-batch 2, grad_accum 1
    assert steps_per_epoch < 6 < 2 * steps_per_epoch  # checkpoint-6 lies inside the second epoch
    ref = run_job(
        "pcbvlm.commands.train",
        "--config",
        str(TINY),
        *tiny_overrides(tiny_model_dir, tiny_data_dir, tmp_path / "ref", **steps),
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_run = _single_run(tmp_path / "ref")

    runs = tmp_path / "killed"
    cmd = [
        sys.executable,
        str(ROOT / "jobs" / "train.py"),
        "--config",
        str(TINY),
        *tiny_overrides(tiny_model_dir, tiny_data_dir, runs, **steps),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("SET", "CONFIG")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            run_dirs = list(runs.glob("*")) if runs.exists() else []
            newest = newest_complete_checkpoint(run_dirs[0], warn=False) if run_dirs else None
            if newest is not None and checkpoint_step(newest) >= 6:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run_dir = _single_run(runs)
    checkpoint = newest_complete_checkpoint(run_dir)
    assert checkpoint is not None
    if (run_dir / ADAPTER_DIR).exists():
        pytest.skip("the run finished before it could be killed (machine too fast for this timing)")
    killed_at = int(checkpoint.name.split("-")[1])
    assert killed_at > steps_per_epoch and killed_at % steps_per_epoch, (
        "resume must start mid-epoch, after the first"
    )

    # Checkpoints hold the adapter and the trainer state, never the base weights.
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= names
    assert not any(n.startswith("model") and n.endswith(".safetensors") for n in names)
    base_bytes = sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))
    assert (checkpoint / "adapter_model.safetensors").stat().st_size < base_bytes / 5

    resumed = run_job(
        "pcbvlm.commands.train",
        "--config",
        str(TINY),
        *tiny_overrides(tiny_model_dir, tiny_data_dir, runs, **steps),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from checkpoint-{killed_at} (step {killed_at})" in resumed.stdout
    assert _single_run(runs) == run_dir
    ref_adapter, resumed_adapter = _adapter(ref_run), _adapter(run_dir)
    assert ref_adapter.keys() == resumed_adapter.keys()
    for key in ref_adapter:
        torch.testing.assert_close(resumed_adapter[key], ref_adapter[key], rtol=1e-4, atol=1e-5)
    # Step by step: a different batch order after the resume (the epoch's shuffle) shows as a loss change
    # of ~1e-3 at the first resumed step.
    ref_losses = _losses(ref_run)
    assert sorted(ref_losses) == list(range(1, 25))
    assert _losses(run_dir) == pytest.approx(ref_losses, rel=1e-5, abs=0)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["global_step"] == 24
    assert manifest["resumed_from"].endswith(checkpoint.name)
    assert {"commit", "dirty"} <= set(manifest["git"]) and manifest["packages"]["transformers"] == "5.17.0"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [m["step"] for m in metrics if "loss" in m]
    assert steps_logged == sorted(set(steps_logged)), "steps after the checkpoint were logged twice"
    assert all(
        {"samples_per_s", "tokens_per_s", "eta_s", "learning_rate"} <= set(m) for m in metrics if "loss" in m
    )
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert any((run_dir / "tensorboard").iterdir())
    assert (run_dir / "config.resolved.yaml").is_file()

    # A third call finds the run finished and does not train again.
    again = run_job(
        "pcbvlm.commands.train",
        "--config",
        str(TINY),
        *tiny_overrides(tiny_model_dir, tiny_data_dir, runs, **steps),
    )
    assert again.returncode == 0 and "already trained" in again.stdout


def test_disk_guard_saves_stops_with_exit_3_and_resumes(tiny_model_dir, tiny_data_dir, tmp_path):
    runs = tmp_path / "runs"
    steps = dict(max_steps=4, save_steps=100, eval_steps=100)
    # Through the launcher (make train): PROFILE=cpu wins over the config's cpu-multi, and exit 3 survives.
    stopped = _launch(
        "--config",
        str(TINY),
        *tiny_overrides(tiny_model_dir, tiny_data_dir, runs, disk_reserve_gb=1e9, **steps),
        env={"SET": "train.accelerate_profile=cpu-multi", "PROFILE": "cpu"},
    )
    assert stopped.returncode == EXIT_DISK_GUARD, stopped.stderr[-3000:]
    assert "==> accelerate profile cpu " in stopped.stdout
    assert "training on 1 process (CPU, single process)" in stopped.stdout
    assert "Traceback" not in stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("error: free space on the checkpoint volume")
    assert "below train.disk_reserve_gb=1e+09: saved checkpoint-1 at step 1 and stopped" in last
    run_dir = _single_run(runs)
    assert newest_complete_checkpoint(run_dir).name == "checkpoint-1"
    assert not (run_dir / ADAPTER_DIR).exists()
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "stopped by disk guard"

    resumed = run_job(
        "pcbvlm.commands.train",
        "--config",
        str(TINY),
        *tiny_overrides(tiny_model_dir, tiny_data_dir, runs, **steps),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from checkpoint-1 (step 1)" in resumed.stdout
    assert (run_dir / ADAPTER_DIR / "adapter_model.safetensors").is_file()


def test_resume_no_starts_a_new_run_and_auto_ignores_other_configs(tiny_model_dir, tiny_data_dir, tmp_path):
    cfg = load_config(TINY, [f"paths.runs_dir={tmp_path}", f"paths.data_dir={tiny_data_dir}"])
    first = plan_run(cfg, "abc", "auto")
    assert first.resume_from is None and first.run_dir.name.endswith("-abc")
    (first.run_dir / "checkpoint-2").mkdir(parents=True)  # incomplete checkpoint: not resumable
    assert plan_run(cfg, "abc", "auto").resume_from is None
    complete = make_checkpoint(first.run_dir / "checkpoint-3", 3)
    assert plan_run(cfg, "abc", "auto").resume_from == complete
    assert plan_run(cfg, "other", "auto").resume_from is None
    assert plan_run(cfg, "abc", "no").resume_from is None


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_resume_picks_the_newest_complete_checkpoint_of_the_newest_run(tmp_path, caplog):
    """Several runs and checkpoints: auto takes the newest run of this config, and in it the newest checkpoint
    that loads; newer broken ones are skipped with one warning naming each."""
    cfg = load_config(TINY, [f"paths.runs_dir={tmp_path}"])
    old = tmp_path / "20260101-000000-abc"
    for step in (2, 4):
        make_checkpoint(old / f"checkpoint-{step}", step)
    run = tmp_path / "20260102-000000-abc"
    for step in (3, 5):
        make_checkpoint(run / f"checkpoint-{step}", step)
    make_checkpoint(run / "checkpoint-6", 6, complete=False)  # killed mid-save: no marker
    _truncate(make_checkpoint(run / "checkpoint-7", 7) / "optimizer.pt")  # cut after it was saved
    header = make_checkpoint(run / "checkpoint-8", 8) / "adapter_model.safetensors"
    header.write_bytes(b"\xff" * header.stat().st_size)  # same size, unreadable header
    make_checkpoint(tmp_path / "20260103-000000-other" / "checkpoint-9", 9)  # another config's run

    with caplog.at_level(logging.WARNING, logger="pcbvlm.runs"):
        plan = plan_run(cfg, "abc", "auto")
    assert (plan.run_dir, plan.resume_from) == (run, run / "checkpoint-5")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{run.name}: skipping broken checkpoints checkpoint-8 (adapter_model")
    assert "checkpoint-7 (optimizer.pt has" in warnings[0]
    assert "checkpoint-6 (no checkpoint.json" in warnings[0] and warnings[0].endswith("using checkpoint-5")
    assert [checkpoint_step(p) for p in list_checkpoint_folders(run)] == [3, 5, 6, 7, 8]

    # An explicit run folder falls back the same way; an explicit broken checkpoint is an error naming why.
    assert plan_run(cfg, "abc", str(run)).resume_from == run / "checkpoint-5"
    assert plan_run(cfg, "abc", str(old)).resume_from == old / "checkpoint-4"
    with pytest.raises(
        UserError, match=r"checkpoint-7: not a complete checkpoint: optimizer.pt has \d+ bytes"
    ):
        plan_run(cfg, "abc", str(run / "checkpoint-7"))
    assert plan_run(cfg, "abc", str(run / "checkpoint-3")).resume_from == run / "checkpoint-3"
    for bad in (run / "checkpoint-5", run / "checkpoint-3"):
        _truncate(bad / "scheduler.pt")
    with pytest.raises(UserError, match="has no complete checkpoint"):
        plan_run(cfg, "abc", str(run))
    # The newest run of the config has nothing to resume: a new run starts (the older run stays as it is).
    fresh = plan_run(cfg, "abc", "auto")
    assert fresh.resume_from is None and fresh.run_dir not in (run, old)
    (run / ADAPTER_DIR).mkdir()
    (run / ADAPTER_DIR / "adapter_config.json").write_text("{}")
    assert plan_run(cfg, "abc", "auto").already_finished


def test_checkpoint_marker_lists_every_file_with_its_size(tmp_path):
    folder = make_checkpoint(tmp_path / "checkpoint-4", 4)
    record = json.loads((folder / COMPLETE_MARKER).read_text())
    assert record["step"] == 4
    assert record["files"] == {
        p.name: p.stat().st_size for p in folder.iterdir() if p.name != COMPLETE_MARKER
    }
    assert checkpoint_problem(folder) is None
    (folder / "scheduler.pt").unlink()
    assert checkpoint_problem(folder) == "scheduler.pt missing"
    assert newest_complete_checkpoint(tmp_path) is None


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from pcbvlm.runs import RunLock
lock = RunLock(Path(sys.argv[1])).acquire()  # held while the object lives
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_trainer_of_the_same_run_refuses_and_a_dead_holder_is_taken_over(
    tiny_model_dir, tiny_data_dir, tmp_path, caplog
):
    runs = tmp_path / "runs"
    run = runs / "20260101-000000-abc"
    make_checkpoint(run / "checkpoint-2", 2)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = run_job(
            "pcbvlm.commands.train",
            "--config",
            str(TINY),
            *tiny_overrides(tiny_model_dir, tiny_data_dir, runs),
            "--resume",
            str(run),
        )
        assert second.returncode == 1, second.stderr[-2000:]
        assert second.stderr.strip().splitlines()[-1] == (
            f"error: run {run.name} is being trained by process {holder.pid} (lock {run / LOCK_FILE}); "
            "wait for it, stop it, or start a new run with RESUME=no"
        )
        assert "Traceback" not in second.stderr
        assert run_lock_holder(run) == holder.pid
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's lock; its PID is still in the file: taken over with a warning.
    assert run_lock_holder(run) is None
    with caplog.at_level(logging.WARNING, logger="pcbvlm.runs"):
        lock = RunLock(run).acquire()
    assert f"taking over the lock left by process {holder.pid} (no longer running)" in caplog.text
    assert run_lock_holder(run) == os.getpid()
    lock.release()
    assert run_lock_holder(run) is None


def _start_training(runs: Path, tiny_model_dir: Path, data_dir: Path, **steps) -> subprocess.Popen:
    cmd = [
        sys.executable,
        str(ROOT / "jobs" / "train.py"),
        "--config",
        str(TINY),
        *tiny_overrides(tiny_model_dir, data_dir, runs, **steps),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("SET", "CONFIG")}
    return subprocess.Popen(
        cmd, cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_marks_the_run_interrupted(
    tiny_model_dir, tiny_data_dir, tmp_path, sig
):
    runs = tmp_path / "runs"
    proc = _start_training(
        runs, tiny_model_dir, tiny_data_dir, max_steps=500, save_steps=1000, eval_steps=1000
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = list(runs.glob("*/metrics.jsonl"))
            if metrics and len(metrics[0].read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    run_dir = _single_run(runs)
    checkpoint = newest_complete_checkpoint(run_dir)
    assert checkpoint is not None, "nothing saved on the signal"
    step = checkpoint_step(checkpoint)
    assert stderr.strip().splitlines()[-1] == (
        f"error: {sig.name}: saved checkpoint-{step} at step {step} and stopped; "
        f"run `make train` again to resume {run_dir.name}"
    )
    assert "Traceback" not in stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["global_step"] == step and manifest["end"]
    assert not (run_dir / ADAPTER_DIR).exists()
    assert run_lock_holder(run_dir) is None


def test_a_run_that_dies_on_a_bad_image_is_marked_failed_naming_it(tiny_model_dir, tiny_data_dir, tmp_path):
    """An image truncated after `make data` stops training with one line naming the file, and the run's
    manifest says failed (not "running")."""
    data = tmp_path / "data"
    data.mkdir()
    lines = (tiny_data_dir / "train.jsonl").read_text().splitlines()
    image = json.loads(lines[3])["image"]
    bad = tmp_path / "bad images" / Path(image).name
    bad.parent.mkdir()
    bad.write_bytes(Path(image).read_bytes()[:3000])
    lines[3] = lines[3].replace(json.dumps(image)[1:-1], json.dumps(str(bad))[1:-1])
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    runs = tmp_path / "runs"
    steps = dict(max_steps=6, save_steps=100, eval_steps=100)  # one epoch: every image is read
    proc = run_job(
        "pcbvlm.commands.train", "--config", str(TINY), *tiny_overrides(tiny_model_dir, data, runs, **steps)
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {bad}: cannot read the image (image file is truncated"), last
    assert "Traceback" not in proc.stderr
    run_dir = _single_run(runs)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["end"]
    assert manifest["error"] == last.removeprefix("error: ")
    assert run_lock_holder(run_dir) is None


def _launch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m pcbvlm.launch` (what `make train` runs), without the caller's CONFIG/SET/PROFILE."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("SET", "CONFIG", "PROFILE", "RESUME")}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "pcbvlm.launch", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_two_gloo_processes_train_like_one_process_with_the_same_global_batch(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    """The profile named by SET reaches accelerate (2 processes), and 2 processes x micro-batch 2 train
    the same model as 1 process x micro-batch 4: same samples per step (accelerate shards one sampler's
    batches across ranks, and the loss is averaged over the tokens of all ranks), so the same adapter and
    loss, within float rounding (sums taken in another order): rtol 1e-3."""
    # 2 full steps of 4 samples (a last, partial batch would be padded with repeated samples on 2 ranks).
    steps = dict(max_steps=2, save_steps=2, eval_steps=100, group_by_length="false")
    one = _launch(
        "--config",
        str(TINY),
        *tiny_overrides(tiny_model_dir, tiny_data_dir, tmp_path / "one", micro_batch=4, **steps),
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert "training on 1 process (CPU, single process)" in one.stdout
    two = _launch(
        "--config",
        str(TINY),
        *tiny_overrides(tiny_model_dir, tiny_data_dir, tmp_path / "two", micro_batch=2, **steps),
        env={"SET": "train.accelerate_profile=cpu-multi"},
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "==> accelerate profile cpu-multi" in two.stdout
    assert "training on 2 processes (CPU, DDP, gloo)" in two.stdout
    run_dir = _single_run(tmp_path / "two")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["launch"]["processes"] == 2
    assert manifest["status"] == "finished"
    state = json.loads((run_dir / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert state["num_input_tokens_seen"] > 0

    one_run = _single_run(tmp_path / "one")
    losses = [
        [
            json.loads(line)["loss"]
            for line in (r / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line
        ]
        for r in (one_run, run_dir)
    ]
    assert len(losses[0]) == len(losses[1]) == 2
    for single, multi in zip(*losses, strict=True):
        assert multi == pytest.approx(single, rel=1e-3)
    adapter_one, adapter_two = _adapter(one_run), _adapter(run_dir)
    for key in adapter_one:
        torch.testing.assert_close(adapter_two[key], adapter_one[key], rtol=1e-3, atol=1e-5)


def test_a_two_process_run_resumes_at_its_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path):
    """2 gloo processes (cpu-multi) train 2 steps and checkpoint; resumed to 4 steps, every rank loads the
    checkpoint's optimizer state (accelerate calls each CPU rank's device `cpu:0`, which torch.load could
    not map to, so this resume used to fail) and the step count continues at 3."""
    runs = tmp_path / "runs"
    steps = dict(save_steps=2, eval_steps=100, group_by_length="false")
    first = _launch(
        "--config",
        str(TINY),
        "--profile",
        "cpu-multi",
        *tiny_overrides(tiny_model_dir, tiny_data_dir, runs, max_steps=2, **steps),
    )
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = _single_run(runs)
    resumed = _launch(
        "--config",
        str(TINY),
        "--profile",
        "cpu-multi",
        "--resume",
        str(run_dir),
        *tiny_overrides(tiny_model_dir, tiny_data_dir, runs, max_steps=4, **steps),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run_dir.name} from checkpoint-2 (step 2)" in resumed.stdout
    logged = [
        json.loads(line)["step"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert logged == [1, 2, 3, 4]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["global_step"] == 4
    assert manifest["resumed_from"].endswith("checkpoint-2")
    assert manifest["launch"]["processes"] == 2
    assert (run_dir / "checkpoint-4" / "optimizer.pt").is_file()


def test_an_indexed_cpu_location_loads_onto_the_cpu(tmp_path):
    """torch.load(map_location="cpu:0"), as the Trainer resumes a multi-process CPU run, loads onto the CPU."""
    path = tmp_path / "t.pt"
    torch.save({"m": torch.arange(3.0)}, path)
    allow_indexed_cpu_map_location()
    loaded = torch.load(path, map_location="cpu:0", weights_only=True)
    assert loaded["m"].device.type == "cpu"
    assert loaded["m"].tolist() == [0.0, 1.0, 2.0]


def test_the_launcher_returns_the_jobs_exit_code_without_a_traceback(tmp_path):
    """Bad input in every one of 2 processes: exit 2 and the job's own error line, no launcher traceback."""
    proc = _launch(
        "--config",
        str(TINY),
        "--profile",
        "cpu-multi",
        "--set",
        f"paths.data_dir={tmp_path / 'missing'}",
        "--set",
        f"paths.runs_dir={tmp_path / 'runs'}",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert str(tmp_path / "missing") in proc.stderr


def test_an_unknown_profile_is_a_one_line_error(tmp_path):
    proc = _launch("--config", str(TINY), "--set", "train.accelerate_profile=zero9")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: train.accelerate_profile: no profile 'zero9' "
        f"({ROOT / 'config' / 'accelerate' / 'zero9.yaml'} does not exist); choose one of: "
        "a800, cpu, cpu-multi, ddp, zero2, zero3"
    ]


def test_answer_only_logits_give_the_same_loss_and_gradients(cfg, processor, tiny_data_dir):
    """The speed/memory lever changes no math: loss and LoRA gradients equal the full-logits ones."""
    from pcbvlm.collator import keep_answer_logits

    torch.manual_seed(0)
    model = apply_lora(load_base_model(cfg), cfg)
    for module in model.modules():  # non-zero B so that gradients reach A too
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.02)
    batch = TrainCollator(processor)(load_samples(tiny_data_dir, "train")[:3])
    sliced = keep_answer_logits(batch)
    assert sliced["logits_to_keep"] < batch["input_ids"].shape[1]
    params = [p for p in model.parameters() if p.requires_grad]
    full = model(**batch).loss
    full_grads = torch.autograd.grad(full, params)
    out = model(**sliced)
    part_grads = torch.autograd.grad(out.loss, params)
    assert out.logits.shape[1] == sliced["logits_to_keep"]
    torch.testing.assert_close(out.loss, full, rtol=1e-6, atol=1e-6)
    for a, b in zip(part_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # with a normaliser from gradient accumulation (num_items_in_batch), too
    n = torch.tensor(50)
    torch.testing.assert_close(
        model(**sliced, num_items_in_batch=n).loss, model(**batch, num_items_in_batch=n).loss
    )


def test_deepspeed_configs_leave_no_size_to_guess_from_the_model_config():
    """accelerate fills these `auto` values from `model.config.hidden_size`, which Qwen3-VL's config does
    not have (it is `text_config.hidden_size`): on 2 H200s `accelerator.prepare` failed on them."""
    from pcbvlm.shapes import qwen3_vl_32b_config

    assert not hasattr(qwen3_vl_32b_config(), "hidden_size")
    for stage in (2, 3):
        zero = json.loads((ROOT / "config" / "deepspeed" / f"zero{stage}.json").read_text())[
            "zero_optimization"
        ]
        assert zero["stage"] == stage
        sized = ["reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"]
        assert all(isinstance(zero[key], int) for key in sized if key in zero), zero


def test_training_sets_expandable_segments_unless_an_allocator_setting_is_there():
    """The training job asks the CUDA allocator for expandable segments (less fragmentation: the 32B's
    all-checkpointed step fits under Unsloth's peak as a hard cap only with them); a user's own
    setting, in either variable, is kept."""
    from pcbvlm.commands.train import default_allocator_setting

    env: dict[str, str] = {}
    default_allocator_setting(env)
    assert env == {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}
    for key in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        env = {key: "max_split_size_mb:512"}
        default_allocator_setting(env)
        assert env == {key: "max_split_size_mb:512"}
