"""The scorer on hand-made cases; every expected value is worked out in the comments."""

from __future__ import annotations

import pytest

from pcbvlm.labels import LABELS
from pcbvlm.metrics import (
    EvalImage,
    box_iou,
    deeppcb_match,
    deeppcb_metrics,
    evaluate_detections,
    per_class_prf,
)

A = [0, 0, 100, 100]
B = [200, 200, 260, 250]
C = [10, 300, 60, 340]
D = [400, 10, 430, 60]
E = [500, 500, 580, 560]
F = [300, 400, 330, 430]
FAR = [600, 600, 630, 630]  # overlaps none of the above


def gt(label, box):
    return {"label": label, "bbox": box}


def det(label, box, score=1.0):
    return {"label": label, "bbox": box, "score": score}


def image(gts, dets, name="img"):
    return EvalImage(name, 640, 640, gts, dets)


def approx(value):
    return pytest.approx(value, abs=1e-9)


# --- IoU -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (A, A, 1.0),
        # inside A: intersection 100*34 = 3400, union 10000 -> 0.34
        (A, [0, 0, 100, 34], 0.34),
        # continuous areas, the upstream polygon convention: inter 10*5 = 50, union 100 -> 0.5
        # (a "+1 pixel" convention would give 11*6 / 11*11 = 0.545)
        ([0, 0, 10, 10], [0, 0, 10, 5], 0.5),
        # half-overlap side by side: inter 50, union 150 -> 1/3
        ([0, 0, 10, 10], [5, 0, 15, 10], 1 / 3),
        ([0, 0, 10, 10], [10, 0, 20, 10], 0.0),  # touching edges share no area
        (A, FAR, 0.0),
        ([5, 5, 5, 5], [5, 5, 5, 5], 0.0),  # empty union: 0, not a division error
        # fractional pixel boxes are kept as they are: inter 0.5*1 = 0.5, union 1 + 1 - 0.5 -> 1/3
        ([0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 1.5, 1.0], 1 / 3),
    ],
)
def test_box_iou(a, b, expected):
    assert box_iou(a, b) == approx(expected)
    assert box_iou(b, a) == approx(expected)


# --- DeepPCB protocol ---------------------------------------------------------------------------------------


def test_perfect_predictions_score_one_everywhere():
    images = [
        image(
            [gt("open", A), gt("short", B), gt("mousebite", C)],
            [det("short", B, 0.7), det("open", A, 0.9), det("mousebite", C, 0.8)],
            "1",
        ),
        image(
            [gt("spur", D), gt("copper", E), gt("pin-hole", F)],
            [det("spur", D, 0.6), det("copper", E, 0.95), det("pin-hole", F, 0.5)],
            "2",
        ),
    ]
    m = evaluate_detections(images).metrics
    for key in ("precision", "recall", "fscore", "ap"):
        assert m["deeppcb"][key] == approx(1.0), key
    assert m["coco"]["map50"] == approx(1.0)
    assert m["coco"]["map50_95"] == approx(1.0)  # identical boxes: IoU 1 at every threshold
    assert m["coco"]["per_class_ap50"] == {label: approx(1.0) for label in LABELS}
    for label in LABELS:
        row = m["per_class"]["classes"][label]
        assert (row["precision"], row["recall"], row["f1"]) == (1.0, 1.0, 1.0), label
    assert m["counts"] == {"images": 2, "gt_boxes": 6, "detections": 6}


def test_class_swap_is_matched_but_not_correct():
    # The detection overlaps the open defect fully, so DeepPCB matches it (class-blind), but the
    # classes differ: correct 0 of 1 detection and 0 of 1 gt -> P = R = F = AP = 0.
    m = evaluate_detections([image([gt("open", A)], [det("short", A, 0.9)])]).metrics
    assert [m["deeppcb"][k] for k in ("precision", "recall", "fscore", "ap")] == [0.0, 0.0, 0.0, 0.0]
    assert m["deeppcb"]["correct"] == 0
    # COCO: open has 1 gt and no open detection -> AP 0; short has no gt -> n/a and out of the mean.
    assert m["coco"]["per_class_ap50"]["open"] == 0.0
    assert m["coco"]["per_class_ap50"]["short"] is None
    assert m["coco"]["map50"] == 0.0
    # Same-class matching: open misses its box (FN), the short detection is a FP.
    assert m["per_class"]["classes"]["open"] == {
        "precision": None,
        "recall": 0.0,
        "f1": 0.0,
        "tp": 0,
        "fp": 0,
        "fn": 1,
    }
    assert m["per_class"]["classes"]["short"] == {
        "precision": 0.0,
        "recall": None,
        "f1": 0.0,
        "tp": 0,
        "fp": 1,
        "fn": 0,
    }


