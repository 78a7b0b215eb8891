"""Bring your own boards: COCO, YOLO and VOC importers give the same training data as DeepPCB.

The same synthetic boards (pcbvlm.synth, DeepPCB layout) are written again as COCO, YOLO and VOC by the
small writers below; each importer must then produce the samples the DeepPCB importer produces (same
ids, sizes, labels, boxes, messages), on square and non-square images, and apply the same validation and
--strict semantics.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image
from rich.console import Console

from conftest import ROOT, run_job
from pcbvlm.answer import format_answer
from pcbvlm.config import load_config
from pcbvlm.datasets import FORMATS, prepare_data
from pcbvlm.datasets.deeppcb import parse_annotation, read_split_file
from pcbvlm.datasets.yolo import read_names
from pcbvlm.errors import DataError
from pcbvlm.evaluate import load_scoring_samples, read_predictions, score_predictions
from pcbvlm.labels import LABELS
from pcbvlm.parsing import parse_answer
from pcbvlm.samples import build_messages, dataset_classes, load_samples, render_prompt
from pcbvlm.synth import generate_dataset

SIZE = 256  # synthetic boards are SIZE x SIZE; "non-square" pads them onto a wider canvas
SHAPES = {"square": None, "non-square": (384, SIZE)}
NUM = 6
OUTPUTS = ("train.jsonl", "val.jsonl", "test.jsonl", "stats.json", "config.resolved.yaml")


@dataclass(frozen=True)
class Board:
    id: str
    split: str  # DeepPCB's: trainval or test
    image: Path
    width: int
    height: int
    objects: list[dict[str, Any]]


# ---------------------------------------------------------------------------------------------------------
# Writers: the same boards in each layout


def make_deeppcb(root: Path, canvas: tuple[int, int] | None, seed: int = 5) -> Path:
    """Synthetic boards in the DeepPCB layout; with `canvas`, every image is padded (white, right and
    bottom) to that width x height, so the boxes stay where they are on a non-square image."""
    layout = root / "DeepPCB"
    generate_dataset(layout, NUM, seed=seed, size=SIZE)
    if canvas is not None:
        for path in layout.rglob("*.jpg"):
            with Image.open(path) as img:
                padded = Image.new(img.mode, canvas, 255)
                padded.paste(img, (0, 0))
            padded.save(path, quality=92)
    return layout


def deeppcb_boards(layout: Path) -> list[Board]:
    pcbdata = layout / "PCBData"
    boards = []
    for split in ("trainval", "test"):
        entries, problems = read_split_file(pcbdata, split)
        assert problems == []
        for entry in entries:
            objects, problems = parse_annotation(entry.annotation)
            assert problems == []
            with Image.open(entry.image) as img:
                width, height = img.size
            boards.append(Board(entry.sample_id, split, entry.image, width, height, objects))
    return boards


def write_coco(boards: list[Board], dst: Path) -> Path:
    """annotations.json with categories 1..6 and [x, y, w, h] boxes; images in dst/images/."""
    (dst / "images").mkdir(parents=True)
    images, annotations = [], []
    for image_id, board in enumerate(boards, start=1):
        shutil.copyfile(board.image, dst / "images" / f"{board.id}.jpg")
        images.append(
            {"id": image_id, "file_name": f"{board.id}.jpg", "width": board.width, "height": board.height}
        )
        for obj in board.objects:
            x1, y1, x2, y2 = obj["bbox"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": LABELS.index(obj["label"]) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": i, "name": name, "supercategory": "defect"} for i, name in enumerate(LABELS, start=1)
    ]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (dst / "annotations.json").write_text(json.dumps(coco, indent=1))
    return dst


def write_yolo(boards: list[Board], dst: Path) -> Path:
    """data.yaml (names as a list), images/{train,test}/<id>.jpg, labels/{train,test}/<id>.txt."""
    dst.mkdir(parents=True)
    (dst / "data.yaml").write_text(
        yaml.safe_dump({"path": ".", "train": "images/train", "names": list(LABELS)})
    )
    for board in boards:
        split = "train" if board.split == "trainval" else "test"
        (dst / "images" / split).mkdir(parents=True, exist_ok=True)
        (dst / "labels" / split).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(board.image, dst / "images" / split / f"{board.id}.jpg")
        lines = []
        for obj in board.objects:
            x1, y1, x2, y2 = obj["bbox"]
            w, h = board.width, board.height
            cx, cy, bw, bh = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h
            lines.append(f"{LABELS.index(obj['label'])} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}\n")
        (dst / "labels" / split / f"{board.id}.txt").write_text("".join(lines))
    return dst


def voc_xml(board: Board) -> str:
    objects = "".join(
        f"  <object>\n    <name>{obj['label']}</name>\n    <difficult>0</difficult>\n    <bndbox>\n"
        f"      <xmin>{x1 + 1}</xmin>\n      <ymin>{y1 + 1}</ymin>\n      <xmax>{x2}</xmax>\n      <ymax>{y2}</ymax>\n"
        "    </bndbox>\n  </object>\n"
        for obj in board.objects
        for x1, y1, x2, y2 in [obj["bbox"]]
    )
    return (
        f"<annotation>\n  <folder>JPEGImages</folder>\n  <filename>{board.id}.jpg</filename>\n"
        f"  <size>\n    <width>{board.width}</width>\n    <height>{board.height}</height>\n    <depth>1</depth>\n"
        f"  </size>\n{objects}</annotation>\n"
    )


def write_voc(boards: list[Board], dst: Path) -> Path:
    """Annotations/<id>.xml (1-based pixel indices), JPEGImages/, ImageSets/Main/{trainval,test}.txt,
    classes.txt (the class order)."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (dst / folder).mkdir(parents=True)
    for board in boards:
        shutil.copyfile(board.image, dst / "JPEGImages" / f"{board.id}.jpg")
        (dst / "Annotations" / f"{board.id}.xml").write_text(voc_xml(board))
    for split in ("trainval", "test"):
        ids = [b.id for b in boards if b.split == split]
        (dst / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (dst / "classes.txt").write_text("\n".join(LABELS) + "\n")
    return dst


WRITERS = {"coco": write_coco, "yolo": write_yolo, "voc": write_voc}


def _config(*overrides: str):
    return load_config(ROOT / "config" / "config.yaml", list(overrides))


def _quiet() -> Console:
    return Console(file=io.StringIO())


def _by_id(out: Path) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for split in ("train", "val", "test") for row in load_samples(out, split)}


