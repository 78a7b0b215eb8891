"""What every job's entry point shares: config arguments, error handling, exit codes.

A job is `main(argv) -> int`; `run_job(main)` turns `UserError`s into one line on stderr and their exit
code, so bad input never prints a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pcbvlm.config import DEFAULT_CONFIG, Config, load_config
from pcbvlm.errors import EXIT_BAD_INPUT, UserError


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=os.environ.get("CONFIG") or str(DEFAULT_CONFIG),
        help="YAML config (default: $CONFIG or config/config.yaml)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=1e-4 (repeatable; $SET adds space-separated ones)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    # Overrides from the environment (make SET="...") come first, so explicit --set wins.
    env_overrides = os.environ.get("SET", "").split()
    return load_config(args.config, [*env_overrides, *args.overrides])


def data_folder_line(cfg: Config, what: str = "reads", folder: str | os.PathLike | None = None) -> str:
    """`data: <what> <folder> (...)`: which converted-data folder a job uses and where that came from, so
    that a DATA_DIR that did not arrive (another config, another shell) is seen before the job runs."""
    folder = Path(folder if folder is not None else cfg.paths.data_dir)
    env = os.environ.get("DATA_DIR")
    if folder != Path(cfg.paths.data_dir):
        origin = "given to the job"
    elif env and Path(env) == folder:
        origin = "DATA_DIR"
    else:
        origin = "paths.data_dir of the config; DATA_DIR=... to change"
    return f"data: {what} {folder} ({origin})"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def make_parser(command: str, description: str) -> argparse.ArgumentParser:
    """The parser of `pcbvlm <command>` with --config / --set (its errors: one line, exit 2)."""
    parser = _Parser(prog=f"pcbvlm {command}", description=description)
    add_config_args(parser)
    return parser


def run_job(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        code = err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
