"""GPU benchmark of a model family's real 32B shape with random weights: training and generation speed, memory.

Speed and memory do not depend on weight values, so the model is built from its config (the family's
`config_32b`, pcbvlm.families; Qwen3-VL-32B by default, `--family qwen2_5_vl` for Qwen2.5-VL-32B) on the
GPU in bf16, and the language model's decoder linears are
quantized to NF4 + double quantization exactly as `from_pretrained(quantization_config=bnb_config())`
would (vision tower and lm_head stay bf16). Everything after that is the project's own code: LoRA from
`pcbvlm.modeling.apply_lora` (with its selective checkpointing and bf16 adapter inputs), Liger's
kernels from `pcbvlm.modeling.apply_fused_kernels` (undone after each setting), batches from
`pcbvlm.collator.TrainCollator` (a synthetic 640x640 board with ~7 boxes: 400 visual tokens + prompt +
~170 answer tokens), the loss through `keep_answer_logits`, generation through
`pcbvlm.generate.generate_batch`. The tokenizer is the tiny model's (Qwen's pre-tokenizer, digits one per
token), so token counts match Qwen's closely; token ids differ, which does not change the cost.

Every setting runs in the same process, one after another, on the same model, under a memory cap of
`cap_gib` (80 GiB emulates an A800 80 GB). The naive baseline is the seed project's setup: micro-batch 1
with gradient accumulation, peft's `prepare_model_for_kbit_training` (which upcasts every non-quantized
weight to fp32), reentrant checkpointing, full logits, LoRA dropout 0.05, peft's fp32 adapter inputs.
`train_plan` lists the settings of each plan (`full`, `headline`, `explore`); generation runs with
the dynamic KV cache and, for `static_cache_batches`, with a static one and a compiled decoding step.

MFU = model FLOPs / (time x peak). Model FLOPs of one training sample (LoRA, frozen base):
forward 2*N_lm*T_text + 2*N_vis*T_patch, backward 2*N_lm*T_text (input gradients only; no gradient
through the frozen vision tower), LoRA weight gradients 2*N_lora*T_text, plus attention
4*layers*T_text^2*heads*head_dim*3/2 (causal, forward + backward); the recomputation of checkpointing is
not counted (it is overhead). Peak: the H200's dense bf16 rate, 989 TFLOP/s (datasheet).
"""

from __future__ import annotations

import gc
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

H200_PEAK_BF16 = 989e12


@dataclass
class Setting:
    name: str
    micro_batch: int
    grad_accum: int = 1
    lora_dropout: float = 0.05
    answer_logits: bool = True
    gradient_checkpointing: bool = True
    naive: bool = False
    # Liger RMSNorm/rotary/fused cross-entropy (pcbvlm.modeling.apply_fused_kernels)
    fused_kernels: bool = False
    uncheckpointed_layers: int = 0
    cast_lora_inputs: bool = False  # peft's default fp32 upcast of adapter inputs (pcbvlm.modeling)
    fused_lora: bool = False  # LoRA scaling + add in the B matmul's epilogue (pcbvlm.fused_ops)
    fused_swiglu: bool = False  # Liger's SiLU-multiply kernel in the decoder MLPs (pcbvlm.fused_ops)
    offload_checkpoints: bool = False  # checkpointed layers' inputs in pinned CPU memory (pcbvlm.offload)
    cap_gib: float | None = None  # a lower GPU memory cap for this row (pcbvlm.bench_unsloth.run_ours)
    profile: bool = False  # one more step under torch.profiler (run_benchmark(profile=True))
    # each decoder layer through torch.compile (pcbvlm.layer_compile); Liger then only fuses the loss,
    # unless `liger_in_compiled_layers` (whether Dynamo traces Liger's in-layer kernels, and what they add)
    compile_layers: bool = False
    liger_in_compiled_layers: bool = False
    # checkpointed layers' recomputation stops before down_proj's base product (pcbvlm.fused_ops)
    skip_down_proj_recompute: bool = False
    fast_dequant: bool = False  # NF4 dequantization in one Triton kernel (pcbvlm.nf4_dequant)
    # diagnostics, one more step each (pcbvlm.bench_trace): the GPU's idle gaps and the code around them;
    # what is alive at the memory peak and which code allocated it
    trace_idle: bool = False
    trace_memory: bool = False


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    """Peak GPU memory since the last reset (None on the CPU smoke run)."""
    return gib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def gib(n: float) -> float:
    return round(n / 2**30, 2)


def quantize_language_model_nf4(
    model, compute_dtype: torch.dtype, quant_storage: torch.dtype = torch.uint8
) -> int:
    """Replace the decoder linears of `model.model.language_model` by bitsandbytes NF4 layers (double
    quantization, the settings of `pcbvlm.modeling.bnb_config`), one at a time; returns how many.
    `quant_storage=torch.bfloat16` packs the 4-bit values into bf16 elements (what ZeRO-3 needs)."""
    import bitsandbytes as bnb

    count = 0
    language_model = model.model.language_model
    for _, module in list(language_model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear):
                continue
            weight = child.weight.data
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
                quant_storage=quant_storage,
                device="meta",
            )
            layer.weight = bnb.nn.Params4bit(
                weight.to("cpu"),
                requires_grad=False,
                compress_statistics=True,
                quant_type="nf4",
                quant_storage=quant_storage,
            ).to(weight.device)
            setattr(module, child_name, layer)
            del weight, child
            count += 1
        if count and count % 64 == 0:
            torch.cuda.empty_cache()
    torch.cuda.empty_cache()
    return count


