"""The checks: pure functions of the measured `Facts` and the config, each one a `Check` verdict.

`run_checks(cfg, job, facts, allow_cpu)` returns a `Report`: every check (pass, warn, fail, skip) with
a one-line detail and, for failures, a remedy; the job's memory estimates with their breakdown.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

from pcbvlm.config import Config
from pcbvlm.preflight import estimate as est
from pcbvlm.preflight.estimate import GB, GIB, Estimate
from pcbvlm.preflight.facts import Facts, GpuFact, job_packages
from pcbvlm.shapes import ModelShape, builtin_32b_family, count_parameters
from pcbvlm.stacks import STACKS, StackError, stack_for_cuda, stack_for_driver

JOBS = ("train", "merge", "quantize", "eval")
Status = Literal["pass", "warn", "fail", "skip"]

# Compute capability -> architecture. A minor of None matches any minor of that major.
_ARCHITECTURES: dict[tuple[int, int | None], str] = {
    (3, None): "Kepler",
    (5, None): "Maxwell",
    (6, None): "Pascal",
    (7, 0): "Volta",  # V100
    (7, 2): "Volta",  # Jetson Xavier
    (7, 5): "Turing",  # T4, RTX 20xx
    (8, 0): "Ampere",  # A100, A800, A30
    (8, 6): "Ampere",  # A10, A40, RTX 30xx
    (8, 7): "Ampere",  # Jetson Orin
    (8, 9): "Ada Lovelace",  # L4, L40, RTX 40xx
    (9, 0): "Hopper",  # H100, H800, H200, H20
    (10, None): "Blackwell",  # B200, B300, GB200
    (11, None): "Blackwell",  # Jetson Thor
    (12, None): "Blackwell",  # RTX 50xx, RTX PRO 6000, DGX Spark
}

# Driver branch -> the newest CUDA it supports (NVIDIA's CUDA toolkit release notes, table 3).
DRIVER_MAX_CUDA: dict[int, tuple[int, int]] = {
    450: (11, 0),
    470: (11, 4),
    510: (11, 6),
    515: (11, 7),
    520: (11, 8),
    525: (12, 0),
    530: (12, 1),
    535: (12, 2),
    545: (12, 3),
    550: (12, 4),
    555: (12, 5),
    560: (12, 6),
    565: (12, 7),
    570: (12, 8),
    575: (12, 9),
    580: (13, 0),
}


def gpu_architecture(capability: tuple[int, int]) -> str:
    """'Ampere' for (8, 0): the A100 and A800 are Ampere, not Hopper (sm90 is Hopper: H100/H800/H200)."""
    major, minor = capability
    return (
        _ARCHITECTURES.get((major, minor))
        or _ARCHITECTURES.get((major, None))
        or f"unknown (sm{major}{minor})"
    )


def describe_gpu(gpu: GpuFact) -> str:
    major, minor = gpu.capability
    return (
        f"{gpu.name}: {gpu_architecture(gpu.capability)} sm{major}{minor}, "
        f"{gpu.total_bytes / GIB:.1f} GiB, {gpu.free_bytes / GIB:.1f} GiB free"
    )


def _version_tuple(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    parts = text.strip().split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return None


def driver_max_cuda(driver_version: str) -> tuple[int, int] | None:
    """The newest CUDA a driver supports, by the table; None for a driver older than 450."""
    try:
        major = int(driver_version.strip().split(".")[0])
    except ValueError:
        return None
    branches = [b for b in DRIVER_MAX_CUDA if b <= major]
    return DRIVER_MAX_CUDA[max(branches)] if branches else None


def min_driver_for(cuda: tuple[int, int]) -> int | None:
    fits = [b for b, c in DRIVER_MAX_CUDA.items() if c >= cuda]
    return min(fits) if fits else None


# CUDA major -> the oldest driver branch that runs every CUDA <major>.x build (CUDA minor-version compatibility:
# NVIDIA's CUDA compatibility guide). Code compiled for the GPU runs; only JIT from a newer PTX needs a newer driver,
# and torch's wheels carry compiled code for sm80 (A800) and sm90.
MINOR_COMPAT_MIN_DRIVER: dict[int, int] = {11: 450} | {s.cuda[0]: s.min_driver for s in STACKS.values()}


def install_stack_command(driver_version: str, in_image: bool) -> str:
    """The command that installs the CUDA stack this driver runs, or what to do when none does."""
    try:
        stack = stack_for_driver(driver_version)
    except StackError as err:
        return str(err)
    what = f"the CUDA {stack.name} stack (torch {stack.torch}, CUDA {stack.cuda[0]}.{stack.cuda[1]})"
    if in_image:
        return f"build the job image of {what} on the host: make build CUDA_STACK={stack.name}"
    return (
        f"install {what}: rm -rf .venv && make setup CUDA_STACK={stack.name} "
        f"(or its image: make build CUDA_STACK={stack.name})"
    )


def installed_stack(facts: Facts) -> str:
    """'the CUDA 12 stack (torch 2.10.0+cu128, built for CUDA 12.8)', from torch.version.cuda."""
    torch = f"torch {facts.torch_version or '?'}"
    if facts.torch_cuda is None:
        return f"the CPU stack ({torch}, a CPU build)"
    stack = stack_for_cuda(facts.torch_cuda)
    name = f"the CUDA {stack.name} stack" if stack else "a CUDA build of no stack of this project"
    return f"{name} ({torch}, built for CUDA {facts.torch_cuda})"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    remedy: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "remedy": self.remedy}


@dataclass
class Report:
    job: str
    checks: list[Check]
    estimates: list[Estimate] = field(default_factory=list)
    shape_source: str = ""
    allow_cpu: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def check(self, name: str) -> Check:
        """The check of that name (tests and callers look verdicts up by name)."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "passed": self.passed,
            "allow_cpu": self.allow_cpu,
            "model_shape_source": self.shape_source,
            "checks": [c.to_dict() for c in self.checks],
            "estimates": [e.to_dict() for e in self.estimates],
            **self.info,
        }


