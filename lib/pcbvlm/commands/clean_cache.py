"""`make clean-cache [DRY_RUN=1] [PATTERN=glob] [KEEP=N]`: reclaim disk from the HF cache and old checkpoints.

Lists the Hugging Face cache (hub repos and revisions with sizes) and every run's checkpoints, then
deletes the cached repos matching `--pattern` (default: the configured base model; `org/name@rev` for
one revision; "" for none), the checkpoints beyond the newest `--keep` complete ones of each run, and broken
checkpoints (see `pcbvlm.cache`). Final adapters
and everything in outputs_dir are kept unless named exactly with `--delete PATH`. `--dry-run` prints
the same plan and deletes nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rich.table import Table

from pcbvlm.cache import execute_plan, plan_cleanup
from pcbvlm.cli import config_from_args, make_parser, run_job
from pcbvlm.errors import EXIT_OK
from pcbvlm.preflight.report import make_console


def _gib(size: float) -> str:
    return f"{size / 1024**3:.2f}"


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("clean-cache", "Delete matching HF cache entries and stale training checkpoints.")
    parser.add_argument("--dry-run", action="store_true", help="show the plan, delete nothing")
    parser.add_argument(
        "--pattern",
        default=None,
        help="glob over cached repo ids, optionally @revision (default: model.name_or_path; '' = none)",
    )
    parser.add_argument(
        "--keep", type=_count, default=1, help="complete checkpoints kept per run, newest first (default 1)"
    )
    parser.add_argument(
        "--delete",
        action="append",
        default=[],
        metavar="PATH",
        help="also delete this final adapter, run or output, named by its exact path (repeatable)",
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    plan = plan_cleanup(cfg, pattern=args.pattern, keep=args.keep, delete=args.delete)

    console = make_console()
    table = Table(
        title=f"storage plan (HF cache {plan.hf_cache_dir}, runs {cfg.paths.runs_dir})", title_justify="left"
    )
    for column in ("action", "kind", "entry", "GiB", "why"):
        table.add_column(column, justify="right" if column == "GiB" else "left")
    for e in plan.entries:
        style = "red" if e.action == "delete" else "green"
        table.add_row(f"[{style}]{e.action}[/]", e.kind, e.label, _gib(e.size), e.reason)
    console.print(table)
    for note in plan.notes:
        console.print(f"note: {note}")
    if plan.hf_strategy is not None:
        console.print("hub paths to remove:")
        for path in sorted(plan.hf_strategy.repos | plan.hf_strategy.snapshots):
            console.print(f"  {path}")

    count = len(plan.to_delete)
    if args.dry_run:
        console.print(
            f"dry run: would free {_gib(plan.bytes_to_free)} GiB ({count} entries); nothing deleted"
        )
        return EXIT_OK
    if count == 0:
        console.print("nothing to delete")
        return EXIT_OK
    freed = execute_plan(plan)
    console.print(f"[green]freed {_gib(freed)} GiB ({count} entries)[/green]")
    return EXIT_OK


if __name__ == "__main__":
    run_job(main)
