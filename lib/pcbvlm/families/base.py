"""What every model family provides: `ModelFamily`, subclassed once per family (pcbvlm.families.<name>).

A family is everything about a model architecture that the jobs must not hard-code: the transformers
classes, where its modules are (LoRA targets, what stays out of 4-bit, the decoder layer), the AWQ
smoothing pairs, the fused-kernel patch, the end-of-answer token, the coordinate convention of its
grounding answers, its 32B-class shape (preflight, benchmarks) and its tiny random model (tests, demo).

The coordinate convention is the one thing that silently scores zero when wrong, so it is one method,
`answer_frame`: the size of the image in answer units. An answer coordinate is a pixel coordinate scaled
by frame / image size (x by width, y by height), rounded to an integer; every family's answers are such a
scaling, they differ only in the frame (Qwen3-VL: 1000 x 1000; Qwen2.5-VL: the image as its processor
resized it). `to_answer_box` and `to_pixel_box` are the two directions.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from pcbvlm.answer import Frame, from_frame, to_frame

# The Qwen chat template's end of turn: what a trained answer ends with and generation stops at.
QWEN_END_OF_TURN = "<|im_end|>"
# Module paths of transformers 5's Qwen-VL models (Qwen2.5-VL and Qwen3-VL alike).
QWEN_VL_DECODER_LINEARS = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)"
# Under transformers 5 the vision tower is `model.visual` (a bare "visual" does not match); lm_head stays
# in the compute dtype for the loss.
QWEN_VL_SKIP_QUANTIZATION = ("model.visual", "lm_head")
# AWQ smoothing pairs, scoped to the language model's decoder layers (the vision tower is not quantized,
# and its blocks must never be matched). The same pairs as llm-compressor's defaults for Qwen2/Qwen3 and
# its Qwen2.5-VL mappings; v_proj -> o_proj is skipped by AWQ when the shapes differ (grouped-query
# attention: the 32Bs have 8 KV heads).
_LM = r"re:.*language_model\.layers\.\d+\."
QWEN_AWQ_MAPPINGS: list[tuple[str, list[str]]] = [
    (
        _LM + r"input_layernorm$",
        [_LM + r"self_attn\.q_proj$", _LM + r"self_attn\.k_proj$", _LM + r"self_attn\.v_proj$"],
    ),
    (_LM + r"self_attn\.v_proj$", [_LM + r"self_attn\.o_proj$"]),
    (_LM + r"post_attention_layernorm$", [_LM + r"mlp\.gate_proj$", _LM + r"mlp\.up_proj$"]),
    (_LM + r"mlp\.up_proj$", [_LM + r"mlp\.down_proj$"]),
]


class ModelFamily(ABC):
    """One model family. Subclasses set the class attributes and implement the methods that raise."""

    model_type: ClassVar[str]  # config.json's `model_type`: the registry key
    # Hub ids and folder names of the family, for a model whose config.json is not at hand yet (a hub id
    # not downloaded, the tiny model before it is built).
    name_pattern: ClassVar[re.Pattern[str]]
    model_class_name: ClassVar[str]  # transformers' ...ForConditionalGeneration
    config_class_name: ClassVar[str]  # transformers' config of that model
    processor_class_name: ClassVar[str]  # transformers' processor (used without its video processor)
    # The language model's decoder layer class: llm-compressor's sequential unit.
    decoder_layer_class: ClassVar[str]
    patch_size: ClassVar[int]  # vision patch side, px
    merge_size: ClassVar[int] = 2  # patches merged per side into one visual token
    end_of_answer: ClassVar[str] = QWEN_END_OF_TURN
    # How the prompt names the answer frame: a prompt's `{coordinates}` (pcbvlm.samples.render_prompt), so
    # that the instruction the model reads matches the numbers it is trained to write.
    coordinates: ClassVar[str]
    skip_quantization: ClassVar[tuple[str, ...]] = QWEN_VL_SKIP_QUANTIZATION
    decoder_linears: ClassVar[str] = QWEN_VL_DECODER_LINEARS  # regex of the decoder blocks' linear owners
    merger_linears: ClassVar[str]  # regex of the vision->text merger's linears (lora.train_merger)
    awq_mappings: ClassVar[list[tuple[str, list[str]]]] = QWEN_AWQ_MAPPINGS
    liger_patch: ClassVar[str]  # liger_kernel.transformers' apply_liger_kernel_to_<family>
    liger_module: ClassVar[str]  # liger_kernel.transformers.model.<module> (its fused-loss forward)
    # Whether Liger's fused-loss forward of the family honours `logits_to_keep` (the answer-only logits
    # of pcbvlm.collator.keep_answer_logits, which cut the labels to the answer); without it the fused
    # loss would pair every position's hidden state with the cut labels, so only the norms/rotary run fused.
    liger_fused_loss: ClassVar[bool] = True
    hub_id_32b: ClassVar[str]  # the 32B-class model whose shape `config_dict_32b` holds
    name_32b: ClassVar[re.Pattern[str]]  # its hub ids: the preflight's built-in shape when offline

    def __repr__(self) -> str:
        return f"<model family {self.model_type}>"

    # -- transformers classes ------------------------------------------------------------------------

    def model_class(self):
        import transformers

        return getattr(transformers, self.model_class_name)

    def processor_class(self):
        import transformers

        from pcbvlm.processing import image_only_processor

        return image_only_processor(getattr(transformers, self.processor_class_name))

    def load_processor(self, cfg, source, revision: str | None = None):
        """The processor of `source` (a folder or hub id) with the config's image size range."""
        from pcbvlm.processing import load_processor

        return load_processor(source, cfg.data.min_pixels, cfg.data.max_pixels, revision, family=self)

    # -- module names --------------------------------------------------------------------------------

    def lora_target_regex(self, target_modules: Sequence[str], train_merger: bool) -> str:
        """A peft `target_modules` regex: the named linears of the language model's decoder blocks only,
        plus the vision merger's linears with `train_merger`."""
        names = "|".join(re.escape(n) for n in target_modules)
        pattern = rf"{self.decoder_linears}\.({names})"
        if train_merger:
            pattern = rf"(?:{pattern})|(?:{self.merger_linears})"
        return pattern

    def decoder_layers(self, model) -> list:
        """The language model's decoder layers (`model.model.language_model.layers` in transformers 5)."""
        return list(model.model.language_model.layers)

    def apply_fused_kernels(self, model, fused_cross_entropy: bool = True, in_layers: bool = True) -> None:
        """Liger's Triton kernels: RMSNorm and rotary fused (`in_layers`), and with `fused_cross_entropy`
        a loss fused with lm_head that never materialises the logits (see
        pcbvlm.modeling.apply_fused_kernels)."""
        import importlib

        import liger_kernel.transformers as liger

        fused_cross_entropy = fused_cross_entropy and self.liger_fused_loss
        if not (in_layers or fused_cross_entropy):
            return
        getattr(liger, self.liger_patch)(
            rope=in_layers,
            rms_norm=in_layers,
            fused_linear_cross_entropy=fused_cross_entropy,
            model=model,
        )
        if not fused_cross_entropy:
            return
        module = importlib.import_module(f"liger_kernel.transformers.model.{self.liger_module}")
        loss = module.LigerForCausalLMLoss
        if not getattr(loss, "pcbvlm_contiguous", False):
            # Liger's forward slices the hidden states for `logits_to_keep` (the answer-only logits of
            # pcbvlm.collator.keep_answer_logits) and then .view()s them, which fails on the
            # non-contiguous slice; a contiguous copy of the kept rows (~40 MB at micro-batch 16) fixes it.
            def contiguous_loss(hidden_states, *args, **kwargs):
                return loss(hidden_states.contiguous(), *args, **kwargs)

            contiguous_loss.pcbvlm_contiguous = True
            module.LigerForCausalLMLoss = contiguous_loss

    # -- coordinates ---------------------------------------------------------------------------------

    @abstractmethod
    def answer_frame(self, width: int, height: int, min_pixels: int, max_pixels: int) -> Frame:
        """The (width, height) of a width x height image in answer units, for the processor's image size
        range `min_pixels`..`max_pixels` (pcbvlm.config.DataConfig)."""

    def to_answer_box(
        self, box: Sequence[float], width: int, height: int, min_pixels: int, max_pixels: int
    ) -> list[int]:
        """Pixel box [x1, y1, x2, y2] of a width x height image -> the integer box the model answers."""
        return to_frame(box, width, height, self.answer_frame(width, height, min_pixels, max_pixels))

    def to_pixel_box(
        self, box: Sequence[float], width: int, height: int, min_pixels: int, max_pixels: int
    ) -> list[float]:
        """An answered box -> pixel box [x1, y1, x2, y2] of the width x height image (two decimals)."""
        return from_frame(box, width, height, self.answer_frame(width, height, min_pixels, max_pixels))

    def image_tokens(self, max_pixels: int) -> int:
        """Visual tokens of an image of at most max_pixels: one per merged (patch*merge)^2 block."""
        return max(1, max_pixels // (self.patch_size * self.merge_size) ** 2)

    # -- shapes --------------------------------------------------------------------------------------

    @abstractmethod
    def config_dict_32b(self) -> dict[str, Any]:
        """The 32B-class architecture as a config.json-like dict (no transformers import)."""

    def config_32b(self, **text_overrides: Any):
        """The transformers config of the 32B-class model; `text_overrides` change text-config keys
        (e.g. `num_hidden_layers=2` for a cut-down model of the same width)."""
        import transformers

        spec = self.config_dict_32b()
        config_class = getattr(transformers, self.config_class_name)
        text = {k: v for k, v in spec["text_config"].items() if k != "model_type"}
        vision = {k: v for k, v in spec["vision_config"].items() if k != "model_type"}
        top = {
            k: v
            for k, v in spec.items()
            if k not in ("text_config", "vision_config", "model_type", "architectures")
        }
        return config_class(text_config={**text, **text_overrides}, vision_config=vision, **top)

    # -- the tiny model ------------------------------------------------------------------------------

    @abstractmethod
    def tiny_config(self, tokenizer=None, vocab_size: int | None = None):
        """A transformers config with every feature of the 32B-class model at toy sizes."""

    @staticmethod
    def special_token_ids(tokenizer) -> dict[str, int]:
        """The image/video token ids a Qwen-VL config names, from the tokenizer (none without one)."""
        if tokenizer is None:
            return {}
        return {
            "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
            "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
            "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
            "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        }
