"""`make synth`: synthetic DeepPCB-layout boards whose boxes cover their drawn defects, converted strictly."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_job
from pcbvlm.deeppcb import parse_annotation, read_split_file
from pcbvlm.errors import DataError
from pcbvlm.labels import CLASS_NAMES
from pcbvlm.synth import MARKER, generate_dataset, generate_sample

SPLIT_LINE = re.compile(r"group(\d{5})/\1/(\1\d{3})\.jpg group\1/\1_not/\2\.txt")
ANNOTATION_LINE = re.compile(r"\d+ \d+ \d+ \d+ [1-6]")
# Copper is ~0 and board ~255: a flipped pixel differs by far more than this; JPEG ringing by far less.
DIFF_THRESHOLD = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "DeepPCB"
    generate_dataset(root, num=24, seed=5)
    return root


def _pairs(root: Path):
    pcbdata = root / "PCBData"
    for split in ("trainval", "test"):
        entries, problems = read_split_file(pcbdata, split)
        assert problems == []
        for entry in entries:
            test = np.asarray(Image.open(entry.image)).astype(int)
            temp = np.asarray(Image.open(entry.template)).astype(int)
            objects, problems = parse_annotation(entry.annotation, test.shape[1], test.shape[0])
            assert problems == []
            yield entry, test, temp, objects


def test_layout_is_deeppcb_format(dataset):
    pcbdata = dataset / "PCBData"
    trainval = (pcbdata / "trainval.txt").read_text()
    test = (pcbdata / "test.txt").read_text()
    assert not trainval.endswith("\n") and not test.endswith("\n")  # like DeepPCB's split files
    lines = trainval.split("\n") + test.split("\n")
    assert len(lines) == 24 and len(test.split("\n")) == 8
    assert all(SPLIT_LINE.fullmatch(line) for line in lines), lines
    for line in lines:
        image, ann = line.split()
        stem = image.removesuffix(".jpg")
        for suffix in ("_test.jpg", "_temp.jpg"):
            with Image.open(pcbdata / f"{stem}{suffix}") as img:
                assert (img.format, img.mode, img.size) == ("JPEG", "L", (640, 640))
        ann_lines = (pcbdata / ann).read_text().splitlines()
        assert 1 <= len(ann_lines) <= 6
        assert all(ANNOTATION_LINE.fullmatch(a) for a in ann_lines), ann_lines


def test_images_look_binary(dataset):
    for _, test, temp, _ in _pairs(dataset):
        for img in (test, temp):
            extreme = ((img < 30) | (img > 225)).mean()
            assert extreme > 0.97  # DeepPCB: >= 98.8 %
            assert 0.05 < (img < 128).mean() < 0.7  # some copper, some board


def test_boxes_cover_every_difference_and_every_box_has_one(dataset):
    kinds = Counter()
    for entry, test, temp, objects in _pairs(dataset):
        changed = np.abs(test - temp) > DIFF_THRESHOLD
        covered = np.zeros_like(changed)
        for obj in objects:
            x1, y1, x2, y2 = obj["bbox"]
            covered[y1:y2, x1:x2] = True
            assert changed[y1:y2, x1:x2].sum() >= 3, (entry.sample_id, obj)  # a defect is drawn in each box
            assert x2 - x1 >= 18 and y2 - y1 >= 18  # DeepPCB's smallest box sides
            kinds[obj["label"]] += 1
        outside = changed & ~covered
        assert not outside.any(), (entry.sample_id, np.argwhere(outside)[:5].tolist())
        # The JPEG-decoded images are identical far from the defects (compression acts per 8x8 block).
        assert np.abs(test - temp)[~covered].max() <= DIFF_THRESHOLD
    assert set(kinds) == set(CLASS_NAMES.values()), kinds


def test_boxes_of_one_image_do_not_overlap(dataset):
    for entry, _, _, objects in _pairs(dataset):
        boxes = [o["bbox"] for o in objects]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (entry.sample_id, a, b)


def test_byte_identical_for_a_seed(tmp_path):
    generate_dataset(tmp_path / "a", num=5, seed=9)
    generate_dataset(tmp_path / "b", num=5, seed=9)
    generate_dataset(tmp_path / "c", num=3, seed=9)
    generate_dataset(tmp_path / "d", num=3, seed=10)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a, c, d = files(tmp_path / "a"), files(tmp_path / "c"), files(tmp_path / "d")
    assert a == files(tmp_path / "b")
    # A sample does not depend on how many are made: the first three of five are those of three.
    sample_files = [k for k in c if k.startswith("PCBData/group")]
    assert len(sample_files) == 9 and all(a[k] == c[k] for k in sample_files)
    assert all(c[k] != d[k] for k in sample_files if k.endswith(".jpg"))  # another seed, other boards


def test_sample_ids_like_deeppcb():
    sample = generate_sample(51, seed=0, size=256)
    assert (sample.sample_id, sample.group, sample.split) == ("10001001", "10001", "trainval")
    assert sample.test.size == sample.template.size == (256, 256)
    assert generate_sample(2, seed=0, size=256).split == "test"


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "thesis.tex").write_text("keep me")
    with pytest.raises(DataError, match=f"not a synthetic dataset folder \\(no {MARKER}\\)"):
        generate_dataset(folder, num=1)
    assert (folder / "thesis.tex").read_text() == "keep me"
    # Its own output is replaced whole: a smaller run leaves no samples of the bigger one behind.
    generate_dataset(tmp_path / "own", num=4)
    generate_dataset(tmp_path / "own", num=2)
    assert len(list((tmp_path / "own").rglob("*_test.jpg"))) == 2
    assert json.loads((tmp_path / "own" / MARKER).read_text())["num"] == 2


def test_job_generates_and_converter_accepts_it_strictly(tmp_path):
    synth = tmp_path / "DeepPCB"
    proc = run_job("synth", "--num", "9", "--out", str(synth), "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {synth}/PCBData: 6 trainval + 3 test samples" in proc.stdout

    out = tmp_path / "converted"
    proc = run_job("data", "--deeppcb-dir", str(synth), "--out", str(out), "--strict")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "problem:" not in proc.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["problems"] == [] and stats["skipped"] == {}
    assert {k: v["samples"] for k, v in stats["written"].items()} == {"train": 5, "val": 1, "test": 3}
    summary = json.loads((synth / MARKER).read_text())
    converted = sum(v["boxes"]["total"] for v in stats["written"].values())
    assert converted == sum(summary["boxes"].values())

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = run_job("data", "--deeppcb-dir", str(synth), "--out", str(out), "--strict")
    assert proc.returncode == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num", "0"], "--num 0: must be at least 1"),
        (["--num", "2", "--size", "64"], "--size 64: must be at least 128 px"),
    ],
)
def test_job_bad_arguments_exit_2_in_one_line(args, message, tmp_path):
    proc = run_job("synth", *args, "--out", str(tmp_path / "s"))
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_non_square_boards_with_fewer_defects_in_reading_order():
    from pcbvlm.synth import Board

    board = Board(256, 160, scale=0.8, max_defects=2, order="reading")
    counts = set()
    for index in range(12):
        sample = generate_sample(index, seed=4, board=board)
        assert sample.test.size == sample.template.size == (256, 160)
        boxes = [obj["bbox"] for obj in sample.objects]
        counts.add(len(boxes))
        assert all(0 <= x1 < x2 <= 256 and 0 <= y1 < y2 <= 160 for x1, y1, x2, y2 in boxes), boxes
        assert boxes == sorted(boxes, key=lambda b: (b[1], b[0]))
        # Every box covers a real difference between the two images.
        diff = np.asarray(sample.test, dtype=int) - np.asarray(sample.template, dtype=int)
        for x1, y1, x2, y2 in boxes:
            assert np.abs(diff[y1:y2, x1:x2]).max() > 100
    assert counts == {1, 2}
    # The default board is DeepPCB's: the same sample as without one.
    assert (
        generate_sample(5, seed=2, size=256).objects
        == generate_sample(5, seed=2, board=Board(256, 256)).objects
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 100}, "board 100x640: each side must be at least 128 px"),
        ({"max_defects": 0}, "max_defects 0: must be between 1 and 6"),
        ({"order": "random"}, "order 'random': must be drawn or reading"),
        ({"scale": 9.0}, "board scale 9.0: must be between 0.1 and 4"),
    ],
)
def test_bad_board_options(kwargs, message):
    from pcbvlm.synth import Board

    with pytest.raises(DataError, match=message):
        Board(**kwargs)
