"""`train.compile_layers`: every decoder layer of the language model through `torch.compile`.

Each layer's call (`nn.Module.compile`) becomes one compiled region: Inductor fuses the elementwise work
around the matmuls (norms, rotary, residual and LoRA adds, SiLU x up), and its partitioner picks which
of an uncheckpointed layer's activations the backward keeps. The layers share one compiled graph
(their parameters are graph inputs), so it is compiled once per input shape. bitsandbytes' 4-bit
linears are traced as its registered ops (bitsandbytes >= 0.46), without graph breaks.

Gradient checkpointing stays eager, around the compiled call: a checkpointed layer recomputes its
whole forward through the same compiled code, and the offloaded checkpoint inputs (`pcbvlm.offload`)
are untouched. Compiling the checkpoint itself into the graph would let the backward skip the layer's
last matmul (down_proj, whose product is only the layer's output), but on the H200 (torch 2.11,
bitsandbytes 0.50.2, bf16 autocast) that graph kept about half of each layer's activations instead of
recomputing them (an 8-layer cut at micro-batch 16: 22.07 GiB against 11.67 with the eager
checkpoint; the whole model ran out of memory), so it is not used (BENCHMARKS.md).

The first step of every new input shape pays the compilation (6-24 s for the 32B's layer on the
H200).
"""

from __future__ import annotations

import shutil

import torch

from pcbvlm.errors import UserError


def check_compilable(device: str, switch: str = "train.compile_layers") -> None:
    """Inductor on the CPU generates C++: without a compiler the first step would fail deep inside
    torch.compile; fail first, naming the config `switch` that asked for it (also eval.compile_decoder,
    pcbvlm.graphdecode)."""
    if device == "cpu" and shutil.which("g++") is None:
        raise UserError(
            f"{switch}: torch.compile on the CPU needs a C++ compiler (g++), and none is "
            f"installed; set {switch}=false (it is meant for GPUs)"
        )


def compile_decoder_layers(layers: list[torch.nn.Module]) -> int:
    """Compile each of `layers` in place (`uncompile_decoder_layers` undoes it). Returns how many."""
    for layer in layers:
        layer.compile()
    return len(layers)


def compiled_layers(layers: list[torch.nn.Module]) -> int:
    """How many of `layers` go through torch.compile."""
    return sum(getattr(layer, "_compiled_call_impl", None) is not None for layer in layers)


def uncompile_decoder_layers(layers: list[torch.nn.Module]) -> None:
    """Back to eager calls, and the compiled code dropped (the benchmark measures several settings on one
    model: a later setting must not run, or be limited by, an earlier one's graphs)."""
    for layer in layers:
        layer._compiled_call_impl = None
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
