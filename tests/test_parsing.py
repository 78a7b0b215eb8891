"""parse_answer on messy model outputs: what is kept, what is counted, and that it never raises."""

from __future__ import annotations

import json
import random

import pytest

from pcbvlm.answer import format_answer
from pcbvlm.parsing import (
    ERROR_KINDS,
    NOTE_KINDS,
    ParseResult,
    canonical_label,
    mean_token_scores,
    parse_answer,
)

# A 1000 x 500 image: x in pixels = the 0-1000 value, y in pixels = half of it.
W, H = 1000, 500
BOX = "[100, 200, 300, 400]"
PX = (100.0, 100.0, 300.0, 200.0)


def obj(label="open", box=BOX, key="bbox_2d"):
    return f'{{"{key}": {box}, "label": "{label}"}}'


CASES = [
    # id, text, kept objects (label, pixel box), problems, error expected
    ("clean", f"[{obj()}]", [("open", PX)], {}, False),
    ("clean_empty", "[]", [], {}, False),
    ("clean_empty_spaced", " [ ] \n", [], {}, False),
    (
        "two_objects",
        f"[{obj()}, {obj('short', '[0, 0, 500, 1000]')}]",
        [("open", PX), ("short", (0, 0, 500, 500))],
        {},
        False,
    ),
    ("code_fence", f"```json\n[{obj()}]\n```", [("open", PX)], {"code_fence": 1}, False),
    ("text_around", f"The defects are: [{obj()}] Done.", [("open", PX)], {"extra_text": 1}, False),
    (
        "fence_and_text",
        f"Sure!\n```json\n[{obj()}]\n```",
        [("open", PX)],
        {"code_fence": 1, "extra_text": 1},
        False,
    ),
    ("brackets_in_prose", f"Defects [listed below]: [{obj()}]", [("open", PX)], {"extra_text": 1}, False),
    ("truncated_in_object", f'[{obj()}, {{"bbox_2d": [500, 6', [("open", PX)], {"truncated": 1}, True),
    ("truncated_after_comma", f"[{obj()}, ", [("open", PX)], {"truncated": 1}, True),
    (
        "truncated_in_label",
        f'[{obj()}, {{"bbox_2d": [1, 2, 3, 4], "label": "sho',
        [("open", PX)],
        {"truncated": 1},
        True,
    ),
    ("truncated_at_start", "[", [], {"truncated": 1}, True),
    ("trailing_comma", f"[{obj()},]", [("open", PX)], {}, False),
    ("unknown_label", f"[{obj('scratch')}, {obj('copper')}]", [("copper", PX)], {"unknown_label": 1}, True),
    (
        "out_of_range",
        f"[{obj(box='[-20, 200, 1200, 400]')}]",
        [("open", (0, 100, 1000, 200))],
        {"out_of_range": 1},
        True,
    ),
    ("swapped", f"[{obj(box='[300, 400, 100, 200]')}]", [("open", PX)], {"swapped": 1}, True),
    ("swapped_x_only", f"[{obj(box='[300, 200, 100, 400]')}]", [("open", PX)], {"swapped": 1}, True),
    ("degenerate", f"[{obj(box='[100, 200, 100, 400]')}]", [], {"degenerate": 1}, True),
    # clipped to [1000, 200, 1000, 400]: zero width
    (
        "degenerate_after_clip",
        f"[{obj(box='[1100, 200, 1200, 400]')}]",
        [],
        {"out_of_range": 1, "degenerate": 1},
        True,
    ),
    ("missing_keys", '[{"label": "open"}, {"bbox_2d": [1, 2, 3, 4]}]', [], {"missing_key": 2}, True),
    ("non_numeric", "[" + obj(box='[100, "abc", 300, 400]') + "]", [], {"bad_value": 1}, True),
    ("null_coordinate", f"[{obj(box='[100, null, 300, 400]')}]", [], {"bad_value": 1}, True),
    ("bool_coordinate", f"[{obj(box='[true, 200, 300, 400]')}]", [], {"bad_value": 1}, True),
    ("nan_coordinate", f"[{obj(box='[NaN, 200, 300, 400]')}]", [], {"bad_value": 1}, True),
    ("three_numbers", f"[{obj(box='[100, 200, 300]')}]", [], {"bad_value": 1}, True),
    ("box_not_a_list", f"[{obj(box='100')}]", [], {"bad_value": 1}, True),
    ("label_not_a_string", '[{"bbox_2d": [100, 200, 300, 400], "label": 3}]', [], {"bad_value": 1}, True),
    (
        "numeric_strings",
        "[" + obj(box='["100", "200", 300, 400]') + "]",
        [("open", PX)],
        {"numeric_string": 2},
        False,
    ),
    (
        "float_coordinates",
        f"[{obj(box='[100.4, 200, 300, 400.0]')}]",
        [("open", (100.4, 100, 300, 200))],
        {},
        False,
    ),
    ("alt_key_bbox", f"[{obj(key='bbox')}]", [("open", PX)], {"alt_key": 1}, False),
    (
        "alt_key_class",
        '[{"bbox_2d": [100, 200, 300, 400], "class": "open"}]',
        [("open", PX)],
        {"alt_key": 1},
        False,
    ),
    ("single_dict", obj(), [("open", PX)], {"no_list": 1}, False),
    ("dicts_one_per_line", f"{obj()}\n{obj('spur')}", [("open", PX), ("spur", PX)], {"no_list": 1}, False),
    ("dicts_with_commas", f"{obj()}, {obj('spur')}", [("open", PX), ("spur", PX)], {"no_list": 1}, False),
    ("single_dict_truncated", '{"bbox_2d": [100, 200', [], {"no_list": 1, "truncated": 1}, True),
    ("empty", "", [], {"empty_output": 1}, True),
    ("whitespace", "  \n\t", [], {"empty_output": 1}, True),
    ("none", None, [], {"empty_output": 1}, True),
    ("prose_only", "No defects found.", [], {"no_json": 1}, True),
    (
        "unquoted_label_then_good",
        f'[{{"bbox_2d": {BOX}, "label": open}}, {obj("short")}]',
        [("short", PX)],
        {"invalid_json": 1},
        True,
    ),
    ("missing_comma", f"[{obj()} {obj('spur')}]", [("open", PX), ("spur", PX)], {"invalid_json": 1}, True),
    (
        "bare_dict_invalid_then_good",
        f'{{"bbox_2d": {BOX}, "label": open}}\n{obj("short")}',
        [("short", PX)],
        {"no_list": 1, "invalid_json": 1},
        True,
    ),
    ("list_of_lists", "[[100, 200, 300, 400]]", [], {"not_an_object": 1}, True),
    ("list_of_strings", '["open"]', [], {"not_an_object": 1}, True),
    ("brackets_only_in_prose", "see [figure 1]", [], {"invalid_json": 1}, True),
    ("deep_nesting", "[" * 5000, [], {"truncated": 1}, True),
    # beyond the float range: the box is unusable, not a crash
    ("huge_integer", f"[{obj(box='[1' + '0' * 400 + ', 200, 300, 400]')}]", [], {"bad_value": 1}, True),
    # beyond int()'s digit limit, which raises inside the JSON decoder
    (
        "endless_integer",
        f"[{obj(box='[1' + '0' * 5000 + ', 200, 300, 400]')}, {obj('spur')}]",
        [("spur", PX)],
        {"invalid_json": 1},
        True,
    ),
]


