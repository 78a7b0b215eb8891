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


# --- Gaps found by mutation testing (make mutation) --------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),  # apart in x and in y: both overlaps negative
        ([0, 0, 10, 10], [5, 20, 15, 30], 0.0),  # overlapping in x only
        ([0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5], 1.0),  # a union below one pixel is still a union
    ],
)
def test_box_iou_of_disjoint_and_sub_pixel_boxes(a, b, expected):
    assert box_iou(a, b) == approx(expected)


def test_a_missing_or_null_score_ranks_as_one():
    from pcbvlm.metrics import _score

    assert _score({"score": None}) == 1.0 and _score({}) == 1.0 and _score({"score": "0.25"}) == 0.25


def test_deeppcb_metrics_keys_threshold_and_curves():
    # IoU 0.4 ([0, 0, 100, 40] in A): a match at 0.33, none at 0.5.
    images = [
        image([gt("open", A), gt("short", B)], [det("open", [0, 0, 100, 40], 0.9), det("spur", FAR, 0.5)])
    ]
    result = deeppcb_metrics(images, iou_threshold=0.5)
    assert result.metrics == {
        "precision": 0.0,
        "recall": 0.0,
        "fscore": 0.0,
        "ap": 0.0,
        "iou_threshold": 0.5,
        "correct": 0,
        "detections": 2,
        "gt_boxes": 2,
    }
    assert [m.gt_to_det for m in result.matches] == [[None, None]]
    loose = deeppcb_metrics(images)
    assert loose.metrics["correct"] == 1 and loose.metrics["iou_threshold"] == 0.33
    assert loose.curve_precision == [1.0, 0.5] and loose.curve_recall == [0.5, 0.5]


def test_deeppcb_curve_without_ground_truth_stays_at_zero_recall():
    result = deeppcb_metrics([image([], [det("open", A, 0.9), det("open", B, 0.8)])])
    assert result.curve_recall == [0.0, 0.0] and result.curve_precision == [0.0, 0.0]


def test_deeppcb_fscore_below_one_half():
    # 2 of 5 detections correct, 2 of 5 gt found: P = R = 0.4, F = 0.4 (p + r = 0.8 < 1).
    boxes = [A, B, C, D, E]
    gts = [gt("open", b) for b in boxes]
    dets = [det("open", A), det("open", B), det("short", C), det("short", D), det("short", E)]
    m = deeppcb_metrics([image(gts, dets)]).metrics
    assert (m["precision"], m["recall"], m["fscore"]) == (approx(0.4), approx(0.4), approx(0.4))


def test_xywh_of_a_box_away_from_the_origin():
    from pcbvlm.metrics import _xywh

    assert _xywh([10, 20, 40, 80]) == [10.0, 20.0, 30.0, 60.0]


def test_coco_on_boxes_that_differ_separates_map50_from_map50_95():
    # Detection [10, 20, 40, 84] on gt [10, 20, 40, 80]: IoU 60*30 / 64*30 = 0.9375: a hit at 0.5..0.9,
    # a miss at 0.95; so AP50 = 1 and AP50:95 = 9/10. A wrong xywh conversion moves the boxes apart.
    gt_box, det_box = [10, 20, 40, 80], [10, 20, 40, 84]
    result = evaluate_detections([image([gt("open", gt_box)], [det("open", det_box, 0.8)])])
    coco = result.metrics["coco"]
    assert coco["map50"] == approx(1.0)
    assert coco["map50_95"] == approx(0.9)
    assert coco["per_class_ap50"] == {label: (approx(1.0) if label == "open" else None) for label in LABELS}
    assert result.coco.recall_thresholds == [pytest.approx(i / 100) for i in range(101)]
    assert result.coco.precision_iou50 == {"open": [approx(1.0)] * 101}
    assert result.deeppcb.matches[0].gt_to_det == [0]


