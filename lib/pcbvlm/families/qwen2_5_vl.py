"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`).

Grounding answers are absolute pixels of the image *as the processor resized it*: `smart_resize` rounds
each side to a multiple of 28 (14 px patches, 2x2 merge) and scales the image into the configured
`data.min_pixels`..`data.max_pixels`. A 640x480 board with max_pixels 65536 is seen as 280x224, and a
defect at x = 320 px is answered as x = 140; mapping it back needs the same resize, so both directions
compute it from the image size and the configured range (the processor is built from the same numbers).
"""

from __future__ import annotations

import re
from typing import Any

from pcbvlm.answer import Frame
from pcbvlm.families.base import ModelFamily

# Qwen/Qwen2.5-VL-32B-Instruct config.json, in the transformers 5 spelling (rope_parameters).
QWEN2_5_VL_32B_TEXT: dict[str, Any] = {
    "vocab_size": 152064,
    "hidden_size": 5120,
    "intermediate_size": 27648,
    "num_hidden_layers": 64,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
QWEN2_5_VL_32B_VISION: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3456,
    "num_heads": 16,
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 5120,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "hidden_act": "silu",
}
QWEN2_5_VL_32B_TOP: dict[str, Any] = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
}


class Qwen2_5_VL(ModelFamily):  # noqa: N801 - named like transformers' Qwen2_5_VL classes
    model_type = "qwen2_5_vl"
    name_pattern = re.compile(r"qwen2[._]?5[-_.]?vl", re.IGNORECASE)
    model_class_name = "Qwen2_5_VLForConditionalGeneration"
    config_class_name = "Qwen2_5_VLConfig"
    processor_class_name = "Qwen2_5_VLProcessor"
    decoder_layer_class = "Qwen2_5_VLDecoderLayer"
    patch_size = 14
    merger_linears = r"model\.visual\.merger\.mlp\.[02]"
    liger_patch = "apply_liger_kernel_to_qwen2_5_vl"
    liger_module = "qwen2_5_vl"
    liger_fused_loss = False  # liger-kernel 0.8.5's Qwen2.5-VL forward has no logits_to_keep
    hub_id_32b = "Qwen/Qwen2.5-VL-32B-Instruct"
    name_32b = re.compile(r"(^|/)qwen2\.5-vl-32b-instruct$", re.IGNORECASE)

    def answer_frame(self, width: int, height: int, min_pixels: int, max_pixels: int) -> Frame:
        # transformers' own resize (the PIL image processor's copy imports without torchvision).
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        resized_height, resized_width = smart_resize(
            height,
            width,
            factor=self.patch_size * self.merge_size,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )
        return resized_width, resized_height

    def config_dict_32b(self) -> dict[str, Any]:
        return {
            "model_type": "qwen2_5_vl",
            "architectures": [self.model_class_name],
            **QWEN2_5_VL_32B_TOP,
            "text_config": {"model_type": "qwen2_5_vl_text", **QWEN2_5_VL_32B_TEXT},
            "vision_config": {"model_type": "qwen2_5_vl", **QWEN2_5_VL_32B_VISION},
        }

    def tiny_config(self, tokenizer=None, vocab_size: int | None = None):
        """Every feature of the 32B (mrope, windowed and full-attention vision blocks, merger) at toy sizes."""
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(
            text_config={
                "vocab_size": vocab_size or len(tokenizer),
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-6,
                # head_dim = 64 / 4 = 16; mrope sections add up to head_dim / 2 (the 32B's [16, 24, 24])
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1_000_000.0,
                    "mrope_section": [2, 3, 3],
                },
                "tie_word_embeddings": False,
                "bos_token_id": None,  # the tiny vocabulary has no id 151643 (Qwen's default)
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
                "window_size": 112,
                "fullatt_block_indexes": [1],
            },
            tie_word_embeddings=False,
            **self.special_token_ids(tokenizer),
        )


FAMILY = Qwen2_5_VL()