def test_class_swap_match_blocks_a_correct_lower_scored_detection():
    # The wrong-class detection has the higher score, so it is tried first and takes the gt box;
    # the correct one (same box, lower score) finds nothing left: correct 0, detections 2.
    match = deeppcb_match([gt("open", A)], [det("open", A, 0.5), det("short", A, 0.9)])
    assert match.gt_to_det == [1]
    assert match.det_correct == [False, False]
    assert (match.false_positives, match.false_negatives) == (2, 1)


def test_duplicate_detection():
    # Two open detections on the one open box: the higher-scored one is matched and correct, the
    # duplicate stays unmatched. P = 1/2, R = 1/1, F = 2 * 0.5 * 1 / 1.5 = 2/3.
    # AP: global order (0.9 correct, 0.8 wrong): 1/1 at rank 1, divided by 1 gt box = 1.
    m = evaluate_detections([image([gt("open", A)], [det("open", A, 0.8), det("open", A, 0.9)])]).metrics
    assert m["deeppcb"]["precision"] == approx(0.5)
    assert m["deeppcb"]["recall"] == approx(1.0)
    assert m["deeppcb"]["fscore"] == approx(2 / 3)
    assert m["deeppcb"]["ap"] == approx(1.0)
    # COCO: TP then FP; interpolated precision at every recall point up to 1 is 1 -> AP 1.
    assert m["coco"]["per_class_ap50"]["open"] == approx(1.0)
    # Same-class at 0.5: TP 1, FP 1 -> P 0.5, R 1, F1 = 2 / (2 + 1) = 2/3.
    row = m["per_class"]["classes"]["open"]
    assert (row["tp"], row["fp"], row["fn"]) == (1, 1, 0)
    assert row["f1"] == approx(2 / 3)


@pytest.mark.parametrize(
    ("height", "matched"),
    [
        (34, True),  # IoU 3400 / 10000 = 0.34 > 0.33
        (33, False),  # IoU exactly 0.33: the threshold is strict (IoU > 0.33)
        (32, False),  # IoU 0.32
    ],
)
def test_iou_just_above_and_below_033(height, matched):
    m = evaluate_detections([image([gt("open", A)], [det("open", [0, 0, 100, height], 0.9)])]).metrics
    expected = 1.0 if matched else 0.0
    assert [m["deeppcb"][k] for k in ("precision", "recall", "fscore", "ap")] == [expected] * 4
    # Below IoU 0.5 in every case: COCO AP50 and the same-class count see a miss plus a false positive.
    assert m["coco"]["per_class_ap50"]["open"] == 0.0
    row = m["per_class"]["classes"]["open"]
    assert (row["tp"], row["fp"], row["fn"]) == (0, 1, 1)


def test_image_without_predictions():
    # Image 1: one correct detection. Image 2: two gt boxes, no detection.
    # correct 1, detections 1, gt 3 -> P = 1, R = 1/3, F = 2 * (1/3) / (4/3) = 0.5, AP = (1/1) / 3 = 1/3.
    images = [
        image([gt("open", A)], [det("open", A, 0.9)], "1"),
        image([gt("short", B), gt("spur", C)], [], "2"),
    ]
    m = evaluate_detections(images).metrics
    assert m["deeppcb"]["precision"] == approx(1.0)
    assert m["deeppcb"]["recall"] == approx(1 / 3)
    assert m["deeppcb"]["fscore"] == approx(0.5)
    assert m["deeppcb"]["ap"] == approx(1 / 3)
    # COCO: open AP 1, short 0, spur 0 (gt but no detection) -> mAP50 = 1/3.
    assert m["coco"]["per_class_ap50"]["short"] == 0.0
    assert m["coco"]["map50"] == approx(1 / 3)


@pytest.mark.parametrize(
    ("open_score", "short_score", "correct"),
    [
        # The open detection (IoU 0.6 with the gt box) outranks the short one (IoU 1): it is tried
        # first, matched and correct. P = 1/2, R = 1, AP = (1/1) / 1 = 1.
        (0.9, 0.6, 1),
        # Scores reversed: the short detection is tried first and takes the box (wrong class), the
        # open one is left unmatched. P = R = AP = 0.
        (0.6, 0.9, 0),
    ],
)
def test_confidence_order_decides_the_match(open_score, short_score, correct):
    dets = [det("short", A, short_score), det("open", [0, 0, 100, 60], open_score)]
    m = deeppcb_metrics([image([gt("open", A)], dets)]).metrics
    assert m["correct"] == correct
    assert m["precision"] == approx(correct / 2)
    assert m["recall"] == approx(correct / 1)
    assert m["ap"] == approx(float(correct))


