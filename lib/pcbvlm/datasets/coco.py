"""COCO importer: `SRC/annotations.json` (COCO "instances" JSON), images in `SRC/` or `SRC/images/`.

- `categories[]` `{id, name}` give the class list, in id order;
- `images[]` `{id, file_name, width?, height?}`: `file_name` relative to `SRC/` or `SRC/images/`; the
  sample id is the file name's stem (two images with one stem are a duplicate);
- `annotations[]` `{image_id, category_id, bbox: [x, y, w, h]}` in pixels (floats allowed); an image
  without annotations is a board without defects.
COCO has no splits: train/val/test are seeded (`data.test_fraction`, `data.val_fraction`, `data.split_seed`).
Problems name the file and the element (`annotations.json annotations[12] (id 13)`), as a JSON file has
no line per annotation.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from pcbvlm.config import DataConfig
from pcbvlm.datasets.common import (
    BAD_CLASS,
    DUPLICATE_SAMPLE,
    EXCLUDED,
    MALFORMED_LINE,
    MISSING_IMAGE,
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

ANNOTATIONS_FILE = "annotations.json"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a text file ({err.reason})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a COCO object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: '{key}' must be a list (COCO instances format)")
    return data


def read_categories(path: Path, categories: list[Any]) -> dict[Any, str]:
    """category id -> name, in id order. A broken class list is an error in any mode."""
    names: dict[Any, str] = {}
    for i, cat in enumerate(categories):
        where = f"{path} categories[{i}]"
        if not isinstance(cat, dict) or not isinstance(cat.get("name"), str) or not cat["name"].strip():
            raise DataError(f"{where}: expected {{'id': ..., 'name': '<class>'}}")
        cid, name = cat.get("id"), cat["name"].strip()
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise DataError(f"{where}: 'id' must be an integer, got {cid!r}")
        if cid in names:
            raise DataError(f"{where}: category id {cid} appears twice")
        if name in names.values():
            raise DataError(f"{where}: category name {name!r} appears twice")
        names[cid] = name
    if not names:
        raise DataError(f"{path}: 'categories' is empty (the class list comes from it)")
    return dict(sorted(names.items()))


def _find_image(root: Path, file_name: str) -> Path | None:
    for base in (root, root / "images"):
        if (base / file_name).is_file():
            return (base / file_name).resolve()
    return None


def convert(src: str | Path, data_cfg: DataConfig, progress: bool = False) -> Conversion:
    """Read and validate `SRC/annotations.json` and its images; nothing is written."""
    root = Path(src).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: COCO folder not found (give SRC=<folder holding {ANNOTATIONS_FILE}>)")
    root = root.resolve()
    path = root / ANNOTATIONS_FILE
    if not path.is_file():
        raise DataError(
            f"{path}: not found (COCO layout: SRC/{ANNOTATIONS_FILE}, images in SRC/ or SRC/images/)"
        )
    no_template(data_cfg, FORMAT.title)
    data = _read_json(path)
    categories = read_categories(path, data["categories"])
    classes = list(categories.values())
    found = Collector()
    exclude = set(data_cfg.exclude_ids)

    # Images: id -> (where, sample id, file name, declared size)
    images: dict[Any, tuple[str, str, str, tuple[Any, Any]]] = {}
    first_seen: dict[str, str] = {}
    for i, img in enumerate(data["images"]):
        where = f"{path} images[{i}]"
        if not isinstance(img, dict) or not isinstance(img.get("file_name"), str) or not img["file_name"]:
            found.fail(Problem(MALFORMED_LINE, None, f"{where}: expected {{'id': ..., 'file_name': '...'}}"))
            continue
        image_id, file_name = img.get("id"), img["file_name"]
        sid = Path(file_name).stem
        if image_id in images:
            raise DataError(f"{where}: image id {image_id!r} appears twice (first at {images[image_id][0]})")
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
        images[image_id] = (where, sid, file_name, (img.get("width"), img.get("height")))

    # Annotations, per image in file order; a bad one costs its image.
    objects: dict[Any, list[tuple[str, str, list[float]]]] = {image_id: [] for image_id in images}
    bad: dict[Any, Problem] = {}
    boxes: Counter[str] = Counter()
    for i, ann in enumerate(data["annotations"]):
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        where = f"{path} annotations[{i}]" + (f" (id {ann_id})" if ann_id is not None else "")
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if image_id not in images:
            found.fail(Problem(MALFORMED_LINE, None, f"{where}: image_id {image_id!r} is not in images"))
            continue
        sid = images[image_id][1]
        bbox, cid = ann.get("bbox"), ann.get("category_id")
        problem = None
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            problem = Problem(
                MALFORMED_LINE, sid, f"{where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}"
            )
        elif cid not in categories:
            known = ", ".join(f"{k} {v}" for k, v in categories.items())
            problem = Problem(BAD_CLASS, sid, f"{where}: category_id {cid!r} is not in categories ({known})")
        else:
            x, y, w, h = (float(v) for v in bbox)
            box = [pixel(x), pixel(y), pixel(x + w), pixel(y + h)]
            problem = check_box(box, None, None, where, sid)
        if problem is not None:
            found.problems.append(problem)
            bad.setdefault(image_id, problem)
            continue
        boxes[categories[cid]] += 1
        objects[image_id].append((where, categories[cid], box))

    kept: dict[str, list[dict[str, Any]]] = {"all": []}
    for image_id, (where, sid, file_name, declared) in progress_bar(
        list(images.items()), progress, "reading COCO"
    ):
        if sid in exclude:
            found.excluded.append(sid)
            found.skip(EXCLUDED, sid)
            continue
        if image_id in bad:
            found.skip(bad[image_id].kind, sid)
            continue
        image = _find_image(root, file_name)
        if image is None:
            found.fail(
                Problem(MISSING_IMAGE, sid, f"{where}: {file_name} not found in {root} or {root / 'images'}")
            )
            continue
        size = check_image(image, sid, where)
        if isinstance(size, Problem):
            found.fail(size)
            continue
        width, height = size
        if declared != (None, None) and tuple(declared) != (width, height):
            found.fail(
                Problem(
                    SIZE_MISMATCH,
                    sid,
                    f"{where}: width x height {declared[0]}x{declared[1]}, the image {image} is {width}x{height}",
                )
            )
            continue
        bound = next(
            (
                p
                for w, _, box in objects[image_id]
                if (p := check_box(box, width, height, w, sid)) is not None
            ),
            None,
        )
        if bound is not None:
            found.fail(bound)
            continue
        kept["all"].append(
            {
                "id": sid,
                "split": "",
                "image": str(image),
                "annotation": str(path),
                "width": width,
                "height": height,
                "objects": [{"label": label, "bbox": box} for _, label, box in objects[image_id]],
            }
        )

    annotations = {
        "all": {
            "listed": len(data["images"]),
            "annotation_files": len(images),
            "boxes": class_counts(boxes.elements(), classes),
        }
    }
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
    name="coco",
    title="COCO",
    layout="SRC/annotations.json (COCO instances), images in SRC/ or SRC/images/",
    convert=convert,
)