# ---------------------------------------------------------------------------------------------------------


def model_shape(cfg: Config, facts: Facts) -> tuple[ModelShape | None, str]:
    """The model's shape from its config.json where on disk, else the built-in 32B-class shape of the
    family whose 32B hub id it is (pcbvlm.families); (None, why) when neither."""
    model = facts.model
    reason = "config.json not on disk"
    if model is not None and model.config is not None:
        try:
            return ModelShape.from_config(model.config), f"config.json at {model.path}"
        except (ValueError, TypeError) as err:
            reason = f"config.json at {model.path} unusable ({err})"
    family = builtin_32b_family(cfg.model.name_or_path)
    if family is not None:
        shape = ModelShape.from_config(family.config_dict_32b())
        name = family.hub_id_32b.split("/")[-1].removesuffix("-Instruct")
        return shape, f"built-in {name} shape (pcbvlm.families; {reason})"
    if model is not None and model.kind == "build-tiny":
        return (
            None,
            f"the tiny model at {model.path} is built on first use; its memory is estimated once built",
        )
    return None, reason


def uses_gpu(cfg: Config, job: str) -> tuple[bool, str]:
    """Whether the job runs on the GPU, and if not, why."""
    if cfg.resources.device == "cpu":
        return False, "resources.device is cpu"
    if job == "merge" and cfg.resources.merge_device == "cpu":
        return False, "merge runs on the CPU (resources.merge_device cpu)"
    if job == "quantize" and cfg.quantize.device == "cpu":
        return False, "quantize.device is cpu"
    return True, ""


