"""`make quantize`: AWQ W4A16 of the merged model with llm-compressor, saved in compressed-tensors format.

The language model's decoder linears get 4-bit symmetric integer weights in groups of
`quantize.group_size` input channels (one scale each; at 128 this is llm-compressor's W4A16 preset) after
AWQ has rescaled their input channels on calibration activations. The vision tower and lm_head stay in
the merged model's dtype (`quantize.ignore`). Calibration data is the project's own training set: N
samples of train.jsonl (`quantize.num_calibration_samples`), each the full training chat (image, prompt
and answer) encoded exactly as in training (`TrainCollator.encode`), cut at `quantize.max_seq_length`.
llm-compressor runs the model one decoder layer at a time (its sequential pipeline), so only one layer
and the cached activations need to be on the GPU; the model itself stays in CPU RAM.

The result is the folder `vllm serve` takes: `config.json` with a compressed-tensors `quantization_config`,
safetensors with `*.weight_packed` (int32, 8 weights each) + `*.weight_scale` per quantized linear, the
processor files and generation config. Before it is published (`<out>.partial-<pid>` renamed when
complete) it is loaded back with transformers and compared with the merged model on a few validation
samples: teacher-forced logits, and greedy answers parsed into boxes. `quantize.json` holds the figures.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pcbvlm.config import Config
from pcbvlm.errors import DataError, UserError
from pcbvlm.families import ModelFamily, family_for
from pcbvlm.io import PARTIAL_MARK, atomic_directory, atomic_write_json, is_partial
from pcbvlm.model_folder import (
    MAX_SHARD_SIZE,
    MERGED_DIR,
    QUANTIZED_DIR,
    attended_logits,
    compare_logits,
    folder_size,
    format_size,
    free_memory,
    leftover_partials,
    load_model_config,
    model_inputs,
    quantization_method,
    save_processor,
    verification_samples,
)
from pcbvlm.provenance import quantized_provenance

# The only scheme: 4-bit int weights in groups (quantize.group_size), activations in the model dtype.
SCHEME = "W4A16"
QUANTIZE_REPORT = "quantize.json"
RECIPE_FILE = "recipe.yaml"
# Enough new tokens for ~8 boxes (Qwen writes coordinates digit by digit: ~30 tokens a box). A longer
# answer is compared on its first boxes: parse_answer keeps the complete objects of a cut-off list.
VERIFY_MAX_NEW_TOKENS = 256
MATCH_IOU = 0.5  # two boxes agree when they have the same label and overlap at least this much
# A quantized model whose logit error (RMS) is as large as the logits themselves is broken (a wrong
# packing or scale gives uncorrelated logits, ~1.4), not merely 4-bit: nothing is published then. Random
# weights amplify rounding noise layer after layer, so random test models are the worst case: measured
# 0.14 (tiny, 2 layers) and 0.47 (48 layers, group 128, on an H200); trained models are far more robust.
MAX_REL_RMS_DIFF = 1.0
# ------------------------------------------------------------------------------------------------------
# Inputs


def resolve_input_model(cfg: Config, model: str | Path | None = None) -> Path:
    """The merged model folder to quantize (default `<paths.outputs_dir>/merged`), checked: complete,
    not quantized already, with its processor files."""
    source = Path(model) if model is not None else Path(cfg.paths.outputs_dir) / MERGED_DIR
    if is_partial(source):
        raise UserError(
            f"--model {source}: an unfinished folder (`{PARTIAL_MARK}*`, left by an interrupted job); "
            "use a complete one, or run `make merge` again"
        )
    if not source.is_dir():
        hint = "run `make merge` first, or pass MODEL=folder" if model is None else "pass a model folder"
        raise UserError(f"--model {source}: no such folder ({hint})")
    if not (source / "config.json").is_file():
        raise UserError(f"--model {source}: no config.json, not a complete model folder")
    missing = [n for n in ("tokenizer_config.json", "preprocessor_config.json") if not (source / n).is_file()]
    if missing:
        raise UserError(
            f"--model {source}: no processor files ({', '.join(missing)}); quantize a `make merge` output"
        )
    method = quantization_method(load_model_config(source))
    if method is not None:
        raise UserError(f"--model {source}: already quantized ({method}); quantize the merged bf16 model")
    return source


def quantize_device(cfg: Config) -> str:
    """cuda or cpu. llm-compressor calibrates on the first visible accelerator whatever it is asked, so
    quantize.device=cpu needs the GPUs hidden (`pcbvlm quantize` sets CUDA_VISIBLE_DEVICES= for it)."""
    device = cfg.quantize.device
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("quantize.device: cuda, but no GPU is visible")
    if device == "cpu" and torch.accelerator.is_available():
        raise UserError(
            "quantize.device: cpu, but an accelerator is visible and llm-compressor calibrates on it; "
            "hide it (CUDA_VISIBLE_DEVICES=) or set quantize.device=auto"
        )
    return device


def check_group_size(model, group_size: int) -> None:
    """Every quantized linear's input width must be a multiple of the group size (one scale per group)."""
    for name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.Linear)
            and ".language_model." in f".{name}"
            and module.in_features % group_size
        ):
            raise UserError(
                f"quantize.group_size: {group_size} does not divide the input width {module.in_features} of "
                f"{name}; use a divisor of it (128 for Qwen3-VL-32B)"
            )