def test_ap_sorts_detections_across_images():
    # Image 1: correct detection at 0.5. Image 2: a false positive at 0.9 (its gt box is elsewhere).
    # Global order: FP (rank 1), correct (rank 2) -> AP = (1/2) / 2 gt boxes = 0.25.
    # (Image by image it would be (1/1) / 2 = 0.5.) P = 1/2, R = 1/2.
    images = [
        image([gt("open", A)], [det("open", A, 0.5)], "1"),
        image([gt("short", B)], [det("short", FAR, 0.9)], "2"),
    ]
    result = deeppcb_metrics(images)
    assert result.metrics["ap"] == approx(0.25)
    assert result.metrics["precision"] == approx(0.5)
    # The pooled curve: rank 1 -> P 0/1, R 0/2; rank 2 -> P 1/2, R 1/2.
    assert result.curve_precision == [0.0, 0.5]
    assert result.curve_recall == [0.0, 0.5]


@pytest.mark.parametrize(("first", "expected_ap"), [("correct", 0.5), ("wrong", 0.25)])
def test_equal_scores_keep_image_order(first, expected_ap):
    # Both detections score 1.0 (no scores): the stable sort keeps image order.
    # Correct first: (1/1) / 2 = 0.5. False positive first: (1/2) / 2 = 0.25.
    good = image([gt("open", A)], [det("open", A)], "good")
    bad = image([gt("short", B)], [det("short", FAR)], "bad")
    images = [good, bad] if first == "correct" else [bad, good]
    assert deeppcb_metrics(images).metrics["ap"] == approx(expected_ap)


def test_gt_boxes_are_matched_in_annotation_order():
    # One detection overlapping both gt boxes (IoU 0.5 with each): the first gt box in annotation
    # order takes it. The first is short, so the open detection is matched but wrong: correct 0.
    left, right = [0, 0, 100, 100], [50, 0, 150, 100]
    union = [25, 0, 125, 100]  # IoU with each: 75*100 / (10000 + 10000 - 7500) = 0.6
    match = deeppcb_match([gt("short", left), gt("open", right)], [det("open", union)])
    assert match.gt_to_det == [0, None]
    assert match.det_correct == [False]
    # Annotation order reversed: the open box comes first and takes it, correctly.
    match = deeppcb_match([gt("open", right), gt("short", left)], [det("open", union)])
    assert match.det_correct == [True]


def test_scores_default_to_one():
    dets = [{"label": "open", "bbox": A}]  # no score key
    m = evaluate_detections([image([gt("open", A)], dets)]).metrics
    assert m["deeppcb"]["ap"] == approx(1.0)
    assert m["coco"]["map50"] == approx(1.0)


def test_no_ground_truth_and_no_detections_do_not_crash():
    m = evaluate_detections([image([], [])]).metrics
    assert [m["deeppcb"][k] for k in ("precision", "recall", "fscore", "ap")] == [0.0] * 4
    assert m["coco"]["map50"] is None  # COCO has nothing to score against
    assert m["coco"]["per_class_ap50"] == dict.fromkeys(LABELS)
    assert m["per_class"]["overall"] == {
        "precision": None,
        "recall": None,
        "f1": None,
        "tp": 0,
        "fp": 0,
        "fn": 0,
    }


def test_no_detections_anywhere_gives_zero_ap():
    m = evaluate_detections([image([gt("open", A), gt("short", B)], [])]).metrics
    assert m["coco"]["map50"] == 0.0
    assert m["coco"]["map50_95"] == 0.0
    assert m["coco"]["per_class_ap50"]["open"] == 0.0
    assert m["deeppcb"]["ap"] == 0.0


def test_same_class_matching_takes_the_best_free_box():
    # Two open gt boxes; the top detection overlaps the second better (IoU 1 vs 0.6), takes it, and
    # the lower one still finds the first (IoU 1). With "first box above 0.5" the top detection would
    # take the first box and the second would be a FP.
    first, second = [0, 0, 100, 100], [0, 0, 100, 60]  # IoU 0.6
    result = per_class_prf(
        [image([gt("open", first), gt("open", second)], [det("open", second, 0.9), det("open", first, 0.8)])]
    )
    assert result["classes"]["open"] == {
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
        "tp": 2,
        "fp": 0,
        "fn": 0,
    }


def test_matching_exposes_errors_per_image():
    # 1 correct, 1 wrong-class match, 1 unmatched detection; 1 gt box without a correct detection.
    match = deeppcb_match(
        [gt("open", A), gt("short", B)],
        [det("open", A, 0.9), det("spur", B, 0.8), det("copper", FAR, 0.7)],
    )
    assert match.correct == 1
    assert (match.false_positives, match.false_negatives, match.errors) == (2, 1, 3)