def build_random_model(
    config,
    dtype: torch.dtype = torch.bfloat16,
    quantize: bool = True,
    device: str | torch.device = "cuda",
    quant_storage: torch.dtype = torch.uint8,
):
    from pcbvlm.families import get_family

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = get_family(config.model_type).model_class()(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    if quantize:
        quantize_language_model_nf4(model, dtype, quant_storage)
    return model


def benchmark_processor(max_pixels: int = 409600, family: str = "qwen3_vl"):
    """The tiny model's tokenizer with the family's image processing (Qwen3-VL: 16 px patches, 2x2 merge)."""
    from pcbvlm.families import get_family
    from pcbvlm.tiny import build_processor, build_tokenizer

    processor = build_processor(build_tokenizer(), get_family(family))
    processor.image_processor.max_pixels = max_pixels
    processor.image_processor.min_pixels = max_pixels // 4
    processor.image_processor.size = {"shortest_edge": max_pixels // 4, "longest_edge": max_pixels}
    return processor


def benchmark_sample(workdir: Path, cfg, boxes: int = 7, family: str = "qwen3_vl") -> dict[str, Any]:
    """A DeepPCB-like training sample: a synthetic 640x640 board and an answer with `boxes` boxes, in the
    family's coordinates."""
    import numpy as np

    from pcbvlm.families import get_family
    from pcbvlm.labels import LABELS
    from pcbvlm.samples import build_messages
    from pcbvlm.synth import generate_sample

    synth = generate_sample(0, seed=0)
    image = workdir / "bench_board.jpg"
    synth.test.save(image, quality=95)
    rng = np.random.default_rng(0)
    objects = []
    for i in range(boxes):
        x, y = (int(v) for v in rng.integers(20, 560, size=2))
        w, h = (int(v) for v in rng.integers(18, 80, size=2))
        objects.append({"label": LABELS[i % len(LABELS)], "bbox": [x, y, x + w, y + h]})
    sample = {"id": "bench", "image": str(image), "width": 640, "height": 640, "objects": objects}
    sample["messages"] = build_messages(sample, cfg.data, with_answer=True, family=get_family(family))
    return sample


def model_flops_per_sample(counts, shape, text_tokens: int, patches: int, lora_params: int) -> float:
    attention = 4 * shape.num_layers * text_tokens**2 * shape.num_heads * shape.head_dim * 3 / 2
    language_model = counts.lm_linears + counts.lm_head  # embeddings and norms do no matmul work
    return (
        4 * language_model * text_tokens
        + 2 * counts.vision * patches
        + 2 * lora_params * text_tokens
        + attention
    )


def _upcast_non_quantized(model) -> None:
    """What peft's prepare_model_for_kbit_training does to a bnb model: fp16/bf16 weights -> fp32."""
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)


def _downcast(model, dtype: torch.dtype) -> None:
    for param in model.parameters():
        if param.dtype == torch.float32 and param.__class__.__name__ != "Params4bit":
            param.data = param.data.to(dtype)


class FusedKernels:
    """Liger's patches on the shared benchmark model, undone afterwards so that the next setting (and
    generation) measures the plain model: the module-level functions are restored and the per-instance
    `forward` bindings removed."""

    def __init__(self, model, fused_cross_entropy: bool = True, in_layers: bool = True) -> None:
        import importlib

        self.model = model
        self.fused_cross_entropy = fused_cross_entropy
        self.in_layers = in_layers
        # Liger patches names of the model's modeling module (rotary functions, RMSNorm classes): all of
        # its names are kept and put back, whichever the family's patch replaces.
        self.module = importlib.import_module(type(model).__module__)
        self.saved = dict(vars(self.module))

    def __enter__(self):
        from pcbvlm.modeling import apply_fused_kernels

        apply_fused_kernels(
            self.model, fused_cross_entropy=self.fused_cross_entropy, in_layers=self.in_layers
        )
        return self

    def __exit__(self, *exc) -> None:
        for name, value in self.saved.items():
            setattr(self.module, name, value)
        for module in self.model.modules():
            module.__dict__.pop("forward", None)


def kernel_family(name: str) -> str:
    """A coarse family of a CUDA kernel, from its name."""
    lowered = name.lower()
    if any(k in lowered for k in ("gemm", "cutlass", "xmma", "nvjet", "gemv", "splitk")):
        return "matmul"
    if any(k in lowered for k in ("dequantize", "kgemm_4bit", "kquantize")):
        return "bitsandbytes dequantize"
    if any(k in lowered for k in ("flash", "fmha", "sdpa", "attention")):
        return "attention"
    if any(k in lowered for k in ("adam", "multi_tensor")):
        return "optimizer"
    if "at::native" in lowered:
        if any(k in lowered for k in ("copy", "catarray", "index")):
            return "copy / cast / cat"
        return "elementwise / reduction (PyTorch)"
    return "other (Triton: Liger, compiled)"


def profile_step(step: Callable[[], float]) -> dict[str, Any]:
    """One training step under torch.profiler: wall time, GPU busy time, and GPU time per kernel family
    (the top kernels by name too), to see where the step goes."""
    from torch.profiler import ProfilerActivity, profile

    _sync()
    begin = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        _sync()
    wall = time.perf_counter() - begin
    kernels: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] = kernels.get(event.name, 0.0) + event.device_time_total / 1e6
    families: dict[str, float] = {}
    for name, seconds in kernels.items():
        family = kernel_family(name)
        families[family] = families.get(family, 0.0) + seconds
    busy = sum(kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    return {
        "wall_s": round(wall, 3),
        "gpu_kernel_s": round(busy, 3),
        "families_s": {k: round(v, 3) for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
        "top_kernels_s": [[name[:120], round(sec, 4)] for name, sec in top],
    }


def time_training(
    model,
    cfg,
    processor,
    sample,
    setting: Setting,
    steps: int,
    log: Callable[[str], None],
    profile: bool = False,
):
    """Seconds per sample, tokens/s and peak memory of `steps` optimizer steps after one warm-up step
    (with `profile`, one more step under torch.profiler: GPU time by kernel family)."""
    from pcbvlm.collator import TrainCollator, keep_answer_logits
    from pcbvlm.fused_ops import fuse_swiglu, torch_silu_mul
    from pcbvlm.layer_compile import compile_decoder_layers, uncompile_decoder_layers
    from pcbvlm.modeling import apply_lora, decoder_layers

    device = model.device
    on_gpu = device.type == "cuda"
    liger_in_layers = not setting.compile_layers or setting.liger_in_compiled_layers
    fused = FusedKernels(model, in_layers=liger_in_layers) if setting.fused_kernels else None
    if fused:
        fused.__enter__()  # undone in the `finally` below, with the adapters
    cfg = cfg.model_copy(deep=True)
    cfg.lora.dropout = setting.lora_dropout
    if setting.naive:
        _upcast_non_quantized(model)  # also enables (reentrant) gradient checkpointing
        peft_model = apply_lora(model, cfg, gradient_checkpointing=False, cast_lora_inputs=True)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    else:
        peft_model = apply_lora(
            model,
            cfg,
            gradient_checkpointing=setting.gradient_checkpointing,
            # a cut model (--layers) has fewer layers than the configured count
            uncheckpointed_layers=min(setting.uncheckpointed_layers, len(decoder_layers(model))),
            cast_lora_inputs=setting.cast_lora_inputs,
            offload_checkpoints=setting.offload_checkpoints,
            fused_lora=setting.fused_lora,
            skip_down_proj_recompute=setting.skip_down_proj_recompute,
        )
    offload = getattr(peft_model, "pcbvlm_checkpoint_offload", None)
    if setting.fused_swiglu and liger_in_layers:  # Liger's kernel on the GPU; its PyTorch twin on the CPU
        fuse_swiglu(model, None if on_gpu else torch_silu_mul)
    if setting.compile_layers:
        compile_decoder_layers(decoder_layers(model))
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    lora_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=on_gpu)
    batch = TrainCollator(processor)([sample] * setting.micro_batch)
    tokens_per_sample = int(batch["attention_mask"][0].sum())
    answer_tokens = int((batch["labels"][0] != -100).sum())
    batch = {k: v.to(device) for k, v in batch.items()}
    if setting.answer_logits:
        batch = keep_answer_logits(batch)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step() -> float:
        # The loss stays on the GPU until the optimizer step, as in the Trainer: reading it after each
        # micro-batch would stall the GPU until the CPU has queued the next micro-batch's first kernels.
        loss_value = torch.zeros((), device=device)
        for _ in range(setting.grad_accum):
            with autocast:
                loss = peft_model(**batch).loss / setting.grad_accum
            loss.backward()
            loss_value += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_value.item()

    _reset_peak()
    result: dict[str, Any] = {
        "setting": setting.__dict__,
        "began_at": round(time.time(), 1),  # wall clock: rows of two GPUs of one host can be lined up
        "tokens_per_sample": tokens_per_sample,
        "answer_tokens": answer_tokens,
        "lora_parameters": lora_params,
    }
    if setting.fast_dequant and on_gpu:
        from pcbvlm.nf4_dequant import install

        result["fast_dequant_installed"] = install()
    try:
        begin = time.perf_counter()
        result["warmup_loss"] = round(step(), 4)  # warm-up: kernels, allocator (LoRA B = 0: the base's loss)
        _sync()
        result["warmup_s"] = round(time.perf_counter() - begin, 1)  # with compile_layers: the compilation
        if offload is not None:  # what one micro-batch moved to the host (the warm-up step's count)
            result["offloaded_gib_per_micro_batch"] = gib(offload.packed_bytes / setting.grad_accum)
            result["offloaded_inputs_per_micro_batch"] = offload.packed // setting.grad_accum
            result["prefetched_of_unpacked"] = [offload.prefetched, offload.unpacked]
        begin = time.perf_counter()
        losses = [step() for _ in range(steps)]
        _sync()
        seconds = time.perf_counter() - begin
        peak = _peak_gib()  # of the timed steps (the memory diagnostic resets it)
        if setting.compile_layers:  # whether the layers compiled whole (graph breaks leave parts eager)
            counters = torch._dynamo.utils.counters
            result["dynamo"] = {
                "unique_graphs": counters["stats"]["unique_graphs"],
                "graph_breaks": dict(counters["graph_break"].most_common(5)),
            }
        diagnostics = {"profile": profile and profile_step}
        if on_gpu:
            from pcbvlm.bench_trace import trace_idle_gaps, trace_memory_peak

            diagnostics.update(
                idle=setting.trace_idle and trace_idle_gaps, memory=setting.trace_memory and trace_memory_peak
            )
        for key, diagnose in diagnostics.items():
            if not diagnose:
                continue
            try:
                result[key] = diagnose(step)
            except Exception as exc:  # a diagnostic: never lose the timing for it
                result[key] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        samples = steps * setting.micro_batch * setting.grad_accum
        result.update(
            status="ok",
            s_per_sample=round(seconds / samples, 4),
            samples_per_s=round(samples / seconds, 3),
            tokens_per_s=round(samples * tokens_per_sample / seconds, 1),
            peak_gib=peak,
            loss=round(losses[-1], 4),
            losses=[round(v, 4) for v in losses],
            ended_at=round(time.time(), 1),
        )
    except torch.OutOfMemoryError:
        result.update(status="out of memory under the cap", peak_gib=_peak_gib())
    except Exception as exc:  # one failing setting (e.g. a kernel library) must not end the whole run
        result.update(status=f"failed: {type(exc).__name__}: {str(exc)[:300]}")
        log(traceback.format_exc(limit=12))
    finally:
        optimizer.state.clear()  # free the AdamW state before the next setting
        peft_model.unload()  # the same base model serves the next setting
        if setting.naive:
            _downcast(model, torch.bfloat16)
        if fused:
            fused.__exit__(None, None, None)
        for layer in decoder_layers(model):  # fuse_swiglu's per-instance forward
            layer.mlp.__dict__.pop("forward", None)
        if setting.compile_layers:
            uncompile_decoder_layers(decoder_layers(model))
        if setting.fast_dequant:
            from pcbvlm.nf4_dequant import uninstall

            uninstall()
        model.gradient_checkpointing_disable()
        # The unloaded LoRA layers sit in reference cycles (their forward bound to themselves): without a
        # collection their 2 GiB of fp32 adapters stayed allocated into the next row's peak (collected
        # here, freed once this function's optimizer and parameter list go).
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    log(f"train {setting.name}: {result}")
    return result


def time_generation(
    model,
    processor,
    sample,
    batch_size: int,
    new_tokens: int,
    log: Callable[[str], None],
    cache: str | None = None,
    kind: str = "nf4 (random weights)",
    prompt_lookup: int = 0,
    measure_prefill: bool = False,
):
    """Seconds per image of greedy generation of exactly `new_tokens` tokens; `cache="static"` uses a
    static KV cache, with which transformers compiles the decoding step (CUDA graphs); `prompt_lookup`
    drafts that many tokens per step (batch 1, dynamic cache; with random weights the drafts are
    accepted at random, so `forward_passes` says how many steps it took)."""
    from pcbvlm.generate import LoadedModel, generate_batch

    model.eval()
    model.config.use_cache = True
    processor.tokenizer.padding_side = "left"
    loaded = LoadedModel(model, processor, kind, "bench")
    messages = [m for m in [sample["messages"][:-1]] * batch_size]
    _reset_peak()
    result: dict[str, Any] = {
        "model": kind,
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "cache": cache or "dynamic",
    }
    if prompt_lookup:
        result["prompt_lookup_tokens"] = prompt_lookup
    passes: list[int] = []
    # Forward passes, counted on the eager paths only (a hook inside a compiled step would be traced).
    counter = model.register_forward_pre_hook(lambda *_: passes.append(1)) if not cache else None
    try:
        # Warm-up: kernels and, with a static cache, the compilation (same batch shape and length).
        begin = time.perf_counter()
        warm = messages if cache else messages[:1]
        generate_batch(
            loaded,
            warm,
            new_tokens if cache else 4,
            min_new_tokens=4,
            cache_implementation=cache,
            prompt_lookup_tokens=prompt_lookup,
        )
        _sync()
        result["warmup_s"] = round(time.perf_counter() - begin, 1)
        passes.clear()
        begin = time.perf_counter()
        outputs = generate_batch(
            loaded,
            messages,
            new_tokens,
            min_new_tokens=new_tokens,
            cache_implementation=cache,
            prompt_lookup_tokens=prompt_lookup,
        )
        _sync()
        seconds = time.perf_counter() - begin
        generated = len(outputs[0][2])
        timed_passes = len(passes)
        if batch_size == 1 or measure_prefill:
            # The prompt's share: the same call with one new token (prefill + one step).
            begin = time.perf_counter()
            generate_batch(loaded, messages, 1, min_new_tokens=1, cache_implementation=cache)
            _sync()
            result["prefill_s"] = round(time.perf_counter() - begin, 3)
        if counter is not None:
            result["forward_passes"] = timed_passes
            result["ms_per_forward_pass"] = round(1000 * seconds / max(timed_passes, 1), 2)
        result.update(
            status="ok",
            generated_tokens=generated,
            s_per_image=round(seconds / batch_size, 4),
            ms_per_token_step=round(1000 * seconds / max(generated, 1), 2),
            peak_gib=_peak_gib(),
        )
    except torch.OutOfMemoryError:
        result.update(status="out of memory under the cap", peak_gib=_peak_gib())
    except Exception as exc:  # e.g. compilation failing with a static cache: record it, go on
        result.update(status=f"failed: {type(exc).__name__}: {str(exc)[:300]}")
        log(traceback.format_exc(limit=12))
    if counter is not None:
        counter.remove()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log(f"generate {kind} batch {batch_size} ({result['cache']} cache): {result}")
    return result


def time_graph_generation(
    model,
    processor,
    sample,
    batch_size: int,
    new_tokens: int,
    log: Callable[[str], None],
    draft_tokens: int = 0,
    kind: str = "int4 graph",
    compile_step: bool = False,
) -> dict[str, Any]:
    """Like `time_generation`, through `pcbvlm.graphdecode.GraphDecoder` (static cache, the whole decoding
    step one CUDA graph, grouped attention; `draft_tokens` verified per step at batch 1). The warm-up call
    captures the graph; `prefill_s` is a call that decodes nothing after the prompt's pass."""
    from pcbvlm.collator import image_paths, load_image
    from pcbvlm.generate import IMAGE_TOKENS
    from pcbvlm.graphdecode import GraphDecoder

    model.eval()
    tok = processor.tokenizer
    tok.padding_side = "left"
    messages = [sample["messages"][:-1]] * batch_size
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    images = [load_image(p) for m in messages for p in image_paths(m)]
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt").to(model.device)
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    suppress = [tok.convert_tokens_to_ids(t) for t in IMAGE_TOKENS]
    result: dict[str, Any] = {
        "model": kind,
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "cache": "static",
    }
    if draft_tokens:
        result["draft_tokens"] = draft_tokens
    result["compiled_step"] = compile_step
    _reset_peak()
    try:
        decoder = GraphDecoder(model, suppress, eos, tok.pad_token_id, compile_step=compile_step)
        begin = time.perf_counter()
        decoder.generate(dict(inputs), new_tokens, new_tokens, draft_tokens)
        _sync()
        result["warmup_s"] = round(time.perf_counter() - begin, 1)
        begin = time.perf_counter()
        out = decoder.generate(dict(inputs), new_tokens, new_tokens, draft_tokens)
        _sync()
        seconds = time.perf_counter() - begin
        begin = time.perf_counter()
        decoder.generate(dict(inputs), 1, 1, draft_tokens)
        _sync()
        prefill = time.perf_counter() - begin
        result.update(
            status="ok",
            generated_tokens=int((out.tokens[0] != tok.pad_token_id).sum()),
            # the first image's answer, to compare the rows' greedy tokens (same weights, same answer)
            first_tokens=out.tokens[0, :48].tolist(),
            forward_passes=out.steps,
            ms_per_forward_pass=round(1000 * (seconds - prefill) / max(out.steps, 1), 2),
            prefill_s=round(prefill, 3),
            s_per_image=round(seconds / batch_size, 4),
            ms_per_token_step=round(1000 * seconds / new_tokens, 2),
            peak_gib=_peak_gib(),
        )
        del decoder
    except torch.OutOfMemoryError:
        result.update(status="out of memory under the cap", peak_gib=_peak_gib())
    except Exception as exc:
        result.update(status=f"failed: {type(exc).__name__}: {str(exc)[:300]}")
        log(traceback.format_exc(limit=12))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log(f"generate {kind} batch {batch_size}: {result}")
    return result


def configured_setting(cfg, name: str = "configured") -> Setting:
    """The training job's own setting, read from the config (config/config.yaml)."""
    t = cfg.train
    fused = t.fused_kernels != "none"  # the benchmark's GPU has liger-kernel: auto means on
    label = (
        f"{name} (mb {t.micro_batch}, answer logits, dropout {cfg.lora.dropout:g}, "
        f"{'Liger' if fused else 'no fused kernels'}, {t.uncheckpointed_layers} layers uncheckpointed"
        f"{', fused LoRA adds' if t.fused_lora else ''}{', fused SwiGLU' if fused and t.fused_swiglu else ''}"
        f"{', offloaded checkpoints' if t.offload_checkpoints and t.gradient_checkpointing else ''}"
        f"{', compiled layers' if t.compile_layers else ''})"
    )
    return Setting(
        label,
        t.micro_batch,
        grad_accum=t.grad_accum,
        lora_dropout=cfg.lora.dropout,
        gradient_checkpointing=t.gradient_checkpointing,
        fused_kernels=fused,
        uncheckpointed_layers=t.uncheckpointed_layers,
        fused_lora=t.fused_lora,
        fused_swiglu=fused and t.fused_swiglu,
        offload_checkpoints=t.offload_checkpoints,
        compile_layers=t.compile_layers,
        profile=True,
    )


NAIVE = Setting(
    "naive baseline (mb 1 x accum 8, fp32 upcast, full logits)",
    1,
    grad_accum=8,
    answer_logits=False,
    naive=True,
)


def train_plan(cfg, plan: str) -> list[Setting]:
    """The training settings of one benchmark run. `full`: the configured setting, the levers one by one
    and the naive baseline; `headline`: the configured setting and the naive baseline only (a second,
    longer sample of the headline ratio); `explore`: a wider sweep meant for a cut model (--layers 8)."""
    configured = configured_setting(cfg)
    mb = cfg.train.micro_batch
    if plan == "headline":
        return [configured, NAIVE]
    if plan == "explore":
        return [
            Setting("mb 16, dropout 0.05, no fused kernels", 16, profile=True),
            Setting("mb 16, dropout 0", 16, lora_dropout=0.0),
            Setting("mb 16, Liger", 16, fused_kernels=True),
            Setting("mb 16, Liger, dropout 0", 16, lora_dropout=0.0, fused_kernels=True, profile=True),
            Setting(
                "mb 16, Liger, dropout 0, 4 uncheckpointed",
                16,
                lora_dropout=0.0,
                fused_kernels=True,
                uncheckpointed_layers=4,
            ),
            Setting(
                "mb 16, Liger, dropout 0, no checkpointing",
                16,
                lora_dropout=0.0,
                fused_kernels=True,
                gradient_checkpointing=False,
            ),
            Setting(
                "mb 8, Liger, dropout 0, no checkpointing",
                8,
                lora_dropout=0.0,
                fused_kernels=True,
                gradient_checkpointing=False,
            ),
            Setting("mb 32, Liger, dropout 0", 32, lora_dropout=0.0, fused_kernels=True),
            NAIVE,
        ]
    k = cfg.train.uncheckpointed_layers
    return [
        configured,
        Setting(f"mb {mb}, Liger, all layers checkpointed", mb, lora_dropout=0.0, fused_kernels=True),
        Setting(f"mb {mb}, no fused kernels, all checkpointed", mb, lora_dropout=0.0),
        Setting(
            f"mb {mb}, no fused kernels, all checkpointed, peft's fp32 adapter inputs",
            mb,
            lora_dropout=0.0,
            cast_lora_inputs=True,
        ),
        Setting(
            f"previous default: mb {mb}, dropout 0.05, peft's fp32 adapter inputs, all checkpointed",
            mb,
            lora_dropout=0.05,
            cast_lora_inputs=True,
        ),
        Setting(f"mb {mb}, dropout 0.05, Liger, all checkpointed", mb, lora_dropout=0.05, fused_kernels=True),
        Setting(
            f"mb {mb // 2}, Liger, {min(2 * k + 4, 64)} uncheckpointed",
            mb // 2,
            lora_dropout=0.0,
            fused_kernels=True,
            uncheckpointed_layers=min(2 * k + 4, 64),
        ),
        NAIVE,
    ]


def attach_estimate(result: dict[str, Any], shape, cfg) -> None:
    """The preflight's estimate of a measured training setting, and its error against the measured peak."""
    from pcbvlm.preflight.estimate import estimate_train_vram

    setting = result["setting"]
    cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"dropout": setting["lora_dropout"]})})
    estimate = estimate_train_vram(
        shape,
        cfg,
        micro_batch=setting["micro_batch"],
        seq_len=result["tokens_per_sample"],
        grad_accum=setting["grad_accum"],
        precision="fp32" if setting["naive"] else "bf16",
        logit_tokens=result["answer_tokens"] + 1 if setting["answer_logits"] else result["tokens_per_sample"],
        gradient_checkpointing=setting["gradient_checkpointing"] or setting["naive"],
        uncheckpointed_layers=setting["uncheckpointed_layers"],
        fused_cross_entropy=setting["fused_kernels"],
        fused_swiglu=setting.get("fused_swiglu", False),
    )
    result["preflight_estimate_gib"] = round(estimate.total_gib, 2)
    result["estimate_error"] = round(estimate.total_gib / result["peak_gib"] - 1, 4)