def run_checks(cfg: Config, job: str, facts: Facts, allow_cpu: bool = False) -> Report:
    if job not in JOBS:
        raise ValueError(f"job must be one of {', '.join(JOBS)}, got {job!r}")
    allow_cpu = allow_cpu or cfg.resources.allow_cpu
    shape, source = model_shape(cfg, facts)
    checks: list[Check] = []
    gpu_wanted, why_not = uses_gpu(cfg, job)
    usable = facts.torch_cuda_available and bool(facts.gpus)
    gpu = facts.gpus[0] if facts.gpus else None
    estimates: list[Estimate] = []

    # --- GPU, driver, bf16
    if gpu_wanted and not usable and allow_cpu:
        cpu_note = "no usable GPU" if not facts.gpus else "torch cannot use the GPU"
        for name in ("gpu", "cuda driver", "bf16", "vram"):
            checks.append(Check(name, "skip", f"skipped: CPU allowed ({cpu_note}; the job runs on the CPU)"))
        gpu_wanted = False
    elif not gpu_wanted:
        if cfg.resources.device == "cpu" and not allow_cpu:
            checks.append(
                Check(
                    "gpu",
                    "fail",
                    "resources.device is cpu but CPU runs are not allowed",
                    "set resources.allow_cpu=true (the tiny model only) or resources.device=auto",
                )
            )
        else:
            note = f"skipped: CPU allowed ({why_not})" if allow_cpu else f"skipped: {why_not}"
            checks.append(Check("gpu", "skip", note))
    else:
        checks += _check_gpu(facts)
        if gpu is not None:
            checks.append(_check_driver(facts))
            checks.append(_check_bf16(cfg, job, gpu))
        else:
            checks.append(Check("vram", "skip", "skipped: no GPU to compare the estimate with"))

    # --- memory
    gpu_est = _gpu_estimate(cfg, job, shape, facts)
    if gpu_est is not None:
        estimates.append(gpu_est)
    if gpu_wanted and gpu is not None and usable:
        checks.append(_check_vram(cfg, job, shape, source, gpu, gpu_est, facts))
    elif gpu_wanted and gpu is not None:
        checks.append(Check("vram", "skip", "skipped: torch cannot use the GPU (see above)"))
    ram_est = _ram_estimate(cfg, job, shape, gpu_wanted)
    estimates.append(ram_est)
    checks.append(_check_ram(job, ram_est, facts, shape, source))

    # --- disk, shm
    checks += _check_disks(cfg, job, shape, facts)
    if job == "train":
        checks.append(_check_shm(cfg, facts))
        checks.append(check_profile(cfg, facts, gpu_wanted and usable))

    # --- model, data, caches
    checks += _check_model(cfg, job, shape, facts)
    checks.append(_check_data(job, facts, allow_cpu))
    checks += _check_packages(cfg, job, facts)
    if job in ("train", "eval") and (job == "eval" or cfg.train.quantization == "nf4"):
        checks.append(_check_bnb(cfg, job, facts, gpu_wanted and usable))

    info: dict[str, Any] = {"model": cfg.model.name_or_path, "gpu_source": facts.gpu_source}
    if shape is not None:
        counts = count_parameters(shape)
        info["params"] = {k: v for k, v in counts.__dict__.items()} | {"total": counts.total}
        info["artifact_sizes_gib"] = est.artifact_sizes(shape, cfg).to_dict()
    return Report(
        job=job, checks=checks, estimates=estimates, shape_source=source, allow_cpu=allow_cpu, info=info
    )


