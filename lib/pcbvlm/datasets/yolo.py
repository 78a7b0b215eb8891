"""YOLO importer: `SRC/data.yaml` (class `names`, a list or a {index: name} mapping),
`SRC/images/<split>/...` and `SRC/labels/<split>/....txt` (the image's path with .txt).

Label lines are `class cx cy w h`, relative 0-1 to the image's width and height; an image without a label
file is a board without defects; a label file without an image is a problem. Split folders: train, val
(or valid), test; the ones missing are seeded from train (`data.test_fraction`, `data.val_fraction`). Images
directly in `SRC/images/` (no split folders) form one pool, split the same way.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from pcbvlm.config import DataConfig
from pcbvlm.datasets.common import (
    BAD_CLASS,
    DUPLICATE_SAMPLE,
    EXCLUDED,
    IMAGE_SUFFIXES,
    MALFORMED_LINE,
    MISSING_IMAGE,
    Collector,
    Conversion,
    DatasetFormat,
    Problem,
    check_box,
    check_image,
    class_counts,
    finish,
    no_template,
    pixel,
    progress_bar,
)
from pcbvlm.errors import DataError

DATA_YAML = "data.yaml"
SPLIT_DIRS: dict[str, str] = {"train": "train", "val": "val", "valid": "val", "test": "test"}


def read_names(path: Path) -> dict[int, str]:
    """class index -> name from data.yaml's `names`. A broken class list is an error in any mode."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise DataError(f"{path}{line}: invalid YAML ({getattr(err, 'problem', None) or err})") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise DataError(f"{path}: 'names' must be a non-empty list or an {{index: name}} mapping")
    out: dict[int, str] = {}
    for key, name in names.items():
        if not isinstance(key, int) or isinstance(key, bool) or key < 0:
            raise DataError(f"{path}: names: {key!r} is not a class index (0, 1, ...)")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{path}: names[{key}] must be a class name, got {name!r}")
        if name.strip() in out.values():
            raise DataError(f"{path}: names[{key}]: {name.strip()!r} appears twice")
        out[key] = name.strip()
    return dict(sorted(out.items()))


