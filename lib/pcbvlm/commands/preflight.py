"""`make preflight JOB=train|merge|quantize|eval`: is this machine ready for the job?

Measures the GPU(s), driver, RAM, disks, /dev/shm, caches, data and packages; estimates what the job
needs from the config and the model's shape; prints the checks and the memory breakdown, writes
`<outputs_dir>/preflight/<job>.json`, and exits 0 when every check passes, 1 with one line per failed
check and its remedy otherwise.

`--facts FILE.json` states facts instead of measuring them (keys of `pcbvlm.preflight.Facts`; objects
are merged key by key, lists replaced): e.g. `{"gpus": [{"name": "NVIDIA A800-SXM4-80GB",
"capability": [8, 0], "total_bytes": 85899345920, "free_bytes": 84000000000}], "torch_cuda_available":
true, "torch_cuda": "12.8", "driver_version": "535.104.05"}` shows what an A800 host would be told.
`packages` and `bnb_cuda` given there are not measured at all (their measurement imports heavy packages).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pcbvlm.cli import config_from_args, make_parser, run_job
from pcbvlm.config import deep_merge
from pcbvlm.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, UserError
from pcbvlm.preflight import JOBS, Facts, measure_facts, run_checks
from pcbvlm.preflight.report import failure_lines, make_console, print_report, write_report


class FactsFileError(UserError):
    """A --facts file that is not a valid set of facts: bad input, exit code 2."""

    exit_code = EXIT_BAD_INPUT


def load_facts_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FactsFileError(f"--facts {path}: file not found") from None
    except (OSError, ValueError) as err:
        raise FactsFileError(f"--facts {path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise FactsFileError(f"--facts {path}: must be a JSON object of facts")
    unknown = sorted(set(data) - set(Facts.model_fields))
    if unknown:
        raise FactsFileError(
            f"--facts {path}: unknown fact(s) {', '.join(unknown)}; known: {', '.join(Facts.model_fields)}"
        )
    return data


def _validate(data: dict[str, Any], path: Path | None) -> Facts:
    try:
        return Facts.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise FactsFileError(f"--facts {path}: {where}: {first['msg']}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser("preflight", "Check GPU, driver, RAM, disk and packages against what a job needs.")
    parser.add_argument(
        "--job", choices=JOBS, default=os.environ.get("JOB") or "train", help="default: $JOB or train"
    )
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="pass without a GPU (the tiny model); also resources.allow_cpu",
    )
    parser.add_argument("--facts", type=Path, help="JSON file of facts that replace measured ones")
    parser.add_argument("--out", type=Path, help="report path (default: <outputs_dir>/preflight/<job>.json)")
    parser.add_argument(
        "--profile",
        default=os.environ.get("PROFILE") or None,
        help="accelerate profile the job will use (default: $PROFILE or train.accelerate_profile)",
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if args.profile:  # make train PROFILE=...: check and estimate what will be launched
        cfg = cfg.model_copy(
            update={"train": cfg.train.model_copy(update={"accelerate_profile": args.profile})}
        )

    overlay = load_facts_file(args.facts) if args.facts else {}
    _validate(overlay, args.facts)  # before measuring, which takes seconds
    measured = measure_facts(cfg, args.job, skip=set(overlay))
    facts = _validate(deep_merge(measured.model_dump(mode="json"), overlay), args.facts)

    report = run_checks(cfg, args.job, facts, allow_cpu=args.allow_cpu)
    console = make_console()
    print_report(report, console, args.config)
    out = args.out or Path(cfg.paths.outputs_dir) / "preflight" / f"{args.job}.json"
    write_report(report, facts, out, args.config)
    console.print(f"report: {out}")
    if report.passed:
        cpu = " (CPU allowed)" if report.allow_cpu and not facts.torch_cuda_available else ""
        console.print(f"[green]preflight JOB={args.job}: all checks passed{cpu}[/green]")
        return EXIT_OK
    for line in failure_lines(report):
        print(line, file=sys.stderr)
    print(f"preflight JOB={args.job}: {len(report.failures)} check(s) failed", file=sys.stderr)
    return EXIT_FAILED


if __name__ == "__main__":
    run_job(main)
