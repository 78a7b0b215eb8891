"""The CUDA stacks (lib/pcbvlm/stacks.py): which lock a driver gets, and that the table matches the locks.

The Makefile's use of it (make setup / make build on a host with a given driver) is tested in
tests/test_containers.py; the preflight's advice in tests/test_preflight.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pcbvlm.preflight.checks import MINOR_COMPAT_MIN_DRIVER, driver_max_cuda, min_driver_for
from pcbvlm.stacks import STACKS, StackError, choose, stack_for_cuda, stack_for_driver

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "driver, stack",
    [
        ("525.60.13", "12"),
        ("535.104.05", "12"),
        ("550.54.15", "12"),
        ("570.86.10", "12"),
        ("575.57.08", "12"),
        ("580.65.06", "13"),
        ("590.44.01", "13"),
        (" 550.127.05\n", "12"),
    ],
)
def test_driver_maps_to_stack(driver, stack):
    assert stack_for_driver(driver).name == stack
    assert choose(None, driver) == stack


@pytest.mark.parametrize("driver", ["470.256.02", "520.61.05", "not-a-driver"])
def test_driver_without_a_stack_is_an_error_that_says_what_to_do(driver):
    with pytest.raises(StackError, match=r"older than 525|cannot read"):
        stack_for_driver(driver)


def test_choose_override_and_no_driver():
    assert choose("12", "590.44.01") == "12"  # CUDA_STACK wins over the driver
    assert choose("13", "535.104.05") == "13"
    assert choose(None, None) == "cpu"  # no nvidia-smi
    with pytest.raises(StackError, match="CUDA_STACK must be 12 or 13"):
        choose("11", None)


def test_stack_of_an_installed_torch():
    assert stack_for_cuda("12.8").name == "12" and stack_for_cuda("13.0").name == "13"
    assert stack_for_cuda("11.8") is None


def test_script_prints_the_stack_and_fails_in_one_line():
    script = ROOT / "lib" / "pcbvlm" / "stacks.py"
    ok = subprocess.run([sys.executable, script, "--driver", "550.54.15"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout == "12\n"
    bad = subprocess.run([sys.executable, script, "--driver", "470.1"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert (
        bad.stderr.startswith("error: NVIDIA driver 470.1 is older than 525") and bad.stderr.count("\n") == 1
    )


@pytest.mark.parametrize("name", sorted(STACKS))
def test_stack_table_matches_its_lock_and_the_driver_table(name):
    stack = STACKS[name]
    lock = (ROOT / stack.lock).read_text()
    assert re.search(rf"^torch=={re.escape(stack.torch)} ", lock, re.MULTILINE), stack.lock
    runtime = re.search(r"^nvidia-cuda-runtime(?:-cu\d+)?==(\d+)\.(\d+)\.", lock, re.MULTILINE)
    assert runtime and (int(runtime[1]), int(runtime[2])) == stack.cuda, stack.lock
    # the oldest driver of a stack: where the driver table starts its CUDA major (minor-version compatibility)
    assert driver_max_cuda(str(stack.min_driver))[0] == stack.cuda[0]
    assert driver_max_cuda(str(stack.min_driver - 1))[0] < stack.cuda[0]
    assert MINOR_COMPAT_MIN_DRIVER[stack.cuda[0]] == stack.min_driver
    assert min_driver_for((stack.cuda[0], 0)) <= stack.min_driver
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^STACK_LOCK_{name}\s*:=\s*{re.escape(stack.lock)}$", makefile, re.MULTILINE)
