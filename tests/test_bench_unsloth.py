"""The side-by-side benchmark's plan and table (issue 20); the measuring itself runs on a GPU."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT
from pcbvlm.bench_unsloth import markdown_table, side_by_side_plan
from pcbvlm.config import load_config

CONFIG = load_config(ROOT / "config" / "config.yaml")


def test_plan_scales_the_uncheckpointed_layers_to_the_cut_and_says_so():
    plan = side_by_side_plan(CONFIG, layers=16)
    main, levers = plan[0], plan[1]
    # 10 of 64 layers skip recomputation in the configured setting: 2 of a 16-layer cut (rounded down)
    assert main.uncheckpointed_layers == levers.uncheckpointed_layers == 2
    assert "2 of 16 layers uncheckpointed" in main.name
    assert not main.fused_lora and not main.fused_swiglu  # the configured setting as on main
    assert levers.fused_lora and levers.fused_swiglu
    assert sum(s.naive for s in plan) == 1
    assert side_by_side_plan(CONFIG, layers=64)[0].uncheckpointed_layers == 10


def test_table_compares_every_row_with_unsloth_and_shows_failures():
    def row(name, s, naive=False):
        return {
            "setting": {"name": name, "naive": naive},
            "status": "ok",
            "s_per_sample": s,
            "samples_per_s": round(1 / s, 3),
            "peak_gib": 10.0,
            "warmup_loss": 12.0,
            "loss": 11.9,
        }

    theirs = {"train": [row("Unsloth mb 16", 0.2)], "status": "ok"}
    ours = {
        "train": [row("ours", 0.1), {"setting": {"name": "big"}, "status": "out of memory under the cap"}]
    }
    ours["train"][0]["speedup_vs_naive"] = 5.0
    table = markdown_table(ours, theirs)
    assert "| ours | 0.1 | 10.0 | 10.0 | 12.0 -> 11.9 | 5.0x | 2.00x |" in table
    assert "| Unsloth mb 16 | 0.2 |" in table and "| big | out of memory under the cap |" in table
    failed = markdown_table(ours, {"train": [], "status": "load failed: RuntimeError: no"})
    assert "Unsloth: load failed: RuntimeError: no" in failed


def test_job_without_a_checkpoint_fails_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "bench_unsloth.py"), "ours", "--checkpoint", str(tmp_path)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "lib"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode != 0
    assert (
        done.stderr.strip()
        == f"error: --checkpoint: {tmp_path}/config.json not found (run the checkpoint step)"
    )
