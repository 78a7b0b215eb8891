"""DeepPCB importer: read the official layout, validate it, give train/val/test samples.

The layout (https://github.com/tangsanli5201/DeepPCB): `PCBData/trainval.txt` and `PCBData/test.txt`
list one sample a line, `groupN/N/<id>.jpg groupN/N_not/<id>.txt`; the image path omits the `_test`
(board under test) and `_temp` (defect-free template) suffixes. Annotation lines are
`x1 y1 x2 y2 class` in pixels (space separated in the real data, commas in the upstream README; both
are read), classes as in `pcbvlm.labels`.

Public API:
- `convert(deeppcb_dir, data_cfg)` (read and validate only; `pcbvlm.datasets.prepare_data` writes).
- `find_pcbdata`, `read_split_file`, `parse_annotation`: the pieces, for tests and tools.

Problems (bad lines, missing files, duplicates) never stop a normal run: the sample is skipped, counted
and reported. `strict=True` turns any problem into a `DataError` before anything is written. A missing
split file or a folder without `PCBData` is an error in any mode.
"""

from __future__ import annotations

import re
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
    MISSING_IMAGE,
    SIZE_MISMATCH,
    Conversion,
    DatasetFormat,
    Problem,
    check_box,
    check_image,
    class_counts,
    finish,
    progress_bar,
)
from pcbvlm.errors import DataError
from pcbvlm.labels import CLASS_NAMES, LABELS

SPLIT_FILES: dict[str, str] = {"trainval": "trainval.txt", "test": "test.txt"}
_FIELD_SEP = re.compile(r"[,\s]+")


@dataclass(frozen=True)
class SplitEntry:
    split: str  # "trainval" or "test"
    where: str  # "<split file> line N", for messages
    sample_id: str
    image: Path  # <id>_test.jpg
    template: Path  # <id>_temp.jpg
    annotation: Path


# ---------------------------------------------------------------------------------------------------------
# Reading the layout


