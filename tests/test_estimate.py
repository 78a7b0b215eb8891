"""Each term of the preflight's memory model, on a small made-up shape whose figures are worked out by hand
(tests/test_preflight.py checks the totals against the 32B measurements). A wrong factor, a term that is
dropped or counted twice, or a setting that is ignored changes one of these numbers."""

from __future__ import annotations

import pytest

from pcbvlm.config import Config
from pcbvlm.preflight import estimate as est
from pcbvlm.preflight.estimate import (
    GIB,
    NF4_BITS,
    Estimate,
    Item,
    Layout,
    artifact_sizes,
    calibration_tokens,
    checkpoint_offload_bytes,
    estimate_eval_vram,
    estimate_merge_memory,
    estimate_quantize_vram,
    estimate_ram,
    estimate_train_vram,
    fused_cross_entropy_chunk,
    fused_kernels_expected,
    image_tokens,
    layer_activation_bytes_per_token,
    layout_of,
    lora_parameters,
    sample_tokens,
    suggest_eval_fit,
    suggest_quantize_fit,
    suggest_train_fit,
    vision_forward_bytes,
)
from pcbvlm.shapes import ModelShape, VisionShape, count_parameters, qwen3_vl_32b_shape

# hidden 64, q width 4 x 24 = 96, kv width 2 x 24 = 48, intermediate 160, 3 layers, vocab 1000.
# Decoder linears (in, out): q 64x96, k 64x48, v 64x48, o 96x64, gate 64x160, up 64x160, down 160x64:
# 49152 weights per layer, 147456 in all; in + out summed over the seven: 1216. Largest: 64 x 160.
VISION = VisionShape(
    depth=2,
    hidden_size=32,
    intermediate_size=48,
    num_heads=2,
    in_channels=3,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    out_hidden_size=64,
    num_position_embeddings=16,
    num_deepstack=0,
)
SHAPE = ModelShape(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=160,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=24,
    vision=VISION,
)
TEXT_ONLY = ModelShape(
    vocab_size=10,
    hidden_size=64,
    intermediate_size=160,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=24,
)
COUNTS = count_parameters(SHAPE)
LM_LINEARS = 147456
NORMS = 3 * (2 * 64 + 2 * 24) + 64  # 592
EMBED = 1000 * 64
LORA_R8 = 3 * 8 * 1216  # 29184
# Tokens of one sample at the default 409600 px: 400 image tokens + 80 prompt + 170 answer.
SEQ = 650
# Vision: 1600 patches per image (4 per token); one block's buffers per patch (6 x 32 + 2 x 48) x 2 B.
PATCHES = 1600
VISION_PER_PATCH_BF16 = 576


def config(**sections) -> Config:
    """The schema's defaults with some keys changed: config(train={"micro_batch": 2})."""
    base = Config().model_dump()
    for name, values in sections.items():
        base[name].update(values)
    return Config.model_validate(base)


QLORA = {
    "micro_batch": 2,
    "grad_accum": 2,
    "gradient_checkpointing": True,
    "fused_kernels": "none",
    "precision": "bf16",
    "accelerate_profile": "a800",
}
LORA8 = {"r": 8, "dropout": 0.0}


def rows(estimate: Estimate) -> list[tuple[str, float, str, bool]]:
    return [(i.name, i.bytes, i.kind, i.counted) for i in estimate.items]


def counted_total(table: list[tuple[str, float, str, bool]]) -> float:
    return sum(b for _, b, _, counted in table if counted)


# ---------------------------------------------------------------------------------------------------------
# Items, totals, tokens


def test_only_the_largest_transient_counts_and_the_dict_rounds():
    items = [
        Item("weights", 3 * GIB),
        Item("small", 1 * GIB, "a", "transient"),
        Item("large", 2 * GIB, "b", "transient"),
        Item("held", 0.5 * GIB, "c", "held"),
        Item("margin", 0.25 * GIB, "d", "margin"),
    ]
    estimate = est._peak("job", "gpu", items, {"k": 1})
    assert [i.counted for i in estimate.items] == [True, False, True, True, True]
    assert estimate.total_bytes == 5.75 * GIB and estimate.total_gib == 5.75
    assert estimate.items[1] == Item("small", 1 * GIB, "a", "transient", counted=False)
    assert estimate.to_dict() == {
        "what": "job",
        "device": "gpu",
        "total_gib": 5.75,
        "inputs": {"k": 1},
        "items": [
            {"name": "weights", "gib": 3.0, "kind": "static", "counted": True, "note": ""},
            {"name": "small", "gib": 1.0, "kind": "transient", "counted": False, "note": "a"},
            {"name": "large", "gib": 2.0, "kind": "transient", "counted": True, "note": "b"},
            {"name": "held", "gib": 0.5, "kind": "held", "counted": True, "note": "c"},
            {"name": "margin", "gib": 0.25, "kind": "margin", "counted": True, "note": "d"},
        ],
    }
    odd = Estimate("x", "ram", (Item("a", 1.23456789 * GIB), Item("b", 1.0 * GIB)))
    assert odd.to_dict()["total_gib"] == 2.23 and odd.to_dict()["items"][0]["gib"] == 1.235
    assert Item("a", GIB / 2).gib == 0.5
    # Of two transients of one size only one counts; without transients everything counts.
    tie = est._peak("t", "gpu", [Item("a", 5, "", "transient"), Item("b", 5, "", "transient")], {})
    assert tie.total_bytes == 5
    plain = est._peak("p", "ram", [Item("a", 5), Item("b", 7, "", "held")], {})
    assert plain.total_bytes == 12 and plain.device == "ram" and plain.what == "p"


def test_image_and_sample_tokens():
    assert image_tokens(409600) == 400
    assert image_tokens(409600, 14, 2) == 522  # 409600 // 196 = 2089 patches, // 4
    assert image_tokens(409600, 16, 1) == 1600
    assert image_tokens(1000) == 0
    assert sample_tokens(Config()) == SEQ
    assert sample_tokens(Config(), SHAPE) == SEQ
    assert sample_tokens(config(data={"max_pixels": 65536})) == 64 + 80 + 170
    assert sample_tokens(config(data={"with_template": True})) == 2 * 400 + 250
    qwen25 = ModelShape(**{**SHAPE.__dict__, "vision": VisionShape(**{**VISION.__dict__, "patch_size": 14})})
    assert sample_tokens(Config(), qwen25) == 522 + 250
    unmerged = ModelShape(
        **{**SHAPE.__dict__, "vision": VisionShape(**{**VISION.__dict__, "spatial_merge_size": 1})}
    )
    assert sample_tokens(Config(), unmerged) == 1600 + 250
    assert sample_tokens(Config(), TEXT_ONLY) == SEQ  # no vision config: Qwen3-VL's 16 px, 2x2
    assert est._patches_per_sample(Config(), SHAPE) == PATCHES
    assert est._patches_per_sample(config(data={"with_template": True}), SHAPE) == 2 * PATCHES
    assert est._patches_per_sample(Config(), TEXT_ONLY) == 0
    assert est._patches_per_sample(Config(), unmerged) == 1600


def test_lora_parameters_count_r_times_in_plus_out():
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lora_parameters(SHAPE, 8, every) == LORA_R8
    assert lora_parameters(SHAPE, 16, every) == 2 * LORA_R8
    assert lora_parameters(SHAPE, 8, ["q_proj", "v_proj", "lm_head"]) == 3 * 8 * (160 + 112)
    # The merger: 2x2 patches of 32 = 128 wide; fc1 128 -> 128, fc2 128 -> 64.
    assert lora_parameters(SHAPE, 8, every, train_merger=True) == LORA_R8 + 8 * (256 + 192)
    assert lora_parameters(TEXT_ONLY, 8, every, train_merger=True) == LORA_R8
    assert lora_parameters(qwen3_vl_32b_shape(), 64, every) == 536_870_912  # 64 x 64 layers x 131072


