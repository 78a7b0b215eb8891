"""Launching a job through `accelerate launch` with the accelerate profile the user asked for.

The profile is a file `config/accelerate/<profile>.yaml`: how many processes, which GPUs, plain DDP or
DeepSpeed ZeRO-2/3. It comes from, in order: `PROFILE=` (the `profile` argument), else the config's
`train.accelerate_profile` after CONFIG and SET are applied, so `make train SET="train.accelerate_profile=zero2"`
and `make train CONFIG=config/tiny.yaml` launch the profile the resolved config names.

accelerate's own launchers end a failed run with a traceback (`CalledProcessError` for one process,
`ChildFailedError` for several) and exit code 1, whatever the job returned. `run_accelerate` runs them
in this process and turns those into the job's own exit code (0 ok, 1 failed, 2 bad input, 3 disk guard:
`pcbvlm.errors`), so the job's one-line `error:` stays the last thing a user reads.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import yaml

from pcbvlm.config import Config, load_config
from pcbvlm.errors import EXIT_FAILED, ConfigError

ROOT = Path(__file__).resolve().parents[2]
PROFILES_DIR = ROOT / "config" / "accelerate"
# The training process that `accelerate launch` starts (as `python -m`), once per GPU.
TRAIN_MODULE = "pcbvlm.commands.train"
# NVLink multicast can take a shared host's GPUs out of service: off in every process we start.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

# Why the zero3 profile is refused for QLoRA (README, "Several GPUs"; BENCHMARKS.md, "Several GPUs").
ZERO3_QLORA_REFUSAL = (
    "DeepSpeed ZeRO-3 with QLoRA (train.quantization=nf4) is refused: it buys nothing ddp/zero2 need "
    "(the 19 GiB NF4 base fits each 80 GB GPU: zero2 peaks at 63 GiB per GPU at micro-batch 16), it turns "
    "off Liger's fused loss (which reads lm_head's weight, sharded by ZeRO-3) and all-gathers every layer "
    "in each forward and recomputation, and on GPUs only the benchmark's training step ran under it (a "
    "16-layer cut), never this job's loading, checkpointing and resuming"
)


def available_profiles(profiles_dir: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in profiles_dir.glob("*.yaml"))


def profile_file(profile: str, profiles_dir: Path = PROFILES_DIR) -> Path:
    """config/accelerate/<profile>.yaml, or a ConfigError listing the profiles there are."""
    path = profiles_dir / f"{profile}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"train.accelerate_profile: no profile '{profile}' ({path} does not exist); "
            f"choose one of: {', '.join(available_profiles(profiles_dir))}"
        )
    return path


def profile_settings(profile: str, profiles_dir: Path = PROFILES_DIR) -> dict:
    """The profile's YAML, with the DeepSpeed ZeRO stage read from its DeepSpeed JSON (`zero_stage`)."""
    import json

    path = profile_file(profile, profiles_dir)
    settings = yaml.safe_load(path.read_text()) or {}
    ds = settings.get("deepspeed_config") or {}
    ds_file = ds.get("deepspeed_config_file")
    if settings.get("distributed_type") == "DEEPSPEED" and ds_file:
        ds_path = Path(ds_file) if Path(ds_file).is_absolute() else ROOT / ds_file
        settings["zero_stage"] = json.loads(ds_path.read_text())["zero_optimization"]["stage"]
    return settings


def resolve_profile(cfg: Config, profile: str | None = None) -> str:
    """PROFILE= wins over the config's train.accelerate_profile (after CONFIG and SET)."""
    return profile or cfg.train.accelerate_profile


def accelerate_args(
    profile: str,
    module: str,
    script_args: Sequence[str] = (),
    num_processes: int | None = None,
    main_process_port: int | None = None,
) -> list[str]:
    """The arguments of `accelerate launch` for the Python module `module` (run as `python -m`) under
    `profile`. A module, not a script path: a script's folder would come first on sys.path, and the command
    modules' names (evaluate, bench, ...) would hide packages of the same name."""
    args = ["--config_file", str(profile_file(profile))]
    if num_processes is not None:
        args += ["--num_processes", str(num_processes)]
    if main_process_port is not None:
        args += ["--main_process_port", str(main_process_port)]
    return [*args, "--module", module, *script_args]


