"""Two speed levers for the training step, both on the elementwise work around the matmuls (BENCHMARKS.md).

`fuse_lora_adds`: peft computes every adapted linear as `result = base(x).clone(); result = result +
lora_B(lora_A(x)) * scaling` (the clone only on 4-bit layers): a full-size copy, a scaling and an add
after the B matmul, three passes over a tensor as large as the layer's output, seven linears per layer.
`torch.addmm(result, a, B^T, alpha=scaling)` does the scaling and the add in the B matmul's epilogue
(cuBLAS), and needs no copy: one pass instead of three. Same math; in bf16 the sum is rounded once
instead of after each step. Unsloth does the same (`matmul_lora`'s `addmm_`).

`fuse_swiglu`: Qwen3-VL's MLP computes `down(silu(gate(x)) * up(x))` with separate SiLU and multiply
kernels, and autograd keeps `silu(gate)` as well as `gate` and `up` for the backward. Liger's
`LigerSiLUMulFunction` (liger-kernel 0.8.5, whose `apply_liger_kernel_to_qwen3_vl(swiglu=...)` accepts the
flag but wires nothing) does both in one Triton kernel, keeps only `gate` and `up`, and recomputes the
SiLU in its fused backward: one 25600-wide tensor less per token and layer (51 KB in bf16).

`skip_down_proj_recompute`: a checkpointed layer recomputes its forward in the backward pass, down to its
last product, down_proj's (27% of the layer's weights, a third of the MLP). Nothing the backward needs
comes out of that product: down_proj's frozen base needs only the incoming gradient and its weight, and
its adapter saves its own inputs. Non-reentrant checkpointing stops recomputing as soon as every saved
tensor is back (torch's early stop, on by default), so computing down_proj's adapter first and its base
product last ends the recomputation before the base product: about a ninth of a checkpointed layer's
matmul work less (forward, recompute and input-gradient products each ~a third). bitsandbytes' 4-bit
product saves nothing (it keeps its weight on the autograd context); an unquantized frozen base goes
through `_FrozenLinear`, which does the same. Under `train.compile_layers` the base product runs outside
the compiled graph (`torch.compiler.disable`), so that the graph's saved tensors are complete before it.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch


def _plain_lora_layer(layer, args: tuple, kwargs: dict) -> bool:
    """Whether `layer` is in the state the fused path handles: adapters on, unmerged, vanilla LoRA (no
    DoRA or other variant, no LoRA bias), no extra forward arguments (mixed-batch adapter names) and
    no ZeRO-3-partitioned adapter weights."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return False
    # DeepSpeed ZeRO-3 partitions parameters (they carry `ds_id`) and gathers a weight only inside its
    # own module's forward: the addmm reads lora_B.weight directly, so it would see an empty shard.
    if any(hasattr(layer.lora_B[a].weight, "ds_id") for a in layer.active_adapters if a in layer.lora_B):
        return False
    if getattr(layer, "lora_variant", None) and any(a in layer.lora_variant for a in layer.active_adapters):
        return False
    return not any(getattr(layer, "lora_bias", {}).get(a, False) for a in layer.active_adapters)


def _adapter_input(layer, name: str, x: torch.Tensor) -> torch.Tensor:
    """The input of adapter `name`'s lora_A, as peft makes it: dropout, then (outside autocast) its dtype."""
    adapter_input = layer.lora_dropout[name](x)
    if layer.cast_input_dtype_enabled and not torch.is_autocast_enabled(x.device.type):
        adapter_input = adapter_input.to(layer.lora_A[name].weight.dtype)
    return adapter_input


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if not _plain_lora_layer(self, args, kwargs):
        return self.pcbvlm_unfused_forward(x, *args, **kwargs)
    result = self.base_layer(x)
    shape = result.shape
    result = result.reshape(-1, shape[-1])
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        down = lora_a(_adapter_input(self, name, x))
        down = down.reshape(-1, down.shape[-1]).to(result.dtype)
        # result + scaling * (down @ B^T) in one GEMM: the scaling and the add run in its epilogue.
        result = torch.addmm(result, down, lora_b.weight.to(result.dtype).t(), alpha=self.scaling[name])
    return result.view(shape)