def test_activations_per_token_of_one_layer():
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    plain = 4 * 64 + 4 * 96 + 4 * 48 + 4 * 160  # 1472 values
    assert layer_activation_bytes_per_token(SHAPE, 2, every) == plain * 2
    assert layer_activation_bytes_per_token(SHAPE, 4, every, "sdpa", 100) == plain * 4
    assert layer_activation_bytes_per_token(SHAPE, 2, every, "flash_attention_2", 100) == plain * 2
    # Dropout keeps each adapter input: the fan-in of every targeted linear.
    targets = ["q_proj", "down_proj"]
    assert layer_activation_bytes_per_token(SHAPE, 2, targets, lora_dropout=0.1) == plain * 2 + (64 + 160) * 2
    assert layer_activation_bytes_per_token(SHAPE, 2, targets, lora_dropout=0.0) == plain * 2
    # Eager attention keeps scores and probabilities: 2 x heads x seq per token.
    assert layer_activation_bytes_per_token(SHAPE, 2, targets, "eager", 100) == plain * 2 + 2 * 4 * 100 * 2
    assert layer_activation_bytes_per_token(SHAPE, 2, targets, "eager") == plain * 2  # no sequence given
    assert layer_activation_bytes_per_token(SHAPE, 4, targets, "eager", 100, 0.1) == (
        plain * 4 + 224 * 4 + 2 * 4 * 100 * 4
    )
    # The 32B shape: 319 KB per token and layer in bf16 (docstring).
    big = layer_activation_bytes_per_token(qwen3_vl_32b_shape(), 2, every)
    assert big == 2 * 4 * (5120 + 8192 + 1024 + 25600) == 319_488


def test_vision_forward_buffers():
    assert vision_forward_bytes(SHAPE, 0, 2, "sdpa") == 0.0
    assert vision_forward_bytes(TEXT_ONLY, 100, 2, "sdpa") == 0.0
    assert vision_forward_bytes(SHAPE, 1600, 2, "sdpa") == 1600 * VISION_PER_PATCH_BF16
    assert vision_forward_bytes(SHAPE, 1, 2, "sdpa") == VISION_PER_PATCH_BF16
    assert vision_forward_bytes(SHAPE, 1600, 4, "sdpa") == 1600 * 2 * VISION_PER_PATCH_BF16
    assert vision_forward_bytes(SHAPE, 10, 2, "eager") == 10 * VISION_PER_PATCH_BF16 + 2 * 10 * 10 * 4


def test_fused_cross_entropy_chunk_rows():
    # ceil(1000 / 64) = 16 chunks; ceil(684 / 16) = 43 rows, rounded up to 64.
    assert fused_cross_entropy_chunk(684, 64, 1000) == 64
    assert fused_cross_entropy_chunk(1024, 64, 1000) == 64  # exactly 64 per chunk stays 64
    assert fused_cross_entropy_chunk(1025, 64, 1000) == 128
    assert fused_cross_entropy_chunk(5, 1000, 1000) == 5  # one chunk: never more than the rows
    assert fused_cross_entropy_chunk(16, 64, 1000) == 1
    assert fused_cross_entropy_chunk(0, 64, 1000) == 0
    # 32B, micro-batch 16 x 231 logit rows: 30 chunks of 124 -> 128 rows.
    assert fused_cross_entropy_chunk(3696, 5120, 151936) == 128


def test_fused_kernels_expected_follows_the_setting_and_the_environment(monkeypatch):
    import importlib.util

    assert fused_kernels_expected(config(train={"fused_kernels": "liger"}))
    assert not fused_kernels_expected(config(train={"fused_kernels": "none"}))
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: object() if name == "liger_kernel" else None
    )
    assert fused_kernels_expected(config(train={"fused_kernels": "auto"}))
    assert not fused_kernels_expected(config(train={"fused_kernels": "none"}))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert not fused_kernels_expected(config(train={"fused_kernels": "auto"}))
    assert fused_kernels_expected(config(train={"fused_kernels": "liger"}))


# ---------------------------------------------------------------------------------------------------------
# Training


def qlora_rows(mb: int = 2) -> dict[str, tuple[float, str]]:
    """The QLoRA step of QLORA (r 8, bf16, checkpointing, grad_accum 2, no fused loss), by hand."""
    tokens = mb * SEQ
    return {
        "LM decoder linears (NF4 + double quant)": (LM_LINEARS * NF4_BITS / 8, "static"),  # 76068
        "embeddings + lm_head + norms (bf16)": ((2 * EMBED + NORMS) * 2, "static"),
        "vision tower (bf16)": (COUNTS.vision * 2, "static"),
        "NF4 dequantization buffer": (64 * 160 * 2, "static"),
        "LoRA weights (fp32)": (LORA_R8 * 4, "static"),
        "LoRA gradients (fp32)": (LORA_R8 * 4, "static"),
        "AdamW moments (fp32 m, v)": (LORA_R8 * 8, "static"),
        "checkpointed hidden states": (3 * tokens * 64 * 2, "held"),
        "one layer recomputed (backward)": (tokens * 1472 * 2, "transient"),
        "logits + loss (fp32)": (mb * 171 * 1000 * 4 * 3.5, "transient"),
        "vision tower forward": (mb * PATCHES * VISION_PER_PATCH_BF16, "transient"),
        "CUDA context + fragmentation": (2 * GIB, "margin"),
    }


def test_qlora_step_term_by_term():
    cfg = config(train=QLORA, lora=LORA8)
    estimate = estimate_train_vram(SHAPE, cfg)
    expected = qlora_rows()
    assert expected["LM decoder linears (NF4 + double quant)"][0] == 76068
    assert [(n, b, k) for n, b, k, _ in rows(estimate)] == [(n, b, k) for n, (b, k) in expected.items()]
    # The logits (4.79 MB) outweigh the recomputed layer (3.83 MB) and the vision tower (3.69 MB).
    assert [n for n, _, k, c in rows(estimate) if k == "transient" and c] == ["logits + loss (fp32)"]
    assert estimate.total_bytes == sum(b for n, (b, k) in expected.items() if k != "transient") + 4_788_000
    assert estimate.what == "train step, micro_batch 2"
    assert estimate.device == "gpu"
    assert estimate.inputs == {
        "layout": "single",
        "processes": 1,
        "micro_batch": 2,
        "seq_len": SEQ,
        "quantization": "nf4",
        "precision": "bf16",
        "lora_r": 8,
        "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "gradient_checkpointing": True,
        "uncheckpointed_layers": 0,
        "offload_checkpoints": False,
        "fused_cross_entropy": False,
        "grad_accum": 2,
        "attn_implementation": "sdpa",
        "max_pixels": 409600,
        "params_total": COUNTS.total,
        "lora_params": LORA_R8,
        "method": "qlora",
    }
    notes = {i.name: i.note for i in estimate.items}
    assert notes["LoRA gradients (fp32)"] == "kept across 2 micro-steps"
    assert notes["checkpointed hidden states"] == "3 layers x 2 x 650 tokens x hidden"
    assert notes["logits + loss (fp32)"] == "2 x 171 x 1000 x 4 B x 3.5"


