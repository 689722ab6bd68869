"""The student with its heads (``MagdiStudent``): one LM pass per unique chain, then L_ntp, L_contrastive and
L_graph from it; switches on the base model (gradient checkpointing, compiled layers)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from ..config import TrainCfg
from ..core import SEGMENTS_ATTN, lm_hidden, ntp_from_hidden, register_segment_attention, row_nll
from ..losses import (
    ScoreHead,
    dpo_loss,
    graph_node_loss,
    margin_ranking_loss,
    mean_over_rows,
    ntp_loss,
    pair_indices,
    position_weighted_mean,
    total_loss,
)
from .items import Encoded, MethodSpec, TrainItem


def base_model(lm: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or ``lm`` itself): switches like checkpointing, the
    attention implementation and the decoder layers live there, not on the ``PeftModel``."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def enable_gradient_checkpointing(lm: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (a 7B student on one GPU needs it; the
    official run uses it). Non-reentrant checkpointing composes with LoRA and frozen base weights without
    ``enable_input_require_grads``; loss and gradients are unchanged."""
    base = base_model(lm)
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False


def compile_decoder_layers(lm: nn.Module) -> None:
    """``torch.compile`` each decoder layer (``train.compile``), not the whole model: the layers share one
    graph (32 identical blocks compile once; the LoRA adapters on their projections are compiled with them),
    the packed core's indexing, the heads and the losses stay eager, and ``dynamic=True`` keeps one graph while
    packed rows change width from step to step."""
    base = base_model(lm)
    for layer in base.get_decoder().layers:
        layer.compile(dynamic=True)


# ----------------------------------------------------------------------------- the model


def _row_keys(enc: Encoded, items: Sequence[TrainItem]) -> list[tuple[str, str]]:
    """The (prompt, chain) text behind each encoded row: the key of the frozen-representation cache."""
    keys: list[tuple[str, str] | None] = [None] * enc.chain_mask.shape[0]  # row view (fused or packed)
    for it, rows in zip(items, enc.node_rows, strict=True):
        for t, r in zip(it.targets, rows, strict=True):
            keys[r] = (it.prompt, t)
    return keys  # type: ignore[return-value]


