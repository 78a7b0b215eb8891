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

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pcbvlm.config import Config, write_resolved
from pcbvlm.errors import DataError, DiskGuardStop, UserError
from pcbvlm.io import atomic_directory, atomic_write_json

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"  # the output of a full-parameter run
# Files a Trainer checkpoint must hold to be resumable: these, and the weights (WEIGHT_FILES: the adapter
# of a peft model, or the whole model of a full-parameter run, in one file or sharded).
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
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


def is_complete_checkpoint(path: Path) -> bool:
    return (
        path.is_dir()
        and all((path / name).is_file() for name in CHECKPOINT_FILES)
        and any((path / name).is_file() for name in WEIGHT_FILES)
    )


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def newest_complete_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the highest step whose files are all there (a kill mid-save leaves an
    incomplete folder, which is skipped)."""
    candidates = [
        p
        for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if p.name[len(CHECKPOINT_PREFIX) :].isdigit() and is_complete_checkpoint(p)
    ]
    return max(candidates, key=checkpoint_step, default=None)


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
            if not is_complete_checkpoint(target):
                raise UserError(
                    f"RESUME={resume}: not a complete checkpoint (needs {', '.join(CHECKPOINT_FILES)} and the weights)"
                )
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


def agree_on_plan(plan: RunPlan) -> RunPlan:
    """Every process of a multi-process launch must use the main process's plan (names carry a time)."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    if state.num_processes == 1:
        return plan
    payload = [
        (str(plan.run_dir), str(plan.resume_from) if plan.resume_from else None, plan.already_finished)
    ]
    broadcast_object_list(payload, from_process=0)
    run_dir, resume_from, finished = payload[0]
    return RunPlan(Path(run_dir), Path(resume_from) if resume_from else None, finished)


# ------------------------------------------------------------------------------------------------------
# Data


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


def image_token_count(max_pixels: int, patch: int = 16, merge: int = 2) -> int:
    """Visual tokens for an image of at most max_pixels: one token per merged (patch*merge)^2 block."""
    return max(1, max_pixels // (patch * merge) ** 2)


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


def _as_trainer_callback(obj):
    from transformers import TrainerCallback

    class Adapter(TrainerCallback):
        pass

    adapter = Adapter()
    for name in ("on_train_begin", "on_log", "on_step_end"):
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
    tmp = out_path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_path)
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


def answer_logits_trainer():
    """transformers' Trainer computing logits only where the loss needs them (see keep_answer_logits)."""
    from transformers import Trainer

    from pcbvlm.collator import IGNORE_INDEX, keep_answer_logits

    class AnswerLogitsTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Qwen3-VL declares accepts_loss_kwargs=False (its forward ignores num_items_in_batch), so the
            # Trainer would average each process's (and each accumulated micro-batch's) own token mean:
            # 2 processes x micro-batch 2 would not train like 1 x 4. With this flag the Trainer counts
            # the answer tokens of the whole optimizer step (all processes, all micro-batches) and
            # compute_loss below weighs each micro-batch's mean by its share of them.
            self.model_accepts_loss_kwargs = True

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


def train(cfg: Config, resume: str = "auto") -> TrainResult:
    from accelerate import PartialState
    from transformers import set_seed

    from pcbvlm.collator import TrainCollator
    from pcbvlm.modeling import (
        apply_fused_kernels,
        apply_lora,
        ensure_model_available,
        load_base_model,
        resolve_device,
        resolve_dtype,
        trainable_parameters,
        use_fused_kernels,
    )
    from pcbvlm.processing import load_processor
    from pcbvlm.samples import load_samples

    device = resolve_device(cfg)
    # cpu=True lets a multi-process CPU launch (torchrun, gloo) form a process group without CUDA.
    state = PartialState(cpu=device == "cpu")
    is_main = state.is_main_process
    launch = launch_facts(state, device)
    if is_main:
        print(f"training on {launch['description']}", flush=True)
    data_dir = Path(cfg.paths.data_dir)
    train_rows = load_samples(data_dir, "train")
    # A run without val.jsonl (val_fraction 0) trains without eval loss.
    val_rows = load_samples(data_dir, "val") if (data_dir / "val.jsonl").is_file() else []
    if not train_rows:
        raise DataError(f"{data_dir / 'train.jsonl'}: no training samples")

    identity = run_identity(cfg, dataset_hash(data_dir))
    plan = agree_on_plan(plan_run(cfg, identity, resume))
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

    # TrainingArguments first: under DeepSpeed ZeRO-3 they set up sharded model construction.
    args = build_training_arguments(cfg, run_dir, dtype, device, has_eval=bool(val_rows))
    if is_main:
        ensure_model_available(cfg)  # builds the tiny model once, before other processes read it
    state.wait_for_everyone()
    processor = load_processor(
        ensure_model_available(cfg), cfg.data.min_pixels, cfg.data.max_pixels, cfg.model.revision
    )
    # Seed before the adapters are created: their initial weights come from the global RNG.
    set_seed(cfg.train.seed)
    model = load_base_model(cfg, device=device, dtype=dtype, zero3=deepspeed_zero_stage() == 3)
    if fused:
        apply_fused_kernels(model, fused_cross_entropy=deepspeed_zero_stage() != 3)
    if cfg.train.method == "full":
        enable_full_training(model, cfg)
    else:
        model = apply_lora(model, cfg)
    trainable, total = trainable_parameters(model)
    if is_main:
        log.info(
            "trainable parameters: %s of %s (%.3f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total
        )
    image_tokens = image_token_count(cfg.data.max_pixels)
    train_ds = to_dataset(train_rows, processor.tokenizer, image_tokens)
    val_ds = to_dataset(val_rows, processor.tokenizer, image_tokens) if val_rows else None

    resume_step = checkpoint_step(plan.resume_from) if plan.resume_from else 0
    samples_per_step = cfg.train.micro_batch * cfg.train.grad_accum * state.num_processes
    metrics = MetricsCallback(run_dir / "metrics.jsonl", samples_per_step, is_main, resume_step)
    guard = DiskGuardCallback(run_dir, cfg.train.disk_reserve_gb)
    trainer = answer_logits_trainer()(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=TrainCollator(processor),
        processing_class=processor.tokenizer,
        callbacks=[_as_trainer_callback(metrics), _as_trainer_callback(guard)],
    )
    if plan.resume_from and is_main:
        print(f"resuming {run_dir.name} from {plan.resume_from.name} (step {resume_step})", flush=True)
    begin = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
    seconds = time.perf_counter() - begin

    eval_loss = None
    if val_ds is not None and guard.triggered_free is None:
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
    elif is_main and cfg.train.method == "full":
        result.adapter_dir = save_full_model(trainer.model, processor, run_dir / MODEL_DIR)
    elif is_main:
        with atomic_directory(run_dir / ADAPTER_DIR, overwrite=True) as tmp:
            trainer.model.save_pretrained(tmp)
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
    return result


def enable_full_training(model, cfg: Config) -> None:
    """train.method full: every weight learns (no adapter); gradient checkpointing as configured."""
    for param in model.parameters():
        param.requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def save_full_model(model, processor, target: Path) -> Path:
    """The fine-tuned model of a full-parameter run as a complete model folder (weights, config, generation
    config, tokenizer with chat template, image processor), published atomically."""
    if "use_cache" in model.config.to_dict():
        model.config.use_cache = True  # switched off for training by load_base_model
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        processor.tokenizer.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)
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
