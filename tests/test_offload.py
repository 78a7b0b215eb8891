"""`train.offload_checkpoints` (pcbvlm.offload): the checkpointed decoder layers' inputs wait for the
backward pass in host memory, and the loss and the LoRA gradients stay those of plain checkpointing.
On the CPU the hooks keep a plain copy (no streams); the CUDA test runs the side-stream copies."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from pcbvlm.collator import TrainCollator, keep_answer_logits
from pcbvlm.deeppcb import load_samples
from pcbvlm.modeling import apply_lora, decoder_layers, load_base_model
from pcbvlm.offload import CheckpointOffload, offload_checkpointed_inputs, offloaded_layers


def _run(cfg, processor, data_dir, offload: bool, device="cpu"):
    """Every layer of the tiny model (2) checkpointed, so that one input is prefetched."""
    torch.manual_seed(0)
    model = load_base_model(cfg, device=device, dtype=torch.float32).to(device)
    peft_model = apply_lora(
        model, cfg, gradient_checkpointing=True, uncheckpointed_layers=0, offload_checkpoints=offload
    )
    for module in peft_model.modules():  # non-zero B so that gradients reach A too
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.02)
    peft_model.train()
    batch = keep_answer_logits(TrainCollator(processor)(load_samples(data_dir, "train")[:3]))
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    loss = peft_model(**batch).loss
    params = [p for p in peft_model.parameters() if p.requires_grad]
    grads = [g.detach() for g in torch.autograd.grad(loss, params)]
    return peft_model, batch, loss.detach(), grads


def _check_offloaded_run(cfg, processor, data_dir, device):
    _, _, plain_loss, plain_grads = _run(cfg, processor, data_dir, offload=False, device=device)
    model, batch, loss, grads = _run(cfg, processor, data_dir, offload=True, device=device)
    offload = model.pcbvlm_checkpoint_offload
    layers = decoder_layers(model.base_model.model)
    checkpointed = len(layers)
    assert offloaded_layers(layers) == checkpointed
    # one input hidden state per checkpointed layer went to the host, and each came back once; all but
    # the first of the backward pass (the last layer of the forward) had been prefetched
    tokens = batch["input_ids"].numel()
    hidden = model.base_model.model.config.text_config.hidden_size
    assert offload.packed == offload.unpacked == checkpointed
    assert offload.packed_bytes == checkpointed * tokens * hidden * 4
    assert offload.prefetched == checkpointed - 1
    # the same values come back: bit for bit on the CPU; on a GPU within what reordered kernels change
    tol = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, plain_loss, **tol)
    for a, b in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_offloaded_checkpoints_keep_the_loss_and_gradients(tiny_train_cfg, tiny_processor, tiny_data_dir):
    _check_offloaded_run(tiny_train_cfg, tiny_processor, tiny_data_dir, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side-stream copies need a CUDA GPU")
def test_offloaded_checkpoints_on_a_gpu(tiny_train_cfg, tiny_processor, tiny_data_dir):
    _check_offloaded_run(tiny_train_cfg, tiny_processor, tiny_data_dir, "cuda")


def _checkpointed_graph(offload: CheckpointOffload | None):
    """Two checkpointed linears; returns the output and a weak reference to the second one's input."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    first, second = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    run = (lambda fn, *a: checkpoint(fn, *a, use_reentrant=False)) if offload is None else None
    if offload is not None:
        run = offload.wrap(lambda fn, *a: checkpoint(fn, *a, use_reentrant=False))
    x = torch.randn(512, 64, requires_grad=True)
    middle = run(lambda t: first(t).relu(), x * 1.0)
    held = weakref.ref(middle)
    out = run(lambda t: second(t).tanh(), middle)
    del middle
    gc.collect()
    return out, held, x, (first, second)


def test_offload_releases_the_saved_inputs_until_the_backward():
    """What the switch is for: after the forward, the graph no longer holds the layer input itself (it
    is freed; on a GPU that is the memory saved), yet the backward still gets its values."""
    out, held, x, modules = _checkpointed_graph(None)
    assert held() is not None  # plain checkpointing keeps the input alive for the backward
    out.sum().backward()
    expected = [x.grad.clone(), *(p.grad.clone() for m in modules for p in m.parameters())]

    offload = CheckpointOffload(min_bytes=1)
    out, held, x, modules = _checkpointed_graph(offload)
    assert held() is None
    assert offload.packed == 2
    out.sum().backward()
    got = [x.grad, *(p.grad for m in modules for p in m.parameters())]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (offload.unpacked, offload.prefetched) == (2, 1)


def test_small_saved_tensors_stay_where_they_are():
    offload = CheckpointOffload(min_bytes=1 << 20)
    small = torch.ones(4)
    assert offload.pack(small) is small and offload.unpack(small) is small
    assert offload.packed == 0


