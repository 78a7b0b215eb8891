"""Synthetic PCBs in the DeepPCB layout, for the demo and the tests (the real data is research-only).

Each sample is a defect-free template (black copper traces, pads and pours on white, like DeepPCB's
binarised scans) and a test image with 1-6 defects of the six DeepPCB kinds drawn into it:
open (a gap cut across a trace), short (a copper bridge to a neighbouring conductor), mousebite (bites
out of a trace edge), spur (a spike out of a trace edge), copper (a stray blob) and pin-hole (a hole in
copper). Each annotated box is the bounding box of the pixels the defect changed, plus a margin, so
the boxes cover every difference between the two images; boxes of one image never overlap.

The output is the DeepPCB layout the converter reads (`PCBData/groupG/G/<id>_test.jpg`, `_temp.jpg`,
`groupG/G_not/<id>.txt`, `trainval.txt` / `test.txt` without a final newline), byte-identical for a
seed: sample i draws from its own generator seeded with (seed, i), so it does not depend on `num`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pcbvlm.errors import DataError
from pcbvlm.io import atomic_directory
from pcbvlm.labels import CLASS_NAMES, LABEL_TO_ID

MARKER = "synth.json"  # marks a folder this module wrote, so a re-run may replace it
GROUP_BASE = 10000  # group numbers 10000, 10001, ...: ids like DeepPCB's, 5-digit group + 3-digit index
PER_GROUP = 50
TEST_EVERY = 3  # every third sample goes to test.txt: DeepPCB's 1000/500 trainval/test ratio
JPEG_QUALITY = 92
COPPER, BACKGROUND = 0, 255  # DeepPCB scans: dark copper on a light board
DEFECT_ATTEMPTS = 200
TRIES_PER_KIND = 30


@dataclass(frozen=True)
class SynthSample:
    sample_id: str
    group: str
    split: str  # "trainval" or "test"
    template: Image.Image
    test: Image.Image
    objects: list[dict[str, Any]]  # [{"label", "bbox": [x1, y1, x2, y2]}], drawing order


@dataclass(frozen=True)
class _Segment:
    p0: np.ndarray
    p1: np.ndarray
    width: float

    @property
    def length(self) -> float:
        return float(np.hypot(*(self.p1 - self.p0)))

    @property
    def direction(self) -> np.ndarray:
        return (self.p1 - self.p0) / max(self.length, 1e-9)

    @property
    def normal(self) -> np.ndarray:
        ux, uy = self.direction
        return np.array([-uy, ux])


def sample_id(index: int) -> tuple[str, str]:
    """(id, group) of the index-th sample: 10000000, 10000001, ... 10000049, 10001000, ..."""
    group = f"{GROUP_BASE + index // PER_GROUP:05d}"
    return f"{group}{index % PER_GROUP:03d}", group


# ---------------------------------------------------------------------------------------------------------
# The defect-free board


def _draw_template(
    rng: np.random.Generator, width: int, height: int, s: float
) -> tuple[Image.Image, list[_Segment]]:
    # Positions are drawn as fractions of the board, scaled per axis; sizes are scaled by s.
    size = np.array([width, height], dtype=float)
    img = Image.new("L", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    segments: list[_Segment] = []

    # Copper pours: large rounded rectangles, some with drill holes.
    for _ in range(int(rng.integers(0, 3))):
        w, h = rng.uniform(70, 200, 2) * s
        x, y = rng.uniform(-0.1, 0.9, 2) * size
        draw.rounded_rectangle([x, y, x + w, y + h], radius=float(rng.uniform(4, 20) * s), fill=COPPER)
        for _ in range(int(rng.integers(0, 3))):
            cx, cy = x + rng.uniform(0.25, 0.75) * w, y + rng.uniform(0.25, 0.75) * h
            r = rng.uniform(4, 8) * s
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=BACKGROUND)

    # Buses: parallel straight traces a small gap apart (where shorts happen on real boards).
    for _ in range(int(rng.integers(1, 3))):
        horizontal = bool(rng.integers(0, 2))
        n = int(rng.integers(2, 5))
        width = float(rng.uniform(10, 18) * s)
        pitch = width + rng.uniform(12, 26) * s
        along, across_extent = (width, height) if horizontal else (height, width)
        start, length = rng.uniform(0, 0.4) * along, rng.uniform(0.4, 0.9) * along
        offset = rng.uniform(0.1, 0.9) * across_extent - (n - 1) * pitch / 2
        for k in range(n):
            across = offset + k * pitch
            if horizontal:
                p0, p1 = np.array([start, across]), np.array([start + length, across])
            else:
                p0, p1 = np.array([across, start]), np.array([across, start + length])
            _trace(draw, segments, [p0, p1], width)
            _pad(draw, rng, p0, width, s)
            _pad(draw, rng, p1, width, s)

    # Routed traces: 2-4 legs, turning by 45 or 90 degrees, pads at both ends.
    for _ in range(int(rng.integers(4, 9))):
        width = float(rng.uniform(9, 22) * s)
        points = [rng.uniform(0.05, 0.95, 2) * size]
        angle = int(rng.integers(0, 8)) * 45
        for _ in range(int(rng.integers(2, 5))):
            length = rng.uniform(50, 220) * s
            rad = np.deg2rad(angle)
            points.append(points[-1] + length * np.array([np.cos(rad), np.sin(rad)]))
            angle = (angle + int(rng.choice([-90, -45, 45, 90]))) % 360
        _trace(draw, segments, points, width)
        _pad(draw, rng, points[0], width, s)
        _pad(draw, rng, points[-1], width, s)
    return img, segments


def _trace(
    draw: ImageDraw.ImageDraw, segments: list[_Segment], points: list[np.ndarray], width: float
) -> None:
    draw.line([tuple(p) for p in points], fill=COPPER, width=round(width), joint="curve")
    for p in points:  # round the joints and ends so the legs meet without notches
        r = width / 2
        draw.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=COPPER)
    segments.extend(_Segment(a, b, width) for a, b in zip(points, points[1:], strict=False))


def _pad(draw: ImageDraw.ImageDraw, rng: np.random.Generator, p: np.ndarray, width: float, s: float) -> None:
    r = width * rng.uniform(0.9, 1.6)
    box = [p[0] - r, p[1] - r, p[0] + r, p[1] + r]
    if rng.random() < 0.5:
        draw.ellipse(box, fill=COPPER)
    else:
        draw.rectangle(box, fill=COPPER)
    if rng.random() < 0.6:
        hole = min(r * 0.4, rng.uniform(3, 6) * s)
        draw.ellipse([p[0] - hole, p[1] - hole, p[0] + hole, p[1] + hole], fill=BACKGROUND)


# ---------------------------------------------------------------------------------------------------------
# Defects: each returns (shape mask, paint copper?) or None when this attempt found no fitting place.

_Shape = tuple[np.ndarray, bool]


def _at(mask: np.ndarray, p: np.ndarray) -> bool | None:
    """Copper at p? None outside the image."""
    x, y = round(float(p[0])), round(float(p[1]))
    if 0 <= x < mask.shape[1] and 0 <= y < mask.shape[0]:
        return bool(mask[y, x])
    return None


def _shape(mask: np.ndarray, paint: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    layer = Image.new("L", (mask.shape[1], mask.shape[0]), 0)
    paint(ImageDraw.Draw(layer))
    return np.asarray(layer) > 0


def _pick_on_trace(
    rng: np.random.Generator, segments: list[_Segment], mask: np.ndarray
) -> tuple[_Segment, np.ndarray] | None:
    """A point on the centre line of a trace leg, away from its ends and the image border."""
    if not segments:
        return None
    seg = segments[int(rng.integers(0, len(segments)))]
    if seg.length < 4 * seg.width:
        return None
    t = rng.uniform(1.5 * seg.width, seg.length - 1.5 * seg.width)
    c = seg.p0 + t * seg.direction
    margin = 2 * seg.width + 10
    if not (margin <= c[0] < mask.shape[1] - margin and margin <= c[1] < mask.shape[0] - margin):
        return None
    return seg, c


def _clear_along(mask: np.ndarray, c: np.ndarray, n: np.ndarray, start: float, stop: float) -> bool:
    """No copper on the ray c + d*n for d in [start, stop] (and all of it inside the image)."""
    return all(_at(mask, c + d * n) is False for d in np.arange(start, stop + 1e-9, 1.0))


def _open(rng: np.random.Generator, mask: np.ndarray, segments: list[_Segment], s: float) -> _Shape | None:
    picked = _pick_on_trace(rng, segments, mask)
    if picked is None:
        return None
    seg, c = picked
    u, n, half = seg.direction, seg.normal, seg.width / 2
    # Only where the trace runs alone: both sides clear, so the cut really parts it.
    if not (_clear_along(mask, c, n, half + 4, half + 8) and _clear_along(mask, c, -n, half + 4, half + 8)):
        return None
    gap = rng.uniform(3, 9) * s
    reach = half + 3  # PIL draws diagonal lines a little wider than their nominal width
    corners = [
        c - u * gap / 2 - n * reach,
        c + u * gap / 2 - n * reach,
        c + u * gap / 2 + n * reach,
        c - u * gap / 2 + n * reach,
    ]
    return _shape(mask, lambda d: d.polygon([tuple(p) for p in corners], fill=255)), False


def _mousebite(
    rng: np.random.Generator, mask: np.ndarray, segments: list[_Segment], s: float
) -> _Shape | None:
    picked = _pick_on_trace(rng, segments, mask)
    if picked is None:
        return None
    seg, c = picked
    side = seg.normal * (1 if rng.random() < 0.5 else -1)
    r = min(seg.width / 3, rng.uniform(2.5, 5.5) * s)
    if not _clear_along(mask, c, side, seg.width / 2 + 2, seg.width / 2 + 2 * r + 4):
        return None
    k = int(rng.integers(2, 5))
    step = r * rng.uniform(1.4, 2.0)
    centres = [
        c + seg.direction * (j - (k - 1) / 2) * step + side * (seg.width / 2 + rng.uniform(-0.2, 0.3) * r)
        for j in range(k)
    ]

    def paint(d: ImageDraw.ImageDraw) -> None:
        for p in centres:
            rr = r * rng.uniform(0.8, 1.2)
            d.ellipse([p[0] - rr, p[1] - rr, p[0] + rr, p[1] + rr], fill=255)

    return _shape(mask, paint), False


def _spur(rng: np.random.Generator, mask: np.ndarray, segments: list[_Segment], s: float) -> _Shape | None:
    picked = _pick_on_trace(rng, segments, mask)
    if picked is None:
        return None
    seg, c = picked
    side = seg.normal * (1 if rng.random() < 0.5 else -1)
    length, base = rng.uniform(6, 16) * s, rng.uniform(3, 7) * s
    half = seg.width / 2
    # Clear well past the tip: a spur that reaches other copper would be a short.
    if not _clear_along(mask, c, side, half + 2, half + length + 8 * s):
        return None
    u = seg.direction
    tip = c + side * (half + length) + u * rng.uniform(-0.5, 0.5) * base
    root = c + side * (half - 2)
    corners = [root - u * base / 2, root + u * base / 2, tip + u * base * 0.15, tip - u * base * 0.15]
    return _shape(mask, lambda d: d.polygon([tuple(p) for p in corners], fill=255)), True


def _short(rng: np.random.Generator, mask: np.ndarray, segments: list[_Segment], s: float) -> _Shape | None:
    picked = _pick_on_trace(rng, segments, mask)
    if picked is None:
        return None
    seg, c = picked
    side = seg.normal * (1 if rng.random() < 0.5 else -1)
    half = seg.width / 2
    # Walk out of this trace, then across the gap to the next conductor.
    d = half
    while _at(mask, c + d * side):
        d += 1
        if d > half + 6:
            return None
    gap_start = d
    while _at(mask, c + d * side) is False:
        d += 1
        if d - gap_start > 40 * s:
            return None
    if _at(mask, c + d * side) is None or d - gap_start < 3:
        return None
    width = rng.uniform(3, 8) * s
    a, b = c + side * (gap_start - 2), c + side * (d + 2)
    wobble = seg.direction * rng.uniform(-0.3, 0.3) * width
    u = seg.direction
    corners = [a - u * width / 2, a + u * width / 2, b + u * width / 2 + wobble, b - u * width / 2 + wobble]
    return _shape(mask, lambda dr: dr.polygon([tuple(p) for p in corners], fill=255)), True


def _copper(rng: np.random.Generator, mask: np.ndarray, segments: list[_Segment], s: float) -> _Shape | None:
    radius = rng.uniform(3, 9) * s
    centre = rng.uniform(0.05, 0.95, 2) * np.array([mask.shape[1], mask.shape[0]])
    clearance = int(radius * 1.3 + 6 * s)
    x, y = int(centre[0]), int(centre[1])
    if mask[max(0, y - clearance) : y + clearance + 1, max(0, x - clearance) : x + clearance + 1].any():
        return None
    k = int(rng.integers(5, 10))
    angles = np.sort(rng.uniform(0, 2 * np.pi, k))
    radii = radius * rng.uniform(0.55, 1.25, k)
    points = [
        (centre[0] + r * np.cos(a), centre[1] + r * np.sin(a)) for a, r in zip(angles, radii, strict=True)
    ]
    return _shape(mask, lambda d: d.polygon(points, fill=255)), True


def _pin_hole(
    rng: np.random.Generator, mask: np.ndarray, segments: list[_Segment], s: float
) -> _Shape | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    i = int(rng.integers(0, len(xs)))
    x, y = int(xs[i]), int(ys[i])
    r = rng.uniform(2, 5) * s
    # Entirely inside copper, with copper all round: a hole, not a bite out of an edge.
    ring = int(r + 3)
    if y - ring < 0 or x - ring < 0 or not mask[y - ring : y + ring + 1, x - ring : x + ring + 1].all():
        return None
    return _shape(mask, lambda d: d.ellipse([x - r, y - r, x + r, y + r], fill=255)), False


_DEFECTS: dict[str, Callable[..., _Shape | None]] = {
    "open": _open,
    "short": _short,
    "mousebite": _mousebite,
    "spur": _spur,
    "copper": _copper,
    "pin-hole": _pin_hole,
}
assert set(_DEFECTS) == set(CLASS_NAMES.values()), "one drawing function per DeepPCB class"


def _overlaps(box: list[int], boxes: list[list[int]], gap: int) -> bool:
    return any(
        box[0] < b[2] + gap and b[0] < box[2] + gap and box[1] < b[3] + gap and b[1] < box[3] + gap
        for b in boxes
    )


def _place(
    label: str,
    rng: np.random.Generator,
    copper: np.ndarray,
    test: np.ndarray,
    segments: list[_Segment],
    s: float,
) -> tuple[list[int] | None, np.ndarray, bool]:
    """One attempt at a defect of `label`: its box, the pixels it changes, and their new value."""
    nothing: tuple[None, np.ndarray, bool] = (None, np.zeros(0, bool), False)
    drawn = _DEFECTS[label](rng, copper, segments, s)
    if drawn is None:
        return nothing
    shape, paint_copper = drawn
    changed = shape & (test != paint_copper)
    if changed.sum() < 6:  # too small to see: would teach the model to find nothing
        return nothing
    ys, xs = np.nonzero(changed)
    margin = int(rng.integers(4, 9) * s) + 2
    box = [
        int(xs.min()) - margin,
        int(ys.min()) - margin,
        int(xs.max()) + 1 + margin,
        int(ys.max()) + 1 + margin,
    ]
    # DeepPCB boxes are at least ~18 px a side: grow small ones around their centre.
    min_side = round(18 * s)
    for (lo, hi), size in zip(((0, 2), (1, 3)), (copper.shape[1], copper.shape[0]), strict=True):
        short = min_side - (box[hi] - box[lo])
        if short > 0:
            box[lo] -= short // 2
            box[hi] += short - short // 2
        # At the border, grow inwards instead of losing the part outside the image.
        if box[lo] < 0:
            box[hi], box[lo] = box[hi] - box[lo], 0
        if box[hi] > size:
            box[lo], box[hi] = max(0, box[lo] - (box[hi] - size)), size
    return box, changed, paint_copper


@dataclass(frozen=True)
class Board:
    """What a synthetic board looks like. The default is DeepPCB's: 640x640, 1-6 defects, listed in the
    order they were drawn. `scale` sizes traces, pads and defects (1.0 = as on a 640 px DeepPCB scan;
    default max(width, height) / 640, the whole board scaled down); a larger scale on a small board is a
    zoomed-in crop: fewer, larger features. `order="reading"` lists the defects top to bottom, then left
    to right (a fixed order is easier to learn than the drawing order)."""

    width: int = 640
    height: int = 640
    scale: float | None = None
    max_defects: int = 6
    order: str = "drawn"

    def __post_init__(self) -> None:
        if min(self.width, self.height) < 128:
            raise DataError(
                f"board {self.width}x{self.height}: each side must be at least 128 px (defects are drawn 3-40 px large)"
            )
        if self.scale is not None and not 0.1 <= self.scale <= 4:
            raise DataError(f"board scale {self.scale}: must be between 0.1 and 4")
        if not 1 <= self.max_defects <= 6:
            raise DataError(f"max_defects {self.max_defects}: must be between 1 and 6")
        if self.order not in ("drawn", "reading"):
            raise DataError(f"order {self.order!r}: must be drawn or reading")

    @property
    def feature_scale(self) -> float:
        return self.scale if self.scale is not None else max(self.width, self.height) / 640

    def describe(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "scale": round(self.feature_scale, 4),
            "max_defects": self.max_defects,
            "order": self.order,
        }


def reading_order(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Objects sorted by the top edge of their box, then the left edge."""
    return sorted(objects, key=lambda obj: (obj["bbox"][1], obj["bbox"][0]))


