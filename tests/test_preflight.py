"""Preflight: GPU naming, driver verdicts, the 32B memory estimate, suggestions, disk volumes, the job.

Checks are pure functions of `Facts`, so most tests state the facts (a fake A800, an old driver, a full
disk) and assert the verdicts and messages; a few run the job itself.
"""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, run_job
from pcbvlm.config import Config, load_config
from pcbvlm.preflight import (
    DiskFact,
    Facts,
    GpuFact,
    ModelFact,
    PackageFact,
    driver_max_cuda,
    estimate_eval_vram,
    estimate_merge_memory,
    estimate_quantize_vram,
    estimate_ram,
    estimate_train_vram,
    gpu_architecture,
    image_tokens,
    run_checks,
    sample_tokens,
)
from pcbvlm.preflight.checks import disk_needs
from pcbvlm.preflight.facts import BnbFact, parse_nvidia_smi
from pcbvlm.preflight.report import estimate_table, failure_lines, make_console
from pcbvlm.shapes import (
    QWEN3_VL_32B_PARAMS,
    ModelShape,
    count_parameters,
    count_parameters_meta,
    is_qwen3_vl_32b,
    qwen3_vl_32b_config,
    qwen3_vl_32b_dict,
    qwen3_vl_32b_shape,
)

GIB = 1024**3
SHAPE = qwen3_vl_32b_shape()


@pytest.fixture
def cfg(repo_root, clean_env) -> Config:
    return load_config(repo_root / "config" / "config.yaml")


def a800(free_gib: float = 78.0) -> GpuFact:
    return GpuFact(
        name="NVIDIA A800-SXM4-80GB", capability=(8, 0), total_bytes=80 * GIB, free_bytes=int(free_gib * GIB)
    )


def h200() -> GpuFact:
    return GpuFact(
        name="NVIDIA H200", capability=(9, 0), total_bytes=int(139.8 * GIB), free_bytes=int(139.3 * GIB)
    )


def disks(
    free_gib: float = 2000.0, devices: dict[str, int] | None = None, free: dict[int, float] | None = None
):
    """One DiskFact per role; `devices` puts roles on filesystems, `free` sets a filesystem's free GiB."""
    devices = devices or {}
    free = free or {}
    out = []
    for role in ("hf_cache", "data", "checkpoints", "outputs"):
        dev = devices.get(role, 1)
        out.append(
            DiskFact(
                role=role,
                path=f"/vol{dev}/{role}",
                measured_at=f"/vol{dev}",
                device=dev,
                total_bytes=4000 * GIB,
                free_bytes=int(free.get(dev, free_gib) * GIB),
            )
        )
    return out


def healthy(**changes) -> Facts:
    """An A800 host where every train check passes; `changes` replace facts."""
    ok = PackageFact(version="1.0")
    base = dict(
        gpus=[a800()],
        gpu_source="torch",
        torch_cuda_available=True,
        driver_version="580.95.05",
        torch_version="2.13.0+cu130",
        torch_cuda="13.0",
        bnb_cuda=BnbFact(ok=True, detail="bitsandbytes 0.50.2, backend CUDA"),
        ram_total_bytes=512 * GIB,
        ram_available_bytes=480 * GIB,
        disks=disks(),
        shm_total_bytes=64 * GIB,
        env={"HF_HUB_OFFLINE": "1"},
        hf_cache_dir="/vol1/hf_cache",
        hf_cache_writable=True,
        model=ModelFact(
            name_or_path="Qwen/Qwen3-VL-32B-Instruct",
            kind="hub",
            path="/vol1/hf_cache/models--Qwen--Qwen3-VL-32B-Instruct/snapshots/abc",
            complete=True,
            config=qwen3_vl_32b_dict(),
            on_disk_bytes=int(62.1 * GIB),
        ),
        data_files={
            "data/deeppcb/train.jsonl": True,
            "data/deeppcb/val.jsonl": True,
            "data/deeppcb/test.jsonl": True,
        },
        packages={
            m: ok for m in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed")
        },
        adapters=["checkpoints/run/adapter"],
        outputs={"merged": True, "quantized": True},
    )
    base.update(changes)
    return Facts(**base)


# --------------------------------------------------------------------------------------------------------
# GPU names and drivers


