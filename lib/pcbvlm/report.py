"""What a person reads after an evaluation: report.md, the precision-recall curve, overlays of the
worst images, and the side-by-side comparison of two runs (e.g. merged vs quantized).

`draw_overlay` is also what inference uses to draw one image: ground truth in green, predictions in
orange when they are correct and red otherwise (all red when correctness is unknown), each with its
label and score.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from pcbvlm.io import atomic_write_bytes, atomic_write_figure, atomic_write_text
from pcbvlm.metrics import DEEPPCB_IOU, DetectionResult, EvalImage, ImageMatch

GT_COLOR = (0, 190, 0)
PRED_COLOR = (230, 30, 30)  # a prediction that is wrong, or whose correctness is unknown
CORRECT_COLOR = (255, 150, 0)  # a prediction the DeepPCB protocol counts as correct
OVERLAY_DIR = "overlays"
PR_CURVE = "pr_curve.png"
SCORES_FROM_TOKENS = "score of a box = mean probability of the tokens the model generated for that object"
SCORES_NONE = "1.0 (no scores in predictions)"


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _label(
    draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, color: tuple[int, int, int], font
) -> None:
    """Text on a filled box of the drawing color, so it stays readable on black and white boards."""
    left, top, right, bottom = draw.textbbox(xy, text, font=font)
    draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=color)
    draw.text(xy, text, fill=(255, 255, 255), font=font)


def draw_overlay(
    image: str | Path | Image.Image,
    predictions: Sequence[dict[str, Any]],
    ground_truth: Sequence[dict[str, Any]] = (),
    correct: Sequence[bool] | None = None,
) -> Image.Image:
    """Boxes drawn on a copy of `image` (a path or a PIL image); returns an RGB image.

    `predictions` are `{"label", "bbox", "score"?}` in pixels of the image, `ground_truth`
    `{"label", "bbox"}`; `correct[i]` (optional) says whether prediction i is correct. Labels of
    ground truth go below their box, labels of predictions (with the score) above it, so both stay
    visible when the boxes coincide. Raises OSError when the image cannot be read.
    """
    if isinstance(image, Image.Image):
        canvas = image.convert("RGB")
    else:
        with Image.open(image) as opened:
            canvas = opened.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    size = max(10, round(min(canvas.size) / 45))  # 14 px text on a 640 px DeepPCB image
    font = _font(size)
    width = max(1, round(min(canvas.size) / 320))
    for obj in ground_truth:
        x1, y1, x2, y2 = obj["bbox"]
        draw.rectangle((x1, y1, x2, y2), outline=GT_COLOR, width=width)
        _label(draw, (x1, min(y2 + 2, canvas.height - size - 2)), obj["label"], GT_COLOR, font)
    for i, obj in enumerate(predictions):
        color = CORRECT_COLOR if correct is not None and correct[i] else PRED_COLOR
        x1, y1, x2, y2 = obj["bbox"]
        draw.rectangle((x1, y1, x2, y2), outline=color, width=width)
        score = obj.get("score")
        text = obj["label"] if score is None else f"{obj['label']} {float(score):.2f}"
        _label(draw, (x1, max(y1 - size - 3, 0)), text, color, font)
    return canvas


def save_png(image: Image.Image, path: str | Path) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


def plot_pr_curves(path: str | Path, result: DetectionResult) -> Path:
    """Left: the pooled DeepPCB-protocol curve (one point per detection in score order). Right: COCO
    per-class precision at IoU 0.5 over its 101 recall points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.8), dpi=100)
    FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
    left, right = fig.subplots(1, 2)
    deeppcb = result.deeppcb
    if deeppcb.curve_recall:
        left.plot(deeppcb.curve_recall, deeppcb.curve_precision, color="tab:red", marker=".", markersize=3)
    else:
        left.text(0.5, 0.5, "no detections", ha="center", va="center")
    m = deeppcb.metrics
    left.set_title(f"DeepPCB protocol (IoU > {DEEPPCB_IOU}): AP {m['ap']:.3f}, F {m['fscore']:.3f}")
    for label, precision in result.coco.precision_iou50.items():
        ap = result.coco.metrics["per_class_ap50"][label]
        right.plot(result.coco.recall_thresholds, precision, label=f"{label} ({ap:.3f})")
    if result.coco.precision_iou50:
        right.legend(loc="lower left", fontsize=8)
    else:
        right.text(0.5, 0.5, "no ground truth", ha="center", va="center")
    map50 = result.coco.metrics["map50"]
    right.set_title("COCO per class, IoU 0.5" + (f": mAP {map50:.3f}" if map50 is not None else ""))
    for ax in (left, right):
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1.01)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return atomic_write_figure(fig, path)


