"""Detection metrics: the DeepPCB protocol, COCO AP through pycocotools, per-class P/R/F1 at IoU 0.5.

Boxes are pixel `[x1, y1, x2, y2]` of the original image; ground-truth objects are `{"label", "bbox"}`,
detections `{"label", "bbox", "score"}` (score 1.0 when absent).

DeepPCB protocol (upstream evaluation/script.py, an ICDAR-2015 script; it is Python 2 and cannot
read its own gt.zip, so it is re-implemented here and pinned by hand-made tests):
- the detections of an image are sorted by score, descending and stable (ties keep their order);
- for each ground-truth box in annotation order, the first still-unmatched detection with IoU > 0.33
  (strictly) is matched, whatever its class; the match is correct only if the labels are equal;
- precision = correct / detections, recall = correct / ground-truth boxes, F = harmonic mean, each 0
  when its denominator is 0 (as upstream);
- AP ("mAP" in the paper) is one AP pooled over all images and classes: all detections sorted by score
  across images (stable: image order, then the image's own order), the sum of (correct so far / rank)
  at each correct detection, divided by the number of ground-truth boxes.
IoU: upstream intersects the boxes as polygons, i.e. continuous areas (x2 - x1) * (y2 - y1) with no
"+1 pixel" term; that is what `box_iou` computes. Upstream also truncates coordinates to integers
because its submissions are integer pixels; the boxes here come from 0-1000 coordinates and carry
fractions of a pixel, which are kept rather than truncated (truncation would shift every box by up to
a pixel towards the origin). On integer boxes the two agree exactly.

COCO: COCO/COCOeval of pycocotools on in-memory datasets (iouType "bbox", default parameters: 101
recall points, maxDets 100 per image). Classes without ground truth are left out of the means (as
COCO does) and reported as null.

Per-class P/R/F1 at IoU 0.5: per image and class, detections by descending score each take the
unmatched same-class ground-truth box of highest IoU, if that IoU is >= 0.5 (COCO's comparison).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pcbvlm.labels import LABELS

DEEPPCB_IOU = 0.33
CLASS_IOU = 0.5


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two [x1, y1, x2, y2] boxes with continuous areas; 0 when the union is empty."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = iw * ih if iw > 0 and ih > 0 else 0.0
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _score(det: dict[str, Any]) -> float:
    score = det.get("score")
    return 1.0 if score is None else float(score)


@dataclass(frozen=True)
class EvalImage:
    """One image to score: ground truth in annotation order, detections in any order."""

    id: str
    width: int
    height: int
    gt: Sequence[dict[str, Any]]
    dets: Sequence[dict[str, Any]]


@dataclass(frozen=True)
class ImageMatch:
    """The DeepPCB matching of one image (indices into its gt / dets lists)."""

    order: list[int]  # detection indices by descending score (stable)
    gt_to_det: list[int | None]
    det_correct: list[bool]

    @property
    def correct(self) -> int:
        return sum(self.det_correct)

    @property
    def false_positives(self) -> int:
        """Detections that are not correct: unmatched, or matched with the wrong class."""
        return len(self.det_correct) - self.correct

    @property
    def false_negatives(self) -> int:
        """Ground-truth boxes without a correct detection."""
        return len(self.gt_to_det) - self.correct

    @property
    def errors(self) -> int:
        return self.false_positives + self.false_negatives


def deeppcb_match(
    gt: Sequence[dict[str, Any]], dets: Sequence[dict[str, Any]], iou_threshold: float = DEEPPCB_IOU
) -> ImageMatch:
    order = sorted(range(len(dets)), key=lambda i: -_score(dets[i]))  # sorted() is stable
    taken = [False] * len(dets)
    gt_to_det: list[int | None] = [None] * len(gt)
    det_correct = [False] * len(dets)
    for g, truth in enumerate(gt):
        for d in order:
            if not taken[d] and box_iou(truth["bbox"], dets[d]["bbox"]) > iou_threshold:
                taken[d] = True
                gt_to_det[g] = d
                det_correct[d] = truth["label"] == dets[d]["label"]
                break
    return ImageMatch(order=order, gt_to_det=gt_to_det, det_correct=det_correct)


@dataclass(frozen=True)
class DeepPCBResult:
    metrics: dict[str, Any]
    matches: list[ImageMatch]
    curve_recall: list[float]  # pooled PR curve, one point per detection in global score order
    curve_precision: list[float]


def deeppcb_metrics(images: Sequence[EvalImage], iou_threshold: float = DEEPPCB_IOU) -> DeepPCBResult:
    matches = [deeppcb_match(img.gt, img.dets, iou_threshold) for img in images]
    n_gt = sum(len(img.gt) for img in images)
    pooled = [
        (_score(img.dets[d]), match.det_correct[d])
        for img, match in zip(images, matches, strict=True)
        for d in match.order
    ]
    pooled.sort(key=lambda item: -item[0])  # stable: ties keep image order, then the image's own order
    correct = ap = 0.0
    recall: list[float] = []
    precision: list[float] = []
    for rank, (_, is_correct) in enumerate(pooled, start=1):
        if is_correct:
            correct += 1
            ap += correct / rank
        precision.append(correct / rank)
        recall.append(correct / n_gt if n_gt else 0.0)
    n_det = len(pooled)
    p = correct / n_det if n_det else 0.0
    r = correct / n_gt if n_gt else 0.0
    metrics = {
        "precision": p,
        "recall": r,
        "fscore": 2 * p * r / (p + r) if p + r > 0 else 0.0,
        "ap": ap / n_gt if n_gt else 0.0,
        "iou_threshold": iou_threshold,
        "correct": int(correct),
        "detections": n_det,
        "gt_boxes": n_gt,
    }
    return DeepPCBResult(metrics, matches, recall, precision)


@dataclass(frozen=True)
class CocoResult:
    metrics: dict[str, Any]
    recall_thresholds: list[float] = field(default_factory=list)
    precision_iou50: dict[str, list[float]] = field(
        default_factory=dict
    )  # label -> precision per recall point


def _xywh(box: Sequence[float]) -> list[float]:
    return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]


def coco_metrics(images: Sequence[EvalImage], classes: Sequence[str] = LABELS) -> CocoResult:
    """mAP@.5, mAP@.5:.95 and per-class AP@.5 from pycocotools' COCOeval (its printing is swallowed).
    `classes`: the dataset's class names (category ids 1..n in this order)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    class_names = dict(enumerate(classes, start=1))
    label_to_id = {name: cid for cid, name in class_names.items()}
    categories = [{"id": cid, "name": name} for cid, name in class_names.items()]
    coco_images = [{"id": i, "width": img.width, "height": img.height} for i, img in enumerate(images, 1)]
    gt_anns, det_anns = [], []
    for image_id, img in enumerate(images, 1):
        for obj in img.gt:
            xywh = _xywh(obj["bbox"])
            gt_anns.append(
                {
                    "id": len(gt_anns) + 1,
                    "image_id": image_id,
                    "category_id": label_to_id[obj["label"]],
                    "bbox": xywh,
                    "area": xywh[2] * xywh[3],
                    "iscrowd": 0,
                }
            )
        for det in img.dets:
            det_anns.append(
                {
                    "image_id": image_id,
                    "category_id": label_to_id[det["label"]],
                    "bbox": _xywh(det["bbox"]),
                    "score": _score(det),
                }
            )

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": coco_images, "categories": categories, "annotations": gt_anns}
        coco_gt.createIndex()
        if det_anns:
            coco_dt = coco_gt.loadRes(det_anns)
        else:
            # loadRes cannot take an empty list; an empty result set scores 0 for every class with
            # ground truth, which is what COCOeval reports for a detector that finds nothing.
            coco_dt = COCO()
            coco_dt.dataset = {"images": coco_images, "categories": categories, "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    def valid(value: float) -> float | None:
        return None if value < 0 else float(value)  # COCO's -1: no ground truth to score against

    precision = evaluator.eval["precision"]  # [iou, recall, class, area, maxDets]
    iou50 = int(abs(evaluator.params.iouThrs - 0.5).argmin())
    per_class: dict[str, float | None] = {}
    curves: dict[str, list[float]] = {}
    for k, cid in enumerate(evaluator.params.catIds):
        column = precision[iou50, :, k, 0, -1]  # area "all", the largest maxDets
        label = class_names[cid]
        per_class[label] = float(column.mean()) if (column > -1).all() else None
        if per_class[label] is not None:
            curves[label] = [float(v) for v in column]
    metrics = {
        "map50": valid(evaluator.stats[1]),
        "map50_95": valid(evaluator.stats[0]),
        "per_class_ap50": per_class,
    }
    return CocoResult(metrics, [float(v) for v in evaluator.params.recThrs], curves)


def per_class_prf(
    images: Sequence[EvalImage], iou_threshold: float = CLASS_IOU, classes: Sequence[str] = LABELS
) -> dict[str, Any]:
    """Per-class and overall (micro) precision / recall / F1 with greedy same-class matching.

    Precision is null without detections of the class, recall null without ground truth; F1 is
    2TP / (2TP + FP + FN), which equals the harmonic mean when both exist and is null only when
    the class has neither ground truth nor detections.
    """
    counts = {label: {"tp": 0, "fp": 0, "fn": 0} for label in classes}
    for img in images:
        for label in classes:
            gts = [obj["bbox"] for obj in img.gt if obj["label"] == label]
            dets = sorted((d for d in img.dets if d["label"] == label), key=lambda d: -_score(d))
            free = [True] * len(gts)
            tp = 0
            for det in dets:
                best, best_iou = None, iou_threshold
                for g, box in enumerate(gts):
                    iou = box_iou(box, det["bbox"])
                    if free[g] and iou >= best_iou and (best is None or iou > best_iou):
                        best, best_iou = g, iou
                if best is not None:
                    free[best] = False
                    tp += 1
            counts[label]["tp"] += tp
            counts[label]["fp"] += len(dets) - tp
            counts[label]["fn"] += len(gts) - tp

    def prf(tp: int, fp: int, fn: int) -> dict[str, Any]:
        return {
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
            "tp": tp,
            "fp": fp,
            "fn": fn,
        }

    total = {key: sum(c[key] for c in counts.values()) for key in ("tp", "fp", "fn")}
    return {
        "iou_threshold": iou_threshold,
        "classes": {label: prf(**c) for label, c in counts.items()},
        "overall": prf(**total),
    }


@dataclass(frozen=True)
class DetectionResult:
    metrics: dict[str, Any]  # deeppcb, coco, per_class, counts (JSON-ready)
    deeppcb: DeepPCBResult
    coco: CocoResult


def evaluate_detections(images: Sequence[EvalImage], classes: Sequence[str] = LABELS) -> DetectionResult:
    """Every metric; `classes` is the dataset's class list (DeepPCB's by default)."""
    deeppcb = deeppcb_metrics(images)
    coco = coco_metrics(images, classes)
    metrics = {
        "deeppcb": deeppcb.metrics,
        "coco": coco.metrics,
        "per_class": per_class_prf(images, classes=classes),
        "counts": {
            "images": len(images),
            "gt_boxes": sum(len(img.gt) for img in images),
            "detections": sum(len(img.dets) for img in images),
        },
    }
    return DetectionResult(metrics, deeppcb, coco)
