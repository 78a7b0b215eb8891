"""The numbers the merge (and quantize) verification decides on, on hand-made tensors: a wrong figure
here publishes a broken merge or refuses a good one (the end-to-end merges: tests/test_merge.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from pcbvlm.config import load_config
from pcbvlm.merge import merge_dtype
from pcbvlm.model_folder import attended_logits, compare_logits, model_inputs


def test_compare_logits_figures():
    reference = torch.tensor([[1.0, -4.0, 2.0], [0.5, 0.0, 3.0]])
    other = torch.tensor([[1.5, -4.0, 2.0], [0.5, 1.0, 2.0]])
    # |diff| = [[0.5, 0, 0], [0, 1, 1]]; top-1: row 0 index 2 vs 2, row 1 index 2 vs 2 (2.0 > 1.0 > 0.5).
    got = compare_logits(reference, other)
    assert got["max_abs_diff"] == 1.0
    assert got["mean_abs_diff"] == pytest.approx(2.5 / 6)
    assert got["logit_scale"] == 4.0  # the largest |logit|, a negative one here
    assert got["rel_max_diff"] == 0.25
    rms_diff, rms_ref = math.sqrt(2.25 / 6), math.sqrt((1 + 16 + 4 + 0.25 + 0 + 9) / 6)
    assert got["rel_rms_diff"] == pytest.approx(rms_diff / rms_ref)
    assert got["top1_agreement"] == 1.0
    # Row 1's top-1 moves (index 2 -> 1): half the positions agree.
    assert (
        compare_logits(reference, torch.tensor([[1.0, -4.0, 2.0], [0.5, 9.0, 3.0]]))["top1_agreement"] == 0.5
    )
    assert set(got) == {
        "max_abs_diff",
        "mean_abs_diff",
        "logit_scale",
        "rel_max_diff",
        "rel_rms_diff",
        "top1_agreement",
    }


def test_compare_logits_with_small_logits():
    # A logit scale below 1 is still a scale: 0.1 / 0.5 = 0.2.
    got = compare_logits(torch.tensor([[0.5, -0.25]]), torch.tensor([[0.4, -0.25]]))
    assert got["rel_max_diff"] == pytest.approx(0.2)


def test_compare_logits_of_all_zero_reference_is_infinitely_far():
    zeros = torch.zeros(2, 3)
    assert compare_logits(zeros, zeros + 1)["rel_max_diff"] == math.inf


class _Model:
    """Returns logits = input_ids (as floats) repeated over a vocab of 2, and records its inputs."""

    def __call__(self, **inputs):
        self.inputs = inputs
        ids = inputs["input_ids"].to(torch.bfloat16)
        return SimpleNamespace(logits=torch.stack([ids, -ids], dim=-1))


def test_attended_logits_keeps_attended_positions_in_fp32():
    batch = {
        "input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "labels": torch.tensor([[-100, 2, 3], [-100, 5, -100]]),
        "pixel_values": torch.ones(2, 4, dtype=torch.float32),
    }
    model = _Model()
    logits = attended_logits(model, batch, "cpu", torch.bfloat16)
    assert logits.dtype == torch.float32 and logits.device.type == "cpu"
    assert logits.tolist() == [[1, -1], [2, -2], [3, -3], [4, -4], [5, -5]]
    assert "labels" not in model.inputs
    assert model.inputs["pixel_values"].dtype == torch.bfloat16
    assert model.inputs["input_ids"].dtype == torch.long  # only the pixels take the model's dtype


def test_model_inputs_moves_everything_but_labels():
    batch = {"input_ids": torch.tensor([[1]]), "labels": torch.tensor([[1]])}
    assert set(model_inputs(batch, "cpu", torch.float16)) == {"input_ids"}


@pytest.mark.parametrize(
    ("precision", "device", "bf16_ok", "expected"),
    [
        ("auto", "cpu", True, torch.bfloat16),  # bf16 even on the CPU: fp32 would double the RAM
        ("auto", "cuda", True, torch.bfloat16),
        ("auto", "cuda", False, torch.float16),  # a GPU without bf16 (V100, T4)
        ("auto", "cpu", False, torch.bfloat16),  # the GPU's bf16 support says nothing about the CPU
        ("bf16", "cuda", False, torch.bfloat16),
        ("fp16", "cpu", True, torch.float16),
        ("fp32", "cuda", True, torch.float32),
    ],
)
def test_merge_dtype(precision, device, bf16_ok, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    cfg = load_config(None, [f"train.precision={precision}"])
    assert merge_dtype(cfg, device) == expected
