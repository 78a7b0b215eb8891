"""train.method: qlora | lora | full, checked before any work; full runs are recognised as runs."""

from __future__ import annotations

import json

import pytest

from pcbvlm.config import load_config
from pcbvlm.errors import ConfigError
from pcbvlm.runs import full_model_folder, is_complete_checkpoint, is_finished, write_checkpoint_marker


@pytest.mark.parametrize(
    ("config", "overrides", "method"),
    [
        ("config/config.yaml", [], "qlora"),
        ("config/tiny.yaml", [], "lora"),
        ("config/tiny.yaml", ["train.method=full"], "full"),
        ("config/memorise.yaml", [], "full"),
    ],
)
def test_methods(config, overrides, method):
    assert load_config(config, overrides).train.method == method


@pytest.mark.parametrize(
    ("config", "overrides", "message"),
    [
        ("config/config.yaml", ["train.method=full"], "method full trains on an unquantized base"),
        ("config/config.yaml", ["train.method=lora"], "method lora trains on an unquantized base"),
        ("config/tiny.yaml", ["train.method=qlora"], "method qlora trains adapters on an NF4 base"),
        (
            "config/tiny.yaml",
            ["train.method=adapter"],
            "train.method: input should be 'qlora', 'lora' or 'full'",
        ),
    ],
)
def test_a_method_that_does_not_fit_the_quantization_is_refused(config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config, overrides)


def test_checkpoints_and_finished_runs_of_both_kinds(tmp_path):
    import torch
    from safetensors.torch import save_file

    for weights in ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json"):
        checkpoint = tmp_path / weights / "checkpoint-4"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
        for name in ("optimizer.pt", "scheduler.pt"):
            torch.save({"step": 4}, checkpoint / name)
        write_checkpoint_marker(checkpoint, 4)
        assert not is_complete_checkpoint(checkpoint)  # no weights: the save was cut short
        if weights.endswith(".json"):
            (checkpoint / weights).write_text(json.dumps({"weight_map": {}}))
        else:
            save_file({"w": torch.zeros(4)}, checkpoint / weights)
        write_checkpoint_marker(checkpoint, 4)
        assert is_complete_checkpoint(checkpoint)

    adapter_run, full_run = tmp_path / "run-lora", tmp_path / "run-full"
    (adapter_run / "adapter").mkdir(parents=True)
    (full_run / "model").mkdir(parents=True)
    assert not is_finished(adapter_run) and not is_finished(full_run)
    (adapter_run / "adapter" / "adapter_config.json").write_text("{}")
    (full_run / "model" / "config.json").write_text("{}")
    assert is_finished(adapter_run) and is_finished(full_run)
    assert full_model_folder(full_run) == full_run / "model" == full_model_folder(full_run / "model")
    assert full_model_folder(adapter_run) is None


def test_preflight_counts_the_states_of_full_training():
    """A full run holds a gradient and two AdamW moments for every parameter, not for an adapter."""
    from pcbvlm.preflight.estimate import estimate_train_vram
    from pcbvlm.shapes import qwen3_vl_32b_config

    def estimate(method: str) -> float:
        cfg = load_config("config/config.yaml", [f"train.method={method}", "train.quantization=none"])
        return estimate_train_vram(qwen3_vl_32b_config(), cfg).total_bytes

    # 33.4 B parameters x (2 B bf16 gradient + 8 B moments) = 334 GB more than LoRA's few GB of states.
    assert estimate("full") - estimate("lora") > 300e9