# ------------------------------------------------------------------------------------------------------
# Calibration data


@dataclass
class CalibrationSet:
    batches: list[dict[str, torch.Tensor]]
    available: int  # training samples
    skipped: int  # prompt (image tokens included) longer than max_seq_length
    truncated: int  # answer cut at max_seq_length
    tokens: int


def calibration_set(cfg: Config, processor, dtype: torch.dtype) -> CalibrationSet:
    """`num_calibration_samples` training samples (a seeded choice), each one batch of one sequence:
    input_ids, attention_mask, mm_token_type_ids, pixel_values (in the model's dtype), image_grid_thw.
    No labels: calibration needs activations, not a loss."""
    from pcbvlm.collator import IGNORE_INDEX, TrainCollator
    from pcbvlm.samples import load_samples

    rows = load_samples(Path(cfg.paths.data_dir), "train")
    if not rows:
        raise DataError(f"{cfg.paths.data_dir}/train.jsonl: no training samples to calibrate on")
    rng = random.Random(cfg.train.seed)
    chosen = rng.sample(range(len(rows)), min(cfg.quantize.num_calibration_samples, len(rows)))
    collator = TrainCollator(processor)
    limit = cfg.quantize.max_seq_length
    batches, skipped, truncated, tokens = [], 0, 0, 0
    for index in chosen:
        enc = collator.encode(rows[index])
        prompt_length = int((enc["labels"] == IGNORE_INDEX).sum())
        if prompt_length > limit:
            # Cutting inside the prompt would cut image tokens off their pixels; the sample is left out.
            skipped += 1
            continue
        length = min(len(enc["input_ids"]), limit)
        truncated += length < len(enc["input_ids"])
        batch = {
            "input_ids": enc["input_ids"][None, :length],
            "attention_mask": torch.ones(1, length, dtype=torch.long),
            "mm_token_type_ids": enc["mm_token_type_ids"][None, :length],
        }
        if "pixel_values" in enc:
            batch["pixel_values"] = enc["pixel_values"].to(dtype)
            batch["image_grid_thw"] = enc["image_grid_thw"]
        batches.append(batch)
        tokens += length
    if not batches:
        raise UserError(
            f"quantize.max_seq_length: {limit} is shorter than every calibration prompt (image tokens included); raise it"
        )
    return CalibrationSet(batches, len(rows), skipped, truncated, tokens)


