"""Collator masking in detail (the mutation target for pcbvlm.collator): the model learns exactly the
answer and its end token, pads are ignored and on the right, and images reach the model in order."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from pcbvlm.collator import (
    IGNORE_INDEX,
    TrainCollator,
    image_paths,
    keep_answer_logits,
    load_image,
    sample_messages,
    split_messages,
)
from pcbvlm.deeppcb import load_samples


def _chat(answer) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image", "image": "a.jpg"}, {"type": "text", "text": "find"}]},
        {"role": "assistant", "content": answer},
    ]


def test_split_messages_returns_prompt_turns_and_answer_text():
    prompt, answer = split_messages(_chat([{"type": "text", "text": "[1"}, {"type": "text", "text": "]"}]))
    assert answer == "[1]" and prompt == _chat("")[:1]
    # Plain-string content, and content items that are not text are skipped.
    assert split_messages(_chat("[]"))[1] == "[]"
    assert split_messages(_chat([{"type": "image", "image": "x"}, {"type": "text", "text": "ok"}]))[1] == "ok"
    assert split_messages(_chat([{"type": "text"}]))[1] == ""
    for bad in ([], _chat("[]")[:1]):
        with pytest.raises(ValueError, match="^a training sample must end with an assistant turn$"):
            split_messages(bad)
    # More than one prompt turn: all but the last are the prompt, the last is the answer.
    system = {"role": "system", "content": "be brief"}
    prompt, answer = split_messages([system, *_chat("[2]")])
    assert prompt == [system, _chat("")[0]] and answer == "[2]"


def test_image_paths_in_order_from_list_contents_only():
    messages = [
        {"role": "system", "content": "plain text"},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "template.jpg"},
                {"type": "text", "text": "x"},
                {"type": "image", "image": "test.jpg"},
            ],
        },
    ]
    assert image_paths(messages) == ["template.jpg", "test.jpg"]
    assert image_paths([{"role": "user", "content": [{"text": "no type"}]}]) == []


def test_load_image_gives_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (5, 3), 7).save(path)
    image = load_image(str(path))
    assert image.mode == "RGB" and image.size == (5, 3) and image.getpixel((0, 0)) == (7, 7, 7)


def test_sample_messages_accepts_json_text():
    chat = _chat("[]")
    assert sample_messages({"messages": json.dumps(chat)}) == chat
    assert sample_messages({"messages": chat}) is chat


def test_a_tokenizer_without_pad_token_is_refused():
    processor = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=None))
    with pytest.raises(ValueError, match="^the tokenizer has no pad token$"):
        TrainCollator(processor)


def test_encoding_masks_everything_but_the_answer(tiny_processor, tiny_data_dir):
    sample = load_samples(tiny_data_dir, "train")[0]
    collator = TrainCollator(tiny_processor)
    tok = tiny_processor.tokenizer
    encoded = collator.encode(sample)
    answer = sample["messages"][-1]["content"][0]["text"]
    learned = [int(i) for i in encoded["labels"] if i != IGNORE_INDEX]
    assert tok.decode(learned) == answer + "<|im_end|>"
    n = len(learned)
    assert encoded["labels"][:-n].eq(IGNORE_INDEX).all()
    assert encoded["input_ids"][-n:].tolist() == learned
    assert encoded["mm_token_type_ids"][-n:].eq(0).all()
    assert encoded["input_ids"].dtype == encoded["labels"].dtype == torch.long
    # The learned tokens start right after the generation prompt "<|im_start|>assistant\n".
    assert tok.decode(encoded["input_ids"][:-n].tolist()).endswith("<|im_start|>assistant\n")
    assert encoded["pixel_values"].shape[0] == int(encoded["image_grid_thw"].prod(-1).sum())


def test_batch_rows_are_right_padded_and_images_keep_their_order(tiny_processor, tiny_data_dir):
    samples = load_samples(tiny_data_dir, "train")[:2]
    collator = TrainCollator(tiny_processor)
    encoded = [collator.encode(s) for s in samples]
    # A second sample without images: its row has no pixels, the first's pixels stay first.
    text_only = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hello"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "[]"}]},
        ]
    }
    batch = collator([samples[0], text_only, samples[1]])
    rows = [encoded[0], collator.encode(text_only), encoded[1]]
    width = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    for row, enc in enumerate(rows):
        n = len(enc["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == enc["input_ids"].tolist()
        assert batch["labels"][row, :n].tolist() == enc["labels"].tolist()
        assert batch["mm_token_type_ids"][row, :n].tolist() == enc["mm_token_type_ids"].tolist()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["input_ids"][row, n:].eq(tiny_processor.tokenizer.pad_token_id).all()
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all()
        assert batch["mm_token_type_ids"][row, n:].eq(0).all()
    for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
        assert batch[key].dtype == torch.long
    assert torch.equal(
        batch["pixel_values"], torch.cat([encoded[0]["pixel_values"], encoded[1]["pixel_values"]])
    )
    assert torch.equal(
        batch["image_grid_thw"], torch.cat([encoded[0]["image_grid_thw"], encoded[1]["image_grid_thw"]])
    )
    assert "pixel_values" not in collator([text_only])


def test_keep_answer_logits_keeps_from_the_position_before_the_first_answer_token():
    labels = torch.tensor([[-100, -100, -100, 5, 6, -100], [-100, -100, -100, -100, 7, 8]])
    batch = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "labels": labels}
    kept = keep_answer_logits(batch)
    # First answer token at column 3: logits from column 2 on predict it, so 4 positions are kept.
    assert kept["logits_to_keep"] == 4
    assert torch.equal(kept["labels"], labels[:, 2:])
    assert kept["input_ids"] is batch["input_ids"]
    from_start = {"labels": torch.tensor([[5, 6, -100]])}
    assert keep_answer_logits(from_start)["logits_to_keep"] == 3
    nothing = {"labels": torch.full((2, 4), IGNORE_INDEX)}
    assert keep_answer_logits(nothing) is nothing
