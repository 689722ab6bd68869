"""The LM pass of a training step: each unique token through the LM once (prefix sharing).

The nodes of one MAG share the question prompt. The ``fused`` core (``train.encode_step``) runs every
unique (prompt, chain) as its own row, so a MAG with k unique chains sends its prompt through the LM k
times. The ``packed`` core here packs one row per unique prompt: ``[prompt, chain_1, …, chain_k]`` with a
block attention mask (a chain sees the prompt and, causally, itself; never another chain) and position ids
that restart after the prompt for every chain. Every chain token then sees exactly the keys/values and
positions it sees in its fused row, so the hidden states, losses and gradients are the same (up to float
rounding; with LoRA dropout > 0 the prompt's dropout mask is drawn once per MAG instead of once per chain,
an equally valid sample). A packed batch goes through ordinary layers with a 4D mask, so it also works
under gradient checkpointing (a KV-cache prefix would be dropped by transformers' checkpointing wrapper).

Packs of a step share rows where they fit (first-fit decreasing into rows as wide as the longest pack),
so short MAGs are not padded to the longest one; under ``train.attention: segments`` (``segment_attention``: one
SDPA call per prompt and per chain, no mask) all packs of a step go into one row, so nothing is padded. After the pass, ``packed_hidden`` gathers a row view ``[R, 1 + C, D]``: column 0 is the last prompt
position (it predicts the first chain token), columns 1… the chain. ``labels`` and ``chain_mask`` of
``PackedEncoded`` use the same view, so ``MagdiStudent.forward`` treats both cores alike.

``ntp_from_hidden`` projects onto the vocabulary only the positions that are scored, in chunks that are
recomputed in backward: the ``[N, V]`` logits of a 49k vocabulary never exist all at once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .losses import mean_over_rows

IGNORE_INDEX = -100


@dataclass
class PackedEncoded:
    """A step packed per unique prompt, plus the row view of every unique (prompt, chain)."""

    input_ids: Tensor  # [N, L] rows of packs (a pack = a prompt, then its unique chains); right-padded
    position_ids: Tensor  # [N, L] prompt 0..P-1, each chain P..P+C-1, padding 0
    segments: Tensor  # [N, L] a step-wide id per prompt and per chain, -1 = padding
    owners: Tensor  # [N, L] the segment id of the position's prompt (a prompt owns itself), -1 = padding
    gather: Tensor  # [R, 1 + C] flat index (row * L + t) into the packed hidden states of each row-view cell
    labels: Tensor  # [R, 1 + C] chain token ids, -100 in column 0 and on padding
    chain_mask: Tensor  # [R, 1 + C] 1 on the chain's own tokens (pooling)
    node_rows: list[list[int]]
    n_tokens: int  # real tokens of the unique (prompt, chain) sequences (same count as the fused core)
    lm_tokens: int  # real tokens actually through the LM (each prompt once)

    def to(self, device) -> PackedEncoded:
        return replace(self, **{k: getattr(self, k).to(device) for k in
                                ("input_ids", "position_ids", "segments", "owners", "gather", "labels", "chain_mask")})


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of pack indices, longest first, each pack into the first row with room (first-fit decreasing):
    rows are as wide as the longest pack, and shorter packs share rows instead of being padded."""
    rows: list[list[int]] = []
    room: list[int] = []
    for g in sorted(range(len(lengths)), key=lambda g: (-lengths[g], g)):
        for r, free in enumerate(room):
            if lengths[g] <= free:
                rows[r].append(g)
                room[r] -= lengths[g]
                break
        else:
            rows.append([g])
            room.append(capacity - lengths[g])
    return rows


def prompt_ids(tokenizer, prompt: str, max_prompt: int | None = None) -> list[int]:
    """A node's prompt as the student reads it; a long prompt keeps its END (the question sits last)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ids if max_prompt is None else ids[-max_prompt:]


def target_ids(tokenizer, chain: str, max_target: int | None = None) -> list[int]:
    """A chain as a training target: its tokens then EOS (the student learns to stop), cut at ``max_target``."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = tokenizer(chain, add_special_tokens=False)["input_ids"] + eos
    return ids if max_target is None else ids[:max_target]


