"""Generation on the tiny model: token probabilities, offsets, and the eval / infer jobs end to end."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, run_job
from pcbvlm.config import load_config
from pcbvlm.deeppcb import build_messages, load_samples
from pcbvlm.generate import ChosenTokenProbability, _token_offsets, load_for_inference, resolve_model_ref

TINY = ROOT / "config" / "tiny.yaml"


@pytest.fixture(scope="module")
def cfg(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    return load_config(
        TINY,
        [
            f"model.name_or_path={tiny_model_dir}",
            f"paths.data_dir={tiny_data_dir}",
            f"paths.outputs_dir={out}",
            f"paths.runs_dir={out / 'runs'}",
            "data.max_pixels=16384",
            "data.min_pixels=4096",
        ],
    )


def test_recorded_probabilities_equal_transition_scores(cfg, tiny_data_dir):
    """The per-step recorder gives what transformers' compute_transition_scores gives for greedy output."""
    from transformers import LogitsProcessorList

    loaded = load_for_inference(cfg, "base")
    samples = load_samples(tiny_data_dir, "test")[:2]
    texts = [
        loaded.processor.apply_chat_template(
            build_messages(s, cfg.data, with_answer=False), tokenize=False, add_generation_prompt=True
        )
        for s in samples
    ]
    from pcbvlm.collator import load_image

    inputs = loaded.processor(
        text=texts, images=[load_image(s["image"]) for s in samples], padding=True, return_tensors="pt"
    )
    recorder = ChosenTokenProbability()
    out = loaded.model.generate(
        **inputs,
        max_new_tokens=12,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        logits_processor=LogitsProcessorList([recorder]),
    )
    reference = loaded.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).exp()
    recorded = recorder.probabilities()
    # Compare up to each sequence's end: after it, generate pads whatever the scores say (and
    # generate_batch drops those positions).
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    stops = {
        loaded.processor.tokenizer.pad_token_id,
        loaded.processor.tokenizer.convert_tokens_to_ids("<|im_end|>"),
    }
    for row in range(new.shape[0]):
        ids = new[row].tolist()
        end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        assert end > 0
        torch.testing.assert_close(recorded[row, :end], reference[row, :end], rtol=1e-5, atol=1e-6)


def test_token_offsets_cover_the_text(cfg):
    tok = load_for_inference(cfg, "base").processor.tokenizer
    text = '[{"bbox_2d": [12, 345, 678, 901], "label": "pin-hole"}]'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    decoded, offsets = _token_offsets(tok, ids)
    assert decoded == text
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(offsets, offsets[1:], strict=False))
    assert "".join(text[a:b] for a, b in offsets) == text


def test_resolve_model_ref_shortcuts(cfg, tmp_path):
    outputs = cfg.paths.outputs_dir
    assert resolve_model_ref(cfg, "merged") == str(outputs / "merged")
    assert resolve_model_ref(cfg, "base") == cfg.model.name_or_path
    assert resolve_model_ref(cfg, None) == cfg.model.name_or_path  # nothing trained yet: the base
    (outputs / "merged").mkdir(parents=True, exist_ok=True)
    (outputs / "merged" / "config.json").write_text("{}")
    assert resolve_model_ref(cfg, "auto") == str(outputs / "merged")


def test_eval_and_infer_jobs_on_the_tiny_model(cfg, tiny_model_dir, tiny_data_dir, tmp_path):
    sets = [
        f"--set=model.name_or_path={tiny_model_dir}",
        f"--set=paths.data_dir={tiny_data_dir}",
        "--set=data.max_pixels=16384",
        "--set=data.min_pixels=4096",
        "--set=eval.max_new_tokens=24",
        "--set=eval.batch_size=3",
    ]
    out = tmp_path / "eval"
    proc = run_job("eval", "--config", str(TINY), *sets, "--model", "base", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("metrics.json", "report.md", "pr_curve.png", "predictions.jsonl", "config.resolved.yaml"):
        assert (out / name).is_file(), name
    assert list((out / "overlays").glob("*.png"))
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(load_samples(tiny_data_dir, "test"))
    assert all(p["raw"] for p in predictions)  # the random model writes something, parsed or not
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images_per_s"] > 0
    # The rate is the share of answers the parser gave up on, counted from what was written.
    failed = sum(p["error"] is not None for p in predictions)
    assert metrics["parse_failure_rate"] == pytest.approx(failed / len(predictions))
    assert metrics["counts"]["images"] == len(predictions)

    image = load_samples(tiny_data_dir, "test")[0]["image"]
    overlay = tmp_path / "overlay.png"
    proc = run_job(
        "infer", "--config", str(TINY), *sets, "--model", "base", "--image", image, "--out", str(overlay)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert result["width"] == 640 and result["overlay"] == str(overlay)
    assert overlay.stat().st_size > 1000
    # The boxes are printed before the overlay is written: an overlay that cannot be written costs only itself.
    blocked = tmp_path / "a-file" / "overlay.png"
    blocked.parent.write_text("")
    proc = run_job(
        "infer", "--config", str(TINY), *sets, "--model", "base", "--image", image, "--out", str(blocked)
    )
    assert proc.returncode == 1
    assert json.loads(proc.stdout[proc.stdout.index("{") :])["objects"] == result["objects"]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {blocked}: could not write the overlay (")
    assert "Traceback" not in proc.stderr
    missing = run_job("infer", "--config", str(TINY), *sets, "--image", str(tmp_path / "nope.jpg"))
    assert (
        missing.returncode == 2 and missing.stderr.strip() == f"error: {tmp_path / 'nope.jpg'}: no such image"
    )
