"""The whole pipeline on the embedded tiny model and synthetic boards, on the CPU, in a few minutes:

    synth -> data -> train -> merge -> quantize -> eval (merged and quantized, side by side)
    then the memorisation check: synth -> data -> train (full) -> eval on the same boards

Each stage runs the same command a user runs (`pcbvlm <command>`, training through `pcbvlm.launch` under the
config's accelerate profile) with `config/tiny.yaml`, in the folders that config names (the path variables
DATA_DIR etc. are not used: the demo never writes into the site's data); it stops at the first stage that
fails and prints where everything went.
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
from pcbvlm.commands import ROOT
from pcbvlm.config import PATH_VARIABLES

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
    # The demo writes synthetic boards and tiny models into the folders its configs name by default, never
    # into the site's real ones (DEEPPCB_DIR may be a read-only DeepPCB copy): the path variables are
    # dropped here, for the configs read below and for every stage.
    ignored = [f"{var}={os.environ.pop(var)}" for var in PATH_VARIABLES if os.environ.get(var)]
    cfg = config_from_args(args)  # validates the config before any stage runs

    from rich.console import Console
    from rich.table import Table

    console = Console()
    if ignored:
        console.print(f"demo: not using {', '.join(ignored)}: the demo writes only into its own folders")
    pcbvlm = [sys.executable, "-m", "pcbvlm"]
    overrides = [*os.environ.get("SET", "").split(), *args.overrides]
    common = ["--config", args.config, *[f"--set={o}" for o in overrides]]
    outputs = Path(cfg.paths.outputs_dir)
    eval_dir = outputs / "eval"
    stages = [
        ("synth", ["synth", *common, "--num", str(args.samples), "--out", str(cfg.paths.deeppcb_dir)]),
        ("data", ["data", *common]),
        ("train", ["train", *common]),  # under the config's accelerate profile (tiny: cpu)
        ("merge", ["merge", *common]),
        ("quantize", ["quantize", *common]),
        ("eval merged", ["eval", *common, "--model", "merged", "--out", str(eval_dir / "merged")]),
        ("eval quantized", ["eval", *common, "--model", "quantized", "--out", str(eval_dir / "quantized")]),
        (
            "compare",
            ["eval", *common, "--compare", str(eval_dir / "merged"), str(eval_dir / "quantized")]
            + ["--out", str(eval_dir)],
        ),
    ]
    memorise_cfg = str(ROOT / "config" / "memorise.yaml")
    memorise = ["--config", memorise_cfg, *[f"--set={o}" for o in overrides]]
    memorised = config_from_args(argparse.Namespace(config=memorise_cfg, overrides=args.overrides))
    memorised_eval = Path(memorised.paths.outputs_dir) / "eval"
    stages += [
        (
            "synth (memorise)",
            ["synth", *memorise, "--num", "6", "--seed", "11", "--out", str(memorised.paths.deeppcb_dir)]
            + MEMORISE_BOARDS,
        ),
        ("data (memorise)", ["data", *memorise]),
        ("train full (memorise)", ["train", *memorise]),
        ("eval memorised boards", ["eval", *memorise, "--model", "run", "--out", str(memorised_eval)]),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    # SET is applied through --set already; PROFILE and RESUME are make's, for `make train`, not the demo's.
    for var in ("SET", "PROFILE", "RESUME"):
        env.pop(var, None)
    timings: list[tuple[str, str, float]] = []
    for name, command in stages:
        console.rule(f"[bold]demo: {name}  (pcbvlm {command[0]})")
        begin = time.perf_counter()
        code = subprocess.run([*pcbvlm, *command], cwd=ROOT, env=env).returncode
        seconds = time.perf_counter() - begin
        timings.append((name, "ok" if code == 0 else f"failed (exit {code})", seconds))
        if code != 0:
            _summary(console, Table, timings, None)
            return code
    report = eval_dir / "quantized" / "report.md"
    _summary(console, Table, timings, report if report.is_file() else None)
    _scores(console, eval_dir / "quantized", memorised_eval)
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
