"""Loading the model for training (QLoRA or LoRA) and for inference, the same way in every job.

QLoRA here means: the language model's decoder linears in NF4 with double quantization (bitsandbytes),
the vision tower (`model.visual`) and `lm_head` left unquantized in the compute dtype, LoRA adapters
(peft) on the decoder linears, everything else frozen. Classes and module names are the model family's
(pcbvlm.families), found from `model.name_or_path`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from pcbvlm.config import Config
from pcbvlm.errors import UserError
from pcbvlm.families import ModelFamily, family_for, family_of_model

log = logging.getLogger(__name__)


def resolve_device(cfg: Config) -> str:
    if cfg.resources.device != "auto":
        return cfg.resources.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(cfg: Config, device: str | None = None) -> torch.dtype:
    """bf16 where the GPU supports it (Ampere and newer), else fp16 on a GPU, fp32 on a CPU."""
    device = device or resolve_device(cfg)
    choice = cfg.train.precision
    if choice == "auto":
        if device == "cuda":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16
            log.warning("this GPU has no bf16 support: computing in fp16 (loss scaling on)")
            return torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[choice]


def model_family(cfg: Config) -> ModelFamily:
    """The family of the configured base model (pcbvlm.families.family_for)."""
    return family_for(cfg.model.name_or_path, cfg.model.revision)


def ensure_model_available(cfg: Config) -> str:
    """The base model's hub id or folder; builds the tiny model first where the config asks for it
    (of the family its name says: `models/tiny-qwen2.5-vl` is a tiny Qwen2.5-VL)."""
    name = cfg.model.name_or_path
    if cfg.model.build_tiny_if_missing and not (Path(name) / "config.json").is_file():
        from pcbvlm.tiny import ensure_tiny_model

        family = model_family(cfg)
        log.info("building the tiny embedded %s model at %s", family.model_type, name)
        ensure_tiny_model(name, family=family.model_type)
    elif not Path(name).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json", revision=cfg.model.revision), str):
            raise UserError(
                f"model.name_or_path: {name} is neither a local folder nor in the Hugging Face cache, and "
                "HF_HUB_OFFLINE=1 forbids downloading it"
            )
    return name


def bnb_config(
    compute_dtype: torch.dtype, quant_storage: torch.dtype | None = None, *, skip: tuple[str, ...]
):
    """NF4 with double quantization; `skip`: module-name prefixes kept out of 4-bit (the family's
    `skip_quantization`: the vision tower and lm_head)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        # ZeRO-3 shards parameters by dtype: the 4-bit storage must match the compute dtype there.
        bnb_4bit_quant_storage=quant_storage or torch.uint8,
        llm_int8_skip_modules=list(skip),
    )


def load_base_model(
    cfg: Config,
    quantization: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    device_map: Any = "auto-single",
    zero3: bool = False,
):
    """The base model, NF4-quantized (QLoRA) or not, on one device."""
    name = ensure_model_available(cfg)
    family = model_family(cfg)
    device = device or resolve_device(cfg)
    dtype = dtype or resolve_dtype(cfg, device)
    quantization = quantization or cfg.train.quantization
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": cfg.model.attn_implementation,
        "revision": cfg.model.revision,
    }
    if quantization == "nf4":
        if device != "cuda":
            raise UserError(
                "train.quantization: nf4 (QLoRA) needs a CUDA GPU for bitsandbytes; on a CPU set "
                "train.quantization=none (the tiny config does)"
            )
        kwargs["quantization_config"] = bnb_config(
            dtype, quant_storage=dtype if zero3 else None, skip=family.skip_quantization
        )
    if device_map == "auto-single":
        # One process drives one GPU (accelerate sets LOCAL_RANK); ZeRO-3 places weights itself.
        device_map = (
            None if zero3 else ({"": int(os.environ.get("LOCAL_RANK", 0))} if device == "cuda" else None)
        )
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = family.model_class().from_pretrained(name, **kwargs)
    model.config.use_cache = False
    return model


