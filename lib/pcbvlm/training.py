"""The training job: QLoRA, LoRA or full-parameter fine-tuning of Qwen3-VL with transformers' Trainer.

A run lives in `<runs_dir>/<YYYYmmdd-HHMMSS>-<identity>/`, where `identity` hashes what determines the
result (model, data settings, LoRA, optimisation settings and the dataset files). `RESUME=auto` continues
the newest unfinished run of the same identity from its newest complete checkpoint; `RESUME=no` starts a
new run; `RESUME=<checkpoint or run folder>` continues that one. A finished run has `adapter/` (methods
qlora and lora) or `model/` (method full: the whole fine-tuned model with its processor files).

Each run folder holds: `config.resolved.yaml`, `manifest.json` (git commit, hashes, versions, GPU,
times), `metrics.jsonl` (loss, lr, samples/s, tokens/s, peak VRAM, ETA), `tensorboard/`, the
Trainer's `checkpoint-N/` folders (adapter + optimizer/scheduler/RNG state, no base weights),
`adapter/` at the end and `loss.png`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pcbvlm.config import Config, write_resolved
from pcbvlm.errors import DataError, DiskGuardStop, Interrupted, UserError
from pcbvlm.io import atomic_directory, atomic_write_figure, atomic_write_json
from pcbvlm.provenance import write_adapter_provenance
from pcbvlm.runs import (
    ADAPTER_DIR,
    CHECKPOINT_PREFIX,
    COMPLETE_MARKER,
    MODEL_DIR,
    RunLock,
    RunPlan,
    checkpoint_step,
    dataset_hash,
    full_model_folder,
    newest_complete_checkpoint,
    plan_run,
    run_identity,
    write_checkpoint_marker,
)

log = logging.getLogger(__name__)


def claim_run(cfg: Config, identity: str, resume: str) -> tuple[RunPlan, RunLock | None]:
    """The main process plans the run and locks its folder; every process of a multi-process launch gets
    that plan (names carry a time) or the main process's error, so that all stop together."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    plan: RunPlan | None = None
    lock: RunLock | None = None
    error: UserError | None = None
    if state.is_main_process:
        try:
            plan = plan_run(cfg, identity, resume)
            if not plan.already_finished:
                lock = RunLock(plan.run_dir).acquire()
        except UserError as err:
            error = err
    if state.num_processes > 1:
        payload = [(plan, error)]
        broadcast_object_list(payload, from_process=0)
        plan, error = payload[0]
    if error is not None:
        raise error
    assert plan is not None
    return plan, lock


# ------------------------------------------------------------------------------------------------------
# Data


