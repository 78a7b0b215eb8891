"""What every importer shares: problem kinds, the image and box checks, the split rules, the written
folder and the summary. An importer reads its layout into samples and problems; everything after that
(train/val/test assignment, messages, stats.json, --strict, atomic writes) happens here, once.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pcbvlm.config import Config, DataConfig, write_resolved
from pcbvlm.errors import DataError
from pcbvlm.io import atomic_directory, atomic_write_json, atomic_write_jsonl
from pcbvlm.samples import OUTPUT_SPLITS, STATS_FILE, build_messages

# Problem kinds; each names the reason a sample was skipped in stats.json.
MALFORMED_SPLIT_LINE = "malformed_split_line"
DUPLICATE_SAMPLE = "duplicate_sample"
MISSING_ANNOTATION = "missing_annotation"
MALFORMED_LINE = "malformed_line"
BAD_CLASS = "bad_class"
DEGENERATE_BOX = "degenerate_box"
BOX_OUTSIDE_IMAGE = "box_outside_image"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
SIZE_MISMATCH = "size_mismatch"
# Not a problem: the config asked for it (e.g. 44000020, whose test image has its labels drawn on it).
EXCLUDED = "excluded"

# Source split names an importer may give its samples. "trainval" and "all" are pools the seeded split
# divides; a source without "val" or "test" gets them carved from its training pool (`assign_splits`).
SOURCE_SPLITS: tuple[str, ...] = ("train", "val", "test", "trainval", "all")
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_SUMMARY_SHOWN = 5  # problems of one kind printed before "... and N more"
_TABLE_CLASSES = 10  # more classes than this: the summary table shows totals only (stats.json has all)


@dataclass(frozen=True)
class Problem:
    kind: str
    sample_id: str | None
    message: str  # one line, naming the file (and line) at fault


@dataclass(frozen=True)
class DatasetFormat:
    """One importer, as the registry (`pcbvlm.datasets.FORMATS`) knows it."""

    name: str  # FORMAT=<name>
    title: str  # for messages: "COCO"
    layout: str  # one line: what SRC must hold
    convert: Callable[..., Conversion]  # convert(src, data_cfg, progress=False) -> Conversion


@dataclass
class Conversion:
    """What an importer read: the samples per output split, the counts, and every problem."""

    source: Path
    samples: dict[str, list[dict[str, Any]]]
    # Per source split: samples listed / with annotations read, and valid boxes per class (images or not).
    annotations: dict[str, dict[str, Any]]
    skipped: dict[str, list[str]]  # reason -> sample ids, in source order
    problems: list[Problem]
    data_cfg: DataConfig
    excluded: list[str] = field(default_factory=list)
    classes: tuple[str, ...] = ()
    format: str = "deeppcb"
    title: str = "DeepPCB"

    def stats(self) -> dict[str, Any]:
        """The content of stats.json: deterministic (no times, no host names)."""
        written = {}
        for split in OUTPUT_SPLITS:
            rows = self.samples[split]
            written[split] = {
                "samples": len(rows),
                "boxes": class_counts((obj["label"] for r in rows for obj in r["objects"]), self.classes),
            }
        return {
            "source": str(self.source),
            "format": self.format,
            "classes": list(self.classes),
            "annotations": self.annotations,
            "written": written,
            "skipped": {reason: {"count": len(ids), "ids": ids} for reason, ids in self.skipped.items()},
            "excluded": self.excluded,
            "problems": [p.message for p in self.problems if p.kind != MISSING_IMAGE],
            "settings": {
                "val_fraction": self.data_cfg.val_fraction,
                "test_fraction": self.data_cfg.test_fraction,
                "split_seed": self.data_cfg.split_seed,
                "exclude_ids": list(self.data_cfg.exclude_ids),
                "with_template": self.data_cfg.with_template,
            },
        }


def class_counts(labels: Iterable[str], classes: Sequence[str]) -> dict[str, int]:
    counts = Counter(labels)
    out = {name: counts.get(name, 0) for name in classes}
    out["total"] = sum(counts.values())
    return out


# ---------------------------------------------------------------------------------------------------------
# Checks every importer applies


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file; DataError naming the file when it cannot be read.

    The one image check of every importer: make it stricter here (e.g. a full decode to catch truncated
    JPEGs) and every format gets it.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:  # reads the header only
            return img.size
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: cannot read the image ({type(err).__name__}: {err})") from None


def check_image(path: Path, sample_id: str | None, where: str) -> tuple[int, int] | Problem:
    """(width, height) of the image at `path`, or the problem: missing (named with `where`, the place
    that listed it) or unreadable."""
    if not path.is_file():
        return Problem(MISSING_IMAGE, sample_id, f"{where}: {path.name} not found in {path.parent}")
    try:
        return image_size(path)
    except DataError as err:
        return Problem(UNREADABLE_IMAGE, sample_id, str(err))


def check_box(
    box: Sequence[float], width: int | None, height: int | None, where: str, sample_id: str | None
) -> Problem | None:
    """A pixel box [x1, y1, x2, y2] must have x2 > x1, y2 > y1 and lie in the image (it may touch the far
    edge: x2 == width). Bounds are checked only when the size is known."""
    x1, y1, x2, y2 = box
    shown = ", ".join(_number(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        return Problem(
            DEGENERATE_BOX, sample_id, f"{where}: degenerate box [{shown}] (needs x2 > x1 and y2 > y1)"
        )
    if x1 < 0 or y1 < 0 or (width is not None and x2 > width) or (height is not None and y2 > height):
        size = f"{width}x{height}" if width is not None and height is not None else "the image"
        return Problem(BOX_OUTSIDE_IMAGE, sample_id, f"{where}: box [{shown}] lies outside the {size} image")
    return None


def pixel(value: float) -> int | float:
    """A pixel coordinate as stored: two decimals, and an int when it is whole (so that integer boxes
    of one format and float boxes of another give the same jsonl)."""
    value = round(float(value), 2)
    return int(value) if value.is_integer() else value


def _number(value: float) -> str:
    return str(pixel(value)) if isinstance(value, float) else str(value)


def assign_val(ids: Sequence[str], fraction: float, seed: int) -> set[str]:
    """The validation share of `ids`: the round(fraction * n) ids with the smallest seeded hash.

    Ranking by a hash of (seed, id) keeps an id's side stable when other samples come or go (a subset of
    the images today, the full set tomorrow); taking the k smallest gives an exact count. At least one
    id goes to val when fraction > 0 and there are two or more, so eval loss is never computed on nothing.
    """
    n = len(ids)
    k = round(n * fraction)
    if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    ranked = sorted(ids, key=lambda sid: hashlib.sha256(f"{seed}:{sid}".encode()).hexdigest())
    return set(ranked[:k])


def assign_splits(kept: dict[str, list[dict[str, Any]]], data_cfg: DataConfig) -> dict[str, list[dict]]:
    """Source splits -> train/val/test, keeping source order within each.

    `kept` has a key for every split the source declares (empty or not): train, val and test are kept
    as they are; trainval and all are pools. A source without a test split gets a seeded
    `data.test_fraction` of its training pool (pools, then train) as test; then a source without a val
    split gets a seeded `data.val_fraction` of what is left as val. The rest is train. (DeepPCB:
    trainval -> train + val, test -> test.)
    """
    unknown = set(kept) - set(SOURCE_SPLITS)
    if unknown:
        raise ValueError(f"unknown source splits {sorted(unknown)}")
    pool = [*kept.get("trainval", []), *kept.get("all", []), *kept.get("train", [])]
    seed = data_cfg.split_seed
    test_ids: set[str] = set()
    if "test" not in kept:
        test_ids = assign_val([s["id"] for s in pool], data_cfg.test_fraction, seed)
    rest = [s["id"] for s in pool if s["id"] not in test_ids]
    val_ids = set() if "val" in kept else assign_val(rest, data_cfg.val_fraction, seed)
    out: dict[str, list[dict[str, Any]]] = {
        "train": [],
        "val": list(kept.get("val", [])),
        "test": list(kept.get("test", [])),
    }
    for sample in pool:
        sid = sample["id"]
        out["test" if sid in test_ids else "val" if sid in val_ids else "train"].append(sample)
    return out


def finish(
    source: Path,
    kept: dict[str, list[dict[str, Any]]],
    data_cfg: DataConfig,
    classes: Sequence[str],
    *,
    annotations: dict[str, dict[str, Any]],
    skipped: dict[str, list[str]],
    problems: list[Problem],
    excluded: list[str],
    fmt: DatasetFormat | None = None,
) -> Conversion:
    """Assign the splits, attach the class list and the messages, and make the Conversion."""
    samples = assign_splits(kept, data_cfg)
    for split, rows in samples.items():
        for sample in rows:
            sample["split"] = split
            sample["classes"] = list(classes)
            sample["messages"] = build_messages(sample, data_cfg)
    return Conversion(
        source=source,
        samples=samples,
        annotations=annotations,
        skipped=skipped,
        problems=problems,
        data_cfg=data_cfg,
        excluded=excluded,
        classes=tuple(classes),
        format=fmt.name if fmt else "deeppcb",
        title=fmt.title if fmt else "DeepPCB",
    )


def no_template(data_cfg: DataConfig, title: str) -> None:
    """Only DeepPCB pairs each board with a defect-free template."""
    if data_cfg.with_template:
        raise DataError(
            f"data.with_template is true, but {title} data has no template images; set data.with_template=false"
        )


def progress_bar(items: Sequence[Any], enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in captured logs.
    return tqdm(items, desc=desc, unit="sample", disable=None, file=sys.stderr)


class Collector:
    """Problems and skipped samples as an importer meets them."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.skipped: dict[str, list[str]] = {}
        self.excluded: list[str] = []

    def skip(self, reason: str, sample_id: str) -> None:
        self.skipped.setdefault(reason, []).append(sample_id)

    def fail(self, problem: Problem) -> None:
        """A problem that costs its sample."""
        self.problems.append(problem)
        if problem.sample_id is not None:
            self.skip(problem.kind, problem.sample_id)


