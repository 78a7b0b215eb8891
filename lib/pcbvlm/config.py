"""The one typed configuration of every job.

A YAML file (default `config/config.yaml`) is read, `${VAR}` / `${VAR:-default}` references are filled
from the environment (the Makefile exports `.env`), a file may start from another with `extends:`,
`--set a.b=value` overrides are applied, and the result is validated by the pydantic schema below.
Any problem becomes a `ConfigError` whose message names the key path, e.g.
`train.lr: input should be a valid number, got 'fast'`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pcbvlm.errors import ConfigError
from pcbvlm.io import atomic_write_text

DEFAULT_CONFIG = Path("config/config.yaml")
# One name per folder: every shipped config reads these environment variables (`${DATA_DIR:-<its default>}`),
# so `make <job> DATA_DIR=X` (or DATA_DIR in .env) is the data folder of every job under every config.
PATH_VARIABLES = {
    "DEEPPCB_DIR": "paths.deeppcb_dir",
    "DATA_DIR": "paths.data_dir",
    "RUNS_DIR": "paths.runs_dir",
    "OUTPUTS_DIR": "paths.outputs_dir",
}


class Section(BaseModel):
    # Unknown keys are errors, not silently ignored typos.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(Section):
    deeppcb_dir: Path = Path("data/raw/DeepPCB")  # the folder holding PCBData/ (or PCBData itself)
    data_dir: Path = Path("data/deeppcb")  # converted jsonl + stats
    runs_dir: Path = Path("checkpoints")  # one folder per training run
    outputs_dir: Path = Path("outputs")  # merged / quantized models, eval reports
    hf_home: Path | None = None  # Hugging Face cache; None = HF_HOME or ~/.cache/huggingface


class ModelConfig(Section):
    name_or_path: str = "Qwen/Qwen3-VL-32B-Instruct"
    revision: str | None = None
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # The tiny embedded model is built on first use when name_or_path points at a missing folder and this is true.
    build_tiny_if_missing: bool = False


class DataConfig(Section):
    # {classes} in a prompt becomes the dataset's class names, comma separated, and {coordinates} the model
    # family's answer frame ("0-1000 relative coordinates", "absolute pixel coordinates"): pcbvlm.samples.render_prompt.
    prompt: str = (
        "Find every defect on this printed circuit board image. The defect classes are: "
        "{classes}. Answer with a JSON list of objects "
        '{"bbox_2d": [x1, y1, x2, y2], "label": class} in {coordinates}; '
        "answer [] if there is no defect."
    )
    template_prompt: str = (
        "The first image is the defect-free template of the board; the second image is the board under test. "
        "Find every defect on the board under test. The defect classes are: "
        "{classes}. Answer with a JSON list of objects "
        '{"bbox_2d": [x1, y1, x2, y2], "label": class} in {coordinates} of the second image; '
        "answer [] if there is no defect."
    )
    with_template: bool = False  # show the defect-free template before the test image
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    # Share held out as test when the source has no test split (COCO; YOLO or VOC without one).
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: int = 0
    exclude_ids: list[str] = ["44000020"]  # 44000020_test.jpg has its labels drawn on it
    # Images are resized by the processor to at most max_pixels (the main memory lever):
    # 640x640 = 409600 px = 400 visual tokens after the 2x2 merge of 16 px patches.
    max_pixels: int = Field(409600, gt=0)
    min_pixels: int = Field(65536, gt=0)

    @model_validator(mode="after")
    def _pixels_order(self) -> DataConfig:
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        return self


class LoraConfig(Section):
    r: int = Field(64, gt=0)
    alpha: int = Field(128, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # 0: no copy of every adapter input (BENCHMARKS.md)
    # Linear layers of the language model's decoder blocks; the vision tower is matched out by name.
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    train_merger: bool = False  # also put LoRA on the vision->text merger (model.visual.merger)


class TrainConfig(Section):
    # qlora: LoRA adapters on an NF4 base (the 32B); lora: adapters on an unquantized base; full: every
    # weight trained, no adapter (small models only: weights, gradients and AdamW states ~16 bytes/param).
    method: Literal["qlora", "lora", "full"] = "qlora"
    quantization: Literal["nf4", "none"] = "nf4"  # nf4 = QLoRA; none = LoRA on a bf16/fp32 base
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 where the GPU supports it
    lr: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    epochs: float = Field(3.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    micro_batch: int = Field(16, gt=0)
    grad_accum: int = Field(1, gt=0)
    gradient_checkpointing: bool = True
    # With checkpointing on: how many of the last decoder layers keep their activations instead of
    # recomputing them in the backward pass (faster by ~1/64 of the recomputation each, ~450 KB per token
    # and layer more memory; the preflight counts them).
    uncheckpointed_layers: int = Field(0, ge=0)
    # With checkpointing on: the checkpointed layers' inputs (one hidden state per token and layer, 7 GiB
    # for the 32B at mb 16) wait for the backward pass in pinned CPU memory instead of on the GPU, copied
    # on a side CUDA stream that overlaps the compute (pcbvlm.offload; the preflight counts the RAM).
    offload_checkpoints: bool = False
    # Fused Triton kernels (Liger): RMSNorm, rotary, and a cross-entropy fused with lm_head that never
    # materialises the logits. auto = on a CUDA GPU when liger-kernel is installed; liger = required.
    fused_kernels: Literal["auto", "liger", "none"] = "auto"
    # With fused kernels on: Liger's SiLU-multiply kernel in the decoder MLPs (one saved activation less
    # per layer; pcbvlm.fused_ops.fuse_swiglu). Same math within bf16 rounding.
    fused_swiglu: bool = True
    # LoRA's scaling and add in the B matmul's epilogue (one addmm instead of peft's copy, multiply and
    # add; pcbvlm.fused_ops.fuse_lora_adds). Same math; the sum is rounded once instead of twice.
    fused_lora: bool = True
    # Checkpointed layers compute down_proj's adapter before its frozen base product, so that their
    # recomputation in the backward pass stops before that product (torch's checkpoint early stop; a
    # ninth of a checkpointed layer's matmul work; pcbvlm.fused_ops.skip_down_proj_recompute). Same math;
    # down_proj's adapter output is rounded to the compute dtype before the add (not fused into an addmm).
    skip_down_proj_recompute: bool = True
    # QLoRA on a GPU: bitsandbytes' NF4 weights dequantized by one Triton kernel instead of its three
    # launches (pcbvlm.nf4_dequant; the same values). Off, or without triton: bitsandbytes' own kernels.
    fast_dequant: bool = True
    # Each decoder layer through torch.compile (pcbvlm.layer_compile): Inductor fuses the elementwise work
    # around the matmuls (norms, rotary, residual and LoRA adds, SiLU x up) in place of Liger's in-layer
    # kernels (its fused loss stays). The first step of each new batch shape compiles (6-24 s on the H200).
    compile_layers: bool = False
    eval_steps: int = Field(50, gt=0)
    save_steps: int = Field(50, gt=0)
    save_total_limit: int = Field(3, gt=0)
    logging_steps: int = Field(5, gt=0)
    seed: int = 42
    disk_reserve_gb: float = Field(20.0, ge=0.0)  # save and stop when the checkpoint volume has less free
    num_workers: int = Field(2, ge=0)
    accelerate_profile: str = "a800"  # config/accelerate/<profile>.yaml
    group_by_length: bool = True

    @model_validator(mode="after")
    def _method_matches_quantization(self) -> TrainConfig:
        if self.method == "qlora" and self.quantization != "nf4":
            raise ValueError(
                "method qlora trains adapters on an NF4 base: set quantization=nf4, or method=lora for "
                "adapters on an unquantized base"
            )
        if self.method in ("lora", "full") and self.quantization != "none":
            raise ValueError(
                f"method {self.method} trains on an unquantized base: set quantization=none "
                "(nf4 is for method=qlora)"
            )
        return self


class QuantizeConfig(Section):
    # The scheme is always AWQ W4A16 (pcbvlm.quantize.SCHEME): int4 weights in groups of group_size.
    group_size: int = Field(128, gt=0)
    num_calibration_samples: int = Field(256, gt=0)
    max_seq_length: int = Field(2048, gt=0)
    ignore: list[str] = ["re:.*visual.*", "re:.*lm_head"]
    device: Literal["auto", "cuda", "cpu"] = "auto"
    verify_samples: int = Field(4, ge=0)


class EvalConfig(Section):
    split: Literal["train", "val", "test"] = "test"
    batch_size: int = Field(32, gt=0)
    max_new_tokens: int = Field(512, gt=0)
    # static: a pre-allocated KV cache and a compiled decoding step (CUDA graphs) on a GPU; much faster
    # per token, after a compilation per batch shape (BENCHMARKS.md). dynamic: plain HF generate.
    kv_cache: Literal["dynamic", "static"] = "dynamic"
    # A quantized (compressed-tensors W4A16) model runs packed (pcbvlm.int4): tinygemm (torch's int4 kernel
    # for a few rows, its weights read back to bf16 per layer for many), dequant (plain nibbles, always
    # dequantized per layer; slower on the H200) or triton (plain nibbles, a fused int4 matmul for up to
    # 256 rows on CUDA: pcbvlm.int4_triton).
    int4_kernel: Literal["tinygemm", "dequant", "triton"] = "tinygemm"
    # generate: transformers' generate. graph: pcbvlm.graphdecode (static cache, the whole decoding step one
    # CUDA graph on a GPU, no compilation; the same greedy tokens). kv_cache and prompt_lookup_tokens apply
    # to generate only; draft_tokens to graph only (batch 1: drafted tokens verified per step, 0 = off).
    decoder: Literal["generate", "graph"] = "generate"
    draft_tokens: int = Field(0, ge=0, le=15)
    # graph only: torch.compile the decoding step before it is captured (fewer, fused small kernels; on
    # the 32B ~1.5-2 min of compilation per batch-1 shape, unfinished after ~3 min at batch 128; BENCHMARKS.md).
    compile_decoder: bool = False
    # Batch 1 only: draft up to N tokens by prompt lookup (repeated n-grams: the answer's JSON scaffolding)
    # and verify them in one forward pass; the same greedy answer. 0 = off. Needs the dynamic KV cache.
    prompt_lookup_tokens: int = Field(0, ge=0)
    worst_n: int = Field(8, ge=0)
    limit: int = Field(0, ge=0)  # evaluate only the first N samples (0 = all)


class ResourcesConfig(Section):
    allow_cpu: bool = False  # let jobs (and preflight) run without a GPU: the tiny model only
    device: Literal["auto", "cuda", "cpu"] = "auto"
    merge_device: Literal["cpu", "cuda"] = "cpu"  # a 32B bf16 merge needs ~67 GB of RAM or VRAM
    vram_margin_gib: float = Field(2.0, ge=0.0)  # CUDA context, allocator fragmentation
    ram_margin_gib: float = Field(8.0, ge=0.0)
    shm_min_gib: float = Field(1.0, ge=0.0)


class Config(Section):
    paths: PathsConfig = PathsConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    eval: EvalConfig = EvalConfig()
    resources: ResourcesConfig = ResourcesConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def digest(self) -> str:
        """A short hash of the resolved config, for run manifests."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def fill(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ and os.environ[name] != "":
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{where}: environment variable {name} is not set (set it in .env or the shell)")

    return _ENV_REF.sub(fill, value)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{line}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parent_path = (path.parent / str(parent)).resolve()
    if parent_path in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    return deep_merge(_read_yaml(parent_path, (*seen, path.resolve())), data)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(items: list[str] | str | None) -> list[tuple[str, Any]]:
    """`["train.lr=1e-4", "data.max_pixels=409600"]` (or one space-separated string) -> pairs.

    Values are read as YAML scalars, so `1e-4` is a number, `true` a bool, `[a, b]` a list.
    """
    if not items:
        return []
    if isinstance(items, str):
        items = items.split()
    pairs = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+", key):
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        # YAML 1.1 reads "1e-4" as a string; numbers written that way are meant as numbers.
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
            value = float(value)
        pairs.append((key, value))
    return pairs


