"""Mutation testing (mutmut 3) of the modules where a silent bug ruins a user's result: `make mutation`.

Each module is mutated on its own and run against only its own tests, in a scratch copy of the project
under `.mutation/<module>/` (mutmut wants the package under `src/`; this project keeps it in `lib/`).
Prints the kill rate per module and exits 1 when one is below the target (90%).

    python tools/mutation.py [MODULE ...] [--jobs N] [--keep]

MODULE names a key of MODULES (default: all). Not part of `make test` or CI: it runs each module's
tests once per mutant (tens of minutes in all on two cores). A mutant counts as killed when a test
fails or times out; "no tests" and "survived" count against the rate. Mutants that cannot change
behaviour (equivalent) are excluded in the source with `# pragma: no mutate` and a reason, or counted
as survivors and listed in the README (where a pragma would hide killed mutants on the same line).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".mutation"
TARGET = 0.90
KILLED = {"killed", "timeout", "caught by type check", "segfault"}


@dataclass(frozen=True)
class Module:
    source: str  # path under lib/pcbvlm
    tests: tuple[str, ...]  # pytest arguments: files or node ids
    functions: tuple[str, ...] = ()  # only these functions' mutants (fnmatch on the mutant name); () = all


MODULES: dict[str, Module] = {
    "metrics": Module("metrics.py", ("tests/test_metrics.py",)),
    "parsing": Module("parsing.py", ("tests/test_parsing.py",)),
    "answer": Module("answer.py", ("tests/test_answer.py",)),
    "collator": Module("collator.py", ("tests/test_collator.py",)),
    # The checks that decide whether a merged or quantized model is published (pcbvlm.model_folder) and the
    # dtype the merge folds the adapter in (pcbvlm.merge).
    "merge-verification": Module(
        "model_folder.py", ("tests/test_merge_verification.py",), ("x_compare_logits", "x_attended_logits")
    ),
    "merge-dtype": Module("merge.py", ("tests/test_merge_verification.py",), ("x_merge_dtype",)),
    # Term by term on a small shape (fast); tests/test_preflight.py checks the 32B totals against measurements.
    "preflight-estimate": Module("preflight/estimate.py", ("tests/test_estimate.py",)),
    # The run registry: identity, checkpoint completion, resume selection, run lock, finished runs.
    "run-registry": Module(
        "runs.py",
        (
            "tests/test_runs.py",
            "tests/test_training.py::test_resume_picks_the_newest_complete_checkpoint_of_the_newest_run",
            "tests/test_training.py::test_checkpoint_marker_lists_every_file_with_its_size",
        ),
    ),
}


def prepare(name: str, module: Module) -> Path:
    """A scratch copy: src/pcbvlm, tests, config, jobs and a pyproject.toml with the mutmut section."""
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(ROOT / "lib", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for folder in ("tests", "config", "jobs"):
        shutil.copytree(ROOT / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    tests = ", ".join(f'"{t}"' for t in module.tests)
    pyproject += (
        "\n[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f'only_mutate = ["src/pcbvlm/{module.source}"]\n'
        f"pytest_add_cli_args_test_selection = [{tests}]\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]\n'
        'also_copy = ["config", "jobs"]\n'
        "use_git_change_detection = false\n"
    )
    (work / "pyproject.toml").write_text(pyproject, encoding="utf-8")
    return work


def mutant_prefix(module: Module) -> str:
    """mutmut's names: pcbvlm.<module>.x_<function>__mutmut_<n>."""
    return "pcbvlm." + module.source.removesuffix(".py").replace("/", ".") + "."


def run(name: str, module: Module, jobs: int) -> dict[str, int]:
    work = prepare(name, module)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    mutmut = [sys.executable, "-m", "mutmut"]
    patterns = [f"{mutant_prefix(module)}{f}__mutmut_*" for f in module.functions]
    log = work / "mutmut.log"
    with log.open("w") as fh:
        subprocess.run(
            [*mutmut, "run", "--max-children", str(jobs), *patterns],
            cwd=work,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            check=False,
        )
    out = subprocess.run(
        [*mutmut, "results", "--all", "true"], cwd=work, env=env, capture_output=True, text=True, check=False
    ).stdout
    counts: dict[str, int] = {}
    for line in out.splitlines():
        match = re.match(r"\s*(\S+): (.+)$", line)
        if not match:
            continue
        mutant, status = match.groups()
        if module.functions and not any(f"{f}__mutmut_" in mutant for f in module.functions):
            continue
        counts[status] = counts.get(status, 0) + 1
        if status not in KILLED:
            print(f"  {status}: {mutant}", flush=True)
    if not counts:
        print(f"{name}: mutmut produced no results; see {log}", file=sys.stderr)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"any of {', '.join(MODULES)}")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep .mutation/ (mutmut show <mutant> there)")
    args = parser.parse_args(argv)
    names = args.modules or list(MODULES)
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        parser.error(f"unknown module {unknown[0]!r} (known: {', '.join(MODULES)})")
    rows = []
    for name in names:
        started = time.monotonic()
        print(f"{name}: mutating lib/pcbvlm/{MODULES[name].source} ...", flush=True)
        counts = run(name, MODULES[name], args.jobs)
        total = sum(counts.values())
        killed = sum(n for status, n in counts.items() if status in KILLED)
        rate = killed / total if total else 0.0
        rows.append((name, killed, total, rate, time.monotonic() - started))
        print(f"{name}: {killed}/{total} mutants killed ({rate:.1%}) {counts}", flush=True)
    print("\nmutation kill rate per module (target >= 90%):")
    for name, killed, total, rate, seconds in rows:
        flag = "" if rate >= TARGET else "  BELOW TARGET"
        print(f"  {name:<20} {killed:>4}/{total:<4} {rate:6.1%}  ({seconds:.0f} s){flag}")
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)
    return 0 if all(rate >= TARGET for *_, rate, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
