"""`train.compile_layers` (pcbvlm.layer_compile): every decoder layer through torch.compile, with
gradient checkpointing, an uncheckpointed layer and offloaded checkpoint inputs around it, keeps the
loss and the LoRA gradients, and all layers share one compiled graph."""

from __future__ import annotations

import shutil

import pytest
import torch

from pcbvlm.collator import TrainCollator, keep_answer_logits
from pcbvlm.deeppcb import load_samples
from pcbvlm.errors import UserError
from pcbvlm.layer_compile import check_compilable, compiled_layers, uncompile_decoder_layers
from pcbvlm.modeling import decoder_layers, load_base_model

needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None, reason="torch.compile on the CPU needs g++ (the CPU image has none)"
)


def _run(cfg, processor, data_dir, compiled: bool, device: str = "cpu"):
    """Loss and LoRA gradients of the tiny model (2 layers: the first checkpointed and offloaded, the
    second not), fused LoRA adds on, non-zero LoRA B so that gradients reach A too. On a GPU: QLoRA
    (NF4 base, bitsandbytes' 4-bit linears inside the compiled layers), computing in fp32 so that
    compiled and eager can be compared closely."""
    from conftest import tiny_lora_model
    from pcbvlm.layer_compile import compile_decoder_layers

    if device == "cuda":
        train = cfg.train.model_copy(update={"method": "qlora", "quantization": "nf4"})
        cfg = cfg.model_copy(update={"train": train})
    model, peft_model = tiny_lora_model(
        cfg,
        device,
        gradient_checkpointing=True,
        uncheckpointed_layers=1,
        offload_checkpoints=True,
        fused_lora=True,
    )
    layers = decoder_layers(model)
    if compiled:
        assert compile_decoder_layers(layers) == len(layers)
    peft_model.train()
    batch = keep_answer_logits(TrainCollator(processor)(load_samples(data_dir, "train")[:3]))
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    loss = peft_model(**batch).loss
    params = [p for p in peft_model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return peft_model, layers, loss.detach(), grads


@needs_compiler
def test_compiled_layers_keep_the_loss_and_gradients(tiny_train_cfg, tiny_processor, tiny_data_dir):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _, _, eager_loss, eager_grads = _run(tiny_train_cfg, tiny_processor, tiny_data_dir, compiled=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    model, layers, loss, grads = _run(tiny_train_cfg, tiny_processor, tiny_data_dir, compiled=True)
    assert compiled_layers(layers) == 2
    # both layers really ran through Dynamo, as one graph for both (parameters are graph inputs), without
    # graph breaks (a break leaves parts of the layer eager and unfused)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    assert model.pcbvlm_checkpoint_offload.packed == 1  # the checkpointed layer's input went to the host
    # fp32 on the CPU: Inductor's fused kernels reorder sums, nothing else changes
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(eager_grads) > 0
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    uncompile_decoder_layers(layers)
    assert compiled_layers(layers) == 0


def test_compile_without_a_cpu_compiler_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError, match=r"train\.compile_layers: .*g\+\+.*compile_layers=false"):
        check_compilable("cpu")
    check_compilable("cuda")  # a GPU compiles through Triton


@needs_compiler
def test_training_job_compiles_the_layers(tiny_model_dir, tiny_data_dir, tmp_path):
    """`train.compile_layers=true` in the training job: both layers of the tiny model run compiled code
    through the Trainer (with checkpointing, which the Trainer switches on itself)."""
    from conftest import train_tiny

    proc = train_tiny(
        tiny_model_dir,
        tiny_data_dir,
        tmp_path / "runs",
        max_steps=2,
        gradient_checkpointing="true",
        compile_layers="true",
        uncheckpointed_layers=1,
    )
    out = proc.stdout + proc.stderr
    assert "compiled decoder layers: 2 of 2," in out
    graphs = int(out.split("compiled decoder layers: 2 of 2, ")[1].split(" graphs")[0])
    assert graphs >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA (bitsandbytes NF4) needs a CUDA GPU")
def test_compiled_qlora_layers_on_a_gpu(tiny_train_cfg, tiny_processor, tiny_data_dir):
    """bitsandbytes' 4-bit matmuls inside the compiled layers: traced as one graph without graph breaks
    (the CPU cannot check this: no NF4 there), and the same loss. The gradients are compared on the CPU
    (test above); on the GPU the loss of a checkpointed layer compiled together with its checkpoint
    differed by 4.8e-4 (relative, fp32), so the bound here is 1e-3."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _, _, eager_loss, _ = _run(tiny_train_cfg, tiny_processor, tiny_data_dir, False, "cuda")
    _, layers, loss, grads = _run(tiny_train_cfg, tiny_processor, tiny_data_dir, True, "cuda")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(loss, eager_loss, rtol=1e-3, atol=0)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    uncompile_decoder_layers(layers)


@needs_compiler
def test_benchmark_row_compiles_and_leaves_the_model_eager(tiny_train_cfg, tiny_processor, tiny_data_dir):
    """A benchmark row with compiled layers records that they compiled whole; the next row on the same
    model runs eager (the benchmark measures several settings on one model)."""
    from pcbvlm.bench import Setting, time_training

    torch._dynamo.reset()
    model = load_base_model(tiny_train_cfg, device="cpu", dtype=torch.float32)
    sample = load_samples(tiny_data_dir, "train")[0]

    def row(compiled: bool) -> dict:
        setting = Setting("row", 2, lora_dropout=0.0, offload_checkpoints=True, compile_layers=compiled)
        return time_training(model, tiny_train_cfg, tiny_processor, sample, setting, 1, lambda _: None)

    compiled = row(True)
    assert compiled["status"] == "ok" and compiled["dynamo"] == {"unique_graphs": 1, "graph_breaks": {}}
    assert compiled_layers(decoder_layers(model)) == 0
    eager = row(False)
    assert eager["status"] == "ok" and "dynamo" not in eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0  # nothing compiled for it


def test_compile_under_zero3_is_refused_before_a_run_folder_exists(tiny_model_dir, tiny_data_dir, tmp_path):
    """ZeRO-3 gathers parameters inside the layers' forward: the job refuses the combination in one
    line, before it creates the run's folder."""
    from conftest import ROOT, run_job, tiny_overrides

    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    runs = tmp_path / "runs"
    flags = tiny_overrides(tiny_model_dir, tiny_data_dir, runs, compile_layers="true")
    proc = run_job("pcbvlm.commands.train", "--config", str(ROOT / "config" / "tiny.yaml"), *flags, env=env)
    assert proc.returncode != 0
    assert "train.compile_layers: not with DeepSpeed ZeRO-3" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not runs.exists() or not any(runs.iterdir())
