"""`make data`: the DeepPCB converter on the shared real copy, on synthetic layouts, and on broken inputs."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

from conftest import ROOT, SHARED_DEEPPCB, run_job
from pcbvlm.answer import format_answer, to_pixels, to_relative
from pcbvlm.config import DataConfig, load_config
from pcbvlm.deeppcb import (
    assign_val,
    build_messages,
    convert,
    find_pcbdata,
    load_samples,
    parse_annotation,
    prepare_data,
    read_split_file,
)
from pcbvlm.errors import DataError
from pcbvlm.labels import LABELS
from pcbvlm.samples import render_prompt
from pcbvlm.synth import generate_dataset

# Measured on the full DeepPCB set (the shared copy's README).
README_BOXES = {
    "trainval": {
        "open": 1283,
        "short": 1028,
        "mousebite": 1379,
        "spur": 1142,
        "copper": 1010,
        "pin-hole": 1031,
    },
    "test": {"open": 659, "short": 478, "mousebite": 586, "spur": 483, "copper": 464, "pin-hole": 470},
}
OUTPUTS = ("train.jsonl", "val.jsonl", "test.jsonl", "stats.json", "config.resolved.yaml")


@pytest.fixture(scope="module")
def shared_pcbdata() -> Path:
    pcbdata = SHARED_DEEPPCB / "PCBData"
    if not (pcbdata / "trainval.txt").is_file():
        pytest.skip(
            f"shared DeepPCB copy not found at {SHARED_DEEPPCB} (set DEEPPCB_SHARED to the folder holding PCBData/)"
        )
    return pcbdata


@pytest.fixture(scope="module")
def shared_annotations(shared_pcbdata) -> dict[str, list[tuple[str, list[dict]]]]:
    """Every annotation of the shared copy, per split file: [(id, objects)]."""
    out = {}
    for split in ("trainval", "test"):
        entries, problems = read_split_file(shared_pcbdata, split)
        assert problems == []
        rows = []
        for entry in entries:
            objects, bad = parse_annotation(entry.annotation, sample_id=entry.sample_id)
            assert bad == [], bad
            rows.append((entry.sample_id, objects))
        out[split] = rows
    return out


def _read_outputs(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ---------------------------------------------------------------------------------------------------------
# The real layout


def test_shared_annotations_match_readme_counts(shared_annotations):
    assert len(shared_annotations["trainval"]) == 1000
    assert len(shared_annotations["test"]) == 500
    for split, expected in README_BOXES.items():
        counts = Counter(obj["label"] for _, objects in shared_annotations[split] for obj in objects)
        assert dict(counts) == expected, split
    total = sum(len(objects) for rows in shared_annotations.values() for _, objects in rows)
    assert total == 10013
    per_image = [len(objects) for rows in shared_annotations.values() for _, objects in rows]
    assert min(per_image) == 1 and max(per_image) == 15


def test_real_boxes_round_trip_through_relative_coordinates(shared_annotations):
    """pixel -> 0-1000 -> pixel moves no corner of any real box by 1 px or more (images are 640x640)."""
    worst = 0.0
    for rows in shared_annotations.values():
        for _, objects in rows:
            for obj in objects:
                back = to_pixels(to_relative(obj["bbox"], 640, 640), 640, 640)
                worst = max(worst, *(abs(a - b) for a, b in zip(back, obj["bbox"], strict=True)))
    assert worst < 1.0
    assert worst <= 0.33  # 640 / 2000 plus the two-decimal rounding of to_pixels


def test_convert_shared_copy_through_the_job(shared_pcbdata, tmp_path):
    out = tmp_path / "converted"
    proc = run_job("data", "--deeppcb-dir", str(shared_pcbdata.parent), "--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "excluded by data.exclude_ids: 44000020" in proc.stdout
    assert "skipped (missing_image): 1373" in proc.stdout
    assert "not found in" in proc.stderr  # the first missing images are named

    stats = json.loads((out / "stats.json").read_text())
    for split, expected in README_BOXES.items():
        assert stats["annotations"][split]["annotation_files"] == (1000 if split == "trainval" else 500)
        assert stats["annotations"][split]["boxes"] == {**expected, "total": sum(expected.values())}
    # 127 samples have images: every 12th line of each split file (84 + 42) plus 44000020 (excluded).
    written = {split: info["samples"] for split, info in stats["written"].items()}
    assert written == {"train": 76, "val": 8, "test": 42}
    assert stats["excluded"] == ["44000020"]
    assert stats["skipped"]["excluded"] == {"count": 1, "ids": ["44000020"]}
    assert stats["skipped"]["missing_image"]["count"] == 1500 - 127
    assert set(stats["skipped"]) == {"excluded", "missing_image"}
    assert stats["problems"] == []

    rows = {split: load_samples(out, split) for split in ("train", "val", "test")}
    assert {split: len(r) for split, r in rows.items()} == written
    assert not {r["id"] for r in rows["train"]} & {r["id"] for r in rows["val"]}
    cfg = load_config(out / "config.resolved.yaml")
    assert cfg.paths.data_dir == out and cfg.paths.deeppcb_dir == shared_pcbdata.parent
    assert "20085000" in {r["id"] for r in rows["train"] + rows["val"]}
    assert "44000020" not in {r["id"] for split_rows in rows.values() for r in split_rows}
    for row in (r for split_rows in rows.values() for r in split_rows):
        assert Path(row["image"]).is_absolute() and Path(row["image"]).is_file()
        assert row["image"].endswith(f"{row['id']}_test.jpg") and row["template"].endswith(
            f"{row['id']}_temp.jpg"
        )
        assert (row["width"], row["height"]) == (640, 640)
        assert row["messages"] == build_messages(row, cfg.data)
        assert row["messages"][1]["content"][0]["text"] == format_answer(row["objects"], 640, 640)

    # A re-run on the same input changes no byte.
    before = _read_outputs(out)
    proc = run_job("data", "--deeppcb-dir", str(shared_pcbdata), "--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    after = _read_outputs(out)
    assert after.keys() == before.keys() == set(OUTPUTS)
    # The resolved config records the path as given (PCBData itself this time); the data are the same.
    assert {k: v for k, v in after.items() if k != "config.resolved.yaml"} == {
        k: v for k, v in before.items() if k != "config.resolved.yaml"
    }


def test_annotation_order_kept_in_objects(shared_pcbdata):
    objects, problems = parse_annotation(
        shared_pcbdata / "group20085" / "20085_not" / "20085000.txt", 640, 640
    )
    assert problems == []
    assert [o["label"] for o in objects] == ["mousebite", "mousebite", "spur", "copper", "pin-hole", "spur"]
    assert objects[0]["bbox"] == [409, 394, 435, 422]


# ---------------------------------------------------------------------------------------------------------
# Units: messages, split, parsing


def _sample() -> dict:
    return {
        "id": "1",
        "image": "/data/1_test.jpg",
        "template": "/data/1_temp.jpg",
        "width": 640,
        "height": 320,
        "objects": [{"label": "short", "bbox": [64, 32, 128, 64]}],
    }


def test_build_messages_test_image_only():
    cfg = DataConfig()
    messages = build_messages(_sample(), cfg)
    assert messages == [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "/data/1_test.jpg"},
                {"type": "text", "text": render_prompt(cfg.prompt, LABELS)},
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "text", "text": '[{"bbox_2d": [100, 100, 200, 200], "label": "short"}]'}],
        },
    ]
    assert build_messages(_sample(), cfg, with_answer=False) == messages[:1]


def test_build_messages_with_template_first():
    cfg = DataConfig(with_template=True)
    user = build_messages(_sample(), cfg, with_answer=False)
    assert len(user) == 1
    assert user[0]["content"] == [
        {"type": "image", "image": "/data/1_temp.jpg"},
        {"type": "image", "image": "/data/1_test.jpg"},
        {"type": "text", "text": render_prompt(cfg.template_prompt, LABELS)},
    ]
    with pytest.raises(DataError, match="with_template is true but no template"):
        build_messages({**_sample(), "template": None}, cfg)


def test_no_objects_answers_empty_list():
    messages = build_messages({**_sample(), "objects": []}, DataConfig())
    assert messages[1]["content"][0]["text"] == "[]"


def test_assign_val_is_seeded_exact_and_order_free():
    ids = [f"{i:08d}" for i in range(200)]
    val = assign_val(ids, 0.1, seed=0)
    assert len(val) == 20 and val <= set(ids)
    assert assign_val(list(reversed(ids)), 0.1, seed=0) == val
    assert assign_val(ids, 0.1, seed=1) != val
    assert assign_val(ids, 0.0, seed=0) == set()
    assert len(assign_val(ids[:5], 0.1, seed=0)) == 1  # never an empty val split when it can be avoided
    assert assign_val(ids[:1], 0.5, seed=0) == set()  # ... nor an empty train split
    # Adding samples moves at most the ids near the cut: most of val stays val.
    assert len(assign_val([*ids, *(f"9{i:07d}" for i in range(20))], 0.1, seed=0) & val) >= 15


def test_parse_annotation_accepts_commas_and_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("1,2,30,40,1\n\n  5 6 70 80 6  \n7, 8, 90, 95, 3")
    objects, problems = parse_annotation(path, 100, 100)
    assert problems == []
    assert objects == [
        {"label": "open", "bbox": [1, 2, 30, 40]},
        {"label": "pin-hole", "bbox": [5, 6, 70, 80]},
        {"label": "mousebite", "bbox": [7, 8, 90, 95]},
    ]


def test_parse_annotation_checks_bounds_only_with_a_size(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("600 600 660 630 1\n")
    assert parse_annotation(path)[1] == []
    objects, problems = parse_annotation(path, 640, 640)
    assert (
        objects == []
        and "line 1: box [600, 600, 660, 630] lies outside the 640x640 image" in problems[0].message
    )
    path.write_text("0 0 640 640 1\n")  # touching the far edge is inside
    assert parse_annotation(path, 640, 640)[1] == []


def test_find_pcbdata_accepts_parent_or_pcbdata(tmp_path):
    (tmp_path / "PCBData").mkdir()
    assert find_pcbdata(tmp_path) == (tmp_path / "PCBData").resolve()
    assert find_pcbdata(tmp_path / "PCBData") == (tmp_path / "PCBData").resolve()
    with pytest.raises(DataError, match="no PCBData folder here"):
        find_pcbdata(_empty(tmp_path))
    with pytest.raises(DataError, match="DeepPCB folder not found"):
        find_pcbdata(tmp_path / "nowhere")


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty"
    path.mkdir(exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------------
# Bad inputs, on copies of a small synthetic layout


@pytest.fixture(scope="module")
def synth_layout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "DeepPCB"
    generate_dataset(root, num=6, seed=11)
    return root


@pytest.fixture(scope="module")
def previous_outputs(synth_layout, tmp_path_factory) -> Path:
    """A good conversion of the clean layout: what a failed strict run must leave untouched."""
    out = tmp_path_factory.mktemp("previous") / "converted"
    prepare_data(
        _config(), deeppcb_dir=synth_layout, out_dir=out, strict=True, progress=False, console=_quiet()
    )
    return out


def _config(*overrides: str):
    return load_config(ROOT / "config" / "config.yaml", list(overrides))


def _quiet() -> Console:
    return Console(file=io.StringIO())


@pytest.fixture
def layout(synth_layout, tmp_path) -> Path:
    copy = tmp_path / "DeepPCB"
    shutil.copytree(synth_layout, copy)
    return copy


def _first(layout: Path, split: str = "trainval") -> tuple[str, Path, Path]:
    """(id, image folder, annotation file) of the first sample of a split file."""
    pcbdata = layout / "PCBData"
    image_rel, ann_rel = (pcbdata / f"{split}.txt").read_text().splitlines()[0].split()
    return Path(image_rel).stem, (pcbdata / image_rel).parent, pcbdata / ann_rel


def _append_line(layout: Path, text: str) -> tuple[str, str]:
    sid, _, ann = _first(layout)
    with ann.open("a") as fh:
        fh.write(text + "\n")
    number = len(ann.read_text().splitlines())
    return sid, f"{ann.resolve()} line {number}"


def _bad_line(text: str):
    def corrupt(layout: Path) -> tuple[str, str]:
        return _append_line(layout, text)

    return corrupt


def _duplicate(layout: Path) -> tuple[str, str]:
    pcbdata = layout / "PCBData"
    line = (pcbdata / "trainval.txt").read_text().splitlines()[0]
    test = pcbdata / "test.txt"
    test.write_text(test.read_text() + "\n" + line)
    return Path(line.split()[0]).stem, f"{test.resolve()} line {len(test.read_text().splitlines())}"


def _missing_image(layout: Path) -> tuple[str, str]:
    sid, images, _ = _first(layout)
    (images / f"{sid}_test.jpg").unlink()
    return sid, f"{sid}_test.jpg not found in {images.resolve()}"


def _missing_template(layout: Path) -> tuple[str, str]:
    sid, images, _ = _first(layout)
    (images / f"{sid}_temp.jpg").unlink()
    return sid, f"{sid}_temp.jpg not found in {images.resolve()}"


def _missing_annotation(layout: Path) -> tuple[str, str]:
    sid, _, ann = _first(layout)
    ann.unlink()
    return sid, f"{ann.resolve()}: annotation file not found"


def _unreadable_image(layout: Path) -> tuple[str, str]:
    sid, images, _ = _first(layout)
    (images / f"{sid}_test.jpg").write_bytes(b"not a jpeg")
    return sid, f"{(images / f'{sid}_test.jpg').resolve()}: cannot read the image"


def _truncated_image(layout: Path) -> tuple[str, str]:
    """The header is intact (Image.open and .size pass), the pixel data ends early: only a decode finds it."""
    sid, images, _ = _first(layout)
    path = images / f"{sid}_temp.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return sid, f"{path.resolve()}: cannot read the image"


def _empty_annotation(layout: Path) -> tuple[str, str]:
    sid, _, ann = _first(layout)
    ann.write_text("\n")
    return sid, f"{ann.resolve()}: empty annotation file"


def _malformed_split_line(layout: Path) -> tuple[str, str]:
    path = layout / "PCBData" / "trainval.txt"
    path.write_text(path.read_text() + "\ngroup1/1/1.jpg")
    return (
        "",
        f"{path.resolve()} line {len(path.read_text().splitlines())}: expected 'groupN/N/<id>.jpg groupN/N_not/<id>.txt'",
    )


BAD_INPUTS = {
    "malformed line": (
        _bad_line("12 34 56"),
        "missing",
        "expected 'x1 y1 x2 y2 class' (5 integers), got '12 34 56'",
    ),
    "not numbers": (_bad_line("a b c d 1"), "missing", "expected 'x1 y1 x2 y2 class' (5 integers)"),
    "class 7": (_bad_line("10 10 40 40 7"), "missing", "class 7 outside 1-6"),
    "class 0": (_bad_line("10 10 40 40 0"), "missing", "class 0 outside 1-6"),
    "outside image": (
        _bad_line("600 600 660 630 1"),
        "missing",
        "box [600, 600, 660, 630] lies outside the 640x640 image",
    ),
    "negative": (_bad_line("-5 10 40 40 2"), "missing", "box [-5, 10, 40, 40] lies outside"),
    "degenerate": (_bad_line("50 50 50 80 2"), "missing", "degenerate box [50, 50, 50, 80]"),
    "duplicate": (_duplicate, "kept once", "is listed twice (first at"),
    "missing image": (_missing_image, "missing", "not found in"),
    "missing template": (_missing_template, "missing", "not found in"),
    "missing annotation": (_missing_annotation, "missing", "annotation file not found"),
    "unreadable image": (_unreadable_image, "missing", "cannot read the image"),
    "truncated image": (_truncated_image, "missing", "image file is truncated"),
    "empty annotation": (_empty_annotation, "missing", "every DeepPCB board has at least one defect"),
    "malformed split line": (_malformed_split_line, "untouched", "expected 'groupN/N/<id>.jpg"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_strict_run_and_keeps_previous_outputs(case, layout, previous_outputs, tmp_path):
    corrupt, _, message = BAD_INPUTS[case]
    _, where = corrupt(layout)
    out = tmp_path / "converted"
    shutil.copytree(previous_outputs, out)
    before = _read_outputs(out)

    proc = run_job("data", "--deeppcb-dir", str(layout), "--out", str(out), "--strict")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: --strict: 1 problem(s), nothing written to")
    assert message in errors[0] and where in errors[0]
    assert "problem: " in proc.stderr and where in proc.stderr.split("error: ")[0]
    assert _read_outputs(out) == before  # same files, same bytes, no leftovers


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_skipped_and_reported_without_strict(case, layout, tmp_path, capsys):
    """In-process (the job entry point is covered above): the sample goes, the run goes on."""
    corrupt, effect, message = BAD_INPUTS[case]
    sid, where = corrupt(layout)
    out = tmp_path / "converted"
    prepare_data(_config(), deeppcb_dir=layout, out_dir=out, progress=False)
    stderr = capsys.readouterr().err
    assert f"problem: {where}" in stderr or f": {where}" in stderr
    assert message in stderr
    stats = json.loads((out / "stats.json").read_text())
    ids = [row["id"] for split in ("train", "val", "test") for row in load_samples(out, split)]
    if effect == "missing":
        assert sid not in ids
        assert sum(len(v["ids"]) for v in stats["skipped"].values()) == 1
        assert [sid] in [v["ids"] for v in stats["skipped"].values()]
    elif effect == "kept once":
        assert ids.count(sid) == 1
        assert stats["skipped"]["duplicate_sample"]["ids"] == [sid]
    assert sum(info["samples"] for info in stats["written"].values()) == len(ids) == 6 - (effect == "missing")


def test_missing_split_file_is_an_error_in_any_mode(layout, tmp_path):
    (layout / "PCBData" / "test.txt").unlink()
    proc = run_job("data", "--deeppcb-dir", str(layout), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {(layout / 'PCBData').resolve() / 'test.txt'}: split file not found "
        "(PCBData must hold trainval.txt and test.txt)"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["empty", "missing"])
def test_folder_without_pcbdata_is_an_error_in_any_mode(where, tmp_path):
    folder = _empty(tmp_path) if where == "empty" else tmp_path / "nowhere"
    proc = run_job("data", "--deeppcb-dir", str(folder), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    expected = "no PCBData folder here" if where == "empty" else "DeepPCB folder not found"
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"error: {folder}: {expected}")
    assert not (tmp_path / "out").exists()


def test_all_samples_missing_is_an_error(layout, tmp_path):
    for image in (layout / "PCBData").glob("*/*/*.jpg"):
        image.unlink()
    proc = run_job("data", "--deeppcb-dir", str(layout), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "no sample could be converted (6 missing_image)" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_excluded_ids_come_from_the_config(synth_layout, tmp_path):
    cfg = _config("data.exclude_ids=['10000001', '10000002']", "data.val_fraction=0.0")
    conversion = convert(synth_layout, cfg.data)
    assert conversion.excluded == ["10000001", "10000002"]
    assert conversion.problems == []
    ids = [r["id"] for rows in conversion.samples.values() for r in rows]
    assert "10000001" not in ids and "10000002" not in ids and len(ids) == 4
    assert conversion.samples["val"] == []
    # The annotations of excluded samples still count: the totals describe the data set, not the output.
    assert sum(v["boxes"]["total"] for v in conversion.stats()["annotations"].values()) > sum(
        len(r["objects"]) for rows in conversion.samples.values() for r in rows
    )


def test_with_template_puts_template_first_in_written_messages(synth_layout, tmp_path):
    cfg = _config("data.with_template=true")
    conversion = prepare_data(
        cfg, deeppcb_dir=synth_layout, out_dir=tmp_path / "o", progress=False, console=_quiet()
    )
    row = load_samples(tmp_path / "o", "test")[0]
    assert row["messages"][0]["content"][0] == {"type": "image", "image": row["template"]}
    assert row["messages"][0]["content"][1] == {"type": "image", "image": row["image"]}
    assert row["messages"][0]["content"][2]["text"] == render_prompt(cfg.data.template_prompt, LABELS)
    assert conversion.stats()["settings"]["with_template"] is True


def test_output_inside_the_data_is_refused(layout):
    out = layout / "PCBData" / "converted"
    with pytest.raises(DataError, match="output folder lies inside the DeepPCB data"):
        prepare_data(_config(), deeppcb_dir=layout, out_dir=out, progress=False, console=_quiet())
    assert not out.exists()
