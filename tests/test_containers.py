"""The container plumbing: Dockerfile, compose.yaml, .env.example, .dockerignore and the Makefile's RUNNER=docker.

Static checks run everywhere; `docker compose config` and hadolint run where they are installed (CI stage 2
installs both) and are skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}")
# make's per-run arguments, passed through to the containers; documented in the README, not site settings.
PER_RUN_VARS = {"CONFIG", "SET", "PYTEST_ARGS"}
# What the Makefile derives from the CUDA stack and exports (compose reads them): under `make test` they are in
# the tests' environment, with the values of the stack of that make run, so each `make -n` below starts without.
STACK_VARS = ("CUDA_STACK", "STACK", "IMAGE_STACK", "LOCK", "CUDA_LOCK", "JOB_IMAGE", "CUDA_BASE_IMAGE")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _stages() -> list[tuple[str, str, list[str]]]:
    """(base, name, instructions) per stage of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[tuple[str, str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)$", line, re.IGNORECASE)
        if m:
            stages.append((m.group(1), m.group(2), []))
        elif stages:
            stages[-1][2].append(line)
    return stages


def _defaults(text: str, name: str) -> set[str]:
    """Every default given to NAME: `NAME ?= x` (Makefile), `ARG NAME=x`, `NAME=x`, `${NAME:-x}`."""
    found = set(re.findall(rf"^#?{name}\s*\??=\s*(\S+)", text, re.MULTILINE))
    found |= set(re.findall(rf"^ARG {name}=(\S+)", text, re.MULTILINE))
    found |= set(re.findall(rf"\$\{{{name}:-([^}}]+)\}}", text))
    return found


# ------------------------------------------------------------------------------------------------------------
# compose.yaml


def test_compose_config_is_valid():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("the docker CLI is not installed")
    if subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed (`docker compose version` fails)")
    for extra in ([], ["--profile", "serve"], ["--profile", "ui"]):
        out = subprocess.run(
            [docker, "compose", *extra, "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr


def test_gpu_services_reserve_nvidia_gpus_with_host_ipc_and_ulimits(compose):
    for name in ("job", "vllm"):
        svc = compose["services"][name]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        dev = devices[0]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"], name
        assert ("count" in dev) != ("device_ids" in dev), f"{name}: give count or device_ids"
        assert "GPU_DEVICE_IDS" in str(dev.get("device_ids", dev.get("count"))), name
        assert svc.get("ipc") == "host" or "shm_size" in svc, name
        ulimits = svc["ulimits"]
        memlock = ulimits["memlock"]
        assert memlock == -1 or memlock == {"soft": -1, "hard": -1}, name
        assert ulimits["stack"] == 67108864, name


def test_services_users_profiles_and_commands(compose):
    services = compose["services"]
    assert set(services) == {"job", "test", "vllm", "ui"}
    job, test, vllm, ui = services["job"], services["test"], services["vllm"], services["ui"]
    # files written into the volumes belong to the host user
    for svc in (job, vllm):
        assert svc["user"] == "${UID:-1000}:${GID:-1000}"
        assert svc["env_file"] == [{"path": ".env", "required": False}]
    # the images and their targets
    # (make passes the CUDA 12 stack's tag, base and lock where the driver is older than 580)
    assert job["build"]["target"] == "cuda"
    assert job["build"]["args"]["LOCK"] == "${CUDA_LOCK:-requirements/cuda.lock}"
    assert test["build"]["target"] == "cpu" and test["build"]["args"]["LOCK"] == "requirements/cpu.lock"
    assert job["image"] == "${JOB_IMAGE:-pcbvlm:cuda13}" and test["image"] == "${TEST_IMAGE:-pcbvlm:cpu}"
    # tests: CPU image, no GPU, offline, `make test` inside
    assert "deploy" not in test and test["network_mode"] == "none"
    assert test["command"] == ["make", "test"] and test["environment"]["HF_HUB_OFFLINE"] == "1"
    # profiles: only vllm and ui are optional
    assert "profiles" not in job and "profiles" not in test and vllm["profiles"] == ["serve"]
    assert ui["profiles"] == ["ui"]
    # the web page: the job service with its port published on 127.0.0.1 unless UI_HOST says otherwise
    assert ui["extends"] == {"service": "job"}
    assert ui["ports"] == ["${UI_HOST:-127.0.0.1}:${UI_PORT:-7860}:7860"]
    assert ui["command"][:4] == ["python", "-m", "pcbvlm", "ui"] and "0.0.0.0" in ui["command"]
    # vllm serves the quantized folder as "pcbvlm", from a pinned image
    image = vllm["image"]
    assert image.startswith("${VLLM_IMAGE:-vllm/vllm-openai:v") and not image.endswith(":latest}")
    assert vllm["entrypoint"] == ["vllm", "serve"]
    command = vllm["command"].split()
    assert command[0] == "${VLLM_MODEL:-/outputs/quantized}"
    assert command[command.index("--served-model-name") + 1] == "pcbvlm"
    assert any(v.endswith(":/outputs:ro") for v in vllm["volumes"])


def _targets(svc: dict) -> dict[str, str]:
    """container path -> host path of a service's volumes."""
    out = {}
    for vol in svc["volumes"]:
        spec = re.sub(r":(ro|rw)$", "", vol)
        host, target = spec.rsplit(":", 1)
        out[target] = host
    return out


def test_job_volumes_cover_cache_data_checkpoints_outputs(compose):
    job = compose["services"]["job"]
    mounts = _targets(job)
    for target, var in [
        ("/cache/huggingface", "HOST_HF_HOME"),
        ("/data", "HOST_DATA_DIR"),
        ("/data/raw/DeepPCB", "HOST_DEEPPCB_DIR"),
        ("/checkpoints", "HOST_CHECKPOINTS_DIR"),
        ("/outputs", "HOST_OUTPUTS_DIR"),
        ("/models", "HOST_MODELS_DIR"),
    ]:
        assert target in mounts, target
        assert mounts[target].startswith("${" + var + ":-./"), (target, mounts[target])
    assert mounts["/workspace"] == "." and job["working_dir"] == "/workspace"
    assert job["environment"]["HF_HOME"] == "/cache/huggingface"


@pytest.mark.parametrize("config", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_config_paths_point_into_the_job_volumes(compose, config):
    """Every ${VAR:-default} path of every config is emptied in `job` (a .env value is a host path), so the
    config's own relative default applies under /workspace, where a mount of the same host folder as with
    RUNNER=local lies: the container sees the files that RUNNER=local sees, whatever HOST_* says."""
    job = compose["services"]["job"]
    env = job["environment"]
    mounts = _targets(job)
    data = yaml.safe_load(config.read_text())
    folders = []  # the relative folders the config uses when no variable is set
    for value in [*data.get("paths", {}).values(), (data.get("model") or {}).get("name_or_path")]:
        if not isinstance(value, str):
            continue
        refs = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^}]*)\}", value)
        for var, default in refs:
            assert env.get(var) == "", f"{config.name}: {var} is not emptied in compose service job"
            folders.append(default)
        if not refs and value.startswith("models/"):  # a local model folder (a hub id is not one)
            folders.append(value)
    for default in folders:
        inside = "/workspace/" + default.strip("/")
        target = max(
            (t for t in mounts if t != "/workspace" and (inside == t or inside.startswith(t + "/"))),
            key=len,
            default=None,
        )
        assert target is not None, f"{config.name}: {default} is in no mount under /workspace"
        host_default = mounts[target].split(":-", 1)[1].rstrip("}")
        assert host_default == "./" + target.removeprefix("/workspace/"), (target, mounts[target])
    assert len(folders) >= 4, config.name