def test_coco_curves_use_the_iou_05_row_and_all_100_detections(capsys):
    # IoU 0.6 (a miss at 0.75 and above) and the one hit ranked 12th of 12 (beyond COCO's maxDets 10).
    gts = [gt("short", [0, 0, 100, 100])]
    misses = [det("short", [300 + 20 * i, 300, 310 + 20 * i, 310], 0.9) for i in range(11)]
    hit = det("short", [0, 0, 100, 60], 0.5)
    result = evaluate_detections([image(gts, [*misses, hit])])
    curve = result.coco.precision_iou50["short"]
    # COCO's interpolated precision: 1/12 up to recall 1 (all 101 points), at IoU 0.5 with maxDets 100.
    assert curve == [pytest.approx(1 / 12)] * 101
    assert result.metrics["coco"]["per_class_ap50"]["short"] == pytest.approx(1 / 12)
    # mAP@0.5 is that AP (the only class with ground truth); at IoU 0.75 the hit is a miss.
    assert result.metrics["coco"]["map50"] == pytest.approx(1 / 12)
    assert result.metrics["coco"]["map50_95"] == pytest.approx(3 / 12 / 10)  # a hit at IoU 0.5, 0.55, 0.6
    assert capsys.readouterr().out == ""  # pycocotools' printing is swallowed


def test_per_class_matching_goes_by_descending_score():
    # The top detection overlaps g2 best (0.7 vs 0.6) and takes it; the second only overlaps g2, which is
    # gone: 1 TP. By ascending score the second would take g2 first and the top one g1: 2 TP.
    g1, g2 = [0, 0, 100, 100], [0, 40, 100, 140]
    top = [0, 25, 100, 125]  # g1: 75/125 = 0.6, g2: 85/115 = 0.739
    second = [0, 45, 100, 145]  # g2: 95/105 = 0.905, g1: 55/145 = 0.38
    counts = per_class_prf(
        [image([gt("open", g1), gt("open", g2)], [det("open", second, 0.5), det("open", top, 0.9)])]
    )
    assert counts["classes"]["open"]["tp"] == 1


def test_per_class_iou_exactly_at_threshold_matches_and_ties_keep_the_first_box():
    # IoU exactly 0.5 counts (COCO's >=).
    exact = per_class_prf([image([gt("open", [0, 0, 10, 10])], [det("open", [0, 0, 10, 5])])])
    assert exact["classes"]["open"]["tp"] == 1
    # det1 overlaps g1 and g2 equally (0.905) and takes g1, the first; det2 overlaps g1 (0.54) and g2 (0.43
    # < 0.5): g1 is gone, so det2 is a FP. Taking the later of equal boxes would give 2 TP.
    g1, g2 = [0, 0, 10, 10], [1, 0, 11, 10]
    dets = [det("open", [0.5, 0, 10.5, 10], 0.9), det("open", [-3, 0, 7, 10], 0.8)]
    tied = per_class_prf([image([gt("open", g1), gt("open", g2)], dets)])
    assert tied["classes"]["open"]["tp"] == 1
    # The best of two boxes, when the better one comes second.
    better_second = per_class_prf(
        [image([gt("open", [0, 0, 10, 10]), gt("open", [0, 0, 10, 8])], [det("open", [0, 0, 10, 8])])]
    )
    assert better_second["classes"]["open"] == {
        "precision": 1.0,
        "recall": 0.5,
        "f1": approx(2 / 3),
        "tp": 1,
        "fp": 0,
        "fn": 1,
    }


def test_per_class_counts_add_up_over_images_and_ratios_with_equal_terms():
    images = [
        image([gt("open", A)], [det("open", A), det("open", FAR)], "i1"),  # TP 1, FP 1
        image([gt("open", B), gt("spur", C)], [det("open", B)], "i2"),  # open TP 1; spur FN 1
        image([gt("copper", D)], [det("copper", FAR)], "i3"),  # copper FP 1, FN 1
    ]
    result = per_class_prf(images, iou_threshold=0.5)
    classes = result["classes"]
    assert classes["open"] == {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "tp": 2, "fp": 1, "fn": 0}
    assert classes["spur"] == {"precision": None, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 1}
    assert classes["copper"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 1, "fn": 1}
    # Overall: TP 2, FP 2, FN 2 (P = R = 0.5, where tp - fp = 0).
    assert result["overall"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "tp": 2, "fp": 2, "fn": 2}
    assert result["iou_threshold"] == 0.5
    # tp == fn: recall 1/2 (a tp - fn denominator would divide by zero).
    half = per_class_prf([image([gt("open", A), gt("open", B)], [det("open", A)])])
    assert half["classes"]["open"]["recall"] == 0.5