def test_offload_is_a_config_switch(tiny_train_cfg):
    """Only the checkpointed layers are offloaded: the uncheckpointed last one keeps its activations."""
    from pcbvlm.bench import configured_setting
    from pcbvlm.config import Config

    assert not Config().train.offload_checkpoints
    on = tiny_train_cfg.model_copy(
        update={"train": tiny_train_cfg.train.model_copy(update={"offload_checkpoints": True})}
    )
    model = apply_lora(load_base_model(on), on, gradient_checkpointing=True, uncheckpointed_layers=1)
    layers = decoder_layers(model.base_model.model)
    assert offloaded_layers(layers) == len(layers) - 1
    assert offloaded_layers(layers[-1:]) == 0
    assert model.pcbvlm_checkpoint_offload is not None
    off = apply_lora(
        load_base_model(tiny_train_cfg), tiny_train_cfg, gradient_checkpointing=True, uncheckpointed_layers=1
    )
    assert offloaded_layers(decoder_layers(off.base_model.model)) == 0
    assert off.pcbvlm_checkpoint_offload is None
    # no checkpointing: nothing is saved through the checkpoint, nothing to offload
    plain = apply_lora(load_base_model(on), on, gradient_checkpointing=False)
    assert plain.pcbvlm_checkpoint_offload is None
    assert configured_setting(on).offload_checkpoints
    # wrapping twice does not stack the hooks
    again = offload_checkpointed_inputs(layers)
    assert offloaded_layers(layers) == len(layers) - 1
    assert not hasattr(layers[0]._gradient_checkpointing_func.pcbvlm_offloaded, "pcbvlm_offloaded")
    assert isinstance(again, CheckpointOffload)


def test_preflight_moves_the_checkpointed_inputs_to_ram():
    from pcbvlm.config import Config
    from pcbvlm.preflight.estimate import checkpoint_offload_bytes, estimate_ram, estimate_train_vram
    from pcbvlm.shapes import qwen3_vl_32b_config

    shape = qwen3_vl_32b_config()
    common = dict(micro_batch=16, seq_len=718, logit_tokens=231, uncheckpointed_layers=10)
    plain = estimate_train_vram(shape, Config(), **common, offload_checkpoints=False)
    offloaded = estimate_train_vram(shape, Config(), **common, offload_checkpoints=True)
    # 54 checkpointed layers' hidden states leave the GPU but two (in flight) are still there
    assert plain.total_bytes - offloaded.total_bytes == 52 * 16 * 718 * 5120 * 2
    assert offloaded.inputs["offload_checkpoints"]

    cfg = Config()
    cfg.train.uncheckpointed_layers = 10
    on = cfg.model_copy(update={"train": cfg.train.model_copy(update={"offload_checkpoints": True})})
    ram_off = estimate_ram("train", shape, cfg)
    ram_on = estimate_ram("train", shape, on)
    assert checkpoint_offload_bytes(shape, cfg) == 0
    pinned = checkpoint_offload_bytes(shape, on)
    # 54 layers x mb 16 x 650 tokens (the estimate's sample at 640x640) x 5120 x bf16
    assert pinned == 54 * 16 * 650 * 5120 * 2
    assert ram_on.total_bytes - ram_off.total_bytes == pinned


def test_preflight_ram_check_names_the_switch_when_ram_is_short():
    from pcbvlm.config import Config
    from pcbvlm.preflight.checks import _check_ram
    from pcbvlm.preflight.estimate import estimate_ram
    from pcbvlm.preflight.facts import Facts
    from pcbvlm.shapes import ModelShape, qwen3_vl_32b_config

    cfg = Config()
    on = cfg.model_copy(update={"train": cfg.train.model_copy(update={"offload_checkpoints": True})})
    shape = ModelShape.from_config(qwen3_vl_32b_config())
    need = estimate_ram("train", shape, on)
    facts = Facts(ram_total_bytes=int(need.total_bytes), ram_available_bytes=int(need.total_bytes) - 2**30)
    check = _check_ram("train", need, facts, shape, "test")
    assert check.status == "fail" and "train.offload_checkpoints=false" in check.remedy
    without = estimate_ram("train", shape, cfg)
    assert _check_ram("train", without, facts, shape, "test").status == "pass"


def test_training_job_offloads_through_the_trainer(tiny_model_dir, tiny_data_dir, tmp_path):
    """`train.offload_checkpoints=true` in the training job: the Trainer keeps the hooks (it does not
    re-enable checkpointing), one copy per checkpointed layer and optimizer step (micro-batch 2, 1 of
    the tiny model's 2 layers checkpointed, 3 steps, no gradient accumulation)."""
    from conftest import train_tiny

    proc = train_tiny(
        tiny_model_dir,
        tiny_data_dir,
        tmp_path / "runs",
        max_steps=3,
        gradient_checkpointing="true",
        offload_checkpoints="true",
        uncheckpointed_layers=1,
    )
    assert "checkpointed layer inputs offloaded to CPU memory: 3 copies" in proc.stdout + proc.stderr