def _read_outputs(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module", params=list(SHAPES))
def boards(request, tmp_path_factory) -> tuple[Path, Path, list[Board]]:
    """(DeepPCB layout, its conversion, its boards), square and non-square."""
    root = tmp_path_factory.mktemp(request.param)
    layout = make_deeppcb(root, SHAPES[request.param])
    out = root / "reference"
    prepare_data(_config(), source=layout, out_dir=out, strict=True, progress=False, console=_quiet())
    return layout, out, deeppcb_boards(layout)


# ---------------------------------------------------------------------------------------------------------
# The same training data from every layout


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_layout_gives_the_same_training_data_as_deeppcb(fmt, boards, tmp_path):
    _, reference_dir, board_list = boards
    src = WRITERS[fmt](board_list, tmp_path / fmt)
    out = tmp_path / "converted"
    prepare_data(_config(), source=src, out_dir=out, fmt=fmt, strict=True, progress=False, console=_quiet())

    reference, rows = _by_id(reference_dir), _by_id(out)
    assert rows.keys() == reference.keys() and len(rows) == NUM
    sizes = {(b.width, b.height) for b in board_list}
    assert len(sizes) == 1
    for sid, row in rows.items():
        ref = reference[sid]
        assert (row["width"], row["height"]) == (ref["width"], ref["height"])
        assert [o["label"] for o in row["objects"]] == [o["label"] for o in ref["objects"]]
        for obj, ref_obj in zip(row["objects"], ref["objects"], strict=True):
            assert max(abs(a - b) for a, b in zip(obj["bbox"], ref_obj["bbox"], strict=True)) < 1
        # Same chat: the prompt and the answer text are equal; the image is the same picture elsewhere.
        assert Path(row["image"]).read_bytes() == Path(ref["image"]).read_bytes()
        user, answer = row["messages"]
        ref_user, ref_answer = ref["messages"]
        assert answer == ref_answer
        assert user["content"][1:] == ref_user["content"][1:]
        assert user["content"][0] == {"type": "image", "image": row["image"]}
        assert row["classes"] == list(LABELS)
    if fmt in ("yolo", "voc"):  # the source's splits (train/trainval + test): the same seeded val
        assert {sid: r["split"] for sid, r in rows.items()} == {
            sid: r["split"] for sid, r in reference.items()
        }
    else:  # COCO has no splits: all three seeded
        assert {r["split"] for r in rows.values()} == {"train", "val", "test"}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["format"] == fmt and stats["classes"] == list(LABELS)
    assert dataset_classes(out) == LABELS


def test_non_square_boards_are_non_square(boards):
    """The fixture really gives both shapes (the 0-1000 answers then differ between x and y)."""
    _, reference_dir, board_list = boards
    rows = _by_id(reference_dir)
    assert {(r["width"], r["height"]) for r in rows.values()} == {(board_list[0].width, board_list[0].height)}
    assert (board_list[0].width, board_list[0].height) in {(SIZE, SIZE), SHAPES["non-square"]}


def test_coco_seeded_splits_follow_the_config(boards, tmp_path):
    _, _, board_list = boards
    src = write_coco(board_list, tmp_path / "coco")
    first = prepare_data(
        _config(), source=src, out_dir=tmp_path / "a", fmt="coco", progress=False, console=_quiet()
    )
    again = prepare_data(
        _config(), source=src, out_dir=tmp_path / "b", fmt="coco", progress=False, console=_quiet()
    )
    other = prepare_data(
        _config("data.test_fraction=0.5", "data.split_seed=3"),
        source=src,
        out_dir=tmp_path / "c",
        fmt="coco",
        progress=False,
        console=_quiet(),
    )

    def split_ids(conversion):
        return {split: [r["id"] for r in rows] for split, rows in conversion.samples.items()}

    assert split_ids(first) == split_ids(again)
    assert len(first.samples["test"]) == 1 and len(first.samples["val"]) == 1  # round(6 * 0.1) -> at least 1
    assert len(other.samples["test"]) == 3
    assert first.stats()["settings"]["test_fraction"] == 0.1


# ---------------------------------------------------------------------------------------------------------
# Class lists and prompts

OLD_PROMPT = (
    "Find every defect on this printed circuit board image. The defect classes are: "
    "open, short, mousebite, spur, copper, pin-hole. Answer with a JSON list of objects "
    '{"bbox_2d": [x1, y1, x2, y2], "label": class} in 0-1000 relative coordinates; '
    "answer [] if there is no defect."
)
OLD_TEMPLATE_PROMPT = (
    "The first image is the defect-free template of the board; the second image is the board under test. "
    "Find every defect on the board under test. The defect classes are: "
    "open, short, mousebite, spur, copper, pin-hole. Answer with a JSON list of objects "
    '{"bbox_2d": [x1, y1, x2, y2], "label": class} in 0-1000 relative coordinates of the second image; '
    "answer [] if there is no defect."
)


def test_deeppcb_prompts_are_unchanged_by_the_classes_placeholder():
    for cfg in (_config(), load_config(ROOT / "config" / "tiny.yaml")):
        assert "{classes}" in cfg.data.prompt
        sample = {"image": "/b.jpg", "template": "/t.jpg", "classes": list(LABELS)}
        assert build_messages(sample, cfg.data, with_answer=False)[0]["content"][-1]["text"] == OLD_PROMPT
        with_template = cfg.data.model_copy(update={"with_template": True})
        text = build_messages(sample, with_template, with_answer=False)[0]["content"][-1]["text"]
        assert text == OLD_TEMPLATE_PROMPT
        # Samples converted before class lists existed are DeepPCB's.
        assert (
            build_messages({"image": "/b.jpg"}, cfg.data, with_answer=False)[0]["content"][-1]["text"]
            == OLD_PROMPT
        )


def _scratch_boards(tmp_path: Path, size: tuple[int, int] = (300, 200)) -> Path:
    """A COCO dataset of two classes of its own, category ids starting at 0, images in SRC/."""
    src = tmp_path / "scratches"
    src.mkdir()
    images, annotations = [], []
    for i in range(5):
        Image.new("L", size, 200).save(src / f"part{i}.png")
        images.append({"id": 100 + i, "file_name": f"part{i}.png", "width": size[0], "height": size[1]})
        annotations.append(
            {"id": i, "image_id": 100 + i, "category_id": i % 2, "bbox": [10.5, 20, 50, 30.25]}
        )
    categories = [{"id": 1, "name": "dent"}, {"id": 0, "name": "scratch"}]
    (src / "annotations.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return src


def test_a_dataset_of_other_classes_names_them_in_prompt_stats_and_scoring(tmp_path):
    src = _scratch_boards(tmp_path)
    out = tmp_path / "converted"
    prepare_data(
        _config(), source=src, out_dir=out, fmt="coco", strict=True, progress=False, console=_quiet()
    )
    rows = _by_id(out)
    assert dataset_classes(out) == ("scratch", "dent")  # category id order
    row = rows["part0"]
    assert row["objects"] == [{"label": "scratch", "bbox": [10.5, 20, 60.5, 50.25]}]
    assert row["classes"] == ["scratch", "dent"]
    prompt = row["messages"][0]["content"][-1]["text"]
    assert "The defect classes are: scratch, dent." in prompt and "mousebite" not in prompt
    assert row["messages"][1]["content"][0]["text"] == format_answer(row["objects"], 300, 200)

    # The model's answers are read with the dataset's classes; perfect answers score 1 on the
    # non-square images, through the same scoring path as `make eval`.
    split = next(s for s in ("test", "val", "train") if load_samples(out, s))
    samples = load_scoring_samples(out, split)
    predictions = []
    for sample in samples:
        text = format_answer(sample["objects"], sample["width"], sample["height"]).replace(
            '"scratch"', '"Scratch"'
        )
        parsed = parse_answer(text, sample["width"], sample["height"], sample["classes"])
        assert parsed.error is None and [o.label for o in parsed.objects] == [
            o["label"] for o in sample["objects"]
        ]
        predictions.append(parsed.to_prediction(sample["id"], text))
    metrics = score_predictions(predictions, samples, tmp_path / "eval", worst_n=0)
    assert metrics["deeppcb"]["fscore"] == 1.0
    assert set(metrics["per_class"]["classes"]) == {"scratch", "dent"}
    assert set(metrics["coco"]["per_class_ap50"]) == {"scratch", "dent"}
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| scratch |" in report and "| open |" not in report
    # A DeepPCB label is no class of this dataset: parsed as unknown, refused in a predictions file.
    assert parse_answer(
        '[{"bbox_2d": [1, 2, 30, 40], "label": "open"}]', 300, 200, ["scratch", "dent"]
    ).error == ("unknown_label")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"id": samples[0]["id"], "objects": [{"label": "open", "bbox": [1, 2, 3, 4]}]}) + "\n"
    )
    with pytest.raises(DataError, match="unknown label 'open' \\(expected one of scratch, dent\\)"):
        read_predictions(bad, samples)