@pytest.mark.parametrize(
    "capability, name",
    [
        ((8, 0), "Ampere"),
        ((8, 6), "Ampere"),
        ((8, 9), "Ada Lovelace"),
        ((9, 0), "Hopper"),
        ((10, 0), "Blackwell"),
        ((12, 0), "Blackwell"),
        ((7, 0), "Volta"),
        ((7, 5), "Turing"),
    ],
)
def test_architecture_names(capability, name):
    assert gpu_architecture(capability) == name


def test_a800_is_ampere_sm80_not_hopper(cfg):
    report = run_checks(cfg, "train", healthy())
    gpu = report.check("gpu")
    assert gpu.status == "pass"
    assert "NVIDIA A800-SXM4-80GB: Ampere sm80, 80.0 GiB" in gpu.detail
    assert "Hopper" not in gpu.detail
    assert report.check("bf16").status == "pass"
    assert report.passed, failure_lines(report)


def test_h200_is_hopper_sm90(cfg):
    report = run_checks(cfg, "train", healthy(gpus=[h200()]))
    assert "NVIDIA H200: Hopper sm90, 139.8 GiB" in report.check("gpu").detail


CU130 = {"torch_version": "2.13.0+cu130", "torch_cuda": "13.0"}  # the CUDA 13 stack, requirements/cuda.lock
CU128 = {"torch_version": "2.10.0+cu128", "torch_cuda": "12.8"}  # the CUDA 12 stack, requirements/cuda12.lock


@pytest.mark.parametrize("driver", ["535.104.05", "550.54.15", "570.86.15"])
def test_cuda13_stack_on_an_older_driver_fails_naming_the_cuda12_command(cfg, driver):
    report = run_checks(cfg, "train", healthy(driver_version=driver, **CU130))
    check = report.check("cuda driver")
    branch = driver.split(".")[0]
    assert check.status == "fail"
    assert (
        f"driver {branch} supports CUDA <= 12." in check.detail
        and "this environment needs 13.0" in check.detail
    )
    assert "installed: the CUDA 13 stack (torch 2.13.0+cu130, built for CUDA 13.0)" in check.detail
    assert "rm -rf .venv && make setup CUDA_STACK=12" in check.remedy
    assert "make build CUDA_STACK=12" in check.remedy and ">= 580" in check.remedy
    assert any(line.startswith(f"FAILED cuda driver: driver {branch}") for line in failure_lines(report))
    assert not report.passed
    # in the image the environment is the image's: the advice is to build the CUDA 12 image on the host
    env = {"HF_HUB_OFFLINE": "1", "PCBVLM_IN_IMAGE": "1"}
    in_image = run_checks(cfg, "train", healthy(driver_version=driver, env=env, **CU130))
    remedy = in_image.check("cuda driver").remedy
    assert "make build CUDA_STACK=12" in remedy and "make setup" not in remedy


@pytest.mark.parametrize(
    "driver, note",
    [
        ("535.104.05", "runs through CUDA 12 minor-version compatibility (driver >= 525"),
        ("550.54.15", "runs through CUDA 12 minor-version compatibility (driver >= 525"),
        ("570.86.15", ""),
        ("580.95.05", "this driver's default is the CUDA 13 stack (CUDA_STACK=13)"),
    ],
)
def test_cuda12_stack_passes_from_driver_525(cfg, driver, note):
    check = run_checks(cfg, "train", healthy(driver_version=driver, **CU128)).check("cuda driver")
    assert check.status == "pass", check
    assert f"driver {driver} supports CUDA <= " in check.detail
    assert "installed: the CUDA 12 stack (torch 2.10.0+cu128, built for CUDA 12.8)" in check.detail
    assert note in check.detail
    if not note:
        assert "compatibility" not in check.detail and "default" not in check.detail


def test_driver_older_than_525_has_no_stack(cfg):
    check = run_checks(cfg, "train", healthy(driver_version="470.256.02", **CU128)).check("cuda driver")
    assert check.status == "fail"
    assert check.remedy.startswith("NVIDIA driver 470.256.02 is older than 525: no CUDA stack")
    assert "make setup" not in check.remedy


def test_cpu_torch_on_a_gpu_host_names_the_stack_of_the_driver(cfg):
    facts = healthy(
        torch_cuda_available=False, torch_cuda=None, torch_version="2.13.0+cpu", gpu_source="nvml"
    )
    for driver, stack in (("550.54.15", "12"), ("580.95.05", "13")):
        check = run_checks(cfg, "train", facts.model_copy(update={"driver_version": driver})).check("gpu")
        assert check.status == "fail"
        assert f"rm -rf .venv && make setup CUDA_STACK={stack}" in check.remedy


