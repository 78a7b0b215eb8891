"""The training speed levers of issue 9 change no math: selective checkpointing and Liger's fused kernels
give the loss and LoRA gradients of the plain model; their config keys fail clearly; the preflight counts
their memory. The Liger comparison needs a CUDA GPU (Triton) and is skipped elsewhere."""

from __future__ import annotations

from contextlib import ExitStack
from importlib.util import find_spec

import pytest
import torch

from conftest import ROOT
from pcbvlm.collator import TrainCollator, keep_answer_logits
from pcbvlm.config import Config
from pcbvlm.deeppcb import load_samples
from pcbvlm.errors import UserError
from pcbvlm.modeling import apply_lora, decoder_layers, load_base_model, use_fused_kernels
from pcbvlm.preflight.estimate import estimate_train_vram, fused_cross_entropy_chunk
from pcbvlm.shapes import qwen3_vl_32b_config

TINY = ROOT / "config" / "tiny.yaml"


def _loss_and_grads(cfg, processor, data_dir, device="cpu", dtype=None, prepare=None, **lora_kwargs):
    torch.manual_seed(0)
    model = load_base_model(cfg, device=device, dtype=dtype).to(device)
    if prepare:
        prepare(model)
    model = apply_lora(model, cfg, **lora_kwargs)
    for module in model.modules():  # non-zero B so that gradients reach A too
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.02)
    model.train()
    batch = keep_answer_logits(TrainCollator(processor)(load_samples(data_dir, "train")[:3]))
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    loss = model(**batch).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return model, loss.detach(), [g.detach() for g in torch.autograd.grad(loss, params)]


def test_uncheckpointed_layers_keep_the_loss_and_gradients(tiny_train_cfg, tiny_processor, tiny_data_dir):
    """The last N layers run without recomputation; the rest stay checkpointed; the math is unchanged."""
    _, plain_loss, plain_grads = _loss_and_grads(
        tiny_train_cfg, tiny_processor, tiny_data_dir, gradient_checkpointing=False
    )
    model, loss, grads = _loss_and_grads(
        tiny_train_cfg, tiny_processor, tiny_data_dir, gradient_checkpointing=True, uncheckpointed_layers=1
    )
    flags = [layer.gradient_checkpointing for layer in decoder_layers(model.base_model.model)]
    assert flags == [True] * (len(flags) - 1) + [False]
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_more_uncheckpointed_layers_than_the_model_has_is_a_config_error(tiny_train_cfg):
    model = load_base_model(tiny_train_cfg)
    with pytest.raises(UserError, match=r"train.uncheckpointed_layers: 3 .* 2 decoder layers"):
        apply_lora(model, tiny_train_cfg, gradient_checkpointing=True, uncheckpointed_layers=3)


def test_fused_kernels_choice(tiny_train_cfg):
    assert use_fused_kernels(tiny_train_cfg, "cpu") is False  # tiny config: none
    auto = tiny_train_cfg.model_copy(
        update={"train": tiny_train_cfg.train.model_copy(update={"fused_kernels": "auto"})}
    )
    assert use_fused_kernels(auto, "cpu") is False  # Triton kernels need a GPU: auto falls back
    forced = tiny_train_cfg.model_copy(
        update={"train": tiny_train_cfg.train.model_copy(update={"fused_kernels": "liger"})}
    )
    with pytest.raises(UserError, match="train.fused_kernels: liger needs a CUDA GPU"):
        use_fused_kernels(forced, "cpu")


def test_fused_cross_entropy_chunk_follows_liger():
    # Liger: ceil(V / H) chunks, rows per chunk rounded up to a power of two, never more than the rows.
    assert fused_cross_entropy_chunk(16 * 231, 5120, 151936) == 128  # 3696 / 30 = 124 -> 128
    assert fused_cross_entropy_chunk(10, 5120, 151936) == 1
    assert fused_cross_entropy_chunk(4, 64, 64) == 4  # one chunk: all rows


def test_preflight_counts_uncheckpointed_layers_and_the_fused_loss():
    shape = qwen3_vl_32b_config()
    base = dict(micro_batch=16, seq_len=718, logit_tokens=231, fused_swiglu=False)
    plain = estimate_train_vram(shape, Config(), **base, fused_cross_entropy=False, uncheckpointed_layers=0)
    kept = estimate_train_vram(shape, Config(), **base, fused_cross_entropy=False, uncheckpointed_layers=4)
    fused = estimate_train_vram(shape, Config(), **base, fused_cross_entropy=True, uncheckpointed_layers=0)
    per_layer = (kept.total_gib - plain.total_gib) / 4
    # 319 KB per token and layer without LoRA dropout (275 measured), minus the hidden state the
    # checkpoint would have held: ~3.3 GiB at 16 x 718 tokens; dropout keeps every adapter input too.
    assert 3.0 < per_layer < 3.6
    dropout = Config().model_copy(update={"lora": Config().lora.model_copy(update={"dropout": 0.05})})
    kept_dropout = estimate_train_vram(
        shape, dropout, **base, fused_cross_entropy=False, uncheckpointed_layers=4
    )
    plain_dropout = estimate_train_vram(
        shape, dropout, **base, fused_cross_entropy=False, uncheckpointed_layers=0
    )
    assert 4.2 < (kept_dropout.total_gib - plain_dropout.total_gib) / 4 < 4.8
    names = {item.name for item in fused.items}
    assert "fused cross-entropy chunk" in names and "logits + loss (fp32)" not in names
    assert fused.total_gib < plain.total_gib