class _FrozenLinear(torch.autograd.Function):
    """`x @ W^T + b` for a frozen `W` that the backward reads from the autograd context instead of
    saving it (as bitsandbytes' 4-bit product does): with nothing saved, checkpointing's recomputation
    can stop before it. Only the input gets a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # autocast ran the forward in bf16: the gradient is bf16, the weight may be fp32
        return grad.matmul(ctx.weight.to(grad.dtype)), None, None


def _frozen_product(base: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base layer's output, saving nothing for the backward where the layer allows it."""
    if type(base) is torch.nn.Linear and not base.weight.requires_grad:
        bias = base.bias
        if bias is not None and bias.requires_grad:
            return base(x)
        return _FrozenLinear.apply(x, base.weight, bias)
    return base(x)  # bitsandbytes' Linear4bit saves nothing itself


_frozen_product_outside_graph = torch.compiler.disable(_frozen_product)


def _adapter_first_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The LoRA linear with its adapters first and its frozen base product last (see the module
    docstring, `skip_down_proj_recompute`)."""
    if not _plain_lora_layer(self, args, kwargs):
        return self.pcbvlm_unfused_forward(x, *args, **kwargs)
    adapters = None
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        out = self.lora_B[name](self.lora_A[name](_adapter_input(self, name, x))) * self.scaling[name]
        adapters = out if adapters is None else adapters + out
    result = _frozen_product_outside_graph(self.base_layer, x)
    return result if adapters is None else result + adapters.to(result.dtype)


def skip_down_proj_recompute(layers: list[torch.nn.Module]) -> int:
    """Bind the adapter-first forward to the LoRA down_proj of every checkpointed one of the decoder
    `layers` (after LoRA and checkpointing are in place; uncheckpointed layers keep the fused `addmm`).
    Returns how many layers were switched. Undone by `unfuse_lora_adds` (or with the LoRA layers by
    peft's `unload()`)."""
    from peft.tuners.lora import LoraLayer

    switched = 0
    for layer in layers:
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if not getattr(layer, "gradient_checkpointing", False) or not isinstance(down, LoraLayer):
            continue
        if "pcbvlm_unfused_forward" not in down.__dict__:
            down.pcbvlm_unfused_forward = down.forward
        down.forward = types.MethodType(_adapter_first_forward, down)
        switched += 1
    return switched


def fuse_lora_adds(model) -> int:
    """Route every LoRA linear of `model` (peft's plain and bitsandbytes-4-bit layers) through one
    `addmm` per adapter (see the module docstring); a layer in another state (merged, DoRA, disabled
    adapters, mixed-batch adapter names) falls back to peft's own forward. The binding is per instance:
    `unload()`/`merge_and_unload()` drop it with the LoRA layers. Returns how many layers were switched."""
    from peft.tuners.lora import LoraLayer

    switched = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not isinstance(module.base_layer, torch.nn.Linear):
            continue
        if "pcbvlm_unfused_forward" in module.__dict__:
            continue
        module.pcbvlm_unfused_forward = module.forward
        module.forward = types.MethodType(_fused_lora_forward, module)
        switched += 1
    return switched


def unfuse_lora_adds(model) -> None:
    """Undo `fuse_lora_adds` (the benchmark measures several settings on one model)."""
    for module in model.modules():
        if "pcbvlm_unfused_forward" in module.__dict__:
            module.forward = module.__dict__.pop("pcbvlm_unfused_forward")


def torch_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """What Liger's kernel computes, in plain PyTorch (the CPU stand-in, and the tests' reference)."""
    return torch.nn.functional.silu(gate) * up


def liger_silu_mul() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from liger_kernel.ops import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply


def fuse_swiglu(model, silu_mul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> int:
    """Bind a SwiGLU forward (`down(silu_mul(gate(x), up(x)))`, Liger's fused kernel by default) to every
    decoder MLP of a Qwen3-VL model; the adapters inside gate/up/down stay as they are. Returns how many
    MLPs were switched. Per instance, so removing the instance `forward` undoes it."""
    from pcbvlm.modeling import decoder_layers

    silu_mul = silu_mul or liger_silu_mul()
    switched = 0
    for layer in decoder_layers(model):
        mlp = layer.mlp
        if getattr(mlp.config, "hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"fuse_swiglu: activation {mlp.config.hidden_act} is not SiLU")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))

        mlp.forward = types.MethodType(forward, mlp)
        switched += 1
    return switched
