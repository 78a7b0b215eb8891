"""A fused W4A16 matmul (Triton): y = x @ dequant(w).T, reading each 4-bit weight once per block of rows.

Why: torch's int4 kernel (tinygemm) re-reads the weight for every 16 rows, so batched decoding reads the
weights back to bf16 per layer and step (16 GB read, 64 GB written and read again at the 32B). This
kernel unpacks the nibbles in registers, inside the matmul's K loop. torchao's int4 layouts are
tinygemm's or need fbgemm-gpu-genai / Marlin builds for this torch. GemLite 0.6 (pure Triton, the int4
kernels of torchao's and SGLang's gemlite integrations) was measured in this layer on the H200
(BENCHMARKS.md, 2026-11-30): no faster than tinygemm at 1 row, 2.7x slower at 4 rows, 21% faster at 128,
but 1-3% relative error (its split-K sums are bf16 atomic adds) and 5 min of autotuning for the 32B's
five shapes; so this small kernel stays.

Layout (`Int4Linear` kernel "triton", the same bytes as "dequant"): `nibbles` (out, in/2) uint8 with the
even input channel in the high nibble, u in [0, 15] for q = u - 8; `scales` (out, in/group) in the
compute dtype; w = (u - 8) x scale. Split-K (fp32 atomic adds) keeps the GPU busy when the output is
narrow (k/v projections, 1024 wide) or the rows are few.
"""

from __future__ import annotations

import torch

try:  # triton ships with CUDA builds of torch; the CPU lock has none (callers fall back to dequant)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def available(x: torch.Tensor, group: int) -> bool:
    """Whether the kernel runs here: CUDA, triton installed, groups of a power of two >= 16 channels."""
    return triton is not None and x.is_cuda and group >= 16 and group & (group - 1) == 0


if triton is not None:

    @triton.jit
    def _w4a16_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_ym,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        rb = tl.arange(0, BLOCK_K // 2)
        mask_m = rm < M
        mask_n = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_per_split = K // SPLIT_K
        k_begin = pid_k * k_per_split
        for step in range(0, k_per_split, BLOCK_K):
            k0 = k_begin + step
            x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=mask_m[:, None], other=0.0)
            # (BLOCK_N, BLOCK_K / 2) contiguous bytes of the weight rows; the high nibble is the even channel
            b = tl.load(
                w_ptr + rn[:, None] * (K // 2) + (k0 // 2 + rb)[None, :], mask=mask_n[:, None], other=0
            )
            b = b.to(tl.int32)
            u = tl.join(b >> 4, b & 0xF).reshape(BLOCK_N, BLOCK_K)
            scale = tl.load(s_ptr + rn * (K // GROUP) + k0 // GROUP, mask=mask_n, other=0.0)
            w = ((u - 8).to(tl.float32) * scale[:, None].to(tl.float32)).to(x.dtype)
            acc += tl.dot(x, tl.trans(w))
        y = y_ptr + rm[:, None] * stride_ym + rn[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(y, acc, mask=mask)


def _config(m: int, n: int, k: int, group: int, sms: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, warps, stages): enough programs for every SM, splitting K when
    the output tiles are too few."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    block_n = 64 if m <= 64 else 128
    block_k = min(128 if m <= 64 else 64, group)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = 1
    while tiles * split < 2 * sms and k % (block_k * split * 2) == 0 and k // (split * 2) >= 4 * block_k:
        split *= 2
    warps = 4 if block_m <= 32 else 8
    return block_m, block_n, block_k, split, warps, 3 if m <= 64 else 4


_SMS: dict[int, int] = {}


def w4a16_matmul(x: torch.Tensor, nibbles: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """(rows, in) x the (out, in/2) nibbles and (out, in/group) scales -> (rows, out) in x's dtype."""
    m, k = x.shape
    n = nibbles.shape[0]
    if k % group or group % 16:
        raise ValueError(f"w4a16_matmul: input width {k} and group {group} must be multiples of 16")
    x = x.contiguous()
    device = (x.device.index or 0) if x.is_cuda else -1
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count if x.is_cuda else 4
    block_m, block_n, block_k, split, warps, stages = _config(m, n, k, group, _SMS[device])
    if split == 1:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
    _w4a16_kernel[grid](
        x,
        nibbles,
        scales,
        y,
        m,
        n,
        k,
        x.stride(0),
        y.stride(0),
        GROUP=group,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split,
        num_warps=warps,
        num_stages=stages,
    )
    return y if split == 1 else y.to(x.dtype)