def test_driver_table():
    assert driver_max_cuda("535.104.05") == (12, 2)
    assert driver_max_cuda("546.01") == (12, 3)  # between branches: the older branch's CUDA
    assert driver_max_cuda("525.60.13") == (12, 0)
    assert driver_max_cuda("580.159.04") == (13, 0)
    assert driver_max_cuda("595.10") == (13, 0)
    assert driver_max_cuda("440.33") is None


def test_new_enough_driver_passes(cfg):
    check = run_checks(cfg, "train", healthy(driver_version="580.95.05", **CU130)).check("cuda driver")
    assert check.status == "pass"
    assert check.detail == (
        "driver 580.95.05 supports CUDA <= 13.0; installed: the CUDA 13 stack (torch 2.13.0+cu130, built for CUDA 13.0)"
    )


def test_no_gpu_fails_unless_cpu_allowed(cfg):
    facts = healthy(gpus=[], torch_cuda_available=False, gpu_source="none")
    report = run_checks(cfg, "train", facts)
    assert report.check("gpu").status == "fail"
    assert "no NVIDIA GPU found" in report.check("gpu").detail
    allowed = run_checks(cfg, "train", facts, allow_cpu=True)
    assert allowed.check("gpu").status == "skip"
    assert "CPU allowed" in allowed.check("gpu").detail
    assert allowed.check("vram").status == "skip"


def test_gpu_present_but_torch_cpu_build(cfg):
    facts = healthy(
        torch_cuda_available=False, torch_cuda=None, torch_version="2.13.0+cpu", gpu_source="nvml"
    )
    check = run_checks(cfg, "train", facts).check("gpu")
    assert check.status == "fail"
    assert "CPU build" in check.detail and "NVIDIA A800" in check.detail


def test_bf16_on_turing(cfg):
    t4 = GpuFact(name="Tesla T4", capability=(7, 5), total_bytes=15 * GIB, free_bytes=14 * GIB)
    explicit = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": "bf16"})})
    assert run_checks(explicit, "train", healthy(gpus=[t4])).check("bf16").status == "fail"
    auto = run_checks(cfg, "train", healthy(gpus=[t4])).check("bf16")
    assert auto.status == "warn" and "Turing sm75" in auto.detail


def test_parse_nvidia_smi():
    gpus, source, driver, _ = parse_nvidia_smi(
        "0, NVIDIA A800-SXM4-80GB, 81920, 80000, 8.0, 535.104.05, GPU-8D3A-11\n"
    )
    assert source == "nvidia-smi" and driver == "535.104.05"
    assert gpus[0].capability == (8, 0) and gpus[0].total_bytes == 80 * GIB
    assert gpus[0].uuid == "8d3a-11"  # NVML spelling without the GPU- prefix, as torch spells it


# --------------------------------------------------------------------------------------------------------
# Shapes and parameter counts


def test_32b_parameter_count_by_arithmetic_and_meta_device():
    config = qwen3_vl_32b_config()
    counts = count_parameters(config)
    assert counts.total == QWEN3_VL_32B_PARAMS
    assert round(counts.total / 1e9, 2) == 33.36
    assert count_parameters_meta(config) == counts  # every part, not only the total


def test_qwen2_5_vl_32b_parameter_count_by_arithmetic_and_meta_device():
    """Qwen2.5-VL's blocks differ (gated vision MLP, RMSNorms, no position table, q/k/v biases, no q/k
    norms): the arithmetic counts them exactly, part by part."""
    from pcbvlm.families import get_family

    config = get_family("qwen2_5_vl").config_32b()
    counts = count_parameters(config)
    assert count_parameters_meta(config) == counts
    assert round(counts.total / 1e9, 2) == 33.45
    shape = ModelShape.from_config(config)
    assert (shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim) == (64, 40, 8, 128)
    assert (shape.vision.depth, shape.vision.hidden_size) == (32, 1280)


def test_arithmetic_matches_meta_on_another_shape():
    """Tied embeddings, attention bias and no deepstack: the arithmetic follows the config, not the 32B."""
    config = qwen3_vl_32b_config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=500,
        attention_bias=True,
        bos_token_id=None,
        eos_token_id=None,
    )
    config.tie_word_embeddings = True
    config.vision_config.deepstack_visual_indexes = []
    config.vision_config.depth = 2
    assert count_parameters(config) == count_parameters_meta(config)


