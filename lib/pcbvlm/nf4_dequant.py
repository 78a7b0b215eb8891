"""NF4 dequantization of bitsandbytes' 4-bit weights in one Triton kernel (`train.fast_dequant`, issue 20).

Why: every QLoRA product dequantizes its NF4 weight to bf16 first (in the forward, and again for the input
gradient). bitsandbytes 0.50.2 does it in three launches for a double-quantized weight (the 8-bit absmax
back to fp32, the offset add, then the nibbles) at ~1.8 TB/s on the H200: 42.7 ms per pass over the 32B's
language model, 0.324 s of a 3.0 s step at micro-batch 4 x 4, which dequantizes every weight 8 times
(profiled, BENCHMARKS.md). Unsloth's kernel does it in one launch (23.6 ms per pass in its profiled step).

This kernel: one launch; each program reads a tile of packed bytes, decodes its blocks' nested absmax and
writes both nibbles of every byte. The values are bitsandbytes': absmax = code2[q] * absmax2[block // 256]
+ offset (two fp32 roundings: no fused multiply-add), out = dtype(nf4[nibble] * absmax), high nibble first.

`install()` routes two bitsandbytes entry points through it for NF4 weights on a GPU: the CUDA `gemm_4bit`
fallback (dequantize, then a plain linear: every product with more than 1536 rows) and
`bitsandbytes.functional.dequantize_4bit` (the 4-bit matmul's backward). Anything else (FP4, other storage
types, an `out=` buffer, the CPU) goes to bitsandbytes unchanged. `uninstall()` undoes it. The kernel is a
custom op (`pcbvlm::dequantize_nf4`), so compiled layers (`train.compile_layers`) call it as one opaque op.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:  # triton ships with CUDA builds of torch; the CPU lock has none (nothing is installed there)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BYTES_PER_PROGRAM = 1024

if triton is not None:

    @triton.jit
    def _nf4_dequant_kernel(
        packed_ptr,  # uint8: element 2i in the high nibble of byte i, 2i + 1 in the low one
        absmax_ptr,  # one per block: uint8 (nested: an index into code2) or fp32
        code2_ptr,  # fp32 [256] (nested only)
        absmax2_ptr,  # fp32, one per BLOCKSIZE2 blocks (nested only)
        offset_ptr,  # fp32 [1] (nested only)
        table_ptr,  # fp32 [16]: the NF4 values
        out_ptr,
        n_elements,
        n_bytes,
        BYTES: tl.constexpr,
        HALF: tl.constexpr,  # packed bytes per block (blocksize // 2)
        BLOCKSIZE2: tl.constexpr,
        NESTED: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        offsets = pid * BYTES + tl.arange(0, BYTES)
        mask = offsets < n_bytes
        byte = tl.load(packed_ptr + offsets, mask=mask, other=0).to(tl.int32)
        block = offsets // HALF
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * tl.load(
                absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0
            )
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        high = tl.load(table_ptr + (byte >> 4)) * scale
        low = tl.load(table_ptr + (byte & 15)) * scale
        values = tl.interleave(high, low)
        out_offsets = 2 * pid * BYTES + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + out_offsets, values.to(out_ptr.dtype.element_ty), mask=out_offsets < n_elements)


_TABLES: dict[torch.device, torch.Tensor] = {}


def _nf4_table(device: torch.device) -> torch.Tensor:
    if device not in _TABLES:
        from bitsandbytes.functional import get_4bit_type

        _TABLES[device] = get_4bit_type("nf4", device=device).to(torch.float32).contiguous()
    return _TABLES[device]


@torch.library.custom_op("pcbvlm::dequantize_nf4", mutates_args=())
def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code2: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    blocksize2: int,
    shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The NF4 weight `packed` (uint8) as a `shape` tensor of `dtype`; nested absmax when `code2` is given."""
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n_elements = out.numel()
    n_bytes = (n_elements + 1) // 2
    nested = code2 is not None
    unused = absmax  # the nested inputs' slots when there are none (never read: NESTED is a constant)
    # Triton launches on the current device: make it the weight's
    with torch.cuda.device(packed.device) if packed.is_cuda else contextlib.nullcontext():
        _nf4_dequant_kernel[(triton.cdiv(n_bytes, BYTES_PER_PROGRAM),)](
            packed.reshape(-1),
            absmax.reshape(-1),
            code2 if nested else unused,
            absmax2.reshape(-1) if nested else unused,
            offset.reshape(-1).to(torch.float32) if nested else unused,
            _nf4_table(packed.device),
            out,
            n_elements,
            n_bytes,
            BYTES=BYTES_PER_PROGRAM,
            HALF=blocksize // 2,
            BLOCKSIZE2=blocksize2,
            NESTED=nested,
            enable_fp_fusion=False,  # bitsandbytes rounds the product and the offset add separately
        )
    return out