def test_keyword_arguments_override_the_config():
    cfg = config(train=QLORA, lora=LORA8)
    base = estimate_train_vram(SHAPE, cfg)
    same = estimate_train_vram(
        SHAPE,
        cfg,
        micro_batch=2,
        seq_len=SEQ,
        quantization="nf4",
        precision="bf16",
        lora_r=8,
        gradient_checkpointing=True,
        grad_accum=2,
        attn_implementation="sdpa",
        max_pixels=409600,
        margin_gib=2.0,
        logit_tokens=171,
        uncheckpointed_layers=0,
        fused_cross_entropy=False,
        layout=Layout(),
    )
    assert rows(same) == rows(base) and same.inputs == base.inputs
    # Each override changes its own term (and only where the config said otherwise).
    assert estimate_train_vram(SHAPE, cfg, micro_batch=4).inputs["micro_batch"] == 4
    assert estimate_train_vram(SHAPE, cfg, seq_len=100).inputs["seq_len"] == 100
    assert estimate_train_vram(SHAPE, cfg, lora_r=16).inputs["lora_params"] == 2 * LORA_R8
    targets = estimate_train_vram(SHAPE, cfg, lora_targets=["q_proj"])
    assert targets.inputs["lora_params"] == 3 * 8 * 160 and targets.inputs["lora_targets"] == ["q_proj"]
    assert estimate_train_vram(SHAPE, cfg, lora_targets=[]).inputs["lora_params"] == 0
    margin = {n: b for n, b, _, _ in rows(estimate_train_vram(SHAPE, cfg, margin_gib=0.5))}
    assert margin["CUDA context + fragmentation"] == 0.5 * GIB
    zero_margin = {n: b for n, b, _, _ in rows(estimate_train_vram(SHAPE, cfg, margin_gib=0.0))}
    assert zero_margin["CUDA context + fragmentation"] == 0
    assert estimate_train_vram(SHAPE, cfg, grad_accum=1).inputs["grad_accum"] == 1
    pixels = estimate_train_vram(SHAPE, cfg, max_pixels=65536)
    assert pixels.inputs["max_pixels"] == 65536 and pixels.inputs["seq_len"] == 64 + 250
    assert {n: b for n, b, _, _ in rows(pixels)}["vision tower forward"] == 2 * 256 * VISION_PER_PATCH_BF16
    logits = {n: b for n, b, _, _ in rows(estimate_train_vram(SHAPE, cfg, logit_tokens=SEQ))}
    assert logits["logits + loss (fp32)"] == 2 * SEQ * 1000 * 4 * 3.5
    short = {n: b for n, b, _, _ in rows(estimate_train_vram(SHAPE, cfg, seq_len=100))}
    assert short["logits + loss (fp32)"] == 2 * 100 * 1000 * 4 * 3.5  # never more positions than tokens
    assert (
        estimate_train_vram(SHAPE, cfg, attn_implementation="eager").inputs["attn_implementation"] == "eager"
    )
    # The config's values are used when no keyword is given.
    other = config(
        train={
            **QLORA,
            "micro_batch": 3,
            "grad_accum": 1,
            "uncheckpointed_layers": 1,
            "fused_kernels": "liger",
        },
        lora={"r": 4, "target_modules": ["q_proj"]},
        model={"attn_implementation": "eager"},
        data={"max_pixels": 65536},
        resources={"vram_margin_gib": 1.5},
    )
    inputs = estimate_train_vram(SHAPE, other).inputs
    assert (inputs["micro_batch"], inputs["grad_accum"], inputs["uncheckpointed_layers"]) == (3, 1, 1)
    assert (inputs["lora_r"], inputs["lora_targets"], inputs["attn_implementation"]) == (
        4,
        ["q_proj"],
        "eager",
    )
    assert (inputs["fused_cross_entropy"], inputs["max_pixels"], inputs["seq_len"]) == (True, 65536, 314)
    assert {n: b for n, b, _, _ in rows(estimate_train_vram(SHAPE, other))}[
        "CUDA context + fragmentation"
    ] == (1.5 * GIB)
    lora = config(train={**QLORA, "method": "lora", "quantization": "none", "precision": "fp32"}, lora=LORA8)
    assert (
        estimate_train_vram(SHAPE, lora).inputs["quantization"],
        estimate_train_vram(SHAPE, lora).inputs["precision"],
    ) == ("none", "fp32")
    no_gc = config(train={**QLORA, "gradient_checkpointing": False}, lora=LORA8)
    assert not estimate_train_vram(SHAPE, no_gc).inputs["gradient_checkpointing"]


def test_lora_fp32_without_checkpointing_eager_with_dropout():
    """Unquantized fp32 base, no checkpointing (everything held), eager attention, dropout, grad_accum 1."""
    cfg = config(
        train={**QLORA, "method": "lora", "quantization": "none", "precision": "fp32", "micro_batch": 1},
        lora={"r": 8, "dropout": 0.1, "target_modules": ["q_proj", "down_proj"]},
        model={"attn_implementation": "eager"},
    )
    estimate = estimate_train_vram(
        SHAPE, cfg, gradient_checkpointing=False, grad_accum=1, seq_len=100, logit_tokens=100
    )
    lora = 3 * 8 * (160 + 224)  # 9216
    per_token = 1472 * 4 + (64 + 160) * 4 + 2 * 4 * 100 * 4  # 9984
    vision = PATCHES * 2 * VISION_PER_PATCH_BF16 + 2 * PATCHES * PATCHES * 4
    assert rows(estimate) == [
        ("LM decoder linears (fp32)", LM_LINEARS * 4, "static", True),
        ("embeddings + lm_head + norms (fp32)", (2 * EMBED + NORMS) * 4, "static", True),
        ("vision tower (fp32)", COUNTS.vision * 4, "static", True),
        ("LoRA weights (fp32)", lora * 4, "static", True),
        ("LoRA gradients (fp32)", lora * 4, "transient", False),
        ("AdamW moments (fp32 m, v)", lora * 8, "static", True),
        ("activations of every layer", 3 * 100 * per_token, "held", True),
        ("logits + loss (fp32)", 100 * 1000 * 4 * 3.5, "held", True),
        ("vision tower forward", vision, "transient", True),
        ("CUDA context + fragmentation", 2 * GIB, "margin", True),
    ]
    assert estimate.inputs["uncheckpointed_layers"] == 3  # every layer keeps its activations
    assert {i.name: i.note for i in estimate.items}[
        "LoRA gradients (fp32)"
    ] == "filled after the logits are freed"
    bf16 = estimate_train_vram(SHAPE, cfg, precision="bf16", gradient_checkpointing=False, seq_len=100)
    assert [n for n, *_ in rows(bf16)][:3] == [
        "LM decoder linears (bf16)",
        "embeddings + lm_head + norms (bf16)",
        "vision tower (bf16)",
    ]
    assert rows(bf16)[0][1] == LM_LINEARS * 2
    # With gradient accumulation the gradients are alive at the peak; else the largest transient decides.
    accum = estimate_train_vram(
        SHAPE, cfg, gradient_checkpointing=False, grad_accum=2, seq_len=100, logit_tokens=100
    )
    assert accum.total_bytes == estimate.total_bytes + lora * 4


def test_uncheckpointed_layers_and_the_fused_loss():
    cfg = config(train={**QLORA, "micro_batch": 4, "fused_kernels": "liger"}, lora=LORA8)
    estimate = estimate_train_vram(SHAPE, cfg, uncheckpointed_layers=1)
    table = {n: (b, k, c) for n, b, k, c in rows(estimate)}
    tokens = 4 * SEQ
    assert table["checkpointed hidden states"] == (2 * tokens * 64 * 2, "held", True)
    # train.fused_swiglu (on with Liger) keeps SiLU(gate) out: one intermediate-wide tensor (160) less.
    assert table["activations of the uncheckpointed layers"] == (tokens * 1312 * 2, "held", True)
    assert table["one layer recomputed (backward)"] == (tokens * 1312 * 2, "transient", True)
    unfused = estimate_train_vram(SHAPE, cfg, uncheckpointed_layers=1, fused_swiglu=False)
    assert {n: b for n, b, _, _ in rows(unfused)}[
        "activations of the uncheckpointed layers"
    ] == tokens * 1472 * 2
    # 4 x 171 logit rows in 16 chunks of 43 -> 64 rows of 1000 bf16 logits and their gradients.
    assert table["fused cross-entropy chunk"] == (64 * 1000 * 2 * 2, "transient", False)
    assert "logits + loss (fp32)" not in table
    assert estimate.inputs["uncheckpointed_layers"] == 1 and estimate.inputs["fused_cross_entropy"] is True
    assert {i.name: i.note for i in estimate.items}["activations of the uncheckpointed layers"] == (
        "train.uncheckpointed_layers = 1"
    )
    # More than the model has: every layer keeps its activations, no hidden state is checkpointed.
    every = {n: b for n, b, _, _ in rows(estimate_train_vram(SHAPE, cfg, uncheckpointed_layers=9))}
    assert every["checkpointed hidden states"] == 0
    assert every["activations of the uncheckpointed layers"] == 3 * tokens * 1312 * 2
    assert estimate_train_vram(SHAPE, cfg, uncheckpointed_layers=9).inputs["uncheckpointed_layers"] == 3
    none = {n for n, *_ in rows(estimate_train_vram(SHAPE, cfg, uncheckpointed_layers=0))}
    assert "activations of the uncheckpointed layers" not in none
    from_cfg = config(train={**QLORA, "uncheckpointed_layers": 2}, lora=LORA8)
    table = {n: b for n, b, _, _ in rows(estimate_train_vram(SHAPE, from_cfg))}
    assert table["activations of the uncheckpointed layers"] == 2 * 2 * SEQ * 1472 * 2
    fused = estimate_train_vram(
        SHAPE, config(train={**QLORA, "fused_kernels": "none"}, lora=LORA8), fused_cross_entropy=True
    )
    assert "fused cross-entropy chunk" in {i.name for i in fused.items}


