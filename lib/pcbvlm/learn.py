"""The learning run: a small Qwen3-VL built from scratch learns to find defects on synthetic boards.

It answers one question the 32B job cannot answer cheaply: does data -> training -> generation ->
parsing -> scoring produce a detector? A model with every architecture feature of the 32B (mrope,
deepstack, the 2x2 patch merger, GQA) at a few million to tens of millions of parameters is trained with
all its parameters (`train.method: full`) on boards that the synthetic generator draws fresh for every
step (no board is seen twice, so the model cannot memorise), and every `eval_every_s` seconds it is
evaluated on held-out boards (another generator seed) through the real inference path:
`build_messages`, the processor, `generate_batch`, `parse_answer` with each image's size, and the
DeepPCB protocol. The learning curve (F-score vs samples seen) goes to `curve.json` and `curve.png`.

The defaults are chosen to make the task as learnable as possible in minutes (the first probes memorised
1000 boards and found nothing on new ones): template pairs (the model sees the defect-free board first,
so a defect is a difference, not a shape to recognise), small boards with DeepPCB-sized features
(320x256 px, 80 visual tokens per image), at most 3 defects per board listed in reading order, and fresh
boards drawn in DataLoader worker processes and turned into patches on the GPU (the processor's
per-sample CPU encoding was the limit at ~90 boards/s). The measured run (BENCHMARKS.md, "Learning run")
did not get past the answer's prior in 5 minutes: held-out F stayed near 0.

The batches are exactly what `TrainCollator` makes of the same boards (tests/test_learn.py compares
them), so the saved model is a normal Qwen3-VL folder that every job of the project loads.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import tempfile
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pcbvlm.config import Config
from pcbvlm.synth import JPEG_QUALITY, Board, generate_dataset, generate_sample

log = logging.getLogger(__name__)

# Model sizes (all with the 32B's features; head_dim set, mrope sections summing to head_dim / 2).
# "demo" fits the 5 MB the repository allows for an embedded model (fp16); "base" is the learning run's.
SIZES: dict[str, dict[str, Any]] = {
    "micro": {  # for CPU smoke tests only
        "text": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "mlp": 128},
        "vision": {"hidden": 32, "depth": 2, "heads": 2, "mlp": 64, "deepstack": [1]},
    },
    "demo": {
        "text": {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2, "head_dim": 32, "mlp": 384},
        "vision": {"hidden": 96, "depth": 4, "heads": 3, "mlp": 256, "deepstack": [1, 2]},
    },
    "base": {
        "text": {"hidden": 512, "layers": 6, "heads": 8, "kv_heads": 4, "head_dim": 64, "mlp": 1536},
        "vision": {"hidden": 256, "depth": 6, "heads": 4, "mlp": 1024, "deepstack": [1, 3]},
    },
}


def mrope_section(head_dim: int) -> list[int]:
    """t/h/w rotary sections summing to head_dim / 2, in the 32B's proportions ([24, 20, 20] of 64)."""
    half = head_dim // 2
    hw = round(half * 20 / 64)
    return [half - 2 * hw, hw, hw]


def learn_model_config(size: str, tokenizer, board: Board):
    from transformers import Qwen3VLConfig

    spec = SIZES[size]
    text, vision = spec["text"], spec["vision"]
    patches_per_side = max(board.width, board.height) // 16
    return Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": text["hidden"],
            "intermediate_size": text["mlp"],
            "num_hidden_layers": text["layers"],
            "num_attention_heads": text["heads"],
            "num_key_value_heads": text["kv_heads"],
            "head_dim": text["head_dim"],
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": mrope_section(text["head_dim"]),
                "mrope_interleaved": True,
            },
            "tie_word_embeddings": False,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "depth": vision["depth"],
            "hidden_size": vision["hidden"],
            "intermediate_size": vision["mlp"],
            "num_heads": vision["heads"],
            "in_channels": 3,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": text["hidden"],
            # A learned grid of positions covering the board's patches (resampled per image).
            "num_position_embeddings": patches_per_side**2,
            "deepstack_visual_indexes": vision["deepstack"],
        },
        tie_word_embeddings=False,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )


