"""The answer format: Qwen3-VL grounding JSON in relative 0-1000 integer coordinates.

`format_answer` is the one function that turns pixel boxes into the text the model learns to write;
training, evaluation (ground-truth prompts) and inference all use it. `to_relative` / `to_pixels`
convert coordinates; a pixel -> 0-1000 -> pixel round trip moves a box by at most size/2000 px
(0.32 px on a 640 px DeepPCB image).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

REL_SCALE = 1000


def to_relative(box: Sequence[float], width: int, height: int) -> list[int]:
    """Pixel box [x1, y1, x2, y2] -> integer 0-1000 box (Qwen3-VL's grounding coordinates)."""
    x1, y1, x2, y2 = box
    scale_x, scale_y = REL_SCALE / width, REL_SCALE / height
    return [_clamp(x1 * scale_x), _clamp(y1 * scale_y), _clamp(x2 * scale_x), _clamp(y2 * scale_y)]


def _clamp(value: float) -> int:
    return min(REL_SCALE, max(0, round(value)))


def to_pixels(box: Sequence[float], width: int, height: int) -> list[float]:
    """0-1000 box -> pixel box of a width x height image (floats, two decimals)."""
    x1, y1, x2, y2 = box
    return [
        round(x1 * width / REL_SCALE, 2),
        round(y1 * height / REL_SCALE, 2),
        round(x2 * width / REL_SCALE, 2),
        round(y2 * height / REL_SCALE, 2),
    ]


def format_answer(objects: Sequence[dict], width: int, height: int) -> str:
    """`[{"label": "open", "bbox": [px...]}]` -> `[{"bbox_2d": [rel...], "label": "open"}, ...]`.

    Objects keep their order (annotation order); no objects gives `[]`.
    """
    items = [{"bbox_2d": to_relative(obj["bbox"], width, height), "label": obj["label"]} for obj in objects]
    return json.dumps(items, ensure_ascii=False)