def test_full_training_keeps_a_gradient_and_two_moments_per_parameter():
    cfg = config(train={**QLORA, "method": "full", "quantization": "none", "micro_batch": 1}, lora=LORA8)
    estimate = estimate_train_vram(SHAPE, cfg)
    table = {n: (b, k) for n, b, k, _ in rows(estimate)}
    assert table["gradients (all parameters)"] == (COUNTS.total * 2, "static")
    assert table["AdamW moments (fp32 m, v)"] == (COUNTS.total * 8, "static")
    assert not any(name.startswith("LoRA") for name in table)
    assert estimate.inputs["lora_params"] == 0 and estimate.inputs["method"] == "full"
    assert estimate_train_vram(SHAPE, cfg, precision="fp32").items[3].bytes == COUNTS.total * 4


def test_full_training_on_several_gpus_shards_gradients_moments_and_master_weights():
    cfg = config(train={**QLORA, "method": "full", "quantization": "none", "micro_batch": 1}, lora=LORA8)
    single = estimate_train_vram(SHAPE, cfg)
    grads, moments = COUNTS.total * 2, COUNTS.total * 8

    def items(layout):
        return {i.name: i for i in estimate_train_vram(SHAPE, cfg, layout=layout).items}

    def added(layout):  # the items the layout adds or changes, as (bytes, note, kind)
        before = {(i.name, i.bytes, i.note, i.kind) for i in single.items}
        return {
            i.name: (i.bytes, i.note, i.kind)
            for i in items(layout).values()
            if (i.name, i.bytes, i.note, i.kind) not in before
        }

    assert added(Layout("ddp", 2)) == {
        "gradients (all parameters)": (grads, "alive with the DDP buckets", "static"),
        "DDP gradient buckets": (grads, "the gradients that NCCL all-reduces", "static"),
    }
    assert added(Layout("zero2", 4)) == {
        "gradients (all parameters) (1/4)": (grads / 4, "reduce-scattered (ZeRO)", "static"),
        "AdamW moments (1/4)": (moments / 4, "sharded (ZeRO)", "static"),
        "fp32 master weights (1/4)": (COUNTS.total * 4 / 4, "sharded (ZeRO)", "static"),
    }
    zero2 = items(Layout("zero2", 4))
    assert "gradients (all parameters)" not in zero2 and "AdamW moments (fp32 m, v)" not in zero2
    names = [i.name for i in single.items]
    at = names.index("gradients (all parameters)")
    assert [i.name for i in estimate_train_vram(SHAPE, cfg, layout=Layout("zero2", 4)).items][
        at : at + 3
    ] == [
        "gradients (all parameters) (1/4)",
        "AdamW moments (1/4)",
        "fp32 master weights (1/4)",
    ]
    decoder = next(n for n in names if n.startswith("LM decoder linears"))
    per_layer = sum(a * b for a, b in SHAPE.decoder_linears().values())
    zero3 = added(Layout("zero3", 4))
    assert zero3[f"{decoder} (1/4)"] == (
        next(i.bytes for i in single.items if i.name == decoder) / 4,
        "sharded (ZeRO-3)",
        "static",
    )
    assert zero3["gathered layers (ZeRO-3)"] == (
        2 * per_layer * 2,
        "the current and the prefetched layer",
        "static",
    )
    assert zero3["fp32 master weights (1/4)"] == (COUNTS.total, "sharded (ZeRO)", "static")


# ---------------------------------------------------------------------------------------------------------
# Several GPUs


def test_layout_of_each_profile(monkeypatch):
    cfg = config(train=QLORA)
    assert layout_of(cfg) == Layout("single", 1)
    assert layout_of(cfg, "ddp") == Layout("ddp", 2)
    assert layout_of(cfg, "cpu-multi") == Layout("ddp", 2)
    assert layout_of(cfg, "zero2") == Layout("zero2", 2)
    assert layout_of(cfg, "zero3") == Layout("zero3", 2)
    assert layout_of(cfg, "no-such-profile") == Layout()
    assert layout_of(config(train={**QLORA, "accelerate_profile": "zero2"})) == Layout("zero2", 2)
    assert layout_of(config(train={**QLORA, "accelerate_profile": "zero2"}), "a800") == Layout()
    import pcbvlm.launch

    for settings, layout in [
        ({}, Layout()),
        ({"num_processes": None}, Layout()),
        ({"num_processes": 0}, Layout()),
        ({"num_processes": 1}, Layout()),
        ({"num_processes": 3}, Layout("ddp", 3)),
        ({"zero_stage": 2}, Layout("zero2", 1)),
        ({"zero_stage": 1, "num_processes": 4}, Layout("zero2", 4)),
        ({"zero_stage": 3, "num_processes": 4}, Layout("zero3", 4)),
    ]:
        monkeypatch.setattr(pcbvlm.launch, "profile_settings", lambda profile, s=settings: s)
        assert layout_of(cfg) == layout, settings


def test_ddp_adds_the_gradient_buckets_and_keeps_the_gradients_alive():
    cfg = config(train={**QLORA, "grad_accum": 1}, lora=LORA8)
    single = estimate_train_vram(SHAPE, cfg)
    ddp = estimate_train_vram(SHAPE, cfg, layout=Layout("ddp", 2))
    table = {n: (b, k) for n, b, k, _ in rows(ddp)}
    assert {n: (b, k) for n, b, k, _ in rows(single)}["LoRA gradients (fp32)"] == (LORA_R8 * 4, "transient")
    assert table["LoRA gradients (fp32)"] == (LORA_R8 * 4, "static")
    assert table["DDP gradient buckets (fp32)"] == (LORA_R8 * 4, "static")
    assert ddp.total_bytes == single.total_bytes + 2 * LORA_R8 * 4
    assert ddp.what == "train step, micro_batch 2, per GPU (ddp, 2 processes)"
    assert (ddp.inputs["layout"], ddp.inputs["processes"]) == ("ddp", 2)
    assert [n for n, *_ in rows(ddp)][-2:] == ["DDP gradient buckets (fp32)", "CUDA context + fragmentation"]
    # Activations do not change: each GPU runs its own micro-batch.
    assert (
        table["checkpointed hidden states"]
        == ({n: (b, k) for n, b, k, _ in rows(single)})["checkpointed hidden states"]
    )


def test_zero2_shards_the_master_weights_gradients_and_moments():
    cfg = config(train=QLORA, lora=LORA8)
    single = qlora_rows()
    for n in (1, 2, 4):
        estimate = estimate_train_vram(SHAPE, cfg, layout=Layout("zero2", n))
        names = [name for name, *_ in rows(estimate)]
        table = {name: (b, k) for name, b, k, _ in rows(estimate)}
        assert names[4:10] == [
            "LoRA weights (bf16)",
            f"fp32 master weights (1/{n})",
            "LoRA gradients (bf16)",
            f"fp32 gradients (1/{n})",
            f"AdamW moments (1/{n})",
            "checkpointed hidden states",
        ]
        assert table["LoRA weights (bf16)"] == (LORA_R8 * 2, "static")
        assert table[f"fp32 master weights (1/{n})"] == (LORA_R8 * 4 / n, "static")
        assert table["LoRA gradients (bf16)"] == (LORA_R8 * 2, "static")
        assert table[f"fp32 gradients (1/{n})"] == (LORA_R8 * 4 / n, "static")
        assert table[f"AdamW moments (1/{n})"] == (LORA_R8 * 8 / n, "static")
        # The base weights stay whole under ZeRO-2.
        assert (
            table["LM decoder linears (NF4 + double quant)"]
            == single["LM decoder linears (NF4 + double quant)"]
        )
        assert estimate.what == (
            f"train step, micro_batch 2, per GPU (zero2, {n} processes)"
            if n > 1
            else "train step, micro_batch 2"
        )