def find_pcbdata(deeppcb_dir: str | Path) -> Path:
    """The `PCBData` folder: `deeppcb_dir/PCBData`, or `deeppcb_dir` itself when it holds the split files."""
    root = Path(deeppcb_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: DeepPCB folder not found (give DEEPPCB_DIR=... or set paths.deeppcb_dir)")
    if (root / "PCBData").is_dir():
        return (root / "PCBData").resolve()
    if root.name == "PCBData" or any((root / name).is_file() for name in SPLIT_FILES.values()):
        return root.resolve()
    raise DataError(
        f"{root}: no PCBData folder here (give the folder that holds PCBData/, or PCBData itself)"
    )


def read_split_file(pcbdata: Path, split: str) -> tuple[list[SplitEntry], list[Problem]]:
    """Entries of `trainval` or `test`, in file order; malformed lines become problems."""
    path = pcbdata / SPLIT_FILES[split]
    if not path.is_file():
        raise DataError(f"{path}: split file not found (PCBData must hold trainval.txt and test.txt)")
    entries: list[SplitEntry] = []
    problems: list[Problem] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a text file ({err.reason})") from None
    # DeepPCB's split files have no final newline; splitlines() reads them the same either way.
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        where = f"{path} line {number}"
        parts = line.split()
        image_rel = Path(parts[0]) if parts else None
        ann_rel = Path(parts[1]) if len(parts) > 1 else None
        if (
            len(parts) != 2
            or image_rel is None
            or ann_rel is None
            or image_rel.suffix.lower() != ".jpg"
            or ann_rel.suffix.lower() != ".txt"
            or image_rel.stem != ann_rel.stem
            or image_rel.is_absolute()
            or ann_rel.is_absolute()
        ):
            problems.append(
                Problem(
                    MALFORMED_SPLIT_LINE,
                    None,
                    f"{where}: expected 'groupN/N/<id>.jpg groupN/N_not/<id>.txt', got {line[:120]!r}",
                )
            )
            continue
        stem = image_rel.stem
        entries.append(
            SplitEntry(
                split=split,
                where=where,
                sample_id=stem,
                image=pcbdata / image_rel.with_name(f"{stem}_test.jpg"),
                template=pcbdata / image_rel.with_name(f"{stem}_temp.jpg"),
                annotation=pcbdata / ann_rel,
            )
        )
    return entries, problems


def parse_annotation(
    path: Path, width: int | None = None, height: int | None = None, sample_id: str | None = None
) -> tuple[list[dict[str, Any]], list[Problem]]:
    """`x1 y1 x2 y2 class` lines -> `[{"label", "bbox"}]` in file order, and the problems of bad lines.

    A bad line gives a problem and no object; boxes are checked against the image when its size is
    known (a box may touch the far edge: x2 == width).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        return [], [Problem(MALFORMED_LINE, sample_id, f"{path}: not a text file ({err.reason})")]
    objects: list[dict[str, Any]] = []
    problems: list[Problem] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        where = f"{path} line {number}"
        fields = _FIELD_SEP.split(line)
        try:
            if len(fields) != 5:
                raise ValueError
            x1, y1, x2, y2, cls = (int(v) for v in fields)
        except ValueError:
            problems.append(
                Problem(
                    MALFORMED_LINE,
                    sample_id,
                    f"{where}: expected 'x1 y1 x2 y2 class' (5 integers), got {line[:80]!r}",
                )
            )
            continue
        if cls not in CLASS_NAMES:
            problems.append(
                Problem(
                    BAD_CLASS,
                    sample_id,
                    f"{where}: class {cls} outside 1-{max(CLASS_NAMES)} ({_class_legend()})",
                )
            )
            continue
        bad_box = check_box((x1, y1, x2, y2), width, height, where, sample_id)
        if bad_box is not None:
            problems.append(bad_box)
            continue
        objects.append({"label": CLASS_NAMES[cls], "bbox": [x1, y1, x2, y2]})
    return objects, problems


def _class_legend() -> str:
    return ", ".join(f"{cid} {name}" for cid, name in CLASS_NAMES.items())


# ---------------------------------------------------------------------------------------------------------
# Conversion


def convert(deeppcb_dir: str | Path, data_cfg: DataConfig, progress: bool = False) -> Conversion:
    """Read and validate the whole layout; nothing is written. Raises DataError only for hard errors."""
    pcbdata = find_pcbdata(deeppcb_dir)
    entries: list[SplitEntry] = []
    problems: list[Problem] = []
    for split in SPLIT_FILES:
        split_entries, split_problems = read_split_file(pcbdata, split)
        entries.extend(split_entries)
        problems.extend(split_problems)

    exclude = set(data_cfg.exclude_ids)
    skipped: dict[str, list[str]] = {}
    annotations = {
        split: {"listed": 0, "annotation_files": 0, "boxes": class_counts([], LABELS)}
        for split in SPLIT_FILES
    }
    box_counts: dict[str, Counter[str]] = {split: Counter() for split in SPLIT_FILES}
    first_seen: dict[str, str] = {}
    kept: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLIT_FILES}
    excluded: list[str] = []

    def skip(reason: str, sample_id: str) -> None:
        skipped.setdefault(reason, []).append(sample_id)

    for entry in progress_bar(entries, progress, "reading DeepPCB"):
        sid = entry.sample_id
        annotations[entry.split]["listed"] += 1
        if sid in first_seen:
            problems.append(
                Problem(
                    DUPLICATE_SAMPLE,
                    sid,
                    f"{entry.where}: sample {sid} is listed twice (first at {first_seen[sid]})",
                )
            )
            skip(DUPLICATE_SAMPLE, sid)
            continue
        first_seen[sid] = entry.where

        if not entry.annotation.is_file():
            problems.append(
                Problem(
                    MISSING_ANNOTATION,
                    sid,
                    f"{entry.annotation}: annotation file not found (listed at {entry.where})",
                )
            )
            skip(MISSING_ANNOTATION, sid)
            continue
        annotations[entry.split]["annotation_files"] += 1
        # Parsed before the image is looked at, so that the box counts cover every annotation file.
        objects, sample_problems = parse_annotation(entry.annotation, sample_id=sid)
        box_counts[entry.split].update(obj["label"] for obj in objects)
        problems.extend(sample_problems)

        if sid in exclude:
            excluded.append(sid)
            skip(EXCLUDED, sid)
            continue
        if sample_problems:
            # A bad line is a defect the image shows but the answer would omit: the whole sample goes.
            skip(sample_problems[0].kind, sid)
            continue

        missing = [p for p in (entry.image, entry.template) if not p.is_file()]
        if missing:
            names = " and ".join(p.name for p in missing)
            problems.append(
                Problem(MISSING_IMAGE, sid, f"{entry.where}: {names} not found in {missing[0].parent}")
            )
            skip(MISSING_IMAGE, sid)
            continue
        sizes = [check_image(path, sid, entry.where) for path in (entry.image, entry.template)]
        bad_image = next((size for size in sizes if isinstance(size, Problem)), None)
        if bad_image is not None:
            problems.append(bad_image)
            skip(bad_image.kind, sid)
            continue
        (width, height), (t_width, t_height) = sizes
        if (t_width, t_height) != (width, height):
            problems.append(
                Problem(
                    SIZE_MISMATCH,
                    sid,
                    f"{entry.template}: template is {t_width}x{t_height}, the test image {width}x{height}",
                )
            )
            skip(SIZE_MISMATCH, sid)
            continue
        objects, bound_problems = parse_annotation(entry.annotation, width, height, sample_id=sid)
        if bound_problems:
            problems.extend(bound_problems)
            skip(bound_problems[0].kind, sid)
            continue
        sample: dict[str, Any] = {
            "id": sid,
            "split": "",  # filled by `finish`, once train/val is decided
            "image": str(entry.image),
            "template": str(entry.template),
            "annotation": str(entry.annotation),
            "width": width,
            "height": height,
            "objects": objects,
        }
        kept[entry.split].append(sample)

    for split in SPLIT_FILES:
        annotations[split]["boxes"] = class_counts(box_counts[split].elements(), LABELS)

    return finish(
        pcbdata,
        kept,
        data_cfg,
        LABELS,
        annotations=annotations,
        skipped=skipped,
        problems=problems,
        excluded=excluded,
        fmt=FORMAT,
    )


FORMAT = DatasetFormat(
    name="deeppcb",
    title="DeepPCB",
    layout="PCBData/{trainval,test}.txt, groupN/N/<id>_test.jpg and _temp.jpg, groupN/N_not/<id>.txt",
    convert=convert,
)
