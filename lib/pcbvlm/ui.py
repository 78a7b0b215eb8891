"""`make ui`: a web page (Gradio) to inspect a board with a model and to browse finished evaluations.

Two tabs:
- **Inspect a board**: upload a board image (and its defect-free template when the model was trained with
  templates); the page shows the overlay with labelled boxes and scores, the boxes as a table and as JSON,
  and the time taken. The model is loaded once, on the first request. The confidence slider only filters
  the boxes of the last answer: it never runs the model again.
- **Browse an evaluation**: pick a folder written by `make eval` (metrics.json, pr_curve.png,
  predictions.jsonl): its metrics (DeepPCB protocol, COCO, per class), the precision-recall curve, and
  every image, worst first, drawn from predictions.jsonl and the split's ground truth so that either can be
  hidden; a second evaluation puts the two side by side with the deltas (the table of
  `make eval COMPARE=...`).

The page's logic is plain functions on plain data (tested without a browser in tests/test_ui.py);
`build_app` wires them to Gradio components. Bad input (not an image, an image above the pixel limit, a
folder that is not an evaluation) shows one line in the page's status box and a warning toast, never a
traceback; unexpected errors do the same and leave their traceback in the server's log.

Offline by construction: Gradio's analytics and version check are off (GRADIO_ANALYTICS_ENABLED=False)
and its default theme uses fonts bundled in the package, so the page makes no request beyond the app.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from pcbvlm.config import Config
from pcbvlm.errors import DataError, UserError
from pcbvlm.evaluate import METRICS_FILE, load_scoring_samples, read_metrics, read_predictions
from pcbvlm.io import is_partial
from pcbvlm.labels import LABELS
from pcbvlm.metrics import deeppcb_match
from pcbvlm.report import OVERLAY_DIR, PR_CURVE, compare_runs, draw_overlay

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# Uploads above this many pixels are refused before they are decoded: a DeepPCB scan is 640x640 (0.4 MP) and
# the model sees at most data.max_pixels anyway; 40 MP covers any camera or scanner image of one board.
MAX_IMAGE_PIXELS = 40_000_000
MAX_UPLOAD = "100mb"  # Gradio refuses larger uploads with its own message
PREDICTIONS_FILE = "predictions.jsonl"
BOX_COLUMNS = ["label", "score", "x1", "y1", "x2", "y2"]
IMAGE_COLUMNS = ["rank", "id", "errors", "FP", "FN", "ground truth", "predictions"]
# How evaluate's job describes the data it scored: "<data_dir> (<split>, <n> of <total> samples)".
_RUN_DATA = re.compile(r"^(?P<dir>.+) \((?P<split>train|val|test), (?P<n>\d+) of (?P<total>\d+) samples\)$")


# ---------------------------------------------------------------------------------------------------------
# Inspect a board


def check_image(
    path: str | Path | None, max_pixels: int = MAX_IMAGE_PIXELS, what: str = "image"
) -> tuple[int, int]:
    """(width, height) of an uploaded image; a DataError names the problem: missing, not an image, too large.

    The size is read from the header, so an oversized image is refused before it is decoded."""
    if path is None or str(path) == "":
        raise DataError(f"no {what}: upload a board image (jpg or png)")
    name = Path(path).name
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise DataError(
                    f"{name}: {width}x{height} pixels ({width * height / 1e6:.1f} MP) is above the limit of "
                    f"{max_pixels / 1e6:.0f} MP; downscale it first"
                )
            img.load()  # a truncated or corrupt file fails here, not inside the model
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except Image.DecompressionBombError:
        raise DataError(f"{name}: too many pixels (Pillow refuses it as a decompression bomb)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{name}: not a readable image ({err})") from None
    return width, height


def filter_objects(objects: Sequence[dict[str, Any]], min_score: float) -> list[dict[str, Any]]:
    """The boxes whose score is at least min_score (a box without a score counts as 1.0)."""
    return [obj for obj in objects if float(obj.get("score", 1.0)) >= min_score]


def boxes_rows(objects: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """Table rows (BOX_COLUMNS) of boxes, most confident first; pixel coordinates rounded to 0.1."""
    rows = []
    for obj in sorted(objects, key=lambda o: -float(o.get("score", 1.0))):
        score = obj.get("score")
        rows.append(
            [obj["label"], None if score is None else round(float(score), 3)]
            + [round(float(v), 1) for v in obj["bbox"]]
        )
    return rows


@dataclass
class Inspection:
    """One answer of the model on one board, kept in the page's state so that the slider can refilter it."""

    image: str
    width: int
    height: int
    objects: list[dict[str, Any]]
    raw: str
    error: str | None
    seconds: float  # generation only
    load_seconds: float | None  # loading the model, on the first request only
    model: str
    kind: str
    notes: list[str] = field(default_factory=list)