def test_zero3_shards_the_base_weights_and_gathers_two_layers():
    lora_cfg = config(train={**QLORA, "method": "lora", "quantization": "none"}, lora=LORA8)
    estimate = estimate_train_vram(SHAPE, lora_cfg, layout=Layout("zero3", 4))
    table = {n: (b, k) for n, b, k, _ in rows(estimate)}
    assert table["LM decoder linears (bf16) (1/4)"] == (LM_LINEARS * 2 / 4, "static")
    assert table["embeddings + lm_head + norms (bf16) (1/4)"] == ((2 * EMBED + NORMS) * 2 / 4, "static")
    assert table["vision tower (bf16) (1/4)"] == (COUNTS.vision * 2 / 4, "static")
    assert table["gathered layers (ZeRO-3)"] == (2 * 49152 * 2, "static")
    assert table["AdamW moments (1/4)"] == (LORA_R8 * 8 / 4, "static")
    assert "LM decoder linears (bf16)" not in table
    nf4 = estimate_train_vram(SHAPE, config(train=QLORA, lora=LORA8), layout=Layout("zero3", 2))
    table = {n: (b, k) for n, b, k, _ in rows(nf4)}
    assert table["LM decoder linears (NF4 + double quant) (1/2)"] == (LM_LINEARS * NF4_BITS / 8 / 2, "static")
    assert table["gathered layers (ZeRO-3)"] == (2 * 49152 * NF4_BITS / 8, "static")
    assert table["NF4 dequantization buffer"] == (64 * 160 * 2, "static")  # not a stored weight: whole
    # The vision tower's forward buffers are activations: ZeRO-3 shards weights, not them.
    assert table["vision tower forward"] == (2 * PATCHES * VISION_PER_PATCH_BF16, "transient")
    assert not any(name.startswith("vision tower forward (") for name in table)
    assert nf4.what == "train step, micro_batch 2, per GPU (zero3, 2 processes)"


# ---------------------------------------------------------------------------------------------------------
# Suggestions when the step does not fit


def test_train_suggests_offloading_the_checkpoints_first():
    # every one of the 3 layers checkpointed: offloading frees all but the two inputs held on the GPU
    train = {**QLORA, "micro_batch": 4, "grad_accum": 3, "uncheckpointed_layers": 0}
    cfg = config(train=train, lora=LORA8)
    offloaded = estimate_train_vram(SHAPE, cfg, offload_checkpoints=True).total_bytes
    assert offloaded < estimate_train_vram(SHAPE, cfg).total_bytes
    ram = checkpoint_offload_bytes(SHAPE, config(train={**train, "offload_checkpoints": True}, lora=LORA8))
    assert ram > 0
    assert suggest_train_fit(SHAPE, cfg, offloaded).endswith(
        f": train.offload_checkpoints=true fits (the checkpointed layers' inputs wait in pinned host RAM, "
        f"~{ram / GIB:.1f} GiB; the same speed on the H200)"
    )
    # not enough even with offloading: the next remedy, without offloading
    assert "offload" not in suggest_train_fit(SHAPE, cfg, offloaded - 1)


def test_train_suggestions_in_order_of_cost():
    """The remedies after offloading (already on here)."""
    cfg = config(
        train={
            **QLORA,
            "micro_batch": 4,
            "grad_accum": 3,
            "uncheckpointed_layers": 2,
            "offload_checkpoints": True,
        },
        lora=LORA8,
    )
    need = estimate_train_vram(SHAPE, cfg).total_bytes
    head = f"micro_batch 4 needs ~{need / GIB:.1f} GiB, "
    fewer = estimate_train_vram(SHAPE, cfg, uncheckpointed_layers=1).total_bytes
    message = suggest_train_fit(SHAPE, cfg, fewer)
    assert message.startswith(head) and message.endswith(
        ": train.uncheckpointed_layers=1 fits (recomputes more layers: slower, same result)"
    )
    zero = estimate_train_vram(SHAPE, cfg, uncheckpointed_layers=0).total_bytes
    assert suggest_train_fit(SHAPE, cfg, zero).endswith(
        ": train.uncheckpointed_layers=0 fits (recomputes more layers: slower, same result)"
    )
    assert suggest_train_fit(SHAPE, cfg, fewer - 1).endswith(
        "train.uncheckpointed_layers=0 fits (recomputes more layers: slower, same result)"
    )
    # Smaller micro-batches, keeping the effective batch 4 x 3 = 12.
    mb3 = estimate_train_vram(SHAPE, cfg, uncheckpointed_layers=0, micro_batch=3).total_bytes
    assert suggest_train_fit(SHAPE, cfg, mb3).endswith(
        ": micro_batch 3 fits (set train.micro_batch=3 train.grad_accum=4 train.uncheckpointed_layers=0 to keep the effective batch 12)"
    )
    mb1 = estimate_train_vram(SHAPE, cfg, uncheckpointed_layers=0, micro_batch=1).total_bytes
    assert suggest_train_fit(SHAPE, cfg, mb1).endswith(
        ": micro_batch 1 fits (set train.micro_batch=1 train.grad_accum=12 train.uncheckpointed_layers=0 to keep the effective batch 12)"
    )
    plain = config(
        train={**QLORA, "micro_batch": 5, "grad_accum": 1, "offload_checkpoints": True}, lora=LORA8
    )
    mb2 = estimate_train_vram(SHAPE, plain, micro_batch=2).total_bytes
    assert suggest_train_fit(SHAPE, plain, mb2).endswith(
        ": micro_batch 2 fits (set train.micro_batch=2 train.grad_accum=3 to keep the effective batch 5)"
    )
    # Smaller images at micro-batch 1, the largest that fits first.
    for pixels in (262144, 147456, 65536):
        free = estimate_train_vram(SHAPE, plain, micro_batch=1, max_pixels=pixels).total_bytes
        assert suggest_train_fit(SHAPE, plain, free).endswith(
            f": micro_batch 1 with data.max_pixels={pixels} fits"
        )
    small = config(
        train={**QLORA, "micro_batch": 2, "grad_accum": 1, "offload_checkpoints": True},
        lora=LORA8,
        data={"max_pixels": 147456},
    )
    free = estimate_train_vram(SHAPE, small, micro_batch=1, max_pixels=65536).total_bytes
    assert suggest_train_fit(SHAPE, small, free).endswith(": micro_batch 1 with data.max_pixels=65536 fits")
    # Nothing fits: the floor is micro-batch 1 with checkpointing.
    floor = estimate_train_vram(SHAPE, plain, micro_batch=1, gradient_checkpointing=True).total_gib
    nothing = suggest_train_fit(SHAPE, plain, 1000.0)
    assert nothing.endswith(
        f": nothing fits; micro_batch 1 needs ~{floor:.1f} GiB (use a larger GPU, or free it)"
    )
    assert nothing.startswith(
        f"micro_batch 5 needs ~{estimate_train_vram(SHAPE, plain).total_gib:.1f} GiB, 0.0 GiB free"
    )


def test_train_suggests_checkpointing_when_it_is_off():
    cfg = config(
        train={**QLORA, "micro_batch": 2, "gradient_checkpointing": False, "uncheckpointed_layers": 3},
        lora=LORA8,
    )
    mb1 = estimate_train_vram(SHAPE, cfg, micro_batch=1).total_bytes
    with_gc = estimate_train_vram(SHAPE, cfg, micro_batch=1, gradient_checkpointing=True).total_bytes
    assert with_gc < mb1
    # uncheckpointed_layers means nothing without checkpointing: no advice about it.
    message = suggest_train_fit(SHAPE, cfg, mb1)
    assert message.endswith(
        ": micro_batch 1 fits (set train.micro_batch=1 train.grad_accum=4 to keep the effective batch 4)"
    )
    assert suggest_train_fit(SHAPE, cfg, with_gc).endswith(
        ": set train.gradient_checkpointing=true and train.micro_batch=1"
    )