def test_shape_from_transformers4_config_json():
    """A config.json in the transformers 4 spelling (rope_scaling, rope_theta) reads to the same shape."""
    old = qwen3_vl_32b_dict()
    text = dict(old["text_config"])
    text.pop("rope_parameters")
    text |= {
        "rope_theta": 5000000,
        "rope_scaling": {"mrope_section": [24, 20, 20], "mrope_interleaved": True},
    }
    old["text_config"] = text
    old["vision_config"] = {**old["vision_config"], "model_type": "qwen3_vl"}
    assert ModelShape.from_config(old) == SHAPE
    assert ModelShape.from_config(qwen3_vl_32b_config()) == SHAPE
    assert is_qwen3_vl_32b("Qwen/Qwen3-VL-32B-Instruct") and not is_qwen3_vl_32b("Qwen/Qwen3-VL-8B-Instruct")


# --------------------------------------------------------------------------------------------------------
# Estimates


def test_tokens_per_sample(cfg):
    assert image_tokens(409600) == 400
    assert image_tokens(65536) == 64
    assert sample_tokens(cfg) == 650
    templated = cfg.model_copy(update={"data": cfg.data.model_copy(update={"with_template": True})})
    assert sample_tokens(templated) == 1050


def test_nf4_model_alone_matches_measured_19_1_gib(cfg):
    estimate = estimate_train_vram(SHAPE, cfg, micro_batch=1)
    weights = sum(
        i.bytes
        for i in estimate.items
        if "linears" in i.name or "lm_head" in i.name or "vision tower (" in i.name
    )
    assert 18.6 * GIB < weights < 19.6 * GIB


# Peaks measured by `make bench` on an H200 under an 80 GiB cap (bench/results/2026-11-29-NVIDIA-H200-*.json):
# 718 tokens/sample, 230 answer tokens, LoRA r64 on all decoder linears.
@pytest.mark.parametrize(
    "mb, logit_tokens, grad_accum, precision, dropout, fused, uncheckpointed, measured",
    [
        (16, 231, 1, "bf16", 0.0, True, 10, 65.67),  # the configured setup (-train.json)
        (16, 231, 1, "bf16", 0.0, True, 0, 36.83),
        (16, 231, 1, "bf16", 0.0, False, 0, 39.04),
        (16, 231, 1, "bf16", 0.05, False, 0, 40.58),  # the previous default
        (16, 231, 1, "bf16", 0.05, True, 0, 37.75),
        (8, 231, 1, "bf16", 0.0, True, 24, 67.87),
        (8, 231, 1, "bf16", 0.05, False, 0, 32.90),  # -before-levers.json
        (8, 718, 1, "bf16", 0.05, False, 0, 38.71),  # full logits (-before-levers.json)
        (
            1,
            718,
            8,
            "fp32",
            0.05,
            False,
            0,
            35.79,
        ),  # the naive baseline: fp32 upcast of the non-quantized parts
    ],
)
def test_train_estimate_32b_within_15_percent_of_measured_peak(
    cfg, mb, logit_tokens, grad_accum, precision, dropout, fused, uncheckpointed, measured
):
    cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"dropout": dropout})})
    estimate = estimate_train_vram(
        SHAPE,
        cfg,
        micro_batch=mb,
        seq_len=718,
        logit_tokens=logit_tokens,
        grad_accum=grad_accum,
        precision=precision,
        fused_cross_entropy=fused,
        uncheckpointed_layers=uncheckpointed,
    )
    assert abs(estimate.total_gib / measured - 1) <= 0.15, (estimate.total_gib, measured)


@pytest.mark.parametrize("mb, low, high", [(1, 28, 36), (8, 43, 53), (16, 63, 75)])
def test_train_estimate_32b_for_the_production_config(cfg, mb, low, high):
    # Without Liger's fused loss (the CPU test environment has no liger-kernel) and with it: both fit 80 GiB.
    for fused in (False, True):
        estimate = estimate_train_vram(SHAPE, cfg, micro_batch=mb, fused_cross_entropy=fused)
        assert low <= estimate.total_gib <= high, estimate.total_gib
        assert estimate.inputs["seq_len"] == 650
        assert estimate.inputs["uncheckpointed_layers"] == 10


