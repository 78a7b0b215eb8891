"""`train.skip_down_proj_recompute` (pcbvlm.fused_ops.skip_down_proj_recompute): a checkpointed layer's
recomputation stops before down_proj's frozen base product, eager and compiled, with offloaded inputs,
and the loss and LoRA gradients stay those of the plain checkpointed layer."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pcbvlm.collator import TrainCollator, keep_answer_logits
from pcbvlm.deeppcb import load_samples
from pcbvlm.fused_ops import skip_down_proj_recompute, unfuse_lora_adds
from pcbvlm.layer_compile import compile_decoder_layers, uncompile_decoder_layers
from pcbvlm.modeling import decoder_layers

needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None, reason="torch.compile on the CPU needs g++ (the CPU image has none)"
)
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class WeightUses(TorchDispatchMode):
    """Counts the matrix products that read each of the given weights (forward, recompute, backward)."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.storages = {w.untyped_storage().data_ptr(): name for name, w in weights.items()}
        self.uses = dict.fromkeys(weights, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            for arg in args:
                if isinstance(arg, torch.Tensor) and arg.untyped_storage().data_ptr() in self.storages:
                    self.uses[self.storages[arg.untyped_storage().data_ptr()]] += 1
        return func(*args, **(kwargs or {}))


def _run(cfg, processor, data_dir, skip: bool, compiled: bool = False, offload: bool = True):
    """Loss, LoRA gradients and down_proj base-weight products of the tiny model (2 layers: the first
    checkpointed, the second not), fused LoRA adds on, non-zero LoRA B (gradients reach A too)."""
    from conftest import tiny_lora_model

    model, peft_model = tiny_lora_model(
        cfg,
        gradient_checkpointing=True,
        uncheckpointed_layers=1,
        offload_checkpoints=offload,
        fused_lora=True,
    )
    layers = decoder_layers(model)
    switched = skip_down_proj_recompute(layers) if skip else 0
    if compiled:
        compile_decoder_layers(layers)
    peft_model.train()
    batch = keep_answer_logits(TrainCollator(processor)(load_samples(data_dir, "train")[:3]))
    weights = {
        "checkpointed": layers[0].mlp.down_proj.base_layer.weight,
        "uncheckpointed": layers[1].mlp.down_proj.base_layer.weight,
    }
    with WeightUses(weights) if not compiled else _NoCount(weights) as uses:
        loss = peft_model(**batch).loss
        params = [p for p in peft_model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params)
    if compiled:
        uncompile_decoder_layers(layers)
    return switched, uses.uses, loss.detach(), grads, peft_model


class _NoCount:
    """Inductor's CPU kernels do not dispatch through Python: compiled runs count the eager base product
    (outside the graph) through the `_FrozenLinear` calls instead."""

    def __init__(self, weights):
        self.weights = weights
        self.uses = dict.fromkeys(weights, 0)

    def __enter__(self):
        from pcbvlm import fused_ops

        self._original = fused_ops._FrozenLinear.forward
        storages = {w.untyped_storage().data_ptr(): name for name, w in self.weights.items()}

        def counted(ctx, x, weight, bias):
            name = storages.get(weight.untyped_storage().data_ptr())
            if name:
                self.uses[name] += 1
            return self._original(ctx, x, weight, bias)

        fused_ops._FrozenLinear.forward = staticmethod(counted)
        return self

    def __exit__(self, *exc):
        from pcbvlm import fused_ops

        fused_ops._FrozenLinear.forward = staticmethod(self._original)


def _assert_same(loss, grads, ref_loss, ref_grads):
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(ref_grads) > 0
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_checkpointed_layer_skips_the_down_proj_product_in_its_recomputation(
    tiny_train_cfg, tiny_processor, tiny_data_dir
):
    _, plain, ref_loss, ref_grads, _ = _run(tiny_train_cfg, tiny_processor, tiny_data_dir, skip=False)
    # forward, recomputation, input gradient: three products with the checkpointed layer's weight
    assert plain == {"checkpointed": 3, "uncheckpointed": 2}
    switched, skipped, loss, grads, model = _run(tiny_train_cfg, tiny_processor, tiny_data_dir, skip=True)
    assert switched == 1  # only the checkpointed layer: the other keeps its fused addmm
    assert skipped == {"checkpointed": 2, "uncheckpointed": 2}
    assert model.pcbvlm_checkpoint_offload.packed == 1  # the offloaded input came back for the recomputation
    _assert_same(loss, grads, ref_loss, ref_grads)
    layers = decoder_layers(model.base_model.model)
    unfuse_lora_adds(model)  # back to peft's own forward (the benchmark's next setting)
    assert layers[0].mlp.down_proj.forward.__func__ is type(layers[0].mlp.down_proj).forward


def test_skip_without_offloading(tiny_train_cfg, tiny_processor, tiny_data_dir):
    _, _, ref_loss, ref_grads, _ = _run(
        tiny_train_cfg, tiny_processor, tiny_data_dir, skip=False, offload=False
    )
    _, uses, loss, grads, _ = _run(tiny_train_cfg, tiny_processor, tiny_data_dir, skip=True, offload=False)
    assert uses == {"checkpointed": 2, "uncheckpointed": 2}
    _assert_same(loss, grads, ref_loss, ref_grads)


@needs_compiler
def test_compiled_checkpointed_layer_skips_the_down_proj_product(
    tiny_train_cfg, tiny_processor, tiny_data_dir
):
    """Under train.compile_layers the base product runs outside the compiled graph (one graph break in
    the checkpointed layer), so the recomputation stops after the graph, before the product."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _, _, ref_loss, ref_grads, _ = _run(tiny_train_cfg, tiny_processor, tiny_data_dir, skip=False)
    _, uses, loss, grads, _ = _run(tiny_train_cfg, tiny_processor, tiny_data_dir, skip=True, compiled=True)
    # the frozen product ran once, in the forward; the backward's input gradient uses the weight
    # directly (counted by the eager test); the recomputation did not run it
    assert uses == {"checkpointed": 1, "uncheckpointed": 0}
    _assert_same(loss, grads, ref_loss, ref_grads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA (bitsandbytes NF4) needs a CUDA GPU")
def test_qlora_training_job_on_a_gpu(tiny_model_dir, tiny_data_dir, tmp_path):
    """The training job with the speed levers on a GPU: NF4 base dequantized by pcbvlm.nf4_dequant,
    compiled layers, one checkpointed (offloaded, down_proj not recomputed) and one not."""
    from conftest import ROOT, run_job, tiny_overrides

    flags = tiny_overrides(
        tiny_model_dir,
        tiny_data_dir,
        tmp_path / "runs",
        max_steps=2,
        save_steps=100,
        eval_steps=100,
        method="qlora",
        quantization="nf4",
        precision="bf16",
        fused_kernels="auto",
        gradient_checkpointing="true",
        uncheckpointed_layers=1,
        offload_checkpoints="true",
        compile_layers="true",
        accelerate_profile="a800",
    )
    flags += ["--set", "resources.device=cuda"]  # the tiny config pins the CPU
    proc = run_job("pcbvlm.commands.train", "--config", str(ROOT / "config" / "tiny.yaml"), *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "down_proj not recomputed in 1 checkpointed layers" in out
    assert "compiled decoder layers: 2 of 2," in out
    assert "NF4 weights dequantized by pcbvlm.nf4_dequant" in out
