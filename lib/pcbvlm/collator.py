"""Batches for training: chat template, images, padding, and labels on the answer only.

Each sample is split into its prompt (the user turn, rendered by the processor's chat template with the
generation prompt `<|im_start|>assistant\\n`) and its answer (the assistant text plus `<|im_end|>`). The
prompt goes through the processor (which expands the image placeholders into visual tokens and returns
`mm_token_type_ids`); the answer is tokenized alone and appended. So the labels are exactly the answer's
tokens and its end token, by construction, and every other position is -100.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from pcbvlm.errors import DataError

IGNORE_INDEX = -100
END_OF_TURN = "<|im_end|>"  # the Qwen chat template's (pcbvlm.families.base.QWEN_END_OF_TURN)


def split_messages(messages: list[dict]) -> tuple[list[dict], str]:
    """(prompt turns, answer text) of a training conversation that ends with the assistant's answer."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training sample must end with an assistant turn")
    answer = messages[-1]["content"]
    if not isinstance(answer, str):
        answer = "".join(item.get("text", "") for item in answer if item.get("type") == "text")
    return messages[:-1], answer


def image_paths(messages: list[dict]) -> list[str]:
    return [
        item["image"]
        for message in messages
        if isinstance(message["content"], list)
        for item in message["content"]
        if item.get("type") == "image"
    ]


def load_image(path: str) -> Image.Image:
    # DeepPCB images are grayscale or RGB JPEGs; the vision tower takes 3 channels.
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as err:  # missing, truncated or not an image: name the file (training would just stop)
        raise DataError(f"{path}: cannot read the image ({err})") from None


def sample_messages(sample: dict[str, Any]) -> list[dict]:
    messages = sample["messages"]
    return json.loads(messages) if isinstance(messages, str) else messages


@dataclass
class TrainCollator:
    processor: Any
    end_of_answer: str = END_OF_TURN  # the model family's end-of-answer token (ModelFamily.end_of_answer)

    def __post_init__(self) -> None:
        self.tokenizer = self.processor.tokenizer
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has no pad token")

    def encode(self, sample: dict[str, Any]) -> dict[str, Any]:
        """One sample -> unpadded tensors: input_ids, labels, mm_token_type_ids, pixel_values, image_grid_thw."""
        prompt_turns, answer = split_messages(sample_messages(sample))
        prompt_text = self.processor.apply_chat_template(
            prompt_turns, tokenize=False, add_generation_prompt=True
        )
        images = [load_image(p) for p in image_paths(prompt_turns)]
        enc = self.processor(text=[prompt_text], images=images or None, return_tensors="pt")
        prompt_ids = enc["input_ids"][0]
        answer_ids = torch.tensor(
            self.tokenizer(answer + self.end_of_answer, add_special_tokens=False)["input_ids"],
            dtype=prompt_ids.dtype,
        )
        input_ids = torch.cat([prompt_ids, answer_ids])
        labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer_ids])
        mm_types = torch.cat([enc["mm_token_type_ids"][0], torch.zeros_like(answer_ids)])
        out = {"input_ids": input_ids, "labels": labels, "mm_token_type_ids": mm_types}
        if images:
            out["pixel_values"] = enc["pixel_values"]
            out["image_grid_thw"] = enc["image_grid_thw"]
        return out

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(s) for s in samples]
        length = max(len(e["input_ids"]) for e in encoded)
        batch = {
            "input_ids": torch.full((len(encoded), length), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(encoded), length), dtype=torch.long),
            "labels": torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long),
            "mm_token_type_ids": torch.zeros((len(encoded), length), dtype=torch.long),
        }
        # Right padding: positions (mrope) are computed from the attention mask, loss ignores pads.
        for row, e in enumerate(encoded):
            n = len(e["input_ids"])
            batch["input_ids"][row, :n] = e["input_ids"]
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, :n] = e["labels"]
            batch["mm_token_type_ids"][row, :n] = e["mm_token_type_ids"]
        with_images = [e for e in encoded if "pixel_values" in e]
        if with_images:
            batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images])
            batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_images])
        return batch


def keep_answer_logits(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same batch, asking the model for logits only from the position before the first answer token on.

    The loss needs logits only where a label follows; the prompt (image and instructions, ~80% of a
    DeepPCB sample's tokens) needs none. `logits_to_keep=k` makes the model apply `lm_head` to the last k
    positions only, and the labels are cut to the same positions, so the loss (including its shift by one
    and the normalisation by the number of answer tokens) is exactly the full one, while the logits, the
    largest single buffer of a training step (tokens x 151936 x 4 bytes), shrink to a fraction.
    """
    labels = batch["labels"]
    learned = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    if learned.numel() == 0:
        return batch
    first = int(learned[0])
    keep = labels.shape[1] - max(first - 1, 0)
    return {**batch, "labels": labels[:, -keep:], "logits_to_keep": keep}