def test_train_estimate_activations_match_h200_measurement(cfg):
    """Peak minus weights, measured on an H200 with a bf16 base (grad_accum 2, checkpointing, full logits,
    LoRA dropout 0.05, no fused kernels: the project's reference measurements)."""
    measured = {1: 10.6, 8: 21.9, 16: 35.5}
    reference = cfg.model_copy(
        update={
            "lora": cfg.lora.model_copy(update={"dropout": 0.05}),
            "train": cfg.train.model_copy(update={"uncheckpointed_layers": 0}),
        }
    )
    for mb, gib in measured.items():
        e = estimate_train_vram(
            SHAPE,
            reference,
            fused_cross_entropy=False,
            micro_batch=mb,
            quantization="none",
            precision="bf16",
            margin_gib=0,
            logit_tokens=650,
            grad_accum=2,
        )
        weights = sum(
            i.bytes
            for i in e.items
            if "linears" in i.name or "lm_head" in i.name or "vision tower (" in i.name
        )
        assert abs((e.total_bytes - weights) / GIB - gib) <= 0.1 * gib


def test_breakdown_is_printed(cfg):
    import io

    buffer = io.StringIO()
    console = make_console(buffer)
    # without Liger's fused cross-entropy (which train.fused_kernels=auto uses where liger-kernel is installed)
    console.print(estimate_table(estimate_train_vram(SHAPE, cfg, micro_batch=8, fused_cross_entropy=False)))
    text = buffer.getvalue()
    for row in (
        "LM decoder linears (NF4 + double quant)",
        "LoRA weights (fp32)",
        "AdamW moments",
        "logits + loss",
        "peak",
    ):
        assert row in text
    assert "checkpointed hidden states" in text


def test_estimate_responds_to_config(cfg):
    # fused_cross_entropy=False: the same in every environment (auto uses Liger's where liger-kernel is installed)
    base = estimate_train_vram(
        SHAPE, cfg, fused_cross_entropy=False, micro_batch=4, logit_tokens=650, grad_accum=2
    ).total_bytes
    assert (
        estimate_train_vram(
            SHAPE, cfg, fused_cross_entropy=False, micro_batch=4, gradient_checkpointing=False
        ).total_bytes
        > base + 20 * GIB
    )
    assert (
        estimate_train_vram(
            SHAPE, cfg, fused_cross_entropy=False, micro_batch=4, max_pixels=65536, logit_tokens=650
        ).total_bytes
        < base
    )
    assert (
        estimate_train_vram(
            SHAPE, cfg, fused_cross_entropy=False, micro_batch=4, lora_r=16, logit_tokens=650
        ).total_bytes
        < base
    )
    assert (
        estimate_train_vram(
            SHAPE, cfg, fused_cross_entropy=False, micro_batch=4, quantization="none", logit_tokens=650
        ).total_bytes
        > base + 40 * GIB
    )
    # grad_accum 1: the gradients are not alive at the logits peak.
    assert estimate_train_vram(
        SHAPE, cfg, fused_cross_entropy=False, micro_batch=4, grad_accum=1, logit_tokens=650
    ).total_bytes == pytest.approx(base - 2 * GIB, rel=0.01)


def test_other_jobs_estimates(cfg):
    merge = estimate_merge_memory(SHAPE, cfg)
    assert merge.device == "ram"
    assert 66.7e9 < merge.items[0].bytes < 66.8e9  # the bf16 model: ~67 GB
    assert (
        estimate_eval_vram(SHAPE, cfg, weights="w4a16").total_bytes
        < estimate_eval_vram(SHAPE, cfg, weights="nf4").total_bytes
    )
    assert 12 * GIB < estimate_quantize_vram(SHAPE, cfg).total_bytes < 40 * GIB
    assert estimate_ram("quantize", SHAPE, cfg).total_bytes > 66.7e9


# --------------------------------------------------------------------------------------------------------
# Verdicts on memory, disk, shm, model, data, packages


def test_vram_shortfall_suggests_fewer_uncheckpointed_layers_first(cfg):
    """Recomputing more layers costs only speed: it is the first remedy when it is enough."""
    check = run_checks(cfg, "train", healthy(gpus=[a800(free_gib=60.0)])).check("vram")
    assert check.status == "fail"
    suggested = int(check.remedy.split("train.uncheckpointed_layers=")[1].split()[0])
    assert 0 <= suggested < cfg.train.uncheckpointed_layers
    assert estimate_train_vram(SHAPE, cfg, uncheckpointed_layers=suggested).total_gib <= 60.0
    assert estimate_train_vram(SHAPE, cfg, uncheckpointed_layers=suggested + 1).total_gib > 60.0


