"""The embedded tiny models: a random model of a family with its 32B's module names, built locally offline.

`ensure_tiny_model(path, family=...)` builds one once (deterministic for a seed) and saves a normal
Hugging Face folder: `config.json` + safetensors (the family's `tiny_config`), a byte-level BPE tokenizer
trained with `tokenizers` on this project's prompt/answer vocabulary plus Qwen's special tokens, a
Qwen-VL chat template, and the image processor settings (the family's patch size). Every job then loads it exactly like the 32B (`from_pretrained(path)`), so the
demo and the tests exercise the real code paths without a download.
"""

from __future__ import annotations

import json
from pathlib import Path

from pcbvlm.families import FAMILIES, ModelFamily
from pcbvlm.io import atomic_directory
from pcbvlm.labels import LABELS

DEFAULT_FAMILY = "qwen3_vl"

# Qwen2/Qwen3 special tokens, in Qwen's id order, so the template and processor find them by name.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen's pre-tokenizer split (digits one at a time, like Qwen): byte-level BPE then merges inside pieces.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# The same structure as Qwen2.5-VL- and Qwen3-VL-Instruct's templates for text + image turns (no tools, no video).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

TINY_IMAGE_PIXELS = (16384, 65536)  # min/max: 128x128 .. 256x256 -> 16..64 visual tokens


def _training_corpus() -> list[str]:
    """Text the tiny tokenizer must encode compactly: prompts, labels, JSON answers, chat scaffolding."""
    from pcbvlm.config import DataConfig
    from pcbvlm.samples import render_prompt

    data = DataConfig()
    prompts = [render_prompt(p, LABELS) for p in (data.prompt, data.template_prompt)]
    lines = [*prompts, "system", "user", "assistant"]
    for label in LABELS:
        lines.append(f'[{{"bbox_2d": [12, 345, 678, 901], "label": "{label}"}}]')
    # Numbers are split into digits (QWEN_SPLIT_PATTERN): every frame's coordinates use the same tokens.
    lines += [" ".join(str(i) for i in range(0, 1001, 7)), "[]", "```json", "```"]
    return lines * 4


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640,
        min_frequency=2,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    fast = Qwen2TokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(vocab_size: int, tokenizer=None, family: str = DEFAULT_FAMILY):
    """The family's tiny config (pcbvlm.families: `tiny_config`)."""
    return FAMILIES[family].tiny_config(tokenizer, vocab_size)


def build_processor(tokenizer, family: ModelFamily | None = None):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    family = family or FAMILIES[DEFAULT_FAMILY]
    # The PIL image processor works without torchvision; the patch and merge sizes are the family's.
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=family.patch_size,
        temporal_patch_size=2,
        merge_size=family.merge_size,
        min_pixels=TINY_IMAGE_PIXELS[0],
        max_pixels=TINY_IMAGE_PIXELS[1],
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return family.processor_class()(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )


def build_tiny_model(seed: int = 0, family: str = DEFAULT_FAMILY):
    """Return (model, processor) for the tiny random model of `family`; deterministic for a seed."""
    import torch
    from transformers import GenerationConfig

    spec = FAMILIES[family]
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, spec)
    config = spec.tiny_config(tokenizer, len(tokenizer))
    torch.manual_seed(seed)
    model = spec.model_class()(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[
            tokenizer.convert_tokens_to_ids(spec.end_of_answer),
            tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        ],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model, processor


def ensure_tiny_model(path: str | Path, seed: int = 0, family: str = DEFAULT_FAMILY) -> Path:
    """Build and save the tiny model of `family` (a model_type) to `path` unless a complete copy is
    already there."""
    path = Path(path)
    marker = path / "tiny-model.json"
    if marker.is_file():
        return path
    model, processor = build_tiny_model(seed, family)
    with atomic_directory(path, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        # Saved part by part (tokenizer with its chat template, image processor): the layout of a hub
        # folder, which pcbvlm.processing.load_processor reads back.
        processor.tokenizer.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)
        (tmp / "tiny-model.json").write_text(
            json.dumps({"seed": seed, "parameters": sum(p.numel() for p in model.parameters())}) + "\n"
        )
    return path
