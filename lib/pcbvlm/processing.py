"""Loading a model family's processor for images, with or without torchvision.

transformers' Qwen-VL processors insist on a video processor, whose class only exists with torchvision
installed. This project never feeds videos, and its CPU environment has no torchvision (PyPI's build does
not load beside the CPU torch wheel), so the processor is assembled from its parts: the tokenizer (with
the model's chat template), the image processor (the PIL backend where torchvision is missing) and no
video processor. The token layout it produces is the stock processor's. The processor class is the
model family's (pcbvlm.families: `processor_class`), found from the folder's config.json.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import AutoTokenizer
from transformers.utils import is_torchvision_available

if TYPE_CHECKING:
    from pcbvlm.families import ModelFamily


@functools.cache
def image_only_processor(processor_class: type) -> type:
    """`processor_class` (a transformers Qwen-VL processor) without a video processor: images and text."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return processor_class.check_argument_for_proper_class(self, argument_name, argument)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError("this processor handles images only (no video processor is loaded)")
        return processor_class.__call__(self, images=images, text=text, **kwargs)

    name = f"ImageOnly{processor_class.__name__}"
    cls = type(
        name,
        (processor_class,),
        {
            "__doc__": f"{processor_class.__name__} without a video processor: images and text only.",
            "__module__": __name__,
            "check_argument_for_proper_class": check_argument_for_proper_class,
            "__call__": __call__,
        },
    )
    globals()[name] = cls  # found by name here, as pickle looks classes up
    return cls


def load_processor(
    name_or_path: str | Path,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    revision: str | None = None,
    family: ModelFamily | None = None,
):
    """The processor of a model folder or hub id, with the image size range from the config.

    `max_pixels` bounds the visual tokens per image: tokens = pixels / patch^2 / (2*2). `family`: the
    model family (default: the one of `name_or_path`, pcbvlm.families.family_for).
    """
    if family is None:
        from pcbvlm.families import family_for

        family = family_for(name_or_path, revision)
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
    processor = family.processor_class()(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    # Left padding for batched generation is set by the caller; training pads on the right itself.
    return processor
