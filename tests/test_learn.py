"""The learning run's fast paths must compute exactly what the project's slow, tested paths compute:
patches and batches like the processor and TrainCollator, vision attention like transformers'."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcbvlm.collator import TrainCollator
from pcbvlm.config import load_config
from pcbvlm.deeppcb import convert
from pcbvlm.learn import (
    BatchBuilder,
    FreshBoards,
    LearnSettings,
    batch_vision_attention,
    build_learn_model,
    collate_boards,
    learn_config,
    lr_at,
    patchify,
)
from pcbvlm.synth import Board, generate_dataset

BOARD = Board(192, 128, scale=0.8, max_defects=2, order="reading")


@pytest.fixture(scope="module")
def micro():
    return build_learn_model("micro", BOARD, seed=0)


def test_patchify_equals_the_processor(micro):
    _, processor = micro
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (2, BOARD.height, BOARD.width), dtype=np.uint8)
    from PIL import Image

    expected = processor.image_processor(
        images=[Image.fromarray(g).convert("RGB") for g in gray], return_tensors="pt"
    )
    got = patchify(torch.from_numpy(gray))
    assert got.shape == expected["pixel_values"].shape
    torch.testing.assert_close(got, expected["pixel_values"].float(), atol=1e-5, rtol=0)


def test_batches_equal_train_collator(micro, tmp_path):
    """The learning run's batch of a dataset's boards == TrainCollator's batch of the same samples."""
    _, processor = micro
    cfg = learn_config(load_config("config/tiny.yaml"))
    generate_dataset(tmp_path / "synth", 3, seed=5, board=BOARD)
    samples = [s for rows in convert(tmp_path / "synth", cfg.data).samples.values() for s in rows]
    from pcbvlm.deeppcb import build_messages

    rows = [{"messages": build_messages(s, cfg.data)} for s in samples]
    expected = TrainCollator(processor)(rows)

    from PIL import Image

    pixels = torch.stack(
        [
            torch.stack(
                [torch.from_numpy(np.asarray(Image.open(s[k]).convert("L"))) for k in ("template", "image")]
            )
            for s in samples
        ]
    )
    from pcbvlm.answer import format_answer
    from pcbvlm.collator import END_OF_TURN

    answers = [
        processor.tokenizer(
            format_answer(s["objects"], s["width"], s["height"]) + END_OF_TURN, add_special_tokens=False
        )["input_ids"]
        for s in samples
    ]
    got = BatchBuilder(processor, cfg, BOARD)(pixels, answers)
    assert set(got) == set(expected)
    for key in expected:
        if key == "pixel_values":
            torch.testing.assert_close(got[key], expected[key].float(), atol=1e-5, rtol=0)
        else:
            assert torch.equal(got[key], expected[key]), key


def test_fresh_boards_are_new_and_answered(micro):
    _, processor = micro
    stream = iter(FreshBoards(BOARD, seed=3, tokenizer=processor.tokenizer, with_template=True))
    pixels, answers = collate_boards([next(stream) for _ in range(3)])
    assert pixels.shape == (3, 2, BOARD.height, BOARD.width) and pixels.dtype == torch.uint8
    assert not torch.equal(pixels[0], pixels[1])
    text = processor.tokenizer.decode(answers[0])
    assert text.startswith('[{"bbox_2d": [') and text.endswith("<|im_end|>")


def test_batched_vision_attention_matches_stock(micro):
    model, _ = micro
    model = model.float().eval()
    torch.manual_seed(0)
    grid = torch.tensor([[1, 8, 12]] * 3)
    pixels = torch.randn(3 * 8 * 12, 3 * 2 * 16 * 16)
    with torch.no_grad():
        stock = model.model.visual(pixels, grid_thw=grid).pooler_output
        assert batch_vision_attention(model) == 2
        batched = model.model.visual(pixels, grid_thw=grid).pooler_output
        # Images of different sizes take the stock path.
        mixed = torch.tensor([[1, 8, 12], [1, 4, 8]])
        model.model.visual(pixels[: 8 * 12 + 4 * 8], grid_thw=mixed)
    torch.testing.assert_close(batched, stock, atol=1e-5, rtol=1e-5)


def test_learning_rate_schedule():
    s = LearnSettings(lr=1e-3, warmup_fraction=0.1, min_lr_ratio=0.05)
    assert lr_at(s, 0.05) == pytest.approx(5e-4)
    assert lr_at(s, 0.1) == pytest.approx(1e-3)
    assert lr_at(s, 1.0) == pytest.approx(5e-5)


def test_a_short_learning_run_writes_its_curve_and_a_loadable_model(tmp_path):
    """The whole run on the CPU for a few steps (the GPU run is the same code): the curve files, and a
    saved model that the project's inference path loads and runs on a held-out board."""
    import json

    from pcbvlm.generate import load_for_inference
    from pcbvlm.learn import evaluate_samples, heldout_samples, learn

    settings = LearnSettings(
        size="micro",
        seconds=2,
        batch=2,
        workers=0,
        eval_every_s=1000,
        final_eval_boards=2,
        eval_batch=2,
        max_new_tokens=8,
        width=BOARD.width,
        height=BOARD.height,
        scale=0.8,
        max_defects=2,
        device="cpu",
        save_dtype="float32",
    )
    base = load_config("config/tiny.yaml")
    result = learn(settings, base, tmp_path / "learn", save=tmp_path / "model")
    curve = json.loads((tmp_path / "learn" / "curve.json").read_text())
    assert curve["samples_seen"] == result["samples_seen"] >= 2
    assert curve["final"]["boards"] == 2 and curve["final"]["final"] is True
    assert {"precision", "recall", "fscore", "ap", "parse_failure_rate"} <= set(curve["final"])
    assert (tmp_path / "learn" / "curve.png").stat().st_size > 0

    cfg = learn_config(
        load_config(
            "config/tiny.yaml",
            [
                f"model.name_or_path={tmp_path / 'model'}",
                "model.build_tiny_if_missing=false",
                f"data.max_pixels={BOARD.width * BOARD.height}",
            ],
        )
    )
    loaded = load_for_inference(cfg, tmp_path / "model")
    assert loaded.kind == "merged"
    samples = heldout_samples(cfg, BOARD, 1, seed=7, folder=tmp_path / "heldout")
    metrics = evaluate_samples(loaded.model, loaded.processor, cfg, samples, 1, 8)
    assert metrics["gt_boxes"] == len(samples[0]["objects"])