def _one_batch(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    # Each item is already a batch of one sequence: no padding enters the calibration activations.
    (batch,) = items
    return batch


# ------------------------------------------------------------------------------------------------------
# The recipe


def weight_scheme(cfg: Config):
    """4-bit symmetric int weights, one scale per `group_size` input channels, activations untouched
    (W4A16): the W4A16 preset with the configured group size."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(
            num_bits=4,
            type="int",
            symmetric=True,
            strategy="group",
            group_size=cfg.quantize.group_size,
            dynamic=False,
        ),
    )


def _host_memory_awq():
    """llm-compressor 0.14's AWQModifier pins its cached layer inputs (`IntermediatesCache.pin_memory`)
    before each grid search, to speed up host-to-GPU copies; on a host without an accelerator
    `Tensor.pin_memory()` raises "Cannot access accelerator device when none is available". Pinning is
    only an optimisation: this subclass builds the same caches without it. Used only where no
    accelerator exists (the tiny model on a CPU); on a GPU the stock modifier runs."""
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not hasattr(AWQModifier, "_setup_activation_cache_hooks"):
        raise RuntimeError(
            "llmcompressor changed AWQModifier's internals (no _setup_activation_cache_hooks): "
            "pcbvlm.quantize's CPU path needs updating for this version"
        )

    class UnpinnedIntermediatesCache(IntermediatesCache):
        def pin_memory(self, batch_index, input_names=None):
            return None

    class HostMemoryAWQModifier(AWQModifier):
        def _setup_activation_cache_hooks(self) -> None:
            super()._setup_activation_cache_hooks()
            # The hooks look their cache up per call, so swapping the (still empty) caches is enough.
            for parent in list(self._parent_args_cache):
                self._parent_args_cache[parent] = UnpinnedIntermediatesCache(None, self.offload_device)

    return HostMemoryAWQModifier


def build_recipe(cfg: Config, family: ModelFamily) -> list:
    """AWQ with the family's smoothing pairs (`ModelFamily.awq_mappings`), then W4A16."""
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQMapping, AWQModifier

    awq_class = AWQModifier if torch.accelerator.is_available() else _host_memory_awq()
    mappings = [AWQMapping(smooth, balance) for smooth, balance in family.awq_mappings]
    return [
        awq_class(mappings=mappings),
        QuantizationModifier(config_groups={"group_0": weight_scheme(cfg)}, ignore=list(cfg.quantize.ignore)),
    ]


def _stock_recipe_names(folder: Path) -> None:
    """recipe.yaml names each modifier by its class: name the CPU subclass as the modifier it is, so
    that llm-compressor can read the recipe back."""
    path = folder / RECIPE_FILE
    if path.is_file():
        path.write_text(path.read_text().replace("HostMemoryAWQModifier:", "AWQModifier:"))


def _ignore_renamed_modules(folder: Path, module_names: set[str], patterns: list[str]) -> None:
    """config.json lists the modules left unquantized (`quantization_config.ignore`) by name, in the
    checkpoint's spelling. Some families' checkpoints spell modules differently from the loaded model
    (Qwen2.5-VL: `visual.blocks...` for `model.visual.blocks...`); those names match nothing on load, and
    transformers would then expect 4-bit weights for the vision tower. Where a listed name is not a module
    of the model, the configured `quantize.ignore` patterns (`re:` regexes, either spelling) are added."""
    import json

    path = folder / "config.json"
    config = json.loads(path.read_text())
    ignore = config["quantization_config"].get("ignore") or []
    if all(name in module_names for name in ignore if not name.startswith("re:")):
        return
    config["quantization_config"]["ignore"] = [*ignore, *(p for p in patterns if p not in ignore)]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------------
# Verification


def generation_inputs(processor, samples: list[dict[str, Any]], cfg: Config) -> dict[str, torch.Tensor]:
    """The evaluation prompts (no answer) of `samples`, left-padded into one batch."""
    from pcbvlm.collator import image_paths, load_image
    from pcbvlm.samples import build_messages

    chats = [build_messages(s, cfg.data, with_answer=False) for s in samples]
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    images = [load_image(p) for c in chats for p in image_paths(c)]
    # New tokens are appended on the right, so prompts are padded on the left.
    side, processor.tokenizer.padding_side = processor.tokenizer.padding_side, "left"
    try:
        return dict(processor(text=texts, images=images or None, padding=True, return_tensors="pt"))
    finally:
        processor.tokenizer.padding_side = side


@torch.no_grad()
def greedy_answers(
    model, processor, inputs: dict[str, torch.Tensor], device, dtype, max_new_tokens: int
) -> list[str]:
    config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    config.update(do_sample=False, temperature=None, top_p=None, top_k=None, max_new_tokens=max_new_tokens)
    config.pad_token_id = processor.tokenizer.pad_token_id
    out = model.generate(**model_inputs(inputs, device, dtype), generation_config=config)
    new_tokens = out[:, inputs["input_ids"].shape[1] :]
    return processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def _greedy_matches(a, b) -> int:
    """Boxes of `a` and `b` paired one to one: same label, IoU >= MATCH_IOU, best overlaps first."""
    from pcbvlm.metrics import box_iou

    pairs = sorted(
        (
            (box_iou(x.bbox, y.bbox), i, j)
            for i, x in enumerate(a)
            for j, y in enumerate(b)
            if x.label == y.label
        ),
        reverse=True,
    )
    used_a, used_b, matched = set(), set(), 0
    for iou, i, j in pairs:
        if iou < MATCH_IOU:
            break
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            matched += 1
    return matched


def answer_agreement(
    samples: list[dict[str, Any]], reference: list[str], other: list[str], frames: list | None = None
) -> dict[str, Any]:
    """How the quantized model's answers compare with the merged model's, parsed into boxes (in
    `frames`, the model family's answer frame per sample; the relative 0-1000 one without)."""
    from pcbvlm.answer import RELATIVE_FRAME
    from pcbvlm.parsing import parse_answer

    rows, matched, n_ref, n_other = [], 0, 0, 0
    frames = frames or [RELATIVE_FRAME] * len(samples)
    for sample, ref_text, text, frame in zip(samples, reference, other, frames, strict=True):
        width, height = int(sample["width"]), int(sample["height"])
        classes = sample.get("classes")  # the dataset's class list (pcbvlm.samples)
        ref_objects = parse_answer(ref_text, width, height, classes, frame).objects
        objects = parse_answer(text, width, height, classes, frame).objects
        pairs = _greedy_matches(ref_objects, objects)
        matched += pairs
        n_ref += len(ref_objects)
        n_other += len(objects)
        rows.append(
            {
                "id": str(sample.get("id")),
                "same_text": ref_text == text,
                "same_boxes": [(o.label, o.bbox) for o in ref_objects]
                == [(o.label, o.bbox) for o in objects],
                "boxes_merged": len(ref_objects),
                "boxes_quantized": len(objects),
                "boxes_matched": pairs,
                "merged": ref_text,
                "quantized": text,
            }
        )
    return {
        "samples": len(rows),
        "same_text": sum(r["same_text"] for r in rows),
        "same_boxes": sum(r["same_boxes"] for r in rows),
        "boxes_merged": n_ref,
        "boxes_quantized": n_other,
        "boxes_matched": matched,
        # F1 of the quantized boxes against the merged model's (1.0 when neither found any).
        "box_f1": 2 * matched / (n_ref + n_other) if n_ref + n_other else 1.0,
        "per_sample": rows,
    }


def _on_device(model, device: str) -> None:
    """Make the model runnable on `device` for the reference passes: on a GPU as much of it as fits (the
    rest streamed from RAM), through compressed-tensors' dispatch; `_back_to_cpu` undoes it."""
    if device == "cuda":
        from compressed_tensors.offload import dispatch_model

        dispatch_model(model)


def _back_to_cpu(model, device: str) -> None:
    """Undo `_on_device`: llm-compressor's sequential pipeline expects the model in RAM and moves one
    layer at a time to the GPU itself."""
    if device == "cuda":
        from compressed_tensors.offload import remove_dispatch

        remove_dispatch(model)
        model.to("cpu")
        free_memory()


# ------------------------------------------------------------------------------------------------------
# The job


@dataclass
class QuantizeResult:
    out_dir: Path
    source: Path
    device: str
    scheme: dict[str, Any]
    calibration: dict[str, Any]
    size_bytes: int
    source_size_bytes: int
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)
    verified: bool = False
    logits: dict[str, float] = field(default_factory=dict)  # quantized vs merged, teacher-forced
    agreement: dict[str, Any] = field(default_factory=dict)  # parsed answers, greedy
    leftovers: list[str] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out_dir=str(self.out_dir), source=str(self.source))
        return out