def lora_target_regex(cfg: Config, family: ModelFamily | None = None) -> str:
    """A peft `target_modules` regex: the chosen linears of the language model's decoder blocks only,
    plus the vision merger's linears when `lora.train_merger` is set (the family's module names)."""
    family = family or model_family(cfg)
    return family.lora_target_regex(cfg.lora.target_modules, cfg.lora.train_merger)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The language model's decoder layers (the family's, `model.model.language_model.layers`)."""
    return family_of_model(model).decoder_layers(model)


def apply_lora(
    model,
    cfg: Config,
    gradient_checkpointing: bool | None = None,
    uncheckpointed_layers: int | None = None,
    cast_lora_inputs: bool = False,
    fused_lora: bool = False,
    offload_checkpoints: bool | None = None,
    skip_down_proj_recompute: bool = False,
):
    """Wrap the model with LoRA adapters; the base stays frozen. `cast_lora_inputs=True` keeps peft's
    default fp32 upcast of adapter inputs (see keep_lora_inputs_in_compute_dtype); `fused_lora=True`
    adds each adapter's output in its B matmul's epilogue (`pcbvlm.fused_ops.fuse_lora_adds`);
    `offload_checkpoints` (default train.offload_checkpoints) keeps the checkpointed layers' inputs in
    CPU memory (`pcbvlm.offload`; the offloader is `peft_model.pcbvlm_checkpoint_offload`);
    `skip_down_proj_recompute=True` ends the checkpointed layers' recomputation before down_proj's base
    product (`pcbvlm.fused_ops.skip_down_proj_recompute`)."""
    from peft import LoraConfig, get_peft_model

    gradient_checkpointing = (
        cfg.train.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    )
    keep = cfg.train.uncheckpointed_layers if uncheckpointed_layers is None else uncheckpointed_layers
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs; inputs still need grads to reach LoRA.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        layers = decoder_layers(model)
        if keep > len(layers):
            raise UserError(
                f"train.uncheckpointed_layers: {keep} is more than the model's {len(layers)} decoder layers"
            )
        # transformers' GradientCheckpointingLayer checks this flag on every call: the last `keep` layers
        # run plainly and keep their activations, the others recompute theirs in the backward pass.
        for layer in layers[len(layers) - keep :]:
            layer.gradient_checkpointing = False
    offload = None
    if gradient_checkpointing and (
        cfg.train.offload_checkpoints if offload_checkpoints is None else offload_checkpoints
    ):
        from pcbvlm.offload import offload_checkpointed_inputs

        offload = offload_checkpointed_inputs(decoder_layers(model))
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_target_regex(cfg, family_of_model(model)),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    if not cast_lora_inputs:
        keep_lora_inputs_in_compute_dtype(peft_model)
    if fused_lora:
        from pcbvlm.fused_ops import fuse_lora_adds

        fuse_lora_adds(peft_model)
    skipped = 0
    if gradient_checkpointing and skip_down_proj_recompute:
        from pcbvlm.fused_ops import skip_down_proj_recompute as adapter_first_down_proj

        skipped = adapter_first_down_proj(decoder_layers(model))
    peft_model.pcbvlm_checkpoint_offload = offload
    peft_model.pcbvlm_down_proj_skips = skipped  # checkpointed layers that skip down_proj's recomputation
    return peft_model


def keep_lora_inputs_in_compute_dtype(model) -> int:
    """Stop peft from upcasting every LoRA input to the adapter's fp32 before its dropout and lora_A.

    peft keeps the adapter weights in fp32 and, unless it detects autocast (its check misses the CUDA
    autocast that Trainer/accelerate use: measured on an H200), casts each adapter input to fp32: a
    full-size fp32 copy of the input of all seven linears of every layer, dropout in fp32, then
    autocast's cast back to bf16 for the matmul. Under autocast the matmul runs in bf16 either way, so
    the result is the same (dropout then scales a bf16 value instead of its fp32 copy, rounded to bf16
    before the matmul in both cases); only the copies go. Without autocast (CPU fp32) nothing changes:
    input and adapter already share a dtype. Returns how many LoRA layers were switched."""
    switched = 0
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled") and hasattr(module, "lora_A"):
            module.cast_input_dtype_enabled = False
            switched += 1
    return switched


def liger_available() -> bool:
    from importlib.util import find_spec

    return find_spec("liger_kernel") is not None


def use_fused_kernels(cfg: Config, device: str) -> bool:
    """Whether train.fused_kernels asks for Liger's kernels here; `liger` without them is an error."""
    choice = cfg.train.fused_kernels
    if choice == "none":
        return False
    usable = device == "cuda" and liger_available()
    if choice == "liger" and not usable:
        where = "a CUDA GPU" if device != "cuda" else "the liger-kernel package (requirements/cuda.lock)"
        raise UserError(f"train.fused_kernels: liger needs {where}; set it to auto or none")
    return usable


def apply_fused_kernels(
    model, fused_cross_entropy: bool = True, swiglu: bool = False, in_layers: bool = True
) -> None:
    """Liger's Triton kernels on the model (its family's patch): RMSNorm and rotary embeddings fused, and
    a cross-entropy fused with lm_head that computes the loss chunk by chunk without materialising the
    logits (same loss: the tiny-model test on a GPU compares it). The rotary patch is module-wide.
    `fused_cross_entropy=False` under DeepSpeed ZeRO-3: the fused loss reads lm_head.weight directly,
    which ZeRO-3 only gathers inside lm_head's own forward. `swiglu`: Liger's SiLU-multiply kernel in
    the decoder MLPs (`pcbvlm.fused_ops.fuse_swiglu`; Liger 0.8.5 accepts the flag for Qwen3-VL but
    wires nothing). `in_layers=False` (train.compile_layers: Inductor fuses the layers' elementwise work
    itself) leaves the decoder layers alone: only the fused loss."""
    family_of_model(model).apply_fused_kernels(model, fused_cross_entropy, in_layers)
    if swiglu and in_layers:
        from pcbvlm.fused_ops import fuse_swiglu

        fuse_swiglu(model)


def trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
