"""The quantized model (compressed-tensors W4A16 from `make quantize`) runs with its weights kept in 4 bits
(pcbvlm.int4) on the tiny model: the same logits as compressed-tensors' own dequantized model, 4 bits per
language-model weight in memory, the same answers; and prompt-lookup decoding gives plain greedy's answer."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Qwen3VLForConditionalGeneration

import test_quantize
from pcbvlm.generate import generate_batch, load_for_inference
from pcbvlm.int4 import Int4Linear, int4_storage, load_int4_model, unpack_int32
from pcbvlm.quantize import answer_agreement
from pcbvlm.samples import build_messages, load_samples
from test_quantize import LM_LINEAR

# The tiny model's `make merge` and `make quantize` outputs (test_quantize's fixtures, built once here).
cfg, merged, quantized = test_quantize.cfg, test_quantize.merged, test_quantize.quantized


def _inputs(model_dir, samples):
    from pcbvlm.collator import TrainCollator
    from pcbvlm.processing import load_processor

    batch = TrainCollator(load_processor(model_dir))(samples)
    return {k: v for k, v in batch.items() if k != "labels"}, batch["attention_mask"].bool()


@pytest.fixture(scope="module")
def reference(quantized):
    """compressed-tensors' own reading of the folder: every int4 weight dequantized to fp32."""
    return Qwen3VLForConditionalGeneration.from_pretrained(quantized, dtype=torch.float32).eval()


@pytest.mark.parametrize("kernel", ["tinygemm", "dequant", "triton"])
def test_repacked_logits_equal_compressed_tensors_dequantized(kernel, quantized, reference, tiny_data_dir):
    samples = load_samples(tiny_data_dir, "val")[:2]
    inputs, mask = _inputs(quantized, samples)
    model = load_int4_model(quantized, torch.float32, kernel, "sdpa", "cpu").eval()
    with torch.no_grad():
        expected = reference(**inputs).logits[mask]
        got = model(**inputs).logits[mask]
    # The same numbers (u - 8) * scale as compressed-tensors' q * scale: fp32 rounding only. A wrong
    # nibble order, offset or scale layout moves the logits by ~the quantization error (~0.1 here).
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().max() > 0.1


def test_loaded_quantized_model_holds_four_bits_per_weight(cfg, quantized):
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.eval.batch_size = 1
    loaded = load_for_inference(run_cfg, str(quantized))
    model = loaded.model
    assert loaded.kind == "quantized"
    int4 = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert len(int4) == 2 * 7 and all(LM_LINEAR.match(n) for n in int4)
    assert {m.kernel for m in int4.values()} == {"tinygemm"}  # eval.int4_kernel's default
    # No unpacked copy anywhere: no float weight in the language model's linears, no hook that would
    # decompress on the first forward, and the vision tower and lm_head untouched (float weights).
    assert not hasattr(model, "ct_decompress_hook")
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert "lm_head" in plain and all(".visual." in f".{n}" or n == "lm_head" for n in plain)
    storage = int4_storage(model)
    assert storage["packed_bytes"] * 8 == storage["weights"] * 4  # exactly 4 bits per weight
    linear_bytes = sum(
        t.numel() * t.element_size() for m in int4.values() for t in [*m.buffers(), *m.parameters()]
    )
    assert linear_bytes == storage["packed_bytes"] + storage["scale_bytes"]
    # Per group of 32 weights, tinygemm keeps a scale and a (zero) offset, fp32 here: 2 x 32 bits / 32 =
    # 2 bits per weight, 6 in all (bf16 in groups of 128 on the GPU: 4.25 bits).
    assert linear_bytes * 8 / storage["weights"] == pytest.approx(4 + 2 * 32 / 32)

    dequant_cfg = cfg.model_copy(deep=True)
    dequant_cfg.eval.int4_kernel = "dequant"
    batched = load_for_inference(dequant_cfg, str(quantized)).model
    assert {m.kernel for m in batched.modules() if isinstance(m, Int4Linear)} == {"dequant"}
    assert int4_storage(batched)["packed_bytes"] == storage["packed_bytes"]
    assert int4_storage(batched)["scale_bytes"] * 2 == storage["scale_bytes"]  # no zero offsets


def test_unpack_reads_compressed_tensors_packing():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    assert torch.equal(unpack_int32(pack_to_int32(q, 4), 64).to(torch.int16) - 8, q.to(torch.int16))