@pytest.mark.parametrize(
    ("text", "objects", "problems", "has_error"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_messy_outputs(text, objects, problems, has_error):
    result = parse_answer(text, W, H)
    assert [(o.label, o.bbox) for o in result.objects] == [
        (label, pytest.approx(box)) for label, box in objects
    ]
    assert dict(result.problems) == problems
    assert (result.error is not None) == has_error
    assert all(o.score == 1.0 for o in result.objects)  # no score until the generation code gives one


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("Pin hole", "pin-hole"),
        ("pinhole", "pin-hole"),
        ("pin_hole", "pin-hole"),
        ("PIN-HOLE", "pin-hole"),
        ("mouse bite", "mousebite"),
        ("Mouse-Bite", "mousebite"),
        ("Open", "open"),
        ("open circuit", "open"),
        ("short_circuit", "short"),
        ("spurious copper", "copper"),
        ("spurs", "spur"),
    ],
)
def test_label_spellings_become_canonical(written, canonical):
    assert canonical_label(written) == canonical
    result = parse_answer(f"[{obj(written)}]", W, H)
    assert [o.label for o in result.objects] == [canonical]
    assert dict(result.problems) == {"label_variant": 1}
    assert result.error is None  # a spelling loses nothing


@pytest.mark.parametrize("label", ["scratch", "missing hole", "", "opening"])
def test_unknown_labels_are_not_guessed(label):
    assert canonical_label(label) is None


