"""`make merge` on the tiny model (CPU, fp32): the merged model equals base + adapter, a quantized base
is refused, and a failed or interrupted merge publishes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import Qwen3VLForConditionalGeneration

from conftest import ROOT
from pcbvlm import cli
from pcbvlm.collator import TrainCollator
from pcbvlm.config import load_config
from pcbvlm.deeppcb import load_samples
from pcbvlm.errors import EXIT_FAILED, UserError
from pcbvlm.io import PARTIAL_MARK
from pcbvlm.merge import MERGE_REPORT, merge_adapter, resolve_adapter
from pcbvlm.modeling import apply_lora, load_base_model
from pcbvlm.processing import load_processor

TINY = ROOT / "config" / "tiny.yaml"
# fp32 merge: x @ (W + s B A) and x @ W + s (x @ A) @ B differ only by rounding order (~1e-7 here).
FP32_REL_TOL = 1e-4


def tiny_cfg(model_dir: Path, data_dir: Path, tmp: Path, **extra: object):
    overrides = {
        "model.name_or_path": model_dir,
        "paths.data_dir": data_dir,
        "paths.runs_dir": tmp / "runs",
        "paths.outputs_dir": tmp / "outputs",
        "data.max_pixels": 16384,
        "data.min_pixels": 4096,
        "quantize.verify_samples": 2,
        # On a CPU-only host (CI) auto is the CPU; on a GPU host the job's GPU path runs instead.
        "quantize.device": "auto",
        **extra,
    }
    return load_config(TINY, [f"{k}={v}" for k, v in overrides.items()])


def make_adapter(cfg, adapter_dir: Path, seed: int = 0) -> Path:
    """A LoRA adapter whose B matrices are random (peft starts them at zero): it changes the logits."""
    torch.manual_seed(seed)
    model = apply_lora(load_base_model(cfg, quantization="none"), cfg, gradient_checkpointing=False)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.05)
    model.save_pretrained(adapter_dir)
    return adapter_dir


def merge_cli(*args: str, capsys) -> tuple[int, str, str]:
    from pcbvlm.commands.merge import main

    with pytest.raises(SystemExit) as exit_info:
        cli.run_job(main, list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def set_flags(cfg) -> list[str]:
    """The --set flags that reproduce `cfg`'s paths and sizes on the command line."""
    keys = {
        "model.name_or_path": cfg.model.name_or_path,
        "paths.data_dir": cfg.paths.data_dir,
        "paths.runs_dir": cfg.paths.runs_dir,
        "paths.outputs_dir": cfg.paths.outputs_dir,
        "data.max_pixels": cfg.data.max_pixels,
        "data.min_pixels": cfg.data.min_pixels,
        "quantize.verify_samples": cfg.quantize.verify_samples,
        "quantize.device": cfg.quantize.device,
    }
    args = ["--config", str(TINY)]
    for key, value in keys.items():
        args += ["--set", f"{key}={value}"]
    return args


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("merge")


@pytest.fixture(scope="module")
def cfg(tiny_model_dir, tiny_data_dir, workspace):
    return tiny_cfg(tiny_model_dir, tiny_data_dir, workspace)


@pytest.fixture(scope="module")
def run_dir(cfg):
    """A finished training run: <runs_dir>/<stamp>-<id>/adapter/."""
    run = Path(cfg.paths.runs_dir) / "20260101-000000-feedc0ffee"
    make_adapter(cfg, run / "adapter")
    return run


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return out[batch["attention_mask"].bool()]


def test_merged_model_matches_base_plus_adapter(cfg, run_dir, tiny_data_dir, tmp_path, capsys, clean_env):
    out = tmp_path / "merged"
    code, stdout, stderr = merge_cli(
        *set_flags(cfg), "--adapter", str(run_dir), "--out", str(out), capsys=capsys
    )
    assert code == 0, stderr
    assert "merge: verified" in stdout

    # Recomputed here, independently of the job: base + adapter (unmerged, peft) against the saved folder.
    processor = load_processor(cfg.model.name_or_path, cfg.data.min_pixels, cfg.data.max_pixels)
    batch = TrainCollator(processor)(load_samples(tiny_data_dir, "val")[:2])
    base = Qwen3VLForConditionalGeneration.from_pretrained(cfg.model.name_or_path, dtype=torch.float32).eval()
    base_logits = logits_of(base, batch)
    with_adapter = logits_of(PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval(), batch)
    merged = Qwen3VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    merged_logits = logits_of(merged, batch)
    scale = with_adapter.abs().max()
    assert (merged_logits - with_adapter).abs().max() / scale < FP32_REL_TOL
    # The adapter really is in the weights: without it the logits are far off.
    assert (base_logits - with_adapter).abs().max() / scale > 100 * FP32_REL_TOL
    assert not any(n for n, _ in merged.named_parameters() if "lora" in n)

    # A plain model folder: safetensors, no quantization, the base's settings, processor files.
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config.get("use_cache") is None  # the training-time use_cache=false is not published
    assert config["dtype"] == "float32"  # the tiny config's train.precision
    assert list(out.glob("*.safetensors"))
    assert (out / "generation_config.json").is_file()
    reloaded = load_processor(out)
    messages = load_samples(tiny_data_dir, "val")[0]["messages"]
    assert reloaded.apply_chat_template(messages, tokenize=False) == processor.apply_chat_template(
        messages, tokenize=False
    )
    # The image size range trained with is what a server of this folder will resize to.
    saved = json.loads((out / "preprocessor_config.json").read_text())
    assert saved["size"] == {"longest_edge": cfg.data.max_pixels, "shortest_edge": cfg.data.min_pixels}

    report = json.loads((out / MERGE_REPORT).read_text())
    assert report["adapter"] == str(run_dir / "adapter")
    assert report["base"] == str(cfg.model.name_or_path)
    assert report["dtype"] == "float32" and report["verified"] is True
    assert report["diff"]["rel_max_diff"] <= report["tolerance"] == FP32_REL_TOL
    assert report["size_bytes"] > 0 and report["seconds"] > 0
    assert not list(tmp_path.glob(f"merged{PARTIAL_MARK}*"))


