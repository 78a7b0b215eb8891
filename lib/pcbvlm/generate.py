"""Running a fine-tuned model: load any of its forms, batched generation, boxes with confidences.

A model reference is one of: a training run folder or its `adapter/` (base + LoRA adapter, the base
loaded as for training: NF4 on a GPU when `train.quantization` is nf4), a merged folder (bf16), a
quantized folder (compressed-tensors W4A16, run with its weights kept in 4 bits: `pcbvlm.int4`), or the
base model itself (hub id or folder).

Each box gets a confidence: the mean probability of the tokens the model generated for that object's
`{...}` (greedy decoding, probabilities from the softmax of the logits), so that precision-recall
curves and AP rank detections by how sure the model was. Boxes are read in the answer frame of the
loaded model's family (pcbvlm.families), from its config.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pcbvlm.answer import RELATIVE_FRAME, Frame
from pcbvlm.collator import image_paths, load_image
from pcbvlm.config import Config
from pcbvlm.errors import UserError
from pcbvlm.families import ModelFamily, family_of_model, get_family
from pcbvlm.io import is_partial
from pcbvlm.parsing import mean_token_scores, parse_answer
from pcbvlm.samples import build_messages

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    kind: str  # adapter | merged | quantized | base
    path: str
    kv_cache: str = "dynamic"  # eval.kv_cache: dynamic, or static (compiled decoding on a GPU)
    prompt_lookup_tokens: int = 0  # eval.prompt_lookup_tokens: draft tokens per step at batch 1 (0 = off)
    decoder: str = "generate"  # eval.decoder: generate (transformers) or graph (pcbvlm.graphdecode)
    draft_tokens: int = 0  # eval.draft_tokens: the graph decoder's drafted tokens per step at batch 1
    compile_decoder: bool = False  # eval.compile_decoder: torch.compile the graph decoder's step
    graph_decoder: Any = None  # the GraphDecoder, made on first use (it keeps its cache and graphs)

    @property
    def family(self) -> ModelFamily:
        return family_of_model(self.model)

    def answer_frame(self, cfg: Config, width: int, height: int) -> Frame:
        """The coordinate frame this model answers in for a width x height image (its family's)."""
        return self.family.answer_frame(width, height, cfg.data.min_pixels, cfg.data.max_pixels)


IMAGE_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
MODEL_SHORTCUTS = ("auto", "run", "merged", "quantized", "base")


def resolve_model_ref(cfg: Config, ref: str | None) -> str:
    """A model reference (a path, a hub id or a shortcut) -> what `load_for_inference` loads.

    Shortcuts: `merged` / `quantized` are the folders the merge and quantize jobs write under
    paths.outputs_dir; `run` is the newest finished training run; `base` the configured base model;
    `auto` (the default) the first of quantized, merged, run, base that was made from the newest
    finished run (`pcbvlm.provenance.choose_auto`; printed on stderr as `model: ...`). A runs folder
    stands for its newest finished run.
    """
    from pcbvlm.runs import newest_finished_run

    outputs = Path(cfg.paths.outputs_dir)
    ref = ref or "auto"
    if ref in ("merged", "quantized"):
        return str(outputs / ref)
    if ref == "base":
        return cfg.model.name_or_path
    if ref == "run" or (Path(ref).is_dir() and newest_finished_run(Path(ref)) is not None):
        runs_dir = Path(cfg.paths.runs_dir) if ref == "run" else Path(ref)
        run = newest_finished_run(runs_dir)
        if run is None:
            raise UserError(f"no finished training run under {runs_dir}; run `make train` first")
        return str(run)
    if ref == "auto":
        # The newest consistent chain (pcbvlm.provenance): a quantized or merged model made from
        # another run or merge is named in a warning and skipped, and the line says what was chosen.
        from pcbvlm.provenance import choose_auto

        choice = choose_auto(outputs, newest_finished_run(Path(cfg.paths.runs_dir)), cfg.model.name_or_path)
        for warning in choice.warnings:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        print(choice.line, file=sys.stderr, flush=True)
        return choice.path
    return ref


def _has_processor(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() and (folder / "preprocessor_config.json").is_file()


def load_for_inference(cfg: Config, model_ref: str | Path | None = None) -> LoadedModel:
    """Load a model reference (see the module docstring) with its processor, ready for `generate`."""
    from pcbvlm.modeling import ensure_model_available, load_base_model, resolve_device, resolve_dtype
    from pcbvlm.processing import load_processor

    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    base = ensure_model_available(cfg)
    if model_ref is None or str(model_ref) in MODEL_SHORTCUTS:
        model_ref = resolve_model_ref(cfg, model_ref)
    ref = Path(str(model_ref)) if model_ref else None
    if ref is not None and is_partial(ref):
        raise UserError(f"{ref}: an unfinished output folder (.partial-*); run the job that writes it again")

    if ref is not None and ref.exists():
        from pcbvlm.runs import adapter_folder, full_model_folder

        ref = full_model_folder(ref) or ref  # a full-parameter run stands for its model/ folder
        adapter = adapter_folder(ref)
        if adapter is not None:
            from peft import PeftModel

            model = load_base_model(cfg, device=device, dtype=dtype)
            model = PeftModel.from_pretrained(model, str(adapter))
            kind, processor_source = "adapter", base
        elif (ref / "config.json").is_file():
            config = json.loads((ref / "config.json").read_text())
            quant = (config.get("quantization_config") or {}).get("quant_method")
            kind = "quantized" if quant == "compressed-tensors" else "merged"
            if kind == "quantized":
                from pcbvlm.int4 import load_int4_model

                model = load_int4_model(
                    ref, dtype, cfg.eval.int4_kernel, cfg.model.attn_implementation, device
                )
            else:
                model = (
                    get_family(config.get("model_type"), str(ref / "config.json"))
                    .model_class()
                    .from_pretrained(
                        ref,
                        dtype=dtype,
                        attn_implementation=cfg.model.attn_implementation,
                        device_map={"": 0} if device == "cuda" else None,
                    )
                )
            processor_source = str(ref) if _has_processor(ref) else base
        else:
            raise UserError(f"{ref}: neither a run/adapter folder nor a model folder (no config.json)")
    elif ref is None or str(ref) == base:
        model = load_base_model(cfg, device=device, dtype=dtype)
        kind, processor_source = "base", base
    else:
        raise UserError(f"{ref}: no such model folder")

    model.eval()
    if cfg.eval.kv_cache == "static":
        allow_compiled_decoding(model)
    processor = load_processor(processor_source, cfg.data.min_pixels, cfg.data.max_pixels, None)
    # Batched generation appends new tokens on the right: prompts must be padded on the left.
    processor.tokenizer.padding_side = "left"
    return LoadedModel(
        model,
        processor,
        kind,
        str(ref) if ref else base,
        cfg.eval.kv_cache,
        cfg.eval.prompt_lookup_tokens,
        cfg.eval.decoder,
        cfg.eval.draft_tokens,
        cfg.eval.compile_decoder,
    )


def allow_compiled_decoding(model) -> bool:
    """Let transformers compile the decoding step of a bitsandbytes-4-bit model.

    With a static KV cache, `generate` compiles the one-token decoding step (torch.compile,
    "reduce-overhead": CUDA graphs), which removes the per-kernel launch overhead that bounds batch-1
    decoding. transformers vetoes it for every bitsandbytes-4-bit model (its quantizer reports "not
    compileable"), but bitsandbytes >= 0.46 registers its 4-bit kernels as torch custom ops and the
    compiled step runs and generates the same tokens (tests/test_speed_levers.py on a GPU; timings in
    BENCHMARKS.md). The veto is lifted for this model only; returns whether it had to be."""
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantizer = getattr(hf_model, "hf_quantizer", None)
    if quantizer is None or quantizer.is_compileable or type(quantizer).__name__ != "Bnb4BitHfQuantizer":
        return False
    criteria = hf_model._valid_auto_compile_criteria

    def without_the_bnb_veto(model_kwargs, generation_config):
        hf_model.hf_quantizer = None
        try:
            return criteria(model_kwargs, generation_config)
        finally:
            hf_model.hf_quantizer = quantizer

    hf_model._valid_auto_compile_criteria = without_the_bnb_veto
    return True


def _token_offsets(tokenizer, token_ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decoded text and each token's [start, end) in it (from the lengths of growing prefixes, which
    handles byte-level tokens that only form a character together)."""
    offsets = []
    previous = 0
    for i in range(1, len(token_ids) + 1):
        length = len(tokenizer.decode(token_ids[:i], skip_special_tokens=True))
        offsets.append((previous, length))
        previous = length
    return tokenizer.decode(token_ids, skip_special_tokens=True), offsets


class ChosenTokenProbability:
    """A logits processor that records, at every step, the probability of the token greedy decoding picks
    (the largest after the other processors). Equivalent to `compute_transition_scores(normalize_logits=True)`
    on greedy output, but it keeps one number per sequence and step instead of every step's full
    vocabulary scores (batch x 151936 x 4 bytes per step: 13 GB for 128 images x 170 tokens)."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(torch.softmax(scores.float(), dim=-1).amax(dim=-1))
        return scores

    def probabilities(self) -> torch.Tensor:
        """(batch, generated tokens)"""
        return torch.stack(self.steps, dim=1)


@torch.inference_mode()
def generate_batch(
    loaded: LoadedModel,
    messages_batch: Sequence[list[dict]],
    max_new_tokens: int,
    min_new_tokens: int | None = None,
    cache_implementation: str | None = None,
    prompt_lookup_tokens: int | None = None,
    decoder: str | None = None,
    draft_tokens: int | None = None,
) -> list[tuple[str, list[tuple[int, int]], list[float]]]:
    """Greedy generation for a batch of chats; per sample: (text, token offsets, token probabilities).
    `cache_implementation` (default: the model's eval.kv_cache) "static" pre-allocates the KV cache,
    which lets transformers compile the decoding step on a GPU (the first batch of each shape pays for
    the compilation). `prompt_lookup_tokens` (default: eval.prompt_lookup_tokens; batch 1 only):
    transformers' prompt-lookup decoding drafts up to that many tokens by matching the last tokens
    against earlier ones (the JSON scaffolding of each box repeats) and verifies them in one forward
    pass; greedy verification keeps exactly the tokens plain decoding would pick. It needs the dynamic
    cache (transformers crops the cache of rejected drafts), so it replaces a static one."""
    if cache_implementation is None and loaded.kv_cache != "dynamic":
        cache_implementation = loaded.kv_cache
    lookup = loaded.prompt_lookup_tokens if prompt_lookup_tokens is None else prompt_lookup_tokens
    if len(messages_batch) != 1:
        lookup = 0  # transformers' assisted decoding runs one sequence at a time
    if lookup:
        cache_implementation = None
    processor = loaded.processor
    texts = [
        processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages_batch
    ]
    images = [load_image(p) for m in messages_batch for p in image_paths(m)]
    inputs = processor(text=texts, images=images or None, padding=True, return_tensors="pt")
    inputs = inputs.to(loaded.model.device)
    image_tokens = [processor.tokenizer.convert_tokens_to_ids(t) for t in IMAGE_TOKENS]
    if (decoder or loaded.decoder) == "graph":
        drafts = loaded.draft_tokens if draft_tokens is None else draft_tokens
        result = _graph_decoder(loaded, image_tokens).generate(
            dict(inputs), max_new_tokens, min_new_tokens or 0, drafts if len(messages_batch) == 1 else 0
        )
        return _answers(processor.tokenizer, result.tokens, result.probabilities, loaded.family.end_of_answer)
    from transformers import LogitsProcessorList

    recorder = ChosenTokenProbability()
    if lookup:
        # The recorder would also see the drafts that verification rejects: take the accepted tokens'
        # scores instead (one sequence, so one vocabulary row per token).
        extra = {"prompt_lookup_num_tokens": lookup, "output_scores": True, "return_dict_in_generate": True}
    else:
        extra = {"logits_processor": LogitsProcessorList([recorder])}
    # The answer is text: the image placeholders are never generated. This also keeps prompt lookup from
    # drafting them out of the prompt's image (the model would count them as image tokens).
    output = loaded.model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=False,
        suppress_tokens=image_tokens,
        pad_token_id=processor.tokenizer.pad_token_id,
        cache_implementation=cache_implementation,
        **extra,
    )
    prompt_length = inputs["input_ids"].shape[1]
    if lookup:
        new_tokens = output.sequences[:, prompt_length:]
        token_probs = torch.stack([torch.softmax(s.float(), -1).amax(-1) for s in output.scores], dim=1).cpu()
    else:
        new_tokens = output[:, prompt_length:]
        token_probs = recorder.probabilities().cpu()
    return _answers(processor.tokenizer, new_tokens, token_probs, loaded.family.end_of_answer)


def _graph_decoder(loaded: LoadedModel, suppress_ids: list[int]):
    if loaded.graph_decoder is None:
        from pcbvlm.graphdecode import GraphDecoder

        hf_model = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
        eos = hf_model.generation_config.eos_token_id
        loaded.graph_decoder = GraphDecoder(
            hf_model,
            suppress_ids,
            eos if isinstance(eos, list) else [eos],
            loaded.processor.tokenizer.pad_token_id,
            compile_step=loaded.compile_decoder,
        )
    return loaded.graph_decoder


def _answers(
    tokenizer, new_tokens, token_probs, end_of_answer: str
) -> list[tuple[str, list[tuple[int, int]], list[float]]]:
    """Per row: the text up to the end of turn, its token offsets and the tokens' probabilities."""
    stop_ids = {tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(end_of_answer)}
    results = []
    for row in range(new_tokens.shape[0]):
        ids = new_tokens[row].tolist()
        probs = token_probs[row].tolist()
        # Drop the end of turn and the padding after it: they belong to no object.
        keep = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
        text, offsets = _token_offsets(tokenizer, ids[:keep])
        results.append((text, offsets, probs[:keep]))
    return results


def to_prediction(
    text: str,
    offsets,
    probs,
    sample_id: str,
    width: int,
    height: int,
    classes: Sequence[str] | None = None,
    frame: Frame = RELATIVE_FRAME,
) -> dict[str, Any]:
    """One predictions.jsonl line: parsed pixel boxes, each scored by its tokens' mean probability.
    `classes`: the dataset's class names (DeepPCB's when None); `frame`: the model's answer frame for
    this image (`LoadedModel.answer_frame`)."""
    parsed = parse_answer(text, width, height, classes, frame)
    parsed = parsed.with_scores(mean_token_scores(parsed.spans, offsets, probs))
    return parsed.to_prediction(sample_id, text)


def generate_predictions(
    cfg: Config,
    model_path: str | Path | None,
    samples: Sequence[dict[str, Any]],
    batch_size: int,
    max_new_tokens: int,
    loaded: LoadedModel | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Predictions (pixel boxes with scores) for converted samples, and the images per second."""
    loaded = loaded or load_for_inference(cfg, model_path)
    predictions: list[dict[str, Any]] = []
    seconds = 0.0
    with tqdm(total=len(samples), desc=f"generating ({loaded.kind})", unit="img") as bar:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            # The prompt names the loaded model's coordinates, as it did in training.
            messages = [build_messages(s, cfg.data, with_answer=False, family=loaded.family) for s in chunk]
            begin = time.perf_counter()
            outputs = generate_batch(loaded, messages, max_new_tokens)
            seconds += time.perf_counter() - begin
            for sample, (text, offsets, probs) in zip(chunk, outputs, strict=True):
                width, height = int(sample["width"]), int(sample["height"])
                predictions.append(
                    to_prediction(
                        text,
                        offsets,
                        probs,
                        str(sample["id"]),
                        width,
                        height,
                        sample.get("classes"),
                        loaded.answer_frame(cfg, width, height),
                    )
                )
            bar.update(len(chunk))
    images_per_s = len(samples) / seconds if seconds > 0 else None
    return predictions, images_per_s
