"""The typed config: defaults, overrides, env references, and the one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from pcbvlm.config import Config, load_config, parse_overrides, write_resolved
from pcbvlm.errors import EXIT_BAD_INPUT, ConfigError


def test_production_default_loads(repo_root, clean_env):
    cfg = load_config(repo_root / "config" / "config.yaml")
    assert cfg.model.name_or_path == "Qwen/Qwen3-VL-32B-Instruct"
    assert cfg.train.quantization == "nf4"
    assert cfg.data.exclude_ids == ["44000020"]
    assert cfg.quantize.ignore == ["re:.*visual.*", "re:.*lm_head"]


def test_production_yaml_spells_out_every_key(repo_root):
    """config.yaml documents the whole schema: every section and key appears in it."""
    raw = yaml.safe_load((repo_root / "config" / "config.yaml").read_text())
    for section, model in Config.model_fields.items():
        assert section in raw, section
        assert set(raw[section]) == set(model.annotation.model_fields), section


def test_tiny_extends_production(repo_root, clean_env):
    cfg = load_config(repo_root / "config" / "tiny.yaml")
    assert cfg.resources.allow_cpu is True
    assert cfg.train.quantization == "none"
    # inherited from config.yaml
    assert cfg.lora.target_modules[0] == "q_proj"


def test_env_reference_filled(repo_root, clean_env):
    clean_env.setenv("DEEPPCB_DIR", "/mnt/pcb")
    cfg = load_config(repo_root / "config" / "config.yaml")
    assert str(cfg.paths.deeppcb_dir) == "/mnt/pcb"
    clean_env.delenv("DEEPPCB_DIR")
    assert str(load_config(repo_root / "config" / "config.yaml").paths.deeppcb_dir) == "data/raw/DeepPCB"


def test_overrides_apply_with_types(repo_root, clean_env):
    cfg = load_config(
        repo_root / "config" / "config.yaml", "train.lr=1e-4 data.max_pixels=262144 train.micro_batch=2"
    )
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.max_pixels == 262144
    assert cfg.train.micro_batch == 2
    cfg = load_config(repo_root / "config" / "config.yaml", ["lora.target_modules=[q_proj, v_proj]"])
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr=fast", "train.lr: input should be a valid number"),
        ("train.lrr=1", "train.lrr: unknown key"),
        ("trian.lr=1", "trian: unknown key"),
        ("train.micro_batch=0", "train.micro_batch: input should be greater than 0"),
        ("train.quantization=int3", "train.quantization: input should be 'nf4' or 'none'"),
        ("data.min_pixels=999999999", "data: min_pixels (999999999) must not exceed max_pixels"),
        ("lr=1", "expected section.key=value"),
    ],
)
def test_bad_values_name_the_key(repo_root, clean_env, override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(repo_root / "config" / "config.yaml", [override])
    assert expected in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == EXIT_BAD_INPUT


def test_bad_value_in_file_names_key_and_file(tmp_path, clean_env):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"train.lr: input should be a valid number.*got 'fast'.*bad.yaml"):
        load_config(path)
    path.write_text("model:\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"model.colour: unknown key"):
        load_config(path)
    path.write_text("train:\n  lr: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_missing_env_without_default_is_named(tmp_path, clean_env):
    clean_env.delenv("PCBVLM_UNSET_VAR", raising=False)
    path = tmp_path / "env.yaml"
    path.write_text("paths:\n  data_dir: ${PCBVLM_UNSET_VAR}\n")
    with pytest.raises(ConfigError, match="paths.data_dir: environment variable PCBVLM_UNSET_VAR is not set"):
        load_config(path)


def test_parse_overrides_scalars():
    assert parse_overrides("a.b=1 a.c=true a.d=x a.e=1e-4") == [
        ("a.b", 1),
        ("a.c", True),
        ("a.d", "x"),
        ("a.e", 1e-4),
    ]


def test_resolved_config_written_and_reloadable(repo_root, tmp_path, clean_env):
    cfg = load_config(repo_root / "config" / "tiny.yaml", ["train.lr=0.5"])
    path = write_resolved(cfg, tmp_path)
    again = load_config(path)
    assert again == cfg
    assert again.digest() == cfg.digest()


def test_cli_exit_code_and_one_line(repo_root, clean_env):
    """A job stops before any work with one line and exit code 2 (the Makefile uses this entry point too)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pcbvlm.config", "get", "train.lr", "--set", "train.lr=fast"],
        cwd=repo_root,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: train.lr: input should be a valid number")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "pcbvlm.config", "get", "train.micro_batch", "--config", "config/config.yaml"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        env={"SET": "train.micro_batch=3", "PATH": "/usr/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3"