def quantize_model(
    cfg: Config, model: str | Path | None = None, out: str | Path | None = None
) -> QuantizeResult:
    """AWQ W4A16 of `model` (default `<paths.outputs_dir>/merged`) with llm-compressor, calibrated on
    the training set, verified against the input model, published atomically to `out` (default
    `<paths.outputs_dir>/quantized`). Raises UserError before writing anything on a bad input, and
    publishes nothing when the quantized model does not load, generate, or stay close to the input."""
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader

    from pcbvlm.collator import TrainCollator
    from pcbvlm.processing import load_processor

    started = time.perf_counter()
    stages: dict[str, float] = {}
    source = resolve_input_model(cfg, model)
    target = Path(out) if out is not None else Path(cfg.paths.outputs_dir) / QUANTIZED_DIR
    if is_partial(target):
        raise UserError(f"--out {target}: `{PARTIAL_MARK}` names are reserved for unfinished folders")
    if target.resolve() == source.resolve():
        raise UserError(f"--out {target}: the input model's own folder")
    device = quantize_device(cfg)
    exec_device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    samples = verification_samples(cfg, cfg.quantize.verify_samples)
    family = family_for(source)
    processor = load_processor(source, cfg.data.min_pixels, cfg.data.max_pixels, family=family)

    tick = time.perf_counter()
    # In RAM, in the dtype the merge wrote; the sequential pipeline moves one layer at a time to the GPU.
    net = (
        family.model_class()
        .from_pretrained(source, dtype="auto", attn_implementation=cfg.model.attn_implementation)
        .eval()
    )
    dtype = net.dtype
    check_group_size(net, cfg.quantize.group_size)
    calibration = calibration_set(cfg, processor, dtype)
    stages["load_s"] = time.perf_counter() - tick

    reference_logits, reference_answers, batch, prompts = None, [], None, None
    max_new_tokens = min(VERIFY_MAX_NEW_TOKENS, cfg.eval.max_new_tokens)
    if samples:
        tick = time.perf_counter()
        batch = TrainCollator(processor)(samples)
        prompts = generation_inputs(processor, samples, cfg)
        _on_device(net, device)
        reference_logits = attended_logits(net, batch, exec_device, dtype)
        reference_answers = greedy_answers(net, processor, prompts, exec_device, dtype, max_new_tokens)
        _back_to_cpu(net, device)
        stages["reference_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    decoder_layer = family.decoder_layer_class  # llm-compressor calibrates one decoder layer at a time
    oneshot(
        model=net,
        processor=processor,
        recipe=build_recipe(cfg, family),
        dataset=DataLoader(calibration.batches, batch_size=1, shuffle=False, collate_fn=_one_batch),
        sequential_targets=[decoder_layer],
    )
    stages["calibrate_s"] = time.perf_counter() - tick

    with atomic_directory(target, overwrite=True) as tmp:
        tick = time.perf_counter()
        net.save_pretrained(tmp, save_compressed=True, max_shard_size=MAX_SHARD_SIZE)
        _stock_recipe_names(tmp)
        _ignore_renamed_modules(tmp, {name for name, _ in net.named_modules()}, cfg.quantize.ignore)
        save_processor(processor, tmp, source)
        stages["save_s"] = time.perf_counter() - tick
        del net
        free_memory()

        logits: dict[str, float] = {}
        agreement: dict[str, Any] = {}
        if samples:
            # What is verified is the published folder, loaded the way transformers loads it (the packed
            # int4 weights are unpacked to the model dtype on the first forward: transformers has no
            # int4 kernels for compressed-tensors; vLLM runs them packed).
            tick = time.perf_counter()
            quantized = (
                family.model_class()
                .from_pretrained(
                    tmp,
                    dtype="auto",
                    attn_implementation=cfg.model.attn_implementation,
                    device_map={"": exec_device.index} if device == "cuda" else None,
                )
                .eval()
            )
            logits = compare_logits(reference_logits, attended_logits(quantized, batch, exec_device, dtype))
            answers = greedy_answers(quantized, processor, prompts, exec_device, dtype, max_new_tokens)
            frames = [
                family.answer_frame(
                    int(s["width"]), int(s["height"]), cfg.data.min_pixels, cfg.data.max_pixels
                )
                for s in samples
            ]
            agreement = answer_agreement(samples, reference_answers, answers, frames)
            agreement["max_new_tokens"] = max_new_tokens
            del quantized
            free_memory()
            stages["verify_s"] = time.perf_counter() - tick
            if not logits["rel_rms_diff"] < MAX_REL_RMS_DIFF:
                raise UserError(
                    f"quantize verification failed: the quantized logits differ from the merged model's by "
                    f"{logits['rel_rms_diff']:.2f} of their RMS (limit {MAX_REL_RMS_DIFF:g}); nothing was written to {target}"
                )
        weights = weight_scheme(cfg).weights
        result = QuantizeResult(
            out_dir=target,
            source=source,
            device=device,
            scheme={
                "scheme": SCHEME,
                "method": "AWQ + round-to-nearest int4 (llm-compressor)",
                "num_bits": weights.num_bits,
                "symmetric": weights.symmetric,
                "group_size": weights.group_size,
                "ignore": list(cfg.quantize.ignore),
                "sequential_target": decoder_layer,
            },
            calibration={
                "samples": len(calibration.batches),
                "requested": cfg.quantize.num_calibration_samples,
                "available": calibration.available,
                "skipped_too_long": calibration.skipped,
                "answers_truncated": calibration.truncated,
                "tokens": calibration.tokens,
                "max_seq_length": cfg.quantize.max_seq_length,
            },
            size_bytes=folder_size(tmp),
            source_size_bytes=folder_size(source),
            seconds=time.perf_counter() - started,
            stages={k: round(v, 3) for k, v in stages.items()},
            verified=bool(logits),
            logits=logits,
            agreement=agreement,
            leftovers=[str(p) for p in leftover_partials(target)],
        )
        report = result.report()
        report["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        # Provenance (pcbvlm.provenance): the merge id, run and adapter hash of the source folder.
        report.update(quantized_provenance(source))
        atomic_write_json(tmp / QUANTIZE_REPORT, report)
    return result


def print_summary(result: QuantizeResult) -> None:
    from rich.console import Console
    from rich.table import Table

    title = "verified" if result.verified else "NOT verified (quantize.verify_samples=0)"
    table = Table(title=f"quantize: {title}", show_header=False)
    s, c = result.scheme, result.calibration
    ratio = result.source_size_bytes / result.size_bytes if result.size_bytes else float("nan")
    rows = [
        ("quantized model", str(result.out_dir)),
        ("from", str(result.source)),
        (
            "scheme",
            f"{s['scheme']} AWQ: int{s['num_bits']} symmetric, group {s['group_size']}; not quantized: {', '.join(s['ignore'])}",
        ),
        (
            "calibration",
            f"{c['samples']} training samples, {c['tokens']} tokens ({c['skipped_too_long']} too long, {c['answers_truncated']} cut)",
        ),
        (
            "size on disk",
            f"{format_size(result.size_bytes)} (input {format_size(result.source_size_bytes)}, {ratio:.2f}x smaller)",
        ),
        ("device", result.device),
        (
            "time",
            f"{result.seconds:.1f} s ("
            + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in result.stages.items())
            + ")",
        ),
    ]
    if result.verified:
        d, a = result.logits, result.agreement
        rows += [
            (
                "logits vs input",
                f"max |dlogit| {d['max_abs_diff']:.3g}, mean {d['mean_abs_diff']:.3g} (scale {d['logit_scale']:.3g}); "
                f"RMS {d['rel_rms_diff']:.1%} of the input's; top-1 agree {d['top1_agreement']:.1%}",
            ),
            (
                "answers vs input",
                f"{a['same_boxes']}/{a['samples']} samples with the same boxes, {a['same_text']}/{a['samples']} same text; "
                f"box F1 {a['box_f1']:.2f} ({a['boxes_matched']} matched of {a['boxes_merged']} / {a['boxes_quantized']})",
            ),
        ]
    for path in result.leftovers:
        rows.append(("leftover", f"{path} (from an interrupted run; delete it)"))
    for key, value in rows:
        table.add_row(key, value)
    Console(highlight=False).print(table)
    print(f"serve it with: vllm serve {result.out_dir}")
