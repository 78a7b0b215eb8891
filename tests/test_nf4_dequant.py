"""`train.fast_dequant` (pcbvlm.nf4_dequant): the one-launch NF4 dequantization gives bitsandbytes' values,
and once installed bitsandbytes' dequantization and 4-bit products go through it.

Runs on a GPU, or on a CPU in Triton's interpreter (`TRITON_INTERPRET=1`, with triton installed); the
CPU lock has no triton, so CI skips it."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "on a CPU the kernel runs in Triton's interpreter: TRITON_INTERPRET=1", allow_module_level=True
    )

import bitsandbytes.functional as bnb_functional  # noqa: E402

from pcbvlm import nf4_dequant  # noqa: E402

# Triton's interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even (as torch does): on a
# CPU the bf16 values may differ in their last bit
EXACT = {"rtol": 0, "atol": 0}


def _same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    exact = DEVICE == "cuda" or ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, **(EXACT if exact else {}))


def _reference(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' arithmetic, written out: nested absmax in two fp32 roundings, nibble value x absmax."""
    if state.nested:
        absmax = (
            state.state2.code[state.absmax.long()]
            * state.state2.absmax.repeat_interleave(state.state2.blocksize)[: state.absmax.numel()]
        )
        absmax = absmax + state.offset
    else:
        absmax = state.absmax
    table = bnb_functional.get_4bit_type("nf4", device=packed.device).float()
    byte = packed.reshape(-1).long()
    nibbles = torch.stack((byte >> 4, byte & 15), dim=-1).reshape(-1)[: state.shape.numel()]
    values = table[nibbles] * absmax.repeat_interleave(state.blocksize)[: nibbles.numel()]
    return values.to(dtype).reshape(state.shape)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(96, 64), (40, 75)])  # 75 columns: an odd count, a partial last block
def test_kernel_gives_bitsandbytes_values(nested, shape):
    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=torch.float32, device=DEVICE) * 0.05
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=nested, quant_type="nf4"
    )
    for dtype in (torch.bfloat16, torch.float32):
        state.dtype = dtype
        ours = nf4_dequant.dequantize_state(packed, state)
        assert ours.shape == weight.shape and ours.dtype == dtype
        _same(ours, _reference(packed, state, dtype))
        _same(ours, bnb_functional.dequantize_4bit(packed, state))
    assert (weight - ours.float()).abs().max() < 0.05  # and it is the weight, to 4-bit precision


def test_install_routes_bitsandbytes_through_the_kernel(monkeypatch):
    torch.manual_seed(1)
    weight = torch.randn(64, 128, device=DEVICE) * 0.05
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    state.dtype = torch.bfloat16
    calls = []
    original = nf4_dequant.dequantize_state
    monkeypatch.setattr(nf4_dequant, "dequantize_state", lambda *a, **k: calls.append(1) or original(*a, **k))
    original_dequantize = bnb_functional.dequantize_4bit
    assert nf4_dequant.install() and nf4_dequant.install()  # a second install changes nothing
    try:
        assert nf4_dequant.installed()
        routed = bnb_functional.dequantize_4bit(packed, state)
        assert calls == [1]
        # a weight packed transposed (one row) comes back transposed, from bitsandbytes
        assert bnb_functional.dequantize_4bit(packed.t(), state).shape == (128, 64)
        assert calls == [1]
        # FP4 and an `out=` buffer stay with bitsandbytes
        fp4, fp4_state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="fp4")
        bnb_functional.dequantize_4bit(fp4, fp4_state)
        assert calls == [1]
    finally:
        nf4_dequant.uninstall()
    assert not nf4_dequant.installed() and bnb_functional.dequantize_4bit is original_dequantize
    _same(routed, _reference(packed, state, torch.bfloat16))


@pytest.mark.skipif(DEVICE != "cuda", reason="bitsandbytes' 4-bit linear layers run on a GPU")
def test_qlora_product_and_gradient_are_unchanged():
    """A 4-bit linear's output (more than 1536 rows: the dequantize-then-linear path) and input gradient
    (the backward's dequantization) are the same with the kernel installed."""
    import bitsandbytes as bnb

    torch.manual_seed(2)
    layer = bnb.nn.Linear4bit(512, 256, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(256, 512) * 0.05, requires_grad=False, quant_type="nf4")
    layer = layer.cuda()
    x = torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def run():
        x.grad = None
        out = layer(x)
        out.float().square().sum().backward()
        return out.detach(), x.grad.detach()

    plain = run()
    assert nf4_dequant.install()
    try:
        fast = run()
    finally:
        nf4_dequant.uninstall()
    torch.testing.assert_close(fast[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(fast[1], plain[1], rtol=0, atol=0)