def test_quantize_and_eval_suggestions():
    cfg = config(quantize={"num_calibration_samples": 64})
    need = estimate_quantize_vram(SHAPE, cfg)
    head = f"AWQ with 64 samples needs ~{need.total_gib:.1f} GiB, "
    for n in (32, 16, 8):
        free = estimate_quantize_vram(SHAPE, cfg, num_samples=n).total_bytes
        assert (
            suggest_quantize_fit(SHAPE, cfg, free)
            == f"{head}{free / GIB:.1f} GiB free: quantize.num_calibration_samples={n} fits"
        )
    free = estimate_quantize_vram(SHAPE, cfg, num_samples=8).total_bytes - 1
    assert suggest_quantize_fit(SHAPE, cfg, free).endswith(": nothing fits (use a larger GPU, or free it)")
    seventeen = config(quantize={"num_calibration_samples": 17})
    free = estimate_quantize_vram(SHAPE, seventeen, num_samples=8).total_bytes
    assert suggest_quantize_fit(SHAPE, seventeen, free).endswith(": quantize.num_calibration_samples=8 fits")

    ev = config(eval={"batch_size": 4})
    for batch in (3, 2, 1):
        free = estimate_eval_vram(SHAPE, ev, batch_size=batch).total_bytes
        assert suggest_eval_fit(SHAPE, ev, free, "w4a16").endswith(f": eval.batch_size={batch} fits")
    free = estimate_eval_vram(SHAPE, ev, batch_size=1).total_bytes - 1
    message = suggest_eval_fit(SHAPE, ev, free, "w4a16")
    assert message.startswith(f"eval batch 4 needs ~{estimate_eval_vram(SHAPE, ev).total_gib:.1f} GiB")
    assert message.endswith(": nothing fits even at batch 1 (use a larger GPU, or free it)")
    free = estimate_eval_vram(SHAPE, ev, batch_size=2, weights="nf4").total_bytes
    assert suggest_eval_fit(SHAPE, ev, free, "nf4").endswith(": eval.batch_size=2 fits")
    packed = estimate_eval_vram(SHAPE, ev, batch_size=3, packed_bytes=1e4).total_bytes
    assert suggest_eval_fit(SHAPE, ev, packed, "w4a16", packed_bytes=1e4).endswith(": eval.batch_size=3 fits")


# ---------------------------------------------------------------------------------------------------------
# Evaluation, merge, quantization, RAM, disk


def test_eval_w4a16_term_by_term():
    cfg = config(
        eval={"batch_size": 2, "max_new_tokens": 50, "int4_kernel": "tinygemm"}, quantize={"group_size": 32}
    )
    estimate = estimate_eval_vram(SHAPE, cfg)
    prompt = SEQ - 170  # 480
    assert rows(estimate) == [
        ("LM decoder linears (W4A16)", LM_LINEARS * 4.5 / 8, "static", True),
        ("vision + embeddings + lm_head (bf16)", COUNTS.not_quantized * 2, "static", True),
        ("int4 kernel zero offsets (bf16)", LM_LINEARS / 32 * 2, "static", True),
        ("one linear read back to bf16", 64 * 160 * 2, "held", True),
        ("KV cache (bf16)", 2 * (prompt + 50) * 3 * 2 * 48 * 2, "held", True),
        ("prefill of one layer", 2 * prompt * (3 * 160 + 64) * 2, "transient", False),
        ("vision tower forward", 2 * PATCHES * VISION_PER_PATCH_BF16, "transient", True),
        ("CUDA context + fragmentation", 2 * GIB, "margin", True),
    ]
    assert estimate.what == "eval, batch 2 (w4a16)"
    assert estimate.inputs == {
        "batch_size": 2,
        "prompt_tokens": 480,
        "max_new_tokens": 50,
        "weights": "w4a16",
    }
    # The stored size replaces the computed one; the dequant kernel has no zero offsets.
    dequant = config(eval={"batch_size": 2, "max_new_tokens": 50, "int4_kernel": "dequant"})
    packed = estimate_eval_vram(SHAPE, dequant, packed_bytes=12345.0, batch_size=1)
    assert rows(packed)[:2] == [
        ("quantized model as stored (W4A16 packed, rest bf16)", 12345.0, "static", True),
        ("one linear read back to bf16", 64 * 160 * 2, "held", True),
    ]
    assert rows(packed)[2] == ("KV cache (bf16)", 1 * (prompt + 50) * 3 * 2 * 48 * 2, "held", True)
    assert rows(estimate_eval_vram(SHAPE, dequant, packed_bytes=0))[0][0] == "LM decoder linears (W4A16)"
    eager = estimate_eval_vram(SHAPE, config(model={"attn_implementation": "eager"}, eval={"batch_size": 1}))
    assert {n: b for n, b, *_ in rows(eager)}["vision tower forward"] == vision_forward_bytes(
        SHAPE, PATCHES, 2, "eager"
    )
    assert estimate_eval_vram(SHAPE, cfg, batch_size=3).inputs["batch_size"] == 3
    text = {n for n, *_ in rows(estimate_eval_vram(TEXT_ONLY, cfg))}
    assert "vision tower forward" not in text
    margin = estimate_eval_vram(SHAPE, config(resources={"vram_margin_gib": 3.0}))
    assert rows(margin)[-1] == ("CUDA context + fragmentation", 3 * GIB, "margin", True)


def test_eval_on_the_nf4_adapter():
    cfg = config(eval={"batch_size": 1, "max_new_tokens": 50}, lora=LORA8)
    table = {n: b for n, b, *_ in rows(estimate_eval_vram(SHAPE, cfg, weights="nf4"))}
    assert table["LM decoder linears (NF4 + double quant)"] == LM_LINEARS * NF4_BITS / 8
    assert table["NF4 dequantization buffer"] == 64 * 160 * 2
    assert table["LoRA adapter (fp32)"] == LORA_R8 * 4
    assert "one linear read back to bf16" not in table
    merger = config(eval={"batch_size": 1}, lora={**LORA8, "train_merger": True})
    assert {n: b for n, b, *_ in rows(estimate_eval_vram(SHAPE, merger, weights="nf4"))}[
        "LoRA adapter (fp32)"
    ] == ((LORA_R8 + 8 * 448) * 4)


def test_merge_on_cpu_and_on_gpu():
    cfg = config(lora=LORA8, resources={"ram_margin_gib": 4.0, "vram_margin_gib": 1.0})
    cpu = estimate_merge_memory(SHAPE, cfg)
    assert (cpu.what, cpu.device, cpu.inputs) == ("merge on cpu", "ram", {"merge_device": "cpu"})
    assert rows(cpu) == [
        ("base model (bf16)", COUNTS.total * 2, "static", True),
        ("LoRA adapter (fp32)", LORA_R8 * 4, "static", True),
        ("save buffer", 5 * 1000**3, "transient", True),
        ("process + OS margin", 4 * GIB, "margin", True),
    ]
    gpu = estimate_merge_memory(
        SHAPE, config(lora=LORA8, resources={"merge_device": "cuda", "vram_margin_gib": 1.0})
    )
    assert (gpu.what, gpu.device) == ("merge on cuda", "gpu")
    assert rows(gpu)[2:] == [("CUDA context + fragmentation", 1 * GIB, "margin", True)]
    assert len(rows(gpu)) == 3
    merger = estimate_merge_memory(SHAPE, config(lora={**LORA8, "train_merger": True}))
    assert rows(merger)[1][1] == (LORA_R8 + 8 * 448) * 4