def training_samples(cfg: Config) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The train and val samples of paths.data_dir (val empty without val.jsonl: no eval loss), their
    answers written in the configured model family's coordinates, whichever family `make data` wrote
    them for (Qwen3-VL: 0-1000 relative; Qwen2.5-VL: pixels of the resized image)."""
    from pcbvlm.modeling import model_family
    from pcbvlm.samples import load_samples, set_answers

    data_dir = Path(cfg.paths.data_dir)
    train_rows = load_samples(data_dir, "train")
    val_rows = load_samples(data_dir, "val") if (data_dir / "val.jsonl").is_file() else []
    if not train_rows:
        raise DataError(f"{data_dir / 'train.jsonl'}: no training samples")
    family = model_family(cfg)
    set_answers(train_rows, cfg.data, family)
    set_answers(val_rows, cfg.data, family)
    return train_rows, val_rows


def to_dataset(rows: list[dict[str, Any]], tokenizer, image_tokens: int):
    """A `datasets.Dataset` with the chat as JSON text and an approximate token length per sample
    (image tokens + answer tokens), which length-grouped sampling uses to batch similar lengths."""
    import datasets

    from pcbvlm.collator import image_paths, split_messages

    records = []
    for row in rows:
        prompt_turns, answer = split_messages(row["messages"])
        length = image_tokens * len(image_paths(prompt_turns)) + len(tokenizer(answer)["input_ids"])
        records.append(
            {"id": str(row.get("id", "")), "messages": json.dumps(row["messages"]), "length": length}
        )
    return datasets.Dataset.from_list(records)


# ------------------------------------------------------------------------------------------------------
# Callbacks


def _peak_vram_gib() -> float | None:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return None


class MetricsCallback:
    """Appends one JSON line per log event to metrics.jsonl: loss, lr, samples/s, tokens/s, VRAM, ETA."""

    def __init__(self, path: Path, samples_per_step: int, is_main: bool, resume_step: int = 0):
        self.path = path
        self.samples_per_step = samples_per_step
        self.is_main = is_main
        self.last_time: float | None = None
        self.last_step = resume_step
        self.last_tokens = 0
        self.start_time: float | None = None
        self.start_step = resume_step
        if is_main and resume_step and path.is_file():
            # Drop what was logged after the checkpoint we resume from: those steps run again.
            kept = [
                line
                for line in path.read_text().splitlines()
                if json.loads(line).get("step", 0) <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept))

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_time = self.last_time = time.perf_counter()
        self.last_tokens = state.num_input_tokens_seen or 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.is_main or logs is None:
            return
        now = time.perf_counter()
        record: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
        if "loss" in logs and self.last_time is not None and state.global_step > self.last_step:
            elapsed = now - self.last_time
            steps = state.global_step - self.last_step
            tokens = (state.num_input_tokens_seen or 0) - self.last_tokens
            record["samples_per_s"] = round(steps * self.samples_per_step / elapsed, 4)
            record["tokens_per_s"] = round(tokens / elapsed, 2)
            total_elapsed = now - (self.start_time or now)
            done = max(1, state.global_step - self.start_step)
            record["eta_s"] = round(total_elapsed / done * max(0, state.max_steps - state.global_step), 1)
            self.last_time, self.last_step, self.last_tokens = (
                now,
                state.global_step,
                state.num_input_tokens_seen or 0,
            )
        record["peak_vram_gib"] = _peak_vram_gib()
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


class DiskGuardCallback:
    """Saves and stops cleanly when the checkpoint volume has less free space than the reserve."""

    def __init__(self, path: Path, reserve_gb: float):
        self.path = path
        self.reserve_bytes = reserve_gb * 1e9
        self.triggered_free: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        free = shutil.disk_usage(self.path).free
        if free < self.reserve_bytes:
            self.triggered_free = free
            control.should_save = True
            control.should_training_stop = True
        return control


class CheckpointMarkerCallback:
    """Marks each checkpoint complete (COMPLETE_MARKER) once the Trainer has saved all of it: on_save runs
    after the adapter, optimizer, scheduler, RNG and trainer state are written."""

    def __init__(self, is_main: bool):
        self.is_main = is_main

    def on_step_end(self, args, state, control, **kwargs):
        # A save into a folder that already holds a checkpoint of this step (a resume from an older one)
        # overwrites it: its old marker goes first, so that a kill mid-overwrite cannot leave it claiming
        # complete. Runs after the callbacks that decide to save (DefaultFlowCallback, disk guard, signals).
        if self.is_main and control.should_save:
            marker = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}" / COMPLETE_MARKER
            marker.unlink(missing_ok=True)
        return control

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # every process has written its RNG state
        if self.is_main:
            folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            if folder.is_dir():
                write_checkpoint_marker(folder, state.global_step)
        return control


def _on_any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on one (all must stop after the same step)."""
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=state.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class StopOnSignalCallback:
    """SIGINT / SIGTERM (Ctrl-C, `docker stop`, a scheduler's preemption) finish the current optimizer step,
    save a checkpoint and stop; a second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # the second signal: no more waiting
            self.uninstall()
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(
            f"{self.received}: saving a checkpoint after this step, then stopping",
            file=sys.stderr,
            flush=True,
        )

    def on_step_end(self, args, state, control, **kwargs):
        if _on_any_process(self.received is not None):
            self.received = self.received or "a signal to another process"
            control.should_save = True
            control.should_training_stop = True
        return control


def _as_trainer_callback(obj):
    from transformers import TrainerCallback

    class Adapter(TrainerCallback):
        pass

    adapter = Adapter()
    for name in ("on_train_begin", "on_log", "on_step_end", "on_save"):
        if hasattr(obj, name):
            setattr(adapter, name, getattr(obj, name))
    return adapter


# ------------------------------------------------------------------------------------------------------
# Manifest, plot, summary


def git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True
            ).stdout.strip()
        )
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def gpu_facts() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"count": 0, "device": "cpu"}
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return {
        "count": len(props),
        "names": [p.name for p in props],
        "compute_capability": [f"{p.major}.{p.minor}" for p in props],
        "total_gib": [round(p.total_memory / 2**30, 1) for p in props],
        "cuda": torch.version.cuda,
    }


def plot_loss(metrics_path: Path, out_path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.is_file():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="#1f77b4")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss (val)", color="#d62728")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title(metrics_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write_figure(fig, out_path)
    plt.close(fig)
    return out_path


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path | None
    status: str
    global_step: int = 0
    resumed_from: str | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    seconds: float = 0.0
    samples_per_s: float | None = None
    peak_vram_gib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------
# The job


def _epoch_seeded_length_sampler():
    from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

    class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
        """transformers' length-grouped order, shuffled by a generator seeded with (seed, epoch) instead of
        the global RNG. The global RNG at the start of a later epoch differs between an uninterrupted run and
        a resumed one (the resume draws the skipped epoch's order from a fresh RNG, then restores the
        checkpoint's), so with it a resume across an epoch boundary saw other batches. The Trainer (through
        accelerate's DataLoaderShard) calls set_epoch before each epoch, the skipped one included."""

        def __init__(self, batch_size: int, lengths: list[int], seed: int):
            super().__init__(batch_size, lengths=lengths)
            self.seed = seed
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))

    return EpochSeededLengthGroupedSampler


