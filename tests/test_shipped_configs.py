"""Every shipped config file loads and holds what the jobs rely on: config/*.yaml through the typed config,
config/accelerate/*.yaml through accelerate's own loader, config/deepspeed/*.json as JSON with the keys the
Trainer integration fills in. A file added to these folders is checked without editing this test.
"""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import ROOT
from pcbvlm.config import load_config

JOB_CONFIGS = sorted((ROOT / "config").glob("*.yaml"))
ACCELERATE_PROFILES = sorted((ROOT / "config" / "accelerate").glob("*.yaml"))
DEEPSPEED_CONFIGS = sorted((ROOT / "config" / "deepspeed").glob("*.json"))
# Left to the Trainer (TrainingArguments) by the HF DeepSpeed integration: a fixed value here would
# contradict train.micro_batch / grad_accum / precision / max_grad_norm.
TRAINER_FILLED = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
)


def test_the_folders_hold_what_the_jobs_name():
    assert {p.name for p in JOB_CONFIGS} >= {"config.yaml", "tiny.yaml"}
    assert {p.stem for p in ACCELERATE_PROFILES} >= {"a800", "cpu", "cpu-multi", "ddp", "zero2", "zero3"}
    assert {p.stem for p in DEEPSPEED_CONFIGS} >= {"zero2", "zero3"}


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_config_loads_through_the_typed_config(path, clean_env):
    for var in ("DEEPPCB_DIR", "DATA_DIR", "RUNS_DIR", "OUTPUTS_DIR"):
        clean_env.delenv(var, raising=False)
    cfg = load_config(path)  # env references need defaults: a fresh clone has no .env
    profile = ROOT / "config" / "accelerate" / f"{cfg.train.accelerate_profile}.yaml"
    assert profile in ACCELERATE_PROFILES, f"{path.name}: train.accelerate_profile names no file"


@pytest.mark.parametrize("path", ACCELERATE_PROFILES, ids=lambda p: p.name)
def test_accelerate_profile_is_valid_for_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    cluster = load_config_from_file(str(path))  # raises on unknown keys and bad values
    raw = yaml.safe_load(path.read_text())
    assert isinstance(cluster.num_processes, int) and cluster.num_processes >= 1
    assert raw.get("mixed_precision", "no") in ("no", "bf16", "fp16")
    if cluster.distributed_type == DistributedType.DEEPSPEED:
        ds_file = cluster.deepspeed_config.get("deepspeed_config_file")
        assert ds_file, f"{path.name}: a DeepSpeed profile names its JSON"
        ds_path = ROOT / ds_file  # jobs are launched from the repository root
        assert ds_path in DEEPSPEED_CONFIGS, f"{path.name}: {ds_file} is not a shipped DeepSpeed config"
        stage = json.loads(ds_path.read_text())["zero_optimization"]["stage"]
        # ZeRO-3 must build the model sharded (modeling stores 4-bit weights in the compute dtype then).
        assert cluster.deepspeed_config.get("zero3_init_flag", False) == (stage == 3), path.name
    elif cluster.distributed_type == DistributedType.NO:
        assert cluster.num_processes == 1, path.name


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_config_leaves_batch_and_precision_to_the_trainer(path):
    config = json.loads(path.read_text())
    stage = config["zero_optimization"]["stage"]
    assert stage in (2, 3) and path.stem == f"zero{stage}"
    for key in TRAINER_FILLED:
        assert config[key] == "auto", f"{path.name}: {key}"
    for precision in ("bf16", "fp16"):
        assert config[precision]["enabled"] == "auto", f"{path.name}: {precision}.enabled"


def test_a_broken_profile_is_caught(tmp_path):
    """The accelerate check is not vacuous: a misspelt key fails it."""
    from accelerate.commands.config.config_args import load_config_from_file

    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "config" / "accelerate" / "cpu.yaml").read_text() + "num_proceses: 2\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_config_from_file(str(bad))


def _code_outside_the_schema() -> str:
    return "\n".join(
        p.read_text(encoding="utf-8")
        for p in (ROOT / "lib" / "pcbvlm").rglob("*.py")
        if p.name != "config.py"
    )


def test_every_config_key_is_read_by_some_job():
    """A key that no module reads decides nothing (a user who changes it changes nothing): each one is
    read as `<section>.<key>` (cfg.train.lr, data_cfg.split_seed, ...) outside the schema."""
    import re

    from pcbvlm.config import Config

    code = _code_outside_the_schema()
    unread = [
        f"{section}.{key}"
        for section, field in Config.model_fields.items()
        for key in field.annotation.model_fields
        if not re.search(rf"\b{section}(?:_cfg)?\.{key}\b", code)
    ]
    assert unread == []
