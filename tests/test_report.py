"""Overlays, the PR curve, report.md and the side-by-side comparison."""

from __future__ import annotations

import pytest
from PIL import Image

from pcbvlm.metrics import EvalImage, deeppcb_match, evaluate_detections
from pcbvlm.report import (
    CORRECT_COLOR,
    GT_COLOR,
    PRED_COLOR,
    SCORES_NONE,
    compare_runs,
    draw_overlay,
    plot_pr_curves,
    render_report,
    save_png,
    worst_images,
    write_overlays,
    write_report,
)


def test_overlay_colors_gt_correct_and_wrong_predictions():
    board = Image.new("L", (200, 200), 255)  # grayscale, as most DeepPCB images
    gt = [{"label": "open", "bbox": [10, 60, 50, 100]}]
    preds = [
        {"label": "open", "bbox": [110, 60, 150, 100], "score": 0.93},
        {"label": "spur", "bbox": [110, 140, 150, 190], "score": 0.4},
    ]
    out = draw_overlay(board, preds, gt, correct=[True, False])
    assert out.mode == "RGB" and out.size == (200, 200)
    # Left edges, halfway down each box (away from the label text above and below the boxes).
    assert out.getpixel((10, 80)) == GT_COLOR
    assert out.getpixel((110, 80)) == CORRECT_COLOR
    assert out.getpixel((110, 165)) == PRED_COLOR
    assert out.getpixel((30, 80)) == (255, 255, 255)  # inside a box: the board is untouched
    assert board.getpixel((10, 80)) == 255  # the input image is not drawn on


def test_overlay_without_ground_truth_or_correctness_draws_predictions_red(tmp_path):
    path = tmp_path / "board.jpg"
    Image.new("RGB", (120, 120), (0, 0, 0)).save(path)
    out = draw_overlay(path, [{"label": "short", "bbox": [20, 40, 80, 100]}])  # no score key either
    assert out.getpixel((20, 70)) == PRED_COLOR
    with pytest.raises(OSError):
        draw_overlay(tmp_path / "missing.jpg", [])


def test_save_png_writes_a_readable_png(tmp_path):
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "sub" / "x.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (8, 8)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temporary file left behind


def _images():
    a, b = [0, 0, 100, 100], [200, 200, 260, 250]
    return [
        EvalImage(
            "ok", 300, 300, [{"label": "open", "bbox": a}], [{"label": "open", "bbox": a, "score": 0.9}]
        ),
        # a class swap: 1 FP + 1 FN
        EvalImage(
            "swap", 300, 300, [{"label": "open", "bbox": a}], [{"label": "short", "bbox": a, "score": 0.8}]
        ),
        # two misses: 2 FN
        EvalImage("miss", 300, 300, [{"label": "spur", "bbox": a}, {"label": "copper", "bbox": b}], []),
        # one miss: 1 FN
        EvalImage("miss1", 300, 300, [{"label": "spur", "bbox": b}], []),
    ]


def test_worst_images_by_fp_plus_fn_ties_in_order():
    images = _images()
    matches = [deeppcb_match(img.gt, img.dets) for img in images]
    # errors: ok 0, swap 2, miss 2, miss1 1 -> swap and miss tie (split order), then miss1; ok never.
    assert [img.id for img, _ in worst_images(images, matches, 10)] == ["swap", "miss", "miss1"]
    assert [img.id for img, _ in worst_images(images, matches, 1)] == ["swap"]
    assert worst_images(images, matches, 0) == []


def test_write_overlays_notes_missing_images_and_clears_old_ones(tmp_path):
    images = _images()
    matches = [deeppcb_match(img.gt, img.dets) for img in images]
    picture = tmp_path / "swap.jpg"
    Image.new("L", (300, 300), 0).save(picture)
    (tmp_path / "out" / "overlays").mkdir(parents=True)
    stale = tmp_path / "out" / "overlays" / "worst_07_old.png"
    stale.write_bytes(b"old")
    rows = write_overlays(tmp_path / "out", worst_images(images, matches, 2), {"swap": picture})
    assert [(r.id, r.errors, r.file) for r in rows] == [
        ("swap", 2, "overlays/worst_01_swap.png"),
        ("miss", 2, None),
    ]
    assert "not drawn" in rows[1].note
    assert not stale.exists()
    assert sorted(p.name for p in (tmp_path / "out" / "overlays").iterdir()) == ["worst_01_swap.png"]