def _apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = data
    fields: dict[str, Any] = Config.model_fields
    for depth, part in enumerate(parts):
        if part not in fields:
            raise ConfigError(f"{'.'.join(parts[: depth + 1])}: unknown key (from override {key}={value})")
        annotation = fields[part].annotation
        last = depth == len(parts) - 1
        if last:
            node[part] = value
            return
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])}: is a value, not a section (override {key})")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])}: must be a mapping")
        fields = annotation.model_fields


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key")
            continue
        msg = item["msg"]
        msg = msg.removeprefix("Value error, ")
        msg = msg[:1].lower() + msg[1:]
        if "input" in item and item["type"] not in ("missing",) and not isinstance(item["input"], dict):
            msg += f", got {item['input']!r}"
        lines.append(f"{loc}: {msg}")
    # Key path first (what the user must fix), then the file it came from.
    return "; ".join(lines) + f" (in {source})"


def load_config(path: str | Path | None = None, overrides: list[str] | str | None = None) -> Config:
    """Read, expand, override and validate a config. Raises ConfigError with the key path."""
    path = Path(path) if path else DEFAULT_CONFIG
    data = _read_yaml(path)
    data = _expand_env(data, "")
    for key, value in parse_overrides(overrides):
        _apply_override(data, key, value)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, str(path))) from None


def write_resolved(cfg: Config, directory: str | Path, name: str = "config.resolved.yaml") -> Path:
    """Write the fully resolved config next to a job's outputs (atomically)."""
    target = Path(directory) / name
    atomic_write_text(target, cfg.to_yaml())
    return target


def get_value(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, BaseModel) or part not in type(node).model_fields:
            raise ConfigError(f"{key}: unknown key")
        node = getattr(node, part)
    return node.model_dump(mode="json") if isinstance(node, BaseModel) else node


def main(argv: list[str] | None = None) -> int:
    """`python -m pcbvlm.config get KEY` prints one resolved value (used by the Makefile);
    `python -m pcbvlm.config show` prints the whole resolved config."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m pcbvlm.config")
    parser.add_argument("action", choices=["get", "show"])
    parser.add_argument("key", nargs="?")
    parser.add_argument("--config", default=os.environ.get("CONFIG") or str(DEFAULT_CONFIG))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, [*os.environ.get("SET", "").split(), *args.overrides])
        if args.action == "show":
            print(cfg.to_yaml(), end="")
        else:
            value = get_value(cfg, args.key or "")
            print(json.dumps(value) if isinstance(value, (dict, list)) else value)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
