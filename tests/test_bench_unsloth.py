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


def test_picture_title_says_whether_the_model_is_cut():
    from pcbvlm.bench_unsloth import _shape_title

    assert _shape_title(64) == "Qwen3-VL-32B shape (all 64 decoder layers)"
    assert _shape_title(16) == "Qwen3-VL-32B shape cut to 16 of its 64 decoder layers"


def test_offload_plan_trains_the_same_samples_per_step_in_every_row():
    from pcbvlm.bench_unsloth import offload_plan

    plan = offload_plan(CONFIG, layers=64, memory_goal_gib=31.0)
    settings = [s for row in plan for s in (row if isinstance(row, list) else [row])]
    for s in settings:
        if not s.naive:  # mb 16 x 1, 8 x 2, 4 x 4: the configured 16 samples per optimizer step
            assert s.micro_batch * s.grad_accum == CONFIG.train.micro_batch == 16, s.name
    assert sum(s.naive for s in settings) == 1
    assert plan[0].offload_checkpoints and plan[0].uncheckpointed_layers == 0 and plan[0].cap_gib is None
    no_recompute = next(s for s in settings if s.micro_batch == 4 and s.cap_gib is None)
    assert no_recompute.uncheckpointed_layers == 64 and no_recompute.grad_accum == 4
    # rows of alternatives: most uncheckpointed layers first; the row under Unsloth's peak has it as cap
    for row in (r for r in plan if isinstance(r, list)):
        kept = [s.uncheckpointed_layers for s in row if s.micro_batch == row[0].micro_batch]
        assert kept == sorted(kept, reverse=True) and len(set(kept)) == len(kept)
    under = next(r for r in plan if isinstance(r, list) and r[0].cap_gib)
    assert all(s.cap_gib == 31.0 and "under 31 GiB" in s.name for s in under)
    assert [s.micro_batch for s in under] == [8, 8, 4, 4]
    # a 2-layer cut keeps the counts within its layers
    small = offload_plan(CONFIG, layers=2)
    assert all(
        s.uncheckpointed_layers <= 2 for row in small for s in (row if isinstance(row, list) else [row])
    )


def test_a_row_of_alternatives_takes_the_first_that_fits(tmp_path):
    import json

    from pcbvlm.bench import Setting
    from pcbvlm.bench_unsloth import OUT_OF_MEMORY, measure_rows

    big, medium, small = (
        Setting(n, 16, uncheckpointed_layers=k) for n, k in (("b", 20), ("m", 10), ("s", 0))
    )
    tried = []

    def measure(setting):
        tried.append(setting.name)
        fits = setting.uncheckpointed_layers <= 10
        return {"setting": setting.__dict__, "status": "ok" if fits else OUT_OF_MEMORY, "peak_gib": 80.0}

    results = {"train": []}
    out = tmp_path / "ours.json"
    measure_rows(
        [[big, medium, small], Setting("alone", 16, uncheckpointed_layers=30)],
        measure,
        lambda: False,
        results,
        out,
    )
    assert tried == ["b", "m", "alone"]
    assert [r["setting"]["name"] for r in results["train"]] == ["m", "alone"]
    assert results["train"][1]["status"] == OUT_OF_MEMORY  # a single setting's failure is its row
    assert results["did_not_fit"] == [{"name": "b", "peak_gib": 80.0}]
    assert json.loads(out.read_text())["train"][0]["setting"]["name"] == "m"

    skipped = {"train": []}
    measure_rows([[big, medium]], measure, lambda: True, skipped, out)
    assert skipped["train"] == [{"setting": big.__dict__, "status": "skipped: deadline"}]


def test_compile_plan_pairs_every_compiled_row_with_its_eager_twin():
    from pcbvlm.bench_unsloth import PLANS

    compiled, eager = PLANS["compile"](CONFIG, 64), PLANS["compile-eager"](CONFIG, 64)
    first = [s for row in compiled for s in (row if isinstance(row, list) else [row])]
    assert all(s.compile_layers for s in first)
    assert not any(s.compile_layers for s in eager) and sum(s.naive for s in eager) == 1

    def shape(s):
        return (s.micro_batch, s.grad_accum, s.uncheckpointed_layers, s.offload_checkpoints)

    assert {shape(s) for s in eager if not s.naive} <= {shape(s) for s in first}
    assert all(s.micro_batch * s.grad_accum == 16 for s in first + eager if not s.naive)
