"""The evaluation job's logic: read a converted split and predictions, score them, write the results.

Predictions (predictions.jsonl, one line per sample, boxes in pixels of the original image):
    {"id": "20085000", "objects": [{"label": "open", "bbox": [x1, y1, x2, y2], "score": 0.93}],
     "raw": "<model text>", "error": null, "problems": {"code_fence": 1}}
`score` defaults to 1.0; `raw`, `error` and `problems` are optional (`ParseResult.to_prediction` writes
them all). Parse problems are counted from `problems`, or by parsing `raw` again when it is absent.

`score_predictions` is the one scoring path: the job calls it for a predictions file and for the
predictions a model just generated. It writes, in the output folder and each file atomically:
overlays/worst_NN_<id>.png, pr_curve.png, report.md and, last, metrics.json (so a metrics.json means
a finished evaluation). `write_comparison` puts two finished evaluations side by side.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pcbvlm.errors import DataError
from pcbvlm.io import atomic_write_json, atomic_write_text, read_jsonl_lines
from pcbvlm.metrics import EvalImage, evaluate_detections
from pcbvlm.parsing import parse_answer
from pcbvlm.report import SCORES_FROM_TOKENS, SCORES_NONE, compare_runs, write_report
from pcbvlm.samples import DEFAULT_CLASSES, dataset_classes

SPLITS = ("train", "val", "test")
METRICS_FILE = "metrics.json"
COMPARISON_FILE = "comparison.md"


def _is_number(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond the float range
        return False


def _check_objects(
    objects: Any, where: str, with_score: bool, classes: Sequence[str] = DEFAULT_CLASSES
) -> list[dict[str, Any]]:
    """Validated copies of `[{"label", "bbox", "score"?}]` (score filled with 1.0 when asked); labels
    must be among the dataset's `classes`."""
    if not isinstance(objects, list):
        raise DataError(f"{where}: 'objects' must be a list")
    checked = []
    for i, obj in enumerate(objects):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: objects[{i}] must be an object")
        label, box = obj.get("label"), obj.get("bbox")
        if label not in classes:
            raise DataError(
                f"{where}: objects[{i}]: unknown label {reprlib.repr(label)} (expected one of {', '.join(classes)})"
            )
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise DataError(
                f"{where}: objects[{i}]: bbox must be 4 numbers [x1, y1, x2, y2], got {reprlib.repr(box)}"
            )
        item: dict[str, Any] = {"label": label, "bbox": [float(v) for v in box]}
        if with_score:
            score = obj.get("score", 1.0)
            if not _is_number(score):
                raise DataError(f"{where}: objects[{i}]: score must be a number, got {reprlib.repr(score)}")
            item["score"] = float(score)
        checked.append(item)
    return checked


def _check_sample(row: dict[str, Any], where: str, base: Path, classes: Sequence[str]) -> dict[str, Any]:
    sample_id = row.get("id")
    if not isinstance(sample_id, str) or not sample_id:
        raise DataError(f"{where}: 'id' must be a non-empty string")
    for key in ("width", "height"):
        value = row.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise DataError(f"{where}: '{key}' must be a positive integer, got {reprlib.repr(value)}")
    image = row.get("image")
    if not isinstance(image, str) or not image:
        raise DataError(f"{where}: 'image' must be a path")
    classes = row.get("classes") or classes  # the converter writes the dataset's class list into each sample
    return {
        "id": sample_id,
        "image": str(base / image),  # absolute paths (the converter's) are kept as they are
        "width": row["width"],
        "height": row["height"],
        "objects": _check_objects(row.get("objects"), where, with_score=False, classes=classes),
        "classes": list(classes),
    }


def _classes(samples: Sequence[dict[str, Any]]) -> Sequence[str]:
    """The class list of the evaluated split (every sample carries it)."""
    return samples[0].get("classes") or DEFAULT_CLASSES if samples else DEFAULT_CLASSES


def load_scoring_samples(data_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """The converted split `<data_dir>/<split>.jsonl`, validated, in file order."""
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(
            f"{path}: split file not found (convert the data with `make data`, or give --data-dir)"
        )
    samples, seen = [], {}
    classes = dataset_classes(path.parent)
    for number, row in read_jsonl_lines(path):
        sample = _check_sample(row, f"{path} line {number}", path.parent, classes)
        if sample["id"] in seen:
            raise DataError(
                f"{path} line {number}: duplicate id {sample['id']!r} (first on line {seen[sample['id']]})"
            )
        seen[sample["id"]] = number
        samples.append(sample)
    return samples


def check_prediction(
    row: dict[str, Any], where: str, known_ids: set[str], classes: Sequence[str] = DEFAULT_CLASSES
) -> dict[str, Any]:
    """One prediction, validated and normalized (scores filled, optional keys present)."""
    sample_id = row.get("id")
    if not isinstance(sample_id, str):
        raise DataError(f"{where}: 'id' must be a string, got {reprlib.repr(sample_id)}")
    if sample_id not in known_ids:
        raise DataError(f"{where}: unknown id {reprlib.repr(sample_id)} (not in the evaluated split)")
    error, raw, problems = row.get("error"), row.get("raw"), row.get("problems")
    if error is not None and not isinstance(error, str):
        raise DataError(f"{where}: 'error' must be null or a string")
    if raw is not None and not isinstance(raw, str):
        raise DataError(f"{where}: 'raw' must be null or a string")
    if problems is not None and not (
        isinstance(problems, dict)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in problems.values())
    ):
        raise DataError(f"{where}: 'problems' must map problem kinds to counts")
    return {
        "id": sample_id,
        "objects": _check_objects(row.get("objects"), where, with_score=True, classes=classes),
        "raw": raw,
        "error": error,
        "problems": problems,
    }


