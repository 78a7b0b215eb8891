"""Unsloth side by side with this project's training, on the same work (issue 20).

Three steps, each its own process (`jobs/bench_unsloth.py`), because `import unsloth` patches
transformers, peft and bitsandbytes for the whole process (it must come before them) and would change
what this project's rows measure:

1. `checkpoint`: the Qwen3-VL-32B shape (`pcbvlm.shapes`, optionally cut to fewer decoder layers of the
   same width) with random weights, saved in bf16 with the benchmark processor, because Unsloth's
   loader (`FastVisionModel.from_pretrained`) takes a folder. Both sides load this same folder.
2. `unsloth`: Unsloth's recommended QLoRA setup for vision models: `FastVisionModel.from_pretrained(...,
   load_in_4bit=True, use_gradient_checkpointing="unsloth")` (its NF4 quantization, its patched
   modules and kernels), `FastVisionModel.get_peft_model` with LoRA r/alpha/dropout from the config on
   the language model's attention and MLP linears (the vision tower frozen, as here), its offloaded
   gradient checkpointing, `FastVisionModel.for_training`.
3. `ours`: the project's own loader (`pcbvlm.modeling.load_base_model`: NF4 + double quantization,
   vision tower and lm_head bf16) and the settings of `pcbvlm.bench.time_training`.

The batch is the same on both sides: `pcbvlm.collator.TrainCollator` on the benchmark sample (a
640x640 board, 7 boxes), bf16 autocast, fused AdamW; timed: `steps` optimizer steps after one warm-up
step, under the same memory cap. Each row is written to the results JSON before the next starts.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pcbvlm.bench import (
    NAIVE,
    Setting,
    _peak_gib,
    _reset_peak,
    _sync,
    _write,
    benchmark_model_config,
    benchmark_processor,
    benchmark_sample,
    build_random_model,
    configured_setting,
    profile_step,
    time_training,
)
from pcbvlm.shapes import qwen3_vl_32b_shape

ROOT = Path(__file__).resolve().parents[2]


def _log(message: str) -> None:
    print(message, flush=True)


def _config():
    from pcbvlm.config import load_config

    return load_config(ROOT / "config" / "config.yaml")


def _cap(cap_gib: float) -> None:
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total))


def save_random_checkpoint(path: Path, layers: int | None, narrow: bool = False, cfg=None) -> dict[str, Any]:
    """The 32B shape (or `layers` decoder layers of it) with random bf16 weights, saved with the benchmark
    processor; `narrow` makes a tiny-width model of the same structure (the CPU dry run)."""
    cfg = cfg or _config()
    processor = benchmark_processor(cfg.data.max_pixels)
    config = benchmark_model_config(processor.tokenizer, layers)
    if narrow:
        from pcbvlm.bench import smoke_config

        wide, config = config, smoke_config(layers or 2)
        for key in ("image_token_id", "vision_start_token_id", "vision_end_token_id", "video_token_id"):
            setattr(config, key, getattr(wide, key))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    begin = time.perf_counter()
    torch.manual_seed(0)
    model = build_random_model(config, quantize=False, device=device)
    built = time.perf_counter() - begin
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(tmp)
    # Part by part, as pcbvlm.tiny saves its model (the processor has no video processor to save).
    processor.tokenizer.save_pretrained(tmp)
    processor.image_processor.save_pretrained(tmp)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)
    parameters = sum(p.numel() for p in model.parameters())
    info = {
        "checkpoint": str(path),
        "layers": config.text_config.num_hidden_layers,
        "parameters": parameters,
        "build_s": round(built, 1),
        "save_s": round(time.perf_counter() - begin - built, 1),
    }
    _log(f"checkpoint: {info}")
    return info


def _batch(processor, sample, micro_batch: int, device) -> tuple[dict[str, torch.Tensor], int, int]:
    from pcbvlm.collator import TrainCollator

    batch = TrainCollator(processor)([sample] * micro_batch)
    tokens = int(batch["attention_mask"][0].sum())
    answer = int((batch["labels"][0] != -100).sum())
    return {k: v.to(device) for k, v in batch.items()}, tokens, answer


def time_steps(
    model, batch, micro_batch: int, steps: int, result: dict[str, Any], profile: bool = False
) -> None:
    """One warm-up step, then `steps` timed optimizer steps (bf16 autocast, fused AdamW on a GPU);
    fills `result` with s/sample, peak memory and losses (`profile`: one more step under
    torch.profiler, GPU time by kernel family, as for this project's rows)."""
    device = next(p.device for p in model.parameters() if p.requires_grad)
    params = [p for p in model.parameters() if p.requires_grad]
    result["lora_parameters"] = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step() -> float:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    _reset_peak()
    result["began_at"] = round(time.time(), 1)
    try:
        result["warmup_loss"] = round(step(), 4)
        _sync()
        begin = time.perf_counter()
        losses = [step() for _ in range(steps)]
        _sync()
        seconds = time.perf_counter() - begin
        if profile:
            try:
                result["profile"] = profile_step(step)
            except Exception as exc:  # a diagnostic: never lose the timing for it
                result["profile"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        samples = steps * micro_batch
        result.update(
            status="ok",
            s_per_sample=round(seconds / samples, 4),
            samples_per_s=round(samples / seconds, 3),
            tokens_per_s=round(samples * result["tokens_per_sample"] / seconds, 1),
            peak_gib=_peak_gib(),
            loss=round(losses[-1], 4),
            losses=[round(v, 4) for v in losses],
            ended_at=round(time.time(), 1),
        )
    except torch.OutOfMemoryError:
        result.update(status="out of memory under the cap", peak_gib=_peak_gib())
    except Exception as exc:
        result.update(status=f"failed: {type(exc).__name__}: {str(exc)[:500]}")
        _log(traceback.format_exc(limit=20))
    finally:
        optimizer.state.clear()


def run_unsloth(
    out_path: Path,
    checkpoint: Path,
    steps: int,
    micro_batches: tuple[int, ...],
    cap_gib: float,
    load_in_4bit: bool = True,
    cfg=None,
    import_s: float | None = None,
    profile: bool = False,
) -> dict[str, Any]:
    """Unsloth's rows (see the module docstring); every failure is recorded with its error."""
    results: dict[str, Any] = {"side": "unsloth", "checkpoint": str(checkpoint), "train": []}
    begin = time.perf_counter()
    try:
        import unsloth  # noqa: F401  (first: it patches transformers/peft/bitsandbytes on import)
        from unsloth import FastVisionModel
    except Exception as exc:
        results["status"] = f"import failed: {type(exc).__name__}: {str(exc)[:800]}"
        _log(traceback.format_exc(limit=20))
        _write(out_path, results)
        return results
    results["unsloth"] = getattr(unsloth, "__version__", "?")
    # `import unsloth` happens in the job before anything imports transformers: its time comes from there.
    results["import_s"] = import_s if import_s is not None else round(time.perf_counter() - begin, 1)
    _log(f"unsloth {results['unsloth']} imported in {results['import_s']} s")
    _cap(cap_gib)
    cfg = cfg or _config()
    try:
        begin = time.perf_counter()
        model, _ = FastVisionModel.from_pretrained(
            str(checkpoint),
            load_in_4bit=load_in_4bit,
            dtype=torch.bfloat16 if torch.cuda.is_available() else None,
            use_gradient_checkpointing="unsloth",
            use_exact_model_name=True,
        )
        model = FastVisionModel.get_peft_model(
            model,
            finetune_vision_layers=False,
            finetune_language_layers=True,
            finetune_attention_modules=True,
            finetune_mlp_modules=True,
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            bias="none",
            random_state=0,
            use_gradient_checkpointing="unsloth",
            target_modules=list(cfg.lora.target_modules),
        )
        FastVisionModel.for_training(model)
        results["load_s"] = round(time.perf_counter() - begin, 1)
        results["model_gib"] = _peak_gib()
        adapted = sorted({n.split(".")[-2] for n, _ in model.named_parameters() if "lora_A" in n})
        results["adapted_module_names"] = adapted[:20]
        _log(f"unsloth model ready in {results['load_s']} s; adapters on {adapted[:10]}")
    except Exception as exc:
        results["status"] = f"load failed: {type(exc).__name__}: {str(exc)[:800]}"
        _log(traceback.format_exc(limit=25))
        _write(out_path, results)
        return results
    _write(out_path, results)
    processor = benchmark_processor(cfg.data.max_pixels)
    sample = benchmark_sample(checkpoint, cfg)  # the board image beside the checkpoint, not in the results
    device = next(p.device for p in model.parameters() if p.requires_grad)
    for micro_batch in micro_batches:
        batch, tokens, answer = _batch(processor, sample, micro_batch, device)
        result: dict[str, Any] = {
            "setting": {
                "name": f"Unsloth {results['unsloth']} (FastVisionModel, 4-bit {load_in_4bit}, "
                f'gradient checkpointing "unsloth", mb {micro_batch})',
                "micro_batch": micro_batch,
                "grad_accum": 1,
            },
            "tokens_per_sample": tokens,
            "answer_tokens": answer,
        }
        time_steps(model, batch, micro_batch, steps, result, profile=profile)
        _log(f"train {result['setting']['name']}: {result}")
        results["train"].append(result)
        _write(out_path, results)
        del batch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    results["status"] = "ok"
    _write(out_path, results)
    return results


def _shape_title(layers: int | None) -> str:
    """The picture's model: the whole 32B shape (its 64 decoder layers), or a cut of it."""
    full = qwen3_vl_32b_shape().num_layers
    if layers is None or layers == full:
        return f"Qwen3-VL-32B shape (all {full} decoder layers)"
    return f"Qwen3-VL-32B shape cut to {layers} of its {full} decoder layers"


def side_by_side_plan(cfg, layers: int) -> list[Setting]:
    """This project's rows next to Unsloth's: the configured setting as merged (issue 9), the same with
    this issue's levers, the levers with every layer checkpointed (the memory Unsloth's offloaded
    checkpointing competes with), and the naive baseline. The configured 10 uncheckpointed layers of 64
    are scaled to the cut (`layers * 10 / 64`, rounded down), so that the share of layers that skip
    recomputation stays the 64-layer model's."""
    main = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"fused_lora": False, "fused_swiglu": False})}
    )
    configured = configured_setting(main, "configured (main)")
    keep = min(configured.uncheckpointed_layers, configured.uncheckpointed_layers * layers // 64)
    configured.uncheckpointed_layers = keep
    configured.name = configured.name.replace(
        f"{cfg.train.uncheckpointed_layers} layers uncheckpointed",
        f"{keep} of {layers} layers uncheckpointed",
    )
    configured.profile = True  # where the step goes, before and after the levers
    mb = configured.micro_batch
    common = dict(lora_dropout=cfg.lora.dropout, fused_kernels=configured.fused_kernels)
    return [
        configured,
        Setting(
            f"+ fused LoRA adds + fused SwiGLU, {keep} of {layers} uncheckpointed",
            mb,
            uncheckpointed_layers=keep,
            fused_lora=True,
            fused_swiglu=True,
            profile=True,
            **common,
        ),
        NAIVE,
        Setting(
            f"+ fused LoRA adds only, {keep} of {layers} uncheckpointed",
            mb,
            uncheckpointed_layers=keep,
            fused_lora=True,
            **common,
        ),
        Setting(
            "+ fused LoRA adds + fused SwiGLU, all layers checkpointed",
            mb,
            fused_lora=True,
            fused_swiglu=True,
            **common,
        ),
    ]


# Uncheckpointed layers to try for the rows that keep as many as fit under the cap, most first, at
# 64 layers (scaled to a cut). From the 64-layer run of 2026-11-30 (fused SwiGLU): ~1.9 GiB per
# uncheckpointed layer at mb 16, 40.3 GiB with every layer checkpointed, 7.0 GiB of it the layer inputs
# that offloading moves to the CPU: ~33 + 1.9 k GiB at mb 16 (k <= ~23 under 80), ~31 + 0.97 k at mb 8.
FIT_MB16 = (22, 19, 16, 13)
FIT_MB8 = (46, 42, 38, 34, 30)


def _fit_down(layers: int, counts: tuple[int, ...]) -> list[int]:
    """`counts` (meant for 64 layers) scaled to a model of `layers`, most first, without repeats."""
    scaled = [max(1 if c else 0, min(layers, c * layers // 64)) for c in counts]
    return list(dict.fromkeys(scaled))


def _unique(settings: list[Setting]) -> list[Setting]:
    """Alternatives without repeats (a cut model scales several counts to the same one)."""
    return list({s.name: s for s in settings}.values())


# Unsloth's peak at 64 layers, mb 16 (2026-11-30), for the row that must not use more; the run passes the
# peak it measures itself (`--memory-goal-gib`).
UNSLOTH_PEAK_GIB = 31.43


def offload_plan(cfg, layers: int, memory_goal_gib: float | None = None) -> list[Setting | list[Setting]]:
    """Issue 20's third round: offloaded checkpoint inputs (`train.offload_checkpoints`) and fewer
    recomputed layers through smaller micro-batches with gradient accumulation (the same 16 samples per
    optimizer step; the loss is weighted by answer tokens, so the update is the same). A list of
    settings is one row: the first that fits under the cap (most uncheckpointed layers first). One row
    runs under `memory_goal_gib` (Unsloth's peak) as its cap: the fastest of ours that uses no more."""
    keep = min(cfg.train.uncheckpointed_layers, cfg.train.uncheckpointed_layers * layers // 64)
    mb = cfg.train.micro_batch
    common = dict(lora_dropout=cfg.lora.dropout, fused_kernels=cfg.train.fused_kernels != "none")
    levers = dict(fused_lora=True, fused_swiglu=True, **common)

    def accumulated(micro: int, kept: int, offload: bool, cap: float | None = None) -> Setting:
        rest = "" if kept == layers else ", offloaded checkpoints"
        under = f", under {cap:g} GiB (Unsloth's peak)" if cap else ""
        return Setting(
            f"mb {micro} x accum {mb // micro}, {kept} of {layers} uncheckpointed{rest if offload else ''}{under}",
            micro,
            grad_accum=mb // micro,
            uncheckpointed_layers=kept,
            offload_checkpoints=offload,
            cap_gib=cap,
            **levers,
        )

    goal = memory_goal_gib or UNSLOTH_PEAK_GIB
    # (micro-batch 16 with every layer checkpointed and offloaded is the first row: not tried twice)
    under_unsloth = [
        *(accumulated(max(1, mb // 2), k, True, goal) for k in _fit_down(layers, (2, 0))),
        *(accumulated(max(1, mb // 4), k, True, goal) for k in _fit_down(layers, (6, 0))),
    ]

    return [
        Setting("+ offloaded checkpoints, all layers checkpointed", mb, offload_checkpoints=True, **levers),
        NAIVE,
        [accumulated(max(1, mb // 2), k, True) for k in _fit_down(layers, FIT_MB8)],
        [accumulated(max(1, mb // 4), k, k < layers) for k in _fit_down(layers, (64, 56, 48))],
        _unique(under_unsloth),
        Setting(
            f"configured + offloaded checkpoints, {keep} of {layers} uncheckpointed",
            mb,
            uncheckpointed_layers=keep,
            offload_checkpoints=True,
            **levers,
        ),
        [
            Setting(
                f"+ offloaded checkpoints, {k} of {layers} uncheckpointed",
                mb,
                uncheckpointed_layers=k,
                offload_checkpoints=True,
                **levers,
            )
            for k in _fit_down(layers, FIT_MB16)
        ],
        Setting(
            f"configured (this branch), {keep} of {layers} uncheckpointed",
            mb,
            uncheckpointed_layers=keep,
            **levers,
        ),
    ]


def offload_check_plan(
    cfg, layers: int, memory_goal_gib: float | None = None
) -> list[Setting | list[Setting]]:
    """The follow-up of `offload_plan` (no Unsloth rows): offloading on and off in the same run (speed,
    memory, and whether the losses agree), the configured setting with and without it (the default),
    mb 8 x 2 near the configured setting's memory and with the most layers that fit, the naive baseline
    (the ratio in this run), mb 16 with offloading and the most layers that fit, and the first row once
    more (run-to-run spread)."""
    keep = min(cfg.train.uncheckpointed_layers, cfg.train.uncheckpointed_layers * layers // 64)
    mb = cfg.train.micro_batch
    levers = dict(
        lora_dropout=cfg.lora.dropout,
        fused_kernels=cfg.train.fused_kernels != "none",
        fused_lora=True,
        fused_swiglu=True,
    )

    def row(name: str, micro: int, kept: int, offload: bool) -> Setting:
        return Setting(
            name,
            micro,
            grad_accum=mb // micro,
            uncheckpointed_layers=kept,
            offload_checkpoints=offload,
            **levers,
        )

    def accumulated(kept: int) -> Setting:
        micro = max(1, mb // 2)
        return row(
            f"mb {micro} x accum {mb // micro}, {kept} of {layers} uncheckpointed, offloaded checkpoints",
            micro,
            kept,
            True,
        )

    plain = row("all layers checkpointed, not offloaded", mb, 0, False)
    return [
        plain,
        row("all layers checkpointed, offloaded checkpoints", mb, 0, True),
        row(f"configured, {keep} of {layers} uncheckpointed, offloaded checkpoints", mb, keep, True),
        row(f"configured, {keep} of {layers} uncheckpointed, not offloaded", mb, keep, False),
        [accumulated(k) for k in _fit_down(layers, (22, 20))],
        [accumulated(k) for k in _fit_down(layers, (36, 35, 34))],
        NAIVE,
        [
            row(f"+ offloaded checkpoints, {k} of {layers} uncheckpointed", mb, k, True)
            for k in _fit_down(layers, (17, 15, 13))
        ],
        row("all layers checkpointed, not offloaded (again: run-to-run spread)", mb, 0, False),
    ]


def compile_plan(
    cfg, layers: int, memory_goal_gib: float | None = None, compiled: bool = True
) -> list[Setting | list[Setting]]:
    """Issue 20's compiled decoder layers (`train.compile_layers`), or with `compiled=False` the same
    rows eager and the naive baseline, as run on 2026-11-30 (`bench/gpu/issue20-compile.sh`): Unsloth's
    memory (mb 16, every layer checkpointed, offloaded; compiled also capped at Unsloth's peak), mb 8 x 2
    with the most uncheckpointed layers that fit, mb 4 x 4 with nothing recomputed, the configured
    setting, and (compiled) Liger's kernels inside the compiled layers."""
    mb = cfg.train.micro_batch
    keep = min(cfg.train.uncheckpointed_layers, cfg.train.uncheckpointed_layers * layers // 64)
    levers = dict(
        lora_dropout=cfg.lora.dropout,
        fused_kernels=cfg.train.fused_kernels != "none",
        fused_lora=True,
        fused_swiglu=True,
        compile_layers=compiled,
    )

    def row(micro: int, kept: int, offload: bool, note: str = "", **extra) -> Setting:
        label = (
            f"{'compiled' if compiled else 'eager'}, mb {micro} x accum {mb // micro}, {kept} of {layers} "
            f"uncheckpointed{', offloaded checkpoints' if offload else ''}{note}"
        )
        return Setting(
            label,
            micro,
            grad_accum=mb // micro,
            uncheckpointed_layers=kept,
            offload_checkpoints=offload,
            **levers,
            **extra,
        )

    half, quarter = max(1, mb // 2), max(1, mb // 4)
    if not compiled:
        return [
            row(mb, 0, True, profile=True),
            row(quarter, layers, False, profile=True),
            row(mb, keep, False, " (the default)"),
            NAIVE,
        ]
    goal = memory_goal_gib or UNSLOTH_PEAK_GIB
    return [
        row(mb, 0, True, profile=True),
        [row(half, k, True) for k in _fit_down(layers, (44, 40, 36))],
        row(quarter, layers, False, profile=True),
        row(mb, 0, True, f", under {goal:g} GiB (Unsloth's peak)", cap_gib=goal),
        row(mb, keep, False, " (the default + compiled layers)"),
        row(mb, 0, True, ", Liger's kernels inside the compiled layers", liger_in_compiled_layers=True),
    ]


def _lever_row(
    cfg,
    layers: int,
    compiled: bool,
    micro: int,
    kept: int,
    offload: bool,
    skip: bool,
    note: str = "",
    **extra,
) -> Setting:
    """A row of the fifth and sixth rounds: fused LoRA adds and SwiGLU, 16 samples per optimizer step."""
    mb = cfg.train.micro_batch
    label = (
        f"{'compiled' if compiled else 'eager'}, mb {micro} x accum {mb // micro}, {kept} of {layers} "
        f"uncheckpointed{', offloaded checkpoints' if offload else ''}"
        f"{', down_proj not recomputed' if skip and kept < layers else ''}"
        f"{', one-launch NF4 dequant' if extra.get('fast_dequant') else ''}{note}"
    )
    return Setting(
        label,
        micro,
        grad_accum=mb // micro,
        uncheckpointed_layers=kept,
        offload_checkpoints=offload,
        skip_down_proj_recompute=skip,
        lora_dropout=cfg.lora.dropout,
        fused_kernels=cfg.train.fused_kernels != "none",
        fused_lora=True,
        fused_swiglu=True,
        compile_layers=compiled,
        **extra,
    )


def _batch_sizes(cfg, layers: int) -> tuple[int, int, int, int]:
    """The configured micro-batch, its uncheckpointed layers scaled to `layers`, its half and quarter."""
    mb = cfg.train.micro_batch
    keep = min(cfg.train.uncheckpointed_layers, cfg.train.uncheckpointed_layers * layers // 64)
    return mb, keep, max(1, mb // 2), max(1, mb // 4)


def skip_plan(
    cfg, layers: int, memory_goal_gib: float | None = None, compiled: bool = True
) -> list[Setting | list[Setting]]:
    """Issue 20's fifth round: checkpointed layers that skip down_proj's base product in their
    recomputation (`train.skip_down_proj_recompute`), compiled on one GPU, eager and the naive baseline on
    the other (after Unsloth), with the memory at the peak and the GPU's idle gaps traced."""
    mb, keep, half, quarter = _batch_sizes(cfg, layers)

    def row(*args, **extra) -> Setting:
        return _lever_row(cfg, layers, compiled, *args, **extra)

    if not compiled:
        return [
            row(mb, 0, True, False, trace_memory=True),
            row(mb, 0, True, True, trace_memory=True),
            NAIVE,
            row(mb, keep, False, True, " (the default)"),
        ]
    goal = memory_goal_gib or UNSLOTH_PEAK_GIB
    return [
        row(mb, 0, True, True, profile=True, trace_memory=True),
        row(mb, 0, True, True, f", under {goal:g} GiB (Unsloth's peak)", cap_gib=goal),
        [row(half, k, True, True) for k in _fit_down(layers, (40, 36))],
        row(mb, keep, False, True, " (the default + compiled layers)"),
        row(quarter, layers, False, False, trace_idle=True),  # last: the traced step's analysis is slow
    ]


def final_plan(
    cfg, layers: int, memory_goal_gib: float | None = None, compiled: bool = True
) -> list[Setting | list[Setting]]:
    """Issue 20's sixth round: the fifth's levers with the one-launch NF4 dequantization
    (`train.fast_dequant`), next to the same rows without it; compiled on one GPU; eager, the new default
    and the naive baseline (last: alone on the host) on the other, after Unsloth."""
    mb, keep, half, quarter = _batch_sizes(cfg, layers)

    def row(*args, **extra) -> Setting:
        return _lever_row(cfg, layers, compiled, *args, **extra)

    if not compiled:
        return [
            row(mb, 0, True, True, fast_dequant=True),
            row(mb, keep, False, True, " (the new default)", fast_dequant=True),
            NAIVE,
        ]
    goal = memory_goal_gib or UNSLOTH_PEAK_GIB
    return [
        row(mb, 0, True, True, profile=True, fast_dequant=True),
        row(mb, 0, True, True, f", under {goal:g} GiB (Unsloth's peak)", cap_gib=goal, fast_dequant=True),
        row(quarter, layers, False, False, profile=True, fast_dequant=True),
        row(quarter, layers, False, False),
        [row(half, k, True, True, fast_dequant=True) for k in _fit_down(layers, (40, 36))],
        row(mb, 0, True, True),
        row(mb, keep, False, True, " (the default + compiled layers)", fast_dequant=True),
    ]


def ratio_plan(cfg, layers: int, memory_goal_gib: float | None = None) -> list[Setting | list[Setting]]:
    """The naive baseline first, on a host with nothing else running, then the fastest measured setting
    (compiled mb 4 x 4, nothing recomputed, one-launch dequant): the ratio of issue 20's third goal."""
    _, _, _, quarter = _batch_sizes(cfg, layers)
    return [NAIVE, _lever_row(cfg, layers, True, quarter, layers, False, False, fast_dequant=True)]


PLANS = {
    "levers": lambda cfg, layers, goal=None: side_by_side_plan(cfg, layers),
    "offload": offload_plan,
    "offload-check": offload_check_plan,
    "compile": compile_plan,
    "compile-eager": lambda cfg, layers, goal=None: compile_plan(cfg, layers, goal, compiled=False),
    "skip": skip_plan,
    "skip-eager": lambda cfg, layers, goal=None: skip_plan(cfg, layers, goal, compiled=False),
    "final": final_plan,
    "final-eager": lambda cfg, layers, goal=None: final_plan(cfg, layers, goal, compiled=False),
    "ratio": ratio_plan,
}


OUT_OF_MEMORY = "out of memory under the cap"  # pcbvlm.bench.time_training's status


def measure_rows(
    rows: list[Setting | list[Setting]],
    measure: Callable[[Setting], dict[str, Any]],
    expired: Callable[[], bool],
    results: dict[str, Any],
    out_path: Path,
) -> None:
    """Measure every row into `results["train"]`, written to `out_path` after each. A row that is a list
    of settings is the first of them that fits: one that runs out of memory under its cap goes to
    `results["did_not_fit"]` and the next is tried (the last one's failure is the row's result). Once
    `expired()`, the remaining rows are recorded as skipped."""
    for row in rows:
        alternatives = row if isinstance(row, list) else [row]
        for n, setting in enumerate(alternatives):
            if expired():
                results["train"].append({"setting": setting.__dict__, "status": "skipped: deadline"})
                break
            result = measure(setting)
            if result.get("status") == OUT_OF_MEMORY and n + 1 < len(alternatives):
                results.setdefault("did_not_fit", []).append(
                    {"name": setting.name, "peak_gib": result.get("peak_gib")}
                )
                _log(f"{setting.name}: out of memory under the cap, trying {alternatives[n + 1].name}")
                continue
            results["train"].append(result)
            break
        _write(out_path, results)


def run_ours(
    out_path: Path,
    checkpoint: Path,
    steps: int,
    cap_gib: float,
    deadline_s: float | None = None,
    cfg=None,
    plan: str = "offload",
    memory_goal_gib: float | None = None,
) -> dict[str, Any]:
    """This project's rows on the saved checkpoint, loaded the way training loads a model; `plan` names
    the rows (`PLANS`: "levers", the 2026-11-30 runs of fused LoRA adds and SwiGLU; "offload", the
    offloaded checkpoints and the gradient-accumulation settings)."""
    from pcbvlm.modeling import decoder_layers, load_base_model

    started = time.perf_counter()
    cfg = cfg or _config()
    on_gpu = torch.cuda.is_available()
    cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(
                update={"name_or_path": str(checkpoint), "build_tiny_if_missing": False}
            ),
            "train": cfg.train.model_copy(
                update={
                    "quantization": "nf4" if on_gpu else "none",
                    "fused_kernels": cfg.train.fused_kernels if on_gpu else "none",
                }
            ),
        }
    )
    _cap(cap_gib)
    begin = time.perf_counter()
    model = load_base_model(cfg, dtype=torch.bfloat16)
    results: dict[str, Any] = {
        "side": "pcbvlm",
        "checkpoint": str(checkpoint),
        "load_s": round(time.perf_counter() - begin, 1),
        "model_gib": _peak_gib(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "cap_gib": cap_gib,
        "train": [],
    }
    _log(f"our model loaded in {results['load_s']} s")
    processor = benchmark_processor(cfg.data.max_pixels)
    sample = benchmark_sample(checkpoint, cfg)  # the board image beside the checkpoint, not in the results
    layers = len(decoder_layers(model))
    results["layers"] = layers
    results["plan"] = plan

    def measure(setting: Setting) -> dict[str, Any]:
        torch.manual_seed(0)
        _cap(setting.cap_gib or cap_gib)
        result = time_training(model, cfg, processor, sample, setting, steps, _log, profile=setting.profile)
        result["cap_gib"] = setting.cap_gib or cap_gib
        return result

    def expired() -> bool:
        return deadline_s is not None and time.perf_counter() - started > deadline_s

    measure_rows(PLANS[plan](cfg, layers, memory_goal_gib), measure, expired, results, out_path)
    ok = [r for r in results["train"] if r.get("status") == "ok"]
    naive = next((r for r in ok if r["setting"].get("naive")), None)
    if naive:
        for r in ok:
            r["speedup_vs_naive"] = round(naive["s_per_sample"] / r["s_per_sample"], 2)
    _write(out_path, results)
    return results


def markdown_table(ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> str:
    """One table of both sides' rows (s/sample, samples/s, peak GiB, losses, vs naive, vs Unsloth)."""
    rows = [*(theirs or {}).get("train", []), *(ours or {}).get("train", [])]
    unsloth = next((r for r in (theirs or {}).get("train", []) if r.get("status") == "ok"), None)
    lines = [
        "| training setting | s/sample | samples/s | peak GiB | loss: warm-up -> last | vs naive | vs Unsloth |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r["setting"]["name"]
        if r.get("status") != "ok":
            lines.append(f"| {name} | {r.get('status')} | | {r.get('peak_gib', '')} | | | |")
            continue
        versus = f"{unsloth['s_per_sample'] / r['s_per_sample']:.2f}x" if unsloth else "-"
        naive = f"{r['speedup_vs_naive']}x" if "speedup_vs_naive" in r else "-"
        lines.append(
            f"| {name} | {r['s_per_sample']} | {r['samples_per_s']} | {r['peak_gib']} | "
            f"{r.get('warmup_loss')} -> {r['loss']} | {naive} | {versus} |"
        )
    if theirs and theirs.get("status") not in (None, "ok"):
        lines.append(f"\nUnsloth: {theirs['status']}")
    return "\n".join(lines) + "\n"


def plot(ours: dict[str, Any] | None, theirs: dict[str, Any] | None, path: Path) -> Path:
    """Bars of s/sample (left) and peak GiB (right) for every measured row of both sides."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pcbvlm.io import atomic_write_figure

    rows = [
        r
        for r in [*(theirs or {}).get("train", []), *(ours or {}).get("train", [])]
        if r.get("status") == "ok"
    ]
    fig = Figure(figsize=(12, 0.55 * max(len(rows), 2) + 1.6), dpi=100)
    FigureCanvasAgg(fig)
    speed, memory = fig.subplots(1, 2, sharey=True)
    # long names shortened in the middle, so that rows differing only at the end stay apart
    names = [n if len(n) <= 64 else f"{n[:46]}...{n[-15:]}" for n in (r["setting"]["name"] for r in rows)]
    colors = ["tab:orange" if r["setting"]["name"].startswith("Unsloth") else "tab:blue" for r in rows]
    speed.barh(names, [r["s_per_sample"] for r in rows], color=colors)
    memory.barh(names, [r["peak_gib"] or 0 for r in rows], color=colors)
    speed.set_xlabel("s / sample (lower is faster)")
    memory.set_xlabel("peak GiB")
    speed.invert_yaxis()
    legend = "; orange: Unsloth" if "tab:orange" in colors else " (this project's rows only)"
    fig.suptitle(
        f"Training step, {_shape_title((ours or {}).get('layers'))}, random weights, same batch{legend}"
    )
    for ax in (speed, memory):
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return atomic_write_figure(fig, path)