def test_answers_agree_with_the_reference_and_the_merged_model(
    cfg, quantized, merged, reference, tiny_data_dir
):
    """Greedy answers of the int4 path, parsed into boxes: identical to compressed-tensors' dequantized
    model, and compared with the merged fp32 model (the figures the report quotes)."""
    samples = load_samples(tiny_data_dir, "val")[:2]
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.eval.batch_size = 1
    answers = {}
    for name, ref in (("int4", quantized), ("merged", merged)):
        loaded = load_for_inference(run_cfg, str(ref))
        answers[name] = [
            generate_batch(loaded, [build_messages(s, cfg.data, with_answer=False)], 24)[0][0]
            for s in samples
        ]
    loaded.model = reference  # the same processor; compressed-tensors' model
    answers["reference"] = [
        generate_batch(loaded, [build_messages(s, cfg.data, with_answer=False)], 24)[0][0] for s in samples
    ]
    assert answers["int4"] == answers["reference"]
    agreement = answer_agreement(samples, answers["merged"], answers["int4"])
    print({k: v for k, v in agreement.items() if k != "per_sample"})
    assert agreement["samples"] == len(samples)


def test_prompt_lookup_gives_the_plain_greedy_answer(cfg, quantized, tiny_data_dir):
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.eval.batch_size = 1
    loaded = load_for_inference(run_cfg, str(quantized))
    calls = []
    loaded.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    saved = []
    for sample in load_samples(tiny_data_dir, "val")[:2]:
        messages = [build_messages(sample, cfg.data, with_answer=False)]
        calls.clear()
        plain = generate_batch(loaded, messages, 48, min_new_tokens=48, prompt_lookup_tokens=0)[0]
        plain_steps = len(calls)
        calls.clear()
        drafted = generate_batch(loaded, messages, 48, min_new_tokens=48, prompt_lookup_tokens=8)[0]
        assert drafted[0] == plain[0]
        assert drafted[1] == plain[1]
        torch.testing.assert_close(drafted[2], plain[2], rtol=1e-5, atol=1e-6)
        print(f"forward passes: plain {plain_steps}, prompt lookup {len(calls)}")
        saved.append(plain_steps - len(calls))
    assert max(saved) > 0  # drafts were accepted: the check above compared two different decodings


def test_preflight_eval_estimate_counts_the_packed_model(cfg):
    """`make preflight JOB=eval` with a quantized model: its packed size, not the bf16 size (~67 GB)."""
    from pcbvlm.preflight.estimate import GIB, estimate_eval_vram
    from pcbvlm.shapes import qwen3_vl_32b_config

    shape = qwen3_vl_32b_config()
    one = cfg.model_copy(deep=True)
    one.eval.batch_size, one.eval.max_new_tokens = 1, 512
    computed = estimate_eval_vram(shape, one)
    weights = sum(i.bytes for i in computed.items if "W4A16" in i.name or "unquantized" in i.note)
    assert 18 * GIB < weights < 21 * GIB  # 32.0 B linears x 4.125 bit + 1.3 B bf16
    assert computed.total_bytes < 25 * GIB  # the batch-1 goal on the target card
    stored = estimate_eval_vram(shape, one, packed_bytes=30 * GIB)
    assert stored.items[0].bytes == 30 * GIB
    assert stored.total_bytes == pytest.approx(computed.total_bytes - weights + 30 * GIB)
    names = [i.name for i in stored.items]
    assert "one linear read back to bf16" in names and "int4 kernel zero offsets (bf16)" in names
    one.eval.int4_kernel = "dequant"  # plain nibbles: no zero offsets
    names = [i.name for i in estimate_eval_vram(shape, one, packed_bytes=30 * GIB).items]
    assert "one linear read back to bf16" in names and "int4 kernel zero offsets (bf16)" not in names


