"""The graph decoder (pcbvlm.graphdecode) gives transformers' greedy answer: the same tokens and token
probabilities as `generate` on the tiny model (left-padded batches, forced and free lengths), the same
answer with drafted tokens in fewer steps, and its grouped attention equals transformers' repeated one."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3VLForConditionalGeneration

from pcbvlm.generate import LoadedModel, generate_batch
from pcbvlm.graphdecode import GraphDecoder, NgramDrafter, drafted_passes, grouped_sdpa
from pcbvlm.samples import build_messages, load_samples


@pytest.fixture(scope="module")
def loaded(tiny_train_cfg, tiny_processor):
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        tiny_train_cfg.model.name_or_path, dtype=torch.float32
    ).eval()
    tiny_processor.tokenizer.padding_side = "left"
    return LoadedModel(model, tiny_processor, "base", "tiny")


def _messages(cfg, data_dir, count):
    samples = (load_samples(data_dir, "val") + load_samples(data_dir, "test"))[:count]
    messages = [build_messages(s, cfg.data, with_answer=False) for s in samples]
    # Prompts of different lengths, so that the batch is left-padded.
    for i, chat in enumerate(messages[1:], start=1):
        text = next(c for c in chat[-1]["content"] if c.get("type") == "text")
        text["text"] += " Answer carefully." * i
    return messages


@pytest.mark.parametrize("min_new_tokens, compile_step", [(32, False), (0, False), (0, True)])
def test_graph_decoder_gives_generates_answers(
    loaded, tiny_train_cfg, tiny_data_dir, min_new_tokens, compile_step
):
    messages = _messages(tiny_train_cfg, tiny_data_dir, 3)
    expected = generate_batch(loaded, messages, 32, min_new_tokens=min_new_tokens, decoder="generate")
    if compile_step and shutil.which("g++") is None:
        pytest.skip("torch.compile on the CPU needs g++ (the CPU image has none; stage 1 of CI runs this)")
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    # eval.compile_decoder on a copy: the module's fixture keeps its plain decoder for the other tests
    compiled = dataclasses.replace(loaded, compile_decoder=compile_step, graph_decoder=None)
    got = generate_batch(compiled, messages, 32, min_new_tokens=min_new_tokens, decoder="graph")
    # eval.compile_decoder: the step ran through torch.compile (dynamo traced it), and only then
    assert (counters["stats"]["unique_graphs"] > graphs) == compile_step
    lengths = {len(offsets) for _, offsets, _ in expected}
    assert len(lengths) > 1 or min_new_tokens  # free lengths: some answers end early, others do not
    for (text, offsets, probs), (want_text, want_offsets, want_probs) in zip(got, expected, strict=True):
        assert text == want_text and offsets == want_offsets
        torch.testing.assert_close(probs, want_probs, rtol=1e-5, atol=1e-6)
    assert isinstance(compiled.graph_decoder, GraphDecoder)
    assert compiled.graph_decoder.compile_step == compile_step


def test_drafted_tokens_give_the_plain_answer_in_fewer_steps(loaded, tiny_train_cfg, tiny_data_dir):
    if loaded.graph_decoder is None:  # made the way evaluation makes it (image tokens suppressed)
        generate_batch(loaded, _messages(tiny_train_cfg, tiny_data_dir, 1), 1, decoder="graph")
    decoder = loaded.graph_decoder
    saved = []
    for chat in _messages(tiny_train_cfg, tiny_data_dir, 3):
        plain = generate_batch(loaded, [chat], 40, min_new_tokens=40, decoder="generate")[0]
        for drafts in (3, 8):
            steps = []
            original = decoder._replay
            decoder._replay = lambda s, original=original, steps=steps: (steps.append(1), original(s))
            try:
                drafted = generate_batch(
                    loaded, [chat], 40, min_new_tokens=40, decoder="graph", draft_tokens=drafts
                )[0]
            finally:
                decoder._replay = original
            assert drafted[0] == plain[0] and drafted[1] == plain[1]
            torch.testing.assert_close(drafted[2], plain[2], rtol=1e-5, atol=1e-6)
            saved.append(39 - len(steps))  # plain decoding: 39 steps after the prompt's pass
    assert max(saved) > 0  # drafts were accepted: the checks compared two different decodings


def test_grouped_attention_equals_repeated_keys_and_values():
    torch.manual_seed(0)
    batch, heads, kv_heads, length, keys, dim = 2, 8, 2, 3, 11, 16
    q = torch.randn(batch, heads, length, dim)
    k, v = torch.randn(batch, kv_heads, keys, dim), torch.randn(batch, kv_heads, keys, dim)
    allowed = torch.rand(batch, 1, length, keys) > 0.3
    allowed[..., 0] = True
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    repeat = heads // kv_heads
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1), attn_mask=mask, scale=0.3
    ).transpose(1, 2)
    got, _ = grouped_sdpa(None, q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_ngram_drafter_prefers_the_longest_latest_match_and_skips_barred_tokens():
    drafter = NgramDrafter([5, 1, 2, 7, 7, 6, 1, 2, 8, 9], barred={99})
    drafter.extend([5, 1, 2])
    assert drafter.draft(2) == [7, 7]  # "5 1 2" (3 tokens) beats the later "1 2" -> 8
    drafter.extend([4, 1, 2])
    assert drafter.draft(3) == [4, 1, 2]  # "4 1 2" unseen; "1 2" last continued with 4 (just now)
    assert NgramDrafter([3, 99, 4, 3], barred={99}).draft(4) == [4, 3]  # never an image token
    assert NgramDrafter([1, 2], barred=set()).draft(2) == []  # "2" never seen before


def test_drafted_passes_count_the_steps():
    answer = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]
    assert drafted_passes([], answer, 0, set()) == len(answer) - 1
    assert drafted_passes([], answer, 4, set()) < len(answer) - 1
    # 11 tokens after the first: drafts of 4, 4 (all the list then holds after the match) and the last one
    assert drafted_passes([1, 2, 3, 4], answer, 8, set()) == 3


def test_compiled_step_without_a_cpp_compiler_is_a_clear_error(loaded, monkeypatch):
    """eval.compile_decoder on a CPU without g++ (the CPU image): one line naming the key, not inductor's
    traceback at the first token."""
    from pcbvlm.errors import UserError

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="eval.compile_decoder"):
        GraphDecoder(loaded.model, [], [0], 0, compile_step=True)
    GraphDecoder(loaded.model, [], [0], 0)  # the plain step needs no compiler
