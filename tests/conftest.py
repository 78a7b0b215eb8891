"""Shared fixtures. Tests run offline on the CPU (the Makefile sets OMP_NUM_THREADS=1, HF_HUB_OFFLINE=1)."""

from __future__ import annotations

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


def run_job(script: str, *args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600):
    """Run `python jobs/<script>` like the Makefile does; return the CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("SET", "CONFIG")}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / script), *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