@dataclass(frozen=True)
class Overlay:
    id: str
    false_positives: int
    false_negatives: int
    file: str | None  # relative to the report folder; None when the image could not be drawn
    note: str = ""

    @property
    def errors(self) -> int:
        return self.false_positives + self.false_negatives


def worst_images(
    images: Sequence[EvalImage], matches: Sequence[ImageMatch], n: int
) -> list[tuple[EvalImage, ImageMatch]]:
    """The n images with the most errors (FP + FN under DeepPCB matching), ties in split order;
    images without errors are never listed."""
    ranked = sorted(
        (pair for pair in zip(images, matches, strict=True) if pair[1].errors > 0),
        key=lambda pair: -pair[1].errors,
    )
    return ranked[:n]


def write_overlays(
    out_dir: str | Path,
    worst: Sequence[tuple[EvalImage, ImageMatch]],
    image_paths: dict[str, str | Path],
) -> list[Overlay]:
    """Draw the worst images into out_dir/overlays/worst_NN_<id>.png (older worst_* files are removed
    first, so the folder matches this report). A missing or unreadable image is noted, not fatal."""
    folder = Path(out_dir) / OVERLAY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("worst_*.png"):
        old.unlink()
    rows = []
    for rank, (img, match) in enumerate(worst, start=1):
        name = f"worst_{rank:02d}_{img.id}.png"
        path = image_paths.get(img.id)
        try:
            if path is None:
                raise FileNotFoundError("no image path in the sample")
            picture = draw_overlay(path, img.dets, img.gt, match.det_correct)
        except OSError as err:
            note = f"not drawn: {path}: {err.strerror or err}" if path else f"not drawn: {err}"
            rows.append(Overlay(img.id, match.false_positives, match.false_negatives, None, note))
            continue
        save_png(picture, folder / name)
        rows.append(Overlay(img.id, match.false_positives, match.false_negatives, f"{OVERLAY_DIR}/{name}"))
    return rows


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return lines


