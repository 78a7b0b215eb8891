"""Model folders that the stages publish (merged, quantized) and the checks they share.

`merge` and `quantize` both write a plain model folder under `paths.outputs_dir`, in a `.partial-<pid>` folder
renamed when complete (`pcbvlm.io.atomic_directory`), and verify it before publishing by comparing its logits
with a reference on a few validation samples. What they share lives here, so that quantize does not import
the merge stage: the folder names, how a model config says it is quantized, the verification samples and
the logit comparison, saving the processor files beside the weights, sizes and leftover partial folders.
"""

from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from pcbvlm.config import Config
from pcbvlm.errors import DataError
from pcbvlm.io import PARTIAL_MARK

# The folders under paths.outputs_dir that `make merge` and `make quantize` publish.
MERGED_DIR = "merged"
QUANTIZED_DIR = "quantized"
# 5 GB shards: a 32B bf16 model is 14 files, each small enough to be written and loaded one at a time.
MAX_SHARD_SIZE = "5GB"
# Processor files of the base that are copied as they are, when present: the stock Qwen-VL processor that
# vLLM builds (with torchvision) looks for its video processor settings here; this project never saves one.
EXTRA_PROCESSOR_FILES = ("video_preprocessor_config.json",)


# ------------------------------------------------------------------------------------------------------
# What a model folder holds


def quantization_method(config) -> str | None:
    """The `quant_method` of a model config (`bitsandbytes 4-bit`, `compressed-tensors`, ...), or None
    for an unquantized model."""
    qcfg = getattr(config, "quantization_config", None)
    if qcfg is None:
        return None
    get = qcfg.get if isinstance(qcfg, dict) else lambda key, default=None: getattr(qcfg, key, default)
    method = get("quant_method")
    method = getattr(method, "value", method)  # transformers keeps it as an enum
    if method == "bitsandbytes":
        method = "bitsandbytes 4-bit" if get("load_in_4bit", False) else "bitsandbytes 8-bit"
    return str(method or "unknown method")


def load_model_config(name_or_path: str | Path, revision: str | None = None):
    """A model's config (config.json of a local folder or the hub cache), without its weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(name_or_path), revision=revision)


def save_processor(
    processor, out: Path, source: str | Path | None = None, revision: str | None = None
) -> None:
    """Save the tokenizer (with its chat template) and the image processor part by part, the layout of a
    hub folder that `pcbvlm.processing.load_processor` reads back; copy `EXTRA_PROCESSOR_FILES` from
    `source` (a folder or hub id) when it has them."""
    processor.tokenizer.save_pretrained(out)
    processor.image_processor.save_pretrained(out)
    if source is None:
        return
    for name in EXTRA_PROCESSOR_FILES:
        found = _model_file(source, name, revision)
        if found is not None:
            shutil.copyfile(found, out / name)


def _model_file(name_or_path: str | Path, filename: str, revision: str | None) -> Path | None:
    local = Path(name_or_path) / filename
    if local.is_file():
        return local
    if Path(name_or_path).exists():
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(str(name_or_path), filename, revision=revision)
    return Path(cached) if isinstance(cached, str) else None


def folder_size(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def format_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def leftover_partials(target: Path) -> list[Path]:
    """`<target>.partial-*` folders of other processes: what an interrupted job left (safe to delete
    once that job is gone; never read as a result)."""
    own = f"{target.name}{PARTIAL_MARK}{os.getpid()}"
    return sorted(p for p in target.parent.glob(f"{target.name}{PARTIAL_MARK}*") if p.name != own)


# ------------------------------------------------------------------------------------------------------
# Verification: the same samples, the logits compared


def verification_samples(cfg: Config, count: int) -> list[dict[str, Any]]:
    """The first `count` samples of val.jsonl (train.jsonl when there is no validation split): the same
    samples for every run, so reports stay comparable."""
    from pcbvlm.samples import load_samples

    if count <= 0:
        return []
    data_dir = Path(cfg.paths.data_dir)
    splits = [split for split in ("val", "train") if (data_dir / f"{split}.jsonl").is_file()]
    rows = next((rows for rows in (load_samples(data_dir, split) for split in splits) if rows), [])
    if not rows:
        raise DataError(
            f"{data_dir}: no val.jsonl or train.jsonl to verify on (run `make data`, or set quantize.verify_samples=0)"
        )
    return rows[:count]


def model_inputs(
    batch: dict[str, torch.Tensor], device: str | torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """A TrainCollator batch without labels, on `device`, pixels in the model's dtype."""
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


@torch.no_grad()
def attended_logits(
    model, batch: dict[str, torch.Tensor], device: str | torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Teacher-forced logits at every attended position, [tokens, vocab] in fp32 on the CPU."""
    logits = model(**model_inputs(batch, device, dtype)).logits
    mask = batch["attention_mask"].bool().to(logits.device)
    return logits[mask].float().cpu()


def compare_logits(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """How far `other` is from `reference` (both [tokens, vocab]): max and mean |difference|, the max
    relative to the reference's largest |logit|, the RMS relative to the reference's RMS, and the share
    of positions whose top-1 token is the same."""
    diff = (other - reference).abs()
    scale = reference.abs().max().item()
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "logit_scale": scale,
        "rel_max_diff": diff.max().item() / scale if scale > 0 else float("inf"),
        "rel_rms_diff": (diff.square().mean().sqrt() / reference.square().mean().sqrt()).item(),
        "top1_agreement": (other.argmax(-1) == reference.argmax(-1)).float().mean().item(),
    }


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