def test_error_names_each_kind_with_its_count():
    text = f'[{obj("scratch")}, {obj("dirt")}, {obj(box="[300, 400, 100, 200]")}, {{"bbox_2d": [1'
    result = parse_answer(text, W, H)
    assert len(result.objects) == 1
    # In ERROR_KINDS order; notes never appear in the error.
    assert result.error == "truncated, unknown_label x2, swapped"


def test_problem_kinds_are_declared():
    assert not set(ERROR_KINDS) & set(NOTE_KINDS)
    for text, *_ in [c[1:] for c in CASES]:
        assert set(parse_answer(text, W, H).problems) <= set(ERROR_KINDS) | set(NOTE_KINDS)


def test_spans_point_at_each_kept_object_in_the_original_text():
    first, second = obj(), obj("spur", "[0, 0, 500, 1000]")
    text = f"Here:\n```json\n[{first}, {obj('dirt')}, {second}]\n```"
    result = parse_answer(text, W, H)
    assert [text[a:b] for a, b in result.spans] == [first, second]  # the dropped "dirt" object has none
    assert json.loads(text[slice(*result.spans[1])])["label"] == "spur"


def test_spans_of_bare_objects_and_truncated_lists():
    text = f"{obj()}\n{obj('short')}"
    result = parse_answer(text, W, H)
    assert [text[a:b] for a, b in result.spans] == [obj(), obj("short")]
    text = f'[{obj()}, {{"bbox_2d": [5'
    assert [text[a:b] for a, b in parse_answer(text, W, H).spans] == [obj()]


def test_with_scores_and_prediction_record():
    text = f"[{obj()}, {obj('short')}, {obj('dirt')}]"
    result = parse_answer(text, W, H).with_scores([0.25, 0.5])
    assert [o.score for o in result.objects] == [0.25, 0.5]
    record = result.to_prediction("20085000", text)
    assert record == {
        "id": "20085000",
        "objects": [
            {"label": "open", "bbox": list(PX), "score": 0.25},
            {"label": "short", "bbox": list(PX), "score": 0.5},
        ],
        "raw": text,
        "error": "unknown_label",
        "problems": {"unknown_label": 1},
    }
    json.dumps(record)  # the record is a jsonl line as it is
    with pytest.raises(ValueError, match="1 scores for 2 objects"):
        parse_answer(text, W, H).with_scores([0.3])


def test_mean_token_scores():
    # Text "[{a}, {b}]" split into tokens: "[{" 0-2, "a" 2-3, "}," 3-5, " {" 5-7, "b" 7-8, "}]" 8-10.
    offsets = [(0, 2), (2, 3), (3, 5), (5, 7), (7, 8), (8, 10)]
    probs = [0.9, 0.6, 0.3, 1.0, 0.2, 0.8]
    # {a} spans 1-4: tokens 0, 1, 2 -> (0.9 + 0.6 + 0.3) / 3 = 0.6
    # {b} spans 6-9: tokens 3, 4, 5 -> (1.0 + 0.2 + 0.8) / 3 = 2/3
    assert mean_token_scores([(1, 4), (6, 9)], offsets, probs) == pytest.approx([0.6, 2 / 3])
    assert mean_token_scores([(20, 25)], offsets, probs) == [1.0]  # no token there
    with pytest.raises(ValueError):
        mean_token_scores([(0, 1)], offsets, probs[:-1])


