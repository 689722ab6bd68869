"""Batched greedy decoding of the student for evaluation: the prompt's work done once, the KV cache written in place.

Where ``model.generate`` (and our earlier loop on transformers' ``DynamicCache``) spends a 200-question evaluation on
the CPU (reports/benchmark_decode.md):

- **prefill of padding**: a left-padded batch prefills every row to the longest prompt (GSM8K: 37.8k positions for
  21.8k prompt tokens), and every row repeats the chat template's system prompt. Here the prompts' common prefix is
  prefilled once, and the rest in chunks of similar length, each written into one cache at its place.
- **the growing cache**: ``DynamicCache`` concatenates each layer's keys and values every step, copying the whole cache
  (half of a decode step at batch 160 by the profiler). :class:`PreallocatedLayer` writes the new position in place.
- **rows that finished**: dropped from the batch and its cache as they end (``shrink_share``), so a step computes only
  live rows.
- **self-consistency**: the k samples of a prompt share its one prefill (its cache rows repeated k times), where
  ``model.generate(num_return_sequences=k)`` prefills the prompt k times.

The arithmetic is the model's own (same weights, masks and position ids as ``model.generate``); what changes is which
rows share a matrix product, so a bf16 product can round differently and flip a near-tie of the greedy argmax, as a
different batch size does. tests/test_decoding.py checks the tokens equal ``model.generate``'s on a float32 model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer with room for ``capacity`` positions allocated once: ``update`` writes the new keys and values
    in place and returns views of the filled part (``DynamicLayer`` returns a fresh concatenation every step)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.n = capacity, 0

    def allocate(self, batch: int, heads: int, k_dim: int, v_dim: int, dtype: torch.dtype, device) -> None:
        self.device = device
        self.kbuf = torch.zeros((batch, heads, self.capacity, k_dim), dtype=dtype, device=device)
        self.vbuf = torch.zeros((batch, heads, self.capacity, v_dim), dtype=dtype, device=device)
        self.n, self.is_initialized = 0, True
        self._views()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, dk = key_states.shape
        self.allocate(b, h, dk, value_states.shape[-1], key_states.dtype, key_states.device)

    def _views(self) -> None:
        self.keys, self.values = self.kbuf[:, :, : self.n], self.vbuf[:, :, : self.n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        m = key_states.shape[-2]
        if self.n + m > self.capacity:
            raise RuntimeError(f"KV cache full: {self.n} + {m} positions > capacity {self.capacity}")
        self.kbuf[:, :, self.n : self.n + m] = key_states
        self.vbuf[:, :, self.n : self.n + m] = value_states
        self.n += m
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.n if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.kbuf, self.vbuf = self.kbuf[indices], self.vbuf[indices]
            self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.kbuf = self.kbuf.repeat_interleave(repeats, dim=0)
            self.vbuf = self.vbuf.repeat_interleave(repeats, dim=0)
            self._views()


def preallocated_cache(n_layers: int, capacity: int) -> Cache:
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(n_layers)])


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every row shares, leaving each row at least one token of its own (the last
    prompt token's logits start the answer)."""
    n = len(os.path.commonprefix([list(r) for r in rows])) if rows else 0
    return max(0, min(n, min(len(r) for r in rows) - 1)) if rows else 0