def _check_gpu(facts: Facts) -> list[Check]:
    if not facts.gpus:
        return [
            Check(
                "gpu",
                "fail",
                "no NVIDIA GPU found (torch sees 0 devices; NVML and nvidia-smi see none)",
                "run on the GPU host (one A800 80 GB); in Docker add --gpus all (RUNNER=docker does); "
                "for the CPU demo use CONFIG=config/tiny.yaml or --allow-cpu",
            )
        ]
    listing = "; ".join(describe_gpu(g) for g in facts.gpus)
    count = f"{len(facts.gpus)} GPU{'s' if len(facts.gpus) > 1 else ''}"
    if not facts.torch_cuda_available:
        if facts.torch_cuda is None:
            why = f"torch {facts.torch_version or '?'} is a CPU build (torch.version.cuda is None)"
            fix = (
                install_stack_command(facts.driver_version, _in_image(facts))
                if facts.driver_version
                else "install a CUDA stack: rm -rf .venv && make setup CUDA_STACK=13 (driver >= 580) or "
                "CUDA_STACK=12 (driver >= 525); or use RUNNER=docker"
            )
        else:
            why = f"torch.cuda.is_available() is False (torch built for CUDA {facts.torch_cuda})"
            fix = "see the cuda driver check; check CUDA_VISIBLE_DEVICES and the container's --gpus"
        return [Check("gpu", "fail", f"{count} found by {facts.gpu_source} ({listing}) but {why}", fix)]
    one = " (jobs use cuda:0)" if len(facts.gpus) > 1 else ""
    return [Check("gpu", "pass", f"{count}: {listing}{one}")]


def _in_image(facts: Facts) -> bool:
    return bool(facts.env.get("PCBVLM_IN_IMAGE"))


def _check_driver(facts: Facts) -> Check:
    """The driver against the installed stack's CUDA; when they do not fit, the command for the stack that does."""
    if facts.torch_cuda is None:
        return Check("cuda driver", "skip", "torch is a CPU build: no CUDA version to match")
    need = _version_tuple(facts.torch_cuda)
    installed = installed_stack(facts)
    if facts.driver_version is None or need is None:
        return Check("cuda driver", "warn", f"driver version unknown; installed: {installed}")
    branch = facts.driver_version.split(".")[0]
    top = driver_max_cuda(facts.driver_version)
    reported = f"; the driver reports CUDA {facts.nvml_cuda_version}" if facts.nvml_cuda_version else ""
    fix = install_stack_command(facts.driver_version, _in_image(facts))
    upgrade = MINOR_COMPAT_MIN_DRIVER.get(need[0]) or min_driver_for(need) or 580
    if top is None:
        return Check(
            "cuda driver",
            "fail",
            f"driver {facts.driver_version} is older than 450 and supports no CUDA 11+; installed: {installed}",
            fix,
        )
    compat = top < need and top[0] == need[0] and int(branch) >= MINOR_COMPAT_MIN_DRIVER.get(need[0], 10**6)
    if top < need and not compat:
        return Check(
            "cuda driver",
            "fail",
            f"driver {branch} supports CUDA <= {top[0]}.{top[1]}, this environment needs {facts.torch_cuda}; "
            f"installed: {installed}{reported}",
            fix
            if fix.startswith("NVIDIA driver")
            else f"{fix}; or upgrade the NVIDIA driver to >= {upgrade}",
        )
    detail = (
        f"driver {facts.driver_version} supports CUDA <= {top[0]}.{top[1]}; installed: {installed}{reported}"
    )
    if compat:
        detail += (
            f"; runs through CUDA {need[0]} minor-version compatibility (driver >= "
            f"{MINOR_COMPAT_MIN_DRIVER[need[0]]}: compiled kernels yes, JIT from newer PTX no)"
        )
    fits = stack_for_cuda(facts.torch_cuda)
    try:
        best = stack_for_driver(facts.driver_version)
    except StackError:
        best = None
    if best is not None and fits is not None and best.cuda > fits.cuda:
        detail += f"; this driver's default is the CUDA {best.name} stack (CUDA_STACK={best.name})"
    return Check("cuda driver", "pass", detail)


def _check_bf16(cfg: Config, job: str, gpu: GpuFact) -> Check:
    major, minor = gpu.capability
    arch = f"{gpu_architecture(gpu.capability)} sm{major}{minor}"
    if major >= 8:
        return Check("bf16", "pass", f"bf16 supported ({arch})")
    precision = cfg.train.precision
    if job != "train" or precision in ("fp16", "fp32"):
        return Check("bf16", "warn", f"no bf16 on {arch}: models run in fp16")
    if precision == "bf16":
        return Check(
            "bf16",
            "fail",
            f"train.precision is bf16 but {arch} has no bf16 (needs sm80+, Ampere or newer)",
            "set train.precision=fp16",
        )
    return Check("bf16", "warn", f"no bf16 on {arch}: precision auto falls back to fp16")