def test_round_trip_with_format_answer():
    # What training teaches the model to write parses back to the same boxes, within the 0-1000
    # rounding (at most size / 2000 px), with no problem at all.
    width, height = 640, 480
    truth = [
        {"label": "open", "bbox": [12, 30, 57, 81]},
        {"label": "pin-hole", "bbox": [600, 400, 639, 479]},
        {"label": "mousebite", "bbox": [0, 0, 18, 18]},
    ]
    result = parse_answer(format_answer(truth, width, height), width, height)
    assert result.problems == {}
    assert [o.label for o in result.objects] == [t["label"] for t in truth]
    for parsed, original in zip(result.objects, truth, strict=True):
        assert parsed.bbox == pytest.approx(original["bbox"], abs=max(width, height) / 2000 + 0.01)


def test_never_raises_on_garbage():
    rng = random.Random(0)
    alphabet = list('[]{},:" \n0123456789.-eE') + [
        "bbox_2d",
        "label",
        "open",
        "null",
        "true",
        "NaN",
        "```",
        "\\",
    ]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        result = parse_answer(text, W, H)
        assert isinstance(result, ParseResult)
        for o in result.objects:
            x1, y1, x2, y2 = o.bbox
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
            assert text[o.span[0]] == "{" and text[o.span[1] - 1] == "}"


# --- Gaps found by mutation testing (make mutation) --------------------------------------------------------

BAD = '{"label": "a]b\\\\\\"}", "bbox_2d": [1, 2, 3, 4], oops}'  # invalid: a bare word; "]", "}" and \" in a string
EMPTY_KEY_BAD = '{"": "]", oops}'  # invalid, and its first string is empty

