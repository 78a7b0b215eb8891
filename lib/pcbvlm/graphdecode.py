"""Greedy decoding with a static KV cache whose whole decoding step is one CUDA graph, optionally verifying
drafted tokens (n-gram lookup) in the same static cache.

Why not transformers' `generate`: with a static cache it compiles only the model's forward; the logits
processors, the stopping checks (one device sync per token) and the cache bookkeeping still run in Python
every step, and its assisted (prompt-lookup) decoding refuses static caches. Batched decoding with a
padding mask also pays for transformers' attention: with a mask, its SDPA path copies every layer's
keys and values 8x (grouped-query heads, `repeat_kv`) at every step, ~4 GB per layer at 128 images.

Here the prompt goes through the model's own forward (vision tower, deepstack, 3-D rope positions) into
a transformers `StaticCache`; then one step = embed -> the model's own decoder layers -> norm -> lm_head
-> the processors `generate` would apply (suppressed tokens, no end of turn before `min_new_tokens`) ->
argmax and the chosen token's probability, all on the GPU, captured once as a CUDA graph and replayed per
token. The attention of the step groups the query heads per key/value head instead of repeating the
cache (the same sums). Between replays only the new token ids and positions are copied in; the host
reads the tokens back every `check_every` steps to stop once every sequence has ended.

Drafts (batch 1, `draft_tokens` k): a step takes the last token and k drafted tokens (the continuation of
the most recent earlier occurrence of the last 1-3 tokens in the prompt's text and the answer so far) and
keeps the drafts up to the first one greedy decoding would not have chosen, plus the model's own next
token: the same tokens as plain greedy decoding. Rejected drafts' cache entries lie beyond the kept
length: they are masked and overwritten by the next step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUPED_ATTENTION = "pcbvlm_grouped_sdpa"


def grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA for grouped-query attention with a mask, without repeating the keys and values: the G query
    heads of one key/value head become G x T query rows of that head (head h uses key/value head h // G,
    as transformers' `repeat_kv`). Returns (batch, T, heads, head_dim) like transformers' SDPA."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    q = query.reshape(batch, kv_heads, groups * length, dim)
    mask = attention_mask
    if mask is not None and groups > 1:
        mask = mask.unsqueeze(2).expand(batch, mask.shape[1], groups, length, mask.shape[-1])
        mask = mask.reshape(batch, -1, groups * length, mask.shape[-1])
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(GROUPED_ATTENTION, grouped_sdpa)


class _CacheSlots:
    """The decoder layers' view of the static cache during a step: `update` writes this step's keys and
    values at `positions` (a device tensor, so a captured graph writes where the replay says)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], positions: torch.Tensor):
        self.keys, self.values, self.positions = keys, values, positions

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.positions, key_states)
        self.values[layer_idx].index_copy_(2, self.positions, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # (batch, new tokens), pad after a sequence's end, on the CPU
    probabilities: torch.Tensor  # (batch, new tokens) of the chosen tokens, on the CPU
    steps: int  # decoding steps (forward passes after the prompt's)
    prompt_length: int


class NgramDrafter:
    """Drafts the continuation of the most recent earlier occurrence of the last 3, 2 or 1 tokens."""

    def __init__(self, tokens: Sequence[int], barred: set[int], max_n: int = 3):
        self.max_n, self.barred = max_n, barred
        self.tokens: list[int] = []
        self.seen: dict[tuple[int, ...], int] = {}  # n-gram -> end index of its latest occurrence
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            # index the n-grams that end just before this token: their continuation starts here
            end = len(self.tokens)
            for n in range(1, self.max_n + 1):
                if end >= n:
                    self.seen[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(int(token))

    def draft(self, k: int) -> list[int]:
        for n in range(self.max_n, 0, -1):
            if len(self.tokens) < n:
                continue
            start = self.seen.get(tuple(self.tokens[-n:]))
            if start is not None:
                draft = [t for t in self.tokens[start : start + k] if t not in self.barred]
                if draft:
                    return draft
        return []


class GraphDecoder:
    """Greedy decoding of a Qwen3-VL model (see the module docstring). One instance per model; it keeps
    the static cache and the captured graphs of the last (batch, length) it decoded and reuses them."""

    def __init__(
        self,
        model,
        suppress_ids: Sequence[int],
        eos_ids: Sequence[int],
        pad_id: int,
        use_graphs: bool | None = None,
        check_every: int = 16,
        compile_step: bool = False,
    ) -> None:
        _register_attention()
        self.model = model
        self.lm = model.model.language_model
        self.device = next(model.parameters()).device
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.suppress_ids, self.eos_ids, self.pad_id = list(suppress_ids), list(eos_ids), int(pad_id)
        self.check_every = check_every
        # torch.compile of the step (before capture): fuses the norms, rope, residual adds and SiLU x up
        # of the 64 layers into fewer kernels; at batch 1 on the H200 the 32B's small kernels took 7.3 ms
        # a token beside the int4 matmuls' 10 ms, 2.4 ms compiled (BENCHMARKS.md).
        self.compile_step = compile_step
        self._compiled_step = None
        if compile_step:
            from pcbvlm.layer_compile import check_compilable

            check_compilable(self.device.type, "eval.compile_decoder")
        self._state: dict | None = None

    # -- the step -------------------------------------------------------------------------------------
    def _step(self, s: dict) -> None:
        """One decoding step on the static tensors of `s` (captured as a graph on CUDA)."""
        ids, positions = s["ids"], s["positions"]
        lm, config = self.lm, self.lm.config
        hidden = lm.embed_tokens(ids)
        rope = (positions[None, :] + s["rope_deltas"]).unsqueeze(0).expand(3, -1, -1)
        position_embeddings = lm.rotary_emb(hidden, rope)
        keys = torch.arange(s["length"], device=ids.device)
        allowed = (keys[None, :] <= positions[:, None])[None, None] & s["key_valid"][:, None, None, :]
        mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=ids.device)
        mask = mask.masked_fill(~allowed, torch.finfo(hidden.dtype).min)
        slots = _CacheSlots(s["keys"], s["values"], positions)
        previous = config._attn_implementation_internal
        config._attn_implementation_internal = GROUPED_ATTENTION
        try:
            for layer in lm.layers:
                hidden = layer(
                    hidden,
                    position_embeddings=position_embeddings,
                    attention_mask=mask,
                    past_key_values=slots,
                )
        finally:
            config._attn_implementation_internal = previous
        logits = self.model.lm_head(lm.norm(hidden)).float()
        logits = self._process(logits, positions, s)
        s["next"].copy_(logits.argmax(-1))
        s["prob"].copy_(torch.softmax(logits, -1).amax(-1))

    def _run_step(self, s: dict) -> None:
        if not self.compile_step:
            self._step(s)
            return
        if self._compiled_step is None:
            self._compiled_step = torch.compile(self._step, dynamic=False)
        self._compiled_step(s)

    def _process(self, logits, positions, s):
        """What `generate`'s processors do: suppressed tokens never, end of turn not before
        `min_new_tokens` (the token predicted at position p is new token p + 1 - prompt length)."""
        logits = logits.index_fill(-1, s["suppress"], float("-inf"))
        too_early = (positions + 1 - s["prompt_length"]) < s["min_new_tokens"]
        ban = too_early[None, :, None] & s["eos_mask"][None, None, :]
        return logits.masked_fill(ban, float("-inf"))

    def _capture(self, s: dict) -> torch.cuda.CUDAGraph | None:
        if not self.use_graphs:
            return None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: kernels chosen, compiled read-backs compiled, same cache writes
                self._run_step(s)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._run_step(s)
        return graph

    # -- generation -----------------------------------------------------------------------------------
    def _prepare(self, batch: int, length: int, width: int, dtype) -> dict:
        """Static tensors for `batch` sequences of `length` cache slots and `width` tokens a step."""
        key = (batch, length, width)
        if self._state is not None and self._state["key"] == key:
            return self._state
        self._state = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        from transformers import StaticCache

        device = self.device
        vocab = self.model.lm_head.out_features
        eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        eos_mask[self.eos_ids] = True
        s = {
            "key": key,
            "length": length,
            "cache": StaticCache(config=self.model.config, max_cache_len=length),
            "ids": torch.zeros(batch, width, dtype=torch.long, device=device),
            "positions": torch.zeros(width, dtype=torch.long, device=device),
            "rope_deltas": torch.zeros(batch, 1, dtype=torch.long, device=device),
            "key_valid": torch.ones(batch, length, dtype=torch.bool, device=device),
            "prompt_length": torch.zeros((), dtype=torch.long, device=device),
            "min_new_tokens": torch.zeros((), dtype=torch.long, device=device),
            "suppress": torch.tensor(self.suppress_ids, dtype=torch.long, device=device),
            "eos_mask": eos_mask,
            "next": torch.zeros(batch, width, dtype=torch.long, device=device),
            "prob": torch.zeros(batch, width, dtype=torch.float32, device=device),
            "graph": None,
        }
        self._state = s
        return s

    def _prefill(self, s: dict, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt through the model's own forward into the static cache; the first new token."""
        cache = s["cache"]
        for layer in cache.layers:
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.zero_()
        self.model.model.rope_deltas = None
        out = self.model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prompt_length = inputs["input_ids"].shape[1]
        s["keys"] = [layer.keys for layer in cache.layers]
        s["values"] = [layer.values for layer in cache.layers]
        # `generate` positions a new token by the count of real (unpadded) tokens before it plus the
        # prompt's rope delta: with left padding, the cache position minus the row's padding.
        padding = (inputs["attention_mask"] == 0).sum(-1, keepdim=True)
        s["rope_deltas"].copy_(self.model.model.rope_deltas.reshape(-1, 1) - padding)
        s["key_valid"].fill_(True)
        s["key_valid"][:, :prompt_length].copy_(inputs["attention_mask"].bool())
        s["prompt_length"].fill_(prompt_length)
        last = torch.full((1,), prompt_length - 1, dtype=torch.long, device=self.device)
        logits = self._process(out.logits[:, -1:, :].float(), last, s)[:, 0]
        return logits.argmax(-1), torch.softmax(logits, -1).amax(-1)

    @torch.inference_mode()
    def generate(
        self, inputs: dict, max_new_tokens: int, min_new_tokens: int = 0, draft_tokens: int = 0
    ) -> DecodeResult:
        """Greedy decoding of a processor's batch (left-padded); `draft_tokens` > 0 needs batch 1."""
        ids = inputs["input_ids"]
        batch, prompt_length = ids.shape
        if draft_tokens and batch != 1:
            raise ValueError("draft verification decodes one sequence at a time")
        width = draft_tokens + 1
        length = prompt_length + max_new_tokens + width
        length = -(-length // 64) * 64  # fewer distinct shapes: one graph serves nearby lengths
        dtype = self.model.lm_head.weight.dtype
        s = self._prepare(batch, length, width, dtype)
        s["min_new_tokens"].fill_(min_new_tokens)
        token, prob = self._prefill(s, inputs)
        if draft_tokens:
            return self._generate_drafted(s, ids[0].tolist(), token, prob, max_new_tokens, draft_tokens)
        return self._generate_plain(s, token, prob, prompt_length, max_new_tokens)

    def _replay(self, s: dict) -> None:
        if self.use_graphs:
            if s["graph"] is None:
                s["graph"] = self._capture(s)
                if s["graph"] is None:
                    self._run_step(s)
                    return
            s["graph"].replay()
        else:
            self._run_step(s)

    def _generate_plain(self, s, token, prob, prompt_length, max_new_tokens) -> DecodeResult:
        batch = token.shape[0]
        tokens = torch.full((batch, max_new_tokens), self.pad_id, dtype=torch.long, device=self.device)
        probs = torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=self.device)
        eos = torch.tensor(self.eos_ids, device=self.device)
        unfinished = torch.ones(batch, dtype=torch.bool, device=self.device)
        tokens[:, 0], probs[:, 0] = token, prob
        unfinished &= ~torch.isin(token, eos)
        steps = 0
        for i in range(1, max_new_tokens):
            if i % self.check_every == 0 and not bool(unfinished.any()):
                break
            # the input: the last token (pad once a sequence has ended, as `generate` feeds it)
            s["ids"][:, 0].copy_(tokens[:, i - 1])
            s["positions"].fill_(prompt_length + i - 1)
            self._replay(s)
            steps += 1
            nxt = torch.where(unfinished, s["next"][:, 0], self.pad_id)
            tokens[:, i], probs[:, i] = nxt, s["prob"][:, 0]
            unfinished &= ~torch.isin(nxt, eos)
        return DecodeResult(tokens.cpu(), probs.cpu(), steps, prompt_length)

    def _generate_drafted(self, s, prompt_ids, token, prob, max_new_tokens, k) -> DecodeResult:
        barred = set(self.suppress_ids)
        drafter = NgramDrafter([t for t in prompt_ids if t not in barred], barred)
        prompt_length = len(prompt_ids)
        out_tokens, out_probs = [int(token.item())], [float(prob.item())]
        drafter.extend(out_tokens)
        eos = set(self.eos_ids)
        steps = 0
        while len(out_tokens) < max_new_tokens and out_tokens[-1] not in eos:
            draft = drafter.draft(k)[:k]
            draft += [out_tokens[-1]] * (k - len(draft))  # filler rows: computed, never kept unchecked
            position = prompt_length + len(out_tokens) - 1
            s["ids"][0].copy_(torch.tensor([out_tokens[-1], *draft], device=self.device))
            s["positions"].copy_(torch.arange(position, position + k + 1, device=self.device))
            self._replay(s)
            steps += 1
            chosen = s["next"][0].tolist()
            chosen_probs = s["prob"][0].tolist()
            kept = 1  # the model's token after the last input is always kept
            while kept <= k and draft[kept - 1] == chosen[kept - 1]:
                kept += 1
            new = chosen[:kept][: max_new_tokens - len(out_tokens)]
            if any(t in eos for t in new):
                new = new[: next(i for i, t in enumerate(new) if t in eos) + 1]
            out_tokens += new
            out_probs += chosen_probs[: len(new)]
            drafter.extend(new)
        tokens = torch.tensor([out_tokens + [self.pad_id] * (max_new_tokens - len(out_tokens))])
        probs = torch.tensor([out_probs + [0.0] * (max_new_tokens - len(out_probs))])
        return DecodeResult(tokens, probs, steps, prompt_length)


def drafted_passes(prompt_ids: Sequence[int], answer_ids: Sequence[int], k: int, barred: set[int]) -> int:
    """Decoding steps `GraphDecoder` takes with `k` drafts when greedy decoding's answer is `answer_ids`
    (the first token comes from the prompt's pass): each step keeps the drafts that match plus one."""
    drafter = NgramDrafter([t for t in prompt_ids if t not in barred], barred)
    done, steps = 1, 0
    drafter.extend(answer_ids[:1])
    while done < len(answer_ids):
        draft = drafter.draft(k)[:k]
        kept = 1
        while (
            kept <= len(draft)
            and done + kept - 1 < len(answer_ids)
            and draft[kept - 1] == answer_ids[done + kept - 1]
        ):
            kept += 1
        new = answer_ids[done : done + kept]
        drafter.extend(new)
        done += len(new)
        steps += 1
    return steps