def test_vram_shortfall_suggests_a_micro_batch_that_fits(cfg):
    report = run_checks(cfg, "train", healthy(gpus=[a800(free_gib=32.0)]))
    check = report.check("vram")
    assert check.status == "fail"
    need = estimate_train_vram(SHAPE, cfg).total_gib
    assert f"micro_batch 16 needs ~{need:.1f} GiB, 32.0 GiB free: micro_batch " in check.remedy
    assert "train.uncheckpointed_layers=0 to keep the effective batch 16" in check.remedy
    suggested = int(check.remedy.split(": micro_batch ")[1].split()[0])
    recomputing = dict(uncheckpointed_layers=0)
    assert estimate_train_vram(SHAPE, cfg, micro_batch=suggested, **recomputing).total_gib <= 32.0
    assert estimate_train_vram(SHAPE, cfg, micro_batch=suggested + 1, **recomputing).total_gib > 32.0
    assert "other processes hold 48.0 GiB" in check.remedy


def test_vram_nothing_fits(cfg):
    check = run_checks(cfg, "train", healthy(gpus=[a800(free_gib=16.2)])).check("vram")
    assert check.status == "fail"
    assert "16.2 GiB free: nothing fits; micro_batch 1 needs ~" in check.remedy


def test_low_disk_fails_naming_volume_and_shortfall(cfg):
    facts = healthy(disks=disks(devices={"checkpoints": 2, "outputs": 2}, free={2: 30.0}))
    report = run_checks(cfg, "train", facts)
    check = report.check("disk checkpoints, outputs")
    assert check.status == "fail"
    need = disk_needs(cfg, "train", SHAPE, facts)["checkpoints"][0]
    assert f"volume at /vol2: needs {need / GIB:.1f} GiB" in check.detail
    assert f"short by {need / GIB - 30.0:.1f} GiB" in check.detail
    assert "make clean-cache" in check.remedy
    assert report.check("disk hf_cache, data").status == "pass"


def test_disk_needs_add_up_on_one_volume(cfg):
    """merge: the base download (HF cache) and the merged model (outputs) share one filesystem."""
    uncached = ModelFact(name_or_path="Qwen/Qwen3-VL-32B-Instruct", kind="hub")
    each = 62.2  # GiB, enough for either but not for both
    facts = healthy(model=uncached, env={}, disks=disks(free_gib=each * 1.5))
    check = run_checks(cfg, "merge", facts).check("disk hf_cache, data, checkpoints, outputs")
    assert check.status == "fail"
    assert "base model download 62.1 GiB" in check.detail and "merged model 62.1 GiB" in check.detail


def test_small_shm_fails(cfg):
    check = run_checks(cfg, "train", healthy(shm_total_bytes=64 * 1024**2)).check("shm")
    assert check.status == "fail"
    assert "/dev/shm is 0.06 GiB" in check.detail and "--shm-size" in check.remedy


def test_model_cache_and_offline(cfg):
    missing = ModelFact(name_or_path="Qwen/Qwen3-VL-32B-Instruct", kind="hub")
    offline = run_checks(cfg, "train", healthy(model=missing)).check("model")
    assert offline.status == "fail" and "HF_HUB_OFFLINE=1" in offline.detail
    online = run_checks(cfg, "train", healthy(model=missing, env={})).check("model")
    assert online.status == "pass" and "downloads ~62 GiB" in online.detail
    report = run_checks(cfg, "train", healthy(model=missing, hf_cache_writable=False, env={}))
    assert report.check("hf cache").status == "fail"


def test_model_shape_falls_back_to_builtin_32b(cfg):
    report = run_checks(
        cfg, "train", healthy(model=ModelFact(name_or_path="Qwen/Qwen3-VL-32B-Instruct", kind="hub"))
    )
    assert report.shape_source.startswith("built-in Qwen3-VL-32B shape")
    assert report.info["params"]["total"] == QWEN3_VL_32B_PARAMS


def test_a_qwen2_5_vl_32b_hub_id_gets_its_own_builtin_shape(cfg):
    from pcbvlm.families import get_family

    cfg.model.name_or_path = "Qwen/Qwen2.5-VL-32B-Instruct"
    report = run_checks(
        cfg, "train", healthy(model=ModelFact(name_or_path=cfg.model.name_or_path, kind="hub"))
    )
    assert report.shape_source.startswith("built-in Qwen2.5-VL-32B shape")
    assert (
        report.info["params"]["total"] == count_parameters(get_family("qwen2_5_vl").config_dict_32b()).total
    )


