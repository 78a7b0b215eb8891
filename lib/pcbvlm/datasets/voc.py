"""Pascal VOC importer: `SRC/Annotations/<id>.xml`, `SRC/JPEGImages/`, `SRC/ImageSets/Main/*.txt`.

- Splits: `train.txt` and `val.txt` when present (`trainval.txt` is their union and is then not read),
  else `trainval.txt` (val seeded from it), and `test.txt`; a missing test split is seeded from the
  training pool (`data.test_fraction`). Without `ImageSets/Main` every `Annotations/*.xml` is one pool.
- The image is `JPEGImages/<filename>` (the XML's `<filename>`, else `<id>.jpg`).
- Classes: `SRC/classes.txt` (one name a line, in order) when present, and then a name outside it is a
  problem; else the names found in the annotations, sorted.
- Boxes: VOC pixel indices are 1-based and inclusive, so `[xmin - 1, ymin - 1, xmax, ymax]` in the
  continuous 0-based pixels used everywhere here (as Detectron2 reads VOC). A 0 from a 0-based writer is
  read as 0: such a box ends up at most 1 px larger.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcbvlm.config import DataConfig
from pcbvlm.datasets.common import (
    BAD_CLASS,
    DUPLICATE_SAMPLE,
    EXCLUDED,
    MALFORMED_LINE,
    MALFORMED_SPLIT_LINE,
    MISSING_ANNOTATION,
    SIZE_MISMATCH,
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

CLASSES_FILE = "classes.txt"
SPLIT_NAMES = ("train", "val", "trainval", "test")
_OBJECT_TAG = re.compile(r"<object[\s>]")


@dataclass(frozen=True)
class VocObject:
    where: str  # "<xml> line N" of the object's <object> tag
    name: str
    box: list[int | float]  # 0-based continuous pixels


@dataclass(frozen=True)
class VocAnnotation:
    filename: str | None
    size: tuple[int, int] | None  # <size> width, height
    objects: list[VocObject]


def read_classes(root: Path) -> list[str] | None:
    path = root / CLASSES_FILE
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names (one a line)")
    duplicates = [name for name, n in Counter(names).items() if n > 1]
    if duplicates:
        raise DataError(f"{path}: {duplicates[0]!r} appears twice")
    return names


def _text(node: ET.Element | None, tag: str) -> str | None:
    child = node.find(tag) if node is not None else None
    return child.text.strip() if child is not None and child.text and child.text.strip() else None


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def parse_xml(path: Path, sample_id: str) -> tuple[VocAnnotation | None, list[Problem]]:
    """One annotation file -> its objects (in file order), or the problems that make it unusable."""
    try:
        text = path.read_text(encoding="utf-8")
        root = ET.fromstring(text)
    except UnicodeDecodeError as err:
        return None, [Problem(MALFORMED_LINE, sample_id, f"{path}: not a text file ({err.reason})")]
    except ET.ParseError as err:
        line = err.position[0]
        return None, [Problem(MALFORMED_LINE, sample_id, f"{path} line {line}: not valid XML ({err})")]
    # ElementTree keeps no line numbers: the n-th <object> element is the n-th <object> tag in the text.
    object_lines = [text.count("\n", 0, m.start()) + 1 for m in _OBJECT_TAG.finditer(text)]
    size_node = root.find("size")
    width, height = _number(_text(size_node, "width")), _number(_text(size_node, "height"))
    size = (int(width), int(height)) if width and height else None
    objects, problems = [], []
    for i, node in enumerate(root.findall("object")):
        line = object_lines[i] if i < len(object_lines) else None
        where = f"{path} line {line}" if line else f"{path} object {i + 1}"
        name = _text(node, "name")
        box_node = node.find("bndbox")
        coords = [_number(_text(box_node, tag)) for tag in ("xmin", "ymin", "xmax", "ymax")]
        if name is None or any(v is None for v in coords):
            problems.append(
                Problem(
                    MALFORMED_LINE,
                    sample_id,
                    f"{where}: an <object> needs <name> and <bndbox> with numeric xmin, ymin, xmax, ymax",
                )
            )
            continue
        xmin, ymin, xmax, ymax = (float(v) for v in coords if v is not None)
        box = [pixel(max(xmin - 1, 0)), pixel(max(ymin - 1, 0)), pixel(xmax), pixel(ymax)]
        objects.append(VocObject(where, name, box))
    return VocAnnotation(_text(root, "filename"), size, objects), problems


def read_split_files(root: Path, found: Collector) -> dict[str, list[tuple[str, str]]]:
    """source split -> [(id, where)], from ImageSets/Main, or every Annotations/*.xml as one pool."""
    main = root / "ImageSets" / "Main"
    files = {name: main / f"{name}.txt" for name in SPLIT_NAMES if (main / f"{name}.txt").is_file()}
    if "train" in files or "val" in files:
        files.pop("trainval", None)  # the union of train and val
    if not files:
        return {"all": [(p.stem, str(p)) for p in sorted((root / "Annotations").glob("*.xml"))]}
    out: dict[str, list[tuple[str, str]]] = {}
    for split, path in files.items():
        rows = []
        for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            line = raw.strip()
            if not line:
                continue
            where = f"{path} line {number}"
            if len(line.split()) != 1:
                found.fail(
                    Problem(MALFORMED_SPLIT_LINE, None, f"{where}: expected one image id, got {line[:80]!r}")
                )
                continue
            rows.append((line, where))
        out[split] = rows
    return out


def convert(src: str | Path, data_cfg: DataConfig, progress: bool = False) -> Conversion:
    """Read and validate the VOC layout; nothing is written."""
    root = Path(src).expanduser()
    if not root.is_dir():
        raise DataError(
            f"{root}: VOC folder not found (give SRC=<folder holding Annotations/ and JPEGImages/>)"
        )
    root = root.resolve()
    for folder in ("Annotations", "JPEGImages"):
        if not (root / folder).is_dir():
            raise DataError(
                f"{root / folder}: folder not found (VOC layout: SRC/Annotations/, SRC/JPEGImages/)"
            )
    no_template(data_cfg, FORMAT.title)
    declared = read_classes(root)
    found = Collector()
    exclude = set(data_cfg.exclude_ids)
    listed = read_split_files(root, found)

    parsed: list[tuple[str, str, str, Path, VocAnnotation | None]] = []  # split, id, where, xml, annotation
    first_seen: dict[str, str] = {}
    annotations: dict[str, dict[str, Any]] = {}
    seen_names: set[str] = set()
    for split, rows in listed.items():
        annotations[split] = {"listed": len(rows), "annotation_files": 0}
        for sid, where in progress_bar(rows, progress, f"reading VOC {split}"):
            if sid in first_seen:
                found.fail(
                    Problem(
                        DUPLICATE_SAMPLE,
                        sid,
                        f"{where}: sample {sid} is listed twice (first at {first_seen[sid]})",
                    )
                )
                continue
            first_seen[sid] = where
            xml = root / "Annotations" / f"{sid}.xml"
            if not xml.is_file():
                found.fail(
                    Problem(MISSING_ANNOTATION, sid, f"{xml}: annotation file not found (listed at {where})")
                )
                continue
            annotations[split]["annotation_files"] += 1
            annotation, problems = parse_xml(xml, sid)
            found.problems.extend(problems)
            if annotation is not None:
                seen_names.update(obj.name for obj in annotation.objects)
            # A bad object is a defect the image shows but the answer would omit: the whole sample goes.
            parsed.append((split, sid, where, xml, None if problems else annotation))
            if problems and sid not in exclude:
                found.skip(problems[0].kind, sid)
    classes = declared if declared is not None else sorted(seen_names)
    if not classes:
        raise DataError(
            f"{root / 'Annotations'}: no object in any annotation, and no {CLASSES_FILE} names the classes"
        )

    kept: dict[str, list[dict[str, Any]]] = {split: [] for split in listed}
    boxes: dict[str, Counter[str]] = {split: Counter() for split in listed}
    for split, sid, _where, xml, annotation in parsed:
        unknown = [obj for obj in annotation.objects if obj.name not in classes] if annotation else []
        for obj in unknown:
            found.problems.append(
                Problem(
                    BAD_CLASS,
                    sid,
                    f"{obj.where}: class {obj.name!r} is not in {root / CLASSES_FILE} ({', '.join(classes)})",
                )
            )
        if annotation is not None:
            boxes[split].update(obj.name for obj in annotation.objects if obj.name in classes)
        if sid in exclude:
            found.excluded.append(sid)
            found.skip(EXCLUDED, sid)
            continue
        if annotation is None:
            continue  # skipped above, with its problem
        if unknown:
            found.skip(BAD_CLASS, sid)
            continue
        image = root / "JPEGImages" / (annotation.filename or f"{sid}.jpg")
        size = check_image(image, sid, str(xml))
        if isinstance(size, Problem):
            found.fail(size)
            continue
        width, height = size
        if annotation.size is not None and annotation.size != (width, height):
            found.fail(
                Problem(
                    SIZE_MISMATCH,
                    sid,
                    f"{xml}: <size> says {annotation.size[0]}x{annotation.size[1]}, the image {image} is {width}x{height}",
                )
            )
            continue
        bound = next(
            (
                p
                for obj in annotation.objects
                if (p := check_box(obj.box, width, height, obj.where, sid)) is not None
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
                "annotation": str(xml),
                "width": width,
                "height": height,
                "objects": [{"label": obj.name, "bbox": obj.box} for obj in annotation.objects],
            }
        )
    for split in listed:
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
    name="voc",
    title="VOC",
    layout="SRC/Annotations/*.xml, SRC/JPEGImages/, SRC/ImageSets/Main/{train,val,trainval,test}.txt",
    convert=convert,
)
