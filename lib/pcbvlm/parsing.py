"""Model text -> defect objects in pixels. `parse_answer` never raises, whatever the model wrote.

The trained answer is `[{"bbox_2d": [x1, y1, x2, y2], "label": "open"}, ...]` in the model family's
answer frame (see `pcbvlm.answer`; 0-1000 for Qwen3-VL, the default). Real outputs drift from it; every deviation is counted by kind in
`ParseResult.problems`. Two families of kinds:

- ERROR_KINDS: the answer could not be read as written, so objects were dropped or changed
  (truncated or invalid JSON, unknown labels, missing keys, non-numeric or clipped or swapped
  coordinates, degenerate boxes, empty output). Any of them makes `ParseResult.error` non-null, and
  the sample counts towards the parse failure rate.
- NOTE_KINDS: wrappers and spellings that lose nothing (a code fence, text around the JSON, one
  object instead of a list, "bbox" for "bbox_2d", "Pin hole" for "pin-hole", "12" for 12). They are
  counted so that format drift shows in the report, but the answer is still "clean".

The text is scanned element by element with `json.JSONDecoder.raw_decode`, so each kept object also
carries the character span [start, end) of its `{...}` in the original text: the generation code maps
spans to generated tokens (`mean_token_scores`) and attaches per-box scores with `with_scores`.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pcbvlm.answer import RELATIVE_FRAME, Frame, from_frame
from pcbvlm.labels import LABELS

ERROR_KINDS: tuple[str, ...] = (
    "empty_output",  # nothing but whitespace
    "no_json",  # no '[' or '{' at all
    "invalid_json",  # a list element or object that JSON cannot read (skipped)
    "truncated",  # the output stops inside the list or an object (complete objects are kept)
    "not_an_object",  # a list element that is not a {...} (dropped)
    "missing_key",  # an object without a box or a label (dropped)
    "bad_value",  # a box that is not 4 finite numbers, or a label that is not a string (dropped)
    "unknown_label",  # a label that is no DeepPCB class in any spelling (dropped)
    "out_of_range",  # a coordinate outside the answer frame (0-1000 for Qwen3-VL; clipped)
    "swapped",  # x1 > x2 or y1 > y2 (swapped back)
    "degenerate",  # zero width or height after clipping (dropped)
)
NOTE_KINDS: tuple[str, ...] = (
    "code_fence",  # ```json ... ```
    "extra_text",  # text before or after the JSON
    "no_list",  # one object, or objects one after another, without the enclosing [...]
    "alt_key",  # "bbox" / "box" for "bbox_2d", "class" / "category" for "label"
    "label_variant",  # a class written differently ("Pin hole", "mouse_bite", "Open")
    "numeric_string",  # a coordinate written as a string ("12")
)

_BOX_KEYS = ("bbox_2d", "bbox", "box", "bbox2d")
_LABEL_KEYS = ("label", "class", "category", "name")
# Names seen for the DeepPCB classes in other datasets and papers (normalized: letters only).
_ALIASES = {
    "opencircuit": "open",
    "shortcircuit": "short",
    "spuriouscopper": "copper",
    "pinhole": "pin-hole",
}
_FENCE = re.compile(r"```[A-Za-z0-9_-]*")
_WS = re.compile(r"\s*")
_DECODER = json.JSONDecoder()


def _letters(text: str) -> str:
    return re.sub(r"[^a-z]", "", text.lower())


@functools.lru_cache(maxsize=8)
def _canonical(classes: tuple[str, ...]) -> dict[str, str]:
    """Spelling-free key -> class name; the DeepPCB aliases count only for classes in the list."""
    aliases = {key: name for key, name in _ALIASES.items() if name in classes}
    return aliases | {_letters(name): name for name in classes}


def canonical_label(text: str, classes: Sequence[str] | None = None) -> str | None:
    """A class name in any case, spacing or punctuation ("Pin hole", "mouse_bite", "Shorts") -> the
    canonical name from `classes` (the dataset's; DeepPCB's by default), or None when it is none of them."""
    canonical = _canonical(tuple(classes) if classes else LABELS)
    key = _letters(text)
    if key in canonical:
        return canonical[key]
    if key.endswith("s") and key[:-1] in canonical:  # plurals: "opens", "spurs"
        return canonical[key[:-1]]
    return None


@dataclass(frozen=True)
class ParsedObject:
    label: str  # canonical class name
    bbox: tuple[float, float, float, float]  # pixels of the original image, x1 < x2, y1 < y2
    span: tuple[int, int]  # [start, end) of the object's {...} in the model text
    score: float = 1.0  # 1.0 until the generation code attaches token probabilities

    def to_dict(self) -> dict[str, Any]:
        """The object as written to predictions.jsonl."""
        return {"label": self.label, "bbox": list(self.bbox), "score": self.score}


@dataclass(frozen=True)
class ParseResult:
    objects: tuple[ParsedObject, ...] = ()
    problems: Mapping[str, int] = field(default_factory=dict)  # kind -> count (ERROR_KINDS + NOTE_KINDS)

    @property
    def error(self) -> str | None:
        """What went wrong, e.g. "truncated, unknown_label x2"; None when nothing was lost or changed."""
        parts = [
            kind if self.problems[kind] == 1 else f"{kind} x{self.problems[kind]}"
            for kind in ERROR_KINDS
            if self.problems.get(kind)
        ]
        return ", ".join(parts) or None

    @property
    def spans(self) -> list[tuple[int, int]]:
        return [obj.span for obj in self.objects]

    def with_scores(self, scores: Sequence[float]) -> ParseResult:
        """The same result with one score per object (in object order)."""
        if len(scores) != len(self.objects):
            raise ValueError(f"{len(scores)} scores for {len(self.objects)} objects")
        pairs = zip(self.objects, scores, strict=True)  # pragma: no mutate (lengths checked above)
        objects = tuple(replace(obj, score=float(s)) for obj, s in pairs)
        return replace(self, objects=objects)

    def to_prediction(self, sample_id: str, raw: str) -> dict[str, Any]:
        """One line of predictions.jsonl. `problems` is an addition to the required keys, so that
        scoring can count problem kinds without parsing `raw` again."""
        return {
            "id": sample_id,
            "objects": [obj.to_dict() for obj in self.objects],
            "raw": raw,
            "error": self.error,
            "problems": dict(self.problems),
        }


def mean_token_scores(
    spans: Sequence[tuple[int, int]],
    token_offsets: Sequence[tuple[int, int]],
    token_probs: Sequence[float],
) -> list[float]:
    """Score of each span = mean probability of the generated tokens whose characters overlap it.

    `token_offsets[i]` is the [start, end) of token i in the decoded text, `token_probs[i]` the
    probability the model gave it. A span that no token overlaps (cannot happen for text the model
    generated) scores 1.0, the same as "no score".
    """
    if len(token_offsets) != len(token_probs):
        raise ValueError(f"{len(token_offsets)} token offsets for {len(token_probs)} probabilities")
    scores = []
    for start, end in spans:
        pairs = zip(token_offsets, token_probs, strict=True)  # pragma: no mutate (lengths checked above)
        probs = [p for (a, b), p in pairs if a < end and b > start]
        scores.append(sum(probs) / len(probs) if probs else 1.0)
    return scores


def _skip_ws(text: str, i: int) -> int:
    return _WS.match(text, i).end()  # type: ignore[union-attr]  # \s* matches everywhere


def _structure(text: str, i: int) -> Iterator[tuple[int, str]]:
    """(index, char) of the brackets and commas from `i` on that are outside JSON strings."""
    in_string = False
    escaped = False
    for j in range(i, len(text)):
        ch = text[j]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[]{},":  # pragma: no mutate ("XX[]{},XX" holds the same characters)
            yield j, ch


def _element_end(text: str, i: int) -> int | None:
    """Where the list element starting at `i` ends: the index of the ',' or closing bracket after it
    at the list's level, or None if the text ends first (the answer was cut off).

    Only used to skip an element `raw_decode` rejected, so it tracks brackets and strings, nothing more.
    """
    depth = 0
    for j, ch in _structure(text, i):
        if ch in "[{":  # pragma: no mutate (a mutated "XX[{XX" holds the same characters)
            depth += 1
        elif ch in "]}":  # pragma: no mutate (a mutated "XX]}XX" holds the same characters)
            if depth == 0:
                return j
            depth -= 1
        elif depth == 0:
            return j
    return None


def _close_index(text: str, i: int) -> int | None:
    """Index just past the bracket that closes the one at `i`, or None if the text ends first."""
    depth = 0
    for j, ch in _structure(text, i):
        if ch in "[{":  # pragma: no mutate (a mutated "XX[{XX" holds the same characters)
            depth += 1
        elif ch in "]}":  # pragma: no mutate (a mutated "XX]}XX" holds the same characters)
            depth -= 1
            if depth == 0:
                return j + 1
    return None


@dataclass
class _Scan:
    """The elements found by one attempt to read the answer from a '[' or '{'."""

    items: list[tuple[Any, tuple[int, int]]] = field(default_factory=list)  # decoded value, span
    problems: Counter[str] = field(default_factory=Counter)
    start: int = 0  # index of the '[' or first '{'
    end: int = 0  # index just past what was read
    saw_object: bool = False  # some element was (or started like) a {...}
    clean_empty: bool = False  # exactly "[]"


def _scan_list(text: str, start: int) -> _Scan:
    scan = _Scan(start=start)
    i = _skip_ws(text, start + 1)
    if text.startswith("]", i):
        scan.clean_empty, scan.end = True, i + 1
        return scan
    while True:
        i = _skip_ws(text, i)
        if i >= len(text):
            scan.problems["truncated"] = 1  # the scan ends here
            scan.end = len(text)
            return scan
        if text[i] == "]":  # after a trailing comma: tolerated, nothing is lost
            scan.end = i + 1
            return scan
        scan.saw_object |= text[i] == "{"
        try:
            value, end = _DECODER.raw_decode(text, i)
            scan.items.append((value, (i, end)))
            scan.saw_object |= isinstance(value, dict)
        except (ValueError, RecursionError):  # ValueError: also int() digit limits
            stop = _element_end(text, i)
            if stop is None:  # the text ends inside this element: the answer was cut off
                scan.problems["truncated"] = 1  # the scan ends here
                scan.end = len(text)
                return scan
            scan.problems["invalid_json"] += 1
            end = stop
        i = _skip_ws(text, end)
        if i >= len(text):
            scan.problems["truncated"] = 1  # the scan ends here
            scan.end = len(text)
            return scan
        if text[i] == ",":
            i += 1
        elif text[i] == "]":
            scan.end = i + 1
            return scan
        elif text[i] == "{":  # a missing comma between two objects: read on
            scan.problems["invalid_json"] += 1
        else:  # something else inside the list: stop, keeping what was read
            scan.problems["invalid_json"] += 1
            scan.end = i
            return scan


def _scan_objects(text: str, start: int) -> _Scan:
    """Objects without a list: `{...}` alone, or several separated by commas / newlines."""
    scan = _Scan(start=start, saw_object=True)  # pragma: no mutate (saw_object is read for lists only)
    scan.problems["no_list"] = 1
    i = start
    while True:
        try:
            value, end = _DECODER.raw_decode(text, i)
            scan.items.append((value, (i, end)))
        except (ValueError, RecursionError):  # ValueError: also int() digit limits
            close = _close_index(text, i)
            if close is None:
                scan.problems["truncated"] = 1  # the scan ends here
                scan.end = len(text)
                return scan
            scan.problems["invalid_json"] += 1
            end = close
        scan.end = end
        j = _skip_ws(text, end)
        if text.startswith(",", j):
            j = _skip_ws(text, j + 1)
        if not text.startswith("{", j):
            return scan
        i = j


def _find_answer(text: str) -> _Scan | None:
    """The first '[' or '{' from which an answer can be read.

    A '[' counts only when its list holds (or starts) an object, is exactly "[]", or is cut off right
    away, so that brackets in prose before the answer ("defects [see below]") are passed over. A list
    of non-objects is the fallback when nothing better is found.
    """
    fallback = None
    for match in re.finditer(r"[\[{]", text):
        start = match.start()
        if text[start] == "{":
            return _scan_objects(text, start)
        scan = _scan_list(text, start)
        if scan.saw_object or scan.clean_empty or (not scan.items and scan.problems["truncated"]):
            return scan
        if fallback is None and scan.items:
            fallback = scan
    return fallback


def _number(value: Any, problems: Counter[str]) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        problems["numeric_string"] += 1
        value = number
    if isinstance(value, (int, float)):
        try:
            number = float(value)  # OverflowError for integers beyond the float range
        except OverflowError:
            return None
        return number if math.isfinite(number) else None
    return None


def _read_object(
    value: Any,
    span: tuple[int, int],
    width: int,
    height: int,
    problems: Counter[str],
    classes: Sequence[str] | None = None,
    frame: Frame = RELATIVE_FRAME,
) -> ParsedObject | None:
    if not isinstance(value, dict):
        problems["not_an_object"] += 1
        return None
    box_key = next((k for k in _BOX_KEYS if k in value), None)
    label_key = next((k for k in _LABEL_KEYS if k in value), None)
    if box_key is None or label_key is None:
        problems["missing_key"] += 1
        return None
    if box_key != "bbox_2d" or label_key != "label":
        problems["alt_key"] += 1

    raw_label = value[label_key]
    if not isinstance(raw_label, str):
        problems["bad_value"] += 1
        return None
    label = canonical_label(raw_label, classes)
    if label is None:
        problems["unknown_label"] += 1
        return None
    if raw_label != label:
        problems["label_variant"] += 1

    raw_box = value[box_key]
    if not isinstance(raw_box, list) or len(raw_box) != 4:
        problems["bad_value"] += 1
        return None
    notes: Counter[str] = Counter()  # merged only if the box is usable: one problem per dropped object
    numbers = [_number(v, notes) for v in raw_box]
    if any(v is None for v in numbers):
        problems["bad_value"] += 1
        return None
    problems.update(notes)
    coords = [float(v) for v in numbers if v is not None]
    limits = (frame[0], frame[1], frame[0], frame[1])
    if any(v < 0 or v > limit for v, limit in zip(coords, limits, strict=True)):
        problems["out_of_range"] += 1
        coords = [min(float(limit), max(0.0, v)) for v, limit in zip(coords, limits, strict=True)]
    x1, y1, x2, y2 = coords
    if x1 > x2 or y1 > y2:
        problems["swapped"] += 1
        x1, x2 = min(x1, x2), max(x1, x2)
        y1, y2 = min(y1, y2), max(y1, y2)
    px = from_frame((x1, y1, x2, y2), width, height, frame)
    # Checked in pixels: rounding to two decimals can also collapse a sliver of a box.
    if px[2] <= px[0] or px[3] <= px[1]:
        problems["degenerate"] += 1
        return None
    return ParsedObject(label=label, bbox=(px[0], px[1], px[2], px[3]), span=span)


def parse_answer(
    text: str | None,
    width: int,
    height: int,
    classes: Sequence[str] | None = None,
    frame: Frame = RELATIVE_FRAME,
) -> ParseResult:
    """Read the model's answer for a width x height image. Never raises. `classes`: the dataset's class
    names (DeepPCB's when None); other labels are `unknown_label`. `frame`: the model family's answer
    frame for this image (`ModelFamily.answer_frame`; the relative 1000 x 1000 one by default).

    Returns the kept objects (pixel boxes, canonical labels, score 1.0, span of each `{...}` in
    `text`) and the problems met, by kind; `result.error` is None when nothing was lost or changed.
    """
    problems: Counter[str] = Counter()
    if not isinstance(text, str) or not text.strip():
        problems["empty_output"] = 1
        return ParseResult((), dict(problems))
    if _FENCE.search(text):
        problems["code_fence"] = 1
    scan = _find_answer(text)
    if scan is None:
        problems["invalid_json" if re.search(r"[\[{]", text) else "no_json"] = 1
        return ParseResult((), dict(problems))
    problems.update(scan.problems)

    outside = _FENCE.sub("", text[: scan.start] + text[scan.end :])
    if outside.strip():
        problems["extra_text"] = 1

    objects = []
    for value, span in scan.items:
        obj = _read_object(value, span, width, height, problems, classes, frame)
        if obj is not None:
            objects.append(obj)
    return ParseResult(tuple(objects), dict(+problems))