def read_predictions(path: str | Path, samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """predictions.jsonl, validated against the split's ids; errors name the file and line."""
    path = Path(path)
    known = {s["id"] for s in samples}
    predictions, seen = [], {}
    for number, row in read_jsonl_lines(path):
        where = f"{path} line {number}"
        prediction = check_prediction(row, where, known, _classes(samples))
        if prediction["id"] in seen:
            raise DataError(
                f"{where}: duplicate id {prediction['id']!r} (first on line {seen[prediction['id']]})"
            )
        seen[prediction["id"]] = number
        predictions.append(prediction)
    return predictions


def _parse_stats(
    predictions: Sequence[dict[str, Any]], samples: dict[str, dict[str, Any]]
) -> tuple[float, dict]:
    failures = 0
    problems: Counter[str] = Counter()
    for pred in predictions:
        failures += pred["error"] is not None
        if pred["problems"] is not None:
            problems.update(pred["problems"])
        elif pred["raw"] is not None:
            sample = samples[pred["id"]]
            problems.update(
                parse_answer(pred["raw"], sample["width"], sample["height"], sample.get("classes")).problems
            )
        elif pred["error"] is not None:
            problems["unspecified"] += 1  # an error without the text or kinds behind it
    rate = failures / len(predictions) if predictions else 0.0
    return rate, dict(sorted(problems.items()))


def score_predictions(
    predictions: Sequence[dict[str, Any]],
    samples: Sequence[dict[str, Any]],
    out_dir: str | Path,
    *,
    images_per_s: float | None = None,
    worst_n: int = 8,
    run: dict[str, Any] | None = None,
    source: str = "predictions",
) -> dict[str, Any]:
    """Score one prediction per sample, write the report files into out_dir, return the metrics.

    `samples` are the split's samples (`load_scoring_samples`), `predictions` dicts as in predictions.jsonl;
    `run` describes what was evaluated for the report (model, data, split, config); `source` names the
    predictions in error messages.
    """
    by_sample = {s["id"]: s for s in samples}
    checked: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(predictions, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{source} #{i}: expected an object")
        prediction = check_prediction(row, f"{source} #{i}", set(by_sample), _classes(samples))
        if prediction["id"] in checked:
            raise DataError(f"{source} #{i}: duplicate id {prediction['id']!r}")
        checked[prediction["id"]] = prediction
    missing = [sid for sid in by_sample if sid not in checked]
    if missing:
        raise DataError(
            f"{source}: no prediction for {len(missing)} of {len(by_sample)} samples (first: {missing[0]}); "
            "scoring a subset would understate recall (use eval.limit to evaluate the first N samples)"
        )

    images = [
        EvalImage(s["id"], s["width"], s["height"], s["objects"], checked[s["id"]]["objects"])
        for s in samples
    ]
    result = evaluate_detections(images, _classes(samples))
    failure_rate, problems = _parse_stats(list(checked.values()), by_sample)
    # 1.0 everywhere is the parser's default, i.e. no scores: the report must not claim otherwise.
    scored = any(obj["score"] != 1.0 for p in checked.values() for obj in p["objects"])
    run = {**(run or {}), "scores": SCORES_FROM_TOKENS if scored else SCORES_NONE}
    metrics = {
        "run": run,
        **result.metrics,
        "parse_failure_rate": failure_rate,
        "parse_problems": problems,
        "images_per_s": images_per_s,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report(out_dir, metrics, result, images, {s["id"]: s["image"] for s in samples}, worst_n, run)
    atomic_write_json(out_dir / METRICS_FILE, metrics)
    return metrics


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise DataError(f"{path}: file not found (evaluate that run first)")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: invalid JSON ({err.msg})") from None
    required = ("deeppcb", "coco", "per_class", "counts", "parse_failure_rate")
    if not isinstance(metrics, dict) or any(key not in metrics for key in required):
        raise DataError(f"{path}: not a metrics file of this evaluation (needs {', '.join(required)})")
    return metrics


def write_comparison(dir_a: str | Path, dir_b: str | Path, out_dir: str | Path) -> Path:
    """out_dir/comparison.md: the two evaluations side by side with the deltas (B - A)."""
    dir_a, dir_b = Path(dir_a), Path(dir_b)
    metrics_a, metrics_b = read_metrics(dir_a), read_metrics(dir_b)
    names = (dir_a.name, dir_b.name) if dir_a.name != dir_b.name else (str(dir_a), str(dir_b))
    lines = ["# Comparison", ""]
    for name, folder, metrics in ((names[0], dir_a, metrics_a), (names[1], dir_b, metrics_b)):
        run = metrics.get("run", {})
        what = ", ".join(f"{k}: {v}" for k, v in run.items() if k in ("model", "predictions", "split"))
        lines.append(f"- **{name}**: `{folder}`" + (f" ({what})" if what else ""))
    lines += ["", compare_runs(metrics_a, metrics_b, names)]
    return atomic_write_text(Path(out_dir) / COMPARISON_FILE, "\n".join(lines))
