"""Model families (pcbvlm.families): the registry, each family's coordinate convention, and the second
family (Qwen2.5-VL) running data -> train -> merge -> eval through the real jobs on its tiny model.

Coordinate conventions are where grounding fine-tunes silently score zero, so each family's is pinned
three ways on non-square images, one of them resized by the processor: answers map back to the original
pixel boxes within 1 px; each family's answer frame is checked against what its own processor does to the
image (Qwen2.5-VL answers in pixels of the resized image; Qwen3-VL in 0-1000 whatever the resize); and
reading one family's answers with the other family's convention misses by far more than 1 px (so a
family that used the other's convention fails here).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT
from pcbvlm import cli
from pcbvlm.config import load_config
from pcbvlm.errors import UserError
from pcbvlm.families import FAMILIES, family_for, get_family
from pcbvlm.parsing import parse_answer
from pcbvlm.samples import build_messages

QWEN25_CONFIG = ROOT / "config" / "tiny-qwen2.5-vl.yaml"
# (width, height, min_pixels, max_pixels), none square and each resized by the processor: a small board
# scaled up (Qwen2.5-VL sees 336x224), DeepPCB-sized boards rounded to 28 px multiples (644x476) and scaled
# down (588x420). Integer answers in a resized frame are exact to half a resized pixel, so 1 px holds while
# a side is not shrunk by more than 2x (DeepPCB's 640 px at the default max_pixels: 616 px, 0.52 px).
IMAGES = [(256, 160, 65536, 409600), (640, 480, 16384, 409600), (641, 479, 65536, 262144)]


@pytest.fixture(scope="session")
def tiny_qwen25_dir(tmp_path_factory) -> Path:
    """The tiny random Qwen2.5-VL, built once per test session."""
    from pcbvlm.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl", family="qwen2_5_vl")


# ------------------------------------------------------------------------------------------------------
# The registry


def test_an_unknown_model_type_is_one_error_naming_it_and_the_known_ones(tmp_path):
    with pytest.raises(UserError) as err:
        get_family("llava")
    message = str(err.value)
    assert "'llava'" in message and "qwen2_5_vl" in message and "qwen3_vl" in message
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(UserError, match=r"config\.json: model_type 'llava' is not a supported"):
        family_for(tmp_path)


def test_the_family_comes_from_config_json_else_from_the_name(tmp_path, tiny_model_dir, tiny_qwen25_dir):
    assert family_for(tiny_model_dir).model_type == "qwen3_vl"
    assert family_for(tiny_qwen25_dir).model_type == "qwen2_5_vl"
    # config.json wins over a misleading folder name
    misnamed = tmp_path / "tiny-qwen3-vl"
    misnamed.mkdir()
    (misnamed / "config.json").write_text((tiny_qwen25_dir / "config.json").read_text())
    assert family_for(misnamed).model_type == "qwen2_5_vl"
    # no config.json at hand (offline hub id, tiny model not built yet): the name decides
    assert family_for("Qwen/Qwen2.5-VL-32B-Instruct").model_type == "qwen2_5_vl"
    assert family_for("Qwen/Qwen3-VL-32B-Instruct").model_type == "qwen3_vl"
    assert family_for(tmp_path / "models" / "tiny-qwen2.5-vl").model_type == "qwen2_5_vl"
    with pytest.raises(UserError, match="matches no model family"):
        family_for(tmp_path / "models" / "my-detector")


def test_each_tiny_model_has_its_familys_classes_and_module_names(tiny_model_dir, tiny_qwen25_dir):
    import re

    for folder in (tiny_model_dir, tiny_qwen25_dir):
        family = family_for(folder)
        model = family.model_class().from_pretrained(folder)
        assert type(model).__name__ == family.model_class_name
        assert type(family.decoder_layers(model)[0]).__name__ == family.decoder_layer_class
        names = [n for n, m in model.named_modules() if m.__class__.__name__ == "Linear"]
        pattern = re.compile(family.lora_target_regex(["q_proj", "down_proj"], train_merger=True))
        targeted = [n for n in names if pattern.fullmatch(n)]
        layers = len(family.decoder_layers(model))
        merger = [n for n in targeted if n.startswith("model.visual.")]
        assert len(targeted) - len(merger) == 2 * layers and len(merger) == 2
        assert all(n.startswith(family.skip_quantization) for n in merger)


# ------------------------------------------------------------------------------------------------------
# Coordinate conventions


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
@pytest.mark.parametrize(("width", "height", "min_pixels", "max_pixels"), IMAGES)
def test_answers_map_back_to_the_pixel_boxes_within_1px(model_type, width, height, min_pixels, max_pixels):
    family = FAMILIES[model_type]
    rng = random.Random(0)
    for _ in range(200):
        x1, x2 = sorted(rng.uniform(0, width) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, height) for _ in range(2))
        box = [x1, y1, x2, y2]
        answer = family.to_answer_box(box, width, height, min_pixels, max_pixels)
        assert all(isinstance(v, int) for v in answer)
        back = family.to_pixel_box(answer, width, height, min_pixels, max_pixels)
        assert max(abs(a - b) for a, b in zip(back, box, strict=True)) <= 1.0


@pytest.mark.parametrize(("width", "height", "min_pixels", "max_pixels"), IMAGES)
def test_each_familys_frame_is_what_its_processor_does_to_the_image(
    width, height, min_pixels, max_pixels, tiny_model_dir, tiny_qwen25_dir
):
    """Qwen2.5-VL answers in pixels of the image its processor resized (grid x 14 px); Qwen3-VL in 0-1000."""
    from pcbvlm.processing import load_processor

    image = Image.new("RGB", (width, height))
    for folder in (tiny_model_dir, tiny_qwen25_dir):
        family = family_for(folder)
        processor = load_processor(folder, min_pixels, max_pixels)
        _, rows, cols = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][
            0
        ].tolist()
        seen = (cols * family.patch_size, rows * family.patch_size)  # (width, height) the model sees
        frame = family.answer_frame(width, height, min_pixels, max_pixels)
        if family.model_type == "qwen2_5_vl":
            assert frame == seen and frame != (width, height)  # resized: not the original pixels
            # the board's right half, bottom row: pixels of the resized image
            answer = family.to_answer_box(
                [width / 2, 0, width, height], width, height, min_pixels, max_pixels
            )
            assert answer == [round(seen[0] / 2), 0, seen[0], seen[1]]
        else:
            assert frame == (1000, 1000)
            assert family.to_answer_box(
                [width / 2, 0, width, height], width, height, min_pixels, max_pixels
            ) == [
                500,
                0,
                1000,
                1000,
            ]


@pytest.mark.parametrize(("width", "height", "min_pixels", "max_pixels"), IMAGES)
def test_trained_answers_parse_back_only_in_their_own_familys_frame(width, height, min_pixels, max_pixels):
    """The text training writes (samples.build_messages with the family), read as generation reads it
    (parse_answer in the family's frame), is the original box; read in the other family's frame it is not."""
    cfg = load_config(
        ROOT / "config" / "tiny.yaml", [f"data.min_pixels={min_pixels}", f"data.max_pixels={max_pixels}"]
    )
    truth = [{"label": "short", "bbox": [width * 0.1, height * 0.55, width * 0.3, height * 0.95]}]
    sample = {"image": "board.jpg", "width": width, "height": height, "objects": truth}
    (first, second) = FAMILIES.values()
    for family, other in ((first, second), (second, first)):
        text = build_messages(sample, cfg.data, family=family)[-1]["content"][0]["text"]
        assert '"bbox_2d": [' in text and '"label": "short"' in text
        own = parse_answer(
            text, width, height, frame=family.answer_frame(width, height, min_pixels, max_pixels)
        )
        (obj,) = own.objects
        assert max(abs(a - b) for a, b in zip(obj.bbox, truth[0]["bbox"], strict=True)) <= 1.0
        wrong = parse_answer(
            text, width, height, frame=other.answer_frame(width, height, min_pixels, max_pixels)
        )
        misses = [
            max(abs(a - b) for a, b in zip(o.bbox, truth[0]["bbox"], strict=True)) for o in wrong.objects
        ]
        assert all(m > 10 for m in misses)


def test_generation_reads_each_models_answers_in_its_familys_frame(
    tiny_model_dir, tiny_qwen25_dir, monkeypatch
):
    """generate_predictions (the evaluation job's path) turns each model's answer text into the pixel
    boxes it was written from, on a non-square board the processor resizes."""
    from pcbvlm import generate

    width, height = 640, 480
    truth = [{"label": "open", "bbox": [64.0, 264.0, 192.0, 456.0]}]
    sample = {"id": "b", "image": "board.jpg", "width": width, "height": height, "objects": truth}
    for folder in (tiny_model_dir, tiny_qwen25_dir):
        cfg = load_config(QWEN25_CONFIG, [f"model.name_or_path={folder}", "data.max_pixels=262144"])
        family = family_for(folder)
        text = build_messages(sample, cfg.data, family=family)[-1]["content"][0]["text"]
        loaded = generate.LoadedModel(
            family.model_class().from_pretrained(folder), None, "merged", str(folder)
        )
        monkeypatch.setattr(generate, "generate_batch", lambda loaded, batch, n, text=text: [(text, [], [])])
        (prediction,), _ = generate.generate_predictions(cfg, None, [sample], 1, 32, loaded=loaded)
        (obj,) = prediction["objects"]
        assert max(abs(a - b) for a, b in zip(obj["bbox"], truth[0]["bbox"], strict=True)) <= 1.0


def test_training_writes_answers_for_the_trained_family_whatever_make_data_wrote(
    tiny_data_dir, tiny_qwen25_dir
):
    """Data converted with the Qwen3-VL config (0-1000 answers) and trained as Qwen2.5-VL: the training
    chats carry resized-pixel answers, so a data folder cannot teach one family another's coordinates."""
    from pcbvlm.training import training_samples

    stored = [json.loads(line) for line in (tiny_data_dir / "train.jsonl").read_text().splitlines()]
    cfg = load_config(
        QWEN25_CONFIG, [f"model.name_or_path={tiny_qwen25_dir}", f"paths.data_dir={tiny_data_dir}"]
    )
    family = get_family("qwen2_5_vl")
    rows, _ = training_samples(cfg)
    assert [r["id"] for r in rows] == [r["id"] for r in stored]
    changed = 0
    for row, before in zip(rows, stored, strict=True):
        width, height = row["width"], row["height"]
        answer = json.loads(row["messages"][-1]["content"][0]["text"])
        pixels = [
            family.to_answer_box(o["bbox"], width, height, cfg.data.min_pixels, cfg.data.max_pixels)
            for o in row["objects"]
        ]
        assert [a["bbox_2d"] for a in answer] == pixels
        changed += row["messages"][-1] != before["messages"][-1]
    assert changed == sum(1 for r in rows if r["objects"])  # every answer with a box was rewritten


# ------------------------------------------------------------------------------------------------------
# The second family through the real jobs


def _job(module: str, args: list[str]) -> None:
    import importlib

    main = importlib.import_module(f"pcbvlm.commands.{module}").main
    with pytest.raises(SystemExit) as exit_info:
        cli.run_job(main, args)
    assert exit_info.value.code == 0


@pytest.mark.slow
def test_qwen2_5_vl_runs_data_train_merge_quantize_eval(tmp_path, clean_env):
    """`make data train merge quantize eval CONFIG=config/tiny-qwen2.5-vl.yaml` on non-square synthetic
    boards: the tiny model is built as a Qwen2.5-VL from its folder name, the data's answers are in
    resized pixels, the merged and quantized models are Qwen2.5-VLs, and the evaluation job scores the
    quantized one."""
    from pcbvlm.synth import Board, generate_dataset

    generate_dataset(tmp_path / "DeepPCB", 6, seed=5, board=Board(256, 160, scale=0.8, max_defects=2))
    model_dir = tmp_path / "models" / "tiny-qwen2.5-vl"
    sets = {
        "model.name_or_path": model_dir,
        "paths.data_dir": tmp_path / "data",
        "paths.runs_dir": tmp_path / "runs",
        "paths.outputs_dir": tmp_path / "outputs",
        "data.val_fraction": 0,
        "data.max_pixels": 16384,
        "data.min_pixels": 4096,
        "train.max_steps": 2,
        "train.micro_batch": 2,
        "train.save_steps": 1000,
        "eval.max_new_tokens": 24,
        "eval.worst_n": 0,
        "quantize.verify_samples": 1,
    }
    common = ["--config", str(QWEN25_CONFIG)] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]

    _job("prepare_data", [*common, "--deeppcb-dir", str(tmp_path / "DeepPCB")])
    rows = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    family = get_family("qwen2_5_vl")
    frame = family.answer_frame(256, 160, 4096, 16384)
    assert frame == (140, 84)  # 256x160 scaled into 16384 px, sides multiples of 28: 10x6 patches of 14 px
    for row in rows:
        answer = json.loads(row["messages"][-1]["content"][0]["text"])
        expected = [family.to_answer_box(o["bbox"], 256, 160, 4096, 16384) for o in row["objects"]]
        assert [a["bbox_2d"] for a in answer] == expected

    _job("train", [*common, "--resume", "no"])
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    (run,) = [p for p in (tmp_path / "runs").iterdir() if (p / "adapter").is_dir()]

    _job("merge", common)
    merged = tmp_path / "outputs" / "merged"
    assert json.loads((merged / "config.json").read_text())["model_type"] == "qwen2_5_vl"

    _job("quantize", common)  # AWQ with the family's mappings, one Qwen2_5_VLDecoderLayer at a time
    quantized = tmp_path / "outputs" / "quantized"
    report = json.loads((quantized / "quantize.json").read_text())
    assert report["scheme"]["sequential_target"] == "Qwen2_5_VLDecoderLayer"

    # The quantized folder loads through the int4 path as a Qwen2.5-VL and is scored.
    _job("evaluate", [*common, "--model", str(quantized), "--split", "test", "--out", str(tmp_path / "eval")])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    predictions = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 2 and metrics  # two test boards (every third of six), scored
