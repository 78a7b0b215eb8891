"""`make quantize` on the tiny model (CPU): AWQ W4A16 in compressed-tensors format, language-model linears
packed to int4 and nothing else, the result reloads, generates and stays close to the merged model, and
unfinished or wrong inputs are refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import Qwen3VLForConditionalGeneration

from pcbvlm import cli
from pcbvlm.collator import TrainCollator
from pcbvlm.deeppcb import load_samples
from pcbvlm.errors import EXIT_FAILED, UserError
from pcbvlm.io import PARTIAL_MARK
from pcbvlm.merge import merge_adapter
from pcbvlm.processing import load_processor
from pcbvlm.quantize import QUANTIZE_REPORT, generation_inputs
from test_merge import make_adapter, set_flags, tiny_cfg

GROUP_SIZE = 32  # config/tiny.yaml: the tiny model's widths are 64 and 128
LM_LINEAR = re.compile(
    r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$"
)
# Bounds on the quantized tiny model's logits against the merged model's (fp32, the val sample).
# Symmetric int4 in groups of 32 rounds each weight to a step of absmax/7 ~ 0.3 sigma for Gaussian
# weights, an RMS error of step/sqrt(12) ~ 9% of each weight; the random tiny model has no outlier
# channels for AWQ to protect, and measures 13-16% RMS logit error and 71-85% top-1 agreement (two
# adapter seeds). The bounds leave ~2.5x on the RMS and 30 points on top-1; a wrong packing or scale
# gives uncorrelated logits (~140% RMS, top-1 near 1/457).
MAX_REL_RMS = 0.4
MIN_TOP1 = 0.4


def quantize_cli(*args: str, capsys) -> tuple[int, str, str]:
    from pcbvlm.commands.quantize import main

    with pytest.raises(SystemExit) as exit_info:
        cli.run_job(main, list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def cfg(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    return tiny_cfg(tiny_model_dir, tiny_data_dir, tmp_path_factory.mktemp("quantize"))


@pytest.fixture(scope="module")
def merged(cfg):
    """The output of `make merge`: <outputs_dir>/merged."""
    adapter = make_adapter(cfg, Path(cfg.paths.runs_dir) / "20260101-000000-0ddba11" / "adapter", seed=1)
    return merge_adapter(cfg, adapter).out_dir


@pytest.fixture(scope="module")
def quantized(cfg, merged):
    """`make quantize` with the defaults: <outputs_dir>/merged -> <outputs_dir>/quantized."""
    with pytest.MonkeyPatch.context() as patch:
        for var in ("SET", "CONFIG"):
            patch.delenv(var, raising=False)
        from pcbvlm.commands.quantize import main

        with pytest.raises(SystemExit) as exit_info:
            cli.run_job(main, set_flags(cfg))
    assert exit_info.value.code == 0
    return Path(cfg.paths.outputs_dir) / "quantized"


def tensors(folder: Path) -> dict[str, tuple[torch.dtype, list[int]]]:
    found = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = f.get_tensor(key)
                found[key] = (tensor.dtype, list(tensor.shape))
    return found


def test_language_model_linears_are_packed_int4_and_nothing_else(quantized, merged):
    config = json.loads((quantized / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors"
    assert qcfg["format"] == "pack-quantized"
    (group,) = qcfg["config_groups"].values()
    assert group["weights"]["num_bits"] == 4 and group["weights"]["type"] == "int"
    assert group["weights"]["strategy"] == "group" and group["weights"]["group_size"] == GROUP_SIZE
    assert group["input_activations"] is None  # W4A16: activations stay in the model dtype

    before = tensors(merged)
    after = tensors(quantized)
    linears = {k.removesuffix(".weight"): shape for k, (_, shape) in before.items() if k.endswith(".weight")}
    lm = sorted(name for name in linears if LM_LINEAR.match(name))
    assert len(lm) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    for name in lm:
        out_features, in_features = linears[name]
        assert after[f"{name}.weight_packed"] == (torch.int32, [out_features, in_features // 8])
        assert after[f"{name}.weight_scale"][1] == [out_features, in_features // GROUP_SIZE]
        assert f"{name}.weight" not in after
    # The vision tower (blocks, mergers) and lm_head keep their plain weights.
    kept = [name for name in linears if name not in lm and (".visual." in name or name == "lm_head")]
    assert "lm_head" in kept and any("visual.merger" in name for name in kept)
    for name in kept:
        assert after[f"{name}.weight"] == before[f"{name}.weight"]
        assert f"{name}.weight_packed" not in after
    assert not [k for k in after if k.endswith("weight_packed") and ".visual." in k]

    for name in (
        "tokenizer_config.json",
        "preprocessor_config.json",
        "generation_config.json",
        "recipe.yaml",
    ):
        assert (quantized / name).is_file(), name
    assert "AWQModifier:" in (quantized / "recipe.yaml").read_text()


def test_quantized_model_reloads_generates_and_stays_close(quantized, merged, cfg, tiny_data_dir):
    samples = load_samples(tiny_data_dir, "val")[:2]
    processor = load_processor(quantized)
    batch = TrainCollator(processor)(samples)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    mask = batch["attention_mask"].bool()
    reference = Qwen3VLForConditionalGeneration.from_pretrained(merged, dtype=torch.float32).eval()
    model = Qwen3VLForConditionalGeneration.from_pretrained(quantized, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(**inputs).logits[mask]
        got = model(**inputs).logits[mask]
    rel_rms = ((got - expected).square().mean().sqrt() / expected.square().mean().sqrt()).item()
    top1 = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert 0 < rel_rms < MAX_REL_RMS
    assert top1 > MIN_TOP1

    prompts = generation_inputs(processor, samples, cfg)
    out = model.generate(**prompts, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert out.shape[1] == prompts["input_ids"].shape[1] + 8

    report = json.loads((quantized / QUANTIZE_REPORT).read_text())
    assert report["verified"] is True
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert report["scheme"]["group_size"] == GROUP_SIZE
    assert report["calibration"]["samples"] == min(
        cfg.quantize.num_calibration_samples, 10
    )  # 10 train samples
    assert report["size_bytes"] < report["source_size_bytes"]
    assert report["logits"]["rel_rms_diff"] == pytest.approx(rel_rms, rel=1e-3)
    assert report["agreement"]["samples"] == len(samples)
    assert {"merged", "quantized", "same_boxes"} <= set(report["agreement"]["per_sample"][0])


def test_quantize_json_records_the_merge_it_was_made_from(quantized, merged):
    merge = json.loads((merged / "merge.json").read_text())
    report = json.loads((quantized / QUANTIZE_REPORT).read_text())
    assert report["source"] == str(merged)
    assert report["source_id"] == merge["id"] and merge["id"]
    assert report["run"] == merge["run"] == "20260101-000000-0ddba11"
    assert report["adapter_sha256"] == merge["adapter_sha256"] and len(merge["adapter_sha256"]) == 64


@pytest.mark.parametrize("case", ["partial", "no config", "missing", "already quantized"])
def test_bad_inputs_are_refused_in_one_line(case, cfg, merged, quantized, tmp_path, capsys, clean_env):
    if case == "partial":
        model = tmp_path / f"merged{PARTIAL_MARK}4242"
        shutil.copytree(merged, model)
        expected = "unfinished folder"
    elif case == "no config":
        model = tmp_path / "merged"
        shutil.copytree(merged, model)
        (model / "config.json").unlink()
        expected = "no config.json"
    elif case == "missing":
        model = tmp_path / "nowhere"
        expected = "no such folder"
    else:
        model = quantized
        expected = "already quantized (compressed-tensors)"
    out = tmp_path / "out"
    code, _, stderr = quantize_cli(*set_flags(cfg), "--model", str(model), "--out", str(out), capsys=capsys)
    assert code == EXIT_FAILED
    assert stderr.count("\n") == 1 and expected in stderr
    assert not out.exists() and not list(tmp_path.glob(f"out{PARTIAL_MARK}*"))


def test_killed_merge_leaves_nothing_that_passes_for_a_merged_model(cfg, merged, tmp_path, capsys, clean_env):
    """SIGKILL while the merge writes its folder: only `<out>.partial-<pid>` remains, and quantize refuses
    both that folder and the absent default."""
    outputs = tmp_path / "outputs"
    adapter = next(Path(cfg.paths.runs_dir).glob("*/adapter"))
    env = {k: v for k, v in os.environ.items() if k not in ("SET", "CONFIG")}
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pcbvlm",
            "merge",
            *set_flags(cfg),
            "--set",
            f"paths.outputs_dir={outputs}",
        ]
        + ["--adapter", str(adapter)],
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    partial = None
    deadline = time.monotonic() + 120
    while partial is None and job.poll() is None and time.monotonic() < deadline:
        partial = next(iter(outputs.glob(f"merged{PARTIAL_MARK}*")), None)
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert partial is not None, "the merge job ended before it started writing"
    assert job.returncode == -signal.SIGKILL
    assert not (outputs / "merged").exists()
    assert partial.is_dir()

    flags = [*set_flags(cfg), "--set", f"paths.outputs_dir={outputs}"]
    code, _, stderr = quantize_cli(*flags, capsys=capsys)
    assert code == EXIT_FAILED and "no such folder (run `make merge` first" in stderr
    code, _, stderr = quantize_cli(*flags, "--model", str(partial), capsys=capsys)
    assert code == EXIT_FAILED and "unfinished folder" in stderr
    assert not (outputs / "quantized").exists()


def test_failed_quantize_publishes_nothing(cfg, merged, quantized, tmp_path, monkeypatch):
    import pcbvlm.quantize as quantize

    before = {p.name: p.read_bytes() for p in quantized.iterdir()}

    # An exception in the middle of the save (weights written, processor files not yet).
    def broken_save(*args, **kwargs):
        raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(quantize, "save_processor", broken_save)
        with pytest.raises(OSError, match="No space left"):
            quantize.quantize_model(cfg, merged, quantized)
    assert {p.name: p.read_bytes() for p in quantized.iterdir()} == before  # the last good output

    # A quantized model that fails the sanity bound on its logits is not published.
    monkeypatch.setattr(quantize, "MAX_REL_RMS_DIFF", 0.0)
    with pytest.raises(UserError, match="quantize verification failed"):
        quantize.quantize_model(cfg, merged, tmp_path / "quantized")
    assert not (tmp_path / "quantized").exists()
    assert not list(quantized.parent.glob(f"quantized{PARTIAL_MARK}*"))
    assert not list(tmp_path.glob(f"*{PARTIAL_MARK}*"))
