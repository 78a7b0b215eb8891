"""Several GPUs: training speed and memory of the Qwen3-VL-32B shape under the accelerate profiles.

`pcbvlm bench-multi --profiles ddp,zero2,zero3` launches, for each profile, the worker
(`python -m pcbvlm.commands.bench_multi_gpu --worker`) through `accelerate launch --config_file config/accelerate/<profile>.yaml`
(`pcbvlm.launch`), the way `make train` launches the training job. Each process builds the random
32B NF4 model once (`pcbvlm.bench.build_random_model`, the same weights on every rank: same seed) under
the memory cap, and then:

1. (ddp only, `--single`) times the configured setting on its own GPU with `pcbvlm.bench.time_training`,
   no communication at all: the 1-GPU baseline, measured on both GPUs at once;
2. wraps LoRA model and fused AdamW with `accelerator.prepare` (DDP, or a DeepSpeed engine with the
   profile's `config/deepspeed/zero{2,3}.json`), times `steps` optimizer steps after a warm-up step at the
   configured micro-batch (global batch = micro-batch x processes), and reads each GPU's peak memory;
3. tries larger micro-batches, one step each, ascending, until the first that runs out of memory under
   the cap: the largest micro-batch the profile fits. The search stops at the first failure on any rank
   (a process that ran out of memory leaves its collectives unfinished, so nothing more is asked of it).

Each rank writes its own part (`<out>.<profile>.rank<N>.json`): after an out-of-memory error, ranks may
not be able to agree on anything, so the driver merges the parts.

ZeRO-3: the model is built before the Accelerator (so outside `deepspeed.zero.Init`), the 4-bit weights
are stored in bf16 elements (`quant_storage`, as `pcbvlm.modeling` does) so that DeepSpeed can shard them, and Liger's fused cross-entropy is off (it reads lm_head's weight outside
lm_head's forward, where ZeRO-3 has not gathered it).
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PROFILES = ("ddp", "zero2", "zero3")


def _device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def time_distributed(
    accelerator,
    model,
    cfg,
    processor,
    sample: dict[str, Any],
    setting,
    steps: int,
    search: list[int],
    zero_stage: int | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Steps of the configured setting under `accelerator` (DDP or DeepSpeed), then the micro-batch search."""
    from pcbvlm.bench import FusedKernels
    from pcbvlm.collator import TrainCollator, keep_answer_logits
    from pcbvlm.modeling import apply_lora, decoder_layers

    device = accelerator.device
    world = accelerator.num_processes
    if setting.fused_kernels:
        FusedKernels(model, fused_cross_entropy=zero_stage != 3).__enter__()  # the process ends after this
    cfg = cfg.model_copy(deep=True)
    cfg.lora.dropout = setting.lora_dropout
    peft_model = apply_lora(
        model,
        cfg,
        gradient_checkpointing=setting.gradient_checkpointing,
        uncheckpointed_layers=min(setting.uncheckpointed_layers, len(decoder_layers(model))),
        cast_lora_inputs=setting.cast_lora_inputs,
    )
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    lora_parameters = sum(p.numel() for p in params)  # before ZeRO-3 partitions them
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    if zero_stage is not None:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = setting.micro_batch
        ds_config["gradient_accumulation_steps"] = 1
        # "bf16": "auto" follows accelerate's mixed_precision, which a profile with a DeepSpeed file
        # may not set (the training job's TrainingArguments fill it instead): bf16 as the job computes.
        ds_config["bf16"] = {"enabled": device.type == "cuda"}
    engine, optimizer = accelerator.prepare(peft_model, optimizer)
    collator = TrainCollator(processor)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def make_batch(micro_batch: int) -> dict[str, torch.Tensor]:
        batch = collator([sample] * micro_batch)
        batch = {k: v.to(device) for k, v in batch.items()}
        return keep_answer_logits(batch) if setting.answer_logits else batch

    def step(batch) -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = engine(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    result: dict[str, Any] = {
        "setting": setting.__dict__,
        "processes": world,
        "zero_stage": zero_stage,
        "lora_parameters": lora_parameters,
    }
    batch = make_batch(setting.micro_batch)
    result["tokens_per_sample"] = int(batch["attention_mask"][0].sum())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step(batch)  # warm-up
        _device_sync(device)
        begin = time.perf_counter()
        losses = [step(batch) for _ in range(steps)]
        _device_sync(device)
        seconds = time.perf_counter() - begin
        samples = steps * setting.micro_batch * world
        result.update(
            status="ok",
            samples_per_s=round(samples / seconds, 3),
            s_per_sample=round(seconds / samples, 4),
            step_s=round(seconds / steps, 3),
            peak_gib=_peak_gib(device),
            loss=round(losses[-1], 4),
        )
    except Exception as exc:
        result.update(status=_failure(exc), peak_gib=_peak_gib(device))
        log(traceback.format_exc(limit=8))
        return result
    log(f"{result}")

    fits = {setting.micro_batch: result["peak_gib"]}
    result["micro_batch_search"] = trials = []
    del batch
    for micro_batch in search:
        if micro_batch <= setting.micro_batch:
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        trial: dict[str, Any] = {"micro_batch": micro_batch}
        try:
            begin = time.perf_counter()
            step(make_batch(micro_batch))
            _device_sync(device)
            trial.update(
                status="ok", step_s=round(time.perf_counter() - begin, 2), peak_gib=_peak_gib(device)
            )
            fits[micro_batch] = trial["peak_gib"]
        except Exception as exc:
            trial.update(status=_failure(exc), peak_gib=_peak_gib(device))
            trials.append(trial)
            log(f"micro-batch {micro_batch}: {trial['status']}")
            break
        trials.append(trial)
        log(f"micro-batch {micro_batch}: {trial}")
    result["largest_micro_batch_fitting"] = max(fits)
    return result


def _failure(exc: BaseException) -> str:
    if _is_oom(exc):
        return "out of memory under the cap"
    return f"failed: {type(exc).__name__}: {str(exc)[:300]}"


def worker(
    profile: str,
    out_prefix: Path,
    layers: int | None,
    steps: int,
    cap_gib: float,
    search: list[int],
    single: bool,
    tiny: bool = False,
) -> dict[str, Any]:
    """One process of a profile's launch: build the model, time, write `<out_prefix>.<profile>.rank<N>.json`."""
    from accelerate import Accelerator, PartialState

    from pcbvlm.bench import (
        benchmark_model_config,
        benchmark_processor,
        benchmark_sample,
        build_random_model,
        configured_setting,
        gib,
        time_training,
    )
    from pcbvlm.config import load_config
    from pcbvlm.io import atomic_write_json
    from pcbvlm.launch import ROOT
    from pcbvlm.training import deepspeed_zero_stage

    zero_stage = deepspeed_zero_stage()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    cfg = load_config(ROOT / "config" / "config.yaml")
    processor = benchmark_processor(cfg.data.max_pixels)
    if tiny:  # a CPU rehearsal of the whole flow with the tiny model's shape
        from pcbvlm.tiny import tiny_config

        config = tiny_config(len(processor.tokenizer), processor.tokenizer)
        if layers:
            config.text_config.num_hidden_layers = layers
    else:
        config = benchmark_model_config(processor.tokenizer, layers)
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same random weights on every rank (DDP and DeepSpeed broadcast rank 0's)
    begin = time.perf_counter()
    # Built before the Accelerator exists: under a ZeRO-3 profile, `Accelerator()` makes transformers
    # build every sub-model made by `from_config` (Qwen3-VL's vision tower and language model) inside
    # `deepspeed.zero.Init`, which leaves each parameter an empty shard, and the NF4 quantization that
    # follows then launches bitsandbytes kernels on empty weights (`invalid argument` at ops.cu:74, the
    # first ZeRO-3 attempt). accelerate's `zero3_init_context_manager(enable=False)` does not help
    # (accelerate 1.15 re-registers the same stage-3 config). The training job is not affected:
    # `from_pretrained` with a quantization config never uses `zero.Init`; like it, the benchmark
    # builds the whole model on every rank and `accelerator.prepare` (DeepSpeed) partitions it.
    model = build_random_model(
        config,
        dtype=torch.bfloat16 if cuda else torch.float32,
        quantize=cuda,
        device=device,
        quant_storage=torch.bfloat16 if zero_stage == 3 else torch.uint8,
    )
    # The process group first (gloo on the CPU, as the training job does), then the Accelerator with
    # the profile's DeepSpeed plugin: `Accelerator(cpu=True)` would drop the plugin.
    PartialState(cpu=not cuda)
    accelerator = Accelerator()
    assert accelerator.device.type == device.type and (not cuda or accelerator.device == device)
    rank, world = accelerator.process_index, accelerator.num_processes

    def log(message: str) -> None:
        print(f"[{profile} rank {rank}/{world}] {message}", flush=True)

    build_s = time.perf_counter() - begin
    weights_gib = gib(torch.cuda.memory_allocated(device)) if cuda else None
    log(f"built the model in {build_s:.0f} s ({weights_gib} GiB)")
    if cuda:
        props = torch.cuda.get_device_properties(device)
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / props.total_memory), device)
    setting = configured_setting(cfg)
    setting.profile = False
    if not cuda:  # no Liger, tiny batches on the CPU
        setting.fused_kernels = False
        setting.micro_batch = 2
        setting.uncheckpointed_layers = min(setting.uncheckpointed_layers, 1)
    work = out_prefix.parent / f"{out_prefix.name}-work-{profile}-{rank}"
    work.mkdir(parents=True, exist_ok=True)
    sample = benchmark_sample(work, cfg)
    part: dict[str, Any] = {
        "profile": profile,
        "rank": rank,
        "processes": world,
        "zero_stage": zero_stage,
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
        "layers": config.text_config.num_hidden_layers,
        "cap_gib": cap_gib,
        "model_gib": weights_gib,
        "build_s": round(build_s, 1),
        "torch": torch.__version__,
    }
    part_path = Path(f"{out_prefix}.{profile}.rank{rank}.json")
    if single and cuda:
        part["single_gpu"] = time_training(model, cfg, processor, sample, setting, steps, log)
        atomic_write_json(part_path, part)
    part["distributed"] = time_distributed(
        accelerator, model, cfg, processor, sample, setting, steps, search, zero_stage, log
    )
    atomic_write_json(part_path, part)
    log(f"wrote {part_path}")
    return part


