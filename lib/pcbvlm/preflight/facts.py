"""Facts about the machine, measured once; the checks are pure functions of them.

`Facts` is a pydantic model, so a test (or `pcbvlm preflight --facts FILE.json`) can state facts
instead of measuring them: a fake A800, an old driver, a nearly full disk. `measure_facts` never
raises: what cannot be measured is left at its empty value and explained in `notes`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pcbvlm.cache import hub_cache_dir
from pcbvlm.config import Config


class _Fact(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GpuFact(_Fact):
    index: int = 0
    name: str
    capability: tuple[int, int]  # CUDA compute capability (major, minor): (8, 0) for the A800
    total_bytes: int
    free_bytes: int
    uuid: str | None = None  # matches torch's GPUs to NVML's (whose indices ignore CUDA_VISIBLE_DEVICES)


class DiskFact(_Fact):
    role: str  # hf_cache, data, checkpoints, outputs
    path: str  # as configured
    measured_at: str  # the path, or its nearest existing parent
    device: int  # st_dev: roles on one filesystem share its free space
    total_bytes: int
    free_bytes: int
    writable: bool = True


class PackageFact(_Fact):
    version: str | None = None  # installed distribution version; None = not installed
    error: str | None = None  # the import's error in one line; None = it imports


class BnbFact(_Fact):
    ok: bool
    detail: str


class ModelFact(_Fact):
    name_or_path: str
    # local: an existing folder; hub: a hub id; build-tiny: a missing folder the tiny builder creates;
    # missing-local: a path that does not exist and is not a hub id.
    kind: Literal["local", "hub", "build-tiny", "missing-local"]
    path: str | None = None  # the local folder or the cached snapshot
    complete: bool = False  # config.json and every weight file are on disk
    config: dict[str, Any] | None = None  # config.json, where on disk
    on_disk_bytes: int = 0  # weight files already on disk


class Facts(_Fact):
    gpus: list[GpuFact] = []
    gpu_source: str = "none"  # torch, nvml, nvidia-smi or none
    torch_cuda_available: bool = False  # torch.cuda.is_available()
    driver_version: str | None = None  # "535.104.05"
    nvml_cuda_version: str | None = None  # what the driver itself reports (nvidia-smi's "CUDA Version")
    torch_version: str | None = None
    torch_cuda: str | None = None  # torch.version.cuda: the CUDA the torch build needs; None = CPU build
    bnb_cuda: BnbFact | None = None  # bitsandbytes' CUDA library, tried on the GPU; None = not tried
    ram_total_bytes: int = 0
    ram_available_bytes: int = 0
    disks: list[DiskFact] = []
    shm_total_bytes: int | None = None  # /dev/shm; None = absent
    env: dict[str, str] = {}
    hf_cache_dir: str = ""
    hf_cache_writable: bool = False
    model: ModelFact | None = None
    data_files: dict[str, bool] = {}  # path -> exists
    packages: dict[str, PackageFact] = {}
    adapters: list[str] = []  # final adapters under runs_dir (<run>/adapter or <run>/final)
    outputs: dict[str, bool] = {}  # merged, quantized: present under outputs_dir
    quantized_bytes: float = 0.0  # safetensors of outputs_dir/quantized: packed int4 + the bf16 rest
    notes: list[str] = Field(default_factory=list)

    @property
    def hf_offline(self) -> bool:
        return _truthy(self.env.get("HF_HUB_OFFLINE")) or _truthy(self.env.get("TRANSFORMERS_OFFLINE"))


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


ENV_KEYS = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "HF_HUB_CACHE",
    "CUDA_VISIBLE_DEVICES",
    "PYTORCH_ALLOC_CONF",
    "PYTORCH_CUDA_ALLOC_CONF",
    "PCBVLM_IN_IMAGE",  # set in the images: the advice on the CUDA stack names `make build`, not `make setup`
    "PCBVLM_LOCK",
)

# Modules each job imports; (module, distribution, required).
_PACKAGES: dict[str, list[tuple[str, str, bool]]] = {
    "train": [
        ("torch", "torch", True),
        ("transformers", "transformers", True),
        ("peft", "peft", True),
        ("accelerate", "accelerate", True),
        ("bitsandbytes", "bitsandbytes", True),
        ("deepspeed", "deepspeed", False),
    ],
    "merge": [
        ("torch", "torch", True),
        ("transformers", "transformers", True),
        ("peft", "peft", True),
        ("accelerate", "accelerate", True),
    ],
    "quantize": [
        ("torch", "torch", True),
        ("transformers", "transformers", True),
        ("llmcompressor", "llmcompressor", True),
        ("compressed_tensors", "compressed-tensors", True),
    ],
    "eval": [
        ("torch", "torch", True),
        ("transformers", "transformers", True),
        ("peft", "peft", True),
        ("accelerate", "accelerate", True),
        ("bitsandbytes", "bitsandbytes", False),
    ],
}


def job_packages(job: str, cfg: Config) -> list[tuple[str, str, bool]]:
    """(module, distribution, required) for a job; bitsandbytes is required only to train in NF4."""
    out = []
    for module, dist, required in _PACKAGES[job]:
        if module == "bitsandbytes" and job == "train":
            required = cfg.train.quantization == "nf4"
        out.append((module, dist, required))
    return out


def data_files(cfg: Config, job: str) -> list[Path]:
    """The jsonl files a job reads: train/val for train (and quantize's calibration), the split for eval."""
    d = cfg.paths.data_dir
    if job in ("train", "quantize"):
        return [d / "train.jsonl", d / "val.jsonl"] if job == "train" else [d / "train.jsonl"]
    if job == "eval":
        return [d / f"{cfg.eval.split}.jsonl"]
    return []


# ---------------------------------------------------------------------------------------------------------
# Measurement


def measure_facts(cfg: Config, job: str, skip: set[str] = frozenset()) -> Facts:
    """Measure every fact a job's checks use. Keys in `skip` (e.g. those an injected facts file states)
    are not measured: `packages` (slow imports) and `bnb_cuda` (a GPU test) are the ones worth skipping."""
    notes: list[str] = []
    facts: dict[str, Any] = {"notes": notes}
    facts.update(_measure_gpus(notes))
    if "packages" not in skip:
        facts["packages"] = measure_packages(job_packages(job, cfg), notes)
    if "bnb_cuda" not in skip and facts["torch_cuda_available"] and job in ("train", "eval"):
        facts["bnb_cuda"] = _measure_bnb(notes)
    facts.update(_measure_ram())
    hub = hub_cache_dir(cfg)
    roles = {
        "hf_cache": hub,
        "data": cfg.paths.data_dir,
        "checkpoints": cfg.paths.runs_dir,
        "outputs": cfg.paths.outputs_dir,
    }
    facts["disks"] = [d for role, p in roles.items() if (d := measure_disk(role, p, notes)) is not None]
    shm = Path("/dev/shm")
    if shm.is_dir():
        with contextlib.suppress(OSError):
            facts["shm_total_bytes"] = shutil.disk_usage(shm).total
    facts["env"] = {k: os.environ[k] for k in ENV_KEYS if k in os.environ}
    facts["hf_cache_dir"] = str(hub)
    facts["hf_cache_writable"] = os.access(nearest_existing(hub), os.W_OK)
    facts["model"] = measure_model(cfg, hub, notes)
    facts["data_files"] = {str(p): p.is_file() for p in data_files(cfg, job)}
    facts["adapters"] = find_adapters(cfg.paths.runs_dir)
    out = cfg.paths.outputs_dir
    facts["outputs"] = {name: (out / name / "config.json").is_file() for name in ("merged", "quantized")}
    if facts["outputs"]["quantized"]:
        facts["quantized_bytes"] = sum(f.stat().st_size for f in (out / "quantized").glob("*.safetensors"))
    return Facts.model_validate(facts)


def nearest_existing(path: Path) -> Path:
    """The path itself, or its nearest existing parent (what a not-yet-created folder will live on)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def measure_disk(role: str, path: Path, notes: list[str]) -> DiskFact | None:
    at = nearest_existing(path)
    try:
        usage = shutil.disk_usage(at)
        device = os.stat(at).st_dev
    except OSError as err:
        notes.append(f"disk {role} ({path}): {err.strerror or err}")
        return None
    return DiskFact(
        role=role,
        path=str(path),
        measured_at=str(at),
        device=device,
        total_bytes=usage.total,
        free_bytes=usage.free,
        writable=os.access(at, os.W_OK),
    )


def _measure_ram() -> dict[str, int]:
    """Available RAM, capped by the container's cgroup limit (/proc/meminfo shows the host's RAM)."""
    import psutil

    vm = psutil.virtual_memory()
    total, available = vm.total, vm.available
    limit = _cgroup_limit()
    if limit is not None and limit[0] < total:
        total = limit[0]
        available = min(available, max(0, limit[0] - limit[1]))
    return {"ram_total_bytes": total, "ram_available_bytes": available}


def _cgroup_limit() -> tuple[int, int] | None:
    """(limit, usage) of the cgroup's memory (v2, then v1); None when unlimited or unreadable."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            raw = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if raw == "max" or not raw.isdigit() or int(raw) >= 1 << 60:  # v1 "unlimited" is a huge number
            return None
        return int(raw), usage
    return None


