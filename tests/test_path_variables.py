"""One name per folder: DEEPPCB_DIR, DATA_DIR, RUNS_DIR and OUTPUTS_DIR (pcbvlm.config.PATH_VARIABLES) are
honoured by every job under every shipped config, and each job says which data folder it reads.

The bug this guards: `make data DATA_DIR=X` wrote to X, while `make eval DATA_DIR=X CONFIG=config/tiny.yaml`
read another folder, because the tiny config read TINY_DATA_DIR."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from pcbvlm.config import PATH_VARIABLES, load_config

CONFIGS = sorted((ROOT / "config").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_reads_every_path_variable(path, clean_env, tmp_path):
    wanted = {}
    for var, key in PATH_VARIABLES.items():
        wanted[key] = tmp_path / f"{var.lower()} here"
        clean_env.setenv(var, str(wanted[key]))
    cfg = load_config(path)
    got = {key: getattr(cfg.paths, key.split(".")[1]) for key in PATH_VARIABLES.values()}
    assert got == wanted, path.name


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_without_the_variables_each_config_keeps_its_own_folders(path, clean_env):
    for var in PATH_VARIABLES:
        clean_env.delenv(var, raising=False)
    cfg = load_config(path)
    assert not cfg.paths.data_dir.is_absolute()  # relative to the checkout, as the demo and compose expect
    if path.name != "config.yaml":  # the tiny configs never share the real data's folders
        assert cfg.paths.data_dir != load_config(ROOT / "config" / "config.yaml").paths.data_dir


def _make(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    drop = ("CONFIG", "SET", "MAKEFLAGS", "MAKELEVEL", *PATH_VARIABLES)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra or {})
    venv = ["RUNNER=local", "PCBVLM_IN_IMAGE=1", f"VENV={Path(sys.executable).parent.parent}"]
    return subprocess.run(
        ["make", "--no-print-directory", *venv, *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A converted data folder (with a space in its name) made by `make data DATA_DIR=...`."""
    from pcbvlm.synth import generate_dataset

    root = tmp_path_factory.mktemp("paths")
    raw = root / "raw"
    generate_dataset(raw, 6, seed=3)
    out = root / "my data"
    proc = _make("data", "CONFIG=config/tiny.yaml", f"DEEPPCB_DIR={raw}", f"DATA_DIR={out}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"data: writes {out} (DATA_DIR)" in proc.stdout
    return out


@pytest.mark.parametrize("config", ["config/tiny.yaml", "config/memorise.yaml", "config/config.yaml"])
def test_make_eval_reads_the_data_dir_make_data_wrote(converted, config, tmp_path):
    """`make eval DATA_DIR=X` scores X's test split, under every config, and says so."""
    rows = [json.loads(line) for line in (converted / "test.jsonl").read_text().splitlines()]
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(
        "".join(json.dumps({"id": r["id"], "objects": [], "raw": "[]"}) + "\n" for r in rows)
    )
    proc = _make(
        "eval",
        f"CONFIG={config}",
        f"DATA_DIR={converted}",
        f"PREDICTIONS={predictions}",
        f"OUT={tmp_path / 'eval'}",
        "SET=eval.split=test",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"data: scores the test split of {converted} (DATA_DIR)" in proc.stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert str(converted) in metrics["run"]["data"]


def test_jobs_say_where_the_data_folder_comes_from(clean_env, tmp_path):
    from pcbvlm.cli import data_folder_line

    for var in PATH_VARIABLES:
        clean_env.delenv(var, raising=False)
    cfg = load_config(ROOT / "config" / "tiny.yaml")
    assert data_folder_line(cfg) == (
        f"data: reads {cfg.paths.data_dir} (paths.data_dir of the config; DATA_DIR=... to change)"
    )
    clean_env.setenv("DATA_DIR", str(tmp_path))
    cfg = load_config(ROOT / "config" / "tiny.yaml")
    assert data_folder_line(cfg, "trains on") == f"data: trains on {tmp_path} (DATA_DIR)"
    assert (
        data_folder_line(cfg, "writes", tmp_path / "x") == f"data: writes {tmp_path / 'x'} (given to the job)"
    )


def test_docker_runner_passes_path_variables_given_to_make_only():
    """RUNNER=docker: a path given on make's command line reaches the container (-e); one from .env (a host
    path) does not."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "SET", "MAKEFLAGS", "MAKELEVEL")}
    env["RUNS_DIR"] = "/host/only/runs"  # as if from .env
    out = subprocess.run(
        [
            "make",
            "-n",
            "--no-print-directory",
            "eval",
            "RUNNER=docker",
            "DATA_DIR=/data/my boards",
            "MODEL=merged",
        ],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if "pcbvlm eval" in x)
    assert "-e DATA_DIR='/data/my boards' job python -m pcbvlm eval --model 'merged'" in line
    assert "RUNS_DIR" not in line
