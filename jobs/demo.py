"""The whole pipeline on the embedded tiny model and synthetic boards, on the CPU, in a few minutes:

    synth -> data -> train -> merge -> quantize -> eval (merged and quantized, side by side)

Each stage runs the same job a user runs (`jobs/<job>.py`, training through `accelerate launch`) with
`config/tiny.yaml`; the demo stops at the first stage that fails and prints where everything went.
The tiny model is random and trained for seconds: its answers are not expected to find defects; the demo
shows that every stage runs and what each writes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pcbvlm.cli import config_from_args, make_parser, run_job

ROOT = Path(__file__).resolve().parents[1]


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
    return 0


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
