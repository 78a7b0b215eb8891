"""Shared fixtures. Tests run offline on the CPU (the Makefile sets OMP_NUM_THREADS=1, HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The shared DeepPCB copy: ../shared/deeppcb beside the checkout, or $DEEPPCB_SHARED.
SHARED_DEEPPCB = Path(os.environ.get("DEEPPCB_SHARED", ROOT.parent / "shared" / "deeppcb"))


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def clean_env(monkeypatch):
    """No SET / CONFIG leaking in from the caller's environment."""
    for var in ("SET", "CONFIG"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def run_job(command: str, *args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600):
    """Run `python -m pcbvlm <command>` like the Makefile does (a dotted name: `python -m <module>`, e.g.
    pcbvlm.commands.train, one training process without the launcher); return the CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("SET", "CONFIG")}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    if command.endswith(".py"):  # a shim's file name, as older tests name jobs
        target = [str(ROOT / "jobs" / command)]
    else:
        target = ["-m", command] if "." in command else ["-m", "pcbvlm", command]
    return subprocess.run(
        [sys.executable, *target, *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny random Qwen3-VL, built once per test session."""
    from pcbvlm.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3-vl")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """Synthetic boards in the DeepPCB layout, converted like `make data` does (train/val/test jsonl)."""
    from pcbvlm.config import load_config
    from pcbvlm.deeppcb import prepare_data
    from pcbvlm.synth import generate_dataset

    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root / "DeepPCB", 16, seed=3)
    cfg = load_config(ROOT / "config" / "tiny.yaml")
    prepare_data(cfg, deeppcb_dir=root / "DeepPCB", out_dir=root / "converted", progress=False)
    return root / "converted"


def make_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    """A checkpoint whose files load like the Trainer's (safetensors, torch zip archives, JSON); `complete`
    writes the completion marker last, as the training callback does."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(250)}, folder / "adapter_model.safetensors")
    torch.save({"state": {0: torch.ones(500)}}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        from pcbvlm.runs import write_checkpoint_marker

        write_checkpoint_marker(folder, step)
    return folder


def tiny_overrides(model_dir: Path, data_dir: Path, runs_dir: Path, **train) -> list[str]:
    """--set flags for a fast tiny training run (small images, micro-batch 2)."""
    values = {
        "model.name_or_path": model_dir,
        "paths.data_dir": data_dir,
        "paths.runs_dir": runs_dir,
        "data.max_pixels": 16384,
        "data.min_pixels": 4096,
        "train.micro_batch": 2,
        "train.logging_steps": 1,
        **{f"train.{k}": v for k, v in train.items()},
    }
    args: list[str] = []
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    return args


def tiny_lora_model(cfg, device: str = "cpu", **lora):
    """The tiny model in fp32 with LoRA (`pcbvlm.modeling.apply_lora(**lora)`) and non-zero LoRA B, so that
    gradients reach A too; returns (base model, peft model)."""
    import torch

    from pcbvlm.modeling import apply_lora, load_base_model

    torch.manual_seed(0)
    model = load_base_model(cfg, device=device, dtype=torch.float32)
    peft_model = apply_lora(model, cfg, **lora)
    for module in peft_model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.02)
    return model, peft_model


def train_tiny(model_dir: Path, data_dir: Path, runs_dir: Path, **train):
    """The training job on the tiny config (`tiny_overrides`, a few steps, no saves or evaluations on
    the way); returns the CompletedProcess after checking that it succeeded."""
    flags = dict(save_steps=100, eval_steps=100) | train
    proc = run_job(
        "pcbvlm.commands.train",
        "--config",
        str(ROOT / "config" / "tiny.yaml"),
        *tiny_overrides(model_dir, data_dir, runs_dir, **flags),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def tiny_train_cfg(tiny_model_dir, tiny_data_dir):
    """The tiny config on the session's tiny model and data, with small images (fast CPU steps)."""
    from pcbvlm.config import load_config

    return load_config(
        ROOT / "config" / "tiny.yaml",
        [
            f"model.name_or_path={tiny_model_dir}",
            f"paths.data_dir={tiny_data_dir}",
            "data.max_pixels=16384",
            "data.min_pixels=4096",
        ],
    )


@pytest.fixture(scope="module")
def tiny_processor(tiny_train_cfg):
    from pcbvlm.processing import load_processor

    cfg = tiny_train_cfg
    return load_processor(cfg.model.name_or_path, cfg.data.min_pixels, cfg.data.max_pixels)