def benchmark_model_config(tok, layers: int | None = None, family: str = "qwen3_vl", **overrides):
    """The family's 32B config (or a cut of `layers` decoder layers), with the benchmark tokenizer's
    special ids."""
    from pcbvlm.families import get_family

    if layers is not None:
        overrides["num_hidden_layers"] = layers
    config = get_family(family).config_32b(**overrides)
    # The tiny tokenizer's ids for the special tokens the model looks for.
    config.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
    config.vision_start_token_id = tok.convert_tokens_to_ids("<|vision_start|>")
    config.vision_end_token_id = tok.convert_tokens_to_ids("<|vision_end|>")
    config.video_token_id = tok.convert_tokens_to_ids("<|video_pad|>")
    return config


def run_benchmark(
    out_path: Path,
    parts: tuple[str, ...] = ("train", "generate"),
    cap_gib: float = 80.0,
    steps: int = 3,
    layers: int | None = None,
    train_settings: list[Setting] | None = None,
    generate_batches: tuple[int, ...] = (1, 32, 128, 192),
    new_tokens: int = 170,
    plan: str = "full",
    profile: bool = False,
    static_cache_batches: tuple[int, ...] = (),
    family: str = "qwen3_vl",
) -> dict[str, Any]:
    from pcbvlm.collator import TrainCollator
    from pcbvlm.config import load_config
    from pcbvlm.shapes import ModelShape, count_parameters

    def log(message: str) -> None:
        print(message, flush=True)

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "config" / "config.yaml")
    processor = benchmark_processor(cfg.data.max_pixels, family)
    config = benchmark_model_config(processor.tokenizer, layers, family)
    shape = ModelShape.from_config(config)
    counts = count_parameters(shape)

    props = torch.cuda.get_device_properties(0)
    begin = time.perf_counter()
    model = build_random_model(config)
    build_s = time.perf_counter() - begin
    weights_gib = gib(torch.cuda.memory_allocated())
    log(f"built {counts.total / 1e9:.2f} B parameters in {build_s:.0f} s; NF4 model {weights_gib} GiB")
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / props.total_memory))

    work = out_path.parent
    sample = benchmark_sample(work, cfg, family=family)
    # Vision patches of the sample's board (Qwen3-VL: 640x640 / 16^2 = 1600).
    patches = int(TrainCollator(processor).encode(sample)["image_grid_thw"].prod())
    results: dict[str, Any] = {
        "family": family,
        "gpu": props.name,
        "gpu_total_gib": gib(props.total_memory),
        "cap_gib": cap_gib,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "parameters": counts.total,
        "layers": shape.num_layers,
        "nf4_model_gib": weights_gib,
        "build_s": round(build_s, 1),
        "note": "H200 (sm90): compute about 2.2x an A800's dense bf16 rate (989 vs 312 TFLOP/s), "
        "memory bandwidth 4.8 vs 2.0 TB/s; the 80 GiB cap emulates the A800's memory, not its speed.",
        "train": [],
        "generate": [],
    }

    if "train" in parts:
        settings = train_settings or train_plan(cfg, plan)
        for setting in settings:
            result = time_training(
                model,
                cfg,
                processor,
                sample,
                setting,
                steps,
                log,
                profile=profile and setting.profile,
            )
            if result.get("status") == "ok":
                text_tokens = result["tokens_per_sample"]
                flops = model_flops_per_sample(counts, shape, text_tokens, patches, result["lora_parameters"])
                result["model_tflops_per_sample"] = round(flops / 1e12, 2)
                result["mfu"] = round(flops / result["s_per_sample"] / H200_PEAK_BF16, 4)
            if isinstance(result.get("peak_gib"), float):
                attach_estimate(result, shape, cfg)
            results["train"].append(result)
            _write(out_path, results)
        ok = [r for r in results["train"] if r.get("status") == "ok"]
        naive = next((r for r in ok if r["setting"]["naive"]), None)
        if naive:
            for r in ok:
                r["speedup_vs_naive"] = round(naive["s_per_sample"] / r["s_per_sample"], 2)

    if "generate" in parts:
        runs = [(b, None) for b in generate_batches] + [(b, "static") for b in static_cache_batches]
        for batch_size, cache in runs:
            results["generate"].append(
                time_generation(model, processor, sample, batch_size, new_tokens, log, cache)
            )
            _write(out_path, results)
    _write(out_path, results)
    return results