def _gpu_estimate(cfg: Config, job: str, shape: ModelShape | None, facts: Facts) -> Estimate | None:
    if shape is None:
        return None
    if job == "train":
        return est.estimate_train_vram(shape, cfg)
    if job == "eval":
        return est.estimate_eval_vram(
            shape, cfg, weights=_eval_weights(facts), packed_bytes=facts.quantized_bytes
        )
    if job == "merge":
        return est.estimate_merge_memory(shape, cfg) if cfg.resources.merge_device == "cuda" else None
    return est.estimate_quantize_vram(shape, cfg)


def _eval_weights(facts: Facts) -> str:
    """Evaluation loads the AWQ model when one exists under outputs/, else the NF4 base with the adapter."""
    return "w4a16" if facts.outputs.get("quantized") else "nf4"


def _check_vram(
    cfg: Config,
    job: str,
    shape: ModelShape | None,
    source: str,
    gpu: GpuFact,
    need: Estimate | None,
    facts: Facts,
) -> Check:
    if need is None:
        return Check("vram", "skip", f"no estimate: {source}")
    free, total = gpu.free_bytes, gpu.total_bytes
    detail = f"{need.what} needs ~{need.total_gib:.1f} GiB; cuda:0 has {free / GIB:.1f} of {total / GIB:.1f} GiB free"
    if need.total_bytes <= free:
        return Check("vram", "pass", detail)
    if job == "train":
        fix = est.suggest_train_fit(shape, cfg, free)
    elif job == "eval":
        fix = est.suggest_eval_fit(shape, cfg, free, _eval_weights(facts), facts.quantized_bytes)
    elif job == "quantize":
        fix = est.suggest_quantize_fit(shape, cfg, free)
    else:
        fix = "set resources.merge_device=cpu (needs ~67 GB of RAM for 32B)"
    if need.total_bytes <= total:
        fix += f"; other processes hold {(total - free) / GIB:.1f} GiB (nvidia-smi shows them)"
    return Check("vram", "fail", detail, fix)


def _ram_estimate(cfg: Config, job: str, shape: ModelShape | None, on_gpu: bool) -> Estimate:
    """RAM of the job; on the CPU (demo) the training step itself lives in RAM."""
    ram = est.estimate_ram(job, shape, cfg)
    if job == "train" and not on_gpu and shape is not None:
        step = est.estimate_train_vram(shape, cfg, margin_gib=0.0)
        items = tuple(i for i in ram.items) + tuple(
            est.Item(f"CPU step: {i.name}", i.bytes, i.note, "static", i.counted)
            for i in step.items
            if i.counted
        )
        return Estimate("train on the CPU, RAM", "ram", items, step.inputs)
    return ram


def _check_ram(job: str, need: Estimate, facts: Facts, shape: ModelShape | None, source: str) -> Check:
    avail = facts.ram_available_bytes
    detail = f"{need.what} needs ~{need.total_gib:.1f} GiB; {avail / GIB:.1f} of {facts.ram_total_bytes / GIB:.1f} GiB available"
    if shape is None:
        detail += f" (fixed terms only: {source})"
    if need.total_bytes <= avail:
        return Check("ram", "pass", detail)
    fix = f"free RAM or use a host with >= {need.total_gib:.0f} GiB"
    if job == "merge":
        fix += "; or resources.merge_device=cuda (the merge then needs that much GPU memory instead)"
    elif job == "train" and any(i.name.startswith("offloaded checkpoint inputs") for i in need.items):
        fix += "; or train.offload_checkpoints=false (the checkpointed layers' inputs then stay on the GPU)"
    elif job == "quantize":
        fix += " (llm-compressor holds the whole bf16 model in RAM and moves one layer at a time to the GPU)"
    return Check("ram", "fail", detail, fix)


