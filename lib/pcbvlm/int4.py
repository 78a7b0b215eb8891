"""Run the quantized model (compressed-tensors W4A16) with its weights kept in 4 bits.

transformers 5.17 with compressed-tensors 0.19 has no int4 kernels for this format: loading unpacks every
quantized linear to the model dtype (67 GB for the 32B), and `dequantize=False` only postpones that to
the first forward pass (`CompressedLinear`, which ran packed weights, was removed from compressed-tensors).
So the folder is loaded with `dequantize=False` (the linears keep `weight_packed` + `weight_scale`) and
each W4A16 group-quantized linear is then repacked, one at a time, into an `Int4Linear`:

- `tinygemm` (the default, `eval.int4_kernel`): torch's int4 weight-only kernel layout
  (`aten._weight_int4pack_mm` on CUDA, `_weight_int4pack_mm_for_cpu` on the CPU). The kernel reads 4
  bits per weight but re-reads the weight for every 16 rows (H200, the 32B's linears: 10.2 ms per token
  at 1 row, 24.7 at 8, 71 at 32), so on CUDA a call with more than `TINYGEMM_MAX_ROWS` rows (a prompt's
  prefill, batched decoding) reads the layer's weight back from that layout to bf16 (one compiled
  kernel; the permutation of the layout is found by probes and checked on every layer at load) and
  runs a plain matmul. The kernel is thus chosen per call by the number of rows, from one copy.
- `dequant`: the nibbles kept as uint8 (2 per byte), every call dequantizes to bf16 and runs a plain
  matmul. Slower than tinygemm's read-back on the H200 at batch 128 (BENCHMARKS.md); kept as the
  simple reference layout.

Conventions. compressed-tensors stores symmetric int4 q in [-8, 7] (no zero point), packed 8 per int32
with element i at bits 4i..4i+3 as the unsigned q + 8, and one scale per `group_size` input channels:
w = q * scale. torch's int4pack kernels take unsigned 4-bit u in [0, 15] and per-group (scale, zero)
pairs, and compute w = (u - 8) * scale + zero (see `_group_quantize_tensor` in
torch/testing/_internal/common_quantization.py). With u = q + 8 and zero = 0 the two are the same
numbers. The vision tower and lm_head are not quantized (quantize.ignore) and stay as they are.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pcbvlm.errors import UserError

Kernel = Literal["tinygemm", "dequant"]
# A tinygemm layer called with more rows than this (the prompt's prefill) dequantizes its weight from the
# tinygemm layout and runs a bf16 matmul instead: the kernel re-reads the weight per 16-row tile, so a
# 700-token prompt would cost ~45 weight reads.
TINYGEMM_MAX_ROWS = 16


def unpack_int32(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """compressed-tensors' int32 packing (8 nibbles a word, lowest bits first, stored as q + 8) ->
    unsigned 4-bit values u = q + 8 in [0, 15], uint8, shape (out, in)."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # (out, in/8, 8)
    return nibbles.reshape(packed.shape[0], -1)[:, :in_features].to(torch.uint8)


def _inner_k_tiles(in_features: int) -> int:
    """The tinygemm layout's k-tiles per packed row: the largest of 8, 4, 2 with in % (16 x tiles) == 0."""
    for tiles in (8, 4, 2):
        if in_features % (16 * tiles) == 0:
            return tiles
    raise UserError(f"int4 kernel: input width {in_features} is not a multiple of 32")


_UNPACK_ORDERS: dict[tuple[int, str], torch.Tensor | None] = {}