def _write(path: Path, results: dict[str, Any]) -> None:
    from pcbvlm.io import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, results)


def markdown_table(results: dict[str, Any]) -> str:
    lines = [
        f"GPU: {results['gpu']} (capped at {results['cap_gib']} GiB), torch {results['torch']} (CUDA {results['cuda']}), "
        f"{results['parameters'] / 1e9:.2f} B parameters, NF4 model {results['nf4_model_gib']} GiB.",
        "",
        "| training setting | s/sample | samples/s | tokens/s | MFU | peak GiB | preflight est. GiB | vs naive |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["train"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['setting']['name']} | {r['status']} | | | | {r.get('peak_gib')} | | |")
            continue
        lines.append(
            f"| {r['setting']['name']} | {r['s_per_sample']} | {r['samples_per_s']} | {r['tokens_per_s']} | "
            f"{r['mfu']:.1%} | {r['peak_gib']} | {r.get('preflight_estimate_gib')} ({r.get('estimate_error', 0):+.0%}) | "
            f"{r.get('speedup_vs_naive', '-')}x |"
        )
    lines += [
        "",
        "| generation batch | KV cache | new tokens | s/image | ms per token step | peak GiB | warm-up s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["generate"]:
        cache = r.get("cache", "dynamic")
        if r.get("status") != "ok":
            lines.append(f"| {r['batch_size']} | {cache} | {r['status']} | | | {r.get('peak_gib')} | |")
            continue
        lines.append(
            f"| {r['batch_size']} | {cache} | {r['generated_tokens']} | {r['s_per_image']} | "
            f"{r['ms_per_token_step']} | {r['peak_gib']} | {r.get('warmup_s', '')} |"
        )
    return "\n".join(lines) + "\n"


def summary_json(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=2)


# ------------------------------------------------------------------------------------------------------
# The quantized model's inference paths (pcbvlm.int4) against NF4


def quantize_language_model_int4(model, kernel: str, group_size: int = 128, seed: int = 0) -> int:
    """Replace the decoder linears of `model.model.language_model` (plain or already int4) by `Int4Linear`s
    built from random weights in compressed-tensors' packed form (random int32 words + scales), through
    the same `Int4Linear.from_compressed` repacking a `make quantize` folder goes through; one at a time.
    `make quantize` itself (llm-compressor, ~1 h for the 32B) is not what is measured here."""
    from pcbvlm.int4 import Int4Linear, random_compressed_linear

    generator = torch.Generator(device=model.device).manual_seed(seed)
    count = 0
    for _, module in list(model.model.language_model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear | Int4Linear):
                continue
            words, scale = random_compressed_linear(
                child.out_features, child.in_features, group_size, model.device, generator
            )
            layer = Int4Linear.from_compressed(
                words, scale, child.in_features, group_size, kernel, torch.bfloat16
            )
            setattr(module, child_name, layer)
            del child, words, scale
            count += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return count


def _prompt_and_answer_ids(processor, sample) -> tuple[list[int], list[int]]:
    """The token ids of a training sample's prompt (chat template, generation prompt) and of its answer."""
    tok = processor.tokenizer
    prompt = processor.apply_chat_template(
        sample["messages"][:-1], tokenize=False, add_generation_prompt=True
    )
    answer = sample["messages"][-1]["content"]
    answer = answer if isinstance(answer, str) else "".join(c.get("text", "") for c in answer)
    return (
        tok(prompt, add_special_tokens=False)["input_ids"],
        tok(answer, add_special_tokens=False)["input_ids"],
    )


def prompt_lookup_passes(processor, sample, num_tokens: int) -> dict[str, int]:
    """Forward passes prompt-lookup decoding takes for the sample's real answer if the model's greedy
    answer is that answer: transformers' own `PromptLookupCandidateGenerator` drafts from the prompt and
    the tokens so far (image tokens barred, as in `generate_batch`); each pass keeps the drafted tokens
    that match plus the model's own next one. Random weights cannot show this (their answers are noise),
    so the benchmark reports it beside the measured cost of a pass."""
    from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    from pcbvlm.generate import IMAGE_TOKENS

    tok = processor.tokenizer
    prompt_ids, answer_ids = _prompt_and_answer_ids(processor, sample)
    barred = [tok.convert_tokens_to_ids(t) for t in IMAGE_TOKENS]
    generator = PromptLookupCandidateGenerator(
        num_output_tokens=num_tokens,
        max_length=len(prompt_ids) + len(answer_ids) + 1,
        logits_processor=LogitsProcessorList([SuppressTokensLogitsProcessor(barred)]),
        vocab_size=len(tok),
    )
    ids, done, passes = list(prompt_ids), 0, 0
    while done < len(answer_ids):
        candidates, _ = generator.get_candidates(torch.tensor([ids]))
        drafted = candidates[0, len(ids) :].tolist()
        matched = 0
        while (
            matched < len(drafted)
            and done + matched < len(answer_ids)
            and drafted[matched] == answer_ids[done + matched]
        ):
            matched += 1
        kept = min(matched + 1, len(answer_ids) - done)
        ids += answer_ids[done : done + kept]
        done += kept
        passes += 1
    return {"answer_tokens": len(answer_ids), "forward_passes": passes, "draft_tokens": num_tokens}


@torch.inference_mode()
def int4_kernel_floor(model, rows: tuple[int, ...] = (1, 4, 8, 16, 128)) -> dict[str, Any]:
    """The decoder's int4 linears alone: one pass over all of them (a CUDA graph on CUDA) per number of
    rows, in ms, and on CUDA the triton kernel's largest relative error against the dequantized matmul
    per layer shape (the layout must hold plain nibbles: `dequant` or `triton`). Under inference mode,
    like generation: the compiled read-backs of `pcbvlm.int4` are guarded on the grad mode, and a
    second set of compilations (5 layer shapes each) ran into dynamo's recompile limit of 8 on the
    H200 (2026-11-30), after which the remaining shapes read their weights back eagerly."""
    import torch.nn.functional as F

    from pcbvlm.int4 import Int4Linear

    layers = [m for m in model.model.language_model.modules() if isinstance(m, Int4Linear)]
    result: dict[str, Any] = {"kernel": layers[0].kernel, "linears": len(layers), "ms_per_pass": {}}
    if layers[0].kernel in ("dequant", "triton"):
        errors = {}
        for layer in layers[:7]:
            for m in (1, 16, 128):
                x = torch.randn(m, layer.in_features, dtype=layer.scales.dtype, device=layer.scales.device)
                expected = F.linear(x, layer.dequantized_weight()).float()
                got = layer(x).float()
                key = f"{layer.out_features}x{layer.in_features}"
                error = ((got - expected).norm() / expected.norm()).item()
                errors[key] = max(errors.get(key, 0.0), round(error, 6))
        result["relative_error_vs_dequantized"] = errors
    for m in rows:
        inputs = {}
        for layer in layers:
            if layer.in_features not in inputs:
                inputs[layer.in_features] = torch.randn(
                    m, layer.in_features, dtype=torch.bfloat16, device=model.device
                )

        def one_pass(inputs=inputs):
            for layer in layers:
                layer(inputs[layer.in_features])

        try:
            one_pass()
            _sync()
            if torch.cuda.is_available():
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    one_pass()
                run = graph.replay
            else:
                run = one_pass
            run()
            _sync()
            begin = time.perf_counter()
            for _ in range(3):
                run()
            _sync()
            result["ms_per_pass"][m] = round(1000 * (time.perf_counter() - begin) / 3, 2)
            del run
        except Exception as exc:
            result["ms_per_pass"][m] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def graph_draft_passes(processor, sample, drafts: tuple[int, ...]) -> dict[str, Any]:
    """Decoding steps `GraphDecoder` would take with each number of drafts if the model's greedy answer
    were the sample's real answer (random weights cannot show this; see `prompt_lookup_passes`)."""
    from pcbvlm.generate import IMAGE_TOKENS
    from pcbvlm.graphdecode import drafted_passes

    tok = processor.tokenizer
    prompt_ids, answer_ids = _prompt_and_answer_ids(processor, sample)
    barred = {tok.convert_tokens_to_ids(t) for t in IMAGE_TOKENS}
    return {
        "answer_tokens": len(answer_ids),
        "steps_by_drafts": {k: drafted_passes(prompt_ids, answer_ids, k, barred) for k in (0, *drafts)},
    }


def smoke_config(layers: int = 2, family: str = "qwen3_vl"):
    """A narrow model of the family (hidden 256, a one-block vision tower) with the 32B's vocabulary, to
    run the whole benchmark command on a CPU before spending GPU time on it."""
    from pcbvlm.families import get_family

    config = get_family(family).config_32b(
        num_hidden_layers=layers,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    vision = config.vision_config
    vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads = 1, 64, 128, 2
    # The one block is Qwen3-VL's deepstack feature source, or Qwen2.5-VL's full-attention block.
    for indexes in ("deepstack_visual_indexes", "fullatt_block_indexes"):
        if hasattr(vision, indexes):
            setattr(vision, indexes, [0])
    vision.out_hidden_size = 256
    return config


# The benchmark's rows: tinygemm up to this batch size, the dequant layout above (and, for
# `tinygemm_batches`, tinygemm's read-back to bf16), so both batched layouts are measured.
BENCH_TINYGEMM_MAX_BATCH = 4


def bench_kernel(batch_size: int) -> str:
    return "tinygemm" if batch_size <= BENCH_TINYGEMM_MAX_BATCH else "dequant"


def run_int4_benchmark(
    out_path: Path,
    batches: tuple[int, ...] = (1, 32, 128),
    static_batches: tuple[int, ...] = (1,),
    nf4_batches: tuple[int, ...] = (),
    tinygemm_batches: tuple[int, ...] = (),
    prompt_lookup: int = 0,
    new_tokens: int = 230,
    cap_gib: float = 80.0,
    layers: int | None = None,
    deadline_s: float | None = None,
    smoke: bool = False,
    family: str = "qwen3_vl",
    graph_batches: tuple[int, ...] = (),
    graph_drafts: tuple[int, ...] = (),
    graph_kernels: tuple[str, ...] = ("tinygemm",),
    graph_compile: tuple[bool, ...] = (False,),
    kernel_floor: bool = False,
    static_last: bool = False,
) -> dict[str, Any]:
    """Generation with the quantized model's int4 paths on the 32B shape (random weights), each batch size
    with the layout `bench_kernel` gives it (tinygemm up to 4 images, dequant above),
    batch sizes in `static_batches` also with the compiled static cache; then, if time is left before
    `deadline_s` (seconds after the start), NF4 at `nf4_batches` on a fresh NF4 model. First of all, the
    `GraphDecoder` rows (`pcbvlm.graphdecode`) on the tinygemm layout: `graph_batches`, and batch 1 with
    each number of drafted tokens in `graph_drafts`, for each layout in `graph_kernels` and each of
    `graph_compile` (the step through torch.compile before capture, or not) (with
    `kernel_floor`, the int4 linears alone per layout first: `int4_kernel_floor`). Every setting is written to `out_path` as soon as
    it is measured."""
    from pcbvlm.config import load_config
    from pcbvlm.families import get_family
    from pcbvlm.int4 import int4_storage
    from pcbvlm.shapes import ModelShape, count_parameters

    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    def time_left() -> bool:
        return deadline_s is None or time.perf_counter() - started < deadline_s

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "config" / "config.yaml")
    processor = benchmark_processor(cfg.data.max_pixels if not smoke else 65536, family)
    tok = processor.tokenizer
    if smoke:
        config = smoke_config(layers or 2, family)
    else:
        config = get_family(family).config_32b(**({} if layers is None else {"num_hidden_layers": layers}))
    config.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
    config.vision_start_token_id = tok.convert_tokens_to_ids("<|vision_start|>")
    config.vision_end_token_id = tok.convert_tokens_to_ids("<|vision_end|>")
    config.video_token_id = tok.convert_tokens_to_ids("<|video_pad|>")
    counts = count_parameters(ModelShape.from_config(config))
    cuda = torch.cuda.is_available()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sample = benchmark_sample(out_path.parent, cfg, family=family)
    results: dict[str, Any] = {
        "family": family,
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu (smoke run)",
        "cap_gib": cap_gib,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "parameters": counts.total,
        "layers": config.text_config.num_hidden_layers,
        "new_tokens": new_tokens,
        "note": "random weights; int4 linears built from random packed words through "
        "Int4Linear.from_compressed (the path of a `make quantize` folder); the 80 GiB cap emulates the "
        "A800's memory, not its speed (4.8 vs 2.0 TB/s).",
        "generate": [],
    }
    if prompt_lookup:
        results["prompt_lookup_real_answer"] = prompt_lookup_passes(processor, sample, prompt_lookup)
        log(f"prompt lookup on the sample's real answer: {results['prompt_lookup_real_answer']}")
    if graph_drafts:
        results["graph_drafts_real_answer"] = graph_draft_passes(processor, sample, graph_drafts)
        log(f"drafted decoding on the sample's real answer: {results['graph_drafts_real_answer']}")

    def build(quantize: str):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("cuda" if cuda else "cpu"):
                model = get_family(family).model_class()(config)
        finally:
            torch.set_default_dtype(previous)
        if quantize == "nf4":
            quantize_language_model_nf4(model, torch.bfloat16)
        return model

    begin = time.perf_counter()
    kernel = graph_kernels[0] if graph_batches or graph_drafts else bench_kernel(batches[0] if batches else 1)
    model = build("bf16")
    quantize_language_model_int4(model, kernel)
    results["int4_build_s"] = round(time.perf_counter() - begin, 1)
    storage = int4_storage(model)
    results["int4_storage"] = storage
    results["int4_bits_per_weight"] = round(
        8 * (storage["packed_bytes"] + storage["scale_bytes"]) / storage["weights"], 3
    )
    if cuda:
        results["int4_model_gib"] = gib(torch.cuda.memory_allocated())
        props = torch.cuda.get_device_properties(0)
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / props.total_memory))
    log(
        f"int4 model built ({kernel}): {results.get('int4_model_gib')} GiB, {results['int4_bits_per_weight']} bits/weight"
    )

    # (batch, cache, prompt-lookup tokens, kernel), most telling first: batch 1 (static, dynamic,
    # dynamic + prompt lookup), then the batched sizes with the kernel auto picks, then the batched sizes
    # on the tinygemm layout (many-row calls read its weights back to bf16: no second copy needed).
    runs = [(b, "static", 0, bench_kernel(b)) for b in static_batches]
    runs += [(b, None, 0, bench_kernel(b)) for b in batches if b <= BENCH_TINYGEMM_MAX_BATCH]
    if prompt_lookup and 1 in batches:
        runs.append((1, None, prompt_lookup, "tinygemm"))
    runs += [
        (b, None, 0, bench_kernel(b)) for b in sorted(batches, reverse=True) if b > BENCH_TINYGEMM_MAX_BATCH
    ]
    runs += [(b, None, 0, "tinygemm") for b in tinygemm_batches]
    graph_runs = [
        (b, k, compiled)
        for compiled in graph_compile
        for b, k in [(b, 0) for b in graph_batches] + [(1, k) for k in graph_drafts]
    ]
    results["kernel_floor"] = []
    for graph_kernel in graph_kernels if graph_runs or kernel_floor else ():
        if not time_left():
            break
        if graph_kernel != kernel:
            kernel = graph_kernel
            quantize_language_model_int4(model, kernel)
            log(f"int4 linears repacked for the {kernel} kernel")
        if kernel_floor:
            results["kernel_floor"].append(int4_kernel_floor(model))
            log(f"int4 linears alone: {results['kernel_floor'][-1]}")
            _write(out_path, results)
        for batch_size, drafts, compiled in graph_runs:
            label = f"int4 {kernel}, graph decoder" + (" compiled" if compiled else "")
            label += f" + {drafts} drafts" if drafts else ""
            if not time_left():
                results["generate"].append(
                    {
                        "model": label,
                        "batch_size": batch_size,
                        "cache": "static",
                        "status": "skipped: out of time",
                    }
                )
                continue
            results["generate"].append(
                time_graph_generation(
                    model, processor, sample, batch_size, new_tokens, log, drafts, label, compiled
                )
            )
            _write(out_path, results)

    def run_rows(model, kernel: str, rows) -> str:
        for batch_size, cache, lookup, wanted in rows:
            if not time_left():
                results["generate"].append(
                    {
                        "model": f"int4 {wanted}",
                        "batch_size": batch_size,
                        "cache": cache or "dynamic",
                        "status": "skipped: out of time",
                    }
                )
                continue
            if wanted != kernel:
                kernel = wanted
                quantize_language_model_int4(model, kernel)
                log(f"int4 linears repacked for the {kernel} kernel")
            readback = sum(getattr(m, "unpack_order", None) is not None for m in model.modules())
            label = f"int4 {kernel}" + (f" + prompt lookup {lookup}" if lookup else "")
            result = time_generation(
                model,
                processor,
                sample,
                batch_size,
                new_tokens,
                log,
                cache,
                kind=label,
                prompt_lookup=lookup,
                measure_prefill=True,
            )
            result["tinygemm_layers_read_back_for_many_rows"] = readback
            results["generate"].append(result)
            _write(out_path, results)
        return kernel

    # static_last: transformers' compiled static-cache rows (~100 s of compilation each) after NF4, so a
    # deadline cuts them first.
    late = [r for r in runs if static_last and r[1] == "static"]
    kernel = run_rows(model, kernel, [r for r in runs if r not in late])

    model = None  # frees the int4 model before NF4 is built
    if cuda:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    if nf4_batches and time_left():
        begin = time.perf_counter()
        model = build("nf4")
        results["nf4_build_s"] = round(time.perf_counter() - begin, 1)
        if cuda:
            results["nf4_model_gib"] = gib(torch.cuda.memory_allocated())
            props = torch.cuda.get_device_properties(0)
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / props.total_memory))
        for batch_size in nf4_batches:
            if not time_left():
                results["generate"].append(
                    {
                        "model": "nf4",
                        "batch_size": batch_size,
                        "cache": "dynamic",
                        "status": "skipped: out of time",
                    }
                )
                continue
            results["generate"].append(
                time_generation(
                    model,
                    processor,
                    sample,
                    batch_size,
                    new_tokens,
                    log,
                    None,
                    kind="nf4",
                    measure_prefill=True,
                )
            )
            _write(out_path, results)
    if late:
        model = None
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
        if time_left():
            model = build("bf16")
            kernel = late[0][3]
            quantize_language_model_int4(model, kernel)
            if cuda:
                props = torch.cuda.get_device_properties(0)
                torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / props.total_memory))
        run_rows(model if time_left() else None, kernel, late)
    results["seconds"] = round(time.perf_counter() - started, 1)
    _write(out_path, results)
    return results