def merge_parts(out_prefix: Path, profiles: list[str], launches: dict[str, Any]) -> dict[str, Any]:
    """One results document from the ranks' parts: per profile the samples/s, per-GPU peaks, the largest
    micro-batch that fits on every GPU; the 1-GPU baseline; scaling efficiency against it."""
    merged: dict[str, Any] = {"profiles": {}, "launches": launches}
    single: list[dict[str, Any]] = []
    for profile in profiles:
        parts = [
            json.loads(p.read_text())
            for p in sorted(out_prefix.parent.glob(f"{out_prefix.name}.{profile}.rank*.json"))
        ]
        if not parts:
            merged["profiles"][profile] = {"status": "no result (see the launch's exit code and log)"}
            continue
        for key in ("gpu", "layers", "cap_gib", "model_gib", "torch"):
            merged.setdefault(key, parts[0][key])
        dist = [p.get("distributed", {}) for p in parts]
        single += [p["single_gpu"] for p in parts if p.get("single_gpu", {}).get("status") == "ok"]
        statuses = {d.get("status", "missing") for d in dist}
        entry: dict[str, Any] = {
            "processes": parts[0]["processes"],
            "zero_stage": parts[0]["zero_stage"],
            "layers": parts[0]["layers"],
            "status": "ok" if statuses == {"ok"} else "; ".join(sorted(statuses)),
            "peak_gib_per_gpu": [d.get("peak_gib") for d in dist],
            "model_gib_per_gpu": [p.get("model_gib") for p in parts],
        }
        if entry["status"] == "ok":
            entry.update(
                samples_per_s=dist[0]["samples_per_s"],
                step_s=max(d["step_s"] for d in dist),
                micro_batch=dist[0]["setting"]["micro_batch"],
                tokens_per_sample=dist[0]["tokens_per_sample"],
                loss=dist[0]["loss"],
                largest_micro_batch_fitting=min(d["largest_micro_batch_fitting"] for d in dist),
                micro_batch_search=[d.get("micro_batch_search") for d in dist],
            )
        entry["parts"] = parts
        merged["profiles"][profile] = entry
    if single:
        merged["single_gpu"] = {
            "samples_per_s_per_gpu": [s["samples_per_s"] for s in single],
            "samples_per_s": round(sum(s["samples_per_s"] for s in single) / len(single), 3),
            "peak_gib": max(s["peak_gib"] for s in single),
            "micro_batch": single[0]["setting"]["micro_batch"],
            "note": "each GPU alone (no communication), both at once, before the DDP measurement",
        }
        base = merged["single_gpu"]["samples_per_s"]
        merged["single_gpu"]["layers"] = merged["layers"]
        for entry in merged["profiles"].values():
            if entry.get("status") == "ok" and entry["layers"] == merged["layers"]:
                entry["speedup_vs_1_gpu"] = round(entry["samples_per_s"] / base, 3)
                entry["scaling_efficiency"] = round(entry["samples_per_s"] / base / entry["processes"], 3)
    return merged