def _convert_cuda(nibble_pairs: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """torch's CUDA int4pack layout from (out, in/2) uint8 (the even input channel in the high nibble)."""
    return torch.ops.aten._convert_weight_to_int4pack(nibble_pairs, inner_k_tiles)


def tinygemm_unpack_order(
    inner_k_tiles: int, device: torch.device, convert=_convert_cuda
) -> torch.Tensor | None:
    """Where each weight of a tile lands in torch's CUDA int4pack layout, found by packing probes.

    `_convert_weight_to_int4pack` lays out (out, in) as (out/8, in/(16 x tiles), 32, tiles/2) int32: one
    block of 8 output rows x 16*tiles input channels after another, the 8 x 16 x tiles nibbles of a
    block permuted for the tensor-core fragments. Packing three probe blocks whose nibbles are the three
    base-16 digits of each weight's index in the block reveals that permutation; returns, for each
    weight of a block (row-major), the position of its nibble in the block's words. None on the CPU
    (a different layout) or if the probe does not come back as a permutation."""
    key = (inner_k_tiles, str(device), convert)
    if key not in _UNPACK_ORDERS:
        order = None
        if torch.device(device).type == "cuda" or convert is not _convert_cuda:
            block = 8 * 16 * inner_k_tiles
            index = torch.arange(block, device=device, dtype=torch.int32).reshape(8, 16 * inner_k_tiles)
            position = torch.zeros(block, dtype=torch.int64, device=device)
            for digit in range(3):  # 16**3 > 8 x 16 x 8
                u = ((index >> (4 * digit)) & 0xF).to(torch.uint8)
                packed = convert((u[:, 0::2] << 4) | u[:, 1::2], inner_k_tiles)
                position += _nibbles(packed.reshape(-1)).reshape(-1).long() << (4 * digit)
            if torch.equal(position.sort().values, torch.arange(block, device=device)):
                order = position.argsort()  # order[i]: the nibble position of weight i
        _UNPACK_ORDERS[key] = order
    return _UNPACK_ORDERS[key]


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 words -> their 8 nibbles each, lowest bits first (..., 8)."""
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=torch.int32)
    return (words.unsqueeze(-1) >> shifts) & 0xF


def _tinygemm_to_unsigned(packed: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The tinygemm layout (out/8, in/(16 t), 32, t/2) back to the unsigned 4-bit values (out, in)."""
    row_tiles, col_tiles = packed.shape[0], packed.shape[1]
    block = order.numel()
    nibbles = _nibbles(packed.reshape(row_tiles, col_tiles, -1)).reshape(row_tiles, col_tiles, block)
    u = nibbles[..., order].reshape(row_tiles, col_tiles, 8, block // 8)
    return u.permute(0, 2, 1, 3).reshape(row_tiles * 8, col_tiles * block // 8)


def _dequantize_tinygemm(
    packed: torch.Tensor, scales_and_zeros: torch.Tensor, order: torch.Tensor, group_size: int
) -> torch.Tensor:
    """w = (u - 8) x scale + zero from the tinygemm layout and its (in/group, out, 2) scales and zeros."""
    u = _tinygemm_to_unsigned(packed, order)
    out_features = u.shape[0]
    scale = scales_and_zeros[..., 0].t().unsqueeze(-1)
    zero = scales_and_zeros[..., 1].t().unsqueeze(-1)
    w = (u.reshape(out_features, -1, group_size).to(scale.dtype) - 8) * scale + zero
    return w.reshape(out_features, -1)


@torch.compile(dynamic=False)
def _dequantize_tinygemm_compiled(packed, scales_and_zeros, order, group_size: int) -> torch.Tensor:
    return _dequantize_tinygemm(packed, scales_and_zeros, order, group_size)


@torch.compile(dynamic=False)
def _dequantize_compiled(nibbles: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    return _dequantize(nibbles, scale, group_size)


def _dequantize(nibbles: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in/2) uint8 (high nibble = even input channel) and (out, in/group) scales -> (out, in)."""
    out_features = nibbles.shape[0]
    u = torch.stack((nibbles >> 4, nibbles & 0xF), dim=-1).reshape(out_features, -1, group_size)
    w = (u.to(scale.dtype) - 8) * scale.unsqueeze(-1)
    return w.reshape(out_features, -1)


class Int4Linear(nn.Module):
    """A bias-free-or-not linear with symmetric int4 weights in groups of `group_size` input channels.
    Built by `from_compressed`; the packed weights are buffers (not trainable)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        kernel: Kernel,
        weight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        inner_k_tiles: int = 0,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.kernel, self.inner_k_tiles = group_size, kernel, inner_k_tiles
        # tinygemm: the kernel's packed layout + (in/group, out, 2) scales and zeros;
        # dequant: (out, in/2) uint8 nibbles + (out, in/group) scales.
        self.register_buffer("weight_int4", weight)
        self.register_buffer("scales", scales)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        # tinygemm on CUDA: how to read the weights back for many-row calls (tinygemm_unpack_order);
        # shared by the layers of one tile width, not a buffer (no state of its own).
        self.unpack_order: torch.Tensor | None = None

    @classmethod
    def from_compressed(
        cls,
        packed: torch.Tensor,
        scale: torch.Tensor,
        in_features: int,
        group_size: int,
        kernel: Kernel,
        dtype: torch.dtype,
        bias: torch.Tensor | None = None,
    ) -> Int4Linear:
        """From compressed-tensors' `weight_packed` (int32, (out, in/8)) and `weight_scale`
        ((out, in/group)), on their device; `dtype` is the compute dtype of the activations."""
        out_features = packed.shape[0]
        if scale.shape != (out_features, in_features // group_size) or in_features % group_size:
            raise UserError(
                f"int4 weights: scales {tuple(scale.shape)} do not match {out_features} x {in_features} "
                f"in groups of {group_size}"
            )
        u = unpack_int32(packed, in_features)
        scale = scale.to(dtype)
        if kernel == "dequant":
            nibbles = (u[:, 0::2] << 4) | u[:, 1::2]
            return cls(in_features, out_features, group_size, kernel, nibbles.contiguous(), scale, bias)
        tiles = _inner_k_tiles(in_features)
        order = None
        if u.device.type == "cuda":
            weight = _convert_cuda((u[:, 0::2] << 4) | u[:, 1::2], tiles)
            order = tinygemm_unpack_order(tiles, u.device)
            # Checked on every layer: the prefill path reads the weights back through this order.
            if order is not None and not torch.equal(_tinygemm_to_unsigned(weight, order).to(torch.uint8), u):
                order = None
        else:
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32), tiles)
        # (in/group, out, 2): scale and zero of one group side by side; zero = 0 (symmetric int4).
        scales_and_zeros = torch.stack((scale.t(), torch.zeros_like(scale.t())), dim=-1).contiguous()
        layer = cls(
            in_features, out_features, group_size, kernel, weight, scales_and_zeros, bias, inner_k_tiles=tiles
        )
        layer.unpack_order = order
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        """The (out, in) weight in the compute dtype (the `dequant` layout only)."""
        if self.kernel != "dequant":
            raise RuntimeError("dequantized_weight: only the dequant layout keeps plain nibbles")
        if self.weight_int4.is_cuda and not torch.compiler.is_compiling():
            return _dequantize_compiled(self.weight_int4, self.scales, self.group_size)
        return _dequantize(self.weight_int4, self.scales, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "dequant":
            return F.linear(x.to(self.scales.dtype), self.dequantized_weight(), self.bias)
        rows = x.reshape(-1, self.in_features).to(self.scales.dtype).contiguous()
        if rows.shape[0] > TINYGEMM_MAX_ROWS and self.unpack_order is not None:
            if torch.compiler.is_compiling():
                weight = _dequantize_tinygemm(
                    self.weight_int4, self.scales, self.unpack_order, self.group_size
                )
            else:
                weight = _dequantize_tinygemm_compiled(
                    self.weight_int4, self.scales, self.unpack_order, self.group_size
                )
            return F.linear(x.to(self.scales.dtype), weight, self.bias)
        if rows.is_cuda:
            out = torch.ops.aten._weight_int4pack_mm(rows, self.weight_int4, self.group_size, self.scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows, self.weight_int4, self.group_size, self.scales
            )
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out + self.bias if self.bias is not None else out

    def packed_bytes(self) -> int:
        return self.weight_int4.numel() * self.weight_int4.element_size()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, kernel={self.kernel}"


def _check_scheme(name: str, module: nn.Module) -> int:
    """The group size of a compressed-tensors W4A16 linear; a clear error for any other scheme."""
    scheme = getattr(module, "quantization_scheme", None)
    weights = getattr(scheme, "weights", None)
    if weights is None:
        raise UserError(f"{name}: packed weights without a quantization scheme")
    ok = (
        weights.num_bits == 4
        and str(weights.type).endswith("int")
        and weights.symmetric
        and str(weights.strategy).endswith("group")
        and weights.actorder is None
        and getattr(scheme, "input_activations", None) is None
        and not hasattr(module, "weight_g_idx")
    )
    if not ok:
        raise UserError(
            f"{name}: the int4 path runs symmetric int4 weights in groups with 16-bit activations (W4A16, "
            f"`make quantize`); this layer is {weights.num_bits}-bit {weights.type}, symmetric={weights.symmetric}, "
            f"strategy {weights.strategy}, actorder {weights.actorder}"
        )
    return int(weights.group_size)


def repack_compressed_linears(model: nn.Module, kernel: Kernel, dtype: torch.dtype) -> int:
    """Replace every compressed-tensors packed linear of `model` (loaded with dequantize=False) by an
    `Int4Linear` on the same device, one at a time; returns how many. Removes compressed-tensors'
    hook that would unpack the whole model on the first forward pass."""
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not hasattr(child, "weight_packed"):
                continue
            full_name = f"{name}.{child_name}" if name else child_name
            group_size = _check_scheme(full_name, child)
            in_features = int(child.weight_shape[1]) if hasattr(child, "weight_shape") else child.in_features
            layer = Int4Linear.from_compressed(
                child.weight_packed.data,
                child.weight_scale.data,
                in_features,
                group_size,
                kernel,
                dtype,
                bias=child.bias.data if getattr(child, "bias", None) is not None else None,
            )
            setattr(module, child_name, layer)
            del child
            count += 1
    hook = getattr(model, "ct_decompress_hook", None)
    if hook is not None:
        hook.remove()
        del model.ct_decompress_hook
    if count == 0:
        raise UserError(
            "no compressed-tensors packed linears found to repack (is this a `make quantize` folder?)"
        )
    return count


def int4_storage(model: nn.Module) -> dict[str, int]:
    """Bytes of the packed int4 weights and of their scales, and how many weights they hold."""
    packed = scales = weights = 0
    for module in model.modules():
        if isinstance(module, Int4Linear):
            packed += module.packed_bytes()
            scales += module.scales.numel() * module.scales.element_size()
            weights += module.in_features * module.out_features
    return {"packed_bytes": packed, "scale_bytes": scales, "weights": weights}


def load_int4_model(path, dtype: torch.dtype, kernel: Kernel, attn_implementation: str, device: str):
    """A compressed-tensors W4A16 folder loaded with its linears in 4 bits (see the module docstring)."""
    from transformers import CompressedTensorsConfig

    from pcbvlm.families import family_for

    with warnings.catch_warnings():
        # "the model you're loading already has a quantization_config": only `dequantize` is overridden.
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config`.*")
        model = (
            family_for(path)
            .model_class()
            .from_pretrained(
                path,
                dtype=dtype,
                attn_implementation=attn_implementation,
                device_map={"": 0} if device == "cuda" else None,
                quantization_config=CompressedTensorsConfig(dequantize=False),
            )
        )
    repack_compressed_linears(model, kernel, dtype)
    if device == "cuda":
        torch.cuda.empty_cache()
    return model


def random_compressed_linear(
    out_features: int, in_features: int, group_size: int, device, generator=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weights in compressed-tensors' packed form (int32 words, bf16 scales ~ 0.02/7), for the
    benchmark of the 32B shape: the same `Int4Linear.from_compressed` path as a real folder."""
    words = torch.randint(
        -(2**31),
        2**31 - 1,
        (out_features, math.ceil(in_features / 8)),
        dtype=torch.int32,
        device=device,
        generator=generator,
    )
    scale = torch.full(
        (out_features, in_features // group_size), 0.02 / 7, dtype=torch.bfloat16, device=device
    )
    return words, scale