def int4_chart(results: dict[str, Any], path: Path, notes: dict[tuple[str, int], str] | None = None) -> Path:
    """Bars of measured s/image per path (batch 1 and batched side by side) with the goals as lines;
    `notes` ((model, batch) -> text) are appended to those bars' labels (e.g. why a figure is not valid)."""
    notes = notes or {}
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pcbvlm.io import atomic_write_figure

    rows = [r for r in results["generate"] if r.get("status") == "ok"]
    figure = Figure(figsize=(11, 5.5))
    FigureCanvasAgg(figure)
    for axis, (title, keep, goal) in zip(
        figure.subplots(1, 2),
        (("batch 1", lambda r: r["batch_size"] == 1, 1.5), ("batched", lambda r: r["batch_size"] > 1, 0.10)),
        strict=True,
    ):
        chosen = [r for r in rows if keep(r)]
        labels = [
            f"{r['model']} ({r['cache']}, b{r['batch_size']})"
            + (f"\n{notes[(r['model'], r['batch_size'])]}" if (r["model"], r["batch_size"]) in notes else "")
            for r in chosen
        ]
        values = [r["s_per_image"] for r in chosen]
        axis.barh(range(len(values)), values, color="tab:blue")
        axis.set_yticks(range(len(values)), labels, fontsize=7)
        axis.invert_yaxis()
        axis.axvline(goal, color="tab:red", linestyle="--", label=f"goal {goal} s/image")
        for i, value in enumerate(values):
            axis.text(value, i, f" {value:.3g}", va="center", fontsize=7)
        axis.set_xscale("log")
        axis.set_xlabel("s/image (measured, log scale)")
        axis.set_title(f"{title}, {results['new_tokens']} new tokens")
        axis.legend(fontsize=7, loc="lower right")
    figure.suptitle(f"Qwen3-VL-32B shape, random weights, {results['gpu']}, {results['cap_gib']} GiB cap")
    figure.tight_layout()
    return atomic_write_figure(figure, path, dpi=110)