def test_adapter_is_the_newest_finished_run_or_the_given_folder(cfg, run_dir, tmp_path):
    runs = tmp_path / "runs"
    older = make_fake_run(runs / "20250101-000000-aaaa")
    newer = make_fake_run(runs / "20250202-000000-bbbb")
    (runs / "20250303-000000-cccc" / "checkpoint-2").mkdir(parents=True)  # unfinished: no adapter/
    cfg = cfg.model_copy(deep=True)
    cfg.paths.runs_dir = runs
    assert resolve_adapter(cfg) == newer / "adapter"
    assert resolve_adapter(cfg, older) == older / "adapter"
    assert resolve_adapter(cfg, older / "adapter") == older / "adapter"

    cfg.paths.runs_dir = tmp_path / "no-runs"
    with pytest.raises(UserError, match="no finished training run"):
        resolve_adapter(cfg)
    with pytest.raises(UserError, match="no such folder"):
        resolve_adapter(cfg, tmp_path / "missing")
    with pytest.raises(UserError, match="neither an adapter folder"):
        resolve_adapter(cfg, runs / "20250303-000000-cccc")
    partial = runs / f"adapter{PARTIAL_MARK}123"
    shutil.copytree(newer / "adapter", partial)
    with pytest.raises(UserError, match="unfinished"):
        resolve_adapter(cfg, partial)


def make_fake_run(run: Path) -> Path:
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    return run


@pytest.mark.parametrize(
    ("quantization_config", "named"),
    [
        (
            {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
            "bitsandbytes 4-bit",
        ),
        (
            {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}},
            "compressed-tensors",
        ),
    ],
)
def test_merging_into_a_quantized_base_is_refused(
    cfg, run_dir, tmp_path, capsys, clean_env, quantization_config, named
):
    base = tmp_path / "base-4bit"
    shutil.copytree(cfg.model.name_or_path, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (base / "config.json").write_text(json.dumps(config))
    quantized_cfg = cfg.model_copy(deep=True)
    quantized_cfg.model.name_or_path = str(base)
    quantized_cfg.paths.outputs_dir = tmp_path / "outputs"

    code, stdout, stderr = merge_cli(*set_flags(quantized_cfg), "--adapter", str(run_dir), capsys=capsys)
    assert code == EXIT_FAILED
    assert stderr.count("\n") == 1 and stderr.startswith("error: ")
    assert f"is quantized ({named})" in stderr
    assert not (tmp_path / "outputs").exists()  # nothing written, not even a partial folder


def test_failed_or_interrupted_merge_publishes_nothing(cfg, run_dir, tmp_path, monkeypatch):
    import pcbvlm.merge as merge

    previous = tmp_path / "previous"
    merge_adapter(cfg, run_dir, previous)
    before = {p.name: p.read_bytes() for p in previous.iterdir()}

    # An exception in the middle of the save (the weights are written, the processor files not yet).
    def broken_save(*args, **kwargs):
        raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(merge, "save_processor", broken_save)
        for target in (tmp_path / "fresh", previous):
            with pytest.raises(OSError, match="No space left"):
                merge_adapter(cfg, run_dir, target)
    assert not (tmp_path / "fresh").exists()
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before  # the last good output, untouched

    # A verification that fails publishes nothing either.
    monkeypatch.setattr(merge, "MERGE_TOLERANCE", {torch.float32: 0.0})
    with pytest.raises(UserError, match="merge verification failed"):
        merge_adapter(cfg, run_dir, tmp_path / "unverified")
    assert not (tmp_path / "unverified").exists()
    assert not list(tmp_path.glob(f"*{PARTIAL_MARK}*"))


def test_bf16_merge_passes_its_tolerance_and_a_lost_adapter_does_not(cfg, run_dir, tmp_path, monkeypatch):
    """The bf16 bound (0.1 of the logit scale) is what a real merge runs under: a correct bf16 merge
    lands between the fp32 bound and it, and a merge that drops the adapter lands above it."""
    from peft.tuners.tuners_utils import BaseTuner

    bf16 = cfg.model_copy(deep=True)
    bf16.train.precision = "bf16"
    report = json.loads((merge_adapter(bf16, run_dir, tmp_path / "bf16").out_dir / MERGE_REPORT).read_text())
    assert report["dtype"] == "bfloat16" and report["tolerance"] == 0.1 and report["verified"] is True
    # bf16 rounding shows (the fp32 bound would refuse this good merge), well inside the bf16 bound.
    assert FP32_REL_TOL < report["diff"]["rel_max_diff"] <= 0.1
    assert report["adapter_effect"]["rel_max_diff"] > 0.1  # the adapter moves the logits beyond the bound

    # A merge that loses the adapter (unload instead of merge_and_unload) fails verification in bf16.
    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, *a, **k: self.unload())
    with pytest.raises(UserError, match=r"merge verification failed: .* above the 0.1 allowed for bfloat16"):
        merge_adapter(bf16, run_dir, tmp_path / "lost")
    assert not (tmp_path / "lost").exists()