def generate_sample(index: int, seed: int = 0, size: int = 640, board: Board | None = None) -> SynthSample:
    """The index-th synthetic sample: template, test image and its annotated defects. `board` (default:
    a size x size DeepPCB-like board) sets the shape, feature scale, defect count and order."""
    board = board or Board(size, size)
    s = board.feature_scale
    rng = np.random.default_rng([seed, index])
    template, segments = _draw_template(rng, board.width, board.height, s)
    copper = np.asarray(template) < 128
    test = copper.copy()
    objects: list[dict[str, Any]] = []
    boxes: list[list[int]] = []
    wanted = int(rng.integers(1, board.max_defects + 1))
    names = list(_DEFECTS)
    label, tries = "", 0
    # Past DEFECT_ATTEMPTS a board keeps what it has; only one without any defect keeps trying.
    for attempt in range(DEFECT_ATTEMPTS * 10):
        if len(objects) == wanted or (attempt >= DEFECT_ATTEMPTS and objects):
            break
        # A kind is retried before another is drawn: kinds that are hard to place (a short needs two
        # conductors close together) would otherwise be rarer than the rest.
        if not label or tries >= TRIES_PER_KIND:
            label, tries = names[int(rng.integers(0, len(names)))], 0
        tries += 1
        box, changed, paint_copper = _place(label, rng, copper, test, segments, s)
        if box is None or _overlaps(box, boxes, gap=2):
            continue
        test[changed] = paint_copper
        boxes.append(box)
        objects.append({"label": label, "bbox": box})
        label = ""
    if not objects:
        raise RuntimeError(f"synthetic sample {index} (seed {seed}): no defect could be placed")
    sid, group = sample_id(index)
    split = "test" if index % TEST_EVERY == TEST_EVERY - 1 else "trainval"
    test_img = Image.fromarray(np.where(test, COPPER, BACKGROUND).astype(np.uint8))
    if board.order == "reading":
        objects = reading_order(objects)
    return SynthSample(sid, group, split, template, test_img, objects)


