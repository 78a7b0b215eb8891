"""The evaluation job: scoring a predictions file, the model path's wiring, --compare, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT, run_job
from pcbvlm import cli
from pcbvlm.errors import EXIT_BAD_INPUT

A = [10, 10, 30, 30]
B = [40, 40, 60, 56]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def dataset(tmp_path):
    """A converted split of 3 samples (64 x 64 pictures) as the converter writes it."""
    data = tmp_path / "data"
    data.mkdir()
    objects = {
        "s1": [{"label": "open", "bbox": A}],
        "s2": [{"label": "short", "bbox": A}, {"label": "spur", "bbox": B}],
        "s3": [{"label": "pin-hole", "bbox": B}],
    }
    rows = []
    for sid, objs in objects.items():
        image = data / f"{sid}_test.jpg"
        Image.new("L", (64, 64), 255).save(image)
        rows.append(
            {
                "id": sid,
                "image": str(image),
                "template": str(image),
                "width": 64,
                "height": 64,
                "objects": objs,
                "messages": [],
            }
        )
    _write_jsonl(data / "test.jsonl", rows)
    return data


PREDICTIONS = [
    # s1: correct.
    {
        "id": "s1",
        "objects": [{"label": "open", "bbox": A, "score": 0.9}],
        "raw": "...",
        "error": None,
        "problems": {},
    },
    # s2: the short box found, the spur box answered as copper (matched, wrong class); the output was cut off.
    {
        "id": "s2",
        "objects": [
            {"label": "short", "bbox": A, "score": 0.8},
            {"label": "copper", "bbox": B, "score": 0.7},
        ],
        "raw": "...",
        "error": "truncated",
        "problems": {"truncated": 1, "code_fence": 1},
    },
    # s3: nothing found; kinds counted by parsing `raw` again (no "problems" key).
    {"id": "s3", "objects": [], "raw": "I see no defects.", "error": "no_json"},
]


def _cli(*args, capsys):
    """Run the job in-process like run_job does: (exit code, stdout, stderr)."""
    from pcbvlm.commands.evaluate import main

    with pytest.raises(SystemExit) as exit_info:
        cli.run_job(main, [*args, "--config", str(ROOT / "config" / "config.yaml")])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_predictions_mode_writes_metrics_report_curve_and_overlays(dataset, tmp_path):
    preds = _write_jsonl(tmp_path / "predictions.jsonl", PREDICTIONS)
    out = tmp_path / "eval"
    proc = run_job(
        "eval",
        "--predictions",
        str(preds),
        "--data-dir",
        str(dataset),
        "--split",
        "test",
        "--out",
        str(out),
        "--set",
        "eval.worst_n=2",
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    # DeepPCB: correct 2 (s1 open, s2 short) of 3 detections and 4 gt boxes.
    # P = 2/3, R = 1/2, F = 2 * (2/3) * (1/2) / (7/6) = 4/7.
    # AP: global order 0.9 (correct), 0.8 (correct), 0.7 (wrong) -> (1/1 + 2/2) / 4 = 0.5.
    assert metrics["deeppcb"]["precision"] == pytest.approx(2 / 3)
    assert metrics["deeppcb"]["recall"] == pytest.approx(0.5)
    assert metrics["deeppcb"]["fscore"] == pytest.approx(4 / 7)
    assert metrics["deeppcb"]["ap"] == pytest.approx(0.5)
    # COCO AP50: open 1, short 1, spur 0, pin-hole 0 (copper has no gt) -> 0.5.
    assert metrics["coco"]["map50"] == pytest.approx(0.5)
    assert metrics["coco"]["per_class_ap50"]["copper"] is None
    assert metrics["parse_failure_rate"] == pytest.approx(2 / 3)
    assert metrics["parse_problems"] == {"code_fence": 1, "no_json": 1, "truncated": 1}
    assert metrics["images_per_s"] is None
    assert metrics["counts"] == {"images": 3, "gt_boxes": 4, "detections": 3}
    assert metrics["run"]["predictions"] == str(preds)
    report = (out / "report.md").read_text()
    assert "score of a box = mean probability of the tokens" in report
    assert (out / "config.resolved.yaml").is_file()
    with Image.open(out / "pr_curve.png") as img:
        assert img.format == "PNG"
    # errors: s2 = 1 FP (copper) + 1 FN (spur) = 2, s3 = 1 FN, s1 = 0; worst_n = 2.
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == ["worst_01_s2.png", "worst_02_s3.png"]
    assert "DeepPCB P 0.6667 R 0.5000" in proc.stdout


def test_unscored_predictions_are_reported_as_such(dataset, tmp_path, capsys):
    rows = [{"id": s, "objects": []} for s in ("s1", "s2", "s3")]
    rows[0]["objects"] = [{"label": "open", "bbox": A}]  # no score: 1.0
    preds = _write_jsonl(tmp_path / "p.jsonl", rows)
    code, _, err = _cli(
        "--predictions", str(preds), "--data-dir", str(dataset), "--out", str(tmp_path / "o"), capsys=capsys
    )
    assert code == 0, err
    assert "1.0 (no scores in predictions)" in (tmp_path / "o" / "report.md").read_text()
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["parse_failure_rate"] == 0.0


def test_limit_scores_the_first_samples_and_skips_later_lines(dataset, tmp_path, capsys):
    preds = _write_jsonl(tmp_path / "p.jsonl", PREDICTIONS)
    code, _, err = _cli(
        "--predictions",
        str(preds),
        "--data-dir",
        str(dataset),
        "--out",
        str(tmp_path / "o"),
        "--set",
        "eval.limit=1",
        capsys=capsys,
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["counts"] == {"images": 1, "gt_boxes": 1, "detections": 1}
    assert metrics["deeppcb"]["fscore"] == 1.0


def test_compare_writes_the_side_by_side_table(dataset, tmp_path, capsys):
    perfect = [
        {"id": "s1", "objects": [{"label": "open", "bbox": A}]},
        {"id": "s2", "objects": [{"label": "short", "bbox": A}, {"label": "spur", "bbox": B}]},
        {"id": "s3", "objects": [{"label": "pin-hole", "bbox": B}]},
    ]
    for name, rows in (("merged", perfect), ("quantized", PREDICTIONS)):
        preds = _write_jsonl(tmp_path / f"{name}.jsonl", rows)
        code, _, err = _cli(
            "--predictions",
            str(preds),
            "--data-dir",
            str(dataset),
            "--out",
            str(tmp_path / name),
            capsys=capsys,
        )
        assert code == 0, err
    # The module form of the entry point.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pcbvlm.commands.evaluate",
            "--compare",
            str(tmp_path / "merged"),
            str(tmp_path / "quantized"),
            "--out",
            str(tmp_path / "cmp"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| metric | merged | quantized | delta (quantized - merged) |" in table
    # DeepPCB AP 1.0 -> 0.5 (worked out in the predictions-mode test).
    assert "| DeepPCB ap | 1.0000 | 0.5000 | -0.5000 |" in table
    assert "| parse failure rate | 0.0000 | 0.6667 | +0.6667 |" in table
    assert table.splitlines()[0] == "# Comparison"


def test_model_mode_calls_generate_and_scores_the_same_way(dataset, tmp_path, capsys, monkeypatch):
    calls = []

    def generate_predictions(cfg, model_path, samples, batch_size, max_new_tokens):
        calls.append((model_path, [s["id"] for s in samples], batch_size, max_new_tokens))
        return PREDICTIONS, 12.5

    import pcbvlm.generate

    monkeypatch.setattr(pcbvlm.generate, "generate_predictions", generate_predictions)
    out = tmp_path / "o"
    code, _, err = _cli(
        "--model",
        str(tmp_path / "my-model"),
        "--data-dir",
        str(dataset),
        "--out",
        str(out),
        "--set",
        "eval.batch_size=3",
        "--set",
        "eval.max_new_tokens=64",
        capsys=capsys,
    )
    assert code == 0, err
    assert calls == [(str(tmp_path / "my-model"), ["s1", "s2", "s3"], 3, 64)]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images_per_s"] == 12.5
    assert metrics["deeppcb"]["ap"] == pytest.approx(0.5)  # the same predictions as the file test
    assert metrics["run"]["model"] == str(tmp_path / "my-model")
    # The generated predictions are kept, so the run can be rescored with --predictions.
    kept = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert kept == PREDICTIONS


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"id": "s1", "objects": []}', "{not json"], "p.jsonl line 2: invalid JSON"),
        (
            ['{"id": "s1", "objects": []}', "", '{"id": "nope", "objects": []}'],
            "p.jsonl line 3: unknown id 'nope'",
        ),
        (
            ['{"id": "s1", "objects": [{"label": "scratch", "bbox": [1, 2, 3, 4]}]}'],
            "p.jsonl line 1: objects[0]: unknown label",
        ),
        (
            ['{"id": "s1", "objects": [{"label": "open", "bbox": [1, 2]}]}'],
            "p.jsonl line 1: objects[0]: bbox must be",
        ),
        (
            ['{"id": "s1", "objects": []}', '{"id": "s1", "objects": []}'],
            "p.jsonl line 2: duplicate id 's1' (first on line 1)",
        ),
        (["[1, 2]"], "p.jsonl line 1: expected a JSON object"),
        (
            ['{"id": "s1", "objects": [], "x": 1' + "0" * 5000 + "}"],
            "p.jsonl line 1: invalid JSON (Exceeds the limit",
        ),
        (
            ['{"id": "s1", "objects": [{"label": "open", "bbox": [1' + "0" * 400 + ", 2, 3, 4]}]}"],
            "p.jsonl line 1: objects[0]: bbox",
        ),
        (['{"id": "s1", "objects": []}'], "no prediction for 2 of 3 samples (first: s2)"),
    ],
)
def test_bad_predictions_give_one_line_and_exit_2(dataset, tmp_path, capsys, lines, message):
    preds = tmp_path / "p.jsonl"
    preds.write_text("\n".join(lines) + "\n")
    code, _, err = _cli(
        "--predictions", str(preds), "--data-dir", str(dataset), "--out", str(tmp_path / "o"), capsys=capsys
    )
    assert code == EXIT_BAD_INPUT
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_missing_inputs_exit_2_naming_the_file(dataset, tmp_path, capsys):
    code, _, err = _cli(
        "--predictions", str(tmp_path / "absent.jsonl"), "--data-dir", str(dataset), capsys=capsys
    )
    assert (code, err) == (EXIT_BAD_INPUT, f"error: {tmp_path / 'absent.jsonl'}: file not found\n")
    preds = _write_jsonl(tmp_path / "p.jsonl", PREDICTIONS)
    code, _, err = _cli(
        "--predictions", str(preds), "--data-dir", str(dataset), "--split", "val", capsys=capsys
    )
    assert code == EXIT_BAD_INPUT
    assert err.startswith(f"error: {dataset / 'val.jsonl'}: split file not found") and err.count("\n") == 1
    code, _, err = _cli("--compare", str(tmp_path), str(dataset), "--out", str(tmp_path / "c"), capsys=capsys)
    assert (code, err) == (
        EXIT_BAD_INPUT,
        f"error: {tmp_path / 'metrics.json'}: file not found (evaluate that run first)\n",
    )


def test_bad_split_line_names_file_and_line(dataset, tmp_path, capsys):
    lines = (dataset / "test.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace('"width": 64', '"width": "wide"')
    (dataset / "test.jsonl").write_text("\n".join(lines) + "\n")
    preds = _write_jsonl(tmp_path / "p.jsonl", PREDICTIONS)
    code, _, err = _cli("--predictions", str(preds), "--data-dir", str(dataset), capsys=capsys)
    assert code == EXIT_BAD_INPUT
    assert err == f"error: {dataset / 'test.jsonl'} line 2: 'width' must be a positive integer, got 'wide'\n"


def test_conflicting_arguments_exit_2(tmp_path, capsys):
    code, _, err = _cli("--compare", str(tmp_path), str(tmp_path), "--predictions", "p.jsonl", capsys=capsys)
    assert code == EXIT_BAD_INPUT
    assert "--compare takes neither --predictions nor --model" in err


def _fake_generation(monkeypatch) -> None:
    import pcbvlm.generate

    monkeypatch.setattr(pcbvlm.generate, "generate_predictions", lambda *args: (PREDICTIONS, 12.5))


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_rerun_replaces_the_folder_as_a_whole(dataset, tmp_path, capsys, monkeypatch):
    """No overlays of the previous evaluation stay beside the new ones."""
    _fake_generation(monkeypatch)
    out = tmp_path / "o"
    args = ("--model", str(tmp_path / "m"), "--data-dir", str(dataset), "--out", str(out))
    assert _cli(*args, "--set", "eval.worst_n=2", capsys=capsys)[0] == 0
    assert len(list((out / "overlays").iterdir())) == 2
    assert _cli(*args, "--set", "eval.worst_n=1", capsys=capsys)[0] == 0
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["worst_01_s2.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "o"]  # no .partial-* or .old-* left


def test_a_failed_write_prints_the_metrics_and_keeps_the_previous_folder(
    dataset, tmp_path, capsys, monkeypatch
):
    _fake_generation(monkeypatch)
    out = tmp_path / "o"
    args = ("--model", str(tmp_path / "m"), "--data-dir", str(dataset), "--out", str(out))
    assert _cli(*args, capsys=capsys)[0] == 0
    before = _files(out)

    import pcbvlm.report

    def full_disk(path, result):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pcbvlm.report, "plot_pr_curves", full_disk)
    code, stdout, err = _cli(*args, "--set", "eval.worst_n=1", capsys=capsys)
    assert code == 1
    assert "DeepPCB P 0.6667 R 0.5000 F 0.5714 AP 0.5000" in stdout  # the result survives the failure
    assert err.count("\n") == 1 and "Traceback" not in err
    kept = tmp_path / "o.unscored-predictions.jsonl"
    assert err == (
        f"error: {out}: could not write the report ([Errno 28] No space left on device); nothing was "
        f"published there, the metrics are above; the generated predictions are kept in {kept} (rescore "
        "them with --predictions)\n"
    )
    assert _files(out) == before  # the previous evaluation, whole and untouched
    assert [json.loads(line) for line in kept.read_text().splitlines()] == PREDICTIONS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "o", kept.name]


def test_rescoring_in_place_keeps_the_predictions_and_refuses_foreign_folders(dataset, tmp_path, capsys):
    folder = tmp_path / "eval"
    folder.mkdir()
    preds = _write_jsonl(folder / "predictions.jsonl", PREDICTIONS)
    (folder / "overlays").mkdir()
    (folder / "overlays" / "worst_09_old.png").write_bytes(b"old")
    code, _, err = _cli("--predictions", str(preds), "--data-dir", str(dataset), capsys=capsys)
    assert code == 0, err
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.resolved.yaml",
        "metrics.json",
        "overlays",
        "pr_curve.png",
        "predictions.jsonl",
        "report.md",
    ]
    assert [json.loads(line) for line in preds.read_text().splitlines()] == PREDICTIONS
    assert "worst_09_old.png" not in {p.name for p in (folder / "overlays").iterdir()}

    (folder / "notes.txt").write_text("mine")
    code, _, err = _cli("--predictions", str(preds), "--data-dir", str(dataset), capsys=capsys)
    assert code == EXIT_BAD_INPUT
    assert err.startswith(f"error: --out {folder}: holds notes.txt, which an evaluation does not write")
    assert (folder / "notes.txt").read_text() == "mine"