def disk_needs(cfg: Config, job: str, shape: ModelShape | None, facts: Facts) -> dict[str, tuple[float, str]]:
    """Bytes each role's volume must take for the job: role -> (bytes, what)."""
    needs: dict[str, tuple[float, str]] = {}
    sizes = est.artifact_sizes(shape, cfg) if shape is not None else None
    model = facts.model
    needs_base = job in ("train", "merge") or (job == "eval" and _eval_weights(facts) == "nf4")
    if needs_base and sizes is not None and model is not None and model.kind == "hub" and not model.complete:
        missing = max(0.0, sizes.base_download - model.on_disk_bytes)
        needs["hf_cache"] = (missing, f"base model download {missing / GIB:.1f} GiB (bf16, 2 B/param)")
    if job == "train" and sizes is not None:
        n = cfg.train.save_total_limit + 1  # the Trainer writes checkpoint N+1 before it removes the oldest
        reserve = cfg.train.disk_reserve_gb * GB
        needs["checkpoints"] = (
            n * sizes.checkpoint + sizes.adapter + reserve,
            f"{n} checkpoints x {sizes.checkpoint / GIB:.1f} GiB + adapter {sizes.adapter / GIB:.1f} GiB "
            f"+ disk_reserve_gb {cfg.train.disk_reserve_gb:g}",
        )
    if job == "merge" and sizes is not None:
        needs["outputs"] = (sizes.merged, f"merged model {sizes.merged / GIB:.1f} GiB (bf16)")
    if job == "quantize" and sizes is not None:
        needs["outputs"] = (sizes.quantized, f"quantized model {sizes.quantized / GIB:.1f} GiB (W4A16)")
    if job == "eval":
        needs["outputs"] = (
            est.EVAL_REPORT_BYTES,
            f"evaluation report ~{est.EVAL_REPORT_BYTES / GIB:.0f} GiB",
        )
    return needs


def _check_disks(cfg: Config, job: str, shape: ModelShape | None, facts: Facts) -> list[Check]:
    """One check per volume: the needs of every role on that filesystem add up."""
    needs = disk_needs(cfg, job, shape, facts)
    volumes: dict[int, list] = defaultdict(list)
    for disk in facts.disks:
        volumes[disk.device].append(disk)
    checks = []
    for disks in volumes.values():
        roles = ", ".join(d.role for d in disks)
        where = disks[0].measured_at if len(disks) == 1 else _common_path([d.measured_at for d in disks])
        free = disks[0].free_bytes
        need = sum(needs.get(d.role, (0.0, ""))[0] for d in disks)
        parts = [needs[d.role][1] for d in disks if d.role in needs and needs[d.role][0] > 0]
        name = f"disk {roles}"
        unwritable = [d for d in disks if not d.writable]
        if unwritable:
            paths = ", ".join(f"{d.role} {d.path}" for d in unwritable)
            checks.append(
                Check(
                    name,
                    "fail",
                    f"not writable: {paths}",
                    "fix the permissions or point the path elsewhere (.env)",
                )
            )
            continue
        detail = f"volume at {where}: needs {need / GIB:.1f} GiB" + (
            f" ({'; '.join(parts)})" if parts else ""
        )
        detail += f", {free / GIB:.1f} GiB free"
        if need <= free:
            checks.append(Check(name, "pass", detail))
        else:
            short = (need - free) / GIB
            checks.append(
                Check(
                    name,
                    "fail",
                    f"{detail}: short by {short:.1f} GiB",
                    "free space (make clean-cache DRY_RUN=1 shows what can go) or point HF_HOME / RUNS_DIR / "
                    "OUTPUTS_DIR (.env) at a larger volume",
                )
            )
    return checks


def _common_path(paths: list[str]) -> str:
    import os.path

    return os.path.commonpath(paths) if paths else "?"


