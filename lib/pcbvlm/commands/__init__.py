"""The `pcbvlm` command line: `pcbvlm <command> [options]` (also `python -m pcbvlm`), one command per job.

Each command is a module here with `main(argv) -> int`; `pcbvlm.cli.run_job` turns bad input into one
`error:` line and the job's exit code (README "Exit codes"). Make targets call these commands
(`make merge` = `pcbvlm merge`; README "Architecture" has the table); `jobs/<job>.py` are shims kept for
the commands written down in BENCHMARKS.md and older notes.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

# The repository: configs, accelerate profiles and benchmark results are found relative to it.
ROOT = Path(__file__).resolve().parents[3]

# command -> (module with main(argv), one line for `pcbvlm --help`), in pipeline order.
COMMANDS: dict[str, tuple[str, str]] = {
    "preflight": ("pcbvlm.commands.preflight", "check GPU, RAM, disk, packages against what --job needs"),
    "synth": ("pcbvlm.commands.synth_data", "generate synthetic boards in the DeepPCB layout"),
    "data": ("pcbvlm.commands.prepare_data", "convert a labelled dataset to the grounding jsonl"),
    "train": ("pcbvlm.launch", "fine-tune under the accelerate profile the config (or --profile) names"),
    "merge": ("pcbvlm.commands.merge", "merge the adapter into the bf16 base and verify it"),
    "quantize": ("pcbvlm.commands.quantize", "AWQ W4A16 with llm-compressor, verified"),
    "eval": ("pcbvlm.commands.evaluate", "evaluate a model on a split, score predictions, compare runs"),
    "infer": ("pcbvlm.commands.infer", "find the defects on one board image"),
    "ui": ("pcbvlm.commands.ui", "web page: inspect a board, browse evaluations"),
    "demo": ("pcbvlm.commands.demo", "the whole pipeline on the tiny model and synthetic boards (CPU)"),
    "learn": ("pcbvlm.commands.learn", "GPU: a small Qwen3-VL from scratch on synthetic boards"),
    "clean-cache": ("pcbvlm.commands.clean_cache", "delete HF cache entries and stale checkpoints"),
    "bench": ("pcbvlm.commands.bench", "GPU benchmark of the 32B shape: training and inference"),
    "bench-multi": ("pcbvlm.commands.bench_multi_gpu", "several-GPU benchmark under the accelerate profiles"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(
        [
            "usage: pcbvlm <command> [--config YAML] [--set KEY=VALUE ...] [options]",
            "",
            "commands:",
            *lines,
            "",
            '`pcbvlm <command> --help` lists a command\'s options; README "Architecture" maps them to make targets.',
        ]
    )


def command_main(name: str):
    """The `main(argv) -> int` of a command."""
    return importlib.import_module(COMMANDS[name][0]).main


def main(argv: Sequence[str] | None = None) -> None:
    from pcbvlm.cli import run_job
    from pcbvlm.errors import EXIT_BAD_INPUT

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if args else EXIT_BAD_INPUT)
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(
            f"pcbvlm: error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr
        )
        sys.exit(EXIT_BAD_INPUT)
    run_job(command_main(name), rest)