def encode_packed(items: Sequence, tokenizer, max_prompt: int, max_target: int, one_row: bool = False) -> PackedEncoded:
    """Tokenise each unique prompt and each unique (prompt, chain) once, with ``encode_step``'s truncation.

    ``one_row``: every pack of the step in one row, so no position is padding. Worth it only where attention
    costs what the segments see, not the row's width squared (``train.attention: segments``); a dense mask
    keeps rows as wide as the longest pack.
    """
    packs: dict[str, int] = {}
    prompts: list[list[int]] = []
    chains: list[list[list[int]]] = []  # per pack, its unique chains
    rows: dict[tuple[str, str], int] = {}
    row_at: list[tuple[int, int]] = []  # row-view row -> (pack, chain index in pack)
    node_rows: list[list[int]] = []
    for it in items:
        if it.prompt not in packs:
            p_ids = prompt_ids(tokenizer, it.prompt, max_prompt)
            if not p_ids:
                raise ValueError("packed core: an empty prompt has no position to predict the first chain token")
            packs[it.prompt] = len(prompts)
            prompts.append(p_ids)
            chains.append([])
        g = packs[it.prompt]
        idx = []
        for t in it.targets:
            key = (it.prompt, t)
            if key not in rows:
                rows[key] = len(row_at)
                row_at.append((g, len(chains[g])))
                chains[g].append(target_ids(tokenizer, t, max_target))
            idx.append(rows[key])
        node_rows.append(idx)
    lengths = [len(p) + sum(len(c) for c in cs) for p, cs in zip(prompts, chains, strict=True)]
    width = sum(lengths) if one_row else max(lengths)
    bins = _first_fit(lengths, width)
    n_bins, n_rows = len(bins), len(row_at)
    cmax = max(len(c) for cs in chains for c in cs)
    ids = torch.full((n_bins, width), tokenizer.pad_token_id, dtype=torch.long)
    pos = torch.zeros((n_bins, width), dtype=torch.long)
    seg = torch.full((n_bins, width), -1, dtype=torch.long)
    own = torch.full((n_bins, width), -1, dtype=torch.long)
    gather = torch.zeros((n_rows, 1 + cmax), dtype=torch.long)
    lab = torch.full((n_rows, 1 + cmax), IGNORE_INDEX, dtype=torch.long)
    start: dict[tuple[int, int], int] = {}  # (pack, chain) -> flat index of its first token
    last_prompt: dict[int, int] = {}  # pack -> flat index of its last prompt token
    next_seg = 0
    for b, members in enumerate(bins):
        s = 0
        for g in members:
            p = prompts[g]
            ids[b, s : s + len(p)] = torch.tensor(p)
            pos[b, s : s + len(p)] = torch.arange(len(p))
            seg[b, s : s + len(p)] = own[b, s : s + len(p)] = base = next_seg
            last_prompt[g] = b * width + s + len(p) - 1
            s, next_seg = s + len(p), next_seg + 1
            for i, c in enumerate(chains[g]):
                ids[b, s : s + len(c)] = torch.tensor(c)
                pos[b, s : s + len(c)] = torch.arange(len(p), len(p) + len(c))
                seg[b, s : s + len(c)] = next_seg
                own[b, s : s + len(c)] = base
                start[(g, i)] = b * width + s
                s, next_seg = s + len(c), next_seg + 1
    for r, (g, i) in enumerate(row_at):
        c = chains[g][i]
        gather[r, :] = last_prompt[g]  # column 0; padding cells keep any valid index (masked out)
        gather[r, 1 : 1 + len(c)] = start[(g, i)] + torch.arange(len(c))
        lab[r, 1 : 1 + len(c)] = torch.tensor(c)
    n_tokens = sum(len(prompts[g]) + len(chains[g][i]) for g, i in row_at)
    return PackedEncoded(ids, pos, seg, own, gather, lab, (lab != IGNORE_INDEX).long(), node_rows, n_tokens,
                         int((seg >= 0).sum()))


