"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): the project's default family.

Grounding answers are relative: 0-1000 across the image's width and height, whatever its size or the
processor's resize. Vision: 16 px patches, 2x2 merge, deepstack mergers.
"""

from __future__ import annotations

import re
from typing import Any

from pcbvlm.answer import RELATIVE_FRAME, Frame
from pcbvlm.families.base import ModelFamily

# Qwen/Qwen3-VL-32B-Instruct config.json, in the transformers 5 spelling (rope_parameters).
QWEN3_VL_32B_TEXT: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 5120,
    "intermediate_size": 25600,
    "num_hidden_layers": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
QWEN3_VL_32B_VISION: dict[str, Any] = {
    "depth": 27,
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_heads": 16,
    "in_channels": 3,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 5120,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [8, 16, 24],
    "hidden_act": "gelu_pytorch_tanh",
}
QWEN3_VL_32B_TOP: dict[str, Any] = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
}


class Qwen3VL(ModelFamily):
    model_type = "qwen3_vl"
    name_pattern = re.compile(r"qwen3[-_.]?vl", re.IGNORECASE)
    model_class_name = "Qwen3VLForConditionalGeneration"
    config_class_name = "Qwen3VLConfig"
    processor_class_name = "Qwen3VLProcessor"
    decoder_layer_class = "Qwen3VLTextDecoderLayer"
    patch_size = 16
    merger_linears = r"model\.visual\.merger\.linear_fc[12]"
    liger_patch = "apply_liger_kernel_to_qwen3_vl"
    liger_module = "qwen3_vl"
    hub_id_32b = "Qwen/Qwen3-VL-32B-Instruct"
    name_32b = re.compile(r"(^|/)qwen3-vl-32b-(instruct|thinking)$", re.IGNORECASE)

    def answer_frame(self, width: int, height: int, min_pixels: int, max_pixels: int) -> Frame:
        return RELATIVE_FRAME  # 0-1000 of the image, independent of its size and of the resize

    def config_dict_32b(self) -> dict[str, Any]:
        return {
            "model_type": "qwen3_vl",
            "architectures": [self.model_class_name],
            **QWEN3_VL_32B_TOP,
            "text_config": {"model_type": "qwen3_vl_text", **QWEN3_VL_32B_TEXT},
            "vision_config": {"model_type": "qwen3_vl_vision", **QWEN3_VL_32B_VISION},
        }

    def tiny_config(self, tokenizer=None, vocab_size: int | None = None):
        """Every feature of the 32B (mrope interleaved, deepstack, merger) at toy sizes."""
        from transformers import Qwen3VLConfig

        head_dim = 16
        return Qwen3VLConfig(
            text_config={
                "vocab_size": vocab_size or len(tokenizer),
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": head_dim,
                "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-6,
                # mrope sections must add up to head_dim / 2 (t, h, w interleaved, as in the 32B's [24, 20, 20])
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 5_000_000.0,
                    "mrope_section": [4, 2, 2],
                    "mrope_interleaved": True,
                },
                "tie_word_embeddings": False,
                "pad_token_id": tokenizer.pad_token_id if tokenizer is not None else None,
                "eos_token_id": tokenizer.eos_token_id if tokenizer is not None else None,
            },
            vision_config={
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "in_channels": 3,
                "patch_size": self.patch_size,
                "spatial_merge_size": self.merge_size,
                "temporal_patch_size": 2,
                "out_hidden_size": 64,
                "num_position_embeddings": 256,
                "deepstack_visual_indexes": [1],
            },
            tie_word_embeddings=False,
            **self.special_token_ids(tokenizer),
        )


FAMILY = Qwen3VL()