def test_env_example_documents_every_variable():
    lines = ENV_EXAMPLE.read_text().splitlines()
    documented = {}
    for i, line in enumerate(lines):
        m = re.match(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m:
            assert i > 0 and lines[i - 1].startswith("# "), f".env.example: {m.group(1)} has no comment line"
            documented[m.group(1)] = m.group(2)
    compose_text = json.dumps(yaml.safe_load(COMPOSE.read_text()))  # without the comments
    used = set(VAR_RE.findall(compose_text)) - PER_RUN_VARS
    assert used <= set(documented), f"not in .env.example: {sorted(used - set(documented))}"
    # compose's defaults are the documented ones
    for name in used:
        for default in _defaults(compose_text, name):
            if documented[name]:
                assert documented[name] == default, (name, documented[name], default)


# ------------------------------------------------------------------------------------------------------------
# Dockerfile, .dockerignore


def test_targets_share_one_path_except_base_and_lock():
    stages = _stages()
    names = [name for _, name, _ in stages]
    assert names == ["wheelhouse", "common", "cpu", "cuda"], names  # cuda last: the default target
    base = {name: frm for frm, name, _ in stages}
    assert base["common"] == "${BASE_IMAGE}" and base["cpu"] == base["cuda"] == "common"
    common = dict((n, ins) for _, n, ins in stages)["common"]
    assert any(i.startswith("ARG LOCK=requirements/cuda.lock") for i in common)
    assert any("--require-hashes" in i and "requirements.lock" in i for i in common)
    assert any(i.startswith("USER ") for i in common) and any("PCBVLM_IN_IMAGE=1" in i for i in common)
    # the targets add nothing but a label and a check of the torch build; cuda also lets the NVIDIA Container
    # Toolkit start it on any driver (the CUDA 12 stack runs on 525+; the preflight checks the driver)
    for _, name, instructions in stages[2:]:
        kinds = sorted(i.split()[0].upper() for i in instructions)
        assert kinds == (["ENV", "LABEL", "RUN"] if name == "cuda" else ["LABEL", "RUN"]), (name, kinds)
        run = next(i for i in instructions if i.upper().startswith("RUN"))
        assert "import sys, torch" in run and "pip" not in run and "apt" not in run
        if name == "cuda":
            assert (
                next(i for i in instructions if i.upper().startswith("ENV")) == "ENV NVIDIA_DISABLE_REQUIRE=1"
            )


def _make_value(text: str, name: str) -> str:
    m = re.search(rf"^{name}\s*[:?]?=\s*(\S+)$", text, re.MULTILINE)
    assert m, f"Makefile: no {name}"
    return m.group(1)


@pytest.mark.parametrize(
    "stack, lock", [("13", "requirements/cuda.lock"), ("12", "requirements/cuda12.lock")]
)
def test_base_images_and_cuda_version_agree_everywhere(stack, lock):
    files = {p: (ROOT / p).read_text() for p in ("Dockerfile", "Makefile", "compose.yaml")}
    cuda_image = _make_value(files["Makefile"], f"CUDA_BASE_IMAGE_{stack}")
    assert _make_value(files["Makefile"], f"STACK_LOCK_{stack}") == lock
    m = re.match(r"nvidia/cuda:(\d+\.\d+)\.\d+-(?:cudnn-)?runtime-ubuntu22\.04$", cuda_image)
    assert m, cuda_image
    text = (ROOT / lock).read_text()
    assert re.search(rf"^nvidia-cuda-runtime(-cu12)?=={re.escape(m.group(1))}\.", text, re.MULTILINE), (
        f"{cuda_image} does not match the CUDA of torch in {lock}"
    )
    if stack == "13":  # the defaults of a plain `docker build` and `docker compose build`
        assert _defaults(files["Dockerfile"], "BASE_IMAGE") == {cuda_image}
        assert _defaults(files["compose.yaml"], "CUDA_BASE_IMAGE") == {cuda_image}
        assert _defaults(files["compose.yaml"], "CUDA_LOCK") == {lock}
    cpu = set().union(*(_defaults(files[p], "CPU_BASE_IMAGE") for p in ("Makefile", "compose.yaml")))
    assert cpu == {"python:3.11-slim-bookworm"}, cpu


def test_dockerignore_keeps_data_weights_caches_and_wheels_out():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for p in [".venv", ".env", "data", "checkpoints", "outputs", "models", "cache", ".git", "wheelhouse/*"]:
        assert p in patterns, p
    assert patterns.index("!wheelhouse/README.md") > patterns.index("wheelhouse/*")


def _hadolint() -> str | None:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def test_hadolint_passes():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip(
            "hadolint is not installed (the CPU lock installs it into .venv; the CUDA image has none)"
        )
    out = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------------------------------------------------
# Makefile: RUNNER=docker runs the same commands in the containers


def _make_n(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    drop = ("CONFIG", "SET", "MAKEFLAGS", "MAKELEVEL", *STACK_VARS)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize(
    "args, command",
    [
        (["preflight", "JOB=train"], "python -m pcbvlm preflight --job train"),
        (["merge", "ADAPTER=/checkpoints/run1"], "python -m pcbvlm merge --adapter '/checkpoints/run1'"),
        (["eval", "MODEL=quantized", "SPLIT=val"], "python -m pcbvlm eval --model 'quantized' --split val"),
    ],
)
def test_docker_runner_runs_the_local_command_in_the_job_service(args, command):
    docker = _make_n(*args, "RUNNER=docker")
    local = _make_n(*args, "RUNNER=local", "VENV=/venv")
    assert f"/venv/bin/{command}" in local
    line = next(x for x in docker.splitlines() if command in x)
    assert re.match(rf"^docker compose run --rm (-T )?job {re.escape(command)}(\s|$)", line), line


def test_docker_runner_runs_make_test_in_the_test_service():
    out = _make_n("test", "RUNNER=docker")
    assert re.search(r"^docker compose run --rm (-T )?test make test$", out, re.MULTILINE), out


def test_docker_runner_passes_container_paths_only():
    env_value = _make_n("data", "RUNNER=docker", "DEEPPCB_DIR=/data/raw/DeepPCB")
    assert "--deeppcb-dir '/data/raw/DeepPCB'" in env_value


def test_build_targets():
    cpu = _make_n("build-cpu", "WHEELHOUSE=wheelhouse", "BASE_IMAGE=local/bookworm")
    assert "--target cpu" in cpu and "--build-arg LOCK=requirements/cpu.lock" in cpu
    assert "--build-arg BASE_IMAGE=local/bookworm" in cpu
    assert "--build-context wheelhouse=wheelhouse --build-arg PIP_NO_INDEX=1" in cpu
    cuda = _make_n("build", "CUDA_STACK=13", "PIP_INDEX_URL=https://pypi.tuna.tsinghua.edu.cn/simple")
    assert "--target cuda --tag pcbvlm:cuda13" in cuda and "--build-arg LOCK=requirements/cuda.lock" in cuda
    assert "--build-arg BASE_IMAGE=nvidia/cuda:13.0" in cuda
    assert "--build-arg PIP_INDEX_URL=https://pypi.tuna.tsinghua.edu.cn/simple" in cuda
    assert "--build-context" not in cuda and "PIP_NO_INDEX" not in cuda
    cuda12 = _make_n("build", "CUDA_STACK=12", "WHEELHOUSE=wheelhouse", "BASE_IMAGE=local/bookworm")
    assert (
        "--target cuda --tag pcbvlm:cuda12" in cuda12
        and "--build-arg LOCK=requirements/cuda12.lock" in cuda12
    )
    assert "--build-arg BASE_IMAGE=local/bookworm" in cuda12
    assert "--build-context wheelhouse=wheelhouse --build-arg PIP_NO_INDEX=1" in cuda12
    assert "nvidia/cuda:12.8" in _make_n("build", "CUDA_STACK=12")


# ------------------------------------------------------------------------------------------------------------
# The CUDA stack: make setup and make build pick it from the driver nvidia-smi reports (lib/pcbvlm/stacks.py)


def _make_with_driver(tmp_path: Path, driver: str | None, *args: str) -> subprocess.CompletedProcess:
    """`make -n ARGS` on a host whose nvidia-smi reports DRIVER (None: nvidia-smi fails, no driver loaded)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    body = f'echo "{driver}"' if driver else 'echo "NVIDIA-SMI has failed" >&2; exit 9'
    smi.write_text(f"#!/bin/sh\n{body}\n")
    smi.chmod(0o755)
    drop = ("CONFIG", "SET", "MAKEFLAGS", "MAKELEVEL", "PCBVLM_IN_IMAGE", *STACK_VARS)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        ["make", "-n", "--no-print-directory", f"VENV={tmp_path / 'venv'}", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "driver, stack, lock",
    [
        ("535.104.05", "12", "requirements/cuda12.lock"),
        ("550.54.15", "12", "requirements/cuda12.lock"),
        ("570.86.10", "12", "requirements/cuda12.lock"),
        ("580.65.06", "13", "requirements/cuda.lock"),
        ("590.44.01", "13", "requirements/cuda.lock"),
    ],
)
def test_setup_and_build_pick_the_stack_of_the_driver(tmp_path, driver, stack, lock):
    setup = _make_with_driver(tmp_path, driver, "setup")
    assert setup.returncode == 0, setup.stderr
    assert f"-r {lock}" in setup.stdout and f"(CUDA stack: {stack})" in setup.stdout
    build = _make_with_driver(tmp_path, driver, "build")
    assert build.returncode == 0, build.stderr
    assert f"--tag pcbvlm:cuda{stack} " in build.stdout and f"--build-arg LOCK={lock}" in build.stdout
    assert f"--build-arg BASE_IMAGE=nvidia/cuda:{'12.8' if stack == '12' else '13.0'}." in build.stdout


def test_cuda_stack_overrides_the_driver_and_no_driver_means_cpu(tmp_path):
    out = _make_with_driver(tmp_path, "535.104.05", "setup", "CUDA_STACK=13")
    assert "-r requirements/cuda.lock" in out.stdout
    out = _make_with_driver(tmp_path, "590.44.01", "build", "CUDA_STACK=12")
    assert "--build-arg LOCK=requirements/cuda12.lock" in out.stdout
    # nvidia-smi that fails (no driver loaded): the CPU lock; the job image is still the CUDA 13 one
    out = _make_with_driver(tmp_path, None, "setup")
    assert "-r requirements/cpu.lock" in out.stdout
    assert "--tag pcbvlm:cuda13 " in _make_with_driver(tmp_path, None, "build").stdout


@pytest.mark.parametrize(
    "driver, args, message",
    [
        ("470.256.02", [], "NVIDIA driver 470.256.02 is older than 525"),
        ("550.54.15", ["CUDA_STACK=11"], "CUDA_STACK must be 12 or 13 (or cpu), got '11'"),
    ],
)
def test_no_stack_fits_stops_setup_with_the_reason(tmp_path, driver, args, message):
    out = _make_with_driver(tmp_path, driver, "setup", *args)
    assert message in out.stderr
    assert "error: no lock for this host" in out.stdout  # the recipe's first line: exit 2 before any install


def test_check_images_builds_both_stacks_by_hand_not_in_ci():
    out = _make_n("check-images")
    assert 'STACKS="12 13" .ci/check-images' in out
    assert 'STACKS="12" .ci/check-images' in _make_n("check-images", "STACKS=12")
    script = (ROOT / ".ci" / "check-images").read_text()
    for step in (
        "make --no-print-directory wheelhouse",
        "make --no-print-directory build",
        "make test",
        "make demo",
    ):
        assert step in script, step
    assert "import torch, bitsandbytes, deepspeed, llmcompressor, liger_kernel" in script
    assert "--network=none" in script and "--network none" in script  # the build and the checks run offline
    ci = (ROOT / ".ci" / "run").read_text() + (ROOT / ".ci" / "docker-stage").read_text()
    commands = [line for line in ci.splitlines() if not line.lstrip().startswith("#")]
    # several GB of wheels per stack: not within CI's time and disk
    assert not [line for line in commands if "check-images" in line]
