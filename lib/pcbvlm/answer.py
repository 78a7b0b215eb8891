"""The answer format: grounding JSON `[{"bbox_2d": [x1, y1, x2, y2], "label": "open"}, ...]` in integer
coordinates of the model family's answer frame.

A frame is the size of the image in answer units, (width, height): Qwen3-VL answers in a relative
1000 x 1000 frame, Qwen2.5-VL in the pixels of the image as its processor resized it
(pcbvlm.families: `answer_frame`). `to_frame` / `from_frame` scale a box between the image's pixels and
a frame (x by width, y by height); a pixel -> frame -> pixel round trip moves a box by at most
size / (2 * frame) px (0.32 px on a 640 px DeepPCB image in the 1000 frame). `format_answer` is the one
function that turns pixel boxes into the text the model learns to write; training, evaluation (ground
truth prompts) and inference all use it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

Frame = tuple[int, int]
REL_SCALE = 1000
RELATIVE_FRAME: Frame = (REL_SCALE, REL_SCALE)  # Qwen3-VL's 0-1000 of the image


def to_frame(box: Sequence[float], width: int, height: int, frame: Frame) -> list[int]:
    """Pixel box [x1, y1, x2, y2] of a width x height image -> integer box in `frame`, clamped to it."""
    x1, y1, x2, y2 = box
    frame_w, frame_h = frame
    scale_x, scale_y = frame_w / width, frame_h / height
    return [
        _clamp(x1 * scale_x, frame_w),
        _clamp(y1 * scale_y, frame_h),
        _clamp(x2 * scale_x, frame_w),
        _clamp(y2 * scale_y, frame_h),
    ]


def _clamp(value: float, limit: int) -> int:
    return min(limit, max(0, round(value)))


def from_frame(box: Sequence[float], width: int, height: int, frame: Frame) -> list[float]:
    """Box in `frame` -> pixel box of a width x height image (floats, two decimals)."""
    x1, y1, x2, y2 = box
    frame_w, frame_h = frame
    return [
        round(x1 * width / frame_w, 2),
        round(y1 * height / frame_h, 2),
        round(x2 * width / frame_w, 2),
        round(y2 * height / frame_h, 2),
    ]


def to_relative(box: Sequence[float], width: int, height: int) -> list[int]:
    """Pixel box -> integer 0-1000 box (the relative frame)."""
    return to_frame(box, width, height, RELATIVE_FRAME)


def to_pixels(box: Sequence[float], width: int, height: int) -> list[float]:
    """0-1000 box -> pixel box of a width x height image (floats, two decimals)."""
    return from_frame(box, width, height, RELATIVE_FRAME)


def format_answer(objects: Sequence[dict], width: int, height: int, frame: Frame = RELATIVE_FRAME) -> str:
    """`[{"label": "open", "bbox": [px...]}]` -> `[{"bbox_2d": [frame...], "label": "open"}, ...]`.

    Objects keep their order (annotation order); no objects gives `[]`. `frame`: the model family's
    answer frame for this image (`ModelFamily.answer_frame`); the relative 1000 x 1000 one by default.
    """
    items = [
        {"bbox_2d": to_frame(obj["bbox"], width, height, frame), "label": obj["label"]} for obj in objects
    ]
    return json.dumps(items, ensure_ascii=False)