@dequantize_nf4.register_fake
def _(packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


def dequantize_state(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' `dequantize_4bit(packed, state)` through the kernel (an NF4 `QuantState`)."""
    nested = state.state2 if state.nested else None
    return dequantize_nf4(
        packed,
        state.absmax,
        nested.code if nested else None,
        nested.absmax if nested else None,
        state.offset if nested else None,
        state.blocksize,
        nested.blocksize if nested else 0,
        list(state.shape),
        state.dtype,
    )


def _handles(packed: torch.Tensor, quant_type: str, dtype: torch.dtype) -> bool:
    return (
        triton is not None
        and (packed.is_cuda or _interpreted())
        and quant_type == "nf4"
        and packed.dtype == torch.uint8
        and dtype in (torch.bfloat16, torch.float16, torch.float32)
    )


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"  # the CPU tests run the kernel in Triton's interpreter


_ORIGINALS: dict[str, object] = {}


def _dequantize_4bit(A, quant_state=None, absmax=None, out=None, blocksize=None, quant_type="fp4"):
    if (
        quant_state is not None
        and out is None
        and absmax is None
        and A.shape[0] != 1  # a weight packed transposed: bitsandbytes returns its transpose
        and _handles(A, quant_state.quant_type, quant_state.dtype)
        and (not quant_state.nested or quant_state.state2.blocksize == 256)
    ):
        return dequantize_state(A, quant_state)
    return _ORIGINALS["dequantize_4bit"](A, quant_state, absmax, out, blocksize, quant_type)


def _dequant_linear_fallback(
    A,
    B,
    shapeB,
    absmax,
    blocksize,
    quant_type,
    bias=None,
    absmax_8bit=None,
    absmax_code=None,
    absmax_offset=None,
):
    if _handles(B, quant_type, A.dtype):
        if absmax_8bit is not None:  # nested: `absmax` is the second level's
            weight = dequantize_nf4(
                B, absmax_8bit, absmax_code, absmax, absmax_offset, blocksize, 256, list(shapeB), A.dtype
            )
        else:
            weight = dequantize_nf4(B, absmax, None, None, None, blocksize, 0, list(shapeB), A.dtype)
        return torch.nn.functional.linear(A, weight, bias)
    return _ORIGINALS["_dequant_linear_fallback"](
        A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset
    )


def _cuda_ops():
    """bitsandbytes' CUDA backend module, where its `gemm_4bit` fallback lives (it needs a CUDA build of
    torch; None elsewhere, or in a bitsandbytes without that fallback: then only the backward's
    dequantization is routed)."""
    if not torch.cuda.is_available():
        return None
    from bitsandbytes.backends.cuda import ops

    return ops if hasattr(ops, "_dequant_linear_fallback") else None


def install() -> bool:
    """Route bitsandbytes' NF4 dequantization through the kernel (see the module docstring); a second
    call changes nothing. Returns whether it is installed (False without triton)."""
    if triton is None:
        return False
    import bitsandbytes.functional as bnb_functional

    if bnb_functional.dequantize_4bit is not _dequantize_4bit:
        _ORIGINALS["dequantize_4bit"] = bnb_functional.dequantize_4bit
        bnb_functional.dequantize_4bit = _dequantize_4bit
    cuda_ops = _cuda_ops()
    if cuda_ops is not None and cuda_ops._dequant_linear_fallback is not _dequant_linear_fallback:
        _ORIGINALS["_dequant_linear_fallback"] = cuda_ops._dequant_linear_fallback
        cuda_ops._dequant_linear_fallback = _dequant_linear_fallback
    return True


def uninstall() -> None:
    """Back to bitsandbytes' own functions (not counted: one call undoes any number of installs)."""
    import bitsandbytes.functional as bnb_functional

    if "dequantize_4bit" in _ORIGINALS:
        bnb_functional.dequantize_4bit = _ORIGINALS.pop("dequantize_4bit")
    if "_dequant_linear_fallback" in _ORIGINALS:
        _cuda_ops()._dequant_linear_fallback = _ORIGINALS.pop("_dequant_linear_fallback")


def installed() -> bool:
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit is _dequantize_4bit