def answer_logits_trainer():
    """transformers' Trainer computing logits only where the loss needs them (see keep_answer_logits)."""
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from pcbvlm.collator import IGNORE_INDEX, keep_answer_logits

    EpochSeededLengthGroupedSampler = _epoch_seeded_length_sampler()

    class AnswerLogitsTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Qwen3-VL declares accepts_loss_kwargs=False (its forward ignores num_items_in_batch), so the
            # Trainer would average each process's (and each accumulated micro-batch's) own token mean:
            # 2 processes x micro-batch 2 would not train like 1 x 4. With this flag the Trainer counts
            # the answer tokens of the whole optimizer step (all processes, all micro-batches) and
            # compute_loss below weighs each micro-batch's mean by its share of them.
            self.model_accepts_loss_kwargs = True

        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, LengthGroupedSampler):
                return EpochSeededLengthGroupedSampler(
                    sampler.batch_size,
                    lengths=sampler.lengths,
                    seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
                )
            return sampler

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = keep_answer_logits(inputs)
            if num_items_in_batch is None:  # evaluation
                return super().compute_loss(model, inputs, return_outputs)
            outputs = model(**inputs)
            local_tokens = (inputs["labels"][..., 1:] != IGNORE_INDEX).sum()
            loss = outputs.loss * local_tokens / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP / DeepSpeed average the gradients
            return (loss, outputs) if return_outputs else loss

    return AnswerLogitsTrainer


def _restore_indexed_cpu(obj, location: str):
    return obj if location.startswith("cpu:") else None


def allow_indexed_cpu_map_location() -> None:
    """Let `torch.load(..., map_location="cpu:0")` load onto the CPU.

    Several CPU processes (gloo) get the device `cpu:0` from accelerate, and on resume the Trainer loads
    the optimizer state with `map_location=args.device`, which torch cannot restore to ("don't know how
    to restore data location ... (tagged with cpu:0)"): resuming a `cpu-multi` run failed. An indexed
    CPU location is the CPU. Registered once per process (torch keeps a list of location handlers)."""
    global _INDEXED_CPU_REGISTERED
    if not _INDEXED_CPU_REGISTERED:
        torch.serialization.register_package(100, lambda obj: None, _restore_indexed_cpu)
        _INDEXED_CPU_REGISTERED = True


_INDEXED_CPU_REGISTERED = False


