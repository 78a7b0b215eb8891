"""Loading Qwen3-VL's processor for images, with or without torchvision.

transformers' `Qwen3VLProcessor` insists on a video processor, whose class only exists with torchvision
installed. This project never feeds videos, and its CPU environment has no torchvision (PyPI's build does
not load beside the CPU torch wheel), so the processor is assembled from its parts: the tokenizer (with
the model's chat template), the image processor (the PIL backend where torchvision is missing) and no
video processor. The token layout it produces is the stock processor's.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, Qwen3VLProcessor
from transformers.utils import is_torchvision_available


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without a video processor: images and text only."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError("this processor handles images only (no video processor is loaded)")
        return super().__call__(images=images, text=text, **kwargs)


def load_processor(
    name_or_path: str | Path,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    revision: str | None = None,
) -> ImageOnlyQwen3VLProcessor:
    """The processor of a Qwen3-VL folder or hub id, with the image size range from the config.

    `max_pixels` bounds the visual tokens per image: tokens = pixels / (16*16) / (2*2).
    """
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    if is_torchvision_available():
        from transformers import AutoImageProcessor as image_processor_class
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil as image_processor_class,
        )
    image_processor = image_processor_class.from_pretrained(name_or_path, revision=revision)
    size = dict(getattr(image_processor, "size", None) or {})
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
        image_processor.min_pixels = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
        image_processor.max_pixels = max_pixels
    if size:
        image_processor.size = size
    processor = ImageOnlyQwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    # Left padding for batched generation is set by the caller; training pads on the right itself.
    return processor
