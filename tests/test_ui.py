"""`make ui` (pcbvlm.ui, jobs/ui.py): the page's functions without a browser, then the page itself in headless
Chromium (Debian's chromium + chromium-driver through selenium; skipped where they are not installed).

UI_SCREENSHOTS=docs makes the browser test save a screenshot of each tab there (the README's pictures).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT
from pcbvlm.errors import DataError
from pcbvlm.evaluate import load_scoring_samples, score_predictions
from pcbvlm.report import CORRECT_COLOR, GT_COLOR, PRED_COLOR
from pcbvlm.ui import (
    Inspection,
    check_eval_folder,
    check_image,
    comparison_table,
    draw_eval_image,
    filter_objects,
    find_evaluations,
    inspection_view,
    load_evaluation,
    metrics_tables,
)

# ------------------------------------------------------------------------------------------------------------
# Fixtures: a board on disk, evaluation folders made by the evaluation job's own scoring


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """A synthetic board (test image, template) and its defects."""
    from pcbvlm.synth import generate_sample

    sample = generate_sample(1, seed=5, size=320)
    folder = tmp_path_factory.mktemp("board")
    sample.test.save(folder / "board_test.jpg", quality=92)
    sample.template.save(folder / "board_temp.jpg", quality=92)
    return folder / "board_test.jpg", folder / "board_temp.jpg", sample.objects


def _predictions(samples: list[dict], miss_every: int) -> list[dict]:
    """Predictions from the ground truth: every box at 0.9, a wrong extra box at 0.3 on the first image, and
    the first box of every miss_every-th image dropped (so images differ in their errors)."""
    predictions = []
    for i, sample in enumerate(samples):
        objects = [{**obj, "score": 0.9} for obj in sample["objects"]]
        if i % miss_every == 0 and len(objects) > 1:
            objects = objects[1:]
        if i == 0:
            objects.append({"label": "short", "bbox": [1.0, 1.0, 30.0, 30.0], "score": 0.3})
        predictions.append({"id": sample["id"], "objects": objects, "raw": None, "error": None})
    return predictions


def _write_eval(out: Path, data_dir: Path, miss_every: int) -> Path:
    """An evaluation folder like `make eval` writes: metrics.json, report, overlays, predictions.jsonl."""
    from pcbvlm.io import atomic_write_jsonl

    samples = load_scoring_samples(data_dir, "test")
    predictions = _predictions(samples, miss_every)
    atomic_write_jsonl(out / "predictions.jsonl", predictions)
    run = {"model": "hand-made", "data": f"{data_dir} (test, {len(samples)} of {len(samples)} samples)"}
    score_predictions(predictions, samples, out, worst_n=2, run=run)
    return out


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory, tiny_data_dir) -> Path:
    root = tmp_path_factory.mktemp("outputs") / "eval"
    _write_eval(root / "merged-test", tiny_data_dir, miss_every=2)
    _write_eval(root / "quantized-test", tiny_data_dir, miss_every=1)
    (root / "compare-only").mkdir()
    (root / "compare-only" / "comparison.md").write_text("# Comparison\n")
    return root


# ------------------------------------------------------------------------------------------------------------
# Inspect a board


def test_filter_objects_keeps_boxes_at_or_above_the_threshold():
    objects = [
        {"label": "open", "bbox": [0, 0, 1, 1], "score": 0.2},
        {"label": "short", "bbox": [0, 0, 1, 1], "score": 0.5},
        {"label": "spur", "bbox": [0, 0, 1, 1]},  # no score: counts as 1.0
    ]
    assert [o["label"] for o in filter_objects(objects, 0.0)] == ["open", "short", "spur"]
    assert [o["label"] for o in filter_objects(objects, 0.5)] == ["short", "spur"]
    assert [o["label"] for o in filter_objects(objects, 0.51)] == ["spur"]


def test_confidence_threshold_filters_overlay_table_and_json(board):
    image, _, _ = board
    confident = {"label": "open", "bbox": [20.0, 20.0, 60.0, 60.0], "score": 0.9}
    doubtful = {"label": "spur", "bbox": [150.0, 150.0, 200.0, 200.0], "score": 0.2}
    result = Inspection(str(image), 320, 320, [doubtful, confident], "raw", None, 1.5, 3.0, "m", "merged")

    overlay, rows, answer, summary = inspection_view(result, 0.0)
    assert [r[0] for r in rows] == ["open", "spur"]  # most confident first
    assert rows[0] == ["open", 0.9, 20.0, 20.0, 60.0, 60.0]
    assert overlay.getpixel((150, 175)) == PRED_COLOR  # the doubtful box's left edge is drawn
    assert "2 boxes" in summary and "1.50 s" in summary and "3.0 s" in summary

    overlay, rows, answer, summary = inspection_view(result, 0.5)
    assert [r[0] for r in rows] == ["open"]
    assert answer["objects"] == [confident] and answer["hidden_below_min_score"] == 1
    assert "1 more below confidence 0.50" in summary
    with Image.open(image) as original:
        assert overlay.getpixel((150, 175)) == original.convert("RGB").getpixel((150, 175))
    assert overlay.getpixel((20, 40)) == PRED_COLOR


def test_check_image_refuses_missing_non_images_and_huge_images(tmp_path, board):
    image, _, _ = board
    assert check_image(image) == (320, 320)
    with pytest.raises(DataError, match="no board image"):
        check_image(None, what="board image")
    fake = tmp_path / "board.png"
    fake.write_text("not a picture")
    with pytest.raises(DataError, match="board.png: not a readable image"):
        check_image(fake)
    with pytest.raises(DataError, match=r"320x320 pixels \(0.1 MP\) is above the limit"):
        check_image(image, max_pixels=100_000)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(image.read_bytes()[:2000])
    with pytest.raises(DataError, match="cut.jpg: not a readable image"):
        check_image(truncated)


def test_inspector_runs_the_tiny_model_once_and_needs_a_template_when_configured(tiny_train_cfg, board):
    from pcbvlm.ui import Inspector

    image, template, _ = board
    inspector = Inspector(tiny_train_cfg, "base")
    first = inspector.detect(image)
    assert (first.width, first.height) == (320, 320)
    assert Path(first.model) == Path(tiny_train_cfg.model.name_or_path)  # "base": the configured model
    assert first.load_seconds is not None and first.seconds > 0
    assert isinstance(first.objects, list) and isinstance(first.raw, str)
    second = inspector.detect(image, template)
    assert second.load_seconds is None  # loaded once
    assert any("with_template is false" in note for note in second.notes)

    templated = tiny_train_cfg.model_copy(deep=True)
    templated.data.with_template = True
    with pytest.raises(DataError, match="no template"):
        Inspector(templated, str(templated.model.name_or_path)).detect(image)  # a path


# ------------------------------------------------------------------------------------------------------------
# Browse an evaluation


def test_find_evaluations_lists_finished_folders_only(eval_root):
    found = {p.name for p in find_evaluations([eval_root, eval_root.parent / "missing"])}
    assert found == {"merged-test", "quantized-test"}


def test_check_eval_folder_says_what_is_wrong(eval_root, tmp_path):
    roots = [eval_root]
    assert check_eval_folder(str(eval_root / "merged-test"), roots) == eval_root / "merged-test"
    with pytest.raises(DataError, match="choose an evaluation folder"):
        check_eval_folder("", roots)
    with pytest.raises(DataError, match="not under the evaluation folders"):
        check_eval_folder(str(tmp_path), roots)
    with pytest.raises(DataError, match="not under the evaluation folders"):
        check_eval_folder(str(eval_root / ".." / ".."), roots)
    with pytest.raises(DataError, match="no such folder"):
        check_eval_folder(str(eval_root / "nope"), roots)
    with pytest.raises(DataError, match="not an evaluation folder \\(no metrics.json"):
        check_eval_folder(str(eval_root / "compare-only"), roots)
    partial = eval_root / "x.partial-123"
    partial.mkdir(exist_ok=True)
    with pytest.raises(DataError, match="unfinished evaluation"):
        check_eval_folder(str(partial), roots)
    broken = eval_root / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "metrics.json").write_text('{"deeppcb": {}')
    with pytest.raises(DataError, match="metrics.json line 1: invalid JSON"):
        load_evaluation(check_eval_folder(str(broken), roots))
    shutil.rmtree(broken)
    partial.rmdir()


def test_evaluation_ranks_images_worst_first_and_tables_match_metrics(eval_root):
    evaluation = load_evaluation(eval_root / "merged-test")
    assert evaluation.note == "" and evaluation.images
    errors = [v.errors for v in evaluation.images]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0
    metrics = json.loads((eval_root / "merged-test" / "metrics.json").read_text())
    # the per-image errors add up to the report's DeepPCB counts
    assert (
        sum(v.false_negatives for v in evaluation.images)
        == metrics["deeppcb"]["gt_boxes"] - metrics["deeppcb"]["correct"]
    )
    deeppcb, coco, per_class = metrics_tables(evaluation.metrics)
    assert deeppcb[0][:4] == [
        round(metrics["deeppcb"][k], 4) for k in ("precision", "recall", "fscore", "ap")
    ]
    assert coco[0][0] == round(metrics["coco"]["map50"], 4)
    assert [row[0] for row in per_class][-1] == "all" and len(per_class) == 7


def test_ground_truth_and_predictions_toggle_on_the_drawn_image(eval_root):
    evaluation = load_evaluation(eval_root / "merged-test")
    view = next(v for v in evaluation.images if v.gt and v.dets)
    x1, y1, x2, y2 = view.gt[-1]["bbox"]  # kept by the predictions too (only the first box is ever dropped)
    edge = (round(x1), round((y1 + y2) / 2))
    both = draw_eval_image(view, True, True, 0.0)
    gt_only = draw_eval_image(view, True, False, 0.0)
    pred_only = draw_eval_image(view, False, True, 0.0)
    nothing = draw_eval_image(view, False, False, 0.0)
    assert gt_only.getpixel(edge) == GT_COLOR
    assert pred_only.getpixel(edge) == CORRECT_COLOR  # a correct prediction on the same box
    assert both.getpixel(edge) == CORRECT_COLOR  # predictions are drawn over the ground truth
    assert nothing.getpixel(edge) not in (GT_COLOR, CORRECT_COLOR, PRED_COLOR)
    # above the predictions' score, none is drawn
    assert draw_eval_image(view, False, True, 0.95).getpixel(edge) == nothing.getpixel(edge)


def test_evaluation_without_its_split_keeps_the_metrics_and_says_why(eval_root, tmp_path):
    moved = tmp_path / "eval" / "copy"
    shutil.copytree(eval_root / "merged-test", moved)
    metrics = json.loads((moved / "metrics.json").read_text())
    metrics["run"]["data"] = f"{tmp_path / 'gone'} (test, 5 of 5 samples)"
    (moved / "metrics.json").write_text(json.dumps(metrics))
    evaluation = load_evaluation(moved)
    assert (
        evaluation.images == [] and "ground truth not found" in evaluation.note and "gone" in evaluation.note
    )
    assert evaluation.metrics["deeppcb"] == metrics["deeppcb"]


def test_comparison_shows_both_evaluations_and_the_deltas(eval_root):
    a, b = eval_root / "merged-test", eval_root / "quantized-test"
    header, rows = comparison_table(a, b)
    assert header == ["metric", "merged-test", "quantized-test", "delta (quantized-test - merged-test)"]
    ma = json.loads((a / "metrics.json").read_text())
    mb = json.loads((b / "metrics.json").read_text())
    assert mb["deeppcb"]["recall"] < ma["deeppcb"]["recall"]  # b drops a box on every image
    by_metric = {row[0]: row[1:] for row in rows}
    assert by_metric["DeepPCB recall"] == [
        f"{ma['deeppcb']['recall']:.4f}",
        f"{mb['deeppcb']['recall']:.4f}",
        f"{mb['deeppcb']['recall'] - ma['deeppcb']['recall']:+.4f}",
    ]
    assert by_metric["images"] == ["5", "5", "+0"]
    assert all(len(row) == 4 for row in rows)


# ------------------------------------------------------------------------------------------------------------
# The entry point and make


def _make_n(*args: str, env: dict | None = None) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    full_env = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "SET", "MAKEFLAGS", "MAKELEVEL")}
    full_env.update(env or {})
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", *args],
        cwd=ROOT,
        env=full_env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_make_ui_binds_localhost_unless_host_is_given():
    local = _make_n("ui", "RUNNER=local", "VENV=/venv", env={"HOST": "somewhere", "PORT": "1234"})
    assert "/venv/bin/python -m pcbvlm ui --host 127.0.0.1 --port 7860" in local  # not from the shell
    given = _make_n("ui", "RUNNER=local", "VENV=/venv", "HOST=0.0.0.0", "PORT=9000", "MODEL=merged")
    assert "pcbvlm ui --host 0.0.0.0 --port 9000 --model 'merged'" in given
    docker = _make_n("ui", "RUNNER=docker", "MODEL=quantized")
    line = next(x for x in docker.splitlines() if "pcbvlm ui" in x or "compose run" in x)
    assert line.startswith("UI_HOST=127.0.0.1 UI_PORT=7860 docker compose run --rm --service-ports"), line


def test_ui_job_refuses_a_bad_port_in_one_line():
    from conftest import run_job

    out = run_job("ui", "--port", "70000")
    assert out.returncode == 2
    assert out.stderr.strip() == "pcbvlm ui: error: --port 70000: must be between 1 and 65535"


def test_ui_job_says_when_its_port_is_taken():
    from conftest import run_job

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_job("ui", "--config", str(ROOT / "config" / "tiny.yaml"), "--port", str(port))
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: cannot serve on 127.0.0.1:{port}: the port is in use or not allowed; give another PORT="
    )
    assert "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------------------------------
# In a real browser


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_app(tmp_path_factory, tiny_model_dir, eval_root):
    """jobs/ui.py on the tiny model, on a free local port, in a subprocess."""
    if _chromium() is None:
        pytest.skip(
            "no Chromium: install Debian's chromium and chromium-driver (apt) to run the browser test"
        )
    pytest.importorskip("selenium", reason="selenium is not installed (it is in requirements/cpu.lock)")
    port = _free_port()
    log = tmp_path_factory.mktemp("ui") / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in ("SET", "CONFIG")}
    env.update(
        {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "GRADIO_TEMP_DIR": str(log.parent / "gradio")}
    )
    command = [sys.executable, str(ROOT / "jobs" / "ui.py"), "--config", str(ROOT / "config" / "tiny.yaml")]
    command += ["--set", f"model.name_or_path={tiny_model_dir}", "--set", "data.max_pixels=16384"]
    command += ["--port", str(port), "--evals", str(eval_root)]
    with log.open("w") as out:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the UI did not start:\n{log.read_text()}")
                time.sleep(1)
        yield url, log
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture
def browser(served_app):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,3300"):
        options.add_argument(arg)
    # Any host but the app's fails to resolve: the page must work offline.
    options.add_argument("--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def _requested_hosts(driver) -> set[str]:
    from urllib.parse import urlparse

    hosts = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if url.startswith(("http:", "https:", "ws:", "wss:")):
                hosts.add(urlparse(url).hostname)
    return hosts


def _loaded_image(driver, elem_id: str) -> str | None:
    """The src of the image shown in a Gradio Image component once the browser has decoded it, else None."""
    return driver.execute_script(
        "const img = document.querySelector('#' + arguments[0] + ' img');"
        "return img && img.complete && img.naturalWidth > 0 ? img.src : null;",
        elem_id,
    )


def _screenshot(driver, name: str, down_to: str | None = None) -> None:
    """With UI_SCREENSHOTS=folder: the window (down to the element with id down_to) as folder/name."""
    folder = os.environ.get("UI_SCREENSHOTS")
    if not folder:
        return
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    with Image.open(path) as shot:
        if down_to:
            bottom = driver.execute_script(
                "return document.getElementById(arguments[0]).getBoundingClientRect().bottom", down_to
            )
            shot = shot.crop((0, 0, shot.width, min(shot.height, int(bottom) + 16)))
        # a palette PNG: a few times smaller, the same picture for a page of flat colours
        shot.convert("RGB").quantize(colors=128).save(path, optimize=True)


def test_browser_inspect_a_board_shows_overlay_table_and_json(served_app, browser, board, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, log = served_app
    image, _, _ = board
    browser.get(url)
    wait = WebDriverWait(browser, 240)
    upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#board-image input[type=file]")))
    upload.send_keys(str(image))
    wait.until(ec.text_to_be_present_in_element((By.ID, "board-image"), image.stem))  # uploaded
    browser.find_element(By.ID, "find-defects").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "inspect-summary"), "generated in"))
    overlay = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#overlay img")))
    assert overlay.get_attribute("naturalWidth") == "320", log.read_text()
    table = browser.find_element(By.ID, "boxes").text
    for column in ("label", "score", "x1", "y2"):
        assert column in table
    assert "min_score" in browser.find_element(By.ID, "answer").text
    status = browser.find_element(By.CSS_SELECTOR, "#inspect-status textarea").get_attribute("value")
    assert status == "ok"
    _screenshot(browser, "ui-inspect.png", down_to="answer")

    # not an image: a clear line in the page, no traceback
    fake = tmp_path / "notes.png"
    fake.write_text("these are notes, not a board")
    browser.find_element(By.CSS_SELECTOR, "#board-image button[aria-label='Clear']").click()
    upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#board-image input[type=file]")))
    upload.send_keys(str(fake))
    wait.until(ec.text_to_be_present_in_element((By.ID, "board-image"), fake.stem))
    browser.find_element(By.ID, "find-defects").click()
    status_box = browser.find_element(By.CSS_SELECTOR, "#inspect-status textarea")
    wait.until(lambda d: status_box.get_attribute("value").startswith("error"))
    assert status_box.get_attribute("value").startswith("error: notes.png: not a readable image")
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
    assert _requested_hosts(browser) == {"127.0.0.1"}


def test_browser_browse_an_evaluation_shows_metrics_curve_and_toggles(served_app, browser, eval_root):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, log = served_app
    browser.get(url)
    wait = WebDriverWait(browser, 120)
    tab = wait.until(ec.element_to_be_clickable((By.XPATH, "//button[@role='tab'][contains(., 'Browse')]")))
    tab.click()

    def choose(elem_id: str, value: str) -> None:
        box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, f"#{elem_id} input")))
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(value, Keys.ENTER)

    choose("eval-folder", str(eval_root / "merged-test"))
    status = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#browse-status textarea")))
    wait.until(lambda d: status.get_attribute("value") == "ok")
    metrics = json.loads((eval_root / "merged-test" / "metrics.json").read_text())
    wait.until(
        ec.text_to_be_present_in_element((By.ID, "deeppcb"), f"{round(metrics['deeppcb']['precision'], 4)}")
    )
    assert "mousebite" in browser.find_element(By.ID, "per-class").text
    pr = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#pr-curve img")))
    assert int(pr.get_attribute("naturalWidth")) > 500
    before = wait.until(lambda d: _loaded_image(d, "eval-overlay"))
    browser.find_element(By.CSS_SELECTOR, "#show-gt input").click()  # hide the ground truth
    wait.until(lambda d: _loaded_image(d, "eval-overlay") not in (None, before))

    choose("compare-folder", str(eval_root / "quantized-test"))
    wait.until(
        ec.text_to_be_present_in_element((By.ID, "comparison"), "delta (quantized-test - merged-test)")
    )
    hidden = _loaded_image(browser, "eval-overlay")
    browser.find_element(By.CSS_SELECTOR, "#show-gt input").click()  # both again, for the picture
    wait.until(lambda d: _loaded_image(d, "eval-overlay") not in (None, hidden))
    _screenshot(browser, "ui-browse.png", down_to="comparison")

    # a folder that is not an evaluation: a clear line in the page
    choose("eval-folder", str(eval_root / "compare-only"))
    wait.until(lambda d: "not an evaluation folder" in status.get_attribute("value"))
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
    assert _requested_hosts(browser) == {"127.0.0.1"}, log.read_text()
