"""Does data -> training -> generation -> parsing -> pixel mapping -> scoring produce a detector?

The tiny model is trained with all its parameters (`train.method: full`, the real training job
`pcbvlm.training.train`) until it has memorised four non-square synthetic boards (256x160 px, 1-2 defects
each); the real evaluation job then runs it on those same boards and must score DeepPCB precision =
recall = 1.0. Every link of the chain must be right for that: a wrong image size in the inference path's
pixel mapping (1000x1000, or width and height swapped: the boards are not square) moves every box off
its defect and the test fails. The merge job must publish the full-parameter run as a model that scores
the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, run_job
from pcbvlm.config import load_config
from pcbvlm.deeppcb import load_samples, prepare_data
from pcbvlm.synth import Board, generate_dataset

pytestmark = pytest.mark.slow

MEMORISE = ROOT / "config" / "memorise.yaml"  # train.method full, 120 steps, the boards' own size
BOARD = Board(256, 160, scale=0.8, max_defects=2, order="reading")  # 8x5 visual tokens per image


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, tiny_model_dir):
    """(overrides, run folder, data folder) of a full-parameter run that memorised the train split."""
    root = tmp_path_factory.mktemp("overfit")
    # 6 boards: every third goes to test.txt, so 4 train boards (val_fraction 0); 8 defects in all.
    generate_dataset(root / "DeepPCB", 6, seed=11, board=BOARD)
    overrides = [
        f"model.name_or_path={tiny_model_dir}",
        f"paths.data_dir={root / 'data'}",
        f"paths.runs_dir={root / 'runs'}",
        f"paths.outputs_dir={root / 'outputs'}",
        "eval.worst_n=0",
    ]
    cfg = load_config(MEMORISE, overrides)
    prepare_data(cfg, deeppcb_dir=root / "DeepPCB", progress=False)
    from pcbvlm.training import train

    result = train(cfg, resume="no")
    assert result.status == "finished"
    return overrides, result.run_dir, root / "data"


def _evaluate(overrides: list[str], model: str, out: Path) -> dict:
    sets = [arg for value in overrides for arg in ("--set", value)]
    proc = run_job(
        "eval",
        "--config",
        str(MEMORISE),
        *sets,
        "--model",
        model,
        "--split",
        "train",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def test_a_full_run_is_a_model_folder(overfit):
    _, run_dir, _ = overfit
    names = {p.name for p in (run_dir / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= names
    assert not (run_dir / "adapter").exists()


def test_memorised_non_square_boards_are_found_exactly(overfit, tmp_path):
    overrides, _, data_dir = overfit
    samples = load_samples(data_dir, "train")
    assert len(samples) == 4 and all((s["width"], s["height"]) == (256, 160) for s in samples)
    metrics = _evaluate(overrides, "run", tmp_path / "eval")
    deeppcb = metrics["deeppcb"]
    assert deeppcb["gt_boxes"] == 8
    assert (deeppcb["precision"], deeppcb["recall"]) == (1.0, 1.0), deeppcb
    # The boxes come back in the boards' own pixels (0-1000 rounding: at most 0.13 px off per side here).
    predictions = {
        p["id"]: p
        for p in map(json.loads, (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines())
    }
    for sample in samples:
        got = [obj["bbox"] for obj in predictions[sample["id"]]["objects"]]
        want = [obj["bbox"] for obj in sample["objects"]]
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert max(abs(a - b) for a, b in zip(g, w, strict=True)) <= 0.5, (sample["id"], got, want)


def test_merge_publishes_a_full_run_that_scores_the_same(overfit, tmp_path):
    overrides, run_dir, _ = overfit
    sets = [arg for value in overrides for arg in ("--set", value)]
    merged = tmp_path / "merged"
    proc = run_job("merge", "--config", str(MEMORISE), *sets, "--out", str(merged))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((merged / "merge.json").read_text())
    assert report["method"] == "full" and report["verified"] and report["adapter"] == str(run_dir / "model")
    assert report["diff"]["rel_max_diff"] <= report["tolerance"]
    metrics = _evaluate(overrides, str(merged), tmp_path / "eval")
    assert (metrics["deeppcb"]["precision"], metrics["deeppcb"]["recall"]) == (1.0, 1.0)