def flex_block_mask(segments: Tensor, owners: Tensor):
    """``block_mask``'s rule as a FlexAttention ``BlockMask`` (``train.attention: flex``).

    The dense mask makes SDPA compute all L x L scores of a packed row (rows are thousands of tokens wide
    at 16 MAGs per step) and forgo causal skipping; the block mask lets the kernel skip every 128 x 128
    block where no query may see a key (a chain never sees another chain, nothing sees the future). Same
    rule, element for element, as the dense mask below (tested against it).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        q_seg, k_seg = segments[b, q], segments[b, kv]
        same = (k_seg == q_seg) | (k_seg == owners[b, q])
        return ((q >= kv) & (q_seg >= 0) & (k_seg >= 0) & same) | (q == kv)

    n, length = segments.shape
    return create_block_mask(mask_mod, B=n, H=None, Q_LEN=length, KV_LEN=length, device=segments.device)


def block_mask(segments: Tensor, owners: Tensor, attn_implementation: str, dtype: torch.dtype):
    """``[N, 1, L, L]`` mask: causal, and a position sees only its own segment and its prompt.

    So a prompt sees itself, a chain its prompt and itself, never another chain or another MAG's pack. A
    padding position sees only itself (no fully masked query row, hence no NaN), and no real position sees a
    padding one. Bool (True = attend) for SDPA, additive float for eager attention, a block-sparse
    ``BlockMask`` for FlexAttention.
    """
    if attn_implementation == "flex_attention":
        return flex_block_mask(segments, owners)
    n = segments.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=segments.device).tril()
    q_seg, q_own, k_seg = segments[:, :, None], owners[:, :, None], segments[:, None, :]
    allowed = causal & (q_seg >= 0) & (k_seg >= 0) & ((k_seg == q_seg) | (k_seg == q_own))
    allowed |= torch.eye(n, dtype=torch.bool, device=segments.device)
    allowed = allowed[:, None]
    if attn_implementation == "sdpa":
        return allowed
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    raise ValueError(f"train.core=packed supports sdpa/eager/flex_attention, not '{attn_implementation}' "
                     "(use fused)")


#: ``train.attention: segments``: the transformers attention implementation registered by
#: :func:`register_segment_attention` (one SDPA call per segment, :func:`segment_attention`)
SEGMENTS_ATTN = "magdi_segments"

#: one run of a packed row: ``(start, end, prefix_start, prefix_end)``. A prompt's prefix is empty (it attends
#: causally to itself), a chain's prefix is its prompt, padding has prefix ``(-1, -1)``
Run = tuple[int, int, int, int]


def segment_runs(segments: Tensor, owners: Tensor) -> list[list[Run]]:
    """Each packed row cut into its runs of one segment, with the prompt each chain attends to.

    The layout :func:`block_mask` describes as an ``L x L`` mask, as the few index ranges it is made of; a pack
    never straddles rows (``encode_packed``), so a chain's prompt is found in its own row.
    """
    out: list[list[Run]] = []
    for seg_row, own_row in zip(segments.tolist(), owners.tolist(), strict=True):
        runs: list[Run] = []
        prompt_at: dict[int, tuple[int, int]] = {}
        start = 0
        for t in range(1, len(seg_row) + 1):
            if t < len(seg_row) and seg_row[t] == seg_row[start]:
                continue
            seg, own = seg_row[start], own_row[start]
            if seg < 0:
                runs.append((start, t, -1, -1))
            elif seg == own:
                prompt_at[seg] = (start, t)
                runs.append((start, t, start, start))
            else:
                runs.append((start, t, *prompt_at[own]))
            start = t
        out.append(runs)
    return out


def segment_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, packed_runs: list[list[Run]] | None = None,
                      **kwargs) -> tuple[Tensor, None]:
    """:func:`block_mask`'s attention computed segment by segment (transformers attention interface).

    A dense mask makes SDPA score all ``L x L`` query-key pairs of a packed row although a chain sees only its
    prompt and itself: with k chains of length c after a prompt of length P, ``(P + kc)^2`` pairs instead of
    ``P^2/2 + k(cP + c^2/2)``. Here each prompt attends causally to itself and each chain to ``[its prompt;
    itself]`` (causal within the chain), one SDPA call each; padding positions get zeros (nothing reads them).
    Same scores and softmax as the masked kernel, so the same output up to float rounding (tested). Without
    ``packed_runs`` (any pass but the packed core's) it is transformers' SDPA attention, mask and all.
    ``query`` ``[B, H, L, d]``, ``key``/``value`` ``[B, H_kv, L, d]``; returns ``[B, L, H, d]`` as transformers'
    ``sdpa_attention_forward`` does.
    """
    if packed_runs is None:  # any other pass (fused rows, a plain lm(...) call, generation): transformers' SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("softcap") is not None:  # as transformers' SDPA: the kernel has no logit soft-capping
        raise ValueError(f"attention '{SEGMENTS_ATTN}' does not support softcap (use train.attention: sdpa or flex "
                         "with eager attention)")
    window = kwargs.get("sliding_window")
    # the longest distance a query looks back: a prompt over itself, a chain over its prompt and itself
    if window is not None and max((e - s) + (pe - ps) for runs in packed_runs for s, e, ps, pe in runs if ps >= 0) > window:
        raise ValueError(f"attention '{SEGMENTS_ATTN}': a prompt + chain spans more than the model's sliding window "
                         f"({window}); use train.attention: sdpa")
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, runs in enumerate(packed_runs):
        q, k, v = query[b : b + 1], key[b : b + 1], value[b : b + 1]
        parts = []
        for s, e, ps, pe in runs:
            if ps < 0:
                parts.append(q.new_zeros(1, q.shape[1], e - s, value.shape[-1]))
                continue
            if ps == pe:  # a prompt: causal over itself
                parts.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
                                                            dropout_p=dropout, scale=scaling, enable_gqa=gqa))
                continue
            allowed = _chain_mask(e - s, pe - ps, q.device)
            kk = torch.cat([k[:, :, ps:pe], k[:, :, s:e]], dim=2)
            vv = torch.cat([v[:, :, ps:pe], v[:, :, s:e]], dim=2)
            parts.append(F.scaled_dot_product_attention(q[:, :, s:e], kk, vv, attn_mask=allowed, dropout_p=dropout,
                                                        scale=scaling, enable_gqa=gqa))
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=4096)
def _chain_mask(c: int, p: int, device: torch.device) -> Tensor:
    """``[c, p + c]``: a chain's c queries see all p prompt keys and, causally, the chain's own. Built once per
    shape (every layer of every step asks for the same few), never written to."""
    allowed = torch.ones(c, p + c, dtype=torch.bool, device=device)
    allowed[:, p:] = torch.ones(c, c, dtype=torch.bool, device=device).tril()
    return allowed


def register_segment_attention() -> None:
    """Make ``SEGMENTS_ATTN`` a transformers attention implementation (idempotent), with SDPA's mask function: a
    packed pass hands no mask (:func:`packed_hidden`), any other pass gets SDPA's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SEGMENTS_ATTN, segment_attention)
    AttentionMaskInterface.register(SEGMENTS_ATTN, sdpa_mask)


def packed_hidden(decoder, enc: PackedEncoded) -> Tensor:
    """One pass over the packs; returns the row view ``[R, 1 + C, D]`` of the last hidden layer."""
    impl = getattr(decoder.config, "_attn_implementation", None) or "eager"
    if impl == SEGMENTS_ATTN:  # the segment runs, computed once, stand in for the mask in every layer
        mask, extra = None, {"packed_runs": segment_runs(enc.segments, enc.owners)}
    else:
        dtype = decoder.get_input_embeddings().weight.dtype
        if torch.is_autocast_enabled(enc.input_ids.device.type):
            dtype = torch.get_autocast_dtype(enc.input_ids.device.type)
        mask, extra = block_mask(enc.segments, enc.owners, impl, dtype), {}
    # use_cache=False: a training pass has no later step to reuse keys/values (without checkpointing the decoder
    # would otherwise fill a KV cache every step, and torch.compile recompiles the layers on its state)
    hidden = decoder(input_ids=enc.input_ids, attention_mask=mask, position_ids=enc.position_ids, use_cache=False,
                     **extra).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[enc.gather]


def lm_hidden(decoder, enc) -> Tensor:
    """Last hidden layer per unique (prompt, chain) row for either core (fused rows or packed row view)."""
    if isinstance(enc, PackedEncoded):
        return packed_hidden(decoder, enc)
    return decoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False).last_hidden_state