def inspection_view(result: Inspection, min_score: float) -> tuple[Image.Image, list[list[Any]], dict, str]:
    """What the page shows for an answer at a confidence threshold: overlay, table rows, JSON, summary."""
    kept = filter_objects(result.objects, min_score)
    overlay = draw_overlay(result.image, kept)
    hidden = len(result.objects) - len(kept)
    answer = {
        "image": Path(result.image).name,
        "model": result.model,
        "width": result.width,
        "height": result.height,
        "min_score": min_score,
        "objects": kept,
        "hidden_below_min_score": hidden,
        "error": result.error,
        "raw": result.raw,
    }
    summary = f"{len(kept)} box{'es' if len(kept) != 1 else ''}"
    if hidden:
        summary += f" ({hidden} more below confidence {min_score:.2f})"
    summary += f"; generated in {result.seconds:.2f} s by the {result.kind} model `{result.model}`"
    if result.load_seconds is not None:
        summary += f" (loading it took {result.load_seconds:.1f} s, once)"
    if result.error:
        summary += f". The answer could not be read as written: {result.error}"
    for note in result.notes:
        summary += f". {note}"
    return overlay, boxes_rows(kept), answer, summary + "."


class Inspector:
    """The model of the page: resolved at start, loaded on the first request, used by one request at a time."""

    def __init__(self, cfg: Config, model_ref: str | None, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        from pcbvlm.generate import resolve_model_ref

        self.cfg = cfg
        self.model_ref = resolve_model_ref(cfg, model_ref)
        self.max_pixels = max_pixels
        self._loaded = None
        self._lock = threading.Lock()

    def detect(self, image: str | Path | None, template: str | Path | None = None) -> Inspection:
        from pcbvlm.deeppcb import build_messages
        from pcbvlm.generate import generate_batch, load_for_inference, to_prediction

        width, height = check_image(image, self.max_pixels, "board image")
        notes = []
        if template is not None and str(template) != "":
            check_image(template, self.max_pixels, "template")
            if not self.cfg.data.with_template:
                notes.append("The template was not shown to the model (data.with_template is false)")
        sample = {
            "id": Path(image).stem,
            "image": str(image),
            "template": str(template) if template else None,
        }
        messages = build_messages(sample, self.cfg.data, with_answer=False)  # DataError: template missing
        with self._lock:
            load_seconds = None
            if self._loaded is None:
                begin = time.perf_counter()
                log.info("loading %s", self.model_ref)
                self._loaded = load_for_inference(self.cfg, self.model_ref)
                load_seconds = time.perf_counter() - begin
            begin = time.perf_counter()
            text, offsets, probs = generate_batch(self._loaded, [messages], self.cfg.eval.max_new_tokens)[0]
            seconds = time.perf_counter() - begin
        frame = self._loaded.answer_frame(self.cfg, width, height)  # the model family's coordinates
        prediction = to_prediction(text, offsets, probs, sample["id"], width, height, frame=frame)
        return Inspection(
            image=str(image),
            width=width,
            height=height,
            objects=prediction["objects"],
            raw=text,
            error=prediction["error"],
            seconds=seconds,
            load_seconds=load_seconds,
            model=self._loaded.path,
            kind=self._loaded.kind,
            notes=notes,
        )


# ---------------------------------------------------------------------------------------------------------
# Browse an evaluation


@dataclass(frozen=True)
class EvalImageView:
    """One evaluated image: its file, ground truth, predictions and DeepPCB errors (all predictions)."""

    id: str
    image: str
    gt: list[dict[str, Any]]
    dets: list[dict[str, Any]]
    false_positives: int
    false_negatives: int

    @property
    def errors(self) -> int:
        return self.false_positives + self.false_negatives


@dataclass
class Evaluation:
    folder: Path
    metrics: dict[str, Any]
    images: list[EvalImageView]  # worst first; empty when they could not be read (see note)
    note: str = ""


def find_evaluations(roots: Sequence[str | Path]) -> list[Path]:
    """Finished evaluation folders (holding metrics.json) under the roots, newest first."""
    found = set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for metrics in root.rglob(METRICS_FILE):
            folder = metrics.parent
            if not any(is_partial(part) for part in folder.relative_to(root).parts):
                found.add(folder)
    return sorted(found, key=lambda f: ((f / METRICS_FILE).stat().st_mtime, str(f)), reverse=True)


def check_eval_folder(folder: str | Path | None, roots: Sequence[str | Path]) -> Path:
    """The folder of a finished evaluation under one of the roots, or a DataError saying what it is not."""
    if folder is None or str(folder).strip() == "":
        raise DataError("choose an evaluation folder")
    path = Path(str(folder).strip()).expanduser()
    resolved = path.resolve()
    root_paths = [Path(r).resolve() for r in roots]
    if not any(resolved == r or resolved.is_relative_to(r) for r in root_paths):
        shown = ", ".join(str(r) for r in roots)
        raise DataError(f"{path}: not under the evaluation folders this page browses ({shown}; see EVALS=)")
    if not path.is_dir():
        raise DataError(f"{path}: no such folder")
    if is_partial(path):
        raise DataError(f"{path}: an unfinished evaluation (.partial-*); run `make eval` again")
    if not (path / METRICS_FILE).is_file():
        raise DataError(
            f"{path}: not an evaluation folder (no {METRICS_FILE}; `make eval` writes metrics.json, report.md, "
            "pr_curve.png and predictions.jsonl)"
        )
    return path


def _split_source(metrics: dict[str, Any], cfg: Config | None) -> list[tuple[Path, str, int | None]]:
    """Where the evaluated split may be: as the evaluation recorded it, then under this config's data_dir."""
    candidates: list[tuple[Path, str, int | None]] = []
    match = _RUN_DATA.match(str((metrics.get("run") or {}).get("data", "")))
    if match:
        candidates.append((Path(match["dir"]), match["split"], int(match["n"])))
        if cfg is not None:
            candidates.append((Path(cfg.paths.data_dir), match["split"], int(match["n"])))
    elif cfg is not None:
        candidates.append((Path(cfg.paths.data_dir), cfg.eval.split, None))
    return candidates


def _predictions_file(folder: Path, metrics: dict[str, Any]) -> Path | None:
    if (folder / PREDICTIONS_FILE).is_file():
        return folder / PREDICTIONS_FILE
    recorded = (metrics.get("run") or {}).get("predictions")
    return Path(recorded) if recorded and Path(recorded).is_file() else None


def rank_images(
    samples: Sequence[dict[str, Any]], predictions: Sequence[dict[str, Any]]
) -> list[EvalImageView]:
    """Every sample with a prediction, most DeepPCB errors (FP + FN) first, ties in split order."""
    by_id = {p["id"]: p for p in predictions}
    views = []
    for sample in samples:
        prediction = by_id.get(sample["id"])
        if prediction is None:
            continue
        match = deeppcb_match(sample["objects"], prediction["objects"])
        views.append(
            EvalImageView(
                sample["id"],
                sample["image"],
                list(sample["objects"]),
                list(prediction["objects"]),
                match.false_positives,
                match.false_negatives,
            )
        )
    return sorted(views, key=lambda v: -v.errors)  # stable


def load_evaluation(folder: Path, cfg: Config | None = None) -> Evaluation:
    """metrics.json of a checked folder, and its images ranked worst first from predictions.jsonl and the
    split's ground truth. Without either, the metrics still load and `note` says why there are no images."""
    metrics = read_metrics(folder)
    predictions_path = _predictions_file(folder, metrics)
    if predictions_path is None:
        return Evaluation(
            folder, metrics, [], f"no {PREDICTIONS_FILE} in {folder}: only the pre-drawn overlays"
        )
    problems = []
    for data_dir, split, limit in _split_source(metrics, cfg):
        try:
            samples = load_scoring_samples(data_dir, split)
            predictions = read_predictions(predictions_path, samples)
        except UserError as err:
            problems.append(str(err))
            continue
        samples = samples[:limit] if limit else samples
        return Evaluation(folder, metrics, rank_images(samples, predictions))
    reason = "; ".join(problems) or "the evaluated split is not recorded in metrics.json"
    return Evaluation(folder, metrics, [], f"ground truth not found ({reason}): only the pre-drawn overlays")


def metrics_tables(metrics: dict[str, Any]) -> tuple[list[list[Any]], list[list[Any]], list[list[Any]]]:
    """Rows of the three tables of report.md: DeepPCB protocol, COCO, per class (+ all)."""
    dp, coco, pc = metrics["deeppcb"], metrics["coco"], metrics["per_class"]

    def r(value: Any) -> Any:
        return round(value, 4) if isinstance(value, float) else value

    deeppcb = [
        [r(dp[k]) for k in ("precision", "recall", "fscore", "ap", "correct", "detections", "gt_boxes")]
    ]
    coco_rows = [[r(coco["map50"]), r(coco["map50_95"])]]
    per_class = []
    for label in LABELS:
        c = pc["classes"][label]
        per_class.append(
            [label, r(coco["per_class_ap50"].get(label))]
            + [r(c[k]) for k in ("precision", "recall", "f1", "tp", "fp", "fn")]
        )
    o = pc["overall"]
    per_class.append(
        ["all", r(coco["map50"])] + [r(o[k]) for k in ("precision", "recall", "f1", "tp", "fp", "fn")]
    )
    return deeppcb, coco_rows, per_class


DEEPPCB_COLUMNS = ["precision", "recall", "F-score", "AP", "correct", "detections", "gt boxes"]
COCO_COLUMNS = ["mAP@0.5", "mAP@0.5:0.95"]
PER_CLASS_COLUMNS = ["class", "AP50", "precision", "recall", "F1", "TP", "FP", "FN"]


def run_summary(evaluation: Evaluation) -> str:
    """Markdown: what was evaluated, and the counts."""
    metrics = evaluation.metrics
    lines = [f"**{evaluation.folder}**", ""]
    for key, value in (metrics.get("run") or {}).items():
        lines.append(f"- {key}: `{value}`")
    counts = metrics["counts"]
    lines.append(
        f"- images {counts['images']}, ground-truth boxes {counts['gt_boxes']}, detections "
        f"{counts['detections']}, parse failure rate {metrics['parse_failure_rate']:.2%}"
    )
    if evaluation.note:
        lines += ["", f"Note: {evaluation.note}"]
    return "\n".join(lines)


def image_choices(images: Sequence[EvalImageView]) -> list[tuple[str, str]]:
    """(label, id) of each image for the picker, in rank order."""
    return [
        (f"{rank}. {v.id}: {v.errors} errors (FP {v.false_positives}, FN {v.false_negatives})", v.id)
        for rank, v in enumerate(images, start=1)
    ]


def image_rows(images: Sequence[EvalImageView]) -> list[list[Any]]:
    return [
        [rank, v.id, v.errors, v.false_positives, v.false_negatives, len(v.gt), len(v.dets)]
        for rank, v in enumerate(images, start=1)
    ]


def draw_eval_image(
    view: EvalImageView, show_gt: bool, show_predictions: bool, min_score: float
) -> Image.Image:
    """The image with its ground truth and/or its predictions at or above min_score; predictions are coloured
    by the DeepPCB matching of the boxes shown (orange correct, red wrong)."""
    dets = filter_objects(view.dets, min_score) if show_predictions else []
    correct = deeppcb_match(view.gt, dets).det_correct if dets else None
    return draw_overlay(view.image, dets, view.gt if show_gt else [], correct)


def predrawn_overlays(folder: Path) -> list[tuple[Image.Image, str]]:
    """The overlays make eval drew (worst first: their file names carry the rank), with their names; shown
    when the images cannot be drawn again (no predictions.jsonl or no ground truth)."""
    overlays = []
    for path in sorted((folder / OVERLAY_DIR).glob("worst_*.png")):
        with Image.open(path) as img:
            overlays.append((img.convert("RGB"), path.stem))
    return overlays


def comparison_table(folder_a: Path, folder_b: Path) -> tuple[list[str], list[list[str]]]:
    """The two evaluations side by side with the deltas B - A: the table of `make eval COMPARE="A B"`
    (report.compare_runs, the one place that computes it), as header and rows for the page."""
    names = (
        (folder_a.name, folder_b.name) if folder_a.name != folder_b.name else (str(folder_a), str(folder_b))
    )
    markdown = compare_runs(read_metrics(folder_a), read_metrics(folder_b), names)
    lines = [line.strip().strip("|") for line in markdown.strip().splitlines()]
    header, rows = lines[0], lines[2:]  # lines[1] is the |---| separator
    return [c.strip() for c in header.split("|")], [[c.strip() for c in row.split("|")] for row in rows]


# ---------------------------------------------------------------------------------------------------------
# The page


def _failure(err: Exception) -> str:
    """One line for the page: a user error as it is, anything else with its type (traceback in the log)."""
    if isinstance(err, UserError):
        return f"error: {err}"
    log.exception("unexpected error in the UI")
    return f"error: {type(err).__name__}: {err} (the server's log has the details)"


def build_app(
    cfg: Config,
    model_ref: str | None = None,
    eval_roots: Sequence[str | Path] | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
):
    """The Gradio Blocks of the page (not launched)."""
    # Set before gradio is imported: no version check, no telemetry, no request leaves the machine.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    inspector = Inspector(cfg, model_ref, max_pixels)
    roots = [Path(r) for r in (eval_roots or [Path(cfg.paths.outputs_dir) / "eval"])]

    def warn(message: str) -> str:
        gr.Warning(message)
        return message

    # -- Inspect ------------------------------------------------------------------------------------------
    def inspect(image, template, min_score):
        try:
            result = inspector.detect(image, template)
            overlay, rows, answer, summary = inspection_view(result, min_score)
        except Exception as err:  # noqa: BLE001 - the page shows every failure as one line
            return None, None, [], None, "", warn(_failure(err))
        return result, overlay, rows, answer, summary, "ok"

    def refilter(result, min_score):
        if result is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            overlay, rows, answer, summary = inspection_view(result, min_score)
        except Exception as err:  # noqa: BLE001
            return None, [], None, warn(_failure(err))
        return overlay, rows, answer, summary

    # -- Browse -------------------------------------------------------------------------------------------
    def folder_choices() -> list[str]:
        return [str(f) for f in find_evaluations(roots)]

    def refresh():
        choices = folder_choices()
        return gr.update(choices=choices), gr.update(choices=choices)

    empty_eval = (
        None,
        "",
        [],
        [],
        [],
        None,
        gr.update(choices=[], value=None),
        [],
        None,
        gr.update(value=[], visible=False),
    )

    def open_evaluation(folder):
        if folder is None or str(folder).strip() == "":
            return (*empty_eval, "")
        try:
            evaluation = load_evaluation(check_eval_folder(folder, roots), cfg)
            deeppcb, coco, per_class = metrics_tables(evaluation.metrics)
            pr = evaluation.folder / PR_CURVE
            pr_image = Image.open(pr).convert("RGB") if pr.is_file() else None
            choices = image_choices(evaluation.images)
            first = choices[0][1] if choices else None
            overlay = draw_eval_image(evaluation.images[0], True, True, 0.0) if evaluation.images else None
            predrawn = [] if evaluation.images else predrawn_overlays(evaluation.folder)
            gallery = gr.update(value=predrawn, visible=bool(predrawn))
        except Exception as err:  # noqa: BLE001
            return (*empty_eval, warn(_failure(err)))
        return (
            evaluation,
            run_summary(evaluation),
            deeppcb,
            coco,
            per_class,
            pr_image,
            gr.update(choices=choices, value=first),
            image_rows(evaluation.images),
            overlay,
            gallery,
            evaluation.note or "ok",
        )

    def show_image(evaluation, image_id, show_gt, show_predictions, min_score):
        if evaluation is None or not image_id:
            return None
        view = next((v for v in evaluation.images if v.id == image_id), None)
        if view is None:
            return None
        try:
            return draw_eval_image(view, show_gt, show_predictions, min_score)
        except Exception as err:  # noqa: BLE001 - e.g. the image file was moved since the evaluation
            warn(_failure(err))
            return None

    def compare(folder_a, folder_b):
        if not folder_b:
            return None, None
        try:
            a, b = check_eval_folder(folder_a, roots), check_eval_folder(folder_b, roots)
            header, rows = comparison_table(a, b)
            pr = b / PR_CURVE
            pr_image = Image.open(pr).convert("RGB") if pr.is_file() else None
            return gr.update(value=rows, headers=header), pr_image
        except Exception as err:  # noqa: BLE001
            warn(_failure(err))
            return None, None

    with gr.Blocks(title="pcbvlm", analytics_enabled=False) as app:
        gr.Markdown(f"# pcbvlm: PCB defects\nmodel: `{inspector.model_ref}` (loaded on the first board)")
        with gr.Tab("Inspect a board", id="inspect"):
            state = gr.State(None)
            with gr.Row():
                with gr.Column(scale=1):
                    image_in = gr.File(label="Board image", file_types=["image"], elem_id="board-image")
                    template_in = gr.File(
                        label="Defect-free template (optional)",
                        file_types=["image"],
                        elem_id="template-image",
                    )
                    run_button = gr.Button("Find defects", variant="primary", elem_id="find-defects")
                    min_score = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Minimum confidence")
                    status = gr.Textbox(label="Status", interactive=False, elem_id="inspect-status")
                    summary = gr.Markdown(elem_id="inspect-summary")
                with gr.Column(scale=2):
                    overlay = gr.Image(
                        label="Overlay",
                        type="pil",
                        format="png",
                        interactive=False,
                        elem_id="overlay",
                        height=520,
                    )
            boxes = gr.Dataframe(
                headers=BOX_COLUMNS, label="Boxes (pixels)", interactive=False, elem_id="boxes"
            )
            answer = gr.JSON(label="JSON", elem_id="answer")
            run_button.click(
                inspect,
                [image_in, template_in, min_score],
                [state, overlay, boxes, answer, summary, status],
                concurrency_limit=1,
            )
            min_score.change(refilter, [state, min_score], [overlay, boxes, answer, summary])

        with gr.Tab("Browse an evaluation", id="browse"):
            evaluation_state = gr.State(None)
            choices = folder_choices()
            with gr.Row():
                folder_in = gr.Dropdown(
                    choices,
                    value=None,
                    label="Evaluation",
                    allow_custom_value=True,
                    elem_id="eval-folder",
                    scale=3,
                )
                other_in = gr.Dropdown(
                    choices,
                    value=None,
                    label="Compare with (optional)",
                    allow_custom_value=True,
                    elem_id="compare-folder",
                    scale=3,
                )
                refresh_button = gr.Button("Refresh list", scale=1)
            browse_status = gr.Textbox(label="Status", interactive=False, elem_id="browse-status")
            run_md = gr.Markdown()
            with gr.Row():
                deeppcb_df = gr.Dataframe(
                    headers=DEEPPCB_COLUMNS,
                    label="DeepPCB protocol",
                    interactive=False,
                    elem_id="deeppcb",
                    scale=3,
                )
                coco_df = gr.Dataframe(
                    headers=COCO_COLUMNS, label="COCO (pycocotools)", interactive=False, scale=1
                )
            per_class_df = gr.Dataframe(
                headers=PER_CLASS_COLUMNS, label="Per class", interactive=False, elem_id="per-class"
            )
            pr_curve = gr.Image(
                label="Precision-recall", type="pil", interactive=False, elem_id="pr-curve", height=340
            )
            gr.Markdown("### Images, worst first (FP + FN under the DeepPCB matching)")
            with gr.Row():
                image_pick = gr.Dropdown([], label="Image", elem_id="eval-image", scale=3)
                show_gt = gr.Checkbox(True, label="Ground truth (green)", elem_id="show-gt")
                show_pred = gr.Checkbox(
                    True, label="Predictions (orange correct, red wrong)", elem_id="show-pred"
                )
                eval_min_score = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Minimum confidence")
            with gr.Row():
                eval_overlay = gr.Image(
                    label="Image",
                    type="pil",
                    format="png",
                    interactive=False,
                    elem_id="eval-overlay",
                    height=560,
                    scale=3,
                )
                images_df = gr.Dataframe(
                    headers=IMAGE_COLUMNS, label="All images", interactive=False, max_height=560, scale=2
                )
            predrawn = gr.Gallery(
                label="Overlays drawn by make eval", columns=4, height="auto", visible=False
            )
            gr.Markdown("### Side by side (choose a second evaluation above)")
            with gr.Row():
                comparison = gr.Dataframe(
                    label="Metrics and deltas", interactive=False, elem_id="comparison", scale=1
                )
                other_pr_curve = gr.Image(
                    label="Precision-recall of the second evaluation", type="pil", interactive=False, scale=1
                )

            refresh_button.click(refresh, None, [folder_in, other_in])
            folder_in.change(
                open_evaluation,
                folder_in,
                [
                    evaluation_state,
                    run_md,
                    deeppcb_df,
                    coco_df,
                    per_class_df,
                    pr_curve,
                    image_pick,
                    images_df,
                    eval_overlay,
                    predrawn,
                    browse_status,
                ],
            ).then(compare, [folder_in, other_in], [comparison, other_pr_curve])
            other_in.change(compare, [folder_in, other_in], [comparison, other_pr_curve])
            for control in (image_pick, show_gt, show_pred, eval_min_score):
                control.change(
                    show_image,
                    [evaluation_state, image_pick, show_gt, show_pred, eval_min_score],
                    eval_overlay,
                )
    return app


def launch(
    cfg: Config,
    model_ref: str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    eval_roots: Sequence[str | Path] | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    block: bool = True,
):
    """Serve the page on host:port (127.0.0.1 unless told otherwise); returns the app when block is False."""
    app = build_app(cfg, model_ref, eval_roots, max_pixels)
    try:
        app.launch(
            server_name=host,
            server_port=port,
            share=False,
            show_error=False,
            max_file_size=MAX_UPLOAD,
            prevent_thread_lock=not block,
            quiet=False,
        )
    except OSError:  # Gradio's message names its own settings, not this job's
        raise UserError(
            f"cannot serve on {host}:{port}: the port is in use or not allowed; give another PORT="
        ) from None
    return app
