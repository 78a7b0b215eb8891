"""DeepPCB -> training jsonl: read the official layout, validate it, write train/val/test samples.

The layout (https://github.com/tangsanli5201/DeepPCB): `PCBData/trainval.txt` and `PCBData/test.txt`
list one sample a line, `groupN/N/<id>.jpg groupN/N_not/<id>.txt`; the image path omits the `_test`
(board under test) and `_temp` (defect-free template) suffixes. Annotation lines are
`x1 y1 x2 y2 class` in pixels (space separated in the real data, commas in the upstream README; both
are read), classes as in `pcbvlm.labels`.

Public API:
- `build_messages(sample, data_cfg, with_answer=True)`: the chat of one sample (training, evaluation
  and inference share it).
- `prepare_data(cfg, deeppcb_dir=None, out_dir=None, strict=False)`: the whole `make data` job.
- `convert(deeppcb_dir, data_cfg)` (read and validate only) and `write_outputs(conversion, out_dir, cfg)`.
- `load_samples(data_dir, split)`: read a converted split back.
- `find_pcbdata`, `read_split_file`, `parse_annotation`, `assign_val`: the pieces, for tests and tools.

Problems (bad lines, missing files, duplicates, truncated images, empty annotation files) never stop a
normal run: the sample is skipped, counted and reported. `strict=True` turns any problem into a `DataError` before anything is written. A missing
split file or a folder without `PCBData` is an error in any mode.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pcbvlm.answer import format_answer
from pcbvlm.config import Config, DataConfig, write_resolved
from pcbvlm.errors import DataError
from pcbvlm.io import atomic_directory, atomic_write_json, atomic_write_jsonl, read_jsonl
from pcbvlm.labels import CLASS_NAMES

SPLIT_FILES: dict[str, str] = {"trainval": "trainval.txt", "test": "test.txt"}
OUTPUT_SPLITS: tuple[str, ...] = ("train", "val", "test")
STATS_FILE = "stats.json"

# Problem kinds; each names the reason a sample was skipped in stats.json.
MALFORMED_SPLIT_LINE = "malformed_split_line"
DUPLICATE_SAMPLE = "duplicate_sample"
MISSING_ANNOTATION = "missing_annotation"
# DeepPCB pairs every test image with its defects: all 1500 annotation files list at least one box, so an
# empty file is a lost or truncated annotation, not a defect-free board (the answer would teach "no defects").
EMPTY_ANNOTATION = "empty_annotation"
MALFORMED_LINE = "malformed_line"
BAD_CLASS = "bad_class"
DEGENERATE_BOX = "degenerate_box"
BOX_OUTSIDE_IMAGE = "box_outside_image"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
SIZE_MISMATCH = "size_mismatch"
# Not a problem: the config asked for it (e.g. 44000020, whose test image has its labels drawn on it).
EXCLUDED = "excluded"

_FIELD_SEP = re.compile(r"[,\s]+")
_SUMMARY_SHOWN = 5  # problems of one kind printed before "... and N more"


@dataclass(frozen=True)
class Problem:
    kind: str
    sample_id: str | None
    message: str  # one line, naming the file (and line) at fault


@dataclass(frozen=True)
class SplitEntry:
    split: str  # "trainval" or "test"
    where: str  # "<split file> line N", for messages
    sample_id: str
    image: Path  # <id>_test.jpg
    template: Path  # <id>_temp.jpg
    annotation: Path


@dataclass
class Conversion:
    """What `convert` read: the samples per output split, the counts, and every problem."""

    source: Path
    samples: dict[str, list[dict[str, Any]]]
    # Per split file: annotation files listed / read, and valid boxes per class (images or not).
    annotations: dict[str, dict[str, Any]]
    skipped: dict[str, list[str]]  # reason -> sample ids, in split-file order
    problems: list[Problem]
    data_cfg: DataConfig
    excluded: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        """The content of stats.json: deterministic (no times, no host names)."""
        written = {}
        for split in OUTPUT_SPLITS:
            rows = self.samples[split]
            written[split] = {
                "samples": len(rows),
                "boxes": _class_counts(obj for r in rows for obj in r["objects"]),
            }
        return {
            "source": str(self.source),
            "annotations": self.annotations,
            "written": written,
            "skipped": {reason: {"count": len(ids), "ids": ids} for reason, ids in self.skipped.items()},
            "excluded": self.excluded,
            "problems": [p.message for p in self.problems if p.kind != MISSING_IMAGE],
            "settings": {
                "val_fraction": self.data_cfg.val_fraction,
                "split_seed": self.data_cfg.split_seed,
                "exclude_ids": list(self.data_cfg.exclude_ids),
                "with_template": self.data_cfg.with_template,
            },
        }


def _class_counts(objects: Any) -> dict[str, int]:
    counts = Counter(obj["label"] for obj in objects)
    out = {name: counts.get(name, 0) for name in CLASS_NAMES.values()}
    out["total"] = sum(counts.values())
    return out


# ---------------------------------------------------------------------------------------------------------
# The chat of one sample


def build_messages(sample: Mapping[str, Any], data_cfg: DataConfig, with_answer: bool = True) -> list[dict]:
    """The Qwen3-VL chat of one sample, in the transformers chat-template format.

    `sample` needs `image` (path of the board under test) and, with `data_cfg.with_template`, `template`
    (the defect-free board, shown first); with `with_answer`, also `objects`, `width` and `height`, from
    which the assistant turn is written by `pcbvlm.answer.format_answer`. Evaluation and inference call
    this with `with_answer=False` so that the prompt is byte-for-byte the one trained on.
    """
    if data_cfg.with_template:
        template = sample.get("template")
        if not template:
            raise DataError(
                f"sample {sample.get('id', sample.get('image'))}: data.with_template is true but no template "
                "image is given"
            )
        images = [str(template), str(sample["image"])]
        prompt = data_cfg.template_prompt
    else:
        images = [str(sample["image"])]
        prompt = data_cfg.prompt
    content: list[dict[str, str]] = [{"type": "image", "image": path} for path in images]
    content.append({"type": "text", "text": prompt})
    messages: list[dict] = [{"role": "user", "content": content}]
    if with_answer:
        answer = format_answer(sample["objects"], int(sample["width"]), int(sample["height"]))
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


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
        if x2 <= x1 or y2 <= y1:
            problems.append(
                Problem(
                    DEGENERATE_BOX,
                    sample_id,
                    f"{where}: degenerate box [{x1}, {y1}, {x2}, {y2}] (needs x2 > x1 and y2 > y1)",
                )
            )
            continue
        if x1 < 0 or y1 < 0 or (width is not None and x2 > width) or (height is not None and y2 > height):
            size = f"{width}x{height}" if width is not None and height is not None else "the image"
            problems.append(
                Problem(
                    BOX_OUTSIDE_IMAGE,
                    sample_id,
                    f"{where}: box [{x1}, {y1}, {x2}, {y2}] lies outside the {size} image",
                )
            )
            continue
        objects.append({"label": CLASS_NAMES[cls], "bbox": [x1, y1, x2, y2]})
    return objects, problems


def _class_legend() -> str:
    return ", ".join(f"{cid} {name}" for cid, name in CLASS_NAMES.items())


def _image_size(path: Path) -> tuple[int, int]:
    """The size of a fully decoded image: a truncated or corrupt file is a DataError naming it.

    The header alone (Image.open) passes a truncated JPEG, which then kills training mid-run; load()
    decodes every pixel (about 5 ms for a 640x640 DeepPCB board). LOAD_TRUNCATED_IMAGES must stay off,
    or PIL pads the missing part with grey instead of raising.
    """
    from PIL import Image, ImageFile, UnidentifiedImageError

    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise DataError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on: truncated images would pass unnoticed")
    try:
        with Image.open(path) as img:
            img.load()
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot read the image ({type(err).__name__}: {err})") from None


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
        split: {"listed": 0, "annotation_files": 0, "boxes": _class_counts([])} for split in SPLIT_FILES
    }
    box_counts: dict[str, Counter[str]] = {split: Counter() for split in SPLIT_FILES}
    first_seen: dict[str, str] = {}
    kept: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLIT_FILES}
    excluded: list[str] = []

    def skip(reason: str, sample_id: str) -> None:
        skipped.setdefault(reason, []).append(sample_id)

    for entry in _progress(entries, progress):
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
        if not objects and not sample_problems:
            sample_problems = [
                Problem(
                    EMPTY_ANNOTATION,
                    sid,
                    f"{entry.annotation}: empty annotation file (every DeepPCB board has at least one defect; "
                    f"listed at {entry.where})",
                )
            ]
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
        try:
            width, height = _image_size(entry.image)
            t_width, t_height = _image_size(entry.template)
        except DataError as err:
            problems.append(Problem(UNREADABLE_IMAGE, sid, str(err)))
            skip(UNREADABLE_IMAGE, sid)
            continue
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
            "split": "",  # filled below, once train/val is decided
            "image": str(entry.image),
            "template": str(entry.template),
            "annotation": str(entry.annotation),
            "width": width,
            "height": height,
            "objects": objects,
        }
        kept[entry.split].append(sample)

    for split in SPLIT_FILES:
        boxes = {name: box_counts[split].get(name, 0) for name in CLASS_NAMES.values()}
        boxes["total"] = sum(box_counts[split].values())
        annotations[split]["boxes"] = boxes

    val_ids = assign_val([s["id"] for s in kept["trainval"]], data_cfg.val_fraction, data_cfg.split_seed)
    samples: dict[str, list[dict[str, Any]]] = {split: [] for split in OUTPUT_SPLITS}
    for sample in kept["trainval"]:
        samples["val" if sample["id"] in val_ids else "train"].append(sample)
    samples["test"] = kept["test"]
    for split, rows in samples.items():
        for sample in rows:
            sample["split"] = split
            sample["messages"] = build_messages(sample, data_cfg)

    return Conversion(
        source=pcbdata,
        samples=samples,
        annotations=annotations,
        skipped=skipped,
        problems=problems,
        data_cfg=data_cfg,
        excluded=excluded,
    )


def _progress(items: list[SplitEntry], enabled: bool) -> Any:
    if not enabled:
        return items
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in captured logs.
    return tqdm(items, desc="reading DeepPCB", unit="sample", disable=None, file=sys.stderr)


def write_outputs(conversion: Conversion, out_dir: str | Path, cfg: Config) -> list[Path]:
    """Write train/val/test.jsonl, stats.json and the resolved config under `out_dir`.

    A new folder appears whole (built beside it, then renamed). An existing one may hold other files, so
    each file is replaced atomically instead, stats.json last: a run killed midway leaves the previous
    stats.json, which names the previous conversion.
    """
    out = Path(out_dir)
    if out.resolve() == conversion.source or conversion.source in out.resolve().parents:
        raise DataError(
            f"{out}: output folder lies inside the DeepPCB data ({conversion.source}); choose another --out"
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


def prepare_data(
    cfg: Config,
    deeppcb_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    strict: bool = False,
    console: Any = None,
    progress: bool = True,
) -> Conversion:
    """The `make data` job: convert, print the summary, and write (unless --strict found problems).

    `deeppcb_dir` / `out_dir` override `cfg.paths.deeppcb_dir` / `cfg.paths.data_dir`; the resolved
    config written beside the outputs records the paths actually used.
    """
    cfg = cfg.model_copy(deep=True)
    if deeppcb_dir is not None:
        cfg.paths.deeppcb_dir = Path(deeppcb_dir)
    if out_dir is not None:
        cfg.paths.data_dir = Path(out_dir)
    conversion = convert(cfg.paths.deeppcb_dir, cfg.data, progress=progress)
    print_summary(conversion, console)
    if strict and conversion.problems:
        first = conversion.problems[0].message
        raise DataError(
            f"--strict: {len(conversion.problems)} problem(s), nothing written to {cfg.paths.data_dir}; first: {first}"
        )
    if not any(conversion.samples.values()):
        raise DataError(
            f"{conversion.source}: no sample could be converted "
            f"({', '.join(f'{len(ids)} {reason}' for reason, ids in conversion.skipped.items()) or 'split files are empty'})"
        )
    write_outputs(conversion, cfg.paths.data_dir, cfg)
    _out(console).print(f"wrote {cfg.paths.data_dir}/{{train,val,test}}.jsonl and {STATS_FILE}", markup=False)
    return conversion


def load_samples(data_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """The converted samples of `split` (train, val or test), as written by `make data`."""
    if split not in OUTPUT_SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(OUTPUT_SPLITS)}")
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: converted data not found (run `make data DEEPPCB_DIR=...` first)")
    return read_jsonl(path)


# ---------------------------------------------------------------------------------------------------------
# Summary


def _out(console: Any) -> Any:
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

    out = _out(console)
    err = Console(stderr=True, highlight=False, width=out.width)
    stats = conversion.stats()
    table = Table(title=Text(f"DeepPCB conversion: {conversion.source}"), title_justify="left")
    table.add_column("split")
    table.add_column("samples", justify="right")
    for name in CLASS_NAMES.values():
        table.add_column(name, justify="right")
    table.add_column("boxes", justify="right")
    for split, info in stats["annotations"].items():
        row = [f"{split} (annotations)", str(info["annotation_files"])]
        table.add_row(*row, *(str(info["boxes"][n]) for n in (*CLASS_NAMES.values(), "total")))
    table.add_section()
    for split, info in stats["written"].items():
        row = [f"{split} (written)", str(info["samples"])]
        table.add_row(*row, *(str(info["boxes"][n]) for n in (*CLASS_NAMES.values(), "total")))
    out.print(table)

    if conversion.excluded:
        out.print(f"excluded by data.exclude_ids: {', '.join(conversion.excluded)}", markup=False)
    for reason, ids in conversion.skipped.items():
        if reason == EXCLUDED:
            continue
        shown = ", ".join(ids[:_SUMMARY_SHOWN]) + (
            f", ... ({len(ids) - _SUMMARY_SHOWN} more)" if len(ids) > _SUMMARY_SHOWN else ""
        )
        out.print(f"skipped ({reason}): {len(ids)}: {shown}")

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