def check_profile(cfg: Config, facts: Facts, on_gpu: bool) -> Check:
    """The accelerate profile the job will launch (train.accelerate_profile, or PROFILE=): it exists,
    has no more processes than GPUs, and is not ZeRO-3 with QLoRA."""
    from pcbvlm.errors import ConfigError
    from pcbvlm.launch import ZERO3_QLORA_REFUSAL, profile_settings

    profile = cfg.train.accelerate_profile
    try:
        settings = profile_settings(profile)
    except ConfigError as err:
        return Check("accelerate profile", "fail", str(err), "make train PROFILE=<one of those>")
    layout = est.layout_of(cfg)
    how = {"single": "one process", "ddp": "DDP", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}
    detail = (
        f"{profile}: {layout.processes} process{'es' if layout.processes > 1 else ''}, {how[layout.kind]}"
    )
    if layout.kind == "zero3" and cfg.train.quantization == "nf4":
        return Check(
            "accelerate profile",
            "fail",
            f"{detail}: {ZERO3_QLORA_REFUSAL}",
            "use PROFILE=zero2 or PROFILE=ddp",
        )
    gpus = len(facts.gpus)
    uses_gpus = settings.get("distributed_type") != "NO" and not settings.get("use_cpu")
    if on_gpu and uses_gpus and layout.processes > gpus:
        return Check(
            "accelerate profile",
            "fail",
            f"{detail}, but this host has {gpus} GPU{'s' if gpus != 1 else ''}",
            f"set num_processes in config/accelerate/{profile}.yaml to the GPU count, or PROFILE=a800 for one GPU",
        )
    return Check("accelerate profile", "pass", detail)


def _check_shm(cfg: Config, facts: Facts) -> Check:
    workers = cfg.train.num_workers
    if workers == 0:
        return Check("shm", "skip", "skipped: train.num_workers is 0")
    need = cfg.resources.shm_min_gib * GIB
    if facts.shm_total_bytes is None:
        return Check(
            "shm", "warn", f"/dev/shm not found; DataLoader workers ({workers}) pass tensors through it"
        )
    detail = f"/dev/shm is {facts.shm_total_bytes / GIB:.2f} GiB; {workers} DataLoader workers want >= {cfg.resources.shm_min_gib:g} GiB"
    if facts.shm_total_bytes >= need:
        return Check("shm", "pass", detail)
    return Check(
        "shm",
        "fail",
        detail,
        "give the container more shared memory (docker run --shm-size=8g; compose: shm_size) or set train.num_workers=0",
    )