def run_accelerate(args: Sequence[str]) -> int:
    """`accelerate launch <args>` in this process; the job's own exit code, without a launcher traceback.

    Several processes: the exit code of the lowest rank that exited by itself (the others may have
    been stopped by the agent)."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    for key, value in NO_MULTICAST.items():
        os.environ.setdefault(key, value)
    parsed = launch_command_parser().parse_args(list(args))
    # torch's elastic agent logs each failed worker (ERROR "failed (exitcode: 2) ...") after the job's own
    # `error:` line; the job has said what went wrong, so the agent's loggers stay quiet.
    import torch.distributed.run  # noqa: F401  (creates the elastic loggers)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        launch_command(parsed)
    except subprocess.CalledProcessError as err:  # one process (accelerate's simple launcher)
        return _exit_code(err.returncode)
    except Exception as err:  # several processes: torch.distributed.elastic's ChildFailedError
        failures = getattr(err, "failures", None)
        if not failures:
            raise
        # The agent stops the other ranks (SIGTERM) once one fails: the job's own code is a positive one.
        codes = [failures[rank].exitcode for rank in sorted(failures)]
        return _exit_code(next((code for code in codes if code > 0), codes[0]))
    return 0


def _exit_code(code: int) -> int:
    """A negative code is a signal (-9 = killed): the shell's 128 + signal."""
    return 128 - code if code < 0 else (code or EXIT_FAILED)


def launch_train(
    config: str | Path,
    overrides: Sequence[str] = (),
    profile: str | None = None,
    resume: str | None = None,
    num_processes: int | None = None,
) -> int:
    """Train under the accelerate profile the resolved config (or `profile`) names; returns the job's
    exit code. A plain function: `make train` and any command line call it."""
    cfg = load_config(config, list(overrides))
    chosen = resolve_profile(cfg, profile)
    settings = profile_settings(chosen)
    if settings.get("zero_stage") == 3 and cfg.train.quantization == "nf4":
        raise ConfigError(f"train.accelerate_profile={chosen}: {ZERO3_QLORA_REFUSAL}; use zero2 or ddp")
    processes = num_processes or int(settings.get("num_processes", 1))
    zero = f", DeepSpeed ZeRO-{settings['zero_stage']}" if "zero_stage" in settings else ""
    from pcbvlm.cli import data_folder_line

    print(data_folder_line(cfg, "trains on"), flush=True)
    print(
        f"==> accelerate profile {chosen} ({profile_file(chosen).relative_to(ROOT)}): "
        f"{processes} process{'es' if processes != 1 else ''}{zero}",
        flush=True,
    )
    # Every process gets the same config: CONFIG and the overrides as arguments (SET is already in them).
    os.environ.pop("SET", None)
    script_args = ["--config", str(config)]
    for override in overrides:
        script_args += ["--set", override]
    if resume:
        script_args += ["--resume", resume]
    return run_accelerate(accelerate_args(chosen, TRAIN_MODULE, script_args, num_processes))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pcbvlm.launch [--config C] [--set K=V ...] [--profile P] [--resume R]`: CONFIG, SET,
    PROFILE and RESUME from the environment (make's variables) when not given."""
    from pcbvlm.cli import make_parser

    parser = make_parser("train", "QLoRA fine-tuning under the chosen accelerate profile")
    parser.add_argument(
        "--profile", default=os.environ.get("PROFILE") or None, help="config/accelerate/<name>"
    )
    parser.add_argument("--resume", default=os.environ.get("RESUME") or None, help="auto, no, or a folder")
    parser.add_argument("--num-processes", type=int, help="override the profile's process count")
    args = parser.parse_args(argv)
    overrides = [*os.environ.get("SET", "").split(), *args.overrides]
    return launch_train(args.config, overrides, args.profile, args.resume, args.num_processes)


if __name__ == "__main__":
    from pcbvlm.cli import run_job

    run_job(main)