def test_weights_read_back_from_a_tile_permuted_layout():
    """The prefill path reads tinygemm-packed weights back (CUDA only: torch's layout permutes the nibbles
    of each 8-row x 16*tiles-column block). The probe that finds the permutation and the read-back are
    checked here against a layout of the same shape with a known, arbitrary permutation."""
    from pcbvlm.int4 import _dequantize_tinygemm, _nibbles, _tinygemm_to_unsigned, tinygemm_unpack_order

    tiles = 4
    block = 8 * 16 * tiles
    permutation = torch.randperm(block, generator=torch.Generator().manual_seed(0))

    def convert(pairs: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
        u = torch.stack((pairs >> 4, pairs & 0xF), dim=-1).reshape(pairs.shape[0], -1).to(torch.int32)
        rows, cols = u.shape
        blocks = u.reshape(rows // 8, 8, cols // (16 * inner_k_tiles), 16 * inner_k_tiles).permute(0, 2, 1, 3)
        nibbles = blocks.reshape(rows // 8, cols // (16 * inner_k_tiles), block)[..., permutation]
        words = (nibbles.reshape(-1, 8) << torch.arange(0, 32, 4, dtype=torch.int32)).sum(
            -1, dtype=torch.int32
        )
        return words.reshape(rows // 8, cols // (16 * inner_k_tiles), 32, inner_k_tiles // 2)

    order = tinygemm_unpack_order(tiles, torch.device("cpu"), convert=convert)
    assert order is not None
    u = torch.randint(0, 16, (24, 192), dtype=torch.uint8)
    packed = convert((u[:, 0::2] << 4) | u[:, 1::2], tiles)
    assert torch.equal(_tinygemm_to_unsigned(packed, order).to(torch.uint8), u)
    assert _nibbles(packed).shape[-1] == 8
    scale = torch.rand(192 // 32, 24)
    scales_and_zeros = torch.stack((scale, torch.zeros_like(scale)), dim=-1)
    w = _dequantize_tinygemm(packed, scales_and_zeros, order, 32)
    expected = (u.float() - 8) * scale.t().repeat_interleave(32, dim=1)
    torch.testing.assert_close(w, expected)


@pytest.mark.parametrize("kernel", ["tinygemm", "triton"])
def test_graph_decoder_gives_the_same_predictions_on_the_quantized_model(
    kernel, cfg, quantized, tiny_data_dir
):
    """eval.decoder: graph (pcbvlm.graphdecode, with and without drafts) on the int4 model: the same text,
    parsed boxes and box scores as transformers' generate. On a CPU the triton layout runs its dequant
    fallback (the kernel's error on the GPU is in the benchmark's `kernel_floor`)."""
    from pcbvlm.generate import to_prediction

    samples = load_samples(tiny_data_dir, "val")[:2]
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.eval.int4_kernel = kernel
    run_cfg.eval.decoder = "graph"
    loaded = load_for_inference(run_cfg, str(quantized))
    assert {m.kernel for m in loaded.model.modules() if isinstance(m, Int4Linear)} == {kernel}
    messages = [build_messages(s, cfg.data, with_answer=False) for s in samples]
    plain = generate_batch(loaded, messages, 48, decoder="generate")
    graph = generate_batch(loaded, messages, 48)  # the configured decoder
    assert loaded.graph_decoder is not None
    drafted = [generate_batch(loaded, [m], 48, draft_tokens=6)[0] for m in messages]

    def prediction(sample, answer):
        return to_prediction(*answer, str(sample["id"]), int(sample["width"]), int(sample["height"]))

    for sample, want, *others in zip(samples, plain, graph, drafted, strict=True):
        expected = prediction(sample, want)
        for answer in others:
            got = prediction(sample, answer)
            assert got["raw"] == expected["raw"]
            assert [o["bbox"] for o in got["objects"]] == [o["bbox"] for o in expected["objects"]]
            assert [o["label"] for o in got["objects"]] == [o["label"] for o in expected["objects"]]
            torch.testing.assert_close(
                [o["score"] for o in got["objects"]], [o["score"] for o in expected["objects"]]
            )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 5, 16, 40, 128, 300])
def test_triton_int4_matmul_equals_the_dequantized_matmul(rows):
    """`eval.int4_kernel: triton` on a GPU: the fused kernel (split-K and not) against the dequantized
    weight's bf16 matmul; above 256 rows the layer takes the dequant path."""
    from pcbvlm import int4_triton
    from pcbvlm.int4 import TRITON_MAX_ROWS

    torch.manual_seed(0)
    for out_features, in_features in ((1024, 5120), (5120, 25600), (384, 256)):
        words = torch.randint(-(2**31), 2**31 - 1, (out_features, in_features // 8), dtype=torch.int32)
        scale = torch.rand(out_features, in_features // 128) * 0.01
        layer = Int4Linear.from_compressed(
            words.cuda(), scale.cuda(), in_features, 128, "triton", torch.bfloat16
        )
        x = torch.randn(rows, in_features, dtype=torch.bfloat16, device="cuda")
        expected = x.float() @ layer.dequantized_weight().float().t()
        got = layer(x).float()
        assert ((got - expected).norm() / expected.norm()).item() < 1e-2
        if rows <= TRITON_MAX_ROWS:
            direct = int4_triton.w4a16_matmul(x, layer.weight_int4, layer.scales, 128)
            torch.testing.assert_close(direct.float(), got)