def deepspeed_zero_stage() -> int | None:
    """ZeRO stage when launched by accelerate with a DeepSpeed config, else None."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage:
        return int(stage)
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and Path(config_file).is_file():
        return int(json.loads(Path(config_file).read_text()).get("zero_optimization", {}).get("stage", 0))
    return None


def launch_facts(state, device: str) -> dict[str, Any]:
    """How many processes (and GPUs) this run uses, and how they talk: logged at start and kept in the
    manifest, so a run launched with the wrong accelerate profile is visible at once."""
    processes = state.num_processes
    gpus = processes if device == "cuda" else 0
    zero = deepspeed_zero_stage()
    backend = state.backend or ("gloo" if processes > 1 else None)
    how = f"DeepSpeed ZeRO-{zero}" if zero is not None else ("DDP" if processes > 1 else "single process")
    where = f"{gpus} GPU{'s' if gpus != 1 else ''}" if gpus else "CPU"
    return {
        "processes": processes,
        "gpus": gpus,
        "distributed": how,
        "backend": backend,
        "zero_stage": zero,
        "description": f"{processes} process{'es' if processes != 1 else ''} ({where}, {how}"
        + (f", {backend}" if processes > 1 and backend else "")
        + ")",
    }


def build_training_arguments(cfg: Config, run_dir: Path, dtype: torch.dtype, device: str, has_eval: bool):
    from transformers import TrainingArguments

    zero_stage = deepspeed_zero_stage()
    kwargs: dict[str, Any] = {}
    if zero_stage is not None:
        kwargs["deepspeed"] = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=cfg.train.micro_batch,
        per_device_eval_batch_size=cfg.train.micro_batch,
        gradient_accumulation_steps=cfg.train.grad_accum,
        learning_rate=cfg.train.lr,
        lr_scheduler_type=cfg.train.lr_scheduler,
        warmup_steps=cfg.train.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm,
        num_train_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps,
        bf16=dtype == torch.bfloat16 and device == "cuda",
        fp16=dtype == torch.float16 and device == "cuda",
        logging_steps=cfg.train.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.train.eval_steps,
        save_strategy="steps",
        save_steps=cfg.train.save_steps,
        save_total_limit=cfg.train.save_total_limit,
        report_to=["tensorboard"],
        seed=cfg.train.seed,
        data_seed=cfg.train.seed,
        dataloader_num_workers=cfg.train.num_workers,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if cfg.train.group_by_length else "random",
        length_column_name="length",
        include_num_input_tokens_seen=True,
        use_cpu=device == "cpu",
        ddp_find_unused_parameters=False,
        prediction_loss_only=True,
        label_names=["labels"],
        **kwargs,
    )


@dataclass
class _RunRecord:
    """What `train` must settle however it ends: the run's lock, and a manifest still saying "running"."""

    lock: RunLock | None = None
    manifest_path: Path | None = None
    manifest: dict[str, Any] | None = None
    stopper: StopOnSignalCallback = field(default_factory=StopOnSignalCallback)

    def settle(self, err: BaseException | None) -> None:
        self.stopper.uninstall()
        if err is not None and self.manifest is not None and self.manifest.get("status") == "running":
            interrupted = isinstance(err, KeyboardInterrupt)
            self.manifest.update(
                end=datetime.now(UTC).isoformat(timespec="seconds"),
                status="interrupted" if interrupted else "failed",
                error=None if interrupted else _one_line_error(err),
            )
            atomic_write_json(self.manifest_path, self.manifest)
        if self.lock is not None:
            self.lock.release()


def _one_line_error(err: BaseException) -> str:
    text = str(err).strip()
    return text if isinstance(err, UserError) else f"{type(err).__name__}: {text}"


def _from_worker(err: UserError) -> UserError:
    """A UserError raised in a DataLoader worker comes back with the worker's traceback as its message;
    keep its own last line, so that the job still prints one line."""
    text = str(err)
    if "Original Traceback" not in text:
        return err
    last = text.strip().splitlines()[-1]
    clean = type(err)(last.split(": ", 1)[1] if ": " in last else last)
    clean.__cause__ = None
    return clean