def _measure_gpus(notes: list[str]) -> dict[str, Any]:
    """GPUs as torch sees them (what the job will use, CUDA_VISIBLE_DEVICES applied); where torch cannot
    use them (CPU build, driver too old), as NVML or nvidia-smi see them. The driver version from NVML
    or nvidia-smi. Free memory comes from NVML where the GPU's UUID matches, so that preflight does not
    open a CUDA context on every GPU of a shared host; else from torch."""
    out: dict[str, Any] = {"gpus": [], "gpu_source": "none", "torch_cuda_available": False}
    smi = _measure_nvml(notes) or _measure_nvidia_smi(notes)
    if smi is not None:
        out["driver_version"], out["nvml_cuda_version"] = smi[2], smi[3]
    by_uuid = {g.uuid: g for g in (smi[0] if smi else []) if g.uuid}
    try:
        import torch

        out["torch_version"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            out["torch_cuda_available"] = True
            gpus = []
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                uuid = _uuid(getattr(props, "uuid", None))
                seen = by_uuid.get(uuid) if uuid else None
                if seen is not None:
                    free, total = seen.free_bytes, seen.total_bytes
                else:
                    free, total = torch.cuda.mem_get_info(i)
                gpus.append(
                    GpuFact(
                        index=i,
                        name=props.name,
                        capability=(props.major, props.minor),
                        total_bytes=total,
                        free_bytes=free,
                        uuid=uuid,
                    )
                )
            out["gpus"], out["gpu_source"] = gpus, "torch"
    except Exception as err:  # a broken CUDA install raises anything; preflight reports it, not crashes
        notes.append(f"torch: {_one_line(err)}")
    if not out["gpus"] and smi is not None and smi[0]:
        out["gpus"], out["gpu_source"] = smi[0], smi[1]
    return out


def _uuid(value: Any) -> str | None:
    """'GPU-8d3a...' (NVML, nvidia-smi) and '8d3a...' (torch) to one spelling."""
    if not value:
        return None
    text = str(value).strip().lower()
    return text.removeprefix("gpu-") or None


def _measure_nvml(notes: list[str]) -> tuple[list[GpuFact], str, str | None, str | None] | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver: NVMLError_LibraryNotFound / DriverNotLoaded; nvidia-smi is tried next
        return None
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda = None
        with contextlib.suppress(Exception):
            v = int(pynvml.nvmlSystemGetCudaDriverVersion())
            cuda = f"{v // 1000}.{v % 1000 // 10}"
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            uuid = None
            with contextlib.suppress(Exception):
                uuid = _uuid(_text(pynvml.nvmlDeviceGetUUID(handle)))
            gpus.append(
                GpuFact(
                    index=i,
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    capability=(major, minor),
                    total_bytes=mem.total,
                    free_bytes=mem.free,
                    uuid=uuid,
                )
            )
        return gpus, "nvml", driver, cuda
    except Exception as err:
        notes.append(f"NVML: {_one_line(err)}")
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _measure_nvidia_smi(notes: list[str]) -> tuple[list[GpuFact], str, str | None, str | None] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    query = "index,name,memory.total,memory.free,compute_cap,driver_version,uuid"
    try:
        proc = subprocess.run(
            [exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        notes.append(f"nvidia-smi: {_one_line(err)}")
        return None
    if proc.returncode != 0:
        notes.append(f"nvidia-smi: {_one_line(proc.stderr or proc.stdout)}")
        return None
    return parse_nvidia_smi(proc.stdout)


def parse_nvidia_smi(text: str) -> tuple[list[GpuFact], str, str | None, str | None]:
    """Rows of `index, name, memory.total [MiB], memory.free [MiB], compute_cap, driver_version[, uuid]`."""
    gpus, driver = [], None
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 6:
            continue
        index, name, total, free, cap, driver = parts[:6]
        major, _, minor = cap.partition(".")
        try:
            gpus.append(
                GpuFact(
                    index=int(index),
                    name=name,
                    capability=(int(major), int(minor or 0)),
                    total_bytes=int(float(total)) << 20,
                    free_bytes=int(float(free)) << 20,
                    uuid=_uuid(parts[6]) if len(parts) > 6 else None,
                )
            )
        except ValueError:
            continue
    return gpus, "nvidia-smi", driver, None


_BNB_PROBE = """
import json
try:
    import torch
    import bitsandbytes as bnb
    from bitsandbytes import cextension
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    q, state = bnb.functional.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    y = bnb.functional.dequantize_4bit(q, state)
    torch.cuda.synchronize()
    err = (y.float() - x.float()).abs().mean().item()
    backend = getattr(cextension, "BNB_BACKEND", "?")
    mock = getattr(cextension, "ErrorHandlerMockBNBNativeLibrary", None)
    if mock is not None and isinstance(cextension.lib, mock):
        raise RuntimeError(f"native library not loaded (backend {backend})")
    ok = backend == "CUDA" and err < 0.2
    print(json.dumps({"ok": ok, "detail": f"bitsandbytes {bnb.__version__}, backend {backend}, NF4 round trip on cuda:0 (mean error {err:.3f})"}))
except Exception as e:
    print(json.dumps({"ok": False, "detail": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}))
"""


def _measure_bnb(notes: list[str]) -> BnbFact | None:
    """NF4 round trip on the GPU in a child process: a broken CUDA library can crash, not only raise."""
    try:
        proc = subprocess.run([sys.executable, "-c", _BNB_PROBE], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        return BnbFact(ok=False, detail=f"probe did not finish: {_one_line(err)}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return BnbFact(ok=False, detail=f"probe exited {proc.returncode}: {_one_line(proc.stderr)}")
    return BnbFact.model_validate(json.loads(lines[-1]))


_IMPORT_PROBE = """
import json, sys, warnings
warnings.filterwarnings("ignore")
out = {}
for name in sys.argv[1:]:
    try:
        __import__(name)
        out[name] = None
    except BaseException as e:
        msg = str(e).strip().splitlines()
        out[name] = f"{type(e).__name__}: {msg[0] if msg else ''}"
print("IMPORTS " + json.dumps(out))
"""


def measure_packages(packages: list[tuple[str, str, bool]], notes: list[str]) -> dict[str, PackageFact]:
    """Version of each distribution and whether its module imports, tried in one child process so that a
    crashing native extension cannot take preflight down."""
    result: dict[str, PackageFact] = {}
    for module, dist, _ in packages:
        try:
            result[module] = PackageFact(version=importlib.metadata.version(dist))
        except importlib.metadata.PackageNotFoundError:
            result[module] = PackageFact(error="not installed")
    to_import = [m for m, _, _ in packages if result[m].error is None]
    if not to_import:
        return result
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _IMPORT_PROBE, *to_import],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        notes.append(f"package imports: {_one_line(err)}")
        for m in to_import:
            result[m].error = "import probe did not finish"
        return result
    lines = [line for line in proc.stdout.splitlines() if line.startswith("IMPORTS ")]
    if not lines:
        detail = f"import probe crashed (exit {proc.returncode}): {_one_line(proc.stderr)}"
        for m in to_import:
            result[m].error = detail
        return result
    for module, error in json.loads(lines[-1][len("IMPORTS ") :]).items():
        result[module].error = error
    return result


def looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not name.startswith(".")


def _weights_on_disk(folder: Path) -> tuple[bool, int]:
    """(every weight file present, their bytes): the shards an index names, or any *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError):
            return False, 0
        present = [folder / s for s in shards if (folder / s).is_file()]
        return len(present) == len(shards), sum(p.stat().st_size for p in present)
    files = [p for p in folder.glob("*.safetensors") if p.is_file()]
    return bool(files), sum(p.stat().st_size for p in files)


def _read_config(path: Path, notes: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        notes.append(f"{path}: unreadable ({_one_line(err)})")
        return None
    return data if isinstance(data, dict) else None


def measure_model(cfg: Config, hub: Path, notes: list[str]) -> ModelFact:
    """Where the model is: a local folder, the tiny model still to build, or a hub id (cached or not)."""
    name = cfg.model.name_or_path
    folder = Path(name).expanduser()
    if folder.is_dir():
        complete, size = _weights_on_disk(folder)
        config = _read_config(folder / "config.json", notes)
        return ModelFact(
            name_or_path=name,
            kind="local",
            path=str(folder),
            complete=complete and config is not None,
            config=config,
            on_disk_bytes=size,
        )
    if cfg.model.build_tiny_if_missing:
        return ModelFact(name_or_path=name, kind="build-tiny", path=str(folder))
    if not looks_like_hub_id(name):
        return ModelFact(name_or_path=name, kind="missing-local", path=str(folder))
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json", cache_dir=hub, revision=cfg.model.revision)
    except Exception as err:  # a malformed cache entry; the check reports "not cached"
        notes.append(f"HF cache lookup of {name}: {_one_line(err)}")
        found = None
    if not isinstance(found, str):
        return ModelFact(name_or_path=name, kind="hub")
    snapshot = Path(found).parent
    complete, size = _weights_on_disk(snapshot)
    config = _read_config(Path(found), notes)
    return ModelFact(
        name_or_path=name,
        kind="hub",
        path=str(snapshot),
        complete=complete and config is not None,
        config=config,
        on_disk_bytes=size,
    )


def find_adapters(runs_dir: Path) -> list[str]:
    """Final adapters of training runs: <runs_dir>/<run>/adapter or /final."""
    if not runs_dir.is_dir():
        return []
    return sorted(str(p) for p in runs_dir.glob("*/*") if p.is_dir() and p.name in ("adapter", "final"))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _one_line(value: Any) -> str:
    text = str(value).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(value).__name__
