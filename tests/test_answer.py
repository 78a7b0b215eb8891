"""The answer format both ways: pixels -> Qwen3-VL's 0-1000 integers (training answers) and back
(evaluation, inference), on images that are not square so that x and y scales cannot be swapped."""

from __future__ import annotations

import json

from pcbvlm.answer import format_answer, to_pixels, to_relative


def test_to_relative_scales_x_by_width_and_y_by_height():
    # 800 x 400: x * 1.25, y * 2.5 (10.2 -> 12.75 -> 13, 20.2 -> 50.5 -> 50, as Python rounds halves to even).
    assert to_relative([10.2, 20.2, 400, 200], 800, 400) == [13, 50, 500, 500]
    assert to_relative([0, 0, 800, 400], 800, 400) == [0, 0, 1000, 1000]


def test_to_relative_clamps_to_0_1000():
    assert to_relative([-5, -1, 801, 450], 800, 400) == [0, 0, 1000, 1000]
    assert to_relative([0.3, 0.1, 799.7, 399.9], 800, 400) == [0, 0, 1000, 1000]
    assert to_relative([0.5, 0.3, 799.5, 399.7], 800, 400) == [1, 1, 999, 999]


def test_to_pixels_scales_back_with_two_decimals():
    # 641 x 479: three-decimal products, rounded to two.
    assert to_pixels([333, 777, 501, 999], 641, 479) == [213.45, 372.18, 321.14, 478.52]
    assert to_pixels([0, 0, 1000, 1000], 641, 479) == [0.0, 0.0, 641.0, 479.0]


def test_format_answer_keeps_order_labels_and_writes_unicode_as_is():
    objects = [
        {"label": "short", "bbox": [80, 40, 160, 80]},
        {"label": "défaut", "bbox": [0, 0, 8, 4]},
    ]
    text = format_answer(objects, 800, 400)
    assert (
        text
        == '[{"bbox_2d": [100, 100, 200, 200], "label": "short"}, {"bbox_2d": [0, 0, 10, 10], "label": "défaut"}]'
    )
    assert json.loads(text)[1]["label"] == "défaut"
    assert format_answer([], 800, 400) == "[]"