def render_report(metrics: dict[str, Any], run: dict[str, Any], overlays: Sequence[Overlay]) -> str:
    """report.md. `run` describes what was evaluated (model, predictions, data, split, config, scores)."""
    dp, coco, pc, counts = metrics["deeppcb"], metrics["coco"], metrics["per_class"], metrics["counts"]
    lines = ["# Evaluation report", ""]
    lines += _table(["", ""], [(key, value) for key, value in run.items()])
    lines += [
        "",
        f"Images: {counts['images']}, ground-truth boxes: {counts['gt_boxes']}, detections: "
        f"{counts['detections']}, images/s: {fmt(metrics.get('images_per_s'), 2)}.",
    ]
    lines += ["", f"## DeepPCB protocol (IoU > {dp['iou_threshold']}, class must match)", ""]
    lines += _table(
        ["precision", "recall", "F-score", "AP", "correct", "detections", "gt boxes"],
        [
            [
                dp["precision"],
                dp["recall"],
                dp["fscore"],
                dp["ap"],
                dp["correct"],
                dp["detections"],
                dp["gt_boxes"],
            ]
        ],
    )
    lines += ["", "## COCO (pycocotools)", ""]
    lines += _table(["mAP@0.5", "mAP@0.5:0.95"], [[coco["map50"], coco["map50_95"]]])
    lines += ["", f"## Per class (COCO AP@0.5; P/R/F1 at IoU {pc['iou_threshold']}, same class)", ""]
    rows = []
    for label, c in pc["classes"].items():  # the dataset's classes, in its order
        rows.append(
            [
                label,
                coco["per_class_ap50"].get(label),
                c["precision"],
                c["recall"],
                c["f1"],
                c["tp"],
                c["fp"],
                c["fn"],
            ]
        )
    o = pc["overall"]
    rows.append(["all", coco["map50"], o["precision"], o["recall"], o["f1"], o["tp"], o["fp"], o["fn"]])
    lines += _table(["class", "AP50", "precision", "recall", "F1", "TP", "FP", "FN"], rows)

    lines += ["", "## Parsing of the model's answers", ""]
    lines += [
        f"Parse failure rate: {fmt(metrics['parse_failure_rate'])} (samples whose `error` is not null)."
    ]
    problems = metrics["parse_problems"]
    if problems:
        lines += [""] + _table(["problem", "count"], sorted(problems.items(), key=lambda kv: (-kv[1], kv[0])))
    else:
        lines += ["", "No parse problems."]

    lines += ["", "## Precision-recall", "", f"![precision-recall curves]({PR_CURVE})"]
    lines += ["", f"## Worst images ({len(overlays)}, by FP + FN under the DeepPCB matching)", ""]
    if overlays:
        lines += ["Ground truth green; predictions orange when correct, red when not (label and score).", ""]
        lines += _table(
            ["id", "errors", "FP", "FN", "overlay"],
            [
                [
                    ov.id,
                    ov.errors,
                    ov.false_positives,
                    ov.false_negatives,
                    f"[png]({ov.file})" if ov.file else ov.note,
                ]
                for ov in overlays
            ],
        )
        lines += [""] + [f"![{ov.id}]({ov.file})" for ov in overlays if ov.file]
    else:
        lines += ["No image has errors (or worst_n is 0)."]

    lines += [
        "",
        "## How the numbers are computed",
        "",
        f"- Scores: {run.get('scores', SCORES_NONE)}.",
        "- DeepPCB protocol (upstream evaluation script): per image, detections by descending score; each "
        f"ground-truth box in annotation order takes the first unmatched detection with IoU > {DEEPPCB_IOU}, "
        "whatever its class; the match is correct only if the classes are equal. AP is pooled over all "
        "images and classes: detections in global score order, the sum of precision at each correct "
        "detection, divided by the number of ground-truth boxes. IoU uses continuous areas "
        "(x2 - x1) * (y2 - y1) in pixels.",
        "- COCO: pycocotools COCOeval, iouType bbox, 101 recall points, at most 100 detections per image; "
        "classes without ground truth are n/a and left out of the means.",
        "- Per class: detections by descending score each take the same-class ground-truth box of highest "
        "IoU >= 0.5 that is still free.",
        "- Parse failure: the answer could not be read as written (objects were dropped or changed); "
        "code fences, surrounding text and label spellings are counted above but are not failures.",
        "",
    ]
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    metrics: dict[str, Any],
    result: DetectionResult,
    images: Sequence[EvalImage],
    image_paths: dict[str, str | Path],
    worst_n: int,
    run: dict[str, Any],
) -> list[Overlay]:
    """pr_curve.png, the overlays of the worst images and report.md in out_dir."""
    out_dir = Path(out_dir)
    plot_pr_curves(out_dir / PR_CURVE, result)
    overlays = write_overlays(out_dir, worst_images(images, result.deeppcb.matches, worst_n), image_paths)
    atomic_write_text(out_dir / "report.md", render_report(metrics, run, overlays))
    return overlays


def _comparison_rows(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers two runs are compared on, by row name."""
    rows: dict[str, Any] = {}
    for key in ("precision", "recall", "fscore", "ap"):
        rows[f"DeepPCB {key}"] = metrics["deeppcb"][key]
    rows["COCO mAP@0.5"] = metrics["coco"]["map50"]
    rows["COCO mAP@0.5:0.95"] = metrics["coco"]["map50_95"]
    classes = metrics["per_class"]["classes"]  # the dataset's classes, in its order
    for label in classes:
        rows[f"AP50 {label}"] = metrics["coco"]["per_class_ap50"].get(label)
    for label in classes:
        rows[f"F1@0.5 {label}"] = classes[label]["f1"]
    rows["parse failure rate"] = metrics["parse_failure_rate"]
    rows["images/s"] = metrics.get("images_per_s")
    for key in ("images", "gt_boxes", "detections"):
        rows[key.replace("_", " ")] = metrics["counts"][key]
    return rows


def compare_runs(
    metrics_a: dict[str, Any], metrics_b: dict[str, Any], names: Sequence[str] = ("A", "B")
) -> str:
    """A markdown table of two runs' metrics side by side, with the delta B - A."""
    a, b = _comparison_rows(metrics_a), _comparison_rows(metrics_b)
    rows = []
    for key in a:
        va, vb = a[key], b.get(key)  # runs on different class lists share only some rows
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
            delta = vb - va
            shown = f"{delta:+d}" if isinstance(delta, int) else f"{delta:+.4f}"
        else:
            shown = "n/a"
        rows.append([key, va, vb, shown])
    name_a, name_b = names
    return "\n".join(_table(["metric", name_a, name_b, f"delta ({name_b} - {name_a})"], rows)) + "\n"
