"""Issue 20's training levers keep the math: LoRA adds in the B matmul's epilogue (`fuse_lora_adds`) and
the fused SwiGLU (`fuse_swiglu`) give the loss and the LoRA gradients of the plain model. Liger's Triton
kernel itself needs a CUDA GPU (skipped elsewhere); on the CPU its PyTorch twin checks the wiring."""

from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch

from pcbvlm.collator import TrainCollator, keep_answer_logits
from pcbvlm.deeppcb import load_samples
from pcbvlm.fused_ops import fuse_lora_adds, fuse_swiglu, torch_silu_mul, unfuse_lora_adds
from pcbvlm.modeling import apply_lora, decoder_layers, load_base_model


def _run(cfg, processor, data_dir, device="cpu", dtype=None, autocast=None, swiglu=None, **lora_kwargs):
    torch.manual_seed(0)
    model = load_base_model(cfg, device=device, dtype=dtype).to(device)
    if swiglu:
        assert fuse_swiglu(model, swiglu) == len(decoder_layers(model))
    peft_model = apply_lora(model, cfg, gradient_checkpointing=False, **lora_kwargs)
    for module in peft_model.modules():  # non-zero B so that gradients reach A too
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.02)
    peft_model.train()
    batch = keep_answer_logits(TrainCollator(processor)(load_samples(data_dir, "train")[:3]))
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    if autocast:
        with torch.autocast(device, dtype=autocast):
            loss = peft_model(**batch).loss
    else:
        loss = peft_model(**batch).loss
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return peft_model, loss.detach(), [g.detach() for g in torch.autograd.grad(loss, params)]


def _fused_layers(model) -> int:
    return sum("pcbvlm_unfused_forward" in m.__dict__ for m in model.modules())


def test_fused_lora_adds_keep_the_loss_and_gradients(tiny_train_cfg, tiny_processor, tiny_data_dir):
    _, plain_loss, plain_grads = _run(tiny_train_cfg, tiny_processor, tiny_data_dir)
    model, loss, grads = _run(tiny_train_cfg, tiny_processor, tiny_data_dir, fused_lora=True)
    layers = len(decoder_layers(model.base_model.model))
    assert _fused_layers(model) == layers * len(tiny_train_cfg.lora.target_modules)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fused_lora_adds_under_bf16_autocast(tiny_train_cfg, tiny_processor, tiny_data_dir):
    """The training step's setting: bf16 base, fp32 adapters, autocast; the same within bf16 rounding."""
    common = dict(dtype=torch.bfloat16, autocast=torch.bfloat16)
    _, plain_loss, plain_grads = _run(tiny_train_cfg, tiny_processor, tiny_data_dir, **common)
    _, loss, grads = _run(tiny_train_cfg, tiny_processor, tiny_data_dir, fused_lora=True, **common)
    torch.testing.assert_close(loss, plain_loss, rtol=2e-2, atol=2e-2)
    for a, b in zip(grads, plain_grads, strict=True):
        assert a.dtype == b.dtype == torch.float32  # the adapters' gradients stay fp32
        assert torch.linalg.vector_norm(a - b) <= 0.05 * torch.linalg.vector_norm(b) + 1e-6


def test_fused_lora_falls_back_to_peft_when_adapters_are_off_or_merged(tiny_train_cfg, tiny_processor):
    torch.manual_seed(0)
    model = apply_lora(load_base_model(tiny_train_cfg), tiny_train_cfg, gradient_checkpointing=False)
    for module in model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.5)
    layer = model.base_model.model.model.language_model.layers[0].mlp.up_proj
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        plain_out = layer(x)
        with model.disable_adapter():
            base_out = layer(x)
        assert fuse_lora_adds(model) > 0
        torch.testing.assert_close(layer(x), plain_out, rtol=1e-6, atol=1e-6)
        with model.disable_adapter():
            torch.testing.assert_close(layer(x), base_out)
        layer.merge()
        torch.testing.assert_close(layer(x), plain_out, rtol=1e-5, atol=1e-5)  # not added twice
        layer.unmerge()
        # DeepSpeed ZeRO-3 marks partitioned parameters with `ds_id`: peft's own forward gathers them
        calls = []
        unfused = layer.pcbvlm_unfused_forward
        layer.pcbvlm_unfused_forward = lambda *a, **k: calls.append(1) or unfused(*a, **k)
        layer.lora_B["default"].weight.ds_id = 7
        torch.testing.assert_close(layer(x), plain_out, rtol=1e-6, atol=1e-6)
        assert calls == [1]
        del layer.lora_B["default"].weight.ds_id
        layer.pcbvlm_unfused_forward = unfused
    unfuse_lora_adds(model)
    assert _fused_layers(model) == 0