# ---------------------------------------------------------------------------------------------------------
# Writing


def write_outputs(conversion: Conversion, out_dir: str | Path, cfg: Config) -> list[Path]:
    """Write train/val/test.jsonl, stats.json and the resolved config under `out_dir`.

    A new folder appears whole (built beside it, then renamed). An existing one may hold other files, so
    each file is replaced atomically instead, stats.json last: a run killed midway leaves the previous
    stats.json, which names the previous conversion.
    """
    out = Path(out_dir)
    if out.resolve() == conversion.source or conversion.source in out.resolve().parents:
        raise DataError(
            f"{out}: output folder lies inside the {conversion.title} data ({conversion.source}); "
            "choose another --out"
        )
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: output path exists and is not a folder")
    if out.exists():
        return _write_files(conversion, out, cfg)
    with atomic_directory(out) as tmp:
        names = [path.name for path in _write_files(conversion, tmp, cfg)]
    return [out / name for name in names]


def _write_files(conversion: Conversion, directory: Path, cfg: Config) -> list[Path]:
    written = [
        atomic_write_jsonl(directory / f"{split}.jsonl", conversion.samples[split]) for split in OUTPUT_SPLITS
    ]
    written.append(write_resolved(cfg, directory))
    written.append(atomic_write_json(directory / STATS_FILE, conversion.stats()))
    return written