# ---------------------------------------------------------------------------------------------------------
# The dataset folder


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def annotation_text(objects: list[dict[str, Any]]) -> str:
    """DeepPCB's annotation format: `x1 y1 x2 y2 class`, space separated, one box a line."""
    return "".join(
        f"{x1} {y1} {x2} {y2} {LABEL_TO_ID[obj['label']]}\n"
        for obj in objects
        for x1, y1, x2, y2 in [obj["bbox"]]
    )


def iter_samples(
    num: int, seed: int = 0, size: int = 640, board: Board | None = None
) -> Iterator[SynthSample]:
    for index in range(num):
        yield generate_sample(index, seed, size, board)


def generate_dataset(
    out_dir: str | Path,
    num: int,
    seed: int = 0,
    size: int = 640,
    progress: bool = False,
    board: Board | None = None,
) -> dict[str, Any]:
    """Write `num` samples as `out_dir/PCBData/...`; returns the summary (also written to synth.json).

    The folder is built beside `out_dir` and renamed into place. An existing `out_dir` is replaced only
    when it is empty or an earlier output of this function (it holds synth.json): a mistyped --out must
    not delete someone's data.
    """
    if num < 1:
        raise DataError(f"--num {num}: must be at least 1")
    if size < 128:
        raise DataError(f"--size {size}: must be at least 128 px (defects are drawn 3-40 px large)")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise DataError(
            f"{out}: exists and is not a synthetic dataset folder (no {MARKER}); choose another --out"
        )

    counts = {"trainval": 0, "test": 0}
    boxes = dict.fromkeys(CLASS_NAMES.values(), 0)
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    samples = iter_samples(num, seed, size, board)
    if progress:
        from tqdm import tqdm

        samples = tqdm(samples, total=num, desc="synthesising", unit="sample", disable=None)
    with atomic_directory(out, overwrite=True) as tmp:
        root = tmp / "PCBData"
        for sample in samples:
            g = sample.group
            image_dir, ann_dir = root / f"group{g}" / g, root / f"group{g}" / f"{g}_not"
            image_dir.mkdir(parents=True, exist_ok=True)
            ann_dir.mkdir(parents=True, exist_ok=True)
            (image_dir / f"{sample.sample_id}_test.jpg").write_bytes(_jpeg(sample.test))
            (image_dir / f"{sample.sample_id}_temp.jpg").write_bytes(_jpeg(sample.template))
            (ann_dir / f"{sample.sample_id}.txt").write_text(
                annotation_text(sample.objects), encoding="utf-8"
            )
            lines[sample.split].append(
                f"group{g}/{g}/{sample.sample_id}.jpg group{g}/{g}_not/{sample.sample_id}.txt"
            )
            counts[sample.split] += 1
            for obj in sample.objects:
                boxes[obj["label"]] += 1
        for split, split_lines in lines.items():
            # DeepPCB's split files end without a newline; the converter must read exactly that.
            (root / f"{split}.txt").write_text("\n".join(split_lines), encoding="utf-8")
        summary = {
            "generator": "pcbvlm.synth",
            "num": num,
            "seed": seed,
            "size": size,
            **({"board": board.describe()} if board is not None else {}),
            "samples": counts,
            "boxes": boxes,
        }
        (tmp / MARKER).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