A800_BANDWIDTH_RATIO = 4.8 / 2.0  # H200 / A800 memory bandwidth: decoding reads every weight per token


def int4_markdown_table(results: dict[str, Any]) -> str:
    lines = [
        f"{results['gpu']} (capped at {results['cap_gib']} GiB), torch {results['torch']}, "
        f"{results['parameters'] / 1e9:.2f} B parameters, {results['layers']} layers, "
        f"int4 model {results.get('int4_model_gib')} GiB ({results.get('int4_bits_per_weight')} bits per LM weight), "
        f"{results['new_tokens']} new tokens.",
        "",
        "| model / kernel | batch | KV cache | s/image (measured) | ms per token step | forward passes | prefill s | peak GiB | warm-up s | s/image A800 (projected) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["generate"]:
        if r.get("status") != "ok":
            lines.append(
                f"| {r['model']} | {r['batch_size']} | {r['cache']} | {r['status']} | | | | {r.get('peak_gib')} | | |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['cache']} | {r['s_per_image']} | {r['ms_per_token_step']} | "
            f"{r.get('forward_passes', '')} | {r.get('prefill_s', '')} | "
            f"{r['peak_gib']} | {r.get('warmup_s', '')} | {r['s_per_image'] * A800_BANDWIDTH_RATIO:.3g} |"
        )
    return "\n".join(lines) + "\n"