def train(cfg: Config, resume: str = "auto") -> TrainResult:
    """Train (or resume) a run; a run that fails or is interrupted says so in its manifest."""
    record = _RunRecord()
    try:
        result = _train(cfg, resume, record)
    except UserError as err:
        err = _from_worker(err)
        record.settle(err)
        raise err from None
    except BaseException as err:
        record.settle(err)
        raise
    record.settle(None)
    return result


def _train(cfg: Config, resume: str, record: _RunRecord) -> TrainResult:
    from accelerate import PartialState
    from transformers import set_seed

    from pcbvlm.collator import TrainCollator
    from pcbvlm.layer_compile import check_compilable, compile_decoder_layers, compiled_layers
    from pcbvlm.modeling import (
        apply_fused_kernels,
        apply_lora,
        decoder_layers,
        ensure_model_available,
        load_base_model,
        model_family,
        resolve_device,
        resolve_dtype,
        trainable_parameters,
        use_fused_kernels,
    )

    device = resolve_device(cfg)
    if cfg.train.compile_layers:
        if deepspeed_zero_stage() == 3:
            raise UserError(
                "train.compile_layers: not with DeepSpeed ZeRO-3 (its parameter gathering runs inside the "
                "layers); set train.compile_layers=false or use another accelerate profile"
            )
        check_compilable(device)
    # cpu=True lets a multi-process CPU launch (torchrun, gloo) form a process group without CUDA.
    state = PartialState(cpu=device == "cpu")
    if state.device.type == "cpu" and state.device.index is not None:
        allow_indexed_cpu_map_location()
    is_main = state.is_main_process
    launch = launch_facts(state, device)
    if is_main:
        print(f"training on {launch['description']}", flush=True)
    data_dir = Path(cfg.paths.data_dir)
    train_rows, val_rows = training_samples(cfg)
    family = model_family(cfg)

    identity = run_identity(cfg, dataset_hash(data_dir))
    plan, record.lock = claim_run(cfg, identity, resume)
    if plan.already_finished:
        output = full_model_folder(plan.run_dir) or plan.run_dir / ADAPTER_DIR
        return TrainResult(plan.run_dir, output, "already finished")
    run_dir = plan.run_dir
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_resolved(cfg, run_dir)
    state.wait_for_everyone()
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("resources.device: cuda requested but no GPU is visible")
    dtype = resolve_dtype(cfg, device)
    fused = use_fused_kernels(cfg, device)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    manifest: dict[str, Any] = {
        "run": run_dir.name,
        "identity": identity,
        "config_digest": cfg.digest(),
        "dataset": {
            "dir": str(data_dir),
            "hash": dataset_hash(data_dir),
            "train": len(train_rows),
            "val": len(val_rows),
        },
        "git": git_commit(),
        "packages": package_versions(),
        "gpu": gpu_facts(),
        "world_size": state.num_processes,
        "launch": launch,
        "dtype": str(dtype).removeprefix("torch."),
        "fused_kernels": "liger" if fused else "none",
        "start": started,
        "end": None,
        "status": "running",
        "resumed_from": str(plan.resume_from) if plan.resume_from else None,
    }
    manifest_path = run_dir / "manifest.json"
    if is_main:
        previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        manifest["first_start"] = previous.get("first_start", started)
        atomic_write_json(manifest_path, manifest)
        record.manifest_path, record.manifest = manifest_path, manifest
    # From here on a signal lets the run save and stop (after its first step, if it comes during loading).
    record.stopper.install()

    # TrainingArguments first: under DeepSpeed ZeRO-3 they set up sharded model construction.
    args = build_training_arguments(cfg, run_dir, dtype, device, has_eval=bool(val_rows))
    if is_main:
        ensure_model_available(cfg)  # builds the tiny model once, before other processes read it
    state.wait_for_everyone()
    processor = family.load_processor(cfg, ensure_model_available(cfg), cfg.model.revision)
    # Seed before the adapters are created: their initial weights come from the global RNG.
    set_seed(cfg.train.seed)
    model = load_base_model(cfg, device=device, dtype=dtype, zero3=deepspeed_zero_stage() == 3)
    if fused:
        apply_fused_kernels(
            model,
            fused_cross_entropy=deepspeed_zero_stage() != 3,
            swiglu=cfg.train.fused_swiglu,
            in_layers=not cfg.train.compile_layers,
        )
    layers = decoder_layers(model)
    if cfg.train.fast_dequant and cfg.train.quantization == "nf4" and device == "cuda":
        from pcbvlm.nf4_dequant import install

        if install() and is_main:
            log.info("NF4 weights dequantized by pcbvlm.nf4_dequant (train.fast_dequant)")
    if cfg.train.method == "full":
        enable_full_training(model, cfg)
    else:
        model = apply_lora(
            model,
            cfg,
            fused_lora=cfg.train.fused_lora,
            skip_down_proj_recompute=cfg.train.skip_down_proj_recompute,
        )
        if model.pcbvlm_down_proj_skips and is_main:
            log.info("down_proj not recomputed in %d checkpointed layers", model.pcbvlm_down_proj_skips)
    if cfg.train.compile_layers:
        # after the adapters and checkpointing are in place: the compiled code traces what they call
        compile_decoder_layers(layers)
    trainable, total = trainable_parameters(model)
    if is_main:
        log.info(
            "trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total
        )
    image_tokens = family.image_tokens(cfg.data.max_pixels)
    train_ds = to_dataset(train_rows, processor.tokenizer, image_tokens)
    val_ds = to_dataset(val_rows, processor.tokenizer, image_tokens) if val_rows else None

    resume_step = checkpoint_step(plan.resume_from) if plan.resume_from else 0
    samples_per_step = cfg.train.micro_batch * cfg.train.grad_accum * state.num_processes
    metrics = MetricsCallback(run_dir / "metrics.jsonl", samples_per_step, is_main, resume_step)
    guard = DiskGuardCallback(run_dir, cfg.train.disk_reserve_gb)
    stopper = record.stopper
    trainer = answer_logits_trainer()(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=TrainCollator(processor, family.end_of_answer),
        processing_class=processor.tokenizer,
        callbacks=[
            _as_trainer_callback(metrics),
            _as_trainer_callback(guard),
            _as_trainer_callback(stopper),
            _as_trainer_callback(CheckpointMarkerCallback(is_main)),
        ],
    )
    if plan.resume_from and is_main:
        print(f"resuming {run_dir.name} from {plan.resume_from.name} (step {resume_step})", flush=True)
    begin = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
    except BaseException:
        _close_progress_bars(trainer)  # else the bar is redrawn after the error line at exit
        raise
    stopper.uninstall()
    seconds = time.perf_counter() - begin
    stopped_early = guard.triggered_free is not None or stopper.received is not None
    offload = getattr(model, "pcbvlm_checkpoint_offload", None)
    if offload is not None and is_main:  # train.offload_checkpoints: what went through host memory
        log.info(
            "checkpointed layer inputs offloaded to CPU memory: %d copies, %.2f GiB",
            offload.packed,
            offload.packed_bytes / 2**30,
        )
    if cfg.train.compile_layers and is_main:  # one graph serves every layer; more only for new shapes
        log.info(
            "compiled decoder layers: %d of %d, %d graphs compiled",
            compiled_layers(layers),
            len(layers),
            torch._dynamo.utils.counters["stats"]["unique_graphs"],
        )

    eval_loss = None
    if val_ds is not None and not stopped_early:
        eval_loss = trainer.evaluate().get("eval_loss")
    result = TrainResult(
        run_dir=run_dir,
        adapter_dir=None,
        status="finished",
        global_step=trainer.state.global_step,
        resumed_from=str(plan.resume_from) if plan.resume_from else None,
        train_loss=_last_train_loss(trainer.state.log_history) or output.training_loss,
        eval_loss=eval_loss,
        seconds=seconds,
        samples_per_s=round((trainer.state.global_step - resume_step) * samples_per_step / seconds, 4)
        if seconds
        else None,
        peak_vram_gib=_peak_vram_gib(),
    )
    if guard.triggered_free is not None:
        result.status = "stopped by disk guard"
    elif stopper.received is not None:
        result.status = "interrupted"
    elif is_main and cfg.train.method == "full":
        result.adapter_dir = save_full_model(trainer.model, processor, run_dir / MODEL_DIR)
    elif is_main:
        with atomic_directory(run_dir / ADAPTER_DIR, overwrite=True) as tmp:
            trainer.model.save_pretrained(tmp)
            write_adapter_provenance(tmp, run_dir.name)  # run id + adapter hash, for merge and MODEL=auto
        result.adapter_dir = run_dir / ADAPTER_DIR
    state.wait_for_everyone()

    if is_main:
        manifest.update(
            end=datetime.now(UTC).isoformat(timespec="seconds"),
            status=result.status,
            global_step=result.global_step,
            train_loss=result.train_loss,
            eval_loss=result.eval_loss,
            seconds=round(seconds, 2),
            samples_per_s=result.samples_per_s,
            peak_vram_gib=result.peak_vram_gib,
            trainable_parameters=trainable,
        )
        atomic_write_json(manifest_path, manifest)
        plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")

    if guard.triggered_free is not None:
        checkpoint = newest_complete_checkpoint(run_dir)
        raise DiskGuardStop(
            f"free space on the checkpoint volume ({run_dir}) is {guard.triggered_free / 1e9:.1f} GB, below "
            f"train.disk_reserve_gb={cfg.train.disk_reserve_gb:g}: saved {checkpoint.name if checkpoint else 'nothing'} "
            f"at step {result.global_step} and stopped; free space and run `make train` again to resume"
        )
    if stopper.received is not None:
        checkpoint = newest_complete_checkpoint(run_dir)
        raise Interrupted(
            f"{stopper.received}: saved {checkpoint.name if checkpoint else 'nothing'} at step "
            f"{result.global_step} and stopped; run `make train` again to resume {run_dir.name}"
        )
    return result