def test_prompt_without_placeholder_warns_when_it_does_not_name_the_classes(tmp_path):
    src = _scratch_boards(tmp_path)
    console = _quiet()
    prepare_data(
        _config("data.prompt='Find the defects.'"),
        source=src,
        out_dir=tmp_path / "o",
        fmt="coco",
        progress=False,
        console=console,
    )
    assert "warning: the prompt does not name the classes scratch, dent" in console.file.getvalue()


def test_templates_are_deeppcb_only(tmp_path):
    with pytest.raises(DataError, match="COCO data has no template images"):
        prepare_data(
            _config("data.with_template=true"),
            source=_scratch_boards(tmp_path),
            out_dir=tmp_path / "o",
            fmt="coco",
            progress=False,
            console=_quiet(),
        )


def test_yolo_names_as_mapping_and_errors(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("names:\n  0: scratch\n  2: dent\n")
    assert read_names(path) == {0: "scratch", 2: "dent"}
    path.write_text("names: [scratch, scratch]\n")
    with pytest.raises(DataError, match="'scratch' appears twice"):
        read_names(path)
    path.write_text("nc: 2\n")
    with pytest.raises(DataError, match="'names' must be a non-empty list"):
        read_names(path)
    path.write_text("names: [a, b\n")
    with pytest.raises(DataError, match="data.yaml line 2: invalid YAML"):
        read_names(path)


def test_registry_lists_every_format_and_the_job_offers_them():
    assert list(FORMATS) == ["deeppcb", "coco", "yolo", "voc"]
    for name, fmt in FORMATS.items():
        assert fmt.name == name and callable(fmt.convert) and fmt.layout
    with pytest.raises(DataError, match="FORMAT=kitti: unknown dataset format"):
        prepare_data(_config(), source=ROOT, fmt="kitti")
    with pytest.raises(DataError, match="FORMAT=coco: give the dataset folder with SRC="):
        prepare_data(_config(), fmt="coco")


def test_make_data_passes_format_and_src():
    env = {"RUNNER": "local", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        ["make", "-n", "data", "FORMAT=voc", "SRC=/boards/voc", "DEEPPCB_DIR=/ignored"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    command = " ".join(proc.stdout.replace("\\\n", " ").split())
    assert "-m pcbvlm data --format voc --src '/boards/voc'" in command
    assert "/ignored" not in command
    proc = subprocess.run(
        ["make", "-n", "data", "DEEPPCB_DIR=/data/DeepPCB"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert "--deeppcb-dir '/data/DeepPCB'" in proc.stdout


# ---------------------------------------------------------------------------------------------------------
# Validation and --strict, per format


@pytest.fixture(scope="module")
def square_boards(tmp_path_factory) -> list[Board]:
    return deeppcb_boards(make_deeppcb(tmp_path_factory.mktemp("strict"), SHAPES["non-square"], seed=8))


@pytest.fixture(scope="module")
def clean_sources(square_boards, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per format: (clean source, a good conversion of it that a failed strict run must leave alone)."""
    root = tmp_path_factory.mktemp("clean")
    out = {}
    for fmt, writer in WRITERS.items():
        src = writer(square_boards, root / fmt)
        converted = root / f"{fmt}-converted"
        prepare_data(
            _config(), source=src, out_dir=converted, fmt=fmt, strict=True, progress=False, console=_quiet()
        )
        out[fmt] = (src, converted)
    return out


def _coco_edit(edit):
    def corrupt(src: Path) -> tuple[str, str]:
        path = src / "annotations.json"
        coco = json.loads(path.read_text())
        index = edit(coco)
        path.write_text(json.dumps(coco, indent=1))
        ann = coco["annotations"][index]
        sid = Path(next(i["file_name"] for i in coco["images"] if i["id"] == ann["image_id"])).stem
        return sid, f"{path.resolve()} annotations[{index}] (id {ann['id']})"

    return corrupt


def _coco_class(coco) -> int:
    coco["annotations"][0]["category_id"] = 99
    return 0


def _coco_outside(coco) -> int:
    ann = coco["annotations"][-1]
    width = next(i["width"] for i in coco["images"] if i["id"] == ann["image_id"])
    ann["bbox"] = [width - 10, 5, 20, 20]
    return len(coco["annotations"]) - 1


def _coco_malformed(coco) -> int:
    coco["annotations"][1]["bbox"] = [1, 2, 3]
    return 1


def _coco_missing_image(src: Path) -> tuple[str, str]:
    coco = json.loads((src / "annotations.json").read_text())
    name = coco["images"][2]["file_name"]
    (src / "images" / name).unlink()
    return Path(name).stem, f"{(src / 'annotations.json').resolve()} images[2]: {name} not found in"


def _first_yolo_label(src: Path) -> Path:
    return sorted((src / "labels" / "train").glob("*.txt"))[0]


def _yolo_line(text: str):
    def corrupt(src: Path) -> tuple[str, str]:
        label = _first_yolo_label(src)
        with label.open("a") as fh:
            fh.write(text + "\n")
        return label.stem, f"{label.resolve()} line {len(label.read_text().splitlines())}"

    return corrupt


def _yolo_unreadable(src: Path) -> tuple[str, str]:
    image = src / "images" / "test" / f"{sorted((src / 'labels' / 'test').glob('*.txt'))[0].stem}.jpg"
    image.write_bytes(b"not an image")
    return image.stem, f"{image.resolve()}: cannot read the image"


def _yolo_orphan_label(src: Path) -> tuple[str, str]:
    label = _first_yolo_label(src)
    (src / "images" / "train" / f"{label.stem}.jpg").unlink()
    return label.stem, f"{label.resolve()}: no image for this label file"


def _first_voc(src: Path) -> Path:
    return sorted((src / "Annotations").glob("*.xml"))[0]


def _voc_edit(old: str, new: str, nth_object_line: bool = True):
    def corrupt(src: Path) -> tuple[str, str]:
        xml = _first_voc(src)
        text = xml.read_text()
        assert old in text
        xml.write_text(text.replace(old, new, 1))
        line = text.splitlines().index("  <object>") + 1
        return xml.stem, f"{xml.resolve()} line {line}"

    return corrupt


def _voc_truncated(src: Path) -> tuple[str, str]:
    xml = _first_voc(src)
    lines = xml.read_text().splitlines()
    xml.write_text("\n".join(lines[:-3]) + "\n")
    return xml.stem, f"{xml.resolve()} line {len(lines) - 2}: not valid XML"


def _voc_missing_image(src: Path) -> tuple[str, str]:
    xml = _first_voc(src)
    (src / "JPEGImages" / f"{xml.stem}.jpg").unlink()
    return xml.stem, f"{xml.resolve()}: {xml.stem}.jpg not found in {(src / 'JPEGImages').resolve()}"


def _voc_size(src: Path) -> tuple[str, str]:
    xml = _first_voc(src)
    xml.write_text(xml.read_text().replace(f"<width>{SHAPES['non-square'][0]}</width>", "<width>500</width>"))
    return xml.stem, f"{xml.resolve()}: <size> says 500x{SIZE}"


BAD_INPUTS = {
    ("coco", "unknown class"): (_coco_edit(_coco_class), "category_id 99 is not in categories"),
    ("coco", "box outside"): (
        _coco_edit(_coco_outside),
        f"lies outside the {SHAPES['non-square'][0]}x{SIZE} image",
    ),
    ("coco", "malformed bbox"): (_coco_edit(_coco_malformed), "bbox must be 4 numbers [x, y, w, h]"),
    ("coco", "missing image"): (_coco_missing_image, "not found in"),
    ("yolo", "bad line"): (_yolo_line("0 0.5 0.5"), "expected 'class cx cy w h'"),
    ("yolo", "unknown class"): (_yolo_line("9 0.5 0.5 0.1 0.1"), "class 9 is not in data.yaml names"),
    ("yolo", "box outside"): (_yolo_line("1 0.98 0.5 0.1 0.1"), "lies outside the 384x256 image"),
    ("yolo", "unreadable image"): (_yolo_unreadable, "cannot read the image"),
    ("yolo", "label without image"): (_yolo_orphan_label, "no image for this label file"),
    ("voc", "unknown class"): (_voc_edit("<name>", "<name>scratch-"), "is not in"),
    ("voc", "box outside"): (_voc_edit("<xmax>", "<xmax>9"), "lies outside the 384x256 image"),
    ("voc", "malformed object"): (_voc_edit("<ymin>", "<ymin>x"), "numeric xmin, ymin, xmax, ymax"),
    ("voc", "truncated xml"): (_voc_truncated, "not valid XML"),
    ("voc", "missing image"): (_voc_missing_image, "not found in"),
    ("voc", "size mismatch"): (_voc_size, "the image"),
}


@pytest.fixture
def bad_input(request, clean_sources, tmp_path) -> tuple[str, Path, Path, str, str, str]:
    fmt, case = request.param
    src, previous = clean_sources[fmt]
    copy = tmp_path / fmt
    shutil.copytree(src, copy)
    corrupt, message = BAD_INPUTS[(fmt, case)]
    sid, where = corrupt(copy)
    return fmt, copy, previous, sid, where, message


@pytest.mark.parametrize("bad_input", list(BAD_INPUTS), indirect=True, ids=[" ".join(k) for k in BAD_INPUTS])
def test_bad_input_fails_strict_run_and_keeps_previous_outputs(bad_input, tmp_path):
    fmt, src, previous, _, where, message = bad_input
    out = tmp_path / "converted"
    shutil.copytree(previous, out)
    before = _read_outputs(out)
    proc = run_job("data", "--format", fmt, "--src", str(src), "--out", str(out), "--strict")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: --strict: 1 problem(s), nothing written to")
    assert message in errors[0] and where in errors[0], errors[0]
    assert _read_outputs(out) == before  # same files, same bytes, no leftovers


@pytest.mark.parametrize("bad_input", list(BAD_INPUTS), indirect=True, ids=[" ".join(k) for k in BAD_INPUTS])
def test_bad_input_is_skipped_and_reported_without_strict(bad_input, tmp_path, capsys):
    fmt, src, _, sid, where, message = bad_input
    out = tmp_path / "converted"
    prepare_data(_config(), source=src, out_dir=out, fmt=fmt, progress=False)
    stderr = capsys.readouterr().err
    assert f"problem: {where}" in stderr and message in stderr, stderr
    ids = list(_by_id(out))
    assert sid not in ids and len(ids) == NUM - 1
    stats = json.loads((out / "stats.json").read_text())
    assert [sid] in [v["ids"] for v in stats["skipped"].values()]
    assert sum(info["samples"] for info in stats["written"].values()) == NUM - 1


@pytest.mark.parametrize(
    "fmt, remove, expected",
    [
        ("coco", "annotations.json", "annotations.json: not found (COCO layout"),
        ("yolo", "data.yaml", "data.yaml: not found (YOLO layout"),
        ("voc", "Annotations", "Annotations: folder not found (VOC layout"),
    ],
)
def test_missing_layout_is_an_error_in_any_mode(fmt, remove, expected, clean_sources, tmp_path):
    src = tmp_path / fmt
    shutil.copytree(clean_sources[fmt][0], src)
    target = src / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    proc = run_job("data", "--format", fmt, "--src", str(src), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {src.resolve()}/{expected}"), proc.stderr
    assert not (tmp_path / "out").exists()


def test_coco_broken_json_names_the_line(tmp_path):
    src = tmp_path / "coco"
    src.mkdir()
    (src / "annotations.json").write_text('{\n  "images": [],\n  "annotations": [,]\n}\n')
    with pytest.raises(DataError, match=r"annotations.json line 3: invalid JSON"):
        prepare_data(_config(), source=src, fmt="coco", out_dir=tmp_path / "o", console=_quiet())
    (src / "annotations.json").write_text(
        json.dumps(
            {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "a"}]}
        )
    )
    with pytest.raises(DataError, match=r"categories\[1\]: category name 'a' appears twice"):
        prepare_data(_config(), source=src, fmt="coco", out_dir=tmp_path / "o", console=_quiet())


def test_voc_without_classes_file_uses_the_names_found_sorted(clean_sources, tmp_path):
    src = tmp_path / "voc"
    shutil.copytree(clean_sources["voc"][0], src)
    (src / "classes.txt").unlink()
    conversion = prepare_data(
        _config(), source=src, fmt="voc", out_dir=tmp_path / "o", progress=False, console=_quiet()
    )
    found = {o["label"] for rows in conversion.samples.values() for r in rows for o in r["objects"]}
    assert list(conversion.classes) == sorted(found)
    prompt = conversion.samples["test"][0]["messages"][0]["content"][-1]["text"]
    assert render_prompt("{classes}", sorted(found)) in prompt


def test_non_square_samples_batch_for_training_and_draw_overlays(boards, tiny_processor, tmp_path):
    """Imported non-square boards go through the training collator (a non-square visual grid, labels on
    the answer only) and through scoring with overlays drawn at the image's own size."""
    from pcbvlm.collator import IGNORE_INDEX, TrainCollator

    _, _, board_list = boards
    src = write_yolo(board_list, tmp_path / "yolo")
    out = tmp_path / "converted"
    prepare_data(
        _config(), source=src, out_dir=out, fmt="yolo", strict=True, progress=False, console=_quiet()
    )
    width, height = board_list[0].width, board_list[0].height

    sample = load_samples(out, "train")[0]
    encoded = TrainCollator(tiny_processor).encode(sample)
    _, grid_h, grid_w = encoded["image_grid_thw"][0].tolist()
    assert (grid_w > grid_h) == (width > height) and (grid_w == grid_h) == (width == height)
    labels = [t for t in encoded["labels"].tolist() if t != IGNORE_INDEX]
    assert (
        tiny_processor.tokenizer.decode(labels) == sample["messages"][1]["content"][0]["text"] + "<|im_end|>"
    )

    samples = load_scoring_samples(out, "test")
    # Every prediction misses its first box: each image has an error, so each gets an overlay.
    predictions = [
        {"id": s["id"], "objects": [{**o, "score": 0.9} for o in s["objects"][1:]]} for s in samples
    ]
    score_predictions(predictions, samples, tmp_path / "eval", worst_n=len(samples))
    overlays = sorted((tmp_path / "eval" / "overlays").glob("*.png"))
    assert len(overlays) == len(samples)
    for path in overlays:
        with Image.open(path) as img:
            assert img.size == (width, height)
