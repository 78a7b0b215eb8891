"""The CUDA stacks this project pins, and which one fits a host's NVIDIA driver.

PyPI's torch 2.10.0 is the last build for CUDA 12 (12.8); 2.11 and later are built for CUDA 13. Hence two locks:
`requirements/cuda.lock` (torch 2.13.0, CUDA 13.0: driver >= 580) and `requirements/cuda12.lock` (torch 2.10.0,
CUDA 12.8: driver >= 525, through CUDA 12's minor-version compatibility), plus the CPU lock where there is no
NVIDIA driver at all. The Makefile runs this file as a script before any environment exists (`make setup`,
`make build`), so it imports nothing outside the standard library and nothing of the package:

    python3 lib/pcbvlm/stacks.py                  # 12, 13 or cpu, from the driver nvidia-smi reports
    python3 lib/pcbvlm/stacks.py --driver 550.54  # the same for a given driver version
    python3 lib/pcbvlm/stacks.py --stack 12       # check a CUDA_STACK value (exit 2 with a message when bad)

The preflight (`pcbvlm.preflight.checks`) uses the same table to say which stack fits when the installed one
does not, and names the command that installs it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Stack:
    name: str  # CUDA_STACK's value
    lock: str
    torch: str
    cuda: tuple[int, int]  # torch.version.cuda of that torch build
    min_driver: int  # the oldest driver branch that runs it (CUDA minor-version compatibility)


STACKS: dict[str, Stack] = {
    "13": Stack("13", "requirements/cuda.lock", "2.13.0", (13, 0), 580),
    "12": Stack("12", "requirements/cuda12.lock", "2.10.0", (12, 8), 525),
}
CPU_LOCK = "requirements/cpu.lock"


class StackError(ValueError):
    """A driver or CUDA_STACK value that no stack fits; the message says what to do."""


def driver_branch(driver_version: str) -> int:
    """550 for "550.54.15"."""
    try:
        return int(driver_version.strip().split(".")[0])
    except ValueError:
        raise StackError(f"cannot read the NVIDIA driver version {driver_version!r}") from None


def stack_for_driver(driver_version: str) -> Stack:
    """The newest stack the driver runs: CUDA 13 from 580 on, CUDA 12 from 525 on."""
    branch = driver_branch(driver_version)
    for stack in sorted(STACKS.values(), key=lambda s: s.cuda, reverse=True):
        if branch >= stack.min_driver:
            return stack
    oldest = min(s.min_driver for s in STACKS.values())
    raise StackError(
        f"NVIDIA driver {driver_version} is older than {oldest}: no CUDA stack of this project runs on it; "
        f"upgrade the driver to >= {oldest} (CUDA 12 stack) or >= 580 (CUDA 13 stack)"
    )


def stack_for_cuda(torch_cuda: str) -> Stack | None:
    """The stack whose torch was built for this torch.version.cuda ("12.8" -> the CUDA 12 stack)."""
    major = torch_cuda.split(".")[0]
    return STACKS.get(major)


def nvidia_smi_driver() -> str | None:
    """The driver version nvidia-smi reports (first GPU), or None without nvidia-smi or a driver."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def choose(stack: str | None, driver: str | None) -> str:
    """CUDA_STACK as given (checked), else from the driver; "cpu" when there is no driver."""
    if stack:
        if stack not in STACKS and stack != "cpu":
            raise StackError(f"CUDA_STACK must be 12 or 13 (or cpu), got {stack!r}")
        return stack
    if driver is None:
        return "cpu"
    return stack_for_driver(driver).name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="print the CUDA stack (12, 13 or cpu) for this host's driver"
    )
    parser.add_argument("--stack", default="", help="CUDA_STACK as given on make's command line (checked)")
    parser.add_argument("--driver", default=None, help="a driver version instead of asking nvidia-smi")
    args = parser.parse_args(argv)
    try:
        print(choose(args.stack or None, args.driver if args.driver is not None else nvidia_smi_driver()))
    except StackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