MORE_CASES = [
    # A complete last object, then the text ends: kept, and the cut-off list is counted.
    ("complete_last_object", f"[{obj()}", [("open", PX)], {"truncated": 1}),
    ("complete_last_object_comma", f"[{obj()},", [("open", PX)], {"truncated": 1}),
    ("cut_inside_second", f'[{obj()}, {{"bbox_2d": [1, 2', [("open", PX)], {"truncated": 1}),
    # Skipping invalid elements must respect strings (brackets and escaped quotes inside them).
    ("invalid_then_valid", f"[{BAD}, {obj('short')}]", [("short", PX)], {"invalid_json": 1}),
    ("empty_string_key", f"[{EMPTY_KEY_BAD}, {obj()}]", [("open", PX)], {"invalid_json": 1}),
    ("two_invalid", f"[{BAD}, {BAD}, {obj()}]", [("open", PX)], {"invalid_json": 2}),
    ("invalid_bare_object_then_valid", f"{BAD}{obj()}", [("open", PX)], {"invalid_json": 1, "no_list": 1}),
    ("two_invalid_bare_objects", f"{BAD}{BAD}{obj()}", [("open", PX)], {"invalid_json": 2, "no_list": 1}),
    ("two_missing_commas", f"[{obj()} {obj()} {obj()}]", [("open", PX)] * 3, {"invalid_json": 2}),
    ("junk_inside_list", f"[{obj()} oops]", [("open", PX)], {"invalid_json": 1, "extra_text": 1}),
    ("invalid_then_junk", f"[{BAD}, {obj()} oops]", [("open", PX)], {"invalid_json": 2, "extra_text": 1}),
    ("only_invalid_object_in_list", "[{oops}]", [], {"invalid_json": 1}),
    # A list that holds an object is the answer, even when a later element is not an object.
    ("object_then_number", f"[{obj()}, 5]", [("open", PX)], {"not_an_object": 1}),
    # Text right after the closing bracket is extra text.
    ("empty_then_text", "[]!", [], {"extra_text": 1}),
    ("trailing_comma_then_text", f"[{obj()},]!", [("open", PX)], {"extra_text": 1}),
    ("list_then_text", f"[{obj()}]!", [("open", PX)], {"extra_text": 1}),
    ("text_before_bare_object", f"Here: {obj()}", [("open", PX)], {"no_list": 1, "extra_text": 1}),
    ("bare_objects_no_space", f"{obj()},{obj('spur')}", [("open", PX), ("spur", PX)], {"no_list": 1}),
    # Counts add up over the objects of one answer.
    ("two_not_objects", f"[{obj()}, 5, 6]", [("open", PX)], {"not_an_object": 2}),
    (
        "two_alt_keys_and_variants",
        f"[{obj('Open', key='bbox')}, {obj('Short', key='box')}]",
        [("open", PX), ("short", PX)],
        {"alt_key": 2, "label_variant": 2},
    ),
    (
        "two_bad_values_each_way",
        f'[{{"bbox_2d": [1, 2, 3], "label": "open"}}, {{"bbox_2d": [1, 2, 3], "label": "open"}}, '
        f'{{"bbox_2d": {BOX}, "label": 7}}, {{"bbox_2d": {BOX}, "label": 7}}, '
        f'{{"bbox_2d": [1, 2, 3, "x"], "label": "open"}}, {{"bbox_2d": [1, 2, 3, null], "label": "open"}}]',
        [],
        {"bad_value": 6},
    ),
    (
        "two_out_of_range_swapped_degenerate",
        f"[{obj(box='[-5, 0, 100, 1200]')}, {obj(box='[0, -1, 100, 100]')}, "
        f"{obj(box='[300, 400, 100, 200]')}, {obj(box='[300, 200, 100, 400]')}, "
        f"{obj(box='[100, 200, 100, 400]')}, {obj(box='[100, 200, 300, 200]')}]",
        [("open", (0, 0, 100, 500)), ("open", (0, 0, 100, 50)), ("open", PX), ("open", PX)],
        {"out_of_range": 2, "swapped": 2, "degenerate": 2},
    ),
]


@pytest.mark.parametrize(
    ("text", "objects", "problems"), [c[1:] for c in MORE_CASES], ids=[c[0] for c in MORE_CASES]
)
def test_more_messy_outputs(text, objects, problems):
    result = parse_answer(text, W, H)
    assert [(o.label, o.bbox) for o in result.objects] == [
        (label, pytest.approx(box)) for label, box in objects
    ]
    assert dict(result.problems) == problems


def test_problems_of_a_fresh_answer_count_once():
    assert parse_answer("  ", W, H).problems == {"empty_output": 1}
    assert parse_answer("no boxes", W, H).problems == {"no_json": 1}
    assert parse_answer("x [1, 2] y", W, H).problems == {"not_an_object": 2, "extra_text": 1}
    fenced = parse_answer(f"```json\n[{obj()}]\n```", W, H)
    assert fenced.problems == {"code_fence": 1} and len(fenced.objects) == 1


def test_plural_stripping_needs_a_known_singular():
    assert canonical_label("glass") is None and canonical_label("s") is None
    assert canonical_label("shorts") == "short"


def test_mean_token_scores_takes_only_tokens_inside_the_span():
    # Span [2, 5): the token [0, 2) ends where it starts and [5, 7) starts where it ends: neither counts.
    assert mean_token_scores([(2, 5)], [(0, 2), (2, 5), (5, 7)], [0.1, 0.5, 0.9]) == [0.5]
    with pytest.raises(ValueError, match="3 token offsets for 2 probabilities"):
        mean_token_scores([(0, 1)], [(0, 1), (1, 2), (2, 3)], [0.5, 0.5])
