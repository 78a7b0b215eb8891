"""`make merge`: fold a trained LoRA adapter into the unquantized base and write a plain model folder.

A full-parameter run (`train.method: full`) has no adapter: its `model/` folder is already the fine-tuned
model, so it is re-saved in the merge dtype with the processor files and verified the same way (the
published copy's logits against the run's model), and published at the same place.

The base is loaded without quantization (bf16; fp32 where `train.precision` says so, as in the tiny
config), the adapter (the newest finished run, or `--adapter`) is applied with peft, `merge_and_unload`
adds B @ A * alpha / r to every targeted weight, and the result is saved as sharded safetensors with the
processor files (tokenizer + chat template, image processor) and the generation config. A QLoRA adapter
is merged into the bf16 base, never into 4-bit weights: rounding W + dW back to NF4 or int4 loses most of
dW, so a base folder whose config carries a `quantization_config` is refused.

Before the folder is published it is verified: the saved model is loaded back and its logits on a few
validation samples (the full training chat, batched by `TrainCollator`) are compared with the unmerged
base + adapter. The comparison is `max |logit difference| / max |logit|` over every attended position;
see `MERGE_TOLERANCE`. The folder is built as `<out>.partial-<pid>` and renamed when complete
(`pcbvlm.io.atomic_directory`), with `merge.json` (adapter, base, dtype, differences, tolerance, time,
size, and provenance: its id, the run and adapter hash it came from; `pcbvlm.provenance`) inside it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pcbvlm.config import Config
from pcbvlm.errors import UserError
from pcbvlm.io import PARTIAL_MARK, atomic_directory, atomic_write_json, is_partial
from pcbvlm.model_folder import (
    MAX_SHARD_SIZE,
    MERGED_DIR,
    attended_logits,
    compare_logits,
    folder_size,
    format_size,
    free_memory,
    leftover_partials,
    load_model_config,
    quantization_method,
    save_processor,
    verification_samples,
)
from pcbvlm.provenance import merged_provenance

log = logging.getLogger(__name__)

MERGE_REPORT = "merge.json"
# Bound on max |merged logits - (base + adapter) logits| / max |base + adapter logits|, by the dtype the
# merge ran in. In fp32 both paths compute the same sums in another order (x @ (W + s B A) against
# x @ W + s (x @ A) @ B): measured 4e-7 (tiny model) and 2e-6 (a random 48-layer Qwen3-VL); 1e-4 leaves
# room for depth. In bf16 every merged weight W + dW is rounded to 8 significant bits and both paths round
# each matmul, so they differ like two bf16 implementations of one model: measured 8e-3 (tiny, 2 layers)
# and 2.7e-2 (random, 48 layers, on an H200); the 32B's 64 layers were not measured. 0.1 still fails a
# merge that lost or doubled the adapter (2.05 / 1.67 = 1.2 of the scale on the 48-layer model; a trained
# adapter moves the answer logits by several units). fp16 keeps 11 significant bits, 8x finer than bf16.
MERGE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-1, torch.float16: 2e-2}


# ------------------------------------------------------------------------------------------------------
# Inputs


def resolve_adapter(cfg: Config, adapter: str | Path | None = None) -> Path:
    """The adapter folder to merge: `adapter` (a run folder or its adapter/ folder), or the newest
    finished run under `paths.runs_dir`. For a full-parameter run: its model/ folder."""
    from pcbvlm.runs import ADAPTER_DIR, MODEL_DIR, adapter_folder, full_model_folder, newest_finished_run

    if adapter is None:
        run = newest_finished_run(Path(cfg.paths.runs_dir))
        if run is None:
            raise UserError(
                f"no finished training run under {cfg.paths.runs_dir} (a run folder with {ADAPTER_DIR}/ or "
                f"{MODEL_DIR}/): run `make train`, or give ADAPTER=path"
            )
        full = full_model_folder(run)
        if full is not None:
            return full
        folder = run / ADAPTER_DIR
    else:
        given = Path(adapter)
        if any(is_partial(part) for part in (given, *given.parents)):
            raise UserError(
                f"--adapter {given}: an unfinished folder (`{PARTIAL_MARK}*`, left by an interrupted job)"
            )
        full = full_model_folder(given)
        if full is not None:
            return full
        found = adapter_folder(given)
        if found is not None:
            folder = found
        elif given.is_dir():
            raise UserError(
                f"--adapter {given}: neither an adapter folder (adapter_config.json) nor a finished run "
                f"folder ({ADAPTER_DIR}/adapter_config.json, or {MODEL_DIR}/config.json of a full-parameter run)"
            )
        else:
            raise UserError(f"--adapter {given}: no such folder")
    if not any((folder / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise UserError(f"{folder}: adapter_config.json but no adapter_model.safetensors")
    try:
        adapter_cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{folder / 'adapter_config.json'}: invalid JSON ({err.msg})") from None
    if adapter_cfg.get("peft_type") != "LORA":
        raise UserError(
            f"{folder}: a {adapter_cfg.get('peft_type')} adapter; only LoRA adapters can be merged"
        )
    return folder


def merge_device(cfg: Config) -> str:
    device = cfg.resources.merge_device
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "resources.merge_device: cuda, but no GPU is visible (merge on the CPU: merge_device=cpu)"
        )
    return device


def merge_dtype(cfg: Config, device: str) -> torch.dtype:
    """bf16 unless `train.precision` names another dtype. `auto` means bf16 here even on the CPU (where
    training would use fp32): a 32B model in fp32 would need 130 GB of RAM, and bf16 is the base's own
    dtype and what vLLM serves."""
    choice = cfg.train.precision
    if choice == "auto":
        if device == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[choice]


# ------------------------------------------------------------------------------------------------------
# The job


@dataclass
class MergeResult:
    out_dir: Path
    adapter: Path
    base: str
    dtype: str
    device: str
    verified: bool
    samples: int
    tolerance: float | None
    diff: dict[str, float] = field(default_factory=dict)  # merged vs base + adapter
    adapter_effect: dict[str, float] = field(default_factory=dict)  # base + adapter vs base alone
    size_bytes: int = 0
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)
    method: str = "lora"  # lora: adapter folded into the base; full: a full-parameter run's model re-saved

    def report(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out_dir=str(self.out_dir), adapter=str(self.adapter))
        return out


def merge_adapter(
    cfg: Config, adapter: str | Path | None = None, out: str | Path | None = None
) -> MergeResult:
    """Merge `adapter` (default: the newest finished run) into the unquantized base
    `cfg.model.name_or_path`, verify the merged logits, and publish `out` (default
    `<paths.outputs_dir>/merged`) atomically. Raises UserError before writing anything when the base is
    quantized or an input is missing, and when the verification fails (nothing is published then)."""
    from peft import PeftModel

    from pcbvlm.collator import TrainCollator
    from pcbvlm.modeling import ensure_model_available, load_base_model
    from pcbvlm.processing import load_processor
    from pcbvlm.runs import full_model_folder

    started = time.perf_counter()
    stages: dict[str, float] = {}
    adapter_dir = resolve_adapter(cfg, adapter)
    target = Path(out) if out is not None else Path(cfg.paths.outputs_dir) / MERGED_DIR
    if is_partial(target):
        raise UserError(f"--out {target}: `{PARTIAL_MARK}` names are reserved for unfinished folders")
    if full_model_folder(adapter_dir) == adapter_dir:
        return publish_full_model(cfg, adapter_dir, target)
    base = ensure_model_available(cfg)
    base_config = load_model_config(base, cfg.model.revision)
    method = quantization_method(base_config)
    if method is not None:
        raise UserError(
            f"model.name_or_path: {base} is quantized ({method}); merging LoRA into quantized weights rounds "
            "the update away - point it at the unquantized (bf16) base model"
        )
    device = merge_device(cfg)
    dtype = merge_dtype(cfg, device)
    tolerance = MERGE_TOLERANCE[dtype]
    samples = verification_samples(cfg, cfg.quantize.verify_samples)
    adapter_base = json.loads((adapter_dir / "adapter_config.json").read_text()).get(
        "base_model_name_or_path"
    )
    if adapter_base and not _same_model(adapter_base, base):
        log.warning(
            "the adapter was trained on %s, merging it into %s (model.name_or_path)", adapter_base, base
        )

    processor = load_processor(base, cfg.data.min_pixels, cfg.data.max_pixels, cfg.model.revision)
    batch = TrainCollator(processor)(samples) if samples else None

    tick = time.perf_counter()
    model = load_base_model(cfg, quantization="none", device=device, dtype=dtype)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    stages["load_s"] = time.perf_counter() - tick

    reference = None
    effect: dict[str, float] = {}
    if batch is not None:
        tick = time.perf_counter()
        reference = attended_logits(model, batch, device, dtype)
        with model.disable_adapter():
            effect = compare_logits(reference, attended_logits(model, batch, device, dtype))
        stages["reference_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    merged = model.merge_and_unload()
    del model
    # load_base_model switches the KV cache off for training (a top-level `use_cache: false`); the
    # published config is the base's.
    if "use_cache" in base_config.to_dict():
        merged.config.use_cache = base_config.use_cache
    elif "use_cache" in merged.config.to_dict():
        del merged.config.use_cache
    stages["merge_s"] = time.perf_counter() - tick

    with atomic_directory(target, overwrite=True) as tmp:
        tick = time.perf_counter()
        merged.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
        save_processor(processor, tmp, base, cfg.model.revision)
        stages["save_s"] = time.perf_counter() - tick
        del merged
        free_memory()

        diff: dict[str, float] = {}
        if batch is not None and reference is not None:
            # The saved files are what is verified: loaded back like any later job will load them.
            tick = time.perf_counter()
            check_cfg = cfg.model_copy(deep=True)
            check_cfg.model.name_or_path = str(tmp)
            check_cfg.model.revision = None
            check_cfg.model.build_tiny_if_missing = False
            reloaded = load_base_model(check_cfg, quantization="none", device=device, dtype=dtype).eval()
            diff = compare_logits(reference, attended_logits(reloaded, batch, device, dtype))
            del reloaded
            free_memory()
            stages["verify_s"] = time.perf_counter() - tick
            if not diff["rel_max_diff"] <= tolerance:
                raise UserError(
                    f"merge verification failed: max |logit difference| {diff['max_abs_diff']:.4g} is "
                    f"{diff['rel_max_diff']:.3g} of the logit scale, above the {tolerance:g} allowed for "
                    f"{_dtype_name(dtype)}; nothing was written to {target}"
                )
        result = MergeResult(
            out_dir=target,
            adapter=adapter_dir,
            base=str(base),
            dtype=_dtype_name(dtype),
            device=device,
            verified=bool(diff),
            samples=len(samples),
            tolerance=tolerance if diff else None,
            diff=diff,
            adapter_effect=effect,
            size_bytes=folder_size(tmp),
            seconds=time.perf_counter() - started,
            stages={k: round(v, 3) for k, v in stages.items()},
            leftovers=[str(p) for p in leftover_partials(target)],
        )
        report = result.report()
        report["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        report["adapter_base"] = adapter_base
        # Provenance (pcbvlm.provenance): this merge's id, the run and the adapter hash it was made from.
        report.update(merged_provenance(adapter_dir))
        atomic_write_json(tmp / MERGE_REPORT, report)
    return result


def publish_full_model(cfg: Config, folder: Path, target: Path) -> MergeResult:
    """A full-parameter run's model/ folder -> `target`: re-saved in the merge dtype (sharded like a
    merge) with its processor files, then loaded back and its logits compared with the run's model on
    the verification samples (same tolerance as a merge); nothing is published when they differ."""
    from pcbvlm.collator import TrainCollator
    from pcbvlm.families import family_for
    from pcbvlm.processing import load_processor

    started = time.perf_counter()
    stages: dict[str, float] = {}
    device = merge_device(cfg)
    dtype = merge_dtype(cfg, device)
    tolerance = MERGE_TOLERANCE[dtype]
    samples = verification_samples(cfg, cfg.quantize.verify_samples)
    processor = load_processor(folder, cfg.data.min_pixels, cfg.data.max_pixels)
    batch = TrainCollator(processor)(samples) if samples else None

    def load(path: Path, as_dtype: torch.dtype | str):
        model = (
            family_for(path)
            .model_class()
            .from_pretrained(str(path), dtype=as_dtype, attn_implementation=cfg.model.attn_implementation)
        )
        return model.to(device).eval()

    tick = time.perf_counter()
    model = load(folder, "auto")  # as the run saved it
    stages["load_s"] = time.perf_counter() - tick
    reference = attended_logits(model, batch, device, model.dtype) if batch is not None else None
    model = model.to(dtype)
    with atomic_directory(target, overwrite=True) as tmp:
        tick = time.perf_counter()
        model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
        save_processor(processor, tmp, folder)
        stages["save_s"] = time.perf_counter() - tick
        del model
        free_memory()
        diff: dict[str, float] = {}
        if batch is not None and reference is not None:
            tick = time.perf_counter()
            reloaded = load(tmp, dtype)
            diff = compare_logits(reference, attended_logits(reloaded, batch, device, dtype))
            del reloaded
            free_memory()
            stages["verify_s"] = time.perf_counter() - tick
            if not diff["rel_max_diff"] <= tolerance:
                raise UserError(
                    f"verification of the full-parameter model failed: max |logit difference| "
                    f"{diff['max_abs_diff']:.4g} is {diff['rel_max_diff']:.3g} of the logit scale, above the "
                    f"{tolerance:g} allowed for {_dtype_name(dtype)}; nothing was written to {target}"
                )
        result = MergeResult(
            out_dir=target,
            adapter=folder,
            base=str(folder),
            dtype=_dtype_name(dtype),
            device=device,
            verified=bool(diff),
            samples=len(samples),
            tolerance=tolerance if diff else None,
            diff=diff,
            size_bytes=folder_size(tmp),
            seconds=time.perf_counter() - started,
            stages={k: round(v, 3) for k, v in stages.items()},
            leftovers=[str(p) for p in leftover_partials(target)],
            method="full",
        )
        report = result.report()
        report["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        report.update(merged_provenance(folder))  # this copy's id, the run and weights hash it came from
        atomic_write_json(tmp / MERGE_REPORT, report)
    return result


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def print_summary(result: MergeResult) -> None:
    from rich.console import Console
    from rich.table import Table

    title = "verified" if result.verified else "NOT verified (quantize.verify_samples=0)"
    table = Table(title=f"merge: {title}", show_header=False)
    rows = [
        ("merged model", str(result.out_dir)),
        ("adapter" if result.method != "full" else "full-parameter model", str(result.adapter)),
        ("base", result.base),
        ("dtype / device", f"{result.dtype} / {result.device}"),
        ("size on disk", format_size(result.size_bytes)),
        (
            "time",
            f"{result.seconds:.1f} s ("
            + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in result.stages.items())
            + ")",
        ),
    ]
    if result.verified:
        d, e = result.diff, result.adapter_effect
        rows += [
            ("samples checked", str(result.samples)),
            (
                "merged vs base+adapter" if result.method != "full" else "published vs the run's model",
                f"max |dlogit| {d['max_abs_diff']:.3g} = {d['rel_max_diff']:.2e} of scale {d['logit_scale']:.3g} "
                f"(tolerance {result.tolerance:g}); mean {d['mean_abs_diff']:.3g}; top-1 agree {d['top1_agreement']:.1%}",
            ),
        ]
        if e:
            rows.append(
                (
                    "adapter effect",
                    f"max |dlogit| {e['max_abs_diff']:.3g}, mean {e['mean_abs_diff']:.3g} (base+adapter vs base)",
                )
            )
    for path in result.leftovers:
        rows.append(("leftover", f"{path} (from an interrupted run; delete it)"))
    for key, value in rows:
        table.add_row(key, value)
    Console(highlight=False).print(table)
