"""The whole pipeline on the embedded tiny model and synthetic boards, on the CPU, in a few minutes:

    synth -> data -> train -> merge -> quantize -> eval (merged and quantized, side by side)
    then the memorisation check: synth -> data -> train (full) -> eval on the same boards

Each stage runs the same job a user runs (`jobs/<job>.py`, training through `accelerate launch`) with
`config/tiny.yaml`; the demo stops at the first stage that fails and prints where everything went.
The tiny model is random and LoRA-trained for seconds: on the held-out test boards its answers are not
expected to find defects. The last stages (`config/memorise.yaml`) train the tiny model with all its
parameters until it has memorised 4 non-square boards and evaluate it on those same boards: non-zero
(normally perfect) scores there show that boxes travel correctly through training, generation, parsing,
pixel mapping and scoring. They are memorised boards, not held out: no small model trained here detects
defects on new boards yet (BENCHMARKS.md, "Learning run").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from pcbvlm.cli import config_from_args, make_parser, run_job

ROOT = Path(__file__).resolve().parents[1]
# The memorised boards: non-square (width != height catches a swapped or wrong size in the pixel mapping).
MEMORISE_BOARDS = [
    "--width",
    "256",
    "--height",
    "160",
    "--scale",
    "0.8",
    "--max-defects",
    "2",
    "--order",
    "reading",
]


def main(argv=None) -> int:
    parser = make_parser("demo", __doc__.splitlines()[0])
    parser.set_defaults(config=str(ROOT / "config" / "tiny.yaml"))
    parser.add_argument("--samples", type=int, default=48, help="synthetic boards to generate (default 48)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)  # validates the config before any stage runs

    from rich.console import Console
    from rich.table import Table

    console = Console()
    py = sys.executable
    overrides = [*os.environ.get("SET", "").split(), *args.overrides]
    common = ["--config", args.config, *[f"--set={o}" for o in overrides]]
    outputs = Path(cfg.paths.outputs_dir)
    stages = [
        (
            "synth",
            [
                py,
                "jobs/synth_data.py",
                *common,
                "--num",
                str(args.samples),
                "--out",
                str(cfg.paths.deeppcb_dir),
            ],
        ),
        ("data", [py, "jobs/prepare_data.py", *common]),
        (
            "train",
            [
                py,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                "config/accelerate/cpu.yaml",
                "jobs/train.py",
                *common,
            ],
        ),
        ("merge", [py, "jobs/merge.py", *common]),
        ("quantize", [py, "jobs/quantize.py", *common]),
        (
            "eval merged",
            [py, "jobs/evaluate.py", *common, "--model", "merged", "--out", str(outputs / "eval" / "merged")],
        ),
        (
            "eval quantized",
            [
                py,
                "jobs/evaluate.py",
                *common,
                "--model",
                "quantized",
                "--out",
                str(outputs / "eval" / "quantized"),
            ],
        ),
        (
            "compare",
            [
                py,
                "jobs/evaluate.py",
                *common,
                "--compare",
                str(outputs / "eval" / "merged"),
                str(outputs / "eval" / "quantized"),
                "--out",
                str(outputs / "eval"),
            ],
        ),
    ]
    memorise_cfg = str(ROOT / "config" / "memorise.yaml")
    memorise = ["--config", memorise_cfg, *[f"--set={o}" for o in overrides]]
    memorised = config_from_args(argparse.Namespace(config=memorise_cfg, overrides=args.overrides))
    memorised_eval = Path(memorised.paths.outputs_dir) / "eval"
    stages += [
        (
            "synth (memorise)",
            [py, "jobs/synth_data.py", *memorise, "--num", "6", "--seed", "11", "--out"]
            + [str(memorised.paths.deeppcb_dir), *MEMORISE_BOARDS],
        ),
        ("data (memorise)", [py, "jobs/prepare_data.py", *memorise]),
        (
            "train full (memorise)",
            [py, "-m", "accelerate.commands.launch", "--config_file", "config/accelerate/cpu.yaml"]
            + ["jobs/train.py", *memorise],
        ),
        (
            "eval memorised boards",
            [py, "jobs/evaluate.py", *memorise, "--model", "run", "--out", str(memorised_eval)],
        ),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("SET", None)  # already applied through --set, and jobs would apply it twice
    timings: list[tuple[str, str, float]] = []
    for name, cmd in stages:
        script = next(part for part in cmd if part.startswith("jobs/"))
        if not (ROOT / script).is_file():
            timings.append((name, f"missing ({script} not written yet)", 0.0))
            continue
        console.rule(f"[bold]demo: {name}")
        begin = time.perf_counter()
        code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        seconds = time.perf_counter() - begin
        timings.append((name, "ok" if code == 0 else f"failed (exit {code})", seconds))
        if code != 0:
            _summary(console, Table, timings, None)
            return code
    report = outputs / "eval" / "quantized" / "report.md"
    _summary(console, Table, timings, report if report.is_file() else None)
    _scores(console, outputs / "eval" / "quantized", memorised_eval)
    return 0


def _scores(console, held_out: Path, memorised: Path) -> None:
    """What the two evaluations mean, side by side, labelled by which boards they ran on."""
    import json

    for folder, what in (
        (held_out, "tiny model (random base, LoRA, seconds of training), held-out synthetic test boards"),
        (
            memorised,
            "tiny model trained in full on 4 boards, evaluated on those same boards (MEMORISED, not held out)",
        ),
    ):
        path = folder / "metrics.json"
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        d = metrics["deeppcb"]
        console.print(
            f"{what}: DeepPCB P {d['precision']:.3f} R {d['recall']:.3f} F {d['fscore']:.3f} "
            f"({d['correct']} of {d['gt_boxes']} boxes, {d['detections']} detections; report {folder / 'report.md'})"
        )
    console.print(
        "These are small synthetic-board models, not the 32B; no small model here detects defects on new boards yet."
    )


def _summary(console, table_class, timings, report) -> None:
    table = table_class(title="demo")
    table.add_column("stage")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    for name, result, seconds in timings:
        table.add_row(name, result, f"{seconds:.1f}" if seconds else "-")
    console.print(table)
    if report is not None:
        console.print(f"report: {report}")
        console.print(f"merged vs quantized: {report.parent.parent / 'comparison.md'}")


if __name__ == "__main__":
    run_job(main)
