"""The Makefile's own duties: paths reach the jobs whole (spaces, quotes), and a failed job's exit code is
said (make itself exits 2 whatever the recipe's code)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def _make(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "SET", "MAKEFLAGS", "MAKELEVEL")}
    # The running interpreter's environment, as installed (no `make setup`), and no .env of the checkout.
    venv = ["RUNNER=local", "PCBVLM_IN_IMAGE=1", f"VENV={Path(sys.executable).parent.parent}"]
    return subprocess.run(
        ["make", "--no-print-directory", *venv, "CONFIG=config/tiny.yaml", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_make_data_takes_paths_with_spaces_and_quotes(tmp_path):
    from pcbvlm.synth import generate_dataset

    raw = tmp_path / "raw boards" / "DeepPCB"
    generate_dataset(raw, 6, seed=1)
    out = tmp_path / "converted 'tiny' (2)"
    proc = _make("data", f"DEEPPCB_DIR={raw}", f"DATA_DIR={out}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "train.jsonl").is_file() and (out / "stats.json").is_file()
    assert str(raw) in (out / "train.jsonl").read_text()


@pytest.mark.parametrize(
    "args, code, meaning",
    [
        (["KEEP=-1"], 2, "bad input"),
        (["DELETE=/nonexistent folder/x"], 1, "a check or stage failed"),
    ],
)
def test_a_failed_job_says_its_own_exit_code(tmp_path, args, code, meaning):
    proc = _make("clean-cache", "DRY_RUN=1", f"SET=paths.runs_dir={tmp_path} paths.hf_home={tmp_path}", *args)
    assert proc.returncode == 2  # make's own code for any failed recipe
    lines = proc.stderr.strip().splitlines()
    assert f"error: clean-cache exited with code {code} ({meaning})" in lines, proc.stderr
    if code == 1:  # the path arrived whole: the job names it
        assert "error: --delete /nonexistent folder/x: no such file or folder" in lines


@pytest.mark.parametrize(
    "code, meaning", [(3, "disk guard: saved and stopped, run again to resume"), (130, "interrupted")]
)
def test_make_names_codes_only_some_jobs_give(tmp_path, code, meaning):
    """A stand-in interpreter that exits like the disk guard or Ctrl-C would."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexit {code}\n")
    fake.chmod(0o755)
    proc = _make("bench", f"JOBPY={fake}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[0] == f"error: bench exited with code {code} ({meaning})"