# ---------------------------------------------------------------------------------------------------------
# Summary


def console_out(console: Any) -> Any:
    if console is not None:
        return console
    from rich.console import Console

    out = Console(highlight=False)
    if not out.is_terminal:
        out.width = 120  # logs: the default 80 columns would wrap the table's class names
    return out


def print_summary(conversion: Conversion, console: Any = None) -> None:
    """The counts as a table on stdout; every problem kind, with its first few messages, on stderr."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    out = console_out(console)
    err = Console(stderr=True, highlight=False, width=out.width)
    stats = conversion.stats()
    shown_classes = list(conversion.classes) if len(conversion.classes) <= _TABLE_CLASSES else []
    table = Table(title=Text(f"{conversion.title} conversion: {conversion.source}"), title_justify="left")
    table.add_column("split")
    table.add_column("samples", justify="right")
    for name in shown_classes:
        table.add_column(name, justify="right")
    table.add_column("boxes", justify="right")
    for split, info in stats["annotations"].items():
        row = [f"{split} (annotations)", str(info["annotation_files"])]
        table.add_row(*row, *(str(info["boxes"][n]) for n in (*shown_classes, "total")))
    table.add_section()
    for split, info in stats["written"].items():
        row = [f"{split} (written)", str(info["samples"])]
        table.add_row(*row, *(str(info["boxes"][n]) for n in (*shown_classes, "total")))
    out.print(table)
    if not shown_classes:
        out.print(f"{len(conversion.classes)} classes (boxes per class: {STATS_FILE})", markup=False)

    if conversion.excluded:
        out.print(f"excluded by data.exclude_ids: {', '.join(conversion.excluded)}", markup=False)
    for reason, ids in conversion.skipped.items():
        if reason == EXCLUDED:
            continue
        shown = ", ".join(ids[:_SUMMARY_SHOWN]) + (
            f", ... ({len(ids) - _SUMMARY_SHOWN} more)" if len(ids) > _SUMMARY_SHOWN else ""
        )
        out.print(f"skipped ({reason}): {len(ids)}: {shown}", markup=False)

    by_kind: dict[str, list[Problem]] = {}
    for problem in conversion.problems:
        by_kind.setdefault(problem.kind, []).append(problem)
    for kind, items in by_kind.items():
        for problem in items[:_SUMMARY_SHOWN]:
            err.print(f"problem: {problem.message}", soft_wrap=True, markup=False)
        if len(items) > _SUMMARY_SHOWN:
            err.print(
                f"problem: ... and {len(items) - _SUMMARY_SHOWN} more {kind} (see {STATS_FILE})",
                soft_wrap=True,
            )