def test_missing_data_fails_with_make_data(cfg):
    check = run_checks(cfg, "train", healthy(data_files={"data/deeppcb/train.jsonl": False})).check("data")
    assert check.status == "fail" and "make data" in check.remedy


def test_packages(cfg):
    packages = dict(healthy().packages)
    packages["peft"] = PackageFact(error="not installed")
    packages["deepspeed"] = PackageFact(version="0.19.8", error="ImportError: libcudart.so.12")
    report = run_checks(cfg, "train", healthy(packages=packages))
    assert report.check("package peft").status == "fail"
    assert report.check("package deepspeed").status == "warn"


def test_bitsandbytes_without_cuda_library_fails_training(cfg):
    bad = BnbFact(ok=False, detail="RuntimeError: native library not loaded (backend CUDA)")
    check = run_checks(cfg, "train", healthy(bnb_cuda=bad)).check("bitsandbytes cuda")
    assert check.status == "fail" and "native library" in check.detail
    # Evaluating the AWQ model does not need bitsandbytes; evaluating the NF4 run does.
    assert run_checks(cfg, "eval", healthy(bnb_cuda=bad)).check("bitsandbytes cuda").status == "warn"
    nf4_run = healthy(bnb_cuda=bad, outputs={"merged": False, "quantized": False})
    assert run_checks(cfg, "eval", nf4_run).check("bitsandbytes cuda").status == "fail"


def test_merge_needs_ram_or_gpu(cfg):
    low = healthy(ram_available_bytes=40 * GIB, ram_total_bytes=64 * GIB)
    check = run_checks(cfg, "merge", low).check("ram")
    assert check.status == "fail" and "merge on cpu" in check.detail
    assert run_checks(cfg, "merge", low).check("gpu").status == "skip"  # merge_device cpu uses no GPU


# --------------------------------------------------------------------------------------------------------
# The job


def _load_job():
    from pcbvlm.commands import preflight

    return preflight


@pytest.fixture
def facts_file(tmp_path):
    """Packages stated, not imported (the import probe takes many seconds); no GPU."""
    ok = {"version": "1.0"}
    names = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed")
    path = tmp_path / "facts.json"
    path.write_text(
        json.dumps(
            {
                "packages": {n: ok for n in names},
                "gpus": [],
                "torch_cuda_available": False,
                "gpu_source": "none",
            }
        )
    )
    return path