class MagdiStudent(nn.Module):
    """LM (+LoRA) with the score head and structure encoder used only during training."""

    def __init__(self, lm: nn.Module, spec: MethodSpec, cfg: TrainCfg):
        super().__init__()
        self.lm, self.spec, self.cfg = lm, spec, cfg
        dim = lm.config.hidden_size
        self.score_head = ScoreHead(dim, dim) if spec.contrastive else None
        self.encoder = None
        if spec.graph:  # imported here: torch_geometric costs ~2 s of start-up that non-graph methods skip
            from ..encoders import build_encoder

            self.encoder = build_encoder(cfg.encoder, dim, cfg.hidden_dim, dropout=cfg.gcn_dropout)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(lm)
        if cfg.attention == "flex":  # magdi.core.block_mask then hands the decoder a block-sparse BlockMask
            base_model(lm).set_attn_implementation("flex_attention")
        elif cfg.attention == "segments":  # magdi.core.segment_attention: one SDPA call per segment
            register_segment_attention()
            base_model(lm).set_attn_implementation(SEGMENTS_ATTN)
        if cfg.compile:
            compile_decoder_layers(lm)
        #: node_repr=frozen: (prompt, chain) -> (pooled base-model rep, its chain token states or None)
        self.frozen_cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor | None]] = {}
        #: DPO reference: (prompt, chain) -> (summed NLL, target tokens) under the base model (adapter off)
        self.ref_cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def _backbone(self):
        base = base_model(self.lm)
        return base.get_decoder(), base.get_output_embeddings()

    def forward(self, enc: Encoded, items: Sequence[TrainItem], step_seed: int) -> dict[str, torch.Tensor]:
        decoder, lm_head = self._backbone()
        hidden = lm_hidden(decoder, enc)  # fused rows or the packed core's row view (magdi.core)
        labels_flat = [lab for it in items for lab in it.labels]
        rows_flat = [r for rows in enc.node_rows for r in rows]
        # L_ntp: logits only for rows that are positive chains (the vocab projection is the costly part)
        pos_rows = sorted({r for r, y in zip(rows_flat, labels_flat, strict=True) if y == 1})
        if self.spec.dpo:  # one projection of the positive and paired rows serves L_ntp and L_DPO
            l_ntp, l_dpo = self._ntp_and_dpo(hidden, lm_head, enc, items, pos_rows, step_seed)
        elif pos_rows and self.cfg.core == "packed":  # only scored positions, in vocab chunks
            l_ntp = ntp_from_hidden(lm_head, hidden[pos_rows], enc.labels[pos_rows], self.cfg.ntp_chunk,
                                    self.cfg.ntp_reduction)
        elif pos_rows:
            logits = lm_head(hidden[pos_rows])
            l_ntp = ntp_loss(logits, enc.labels[pos_rows], torch.ones(len(pos_rows), dtype=torch.bool),
                             self.cfg.ntp_reduction)
        else:
            l_ntp = hidden.sum() * 0
        out = {"ntp": l_ntp}
        if self.spec.dpo:
            out["dpo"] = l_dpo
        if self.spec.contrastive or self.spec.graph:
            reps_live = position_weighted_mean(hidden, enc.chain_mask)
        if self.spec.contrastive:  # the score head always ranks the live student's chains
            out["contrastive"] = self._contrastive(reps_live, enc, items, step_seed)
        if self.spec.graph:
            out["graph"] = self._graph(*self._graph_inputs(hidden, reps_live, enc, items), enc, items)
        w = self.cfg.weights
        out["loss"] = total_loss(out["ntp"], out.get("contrastive", l_ntp * 0), out.get("graph", l_ntp * 0),
                                 w.ntp, w.contrastive if self.spec.contrastive else 0.0,
                                 w.graph if self.spec.graph else 0.0,
                                 out.get("dpo"), w.dpo if self.spec.dpo else 0.0)
        return out

    def _pairs(self, enc, items, step_seed: int) -> tuple[list[int], list[int]]:
        """The step's (correct, incorrect) chain pairs as rows of ``enc``: ``pair_indices`` inside each MAG, drawn
        with the step's seed (the pairs L_contrastive ranks and L_DPO prefers)."""
        gen = torch.Generator().manual_seed(step_seed)
        pos, neg = [], []
        for it, rows in zip(items, enc.node_rows, strict=True):
            p, n = pair_indices(it.labels, gen)
            pos += [rows[i] for i in p.tolist()]
            neg += [rows[i] for i in n.tolist()]
        return pos, neg

    def _ntp_and_dpo(self, hidden, lm_head, enc, items, pos_rows: list[int], step_seed: int):
        """L_ntp over the positive rows and L_DPO over the step's pairs, from one vocabulary projection of the rows
        either needs. The reference log-probabilities come from :meth:`_reference`."""
        pp, nn_ = self._pairs(enc, items, step_seed)
        rows = sorted(set(pos_rows) | set(pp) | set(nn_))
        if not rows:
            zero = hidden.sum() * 0
            return zero, zero
        sums, count = row_nll(lm_head, hidden[rows], enc.labels[rows], self._chunk)
        at = {r: i for i, r in enumerate(rows)}
        pos_i = [at[r] for r in pos_rows]
        l_ntp = ((mean_over_rows(sums[pos_i], count[pos_i], self.cfg.ntp_reduction) if pos_i else sums.sum() * 0)
                 + hidden.sum() * 0)
        ref_sums, ref_count = self._reference(enc, items, rows)
        logp, ref = -sums, -ref_sums.to(sums.dtype)
        if self.cfg.dpo.length_normalized:
            logp, ref = logp / count.clamp(min=1).to(logp.dtype), ref / ref_count.clamp(min=1).to(ref.dtype)
        i_pos, i_neg = [at[r] for r in pp], [at[r] for r in nn_]
        return l_ntp, dpo_loss(logp[i_pos], logp[i_neg], ref[i_pos], ref[i_neg], self.cfg.dpo.beta)

    @property
    def _chunk(self) -> int:
        """Positions per vocabulary-projection chunk (``train.ntp_chunk``; the packed core only)."""
        return self.cfg.ntp_chunk if self.cfg.core == "packed" else 0

    def _adapter_off(self):
        """The base model: the student with its LoRA adapter disabled (no second model in memory)."""
        return self.lm.disable_adapter() if hasattr(self.lm, "disable_adapter") else contextlib.nullcontext()

    @torch.no_grad()
    def _reference(self, enc, items, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed NLL, target tokens) of ``rows`` under the reference policy, the base model with the adapter
        off. The base weights never change, so a chain's value is computed once, the first step it appears in
        (one no-grad pass of that step with the adapter disabled), and cached by (prompt, chain): each epoch
        after the first, and a resumed run's later steps, pay nothing more. Caching per chain rather than a
        second pass every step: the same cost in a one-epoch run, less in longer ones, and no second model."""
        keys = _row_keys(enc, items)
        todo = [r for r in rows if keys[r] not in self.ref_cache]
        if todo:
            with self._adapter_off():
                decoder, lm_head = self._backbone()
                h = self._rows_hidden(decoder, enc, todo)
                sums, count = row_nll(lm_head, h, enc.labels[todo], self._chunk)
            for j, r in enumerate(todo):
                self.ref_cache[keys[r]] = (sums[j].detach().float(), count[j].detach())
        return (torch.stack([self.ref_cache[keys[r]][0] for r in rows]),
                torch.stack([self.ref_cache[keys[r]][1] for r in rows]))

    @staticmethod
    def _rows_hidden(decoder, enc, todo: list[int]) -> torch.Tensor:
        """Last hidden states of rows ``todo``: fused rows are independent, so only they run; a pack holds several
        rows' prompt, so the whole step goes through and the rows are kept."""
        if isinstance(enc, Encoded):
            t = torch.tensor(todo, device=enc.input_ids.device)
            return lm_hidden(decoder, Encoded(enc.input_ids[t], enc.attention_mask[t], enc.labels[t],
                                              enc.chain_mask[t], [], 0))
        return lm_hidden(decoder, enc)[todo]

    def _graph_inputs(self, hidden, reps_live, enc: Encoded, items) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The structure encoder's inputs (node reps, token states, token mask), one row per sequence.

        ``live``: this pass's hidden states, so L_graph trains the adapter too. ``frozen`` (the official
        code): the base model without the adapter, computed once per unique (prompt, chain) and cached, so
        L_graph trains only the encoder; L_ntp and L_contrastive are unaffected either way.
        """
        if self.cfg.node_repr == "live":
            return reps_live, hidden, enc.chain_mask
        keys = _row_keys(enc, items)
        self._fill_frozen_cache(enc, keys)
        reps = torch.stack([self.frozen_cache[k][0] for k in keys])
        if self.encoder is None or not self.encoder.takes_tokens:
            return reps, hidden, enc.chain_mask
        toks = [self.frozen_cache[k][1] for k in keys]  # only the chain's own tokens, left-aligned
        width = max(1, max(t.shape[0] for t in toks))
        states = reps.new_zeros((len(toks), width, reps.shape[-1]))
        mask = torch.zeros((len(toks), width), dtype=enc.chain_mask.dtype, device=reps.device)
        for i, t in enumerate(toks):
            states[i, : t.shape[0]] = t.to(states.device)
            mask[i, : t.shape[0]] = 1
        return reps, states, mask

    @torch.no_grad()
    def _fill_frozen_cache(self, enc: Encoded, keys: list[tuple[str, str]]) -> None:
        """Run the base model (adapter off) on the rows not seen before; keep their pooled reps (and chain
        token states for the token encoder). Position-weighted pooling is padding-invariant, so a row's
        cached value does not depend on the batch it was first seen in."""
        todo = [r for r, k in enumerate(keys) if k not in self.frozen_cache]
        if not todo:
            return
        with self._adapter_off():
            decoder, _ = self._backbone()
            h = self._rows_hidden(decoder, enc, todo)
        mask = enc.chain_mask[todo]
        pooled = position_weighted_mean(h, mask)
        keep_tokens = self.encoder is not None and self.encoder.takes_tokens
        for j, r in enumerate(todo):
            # token states are large (tokens x hidden per chain): they wait in host memory
            toks = h[j][mask[j].bool()].detach().cpu() if keep_tokens else None
            self.frozen_cache[keys[r]] = (pooled[j].detach(), toks)

    def _contrastive(self, reps, enc, items, step_seed) -> torch.Tensor:
        pos, neg = self._pairs(enc, items, step_seed)
        if not pos:
            return reps.sum() * 0
        scores = self.score_head(reps)
        return margin_ranking_loss(scores[pos], scores[neg], self.cfg.margin)

    def _graph(self, reps, hidden, token_mask, enc, items) -> torch.Tensor:
        from torch_geometric.data import Batch, Data

        datas, rows_all = [], []
        for it, rows in zip(items, enc.node_rows, strict=True):
            e = torch.tensor(it.edge_index, dtype=torch.long).t() if it.edge_index else torch.zeros(2, 0, dtype=torch.long)
            datas.append(Data(edge_index=e.reshape(2, -1), y=torch.tensor(it.labels), num_nodes=len(rows)))
            rows_all += rows
        batch = Batch.from_data_list(datas).to(reps.device)  # labels/edges are built on the CPU
        if self.encoder.takes_tokens:
            logits = self.encoder(hidden[rows_all], token_mask[rows_all], batch.batch)
        else:
            logits = self.encoder(reps[rows_all], batch.edge_index, batch.batch)
        return graph_node_loss(logits, batch.y)

__all__ = ["MagdiStudent", "_row_keys", "base_model", "compile_decoder_layers", "enable_gradient_checkpointing"]
