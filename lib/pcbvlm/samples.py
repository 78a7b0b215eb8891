"""The neutral sample format every stage reads, whatever dataset format it was imported from.

`make data` (`pcbvlm.datasets`) writes `<data_dir>/{train,val,test}.jsonl` and `stats.json`. One line is
one sample:

    {"id": "20085000", "split": "train", "image": "/abs/board.jpg", "template": "/abs/template.jpg" | absent,
     "annotation": "/abs/source file", "width": 640, "height": 480,
     "objects": [{"label": "open", "bbox": [x1, y1, x2, y2]}],   # pixels of the original image
     "classes": ["open", "short", ...],                          # the dataset's class list, in order
     "messages": [...]}                                          # the training chat (build_messages)

The class list travels with the dataset: in every sample and in stats.json (`classes`). Data converted
before class lists existed has neither; it is DeepPCB data, so `DEFAULT_CLASSES` (pcbvlm.labels) applies.

The assistant turn is written in the answer frame of a model family (pcbvlm.families): `make data`
writes it for the configured model's family, and training writes it again for the family it trains
(`set_answers`), so data converted for one family can never teach another family's coordinates.

Public API: `build_messages`, `set_answers`, `render_prompt`, `load_samples`, `dataset_classes`,
`OUTPUT_SPLITS`, `STATS_FILE`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pcbvlm.answer import RELATIVE_FRAME, format_answer
from pcbvlm.config import DataConfig
from pcbvlm.errors import DataError
from pcbvlm.io import read_jsonl
from pcbvlm.labels import LABELS

if TYPE_CHECKING:
    from pcbvlm.families import ModelFamily

OUTPUT_SPLITS: tuple[str, ...] = ("train", "val", "test")
STATS_FILE = "stats.json"
CLASSES_PLACEHOLDER = "{classes}"
# The class list of data written before datasets carried their own (those were all DeepPCB).
DEFAULT_CLASSES: tuple[str, ...] = LABELS


def render_prompt(prompt: str, classes: Sequence[str]) -> str:
    """The prompt with `{classes}` replaced by the class names, comma separated.

    A plain replace rather than str.format: the prompts also hold literal JSON braces
    (`{"bbox_2d": ...}`) that format() would read as fields.
    """
    return prompt.replace(CLASSES_PLACEHOLDER, ", ".join(classes))


def sample_classes(sample: Mapping[str, Any]) -> tuple[str, ...]:
    """The class list a sample was converted with (DeepPCB's for samples that predate class lists)."""
    classes = sample.get("classes")
    return tuple(classes) if classes else DEFAULT_CLASSES


def build_messages(
    sample: Mapping[str, Any],
    data_cfg: DataConfig,
    with_answer: bool = True,
    family: ModelFamily | None = None,
) -> list[dict]:
    """The chat of one sample, in the transformers chat-template format.

    `sample` needs `image` (path of the board under test) and, with `data_cfg.with_template`, `template`
    (the defect-free board, shown first); with `with_answer`, also `objects`, `width` and `height`, from
    which the assistant turn is written by `pcbvlm.answer.format_answer` in `family`'s answer frame
    (the relative 0-1000 frame of the default family, Qwen3-VL, without one). The prompt's `{classes}` is
    filled from `sample["classes"]`. Evaluation and inference call this with `with_answer=False` so that
    the prompt is byte-for-byte the one trained on.
    """
    if data_cfg.with_template:
        template = sample.get("template")
        if not template:
            raise DataError(
                f"sample {sample.get('id', sample.get('image'))}: data.with_template is true but no template "
                "image is given"
            )
        images = [str(template), str(sample["image"])]
        prompt = data_cfg.template_prompt
    else:
        images = [str(sample["image"])]
        prompt = data_cfg.prompt
    content: list[dict[str, str]] = [{"type": "image", "image": path} for path in images]
    content.append({"type": "text", "text": render_prompt(prompt, sample_classes(sample))})
    messages: list[dict] = [{"role": "user", "content": content}]
    if with_answer:
        width, height = int(sample["width"]), int(sample["height"])
        frame = (
            RELATIVE_FRAME
            if family is None
            else family.answer_frame(width, height, data_cfg.min_pixels, data_cfg.max_pixels)
        )
        answer = format_answer(sample["objects"], width, height, frame)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def set_answers(rows: Sequence[dict[str, Any]], data_cfg: DataConfig, family: ModelFamily) -> None:
    """(Re)write the chat of every converted sample with its answer in `family`'s frame, in place."""
    for row in rows:
        row["messages"] = build_messages(row, data_cfg, family=family)


def load_samples(data_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """The converted samples of `split` (train, val or test), as written by `make data`."""
    if split not in OUTPUT_SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(OUTPUT_SPLITS)}")
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(
            f"{path}: converted data not found (run `make data` first: DEEPPCB_DIR=... or FORMAT=coco|yolo|voc SRC=...)"
        )
    return read_jsonl(path)


def dataset_classes(data_dir: str | Path) -> tuple[str, ...]:
    """The class list of a converted folder: stats.json's `classes`, else DeepPCB's (older conversions,
    and hand-written splits without a stats.json)."""
    path = Path(data_dir) / STATS_FILE
    if not path.is_file():
        return DEFAULT_CLASSES
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable stats file ({err})") from None
    classes = stats.get("classes") if isinstance(stats, dict) else None
    if classes is None:
        return DEFAULT_CLASSES
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)):
        raise DataError(f"{path}: 'classes' must be a non-empty list of names")
    return tuple(classes)