def test_pr_curve_png(tmp_path):
    path = plot_pr_curves(tmp_path / "pr.png", evaluate_detections(_images()))
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 500
    # No detections and no ground truth at all still gives a picture.
    empty = evaluate_detections([EvalImage("e", 10, 10, [], [])])
    with Image.open(plot_pr_curves(tmp_path / "empty.png", empty)) as img:
        assert img.format == "PNG"


def _pixels_near(img: Image.Image, box: tuple[int, int, int, int], color: tuple[int, int, int]) -> int:
    """Pixels of `img` inside `box` within a few levels of `color` (antialiased lines blend at their edges)."""
    region = img.convert("RGB").crop(box)
    return sum(1 for px in region.getdata() if all(abs(a - b) <= 8 for a, b in zip(px, color, strict=True)))


def test_pr_curve_picture_draws_the_deeppcb_curve_left_and_a_curve_per_class_right(tmp_path):
    red, blue = (214, 39, 40), (31, 119, 180)  # matplotlib's tab:red (DeepPCB), tab:blue (first class)
    with Image.open(plot_pr_curves(tmp_path / "pr.png", evaluate_detections(_images()))) as img:
        width, height = img.size
        left, right = (0, 0, width // 2, height), (width // 2, 0, width, height)
        assert _pixels_near(img, left, red) > 50  # the pooled curve, in its own panel
        assert _pixels_near(img, right, red) < 10
        assert _pixels_near(img, right, blue) > 50  # one line per class with ground truth
    empty = evaluate_detections([EvalImage("e", 10, 10, [], [])])
    with Image.open(plot_pr_curves(tmp_path / "empty.png", empty)) as img:
        assert _pixels_near(img, (0, 0, img.width, img.height), red) == 0  # "no detections": no curve
        assert _pixels_near(img, (0, 0, img.width, img.height), blue) == 0


def _metrics(images, failure_rate=0.0, images_per_s=None):
    metrics = dict(evaluate_detections(images).metrics)
    metrics.update(
        parse_failure_rate=failure_rate, parse_problems={"truncated": 1}, images_per_s=images_per_s
    )
    return metrics


def test_render_report_tables_and_explanations(tmp_path):
    images = _images()
    result = evaluate_detections(images)
    metrics = _metrics(images, failure_rate=0.25)
    run = {"model": "outputs/merged", "split": "test", "scores": SCORES_NONE}
    overlays = write_report(tmp_path, metrics, result, images, {}, 3, run)
    text = (tmp_path / "report.md").read_text()
    assert "| model | outputs/merged |" in text
    # DeepPCB: correct 1 (ok), detections 2, gt 5 -> P 0.5, R 0.2
    assert "| 0.5000 | 0.2000 |" in text
    assert "Parse failure rate: 0.2500" in text
    assert "| truncated | 1 |" in text
    assert "1.0 (no scores in predictions)" in text
    assert "images/s: n/a" in text
    assert "![precision-recall curves](pr_curve.png)" in text
    assert [ov.id for ov in overlays] == ["swap", "miss", "miss1"]
    assert "| swap | 2 | 1 | 1 | not drawn: no image path in the sample |" in text
    assert (tmp_path / "pr_curve.png").is_file()
    # Rendering alone is a pure function of its inputs.
    assert render_report(metrics, run, overlays) == text


def test_compare_runs_side_by_side_with_deltas():
    images = _images()
    better = [
        EvalImage(img.id, img.width, img.height, img.gt, [dict(o, score=1.0) for o in img.gt])
        for img in images
    ]
    a = _metrics(images, failure_rate=0.25, images_per_s=2.0)
    b = _metrics(better, failure_rate=0.0, images_per_s=None)
    table = compare_runs(a, b, ("merged", "quantized"))
    lines = table.splitlines()
    assert lines[0] == "| metric | merged | quantized | delta (quantized - merged) |"
    # DeepPCB precision: a 1/2 -> b 1 (perfect): +0.5
    assert "| DeepPCB precision | 0.5000 | 1.0000 | +0.5000 |" in lines
    # AP: a = (1/1) / 5 gt = 0.2 (the swap is wrong) -> b 1.0: +0.8
    assert "| DeepPCB ap | 0.2000 | 1.0000 | +0.8000 |" in lines
    assert "| parse failure rate | 0.2500 | 0.0000 | -0.2500 |" in lines
    assert "| images/s | 2.0000 | n/a | n/a |" in lines  # no delta against a missing value
    assert "| detections | 2 | 5 | +3 |" in lines
    # classes without ground truth in either run (mousebite, pin-hole) have no AP
    assert "| AP50 mousebite | n/a | n/a | n/a |" in lines