def test_job_production_config_without_gpu_fails(clean_env, tmp_path, facts_file):
    """The script end to end (a child process, like make): exit 1, the missing GPU named, JSON written."""
    out = tmp_path / "out"
    proc = run_job(
        "preflight", "--job", "train", "--config", "config/config.yaml", "--facts", str(facts_file),
        "--set", f"paths.outputs_dir={out}",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "FAILED gpu: no NVIDIA GPU found" in proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads((out / "preflight" / "train.json").read_text())
    assert report["passed"] is False
    assert report["facts"]["gpus"] == []
    assert {"name": "gpu", "status": "fail"}.items() <= report["checks"][0].items()
    production = load_config(ROOT / "config" / "config.yaml")
    assert report["estimates"][0]["total_gib"] == pytest.approx(
        estimate_train_vram(SHAPE, production).total_gib, abs=0.01
    )


def test_job_tiny_config_passes_on_cpu(clean_env, tmp_path, facts_file, capsys):
    job = _load_job()
    out = tmp_path / "out"
    code = job.main(
        [
            "--job",
            "train",
            "--config",
            "config/tiny.yaml",
            "--facts",
            str(facts_file),
            "--set",
            f"paths.outputs_dir={out}",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "CPU allowed" in text
    report = json.loads((out / "preflight" / "train.json").read_text())
    assert report["passed"] is True and report["allow_cpu"] is True
    assert report["checks"][0] == {
        "name": "gpu",
        "status": "skip",
        "detail": "skipped: CPU allowed (resources.device is cpu)",
        "remedy": "",
    }


def test_job_simulated_a800_with_old_driver(clean_env, tmp_path, facts_file, capsys):
    # a host's advice (make setup), also when the tests run in an image
    clean_env.delenv("PCBVLM_IN_IMAGE", raising=False)
    job = _load_job()
    facts = json.loads(facts_file.read_text())
    facts |= {
        "gpus": [a800().model_dump(mode="json")],
        "torch_cuda_available": True,
        "torch_cuda": "13.0",
        "driver_version": "535.104.05",
        "bnb_cuda": {"ok": True, "detail": "stated"},
    }
    facts_file.write_text(json.dumps(facts))
    code = job.main(["--job", "train", "--facts", str(facts_file), "--out", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    assert code == 1
    assert "Ampere sm80" in captured.out
    assert "FAILED cuda driver: driver 535 supports CUDA <= 12.2, this environment needs 13.0" in captured.err
    assert (
        "-> fix: install the CUDA 12 stack (torch 2.10.0, CUDA 12.8): rm -rf .venv && make setup CUDA_STACK=12"
        in (captured.err)
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"gpu": []}', "unknown fact(s) gpu"),
        ('{"gpus": [{"name": 1}]}', "gpus.0"),
    ],
)
def test_job_bad_facts_file_is_one_line(clean_env, tmp_path, content, message, capsys):
    job = _load_job()
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(SystemExit) as info:
        job.run_job(job.main, ["--job", "train", "--facts", str(bad), "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert message in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------------------------
# Several GPUs: the accelerate profile and the per-GPU estimate


def _with_profile(cfg: Config, profile: str) -> Config:
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"accelerate_profile": profile})})


def _profile_check(cfg: Config, facts: Facts):
    return next(c for c in run_checks(cfg, "train", facts).checks if c.name == "accelerate profile")


def test_profile_check_counts_processes_against_gpus_and_refuses_zero3_with_qlora(cfg):
    two_gpus = healthy(gpus=[a800(), a800()])
    assert _profile_check(cfg, two_gpus).status == "pass"  # a800: one process
    ddp = _profile_check(_with_profile(cfg, "ddp"), two_gpus)
    assert (ddp.status, ddp.detail) == ("pass", "ddp: 2 processes, DDP")
    assert (
        _profile_check(_with_profile(cfg, "zero2"), two_gpus).detail == "zero2: 2 processes, DeepSpeed ZeRO-2"
    )
    short = _profile_check(_with_profile(cfg, "zero2"), healthy())
    assert short.status == "fail" and short.detail.endswith("but this host has 1 GPU")
    zero3 = _profile_check(_with_profile(cfg, "zero3"), two_gpus)
    assert zero3.status == "fail" and "ZeRO-3 with QLoRA" in zero3.detail and "zero2" in zero3.remedy
    lora = cfg.model_copy(update={"train": cfg.train.model_copy(update={"quantization": "none"})})
    assert _profile_check(_with_profile(lora, "zero3"), two_gpus).status == "pass"
    unknown = _profile_check(_with_profile(cfg, "zero9"), two_gpus)
    assert (
        unknown.status == "fail"
        and "choose one of: a800, cpu, cpu-multi, ddp, zero2, zero3" in unknown.detail
    )


@pytest.mark.parametrize(
    "profile, measured",
    [
        ("a800", 65.67),  # 1 GPU (bench/results/2026-11-29-NVIDIA-H200-x2-ddp.json, single_gpu)
        ("ddp", 69.67),  # 2 GPUs, same file
    ],
)
def test_per_gpu_estimate_of_each_profile_within_15_percent_of_the_measured_peak(cfg, profile, measured):
    """The configured setting (micro-batch 16, Liger, 10 uncheckpointed layers), 718-token samples."""
    estimate = estimate_train_vram(
        SHAPE, _with_profile(cfg, profile), seq_len=718, logit_tokens=231, fused_cross_entropy=True
    )
    assert abs(estimate.total_gib / measured - 1) <= 0.15, (estimate.total_gib, measured)


def test_sharding_lowers_the_per_gpu_estimate(cfg):
    per_gpu = {
        p: estimate_train_vram(SHAPE, _with_profile(cfg, p), fused_cross_entropy=True).total_gib
        for p in ("a800", "ddp", "zero2")
    }
    assert per_gpu["zero2"] <= per_gpu["a800"] < per_gpu["ddp"]
    lora = cfg.model_copy(update={"train": cfg.train.model_copy(update={"quantization": "none"})})
    zero2 = estimate_train_vram(SHAPE, _with_profile(lora, "zero2"), fused_cross_entropy=False)
    zero3 = estimate_train_vram(SHAPE, _with_profile(lora, "zero3"), fused_cross_entropy=False)
    assert zero3.total_gib < zero2.total_gib - 25  # a bf16 32B base is 62 GiB: half of it per GPU
    assert "per GPU (zero3, 2 processes)" in zero3.what