def _chunk_nll(lm_head, h: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(lm_head(h).float(), y, reduction="none")


def row_nll(lm_head, hidden: Tensor, labels: Tensor, chunk: int = 0) -> tuple[Tensor, Tensor]:
    """Per row: the summed next-token NLL of its target tokens, and how many there are (``[R]`` each).

    Position t of a row predicts ``labels[:, t + 1]``; only positions whose next label is not -100 are
    projected onto the vocabulary. With ``chunk`` > 0 the projection + cross-entropy runs ``chunk``
    positions at a time under activation checkpointing, so at most ``[chunk, V]`` logits are alive in
    forward or backward. ``−sum`` is the chain's log-probability under the model (the DPO term's input).
    """
    shift = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    sel = shift != IGNORE_INDEX
    h, y = hidden[sel], shift[sel]
    row = sel.nonzero()[:, 0]
    if chunk and h.shape[0] > chunk:
        parts = [checkpoint(_chunk_nll, lm_head, h[i : i + chunk], y[i : i + chunk], use_reentrant=False)
                 for i in range(0, h.shape[0], chunk)]
        nll = torch.cat(parts)
    else:
        nll = _chunk_nll(lm_head, h, y)
    count = sel.sum(dim=1)
    return torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, row, nll), count


def ntp_from_hidden(lm_head, hidden: Tensor, labels: Tensor, chunk: int = 0, reduction: str = "chain") -> Tensor:
    """L_ntp (``losses.ntp_loss`` with every row positive) from hidden states, projecting only scored positions
    (:func:`row_nll`). Same value as ``ntp_loss(lm_head(hidden), labels, ones)``: token mean per row, then mean
    over rows that have a target.
    """
    sums, count = row_nll(lm_head, hidden, labels, chunk)
    return mean_over_rows(sums, count, reduction) + hidden.sum() * 0