@pytest.mark.skipif(find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_fused_lora_add_on_a_4bit_layer():
    """peft's bitsandbytes-4-bit LoRA layer (the QLoRA path: base output cloned, then added to)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False))
    quantized = torch.nn.Sequential(bnb.nn.Linear4bit(64, 48, bias=False, quant_type="nf4"))
    quantized[0].weight = bnb.nn.Params4bit(base[0].weight.data, requires_grad=False, quant_type="nf4")
    try:
        quantized = quantized.to("cuda" if torch.cuda.is_available() else "cpu")
        x = torch.randn(3, 64, device=quantized[0].weight.device)
        quantized(x)
    except Exception as exc:  # bitsandbytes without a usable backend here
        pytest.skip(f"bitsandbytes 4-bit does not run here: {exc}")
    model = get_peft_model(quantized, LoraConfig(r=8, lora_alpha=16, target_modules=["0"]))
    torch.nn.init.normal_(model.base_model.model[0].lora_B["default"].weight, std=0.1)
    outputs = []
    for fused in (False, True):
        if fused:
            assert fuse_lora_adds(model) == 1
        out = model(x)
        grads = torch.autograd.grad(out.square().sum(), [p for p in model.parameters() if p.requires_grad])
        outputs.append((out.detach(), grads))
    (plain, plain_grads), (out, grads) = outputs
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_swiglu_keeps_the_loss_and_gradients(tiny_train_cfg, tiny_processor, tiny_data_dir):
    """The wiring: the MLP's forward through a SiLU-multiply function, adapters inside gate/up/down
    untouched (PyTorch's twin of Liger's kernel here; the kernel on a GPU in the test below)."""
    calls = []

    def counted(gate, up):
        calls.append(gate.shape)
        return torch_silu_mul(gate, up)

    _, plain_loss, plain_grads = _run(tiny_train_cfg, tiny_processor, tiny_data_dir)
    model, loss, grads = _run(tiny_train_cfg, tiny_processor, tiny_data_dir, swiglu=counted)
    assert len(calls) == len(decoder_layers(model.base_model.model))
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(
    not torch.cuda.is_available() or find_spec("liger_kernel") is None,
    reason="Liger's Triton kernels need a CUDA GPU and liger-kernel (requirements/cuda.lock)",
)
def test_liger_swiglu_keeps_the_loss_and_gradients(tiny_train_cfg, tiny_processor, tiny_data_dir):
    from pcbvlm.fused_ops import liger_silu_mul

    common = dict(device="cuda", dtype=torch.float32)
    _, plain_loss, plain_grads = _run(tiny_train_cfg, tiny_processor, tiny_data_dir, **common)
    _, loss, grads = _run(tiny_train_cfg, tiny_processor, tiny_data_dir, swiglu=liger_silu_mul(), **common)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_fused_levers_are_config_switches(tiny_train_cfg):
    from pcbvlm.bench import configured_setting
    from pcbvlm.config import Config

    assert Config().train.fused_lora and Config().train.fused_swiglu
    off = tiny_train_cfg.model_copy(
        update={"train": tiny_train_cfg.train.model_copy(update={"fused_lora": False})}
    )
    model = apply_lora(load_base_model(off), off, fused_lora=off.train.fused_lora)
    assert _fused_layers(model) == 0
    setting = configured_setting(Config())
    assert setting.fused_lora and setting.fused_swiglu


def test_preflight_counts_the_activation_the_fused_swiglu_does_not_keep():
    from pcbvlm.config import Config
    from pcbvlm.preflight.estimate import estimate_train_vram
    from pcbvlm.shapes import qwen3_vl_32b_config

    common = dict(micro_batch=16, seq_len=718, logit_tokens=231, uncheckpointed_layers=10)
    plain = estimate_train_vram(qwen3_vl_32b_config(), Config(), **common, fused_swiglu=False)
    fused = estimate_train_vram(qwen3_vl_32b_config(), Config(), **common, fused_swiglu=True)
    # one 25600-wide bf16 tensor per token in each of the 10 kept layers (the recomputed layer is a
    # transient term, smaller than the peak's largest transient here)
    assert plain.total_bytes - fused.total_bytes == 10 * 16 * 718 * 25600 * 2