def parse_labels(
    path: Path, names: dict[int, str], sample_id: str
) -> tuple[list[tuple[str, str, tuple[float, float, float, float]]], list[Problem]]:
    """`class cx cy w h` lines -> [(where, label, relative box)] in file order, and the problems."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        return [], [Problem(MALFORMED_LINE, sample_id, f"{path}: not a text file ({err.reason})")]
    objects = []
    problems = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        where = f"{path} line {number}"
        fields = line.split()
        try:
            if len(fields) != 5:
                raise ValueError
            values = [float(v) for v in fields]
            if not all(math.isfinite(v) for v in values) or not values[0].is_integer():
                raise ValueError
        except ValueError:
            problems.append(
                Problem(
                    MALFORMED_LINE,
                    sample_id,
                    f"{where}: expected 'class cx cy w h' (an index and 4 relative numbers), got {line[:80]!r}",
                )
            )
            continue
        cls = int(values[0])
        if cls not in names:
            problems.append(
                Problem(
                    BAD_CLASS, sample_id, f"{where}: class {cls} is not in data.yaml names ({_legend(names)})"
                )
            )
            continue
        cx, cy, w, h = values[1:]
        objects.append((where, names[cls], (cx, cy, w, h)))
    return objects, problems


def _legend(names: dict[int, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in names.items())


def to_pixel_box(rel: tuple[float, float, float, float], width: int, height: int) -> list[int | float]:
    cx, cy, w, h = rel
    return [
        pixel((cx - w / 2) * width),
        pixel((cy - h / 2) * height),
        pixel((cx + w / 2) * width),
        pixel((cy + h / 2) * height),
    ]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def find_splits(root: Path) -> dict[str, tuple[Path, Path]]:
    """source split -> (image folder, label folder)."""
    images = root / "images"
    if not images.is_dir():
        raise DataError(f"{images}: folder not found (YOLO layout: SRC/images/<split>/, SRC/labels/<split>/)")
    splits: dict[str, tuple[Path, Path]] = {}
    for name, split in SPLIT_DIRS.items():
        if (images / name).is_dir():
            if split in splits:
                raise DataError(f"{images}: both val/ and valid/ exist; keep one")
            splits[split] = (images / name, root / "labels" / name)
    if not splits:
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in images.iterdir() if p.is_file()):
            raise DataError(f"{images}: no train/, val/ or test/ folder and no images")
        splits["all"] = (images, root / "labels")
    return splits


def convert(src: str | Path, data_cfg: DataConfig, progress: bool = False) -> Conversion:
    """Read and validate the YOLO layout; nothing is written."""
    root = Path(src).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: YOLO folder not found (give SRC=<folder holding {DATA_YAML}>)")
    root = root.resolve()
    data_yaml = root / DATA_YAML
    if not data_yaml.is_file():
        raise DataError(f"{data_yaml}: not found (YOLO layout: SRC/{DATA_YAML} with the class names)")
    no_template(data_cfg, FORMAT.title)
    names = read_names(data_yaml)
    classes = list(names.values())
    splits = find_splits(root)
    found = Collector()
    exclude = set(data_cfg.exclude_ids)

    entries = []  # (split, image, label file)
    annotations: dict[str, dict[str, Any]] = {}
    for split, (image_dir, label_dir) in splits.items():
        images = _images_in(image_dir)
        if split == "all":
            images = [p for p in images if p.parent == image_dir]  # split folders would be read twice
        annotations[split] = {
            "listed": len(images),
            "annotation_files": 0,
            "boxes": class_counts([], classes),
        }
        labels_with_image = set()
        for image in images:
            label = (label_dir / image.relative_to(image_dir)).with_suffix(".txt")
            labels_with_image.add(label)
            entries.append((split, image, label))
        if label_dir.is_dir():
            pattern = "*.txt" if split == "all" else "**/*.txt"
            for label in sorted(label_dir.glob(pattern)):
                if label not in labels_with_image:
                    sid = label.stem
                    found.fail(
                        Problem(MISSING_IMAGE, sid, f"{label}: no image for this label file in {image_dir}")
                    )

    kept: dict[str, list[dict[str, Any]]] = {split: [] for split in splits}
    boxes: dict[str, Counter[str]] = {split: Counter() for split in splits}
    first_seen: dict[str, Path] = {}
    for split, image, label in progress_bar(entries, progress, "reading YOLO"):
        sid = image.stem
        if sid in first_seen:
            found.fail(
                Problem(
                    DUPLICATE_SAMPLE,
                    sid,
                    f"{image}: sample {sid} is listed twice (first at {first_seen[sid]})",
                )
            )
            continue
        first_seen[sid] = image
        objects, problems = [], []
        if label.is_file():
            annotations[split]["annotation_files"] += 1
            objects, problems = parse_labels(label, names, sid)
            boxes[split].update(obj[1] for obj in objects)
            found.problems.extend(problems)
        if sid in exclude:
            found.excluded.append(sid)
            found.skip(EXCLUDED, sid)
            continue
        if problems:
            found.skip(problems[0].kind, sid)
            continue
        size = check_image(image, sid, str(image))
        if isinstance(size, Problem):
            found.fail(size)
            continue
        width, height = size
        pixel_objects = [
            {"label": name, "bbox": to_pixel_box(rel, width, height)} for _, name, rel in objects
        ]
        bound = next(
            (
                p
                for (where, _, _), obj in zip(objects, pixel_objects, strict=True)
                if (p := check_box(obj["bbox"], width, height, where, sid)) is not None
            ),
            None,
        )
        if bound is not None:
            found.fail(bound)
            continue
        kept[split].append(
            {
                "id": sid,
                "split": "",
                "image": str(image),
                "annotation": str(label),
                "width": width,
                "height": height,
                "objects": pixel_objects,
            }
        )
    for split in splits:
        annotations[split]["boxes"] = class_counts(boxes[split].elements(), classes)
    return finish(
        root,
        kept,
        data_cfg,
        classes,
        annotations=annotations,
        skipped=found.skipped,
        problems=found.problems,
        excluded=found.excluded,
        fmt=FORMAT,
    )


FORMAT = DatasetFormat(
    name="yolo",
    title="YOLO",
    layout="SRC/data.yaml (names), SRC/images/<split>/*, SRC/labels/<split>/*.txt (class cx cy w h, 0-1)",
    convert=convert,
)
