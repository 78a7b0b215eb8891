"""Preflight: measure the machine, estimate what a job needs from the config, compare (`make preflight`).

- `facts`: `Facts` (a pydantic model) and `measure_facts(cfg, job)`;
- `estimate`: memory and disk estimates from the model's shape (`estimate_train_vram` and friends);
- `checks`: `run_checks(cfg, job, facts, allow_cpu) -> Report`, pure functions of the facts;
- `report`: rich tables and the JSON report.
"""

from __future__ import annotations

from pcbvlm.preflight.checks import (
    DRIVER_MAX_CUDA,
    JOBS,
    Check,
    Report,
    driver_max_cuda,
    gpu_architecture,
    model_shape,
    run_checks,
)
from pcbvlm.preflight.estimate import (
    GIB,
    Estimate,
    Item,
    artifact_sizes,
    estimate_eval_vram,
    estimate_merge_memory,
    estimate_quantize_vram,
    estimate_ram,
    estimate_train_vram,
    image_tokens,
    sample_tokens,
    suggest_train_fit,
)
from pcbvlm.preflight.facts import DiskFact, Facts, GpuFact, ModelFact, PackageFact, measure_facts

__all__ = [
    "DRIVER_MAX_CUDA",
    "GIB",
    "JOBS",
    "Check",
    "DiskFact",
    "Estimate",
    "Facts",
    "GpuFact",
    "Item",
    "ModelFact",
    "PackageFact",
    "Report",
    "artifact_sizes",
    "driver_max_cuda",
    "estimate_eval_vram",
    "estimate_merge_memory",
    "estimate_quantize_vram",
    "estimate_ram",
    "estimate_train_vram",
    "gpu_architecture",
    "image_tokens",
    "measure_facts",
    "model_shape",
    "run_checks",
    "sample_tokens",
    "suggest_train_fit",
]