def build_learn_model(size: str, board: Board, seed: int = 0):
    """(model, processor): a random Qwen3-VL of `size` with the tiny model's tokenizer, and a processor
    that keeps boards of `board`'s size as they are (max_pixels = the board's pixels)."""
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    from pcbvlm.tiny import build_processor, build_tokenizer

    if board.width % 32 or board.height % 32:
        raise ValueError(
            f"board {board.width}x{board.height}: sides must be multiples of 32 (16 px patches, 2x2 merge)"
        )
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    set_pixel_range(processor, min(16384, board.width * board.height), board.width * board.height)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(learn_model_config(size, tokenizer, board))
    model.generation_config = GenerationConfig(
        eos_token_id=[
            tokenizer.convert_tokens_to_ids("<|im_end|>"),
            tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        ],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model, processor


def set_pixel_range(processor, min_pixels: int, max_pixels: int) -> None:
    ip = processor.image_processor
    ip.min_pixels, ip.max_pixels = min_pixels, max_pixels
    ip.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}


# ------------------------------------------------------------------------------------------------------
# Batches built on the device


def patchify(gray: torch.Tensor, patch: int = 16, merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """Grey uint8 images (N, H, W) -> Qwen3-VL `pixel_values` (N * H/16 * W/16, 3 * 2 * 16 * 16), as the
    processor makes them from the RGB copies of the same images (no resize: H and W are multiples of 32):
    scaled to [-1, 1] (mean 0.5, std 0.5), repeated over the 2 temporal frames, and ordered so that the
    four patches of each 2x2 merge block are consecutive."""
    n, h, w = gray.shape
    x = (gray.float() / 255.0 - 0.5) / 0.5
    x = x[:, None, None].expand(n, temporal, 3, h, w)
    gh, gw = h // patch, w // patch
    x = x.reshape(n, temporal, 3, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(n * gh * gw, 3 * temporal * patch * patch)


@dataclass
class BatchBuilder:
    """Builds `TrainCollator`'s batch from board pixels and answer token ids. Every sample has the same
    prompt (same images sizes, same text), so the prompt's token ids are computed once."""

    processor: Any
    cfg: Config
    board: Board
    prompt_ids: torch.Tensor = field(init=False)
    prompt_types: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        from pcbvlm.deeppcb import build_messages

        blank = Image.new("RGB", (self.board.width, self.board.height), (255, 255, 255))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "blank.png"
            blank.save(path)
            sample = {"id": "0", "image": str(path), "template": str(path)}
            messages = build_messages(sample, self.cfg.data, with_answer=False)
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            images = [blank] * (2 if self.cfg.data.with_template else 1)
            enc = self.processor(text=[text], images=images, return_tensors="pt")
        self.prompt_ids = enc["input_ids"][0]
        self.prompt_types = enc["mm_token_type_ids"][0]
        self.pad_id = self.processor.tokenizer.pad_token_id
        self.images_per_sample = len(images)

    def __call__(self, pixels: torch.Tensor, answers: list[list[int]]) -> dict[str, torch.Tensor]:
        """pixels: uint8 (B, images_per_sample, H, W) on the target device; answers: token ids of each
        answer followed by <|im_end|>."""
        from pcbvlm.collator import IGNORE_INDEX

        device = pixels.device
        b = len(answers)
        p = len(self.prompt_ids)
        length = p + max(len(a) for a in answers)
        input_ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        types_ = torch.zeros((b, length), dtype=torch.long)
        input_ids[:, :p] = self.prompt_ids
        types_[:, :p] = self.prompt_types
        for row, answer in enumerate(answers):
            ids = torch.tensor(answer, dtype=torch.long)
            input_ids[row, p : p + len(ids)] = ids
            labels[row, p : p + len(ids)] = ids
            attention[row, : p + len(ids)] = 1
        n, h, w = b * pixels.shape[1], pixels.shape[2], pixels.shape[3]
        grid = torch.tensor([[1, h // 16, w // 16]] * n, dtype=torch.long)
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": attention.to(device),
            "labels": labels.to(device),
            "mm_token_type_ids": types_.to(device),
            "pixel_values": patchify(pixels.reshape(n, h, w)),
            "image_grid_thw": grid.to(device),
        }


def batch_vision_attention(model) -> int:
    """Let the vision tower attend over all images of a batch in one call when they have the same size.

    transformers' Qwen3-VL vision attention (without flash-attention) splits the patches per image and
    calls attention once per image: 256 calls per layer for a batch of 128 template pairs. When every
    image has the same number of patches the same attention is one batched call (same result, tested).
    Other batches take the stock path. Returns how many attention modules were switched."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen

    stock = qwen.Qwen3VLVisionAttention.forward

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        if len(set(lengths)) != 1:
            return stock(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        seq = hidden_states.shape[0]
        n, per = len(lengths), lengths[0]
        q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = qwen.apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.reshape(n, per, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        return self.proj(out.transpose(1, 2).reshape(seq, -1))

    switched = 0
    for module in model.modules():
        if isinstance(module, qwen.Qwen3VLVisionAttention):
            module.forward = types.MethodType(forward, module)
            switched += 1
    return switched


# ------------------------------------------------------------------------------------------------------
# Fresh boards


def jpeg_roundtrip(img: Image.Image) -> np.ndarray:
    """The board as the dataset files hold it (JPEG, quality 92), so training sees the same artefacts
    as evaluation on `make synth` output."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    buf.seek(0)
    with Image.open(buf) as decoded:
        return np.asarray(decoded.convert("L"))


class FreshBoards(torch.utils.data.IterableDataset):
    """An endless stream of new boards: worker w of n draws indices w, w + n, w + 2n, ... of the
    generator with `seed`. Yields (pixels uint8 (images, H, W), answer token ids)."""

    def __init__(self, board: Board, seed: int, tokenizer, with_template: bool, start: int = 0):
        self.board, self.seed, self.tokenizer, self.with_template, self.start = (
            board,
            seed,
            tokenizer,
            with_template,
            start,
        )

    def __iter__(self):
        from pcbvlm.answer import format_answer
        from pcbvlm.collator import END_OF_TURN

        info = torch.utils.data.get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        index = self.start + wid
        while True:
            try:
                sample = generate_sample(index, self.seed, board=self.board)
            except RuntimeError:  # a board on which no defect fits: skip it
                index += workers
                continue
            index += workers
            images = [sample.template, sample.test] if self.with_template else [sample.test]
            pixels = np.stack([jpeg_roundtrip(img) for img in images])
            answer = format_answer(sample.objects, self.board.width, self.board.height)
            ids = self.tokenizer(answer + END_OF_TURN, add_special_tokens=False)["input_ids"]
            yield torch.from_numpy(pixels), ids


def collate_boards(items):
    return torch.stack([pixels for pixels, _ in items]), [ids for _, ids in items]


# ------------------------------------------------------------------------------------------------------
# Held-out evaluation through the real inference path


def heldout_samples(cfg: Config, board: Board, num: int, seed: int, folder: Path) -> list[dict[str, Any]]:
    """`num` boards of another seed written as a DeepPCB-layout dataset and converted like `make data`
    (every sample of it, whatever its split file: none was trained on)."""
    from pcbvlm.deeppcb import convert

    generate_dataset(folder, num, seed=seed, board=board)
    conversion = convert(folder, cfg.data)
    samples = [s for split in ("train", "val", "test") for s in conversion.samples.get(split, [])]
    return sorted(samples, key=lambda s: s["id"])


def evaluate_samples(
    model, processor, cfg: Config, samples: list[dict[str, Any]], batch_size: int, max_new_tokens: int
) -> dict[str, Any]:
    """DeepPCB precision/recall/F/AP and the parse failure rate of the model on `samples`, with
    `generate_predictions` (the evaluation job's generation and parsing)."""
    from pcbvlm.generate import LoadedModel, generate_predictions
    from pcbvlm.metrics import EvalImage, deeppcb_metrics

    processor.tokenizer.padding_side = "left"
    loaded = LoadedModel(model, processor, "learn", "in memory")
    was_training = model.training
    model.eval()
    device_type = model.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
        predictions, images_per_s = generate_predictions(
            cfg, None, samples, batch_size, max_new_tokens, loaded=loaded
        )
    model.train(was_training)
    images = [
        EvalImage(s["id"], s["width"], s["height"], s["objects"], p["objects"])
        for s, p in zip(samples, predictions, strict=True)
    ]
    metrics = dict(deeppcb_metrics(images).metrics)
    metrics["parse_failure_rate"] = sum(p["error"] is not None for p in predictions) / max(
        1, len(predictions)
    )
    metrics["images_per_s"] = images_per_s
    metrics["example"] = {
        "id": samples[0]["id"],
        "answer": predictions[0]["raw"],
        "truth": samples[0]["objects"],
    }
    return metrics


# ------------------------------------------------------------------------------------------------------
# The run


@dataclass
class LearnSettings:
    size: str = "base"
    seconds: float = 300.0  # wall-clock budget of training and the periodic evaluations
    batch: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_fraction: float = 0.03
    weight_decay: float = 0.05
    eval_every_s: float = 60.0
    eval_boards: int = 200
    final_eval_boards: int = 500
    eval_batch: int = 250
    max_new_tokens: int = 128
    workers: int = 8
    seed: int = 0  # model initialisation
    train_seed: int = 1  # the generator seed of the training boards
    heldout_seed: int = 7  # the generator seed of the held-out boards (never trained on)
    width: int = 320
    height: int = 256
    scale: float = 1.0
    max_defects: int = 3
    device: str = "auto"
    save_dtype: str = "float16"

    @property
    def board(self) -> Board:
        return Board(self.width, self.height, self.scale, self.max_defects, "reading")


def learn_config(base: Config) -> Config:
    """The project config with the learning run's data settings: template pairs."""
    cfg = base.model_copy(deep=True)
    cfg.data.with_template = True
    return cfg


def lr_at(settings: LearnSettings, fraction: float) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio, over the fraction of the time budget spent."""
    if fraction < settings.warmup_fraction:
        return settings.lr * max(fraction, 1e-3) / settings.warmup_fraction
    progress = min(1.0, (fraction - settings.warmup_fraction) / (1 - settings.warmup_fraction))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return settings.lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine)


def save_model(model, processor, out: Path, dtype: torch.dtype, meta: dict[str, Any]) -> Path:
    """A normal Hugging Face folder (config, safetensors, tokenizer, image processor) + learn.json."""
    from pcbvlm.io import atomic_directory

    model = model.to(dtype)
    with atomic_directory(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        processor.tokenizer.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)
        (tmp / "learn.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def plot_curve(curve: list[dict[str, Any]], title: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pcbvlm.io import atomic_write_figure

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    xs = [c["samples_seen"] for c in curve]
    for key, color in (("fscore", "#d62728"), ("precision", "#1f77b4"), ("recall", "#2ca02c")):
        ax.plot(xs, [c[key] for c in curve], "o-", label=f"held-out {key}", color=color)
    ax.axhline(0.8, color="grey", linestyle=":", linewidth=1, label="goal F = 0.8")
    ax.set_xlabel("training samples seen (each a fresh board)")
    ax.set_ylabel("DeepPCB protocol (IoU > 0.33)")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_figure(fig, out)
    plt.close(fig)
    return out


def learn(
    settings: LearnSettings, base_cfg: Config, out_dir: Path, save: Path | None = None
) -> dict[str, Any]:
    """Train a `settings.size` model from scratch on fresh boards for `settings.seconds`; returns the
    result (also written to out_dir/curve.json, with curve.png)."""
    from pcbvlm.collator import keep_answer_logits
    from pcbvlm.io import atomic_write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = learn_config(base_cfg)
    board = settings.board
    device = (
        settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    cuda = device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model, processor = build_learn_model(settings.size, board, settings.seed)
    parameters = sum(p.numel() for p in model.parameters())
    batch_vision_attention(model)
    model.to(device).train()
    model.config.use_cache = False
    builder = BatchBuilder(processor, cfg, board)
    heldout_root = Path(tempfile.mkdtemp(prefix="pcbvlm-heldout-"))  # read by path during evaluation
    heldout = heldout_samples(
        cfg, board, settings.final_eval_boards, settings.heldout_seed, heldout_root / "boards"
    )
    periodic = heldout[: settings.eval_boards]
    print(
        f"learn: {settings.size} model, {parameters / 1e6:.2f} M parameters, full training on {device}; "
        f"boards {board.width}x{board.height}, scale {board.feature_scale}, 1-{board.max_defects} defects, "
        f"template pairs; {len(builder.prompt_ids)} prompt tokens; held-out: {len(heldout)} boards of seed "
        f"{settings.heldout_seed}",
        flush=True,
    )
    loader = torch.utils.data.DataLoader(
        FreshBoards(board, settings.train_seed, processor.tokenizer, cfg.data.with_template),
        batch_size=settings.batch,
        num_workers=settings.workers,
        collate_fn=collate_boards,
        pin_memory=cuda,
        prefetch_factor=4 if settings.workers else None,
        persistent_workers=bool(settings.workers),
    )
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.95),
        fused=cuda,
    )
    curve: list[dict[str, Any]] = []
    losses: list[torch.Tensor] = []
    samples_seen = step = 0
    eval_seconds = 0.0
    begin = time.perf_counter()
    last_eval = begin
    last_log = begin
    wait_seconds = 0.0

    def record(final: bool) -> dict[str, Any]:
        nonlocal eval_seconds
        start = time.perf_counter()
        samples = heldout if final else periodic
        metrics = evaluate_samples(
            model, processor, cfg, samples, settings.eval_batch, settings.max_new_tokens
        )
        eval_seconds += time.perf_counter() - start
        point = {
            "samples_seen": samples_seen,
            "step": step,
            "train_seconds": round(time.perf_counter() - begin - eval_seconds, 1),
            "elapsed_s": round(time.perf_counter() - begin, 1),
            "train_loss": round(float(torch.stack(losses[-20:]).mean()), 4) if losses else None,
            "boards": len(samples),
            "final": final,
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()},
        }
        print(
            f"eval @ {samples_seen} samples ({point['elapsed_s']} s): held-out P {point['precision']:.3f} "
            f"R {point['recall']:.3f} F {point['fscore']:.3f} AP {point['ap']:.3f} on {len(samples)} boards, "
            f"parse failures {point['parse_failure_rate']:.1%}; e.g. {point['example']['answer'][:120]!r}",
            flush=True,
        )
        return point

    iterator = iter(loader)
    while True:
        now = time.perf_counter()
        if now - begin >= settings.seconds:
            break
        fetch = time.perf_counter()
        pixels, answers = next(iterator)
        wait_seconds += time.perf_counter() - fetch
        fraction = (time.perf_counter() - begin) / settings.seconds
        for group in optimizer.param_groups:
            group["lr"] = lr_at(settings, fraction)
        batch = builder(pixels.to(device, non_blocking=True), answers)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(**keep_answer_logits(batch)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        step += 1
        samples_seen += len(answers)
        if time.perf_counter() - last_log >= 15:
            last_log = time.perf_counter()
            elapsed = last_log - begin
            print(
                f"step {step}: {samples_seen} samples, loss {float(torch.stack(losses[-20:]).mean()):.4f}, "
                f"lr {optimizer.param_groups[0]['lr']:.2e}, {samples_seen / max(1e-9, elapsed - eval_seconds):.0f} "
                f"samples/s (waiting for boards {wait_seconds / max(1e-9, elapsed - eval_seconds):.0%})",
                flush=True,
            )
        if time.perf_counter() - last_eval >= settings.eval_every_s:
            curve.append(record(final=False))
            last_eval = time.perf_counter()
    train_seconds = time.perf_counter() - begin - eval_seconds
    final = record(final=True)
    curve.append(final)
    result = {
        "settings": {**asdict(settings), "board": board.describe()},
        "model": {"size": settings.size, "parameters": parameters, "spec": SIZES[settings.size]},
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "samples_seen": samples_seen,
        "steps": step,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "samples_per_s": round(samples_seen / max(train_seconds, 1e-9), 1),
        "waiting_for_boards": round(wait_seconds / max(train_seconds, 1e-9), 3),
        "heldout": f"{len(heldout)} boards of generator seed {settings.heldout_seed} (training boards: seed {settings.train_seed})",
        "final": final,
        "curve": curve,
    }
    atomic_write_json(out_dir / "curve.json", result)
    plot_curve(
        curve,
        f"{settings.size} Qwen3-VL from scratch ({parameters / 1e6:.1f} M), full training, fresh synthetic boards; "
        f"final held-out F {final['fscore']:.3f}",
        out_dir / "curve.png",
    )
    if save is not None:
        meta = {
            "what": "a small Qwen3-VL trained from scratch on synthetic boards by pcbvlm.learn (not the 32B)",
            "settings": result["settings"],
            "parameters": parameters,
            "final": {k: final[k] for k in ("precision", "recall", "fscore", "ap", "samples_seen")},
        }
        save_model(model, processor, save, getattr(torch, settings.save_dtype), meta)
    shutil.rmtree(heldout_root, ignore_errors=True)
    return result