def test_quantize_term_by_term():
    cfg = config(quantize={"num_calibration_samples": 4})
    estimate = estimate_quantize_vram(SHAPE, cfg)
    # The first subgraph (vision + embeddings) is larger than one decoder layer here.
    assert rows(estimate) == [
        ("largest subgraph (bf16)", (COUNTS.vision + EMBED) * 2, "static", True),
        ("AWQ cached module inputs", 4 * SEQ * (2 * 64 + 96 + 160) * 2, "held", True),
        ("AWQ reference outputs", 4 * SEQ * 64 * 2, "transient", True),
        ("CUDA context + fragmentation", 2 * GIB, "margin", True),
    ]
    assert (estimate.what, estimate.inputs) == (
        "AWQ, 4 calibration samples",
        {"num_calibration_samples": 4, "tokens": SEQ},
    )
    # A text model with a tiny vocabulary: one decoder layer (whole parameters) is the largest.
    text = estimate_quantize_vram(TEXT_ONLY, cfg, num_samples=2)
    assert rows(text)[0] == ("largest subgraph (bf16)", (LM_LINEARS + NORMS) // 3 * 2, "static", True)
    assert rows(text)[1][1] == 2 * SEQ * 384 * 2
    cut = config(quantize={"num_calibration_samples": 4, "max_seq_length": 600})
    assert calibration_tokens(cut) == 600 and calibration_tokens(Config(), SHAPE) == SEQ
    assert estimate_quantize_vram(SHAPE, cut).inputs["tokens"] == 600
    margin = estimate_quantize_vram(SHAPE, config(resources={"vram_margin_gib": 0.5}))
    assert rows(margin)[-1][1] == 0.5 * GIB and margin.inputs["num_calibration_samples"] == 256


def test_ram_of_each_job():
    cfg = config(
        train={**QLORA, "num_workers": 3},
        quantize={"num_calibration_samples": 4},
        resources={"ram_margin_gib": 4.0},
    )
    train = estimate_ram("train", SHAPE, cfg)
    assert (train.what, train.device, train.to_dict()["inputs"]) == ("train RAM", "ram", {})
    assert rows(train) == [
        ("loading buffer", COUNTS.total * 2, "transient", True),
        ("DataLoader workers", 3 * GIB, "static", True),
        ("process + OS margin", 4 * GIB, "margin", True),
    ]
    assert rows(estimate_ram("train", None, cfg)) == [
        ("DataLoader workers", 3 * GIB, "static", True),
        ("process + OS margin", 4 * GIB, "margin", True),
    ]
    no_workers = config(train={**QLORA, "num_workers": 0})
    assert [n for n, *_ in rows(estimate_ram("train", SHAPE, no_workers))] == [
        "loading buffer",
        "process + OS margin",
    ]
    assert [n for n, *_ in rows(estimate_ram("eval", SHAPE, cfg))] == [
        "loading buffer",
        "process + OS margin",
    ]
    # The 32B model loads one 5 GB shard at a time.
    big = estimate_ram("eval", qwen3_vl_32b_shape(), cfg)
    assert rows(big)[0] == ("loading buffer", 5 * 1000**3, "transient", True)
    assert rows(estimate_ram("quantize", SHAPE, cfg)) == [
        ("merged model (bf16)", COUNTS.total * 2, "static", True),
        ("offloaded layer activations", 4 * SEQ * 64 * 2, "static", True),
        ("process + OS margin", 4 * GIB, "margin", True),
    ]
    assert rows(estimate_ram("quantize", None, cfg)) == [("process + OS margin", 4 * GIB, "margin", True)]
    assert rows(estimate_ram("merge", SHAPE, cfg)) == rows(estimate_merge_memory(SHAPE, cfg))
    assert estimate_ram("merge", SHAPE, cfg).what == "merge on cpu"
    on_gpu = config(resources={"merge_device": "cuda", "ram_margin_gib": 4.0})
    assert [n for n, *_ in rows(estimate_ram("merge", SHAPE, on_gpu))] == [
        "loading buffer",
        "process + OS margin",
    ]
    assert [n for n, *_ in rows(estimate_ram("merge", None, cfg))] == ["process + OS margin"]


def test_artifact_sizes_on_disk():
    cfg = config(lora=LORA8, quantize={"group_size": 32})
    sizes = artifact_sizes(SHAPE, cfg)
    assert sizes.base_download == COUNTS.total * 2 == sizes.merged
    assert sizes.checkpoint == LORA_R8 * 12
    assert sizes.adapter == LORA_R8 * 4
    assert sizes.quantized == LM_LINEARS * 4.5 / 8 + COUNTS.not_quantized * 2
    merger = artifact_sizes(SHAPE, config(lora={**LORA8, "train_merger": True}))
    assert merger.adapter == (LORA_R8 + 8 * 448) * 4
    big = artifact_sizes(qwen3_vl_32b_shape(), Config())
    assert big.to_dict()["base_download"] == round(33_357_390_064 * 2 / GIB, 2) == 62.13
    assert big.to_dict()["adapter"] == 2.0  # 537 M fp32 LoRA parameters at r 64
    assert set(big.to_dict()) == {"base_download", "checkpoint", "adapter", "merged", "quantized"}


@pytest.mark.parametrize("precision, size", [("fp32", 4), ("bf16", 2), ("fp16", 2), ("auto", 2)])
def test_compute_dtype_bytes(precision, size):
    assert est._dtype_bytes(precision) == size


# ---------------------------------------------------------------------------------------------------------
# The notes: the preflight prints each term with why it is there (pcbvlm.preflight.report.estimate_table)


def notes(estimate: Estimate) -> list[str]:
    return [i.note for i in estimate.items]


def test_the_32b_breakdown_explains_each_term_with_its_figures():
    big = qwen3_vl_32b_shape()
    qlora = estimate_train_vram(big, config(train=QLORA, lora={"r": 64}))
    assert notes(qlora) == [
        "31.21 B params x 4.127 bit",
        "1556 M params",  # embeddings + lm_head: 2 x 151936 x 5120
        "595 M params",
        "largest linear in bf16 during its matmul",
        "537 M params, r=64",
        "kept across 2 micro-steps",
        "8 B per LoRA param",
        "64 layers x 2 x 650 tokens x hidden",
        "gradient checkpointing",
        "2 x 171 x 151936 x 4 B x 3.5",
        "3200 patches, frozen (no autograd)",
        "resources.vram_margin_gib",
    ]
    full = estimate_train_vram(big, config(train={**QLORA, "method": "full", "quantization": "none"}))
    assert notes(full)[:5] == [
        "31.21 B params, not quantized",
        "1556 M params",
        "595 M params",
        "33357 M params, method full",
        "8 B per parameter",
    ]
    assert notes(estimate_merge_memory(big, Config())) == [
        "33.36 B params x 2 B = 66.7 GB",
        "r=64",
        "one 5 GB safetensors shard",
        "resources.ram_margin_gib",
    ]
    assert notes(estimate_merge_memory(big, config(resources={"merge_device": "cuda"}))) == [
        "33.36 B params x 2 B = 66.7 GB",
        "r=64",
        "resources.vram_margin_gib",
    ]
    assert notes(estimate_ram("quantize", big, Config())) == [
        "33.36 B params x 2 B = 66.7 GB",
        "256 samples x 650 tokens",
        "resources.ram_margin_gib",
    ]


def test_the_breakdown_of_other_settings_explains_each_term():
    lora = config(
        train={**QLORA, "method": "lora", "quantization": "none", "precision": "fp32", "micro_batch": 1},
        lora={"r": 8, "dropout": 0.1, "target_modules": ["q_proj", "down_proj"]},
    )
    assert notes(estimate_train_vram(SHAPE, lora, gradient_checkpointing=False, grad_accum=1))[3:] == [
        "0 M params, r=8",
        "filled after the logits are freed",
        "8 B per LoRA param",
        "no gradient checkpointing",
        "1 x 171 x 1000 x 4 B x 3.5",
        "1600 patches, frozen (no autograd)",
        "resources.vram_margin_gib",
    ]
    fused = config(train={**QLORA, "micro_batch": 4, "fused_kernels": "liger"}, lora=LORA8)
    assert notes(estimate_train_vram(SHAPE, fused, uncheckpointed_layers=1))[7:] == [
        "2 layers x 4 x 650 tokens x hidden",
        "train.uncheckpointed_layers = 1",
        "gradient checkpointing",
        "64 rows x 1000 x 2 B x 2 (Liger: the full logits never exist)",
        "6400 patches, frozen (no autograd)",
        "resources.vram_margin_gib",
    ]
    ddp = estimate_train_vram(
        SHAPE, config(train={**QLORA, "grad_accum": 1}, lora=LORA8), layout=Layout("ddp", 2)
    )
    assert notes(ddp)[5] == "alive with the DDP buckets"
    assert notes(ddp)[-2] == "the LoRA gradients that NCCL all-reduces"
    zero3 = estimate_train_vram(SHAPE, config(train=QLORA, lora=LORA8), layout=Layout("zero3", 2))
    assert notes(zero3) == [
        "sharded (ZeRO-3)",
        "sharded (ZeRO-3)",
        "sharded (ZeRO-3)",
        "largest linear in bf16 during its matmul",
        "DeepSpeed casts the trainable weights to bf16",
        "sharded (ZeRO)",
        "whole until reduced",
        "sharded (ZeRO-2)",
        "sharded (ZeRO)",
        "3 layers x 2 x 650 tokens x hidden",
        "gradient checkpointing",
        "2 x 171 x 1000 x 4 B x 3.5",
        "3200 patches, frozen (no autograd)",
        "the current and the prefetched layer",
        "resources.vram_margin_gib",
    ]
    ev = config(
        eval={"batch_size": 2, "max_new_tokens": 50, "int4_kernel": "tinygemm"}, quantize={"group_size": 32}
    )
    w4 = estimate_eval_vram(SHAPE, ev)
    assert w4.device == "gpu"
    assert notes(w4) == [
        "4.500 bit, AWQ",
        "left unquantized",
        "tinygemm layout",
        "int4 layer during a many-row matmul",
        "2 x (480 + 50) tokens",
        "2 x 480 prompt tokens",
        "3200 patches",
        "resources.vram_margin_gib",
    ]
    assert notes(estimate_eval_vram(SHAPE, ev, packed_bytes=12345.0))[0] == (
        "the safetensors of outputs/quantized, loaded without unpacking"
    )
    nf4 = estimate_eval_vram(
        SHAPE, config(eval={"batch_size": 1, "max_new_tokens": 50}, lora=LORA8), weights="nf4"
    )
    assert notes(nf4)[4] == "r=8"
    assert (nf4.device, rows(nf4)[1][1]) == ("gpu", (2 * EMBED + NORMS) * 2)  # bf16 beside the NF4 linears
    quantize = estimate_quantize_vram(SHAPE, config(quantize={"num_calibration_samples": 4}))
    assert quantize.device == "gpu"
    assert notes(quantize) == [
        "one decoder layer, or vision + embeddings",
        "4 samples x 650 tokens",
        "one module's outputs",
        "resources.vram_margin_gib",
    ]
    train_ram = estimate_ram("train", SHAPE, config(train={**QLORA, "num_workers": 3}))
    assert notes(train_ram) == [
        "one safetensors shard (at most 5 GB)",
        "3 x 1 GiB",
        "resources.ram_margin_gib",
    ]


def test_tokens_follow_the_models_patch_size_in_every_job():
    """A Qwen2.5-VL-like tower (14 px patches): 522 image tokens per 640x640 image, 2088 patches."""
    qwen25 = ModelShape(**{**SHAPE.__dict__, "vision": VisionShape(**{**VISION.__dict__, "patch_size": 14})})
    cfg = config(train=QLORA, lora=LORA8, quantize={"num_calibration_samples": 4})
    assert estimate_train_vram(qwen25, cfg).inputs["seq_len"] == 522 + 250
    assert estimate_eval_vram(qwen25, cfg).inputs["prompt_tokens"] == 522 + 80
    assert calibration_tokens(cfg, qwen25) == 772
    assert estimate_quantize_vram(qwen25, cfg).inputs["tokens"] == 772
    assert rows(estimate_ram("quantize", qwen25, cfg))[1][1] == 4 * 772 * 64 * 2
    merger = config(train=QLORA, lora={**LORA8, "train_merger": True})
    assert estimate_train_vram(SHAPE, merger).inputs["lora_params"] == LORA_R8 + 8 * 448


BIG = qwen3_vl_32b_shape()
# Settings of the suggestion tests differ from the schema's defaults, so a suggestion computed on the
# defaults instead of the user's config shows.
BIG_TRAIN = {**QLORA, "fused_kernels": "liger", "micro_batch": 8, "grad_accum": 2, "uncheckpointed_layers": 4}


def test_32b_train_suggestions_name_exact_figures():
    cfg = config(train=BIG_TRAIN, lora={"r": 32}, resources={"vram_margin_gib": 1.0})
    need = estimate_train_vram(BIG, cfg)

    def suggestion(free: float) -> str:
        return f"micro_batch 8 needs ~{need.total_gib:.1f} GiB, {free / GIB:.1f} GiB free: "

    # first the checkpointed layers' inputs in host RAM: 60 layers x 8 x 650 tokens x 5120 x 2 B = 3.0 GiB
    free = estimate_train_vram(BIG, cfg, offload_checkpoints=True).total_bytes
    assert suggest_train_fit(BIG, cfg, free) == suggestion(free) + (
        "train.offload_checkpoints=true fits (the checkpointed layers' inputs wait in pinned host RAM, "
        "~3.0 GiB; the same speed on the H200)"
    )
    # then, with offloading on, the others in order
    cfg = config(
        train={**BIG_TRAIN, "offload_checkpoints": True}, lora={"r": 32}, resources={"vram_margin_gib": 1.0}
    )
    need = estimate_train_vram(BIG, cfg)
    free = estimate_train_vram(BIG, cfg, uncheckpointed_layers=2).total_bytes
    assert suggest_train_fit(BIG, cfg, free) == suggestion(free) + (
        "train.uncheckpointed_layers=2 fits (recomputes more layers: slower, same result)"
    )
    free = estimate_train_vram(BIG, cfg, uncheckpointed_layers=0, micro_batch=5).total_bytes
    assert suggest_train_fit(BIG, cfg, free) == suggestion(free) + (
        "micro_batch 5 fits (set train.micro_batch=5 train.grad_accum=4 train.uncheckpointed_layers=0 "
        "to keep the effective batch 16)"
    )
    free = estimate_train_vram(BIG, cfg, uncheckpointed_layers=0, micro_batch=6).total_bytes
    assert suggest_train_fit(BIG, cfg, free).endswith(
        "micro_batch 6 fits (set train.micro_batch=6 train.grad_accum=3 train.uncheckpointed_layers=0 to keep the effective batch 16)"
    )
    # The floor: micro-batch 1, every layer checkpointed.
    floor = estimate_train_vram(BIG, cfg, micro_batch=1, gradient_checkpointing=True, uncheckpointed_layers=0)
    assert suggest_train_fit(BIG, cfg, GIB) == suggestion(GIB) + (
        f"nothing fits; micro_batch 1 needs ~{floor.total_gib:.1f} GiB (use a larger GPU, or free it)"
    )
    no_gc = config(train={**BIG_TRAIN, "gradient_checkpointing": False}, lora={"r": 32})
    need = estimate_train_vram(BIG, no_gc)
    floor = estimate_train_vram(BIG, no_gc, micro_batch=1, gradient_checkpointing=True)
    assert suggest_train_fit(BIG, no_gc, GIB) == (
        f"micro_batch 8 needs ~{need.total_gib:.1f} GiB, 1.0 GiB free: nothing fits; "
        f"micro_batch 1 needs ~{floor.total_gib:.1f} GiB (use a larger GPU, or free it)"
    )
    assert suggest_train_fit(BIG, no_gc, floor.total_bytes).endswith(
        ": set train.gradient_checkpointing=true and train.micro_batch=1"
    )


def test_32b_quantize_and_eval_suggestions_use_the_users_config():
    cfg = config(
        quantize={"num_calibration_samples": 128, "max_seq_length": 512},
        eval={"batch_size": 6, "max_new_tokens": 256, "int4_kernel": "dequant"},
        resources={"vram_margin_gib": 1.0},
    )
    free = estimate_quantize_vram(BIG, cfg, num_samples=32).total_bytes
    need = estimate_quantize_vram(BIG, cfg).total_gib
    assert suggest_quantize_fit(BIG, cfg, free) == (
        f"AWQ with 128 samples needs ~{need:.1f} GiB, {free / GIB:.1f} GiB free: "
        "quantize.num_calibration_samples=32 fits"
    )
    for weights, packed in (("w4a16", None), ("w4a16", 20 * GIB), ("nf4", None)):
        need = estimate_eval_vram(BIG, cfg, weights=weights, packed_bytes=packed).total_gib
        free = estimate_eval_vram(BIG, cfg, batch_size=3, weights=weights, packed_bytes=packed).total_bytes
        assert suggest_eval_fit(BIG, cfg, free, weights, packed_bytes=packed) == (
            f"eval batch 6 needs ~{need:.1f} GiB, {free / GIB:.1f} GiB free: eval.batch_size=3 fits"
        ), (weights, packed)
