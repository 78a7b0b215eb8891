"""Memory and disk estimates of each job, computed from the model's shape and the config.

Every estimate is a list of `Item`s (what, bytes, why) so the report can print the breakdown. The
formulas are deliberately simple, one line per term; their constants are documented where defined.

The train estimate was checked against H200 measurements of Qwen3-VL-32B with LoRA r64 on all decoder
linears, one 640x640 image per sample (~650 tokens), gradient checkpointing, fused AdamW. The project's
reference: NF4 model alone 19.1 GiB; peak 30-34 GiB at micro-batch 1, 38 GiB at 8, 51 GiB at 16. With a
bf16 base and grad_accum 2, peak minus weights measured 10.6 / 21.9 / 35.5 GiB at micro-batch 1 / 8 / 16
(estimated 9.7 / 21.5 / 35.0), 2.1 GiB less at grad_accum 1 (the gradients are then not alive at the
peak: 19.75 measured, 19.5 estimated at 8); without checkpointing 26.0 / 44.7 GiB at micro-batch 1 / 2
(estimated 26.3 / 44.5). Replacing the bf16 weights by the NF4 ones gives 29.8 / 41.1 / 54.7 GiB for QLoRA
at grad_accum 2; this module estimates 30.9 / 42.7 / 56.2 GiB, the 2 GiB margin included.

Peak memory is `static + held + max(transients) + margin`:
- static: weights, adapter, its gradients (with grad_accum > 1) and optimizer state;
- held: activations kept from the forward pass for the backward pass;
- transient: buffers alive at different moments (the logits and loss at the end of the forward pass,
  one decoder layer recomputed during the backward pass, the vision tower's forward): only the largest
  counts, since they are never alive together;
- margin: CUDA context and allocator fragmentation (`resources.vram_margin_gib`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pcbvlm.config import Config
from pcbvlm.shapes import ModelShape, ParamCounts, count_parameters

GIB = 1024**3
GB = 1000**3

# Text tokens of one sample besides the image: the chat template and the prompt (~80), and the JSON
# answer (~170 for DeepPCB's typical 3-12 boxes per image).
PROMPT_TOKENS = 80
ANSWER_TOKENS = 170

# bitsandbytes NF4 with double quantization: 4 bits per weight, one absmax per block of 64 weights stored
# as 8 bits, and one fp32 scale per 256 of those absmax values.
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
# Adapter weights are fp32 under peft whatever the base dtype (autocast_adapter_dtype), and so are their
# gradients and AdamW's two moments: 4 + 4 + 8 bytes per LoRA parameter.
LORA_PARAM_BYTES = 4
LORA_GRAD_BYTES = 4
ADAM_STATE_BYTES = 8
FULL_GRADIENTS = "gradients (all parameters)"
# The loss upcasts the bf16 logits to fp32 and log-softmaxes them. Its backward pass holds the bf16
# logits (half a copy), the saved log-softmax output, its gradient and the gradient of the fp32 logits:
# 3.5 copies of micro_batch x seq x vocab fp32 values (the measured slope, ~1.7 GiB per 650-token sample
# with the checkpointed hidden states, agrees).
LOGITS_FP32_COPIES = 3.5
# transformers writes safetensors shards of at most 5 GB; loading (and saving) holds about one in RAM.
SHARD_BYTES = 5 * GB
# RAM per DataLoader worker (a Python process with the tokenizer, decoding 640 px JPEGs).
WORKER_RAM_BYTES = 1 * GIB
# An evaluation report (JSON, per-sample predictions, overlay pictures of the worst samples).
EVAL_REPORT_BYTES = 1 * GIB

Kind = Literal["static", "held", "transient", "margin"]


@dataclass(frozen=True)
class Item:
    name: str
    bytes: float
    note: str = ""
    kind: Kind = "static"
    counted: bool = True  # False for a transient that a larger transient outweighs

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass(frozen=True)
class Estimate:
    """What one job needs on one device ("gpu" or "ram"), as a breakdown."""

    what: str
    device: Literal["gpu", "ram"]
    items: tuple[Item, ...]
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> float:
        return sum(item.bytes for item in self.items if item.counted)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def to_dict(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "device": self.device,
            "total_gib": round(self.total_gib, 2),
            "inputs": self.inputs,
            "items": [
                {"name": i.name, "gib": round(i.gib, 3), "kind": i.kind, "counted": i.counted, "note": i.note}
                for i in self.items
            ],
        }


def _peak(
    what: str, device: Literal["gpu", "ram"], items: Iterable[Item], inputs: dict[str, Any]
) -> Estimate:
    """Mark every transient but the largest as not counted (they are never alive together)."""
    items = list(items)
    transients = [i for i in items if i.kind == "transient"]
    largest = max(transients, key=lambda i: i.bytes) if transients else None
    marked = tuple(
        Item(i.name, i.bytes, i.note, i.kind, counted=(i.kind != "transient" or i is largest)) for i in items
    )
    return Estimate(what, device, marked, inputs)


# ---------------------------------------------------------------------------------------------------------
# Tokens


def image_tokens(max_pixels: int, patch_size: int = 16, merge_size: int = 2) -> int:
    """Visual tokens of one image resized to at most `max_pixels`: one per 2x2 group of 16 px patches
    (409600 px = 640x640 -> 1600 patches -> 400 tokens)."""
    return max_pixels // (patch_size * patch_size) // (merge_size * merge_size)


def sample_tokens(cfg: Config, shape: ModelShape | None = None) -> int:
    """Tokens of one training sample: its image(s), the prompt and the answer (~650 at 640x640)."""
    patch, merge = (
        (shape.vision.patch_size, shape.vision.spatial_merge_size) if shape and shape.vision else (16, 2)
    )
    return (
        images_per_sample(cfg) * image_tokens(cfg.data.max_pixels, patch, merge)
        + PROMPT_TOKENS
        + ANSWER_TOKENS
    )


def _dtype_bytes(precision: str) -> int:
    """Bytes of the compute dtype: bf16/fp16 (auto means bf16 on sm80+) = 2, fp32 = 4."""
    return 4 if precision == "fp32" else 2


# ---------------------------------------------------------------------------------------------------------
# Training


def lora_parameters(shape: ModelShape, r: int, targets: Sequence[str], train_merger: bool = False) -> int:
    """r x (in + out) for every targeted linear of every decoder layer (plus the vision merger's two
    linears with `train_merger`). Target names that match no decoder linear add nothing."""
    linears = shape.decoder_linears()
    per_layer = sum(r * (fan_in + fan_out) for name, (fan_in, fan_out) in linears.items() if name in targets)
    merger = sum(r * (a + b) for a, b in shape.merger_linears().values()) if train_merger else 0
    return shape.num_layers * per_layer + merger


def layer_activation_bytes_per_token(
    shape: ModelShape,
    act_bytes: int,
    targets: Sequence[str],
    attn_implementation: str = "sdpa",
    seq_len: int = 0,
    lora_dropout: float = 0.0,
    fused_swiglu: bool = False,
) -> float:
    """Bytes one decoder layer keeps for its backward pass, per token.

    Compute-dtype tensors: 4 x hidden (two norm outputs, two residual sums), 4 x q width (q projection,
    q-norm, rotary and the attention output), 4 x kv width (k projection, k-norm, rotary, v) and
    4 x intermediate (gate, up, SiLU(gate), their product); 3 x intermediate with the fused SwiGLU
    (train.fused_swiglu: SiLU(gate) is recomputed in its backward, not kept). With LoRA dropout each adapter input is
    kept once more (the dropout output). Eager attention also keeps the heads x seq attention matrix
    (scores and probabilities); SDPA/flash keep none. For the 32B shape: 319 KB per token and layer
    without dropout (275 KB measured on an H200 with Liger's kernels), 438 KB with it (448 measured
    with peft's fp32 adapter inputs).
    """
    h, q, kv, i = shape.hidden_size, shape.q_dim, shape.kv_dim, shape.intermediate_size
    elements = 4 * h + 4 * q + 4 * kv + (3 if fused_swiglu else 4) * i
    lora_inputs = sum(fan_in for name, (fan_in, _) in shape.decoder_linears().items() if name in targets)
    lora_bytes = lora_inputs * act_bytes if lora_dropout > 0 else 0
    attn = 2 * shape.num_heads * seq_len * act_bytes if attn_implementation == "eager" else 0
    return elements * act_bytes + lora_bytes + attn


def vision_forward_bytes(shape: ModelShape, patches: int, act_bytes: int, attn_implementation: str) -> float:
    """The frozen vision tower runs without autograd: only one block's buffers exist at a time, ~6 x hidden
    + 2 x intermediate per patch (plus the heads x patches^2 fp32 attention matrix under eager)."""
    if shape.vision is None or patches == 0:
        return 0.0
    v = shape.vision
    per_patch = (6 * v.hidden_size + 2 * v.intermediate_size) * act_bytes
    attn = v.num_heads * patches * patches * 4 if attn_implementation == "eager" else 0
    return patches * per_patch + attn


def estimate_train_vram(
    model: Any,
    cfg: Config | None = None,
    *,
    micro_batch: int | None = None,
    seq_len: int | None = None,
    quantization: str | None = None,
    precision: str | None = None,
    lora_r: int | None = None,
    lora_targets: Sequence[str] | None = None,
    gradient_checkpointing: bool | None = None,
    grad_accum: int | None = None,
    attn_implementation: str | None = None,
    max_pixels: int | None = None,
    margin_gib: float | None = None,
    logit_tokens: int | None = None,
    uncheckpointed_layers: int | None = None,
    fused_cross_entropy: bool | None = None,
    layout: Layout | None = None,
    fused_swiglu: bool | None = None,
    offload_checkpoints: bool | None = None,
) -> Estimate:
    """Peak GPU memory of one QLoRA/LoRA training step, per GPU.

    `model`: a `ModelShape`, a transformers `Qwen3VLConfig` or a config.json dict (e.g.
    `pcbvlm.shapes.qwen3_vl_32b_config()`). `cfg` gives every other input (default: the schema's
    defaults, i.e. the production config); keyword arguments override it. `seq_len` is the tokens of one
    sample (default from data.max_pixels: 400 image tokens + 80 prompt + 170 answer = 650).

    Terms: decoder linears in NF4 (`NF4_BITS` per weight) or the compute dtype; vision tower, embeddings,
    lm_head and norms in bf16; the largest linear dequantized to bf16 during its matmul (NF4 only); LoRA
    weights, gradients and AdamW moments (16 B per LoRA parameter; the gradients count only with
    grad_accum > 1, else they appear after the logits are freed); with gradient checkpointing one
    hidden state per layer is held and one layer is recomputed at a time, without it every layer's
    activations are held (with train.uncheckpointed_layers, those layers hold theirs); the fp32
    logits/loss (`LOGITS_FP32_COPIES`), or with Liger's fused cross-entropy (train.fused_kernels) only
    one chunk of them; the vision tower's forward buffers; and the margin. `fused_swiglu` (default:
    train.fused_swiglu where Liger's kernels are expected) keeps one intermediate-wide tensor less per
    token and layer. `offload_checkpoints` (default train.offload_checkpoints): the checkpointed hidden
    states wait in CPU RAM (`checkpoint_offload_bytes`, counted by `estimate_ram`); the GPU holds two of
    them at a time (the one being copied back and the one in use).

    `layout` (default: the one `train.accelerate_profile` names, `layout_of`): several processes, one GPU
    each, change the static terms only (each GPU runs its own micro-batch): see `_parallel_items`.
    """
    cfg = cfg or Config()
    layout = layout or layout_of(cfg)
    shape = ModelShape.from_config(model)
    counts = count_parameters(shape)
    mb = micro_batch if micro_batch is not None else cfg.train.micro_batch
    if max_pixels is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_pixels": max_pixels})})
    seq = seq_len if seq_len is not None else sample_tokens(cfg, shape)
    quant = quantization or cfg.train.quantization
    prec = precision or cfg.train.precision
    r = lora_r if lora_r is not None else cfg.lora.r
    targets = list(lora_targets if lora_targets is not None else cfg.lora.target_modules)
    gc = gradient_checkpointing if gradient_checkpointing is not None else cfg.train.gradient_checkpointing
    accum = grad_accum if grad_accum is not None else cfg.train.grad_accum
    attn = attn_implementation or cfg.model.attn_implementation
    margin = margin_gib if margin_gib is not None else cfg.resources.vram_margin_gib
    act = _dtype_bytes(prec)
    tokens = mb * seq

    items = _weight_items(shape, counts, quant, act)
    lora = 0
    if cfg.train.method == "full":
        # Every parameter learns: its gradient (weight dtype) and two fp32 AdamW moments, no adapter.
        items += [
            Item(
                FULL_GRADIENTS,
                counts.total * act,
                f"{counts.total / 1e6:.0f} M params, method full",
            ),
            Item("AdamW moments (fp32 m, v)", counts.total * ADAM_STATE_BYTES, "8 B per parameter"),
        ]
    else:
        lora = lora_parameters(shape, r, targets, cfg.lora.train_merger)
        items += [
            Item("LoRA weights (fp32)", lora * LORA_PARAM_BYTES, f"{lora / 1e6:.0f} M params, r={r}"),
            # With grad_accum > 1 the gradients of the previous micro-steps are alive at the peak; with 1 they
            # are allocated during the backward pass, after the logits are freed.
            Item("LoRA gradients (fp32)", lora * LORA_GRAD_BYTES, f"kept across {accum} micro-steps")
            if accum > 1
            else Item(
                "LoRA gradients (fp32)",
                lora * LORA_GRAD_BYTES,
                "filled after the logits are freed",
                "transient",
            ),
            Item("AdamW moments (fp32 m, v)", lora * ADAM_STATE_BYTES, "8 B per LoRA param"),
        ]
    if fused_swiglu is None:
        fused_swiglu = cfg.train.fused_swiglu and fused_kernels_expected(cfg)
    per_token_layer = layer_activation_bytes_per_token(
        shape, act, targets, attn, seq, cfg.lora.dropout, fused_swiglu=fused_swiglu
    )
    keep = min(
        uncheckpointed_layers if uncheckpointed_layers is not None else cfg.train.uncheckpointed_layers,
        shape.num_layers,
    )
    fused = fused_cross_entropy if fused_cross_entropy is not None else fused_kernels_expected(cfg)
    offload = offload_checkpoints if offload_checkpoints is not None else cfg.train.offload_checkpoints
    if gc:
        checkpointed = shape.num_layers - keep
        in_flight = min(2, checkpointed) if offload else checkpointed
        items.append(
            Item(
                "checkpointed hidden states" + (" in flight" if offload else ""),
                in_flight * tokens * shape.hidden_size * act,
                f"{in_flight} layers x {mb} x {seq} tokens x hidden"
                + (
                    f"; the other {checkpointed - in_flight} in CPU RAM (train.offload_checkpoints)"
                    if offload
                    else ""
                ),
                "held",
            )
        )
        if keep:
            items.append(
                Item(
                    "activations of the uncheckpointed layers",
                    keep * tokens * per_token_layer,
                    f"train.uncheckpointed_layers = {keep}",
                    "held",
                )
            )
        items.append(
            Item(
                "one layer recomputed (backward)",
                tokens * per_token_layer,
                "gradient checkpointing",
                "transient",
            )
        )
    else:
        items.append(
            Item(
                "activations of every layer",
                shape.num_layers * tokens * per_token_layer,
                "no gradient checkpointing",
                "held",
            )
        )
    # The training job asks for logits only from the answer on (pcbvlm.collator.keep_answer_logits):
    # ANSWER_TOKENS + 1 positions per sample; `logit_tokens=seq_len` estimates a full-logits step.
    per_sample_logits = min(seq, logit_tokens if logit_tokens is not None else ANSWER_TOKENS + 1)
    if fused:
        rows = fused_cross_entropy_chunk(mb * per_sample_logits, shape.hidden_size, shape.vocab_size)
        items.append(
            Item(
                "fused cross-entropy chunk",
                rows * shape.vocab_size * 2 * 2,
                f"{rows} rows x {shape.vocab_size} x 2 B x 2 (Liger: the full logits never exist)",
                "transient",
            )
        )
    else:
        logits = mb * per_sample_logits * shape.vocab_size * 4 * LOGITS_FP32_COPIES
        items.append(
            Item(
                "logits + loss (fp32)",
                logits,
                f"{mb} x {per_sample_logits} x {shape.vocab_size} x 4 B x {LOGITS_FP32_COPIES}",
                "held" if not gc else "transient",
            )
        )
    if shape.vision is not None:
        patches = mb * _patches_per_sample(cfg, shape)
        items.append(
            Item(
                "vision tower forward",
                vision_forward_bytes(shape, patches, act, attn),
                f"{patches} patches, frozen (no autograd)",
                "transient",
            )
        )
    items = _parallel_items(items, layout, lora, shape, counts, quant, act)
    items.append(Item("CUDA context + fragmentation", margin * GIB, "resources.vram_margin_gib", "margin"))
    inputs = {
        "layout": layout.kind,
        "processes": layout.processes,
        "micro_batch": mb,
        "seq_len": seq,
        "quantization": quant,
        "precision": prec,
        "lora_r": r,
        "lora_targets": targets,
        "gradient_checkpointing": gc,
        "uncheckpointed_layers": keep if gc else shape.num_layers,
        "offload_checkpoints": bool(gc and offload),
        "fused_cross_entropy": fused,
        "grad_accum": accum,
        "attn_implementation": attn,
        "max_pixels": cfg.data.max_pixels,
        "params_total": counts.total,
        "lora_params": lora,
        "method": cfg.train.method,
    }
    where = f", per GPU ({layout.kind}, {layout.processes} processes)" if layout.processes > 1 else ""
    return _peak(f"train step, micro_batch {mb}{where}", "gpu", items, inputs)


@dataclass(frozen=True)
class Layout:
    """How the training job spreads over the GPUs of one machine (an accelerate profile): `single` (one
    process), `ddp` (a full copy per GPU), `zero2` (DeepSpeed: optimizer state and gradients sharded),
    `zero3` (parameters sharded too)."""

    kind: Literal["single", "ddp", "zero2", "zero3"] = "single"
    processes: int = 1


def layout_of(cfg: Config, profile: str | None = None) -> Layout:
    """The layout of `config/accelerate/<profile>.yaml` (default: train.accelerate_profile); a profile
    that does not exist counts as one process (the preflight's profile check reports it)."""
    from pcbvlm.errors import ConfigError
    from pcbvlm.launch import profile_settings

    try:
        settings = profile_settings(profile or cfg.train.accelerate_profile)
    except ConfigError:
        return Layout()
    processes = int(settings.get("num_processes", 1) or 1)
    if "zero_stage" in settings:
        return Layout("zero3" if settings["zero_stage"] == 3 else "zero2", processes)
    if processes > 1:
        return Layout("ddp", processes)
    return Layout()


def _replace(items: list[Item], name: str, *new: Item) -> list[Item]:
    index = next(i for i, item in enumerate(items) if item.name == name)
    return items[:index] + list(new) + items[index + 1 :]


def _parallel_items(
    items: list[Item],
    layout: Layout,
    lora: int,
    shape: ModelShape,
    counts: ParamCounts,
    quantization: str,
    act_bytes: int,
) -> list[Item]:
    """The static terms of one GPU under `layout` (activations do not change: each GPU runs its own
    micro-batch). Checked against 2 H200s (BENCHMARKS.md, "Several GPUs"):

    - ddp: everything of one process, plus DDP's gradient buckets (a second fp32 copy of the LoRA
      gradients that NCCL all-reduces); the gradients are alive with them at the end of the backward pass.
    - zero2: DeepSpeed casts the trainable (LoRA) weights to bf16 and keeps an fp32 master copy; the
      master copy, the AdamW moments and the fp32 gradients are sharded over the N processes; the bf16
      gradients are whole on every GPU until they are reduced.
    - zero3: the base weights are sharded too (1/N each), and the layers being computed are gathered
      whole: two decoder layers' weights (the current one and the prefetched next) in their storage.
    """
    n = layout.processes
    if layout.kind == "single" or n < 1:
        return items
    if any(i.name == FULL_GRADIENTS for i in items):
        return _parallel_full_items(items, layout, shape, counts, act_bytes)
    grads = next(i for i in items if i.name == "LoRA gradients (fp32)")
    if layout.kind == "ddp":
        items = _replace(
            items, grads.name, Item(grads.name, grads.bytes, "alive with the DDP buckets", "static")
        )
        return items + [
            Item(
                "DDP gradient buckets (fp32)",
                lora * LORA_GRAD_BYTES,
                "the LoRA gradients that NCCL all-reduces",
            )
        ]
    items = _replace(
        items,
        "LoRA weights (fp32)",
        Item("LoRA weights (bf16)", lora * 2, "DeepSpeed casts the trainable weights to bf16"),
        Item(f"fp32 master weights (1/{n})", lora * LORA_PARAM_BYTES / n, "sharded (ZeRO)"),
    )
    items = _replace(
        items,
        grads.name,
        Item("LoRA gradients (bf16)", lora * 2, "whole until reduced"),
        Item(f"fp32 gradients (1/{n})", lora * LORA_GRAD_BYTES / n, "sharded (ZeRO-2)"),
    )
    items = _replace(
        items,
        "AdamW moments (fp32 m, v)",
        Item(f"AdamW moments (1/{n})", lora * ADAM_STATE_BYTES / n, "sharded (ZeRO)"),
    )
    if layout.kind == "zero3":
        items = _zero3_weights(items, n, shape, NF4_BITS / 8 if quantization == "nf4" else act_bytes)
    return items


def _zero3_weights(items: list[Item], n: int, shape: ModelShape, bytes_per_weight: float) -> list[Item]:
    """ZeRO-3 shards the stored weights (1/N each) and gathers the layers being computed whole: the current
    decoder layer and the prefetched next one. "vision tower forward" (activations) stays whole and transient."""
    weights = [i for i in items if i.name.startswith(("LM decoder linears", "embeddings", "vision tower ("))]
    for item in weights:
        items = _replace(items, item.name, Item(f"{item.name} (1/{n})", item.bytes / n, "sharded (ZeRO-3)"))
    per_layer = sum(a * b for a, b in shape.decoder_linears().values())
    return items + [
        Item(
            "gathered layers (ZeRO-3)",
            2 * per_layer * bytes_per_weight,
            "the current and the prefetched layer",
        )
    ]


def _parallel_full_items(
    items: list[Item], layout: Layout, shape: ModelShape, counts: ParamCounts, act_bytes: int
) -> list[Item]:
    """`train.method: full` on several GPUs: every parameter has a gradient (weight dtype) and fp32 moments.
    ddp keeps all of them on every GPU plus DDP's buckets (a second copy of the gradients); ZeRO-2/3
    reduce-scatter the gradients and shard the moments and an fp32 master copy; ZeRO-3 the weights too."""
    n = layout.processes
    grads = next(i for i in items if i.name == FULL_GRADIENTS)
    if layout.kind == "ddp":
        items = _replace(
            items, grads.name, Item(grads.name, grads.bytes, "alive with the DDP buckets", "static")
        )
        return items + [Item("DDP gradient buckets", grads.bytes, "the gradients that NCCL all-reduces")]
    items = _replace(
        items, grads.name, Item(f"{grads.name} (1/{n})", grads.bytes / n, "reduce-scattered (ZeRO)")
    )
    items = _replace(
        items,
        "AdamW moments (fp32 m, v)",
        Item(f"AdamW moments (1/{n})", counts.total * ADAM_STATE_BYTES / n, "sharded (ZeRO)"),
        Item(f"fp32 master weights (1/{n})", counts.total * 4 / n, "sharded (ZeRO)"),
    )
    if layout.kind == "zero3":
        items = _zero3_weights(items, n, shape, act_bytes)
    return items


def fused_kernels_expected(cfg: Config) -> bool:
    """Whether the training job will use Liger's fused cross-entropy: train.fused_kernels is liger, or
    auto with liger-kernel installed (the preflight runs in the same environment as the job)."""
    from importlib.util import find_spec

    choice = cfg.train.fused_kernels
    return choice == "liger" or (choice == "auto" and find_spec("liger_kernel") is not None)


def fused_cross_entropy_chunk(rows: int, hidden_size: int, vocab_size: int) -> int:
    """Rows of logits Liger's fused linear cross-entropy holds at once: it splits the rows into
    ceil(vocab / hidden) chunks, each rounded up to a power of two (liger_kernel.ops.fused_linear_cross_entropy)."""
    chunks = -(-vocab_size // hidden_size)
    per_chunk = -(-rows // chunks)
    return min(rows, 1 << max(per_chunk - 1, 0).bit_length())


def images_per_sample(cfg: Config) -> int:
    """Images per sample: the board, and the defect-free template before it with data.with_template."""
    return 2 if cfg.data.with_template else 1


def _patches_per_sample(cfg: Config, shape: ModelShape) -> int:
    """Vision patches of one sample (4 per visual token with the 2x2 merge)."""
    v = shape.vision
    if v is None:
        return 0
    return (
        images_per_sample(cfg)
        * image_tokens(cfg.data.max_pixels, v.patch_size, v.spatial_merge_size)
        * v.spatial_merge_size**2
    )


def _weight_items(shape: ModelShape, counts: ParamCounts, quantization: str, act_bytes: int) -> list[Item]:
    """The model's weights: decoder linears in NF4 or the compute dtype, the rest in the compute dtype."""
    if quantization == "nf4":
        linears = Item(
            "LM decoder linears (NF4 + double quant)",
            counts.lm_linears * NF4_BITS / 8,
            f"{counts.lm_linears / 1e9:.2f} B params x {NF4_BITS:.3f} bit",
        )
    else:
        linears = Item(
            f"LM decoder linears ({'fp32' if act_bytes == 4 else 'bf16'})",
            counts.lm_linears * act_bytes,
            f"{counts.lm_linears / 1e9:.2f} B params, not quantized",
        )
    wb = act_bytes  # non-quantized weights are loaded in the compute dtype (bf16 on GPUs, fp32 on the demo)
    dtype = "fp32" if wb == 4 else "bf16"
    items = [
        linears,
        Item(
            f"embeddings + lm_head + norms ({dtype})",
            (counts.embed_tokens + counts.lm_head + counts.lm_norms) * wb,
            f"{(counts.embed_tokens + counts.lm_head) / 1e6:.0f} M params",
        ),
        Item(f"vision tower ({dtype})", counts.vision * wb, f"{counts.vision / 1e6:.0f} M params"),
    ]
    if quantization == "nf4":
        biggest = max(a * b for a, b in shape.decoder_linears().values())
        items.append(
            Item("NF4 dequantization buffer", biggest * 2, "largest linear in bf16 during its matmul")
        )
    return items


def suggest_train_fit(model: Any, cfg: Config, free_bytes: float) -> str:
    """What to change when the train step does not fit `free_bytes`: the checkpointed layers' inputs in
    host RAM (measured at the same speed), else fewer uncheckpointed layers (only slower), else the
    largest micro_batch that fits, else a smaller max_pixels, else gradient checkpointing; or the memory
    a GPU would need."""
    need = estimate_train_vram(model, cfg)
    head = f"micro_batch {cfg.train.micro_batch} needs ~{need.total_gib:.1f} GiB, {free_bytes / GIB:.1f} GiB free"
    if cfg.train.gradient_checkpointing and not cfg.train.offload_checkpoints:
        offloaded = cfg.model_copy(
            update={"train": cfg.train.model_copy(update={"offload_checkpoints": True})}
        )
        if estimate_train_vram(model, offloaded).total_bytes <= free_bytes:
            ram = checkpoint_offload_bytes(model, offloaded) / GIB
            return (
                f"{head}: train.offload_checkpoints=true fits (the checkpointed layers' inputs wait in "
                f"pinned host RAM, ~{ram:.1f} GiB; the same speed on the H200)"
            )
    kept = cfg.train.uncheckpointed_layers if cfg.train.gradient_checkpointing else 0
    for layers in range(kept - 1, -1, -1):
        if estimate_train_vram(model, cfg, uncheckpointed_layers=layers).total_bytes <= free_bytes:
            return f"{head}: train.uncheckpointed_layers={layers} fits (recomputes more layers: slower, same result)"
    also = ""
    if kept:  # the remedies below recompute every layer
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"uncheckpointed_layers": 0})})
        also = " train.uncheckpointed_layers=0"
    for mb in range(cfg.train.micro_batch - 1, 0, -1):
        if estimate_train_vram(model, cfg, micro_batch=mb).total_bytes <= free_bytes:
            effective = cfg.train.micro_batch * cfg.train.grad_accum
            accum = max(1, -(-effective // mb))
            return f"{head}: micro_batch {mb} fits (set train.micro_batch={mb} train.grad_accum={accum}{also} to keep the effective batch {effective})"
    if not cfg.train.gradient_checkpointing and (
        estimate_train_vram(model, cfg, micro_batch=1, gradient_checkpointing=True).total_bytes <= free_bytes
    ):
        return f"{head}: set train.gradient_checkpointing=true and train.micro_batch=1"
    for pixels in (262144, 147456, 65536):  # 512x512, 384x384, 256x256
        if pixels < cfg.data.max_pixels and (
            estimate_train_vram(model, cfg, micro_batch=1, max_pixels=pixels).total_bytes <= free_bytes
        ):
            return f"{head}: micro_batch 1 with data.max_pixels={pixels}{also} fits"
    floor = estimate_train_vram(model, cfg, micro_batch=1, gradient_checkpointing=True)
    return (
        f"{head}: nothing fits; micro_batch 1 needs ~{floor.total_gib:.1f} GiB (use a larger GPU, or free it)"
    )


# ---------------------------------------------------------------------------------------------------------
# Evaluation, merge, quantization


def estimate_eval_vram(
    model: Any,
    cfg: Config | None = None,
    *,
    batch_size: int | None = None,
    weights: str = "w4a16",
    packed_bytes: float | None = None,
) -> Estimate:
    """Peak GPU memory of batched generation.

    Weights: `w4a16` (the AWQ output, run packed by `pcbvlm.int4`: 4 bits + one bf16 scale per
    quantize.group_size weights for the decoder linears, bf16 for the rest; `packed_bytes`, the
    quantized folder's safetensors, replaces the computed size when the folder exists; the tinygemm
    layout adds a bf16 zero per group, and a many-row matmul one layer's weight in bf16) or
    `nf4` (the QLoRA base plus the fp32 adapter; bf16 for the rest). KV cache:
    batch x (prompt + max_new_tokens) x layers x 2 (k, v) x kv heads x head_dim x 2 B. Transient: the
    prefill of one layer (batch x prompt tokens x (3 x intermediate + hidden) x 2 B) or the vision tower.
    """
    cfg = cfg or Config()
    shape = ModelShape.from_config(model)
    counts = count_parameters(shape)
    batch = batch_size if batch_size is not None else cfg.eval.batch_size
    prompt = sample_tokens(cfg, shape) - ANSWER_TOKENS
    context = prompt + cfg.eval.max_new_tokens
    if weights == "w4a16":
        group = cfg.quantize.group_size
        bits = 4 + 16 / group
        if packed_bytes:
            items = [
                Item(
                    "quantized model as stored (W4A16 packed, rest bf16)",
                    packed_bytes,
                    "the safetensors of outputs/quantized, loaded without unpacking",
                )
            ]
        else:
            items = [
                Item("LM decoder linears (W4A16)", counts.lm_linears * bits / 8, f"{bits:.3f} bit, AWQ"),
                Item("vision + embeddings + lm_head (bf16)", counts.not_quantized * 2, "left unquantized"),
            ]
        if cfg.eval.int4_kernel == "tinygemm":
            items.append(
                Item("int4 kernel zero offsets (bf16)", counts.lm_linears / group * 2, "tinygemm layout")
            )
        # Prefill and batched steps read one layer's weight back to bf16 at a time (both layouts).
        biggest = max(a * b for a, b in shape.decoder_linears().values())
        items.append(
            Item("one linear read back to bf16", biggest * 2, "int4 layer during a many-row matmul", "held")
        )
    else:
        items = _weight_items(shape, counts, "nf4", 2)
        lora = lora_parameters(shape, cfg.lora.r, cfg.lora.target_modules, cfg.lora.train_merger)
        items.append(Item("LoRA adapter (fp32)", lora * LORA_PARAM_BYTES, f"r={cfg.lora.r}"))
    kv = batch * context * shape.num_layers * 2 * shape.kv_dim * 2
    items.append(
        Item("KV cache (bf16)", kv, f"{batch} x ({prompt} + {cfg.eval.max_new_tokens}) tokens", "held")
    )
    prefill = batch * prompt * (3 * shape.intermediate_size + shape.hidden_size) * 2
    items.append(Item("prefill of one layer", prefill, f"{batch} x {prompt} prompt tokens", "transient"))
    if shape.vision is not None:
        patches = batch * _patches_per_sample(cfg, shape)
        items.append(
            Item(
                "vision tower forward",
                vision_forward_bytes(shape, patches, 2, cfg.model.attn_implementation),
                f"{patches} patches",
                "transient",
            )
        )
    items.append(
        Item(
            "CUDA context + fragmentation",
            cfg.resources.vram_margin_gib * GIB,
            "resources.vram_margin_gib",
            "margin",
        )
    )
    inputs = {
        "batch_size": batch,
        "prompt_tokens": prompt,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "weights": weights,
    }
    return _peak(f"eval, batch {batch} ({weights})", "gpu", items, inputs)


def estimate_merge_memory(model: Any, cfg: Config | None = None) -> Estimate:
    """Merging the adapter into the bf16 base, on `resources.merge_device` (RAM for cpu, VRAM for cuda):
    the full model in bf16 (2 B/param: ~67 GB for 32B) + the fp32 adapter + one 5 GB shard being
    written + the margin (ram_margin_gib or vram_margin_gib)."""
    cfg = cfg or Config()
    shape = ModelShape.from_config(model)
    counts = count_parameters(shape)
    lora = lora_parameters(shape, cfg.lora.r, cfg.lora.target_modules, cfg.lora.train_merger)
    on_gpu = cfg.resources.merge_device == "cuda"
    items = [
        Item(
            "base model (bf16)",
            counts.total * 2,
            f"{counts.total / 1e9:.2f} B params x 2 B = {counts.total * 2 / GB:.1f} GB",
        ),
        Item("LoRA adapter (fp32)", lora * LORA_PARAM_BYTES, f"r={cfg.lora.r}"),
    ]
    if on_gpu:
        items.append(
            Item(
                "CUDA context + fragmentation",
                cfg.resources.vram_margin_gib * GIB,
                "resources.vram_margin_gib",
                "margin",
            )
        )
    else:
        items.append(Item("save buffer", SHARD_BYTES, "one 5 GB safetensors shard", "transient"))
        items.append(
            Item(
                "process + OS margin",
                cfg.resources.ram_margin_gib * GIB,
                "resources.ram_margin_gib",
                "margin",
            )
        )
    return _peak(
        f"merge on {cfg.resources.merge_device}",
        "gpu" if on_gpu else "ram",
        items,
        {"merge_device": cfg.resources.merge_device},
    )


def calibration_tokens(cfg: Config, shape: ModelShape | None = None) -> int:
    """Tokens of one calibration sample: a DeepPCB sample, cut at quantize.max_seq_length."""
    return min(sample_tokens(cfg, shape), cfg.quantize.max_seq_length)


def estimate_quantize_vram(
    model: Any, cfg: Config | None = None, *, num_samples: int | None = None
) -> Estimate:
    """GPU memory of llm-compressor's AWQ, which runs the model layer by layer (the bf16 model itself
    is offloaded to CPU RAM, see `estimate_ram`).

    On the GPU: the largest subgraph's weights in bf16 (one decoder layer, or the vision tower with the
    embeddings, which run before the first layer); AWQ's cached inputs of each smoothed module for all
    calibration samples (not offloaded by default: N x T x (2 x hidden + q width + intermediate) x 2 B);
    AWQ's reference outputs of one module (N x T x hidden x 2 B, transient); the margin.
    """
    cfg = cfg or Config()
    shape = ModelShape.from_config(model)
    counts = count_parameters(shape)
    n = num_samples if num_samples is not None else cfg.quantize.num_calibration_samples
    t = calibration_tokens(cfg, shape)
    layer = (counts.lm_linears + counts.lm_norms) // shape.num_layers
    first = counts.vision + counts.embed_tokens
    items = [
        Item("largest subgraph (bf16)", max(layer, first) * 2, "one decoder layer, or vision + embeddings"),
        Item(
            "AWQ cached module inputs",
            n * t * (2 * shape.hidden_size + shape.q_dim + shape.intermediate_size) * 2,
            f"{n} samples x {t} tokens",
            "held",
        ),
        Item("AWQ reference outputs", n * t * shape.hidden_size * 2, "one module's outputs", "transient"),
        Item(
            "CUDA context + fragmentation",
            cfg.resources.vram_margin_gib * GIB,
            "resources.vram_margin_gib",
            "margin",
        ),
    ]
    return _peak(f"AWQ, {n} calibration samples", "gpu", items, {"num_calibration_samples": n, "tokens": t})


def suggest_quantize_fit(model: Any, cfg: Config, free_bytes: float) -> str:
    need = estimate_quantize_vram(model, cfg)
    head = f"AWQ with {cfg.quantize.num_calibration_samples} samples needs ~{need.total_gib:.1f} GiB, {free_bytes / GIB:.1f} GiB free"
    n = cfg.quantize.num_calibration_samples // 2
    while n >= 8:
        if estimate_quantize_vram(model, cfg, num_samples=n).total_bytes <= free_bytes:
            return f"{head}: quantize.num_calibration_samples={n} fits"
        n //= 2
    return f"{head}: nothing fits (use a larger GPU, or free it)"


def suggest_eval_fit(
    model: Any, cfg: Config, free_bytes: float, weights: str, packed_bytes: float | None = None
) -> str:
    need = estimate_eval_vram(model, cfg, weights=weights, packed_bytes=packed_bytes)
    head = (
        f"eval batch {cfg.eval.batch_size} needs ~{need.total_gib:.1f} GiB, {free_bytes / GIB:.1f} GiB free"
    )
    for batch in range(cfg.eval.batch_size - 1, 0, -1):
        fits = estimate_eval_vram(model, cfg, batch_size=batch, weights=weights, packed_bytes=packed_bytes)
        if fits.total_bytes <= free_bytes:
            return f"{head}: eval.batch_size={batch} fits"
    return f"{head}: nothing fits even at batch 1 (use a larger GPU, or free it)"


def checkpoint_offload_bytes(model: Any, cfg: Config) -> int:
    """Pinned CPU RAM that train.offload_checkpoints takes per host: the input hidden state of every
    checkpointed decoder layer of one micro-batch, for each training process (0 when it is off)."""
    t = cfg.train
    if not (t.offload_checkpoints and t.gradient_checkpointing):
        return 0
    shape = ModelShape.from_config(model)
    layers = shape.num_layers - (0 if t.method == "full" else min(t.uncheckpointed_layers, shape.num_layers))
    per_process = layers * t.micro_batch * sample_tokens(cfg, shape) * shape.hidden_size
    return per_process * _dtype_bytes(t.precision) * layout_of(cfg).processes


def estimate_ram(job: str, model: Any | None, cfg: Config) -> Estimate:
    """CPU RAM of a job (`model` None: the shape is unknown and only the fixed terms count).

    train/eval: one safetensors shard while loading (weights go to the GPU; not counted while the shape
    is unknown), a DataLoader worker each
    (`WORKER_RAM_BYTES`, train only), the margin. merge on cpu: see `estimate_merge_memory`. quantize:
    the whole bf16 model (llm-compressor keeps it in RAM and moves one layer at a time to the GPU) plus
    the layer-to-layer activations of all calibration samples, offloaded to the CPU.
    """
    margin = Item(
        "process + OS margin", cfg.resources.ram_margin_gib * GIB, "resources.ram_margin_gib", "margin"
    )
    if job == "merge" and cfg.resources.merge_device == "cpu" and model is not None:
        return estimate_merge_memory(model, cfg)
    counts = count_parameters(model) if model is not None else None
    items: list[Item] = []
    if job == "quantize" and counts is not None:
        shape = ModelShape.from_config(model)
        n, t = cfg.quantize.num_calibration_samples, calibration_tokens(cfg, shape)
        items += [
            Item(
                "merged model (bf16)",
                counts.total * 2,
                f"{counts.total / 1e9:.2f} B params x 2 B = {counts.total * 2 / GB:.1f} GB",
            ),
            Item("offloaded layer activations", n * t * shape.hidden_size * 2, f"{n} samples x {t} tokens"),
        ]
    else:
        if counts is not None:
            shard = min(SHARD_BYTES, counts.total * 2)
            items.append(Item("loading buffer", shard, "one safetensors shard (at most 5 GB)", "transient"))
        offloaded = checkpoint_offload_bytes(model, cfg) if job == "train" and model is not None else 0
        if offloaded:
            items.append(
                Item(
                    "offloaded checkpoint inputs (pinned)",
                    offloaded,
                    "train.offload_checkpoints: one hidden state per checkpointed layer and token",
                )
            )
        if job == "train" and cfg.train.num_workers:
            items.append(
                Item(
                    "DataLoader workers",
                    cfg.train.num_workers * WORKER_RAM_BYTES,
                    f"{cfg.train.num_workers} x 1 GiB",
                )
            )
    items.append(margin)
    return _peak(f"{job} RAM", "ram", items, {})


@dataclass(frozen=True)
class ArtifactSizes:
    """Bytes on disk of what the pipeline downloads and writes."""

    base_download: float  # the bf16 safetensors of the base model (2 B/param)
    checkpoint: float  # one Trainer checkpoint: fp32 adapter + AdamW moments
    adapter: float  # the final adapter (fp32)
    merged: float  # the merged bf16 model
    quantized: float  # W4A16 decoder linears + bf16 rest

    def to_dict(self) -> dict[str, float]:
        return {k: round(v / GIB, 2) for k, v in self.__dict__.items()}


def artifact_sizes(model: Any, cfg: Config) -> ArtifactSizes:
    shape = ModelShape.from_config(model)
    counts = count_parameters(shape)
    lora = lora_parameters(shape, cfg.lora.r, cfg.lora.target_modules, cfg.lora.train_merger)
    bits = 4 + 16 / cfg.quantize.group_size
    return ArtifactSizes(
        base_download=counts.total * 2,
        checkpoint=lora * (LORA_PARAM_BYTES + ADAM_STATE_BYTES),
        adapter=lora * LORA_PARAM_BYTES,
        merged=counts.total * 2,
        quantized=counts.lm_linears * bits / 8 + counts.not_quantized * 2,
    )