@pytest.mark.skipif(
    not torch.cuda.is_available() or find_spec("liger_kernel") is None,
    reason="Liger's Triton kernels need a CUDA GPU and liger-kernel (requirements/cuda.lock)",
)
def test_liger_kernels_keep_the_loss_and_gradients(tiny_train_cfg, tiny_processor, tiny_data_dir):
    from pcbvlm.bench import FusedKernels

    _, plain_loss, plain_grads = _loss_and_grads(
        tiny_train_cfg,
        tiny_processor,
        tiny_data_dir,
        device="cuda",
        dtype=torch.float32,
        gradient_checkpointing=False,
    )
    with ExitStack() as undo:  # the patches are undone afterwards (module-wide rotary included)
        _, loss, grads = _loss_and_grads(
            tiny_train_cfg,
            tiny_processor,
            tiny_data_dir,
            device="cuda",
            dtype=torch.float32,
            prepare=lambda model: undo.enter_context(FusedKernels(model)),
            gradient_checkpointing=False,
        )
    torch.testing.assert_close(loss, plain_loss, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_lora_inputs_stay_in_the_compute_dtype_with_the_same_result(
    tiny_train_cfg, tiny_processor, tiny_data_dir
):
    """Skipping peft's fp32 copy of every adapter input changes nothing under autocast (bf16 base,
    fp32 adapters: the matmul runs in bf16 either way)."""

    def under_autocast(model):
        original = model.forward

        def forward(*args, **kwargs):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return original(*args, **kwargs)

        model.forward = forward

    results = []
    for cast in (True, False):
        model, loss, grads = _loss_and_grads(
            tiny_train_cfg,
            tiny_processor,
            tiny_data_dir,
            dtype=torch.bfloat16,
            prepare=under_autocast,
            gradient_checkpointing=False,
            cast_lora_inputs=cast,
        )
        lora_layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
        assert lora_layers and all(m.cast_input_dtype_enabled is cast for m in lora_layers)
        results.append((loss, grads))
    (cast_loss, cast_grads), (loss, grads) = results
    torch.testing.assert_close(loss, cast_loss, rtol=0, atol=0)
    for a, b in zip(grads, cast_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _generate_both_ways(cfg, tiny_data_dir):
    from pcbvlm.deeppcb import build_messages
    from pcbvlm.generate import generate_batch, load_for_inference

    messages = [
        build_messages(s, cfg.data, with_answer=False) for s in load_samples(tiny_data_dir, "test")[:2]
    ]
    static_cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"kv_cache": "static"})})
    outputs = {}
    for name, c in (("dynamic", cfg), ("static", static_cfg)):
        loaded = load_for_inference(c, "base")
        assert loaded.kv_cache == name
        outputs[name] = generate_batch(loaded, messages, 24)
        outputs[f"{name} compiled"] = hasattr(loaded.model, "_compiled_call")
    return outputs


def test_static_kv_cache_generates_the_same_tokens(tiny_train_cfg, tiny_data_dir):
    outputs = _generate_both_ways(tiny_train_cfg, tiny_data_dir)
    assert not outputs["static compiled"]  # transformers compiles only on an accelerator
    for (text, offsets, probs), (s_text, s_offsets, s_probs) in zip(
        outputs["dynamic"], outputs["static"], strict=True
    ):
        assert (text, offsets) == (s_text, s_offsets)
        torch.testing.assert_close(torch.tensor(probs), torch.tensor(s_probs), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(
    not torch.cuda.is_available() or find_spec("bitsandbytes") is None,
    reason="compiling the decoding step of a bitsandbytes NF4 model needs a CUDA GPU",
)
def test_compiled_decoding_of_an_nf4_model_generates_the_same_tokens(tiny_train_cfg, tiny_data_dir):
    nf4 = tiny_train_cfg.model_copy(
        update={
            "train": tiny_train_cfg.train.model_copy(update={"quantization": "nf4", "precision": "bf16"}),
            "resources": tiny_train_cfg.resources.model_copy(update={"device": "cuda"}),
        }
    )
    outputs = _generate_both_ways(nf4, tiny_data_dir)
    assert outputs["static compiled"] and not outputs["dynamic compiled"]
    # bf16 on a GPU: the compiled step may round differently; the greedy tokens agree.
    same = sum(a[0] == b[0] for a, b in zip(outputs["dynamic"], outputs["static"], strict=True))
    assert same == len(outputs["dynamic"])