def _check_model(cfg: Config, job: str, shape: ModelShape | None, facts: Facts) -> list[Check]:
    checks = []
    offline = facts.hf_offline
    mode = "offline (HF_HUB_OFFLINE=1)" if offline else "online"
    model = facts.model
    needs_base = job in ("train", "merge") or (job == "eval" and _eval_weights(facts) == "nf4")
    if model is not None and needs_base:
        name = model.name_or_path
        if model.kind == "local":
            if model.complete:
                checks.append(
                    Check("model", "pass", f"local folder {model.path}: config.json and weights present")
                )
            else:
                checks.append(
                    Check(
                        "model",
                        "fail",
                        f"local folder {model.path} lacks config.json or weights",
                        "point model.name_or_path at a complete model folder",
                    )
                )
        elif model.kind == "build-tiny":
            checks.append(
                Check("model", "pass", f"{model.path} is absent; the tiny model is built there on first use")
            )
        elif model.kind == "missing-local":
            checks.append(
                Check("model", "fail", f"{name} does not exist and is not a hub id", "fix model.name_or_path")
            )
        elif model.complete:
            checks.append(
                Check(
                    "model",
                    "pass",
                    f"{name} cached ({model.on_disk_bytes / GIB:.1f} GiB at {model.path}); hub {mode}",
                )
            )
        elif offline:
            checks.append(
                Check(
                    "model",
                    "fail",
                    f"{name} is not (fully) in the HF cache {facts.hf_cache_dir} and HF_HUB_OFFLINE=1",
                    f"download it where there is a network (hf download {name}) into that cache, or unset HF_HUB_OFFLINE",
                )
            )
        else:
            size = est.artifact_sizes(shape, cfg).base_download / GIB if shape is not None else None
            what = f"~{size:.0f} GiB" if size else "the weights"
            checks.append(
                Check("model", "pass", f"{name} not cached: the job downloads {what} to {facts.hf_cache_dir}")
            )
        if model.kind == "hub":
            if facts.hf_cache_writable:
                checks.append(Check("hf cache", "pass", f"{facts.hf_cache_dir} is writable"))
            else:
                status: Status = "warn" if model.complete else "fail"
                checks.append(
                    Check(
                        "hf cache",
                        status,
                        f"{facts.hf_cache_dir} is not writable",
                        "set HF_HOME (.env) to a writable folder",
                    )
                )
    if job == "merge" and not facts.adapters:
        checks.append(
            Check(
                "adapter",
                "warn",
                f"no final adapter under {cfg.paths.runs_dir}/<run>/adapter: run make train first, or pass ADAPTER=",
            )
        )
    if job == "quantize" and not facts.outputs.get("merged"):
        checks.append(
            Check(
                "merged model",
                "warn",
                f"{cfg.paths.outputs_dir}/merged not found: run make merge first, or pass MODEL=",
            )
        )
    return checks


def _check_data(job: str, facts: Facts, allow_cpu: bool) -> Check:
    if not facts.data_files:
        return Check("data", "skip", f"skipped: {job} reads no dataset")
    missing = [p for p, ok in facts.data_files.items() if not ok]
    if not missing:
        return Check("data", "pass", "present: " + ", ".join(facts.data_files))
    detail = "missing: " + ", ".join(missing)
    if job == "quantize":
        return Check("data", "warn", f"{detail} (AWQ calibration samples)", "run make data")
    if allow_cpu:
        return Check(
            "data",
            "warn",
            f"{detail} (CPU demo: make demo prepares synthetic data)",
            "run make synth && make data",
        )
    return Check("data", "fail", detail, "run make data (DEEPPCB_DIR=/path/to/DeepPCB)")


def _check_packages(cfg: Config, job: str, facts: Facts) -> list[Check]:
    checks = []
    for module, _dist, required in job_packages(job, cfg):
        fact = facts.packages.get(module)
        name = f"package {module}"
        if fact is None:
            checks.append(Check(name, "skip", "not measured"))
        elif fact.error is None:
            checks.append(Check(name, "pass", f"{fact.version} imports"))
        elif required:
            checks.append(
                Check(
                    name,
                    "fail",
                    f"{fact.version or 'not installed'}: {fact.error}",
                    "make setup (installs the lock into .venv) or RUNNER=docker",
                )
            )
        else:
            checks.append(Check(name, "warn", f"optional; {fact.version or 'not installed'}: {fact.error}"))
    return checks


def _check_bnb(cfg: Config, job: str, facts: Facts, on_gpu: bool) -> Check:
    if not on_gpu:
        return Check("bitsandbytes cuda", "skip", "skipped: no GPU in use")
    if facts.bnb_cuda is None:
        return Check("bitsandbytes cuda", "skip", "not tried")
    if facts.bnb_cuda.ok:
        return Check("bitsandbytes cuda", "pass", facts.bnb_cuda.detail)
    # Training in NF4 and evaluating the NF4 run need it; evaluating the AWQ model does not.
    status: Status = "fail" if job == "train" or _eval_weights(facts) == "nf4" else "warn"
    return Check(
        "bitsandbytes cuda",
        status,
        f"bitsandbytes cannot use the GPU: {facts.bnb_cuda.detail}",
        "reinstall the CUDA lock (its bitsandbytes ships the CUDA libraries); python -m bitsandbytes shows details",
    )