def _close_progress_bars(trainer) -> None:
    from transformers.trainer_callback import ProgressCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback):
            for bar in (callback.training_bar, callback.prediction_bar):
                if bar is not None:
                    bar.close()
            callback.training_bar = callback.prediction_bar = None


def enable_full_training(model, cfg: Config) -> None:
    """train.method full: every weight learns (no adapter); gradient checkpointing as configured."""
    for param in model.parameters():
        param.requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.train.offload_checkpoints:
            from pcbvlm.modeling import decoder_layers
            from pcbvlm.offload import offload_checkpointed_inputs

            model.pcbvlm_checkpoint_offload = offload_checkpointed_inputs(decoder_layers(model))


def save_full_model(model, processor, target: Path) -> Path:
    """The fine-tuned model of a full-parameter run as a complete model folder (weights, config, generation
    config, tokenizer with chat template, image processor, provenance), published atomically."""
    if "use_cache" in model.config.to_dict():
        model.config.use_cache = True  # switched off for training by load_base_model
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        processor.tokenizer.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)
        write_adapter_provenance(tmp, target.parent.name)  # run id + weights hash, for merge and MODEL=auto
    return target


def _last_train_loss(history: list[dict[str, Any]]) -> float | None:
    losses = [h["loss"] for h in history if "loss" in h]
    return losses[-1] if losses else None


def print_summary(result: TrainResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"training: {result.status}", show_header=False)
    rows = [
        ("run", str(result.run_dir)),
        ("adapter / model", str(result.adapter_dir) if result.adapter_dir else "-"),
        ("resumed from", result.resumed_from or "-"),
        ("steps", str(result.global_step)),
        ("last train loss", f"{result.train_loss:.4f}" if result.train_loss is not None else "-"),
        ("eval loss (val)", f"{result.eval_loss:.4f}" if result.eval_loss is not None else "-"),
        ("time", f"{result.seconds:.1f} s"),
        ("samples/s", f"{result.samples_per_s:.3f}" if result.samples_per_s else "-"),
        ("peak VRAM", f"{result.peak_vram_gib:.2f} GiB" if result.peak_vram_gib is not None else "- (CPU)"),
        ("loss curve", str(result.run_dir / "loss.png") if (result.run_dir / "loss.png").is_file() else "-"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