def markdown_table(results: dict[str, Any]) -> str:
    lines = [
        f"{results.get('gpu')} x {max((e.get('processes', 1) for e in results['profiles'].values()), default=1)}, "
        f"{results.get('layers')} decoder layers, capped at {results.get('cap_gib')} GiB per GPU, torch {results.get('torch')}.",
        "",
        "| profile | layers | processes | samples/s | vs 1 GPU | scaling efficiency | peak GiB per GPU | largest micro-batch under the cap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    single = results.get("single_gpu")
    if single:
        lines.append(
            f"| 1 GPU (no communication) | {single['layers']} | 1 | {single['samples_per_s']} | 1.00x | - | {single['peak_gib']} | - |"
        )
    for profile, e in results["profiles"].items():
        if e.get("status") != "ok":
            lines.append(
                f"| {profile} | {e.get('layers', '')} | {e.get('processes', '')} | {e['status']} | | | {e.get('peak_gib_per_gpu', '')} | |"
            )
            continue
        lines.append(
            f"| {profile} | {e['layers']} | {e['processes']} | {e['samples_per_s']} | {e.get('speedup_vs_1_gpu', '-')}x | "
            f"{e.get('scaling_efficiency', '-')} | {', '.join(str(p) for p in e['peak_gib_per_gpu'])} | "
            f"{e['largest_micro_batch_fitting']} |"
        )
    return "\n".join(lines) + "\n"


def profile_rows(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per measured setting of merged results documents (`merge_parts`; a document may also map
    names to such documents): label, layers, processes, samples/s, peak GiB per GPU. Each document's 1-GPU
    baseline comes first, then its profiles that ran."""
    rows: list[dict[str, Any]] = []
    for doc in documents:
        if "profiles" not in doc:  # several merged documents under their names
            rows += profile_rows([d for d in doc.values() if isinstance(d, dict)])
            continue
        single = doc.get("single_gpu")
        if single:
            ran = [p for p, e in doc["profiles"].items() if e.get("status") == "ok"]
            rows.append(
                {
                    "label": f"1 GPU ({ran[0]} run)" if ran else "1 GPU",
                    "layers": single["layers"],
                    "processes": 1,
                    "samples_per_s": single["samples_per_s"],
                    "peak_gib": single["peak_gib"],
                }
            )
        for profile, entry in doc["profiles"].items():
            if entry.get("status") != "ok":
                continue
            rows.append(
                {
                    "label": f"{profile}, {entry['processes']} GPUs",
                    "layers": entry["layers"],
                    "processes": entry["processes"],
                    "samples_per_s": entry["samples_per_s"],
                    "peak_gib": max(entry["peak_gib_per_gpu"]),
                }
            )
    return rows


def plot_profiles(rows: list[dict[str, Any]], out: Path, cap_gib: float = 80.0) -> Path:
    """Samples/s and peak GiB per GPU of each row (`profile_rows`), the cap drawn; rows of a cut model
    (fewer layers than the most in `rows`) are hatched and labelled: their figures do not compare."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pcbvlm.io import atomic_write_figure

    if not rows:
        raise ValueError("no measured profile to plot")
    full = max(r["layers"] for r in rows)
    labels = [r["label"] + ("" if r["layers"] == full else f"\n({r['layers']}-layer cut)") for r in rows]
    colors = ["#7f7f7f" if r["processes"] == 1 else "#1f77b4" for r in rows]
    hatches = ["" if r["layers"] == full else "//" for r in rows]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for ax, key, title in (
        (speed, "samples_per_s", "samples/s (all GPUs)"),
        (memory, "peak_gib", "peak GiB per GPU"),
    ):
        bars = ax.bar(range(len(rows)), [r[key] for r in rows], color=colors)
        for bar, hatch, row in zip(bars, hatches, rows, strict=True):
            bar.set_hatch(hatch)
            ax.annotate(
                f"{row[key]:g}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
            )
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    memory.axhline(cap_gib, color="#d62728", linestyle="--", label=f"cap {cap_gib:g} GiB")
    memory.set_ylim(0, cap_gib * 1.15)
    memory.legend(loc="upper left")
    fig.suptitle(f"QLoRA on the Qwen3-VL-32B shape ({full} layers unless marked), micro-batch 16 per GPU")
    fig.tight_layout()
    atomic_write_figure(fig, out)
    plt.close(fig)
    return out