def length_chunks(lengths: Sequence[int], max_positions: int) -> list[list[int]]:
    """Row indices in chunks of similar length (longest first), each chunk at most ``max_positions`` padded
    positions (rows x its longest row; one row alone may exceed it), so a chunk's prefill pads little."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    chunks: list[list[int]] = []
    for i in order:
        if chunks and (len(chunks[-1]) + 1) * lengths[chunks[-1][0]] <= max_positions:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def _layers(cache: Cache) -> list[PreallocatedLayer]:
    return cache.layers  # type: ignore[return-value]


@torch.no_grad()
def prefill(model, rows: Sequence[Sequence[int]], max_new_tokens: int, chunk_positions: int = 4096
            ) -> tuple[Cache, torch.Tensor, torch.Tensor]:
    """Prefill every prompt into one KV cache laid out as a left-padded batch would be, with room for
    ``max_new_tokens`` more positions: ``[shared prefix | padding | the row's own tokens]``.

    The prefix is computed once (batch 1) and copied to every row; the rest in length-sorted chunks
    (:func:`length_chunks`) whose own small padding sits between prefix and tokens. Positions count real tokens
    only (the prefix 0..P-1, then P...), as ``model.generate`` derives them from the attention mask.

    Returns ``(cache, attention_mask [B, P + R], next-token logits [B, V])``, rows in input order.
    """
    device = model.device
    n_layers = model.config.num_hidden_layers
    p = common_prefix(rows)
    rest = [list(r[p:]) for r in rows]
    width = p + max(len(r) for r in rest)
    cache = preallocated_cache(n_layers, width + max_new_tokens)
    pre = None
    if p:
        pre = preallocated_cache(n_layers, p)
        ids = torch.tensor([list(rows[0][:p])], device=device)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=pre, use_cache=True, logits_to_keep=1)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    mask[:, :p] = 1
    logits: torch.Tensor | None = None
    for chunk in length_chunks([len(r) for r in rest], chunk_positions):
        r_c = len(rest[chunk[0]])
        ids = torch.zeros((len(chunk), r_c), dtype=torch.long, device=device)
        cmask = torch.zeros((len(chunk), p + r_c), dtype=torch.long, device=device)
        cmask[:, :p] = 1
        for j, i in enumerate(chunk):
            ids[j, r_c - len(rest[i]):] = torch.tensor(rest[i], device=device)
            cmask[j, p + r_c - len(rest[i]):] = 1
            mask[i, width - len(rest[i]):] = 1
        part = preallocated_cache(n_layers, p + r_c)
        if pre is not None:
            for lay, src in zip(_layers(part), _layers(pre), strict=True):
                lay.allocate(len(chunk), src.kbuf.shape[1], src.kbuf.shape[-1], src.vbuf.shape[-1], src.kbuf.dtype,
                             device)
                lay.kbuf[:, :, :p], lay.vbuf[:, :, :p] = src.kbuf, src.vbuf
                lay.n = p
                lay._views()
        pos = (cmask.cumsum(-1) - 1).clamp(min=0)[:, p:]
        out = model(input_ids=ids, attention_mask=cmask, position_ids=pos, cache=part, use_cache=True,
                    logits_to_keep=1).logits[:, -1]
        if logits is None:
            logits = out.new_zeros((len(rows), out.shape[-1]))
        idx = torch.tensor(chunk, device=device)
        logits[idx] = out
        for lay, src in zip(_layers(cache), _layers(part), strict=True):
            if not lay.is_initialized:
                lay.allocate(len(rows), src.kbuf.shape[1], src.kbuf.shape[-1], src.vbuf.shape[-1], src.kbuf.dtype,
                             device)
            lay.kbuf[idx, :, :p] = src.kbuf[:, :, :p]
            lay.vbuf[idx, :, :p] = src.vbuf[:, :, :p]
            lay.kbuf[idx, :, width - r_c : width] = src.kbuf[:, :, p:]
            lay.vbuf[idx, :, width - r_c : width] = src.vbuf[:, :, p:]
    for lay in _layers(cache):
        lay.n = width
        lay._views()
    assert logits is not None
    return cache, mask, logits


def sample_filter(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """Next-token scores for sampling, as transformers' warpers in their order: temperature, then top-k (keep the k
    highest), then top-p (keep the smallest set whose probability reaches ``top_p``, at least one token)."""
    scores = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, idx = torch.sort(scores, descending=False, dim=-1)
        remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[:, -1] = False
        scores = scores.masked_fill(remove.scatter(1, idx, remove), float("-inf"))
    return scores


@torch.no_grad()
def decode(model, rows: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: set[int], num_samples: int = 1,
           temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
           shrink_share: float = 0.125, chunk_positions: int = 4096) -> list[list[int]]:
    """Answers to tokenised prompts: :func:`prefill` once, then one step per token over the live rows, a finished row
    dropped (with its cache rows) once the finished ones are ``shrink_share`` of the batch. Greedy at temperature 0;
    otherwise seeded sampling (:func:`sample_filter`), ``num_samples`` continuations per prompt that share the
    prompt's one prefill (its cache rows repeated), returned prompt-major (``[p0s0, p0s1, ..., p1s0, ...]``).
    Each continuation holds its new tokens up to and including its first EOS."""
    if num_samples > 1 and temperature <= 0:
        raise ValueError("num_samples > 1 needs temperature > 0 (greedy samples would all be identical)")
    cache, attention_mask, logits = prefill(model, rows, max_new_tokens, chunk_positions)
    if num_samples > 1:
        cache.batch_repeat_interleave(num_samples)
        attention_mask = attention_mask.repeat_interleave(num_samples, dim=0)
        logits = logits.repeat_interleave(num_samples, dim=0)
    device = attention_mask.device
    gen = torch.Generator(device=device).manual_seed(seed)
    n = attention_mask.shape[0]
    live = torch.arange(n, device=device)
    out: list[list[int]] = [[] for _ in range(n)]
    eos = torch.tensor(sorted(eos_ids), device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if temperature <= 0:
            nxt = logits.float().argmax(-1)  # a bf16 argmax over the vocabulary is far slower on the CPU
        else:
            probs = sample_filter(logits, temperature, top_p, top_k).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        for row, tok, fin in zip(live.tolist(), nxt.tolist(), done.tolist(), strict=True):
            if not fin:
                out[row].append(tok)
        done |= torch.isin(nxt, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if int(done.sum()) >= max(1, int(shrink_share * len(live))):
            keep = (~done).nonzero().flatten()
            cache.batch_select_indices(keep)
            live, nxt, attention_mask, done = live[keep], nxt[keep], attention_mask[keep], done[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        pos = attention_mask.sum(-1, keepdim=True) - 1
        logits = model(input_ids=nxt[:, None], attention_mask=attention_mask, position_ids=pos, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
    return out


def greedy_decode(model, rows: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: set[int],
                  shrink_share: float = 0.125, chunk_positions: int = 4096) -> list[list[int]]:
    """Greedy answers (:func:`decode` at temperature 0)."""
    return decode(model, rows, max_new_tokens, eos_ids, shrink_share=shrink_share, chunk_positions=chunk_positions)
