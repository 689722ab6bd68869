"""One training core for every method of the paper.

A method only decides *which* chains of a MAG are used and *which* losses are on (``method_spec``,
``build_items``). Everything else is shared: each step runs every unique (prompt, chain) through the
LM once, and L_ntp, L_contrastive and L_graph all reuse that one pass (``MagdiStudent.forward``).
Graphs keep their own size (PyG batching); steps are length-grouped; checkpoints hold only
safetensors + JSON (no pickle) and resume bit-exactly on CPU.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TASK_TYPES, TrainCfg
from .core import PackedEncoded, encode_packed, lm_hidden, ntp_from_hidden, prompt_ids, target_ids
from .losses import (
    ScoreHead,
    graph_node_loss,
    margin_ranking_loss,
    ntp_loss,
    pair_indices,
    position_weighted_mean,
    total_loss,
)
from .mag import MAG, edges
from .student import DSS_ANSWER_PREFIX, DSS_RATIONALE_PREFIX, student_prompt, student_target


@dataclass(frozen=True)
class MethodSpec:
    """Which nodes feed the student and which losses are on."""

    nodes: str  # "round0_correct" | "correct" | "all" | "agent_round0_correct" | "dss"
    contrastive: bool = False
    graph: bool = False
    agent: str | None = None


def method_spec(method: str) -> MethodSpec:
    if method.startswith("sit_"):
        return MethodSpec("agent_round0_correct", agent=method[4:])
    specs = {
        "dss_mt": MethodSpec("dss"),
        "magdi_r0": MethodSpec("round0_correct"),
        "magdi_cn": MethodSpec("correct"),
        "magdi_an": MethodSpec("all", contrastive=True),
        "magdi": MethodSpec("all", contrastive=True, graph=True),
    }
    if method not in specs:
        raise ValueError(f"method '{method}' has no training recipe (zero_shot is evaluated untrained)")
    return specs[method]


@dataclass
class TrainItem:
    """One unit of a step: a prompt and the chains trained under it (the nodes of one MAG, or a subset)."""

    prompt: str
    targets: list[str]
    labels: list[int]
    edge_index: list[tuple[int, int]] = field(default_factory=list)
    mag_id: str = ""


def _node_target(n) -> str:
    return student_target(n.reasoning, n.answer if n.answer is not None else "unknown")


def build_items(mags: Sequence[MAG], spec: MethodSpec, tokenizer, graph_kind: str = "d") -> list[TrainItem]:
    """Select each method's training chains from MAGs (DESIGN.md 'Methods' table)."""
    items: list[TrainItem] = []
    for m in mags:
        at = TASK_TYPES[m.task]
        ex = {"question": m.question, "choices": m.choices}
        if spec.nodes == "dss":
            # Distilling step-by-step, multi-task: predict the label, and (separately) generate rationales.
            items.append(TrainItem(student_prompt(tokenizer, ex, at, DSS_ANSWER_PREFIX),
                                   [f"The answer is {m.gold}."], [1], mag_id=m.id))
            rats = list(dict.fromkeys(" ".join(n.reasoning.split()) for n in m.nodes if n.valid and n.reasoning))
            if rats:
                items.append(TrainItem(student_prompt(tokenizer, ex, at, DSS_RATIONALE_PREFIX),
                                       rats, [1] * len(rats), mag_id=m.id))
            continue
        if spec.nodes == "all":
            nodes, e = m.nodes, edges(m, graph_kind)
        else:
            keep = {
                "round0_correct": lambda n: n.round == 0 and n.correct,
                "correct": lambda n: n.correct,
                "agent_round0_correct": lambda n: n.round == 0 and n.correct and n.agent == spec.agent,
            }[spec.nodes]
            nodes, e = [n for n in m.nodes if keep(n)], []
        if not nodes:
            continue
        items.append(TrainItem(student_prompt(tokenizer, ex, at), [_node_target(n) for n in nodes],
                               [n.label for n in nodes], e, m.id))
    return items


# ----------------------------------------------------------------------------- batching


@dataclass
class Encoded:
    """Unique sequences of a step, and for every node of every item the row that holds it."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # -100 outside the chain
    chain_mask: torch.Tensor  # 1 on the chain's own tokens (pooling)
    node_rows: list[list[int]]
    n_tokens: int

    def to(self, device) -> Encoded:
        return Encoded(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                       self.chain_mask.to(device), self.node_rows, self.n_tokens)


def encode_step(items: Sequence[TrainItem], tokenizer, max_prompt: int, max_target: int) -> Encoded:
    """Tokenise each unique (prompt, chain) once; right-pad (pooling is padding-invariant)."""
    rows: dict[tuple[str, str], int] = {}
    seqs: list[tuple[list[int], list[int]]] = []
    node_rows: list[list[int]] = []
    for it in items:
        p_ids = prompt_ids(tokenizer, it.prompt, max_prompt)
        idx = []
        for t in it.targets:
            key = (it.prompt, t)
            if key not in rows:
                t_ids = target_ids(tokenizer, t, max_target)
                rows[key] = len(seqs)
                seqs.append((p_ids, t_ids))
            idx.append(rows[key])
        node_rows.append(idx)
    width = max(len(p) + len(t) for p, t in seqs)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (p, t) in enumerate(seqs):
        n = len(p) + len(t)
        ids[i, :n] = torch.tensor(p + t)
        att[i, :n] = 1
        lab[i, len(p) : n] = torch.tensor(t)
    return Encoded(ids, att, lab, (lab != -100).long(), node_rows, int(att.sum()))


def truncation_stats(items: Sequence[TrainItem], tokenizer, max_prompt: int, max_target: int) -> dict[str, float]:
    """Shares of unique prompts and training targets that the encoders cut (target = chain + EOS, as encoded).

    Counted over every item before training, so a resumed run reports the same numbers as an uninterrupted one.
    """
    prompts = {it.prompt for it in items}
    targets = {t for it in items for t in it.targets}
    return {"prompts_truncated_fraction":
            sum(len(prompt_ids(tokenizer, x)) > max_prompt for x in prompts) / max(1, len(prompts)),
            "targets_truncated_fraction":
            sum(len(target_ids(tokenizer, x)) > max_target for x in targets) / max(1, len(targets))}


def encode_batch(items: Sequence[TrainItem], tokenizer, cfg: TrainCfg) -> Encoded | PackedEncoded:
    """The step's LM input for ``train.core``: one row per (prompt, chain), or one pack per prompt."""
    if cfg.core == "packed":
        return encode_packed(items, tokenizer, cfg.max_prompt_tokens, cfg.max_target_tokens)
    return encode_step(items, tokenizer, cfg.max_prompt_tokens, cfg.max_target_tokens)


def plan_steps(items: Sequence[TrainItem], per_step: int, seed: int, epoch: int,
               bucket_steps: int = 4, n_steps: int | None = None) -> list[list[int]]:
    """Steps of one epoch, reshuffled every epoch, length-grouped inside shuffled buckets.

    Items are shuffled (seeded by seed and epoch) and cut into buckets of ``bucket_steps`` steps; inside a
    bucket they are sorted by size and chunked into steps (less padding), then the order of all steps
    is shuffled. So every epoch sees new batches (as the official HF Trainer's shuffled sampler does)
    while each batch still holds chains of similar length. ``n_steps`` (``train.pairs_per_update``): exactly
    that many steps, their sizes differing by at most one item (:func:`near_equal`), instead of ``per_step``
    items each.
    """
    rng = random.Random(seed * 1000 + epoch)
    size = [sum(len(t) for t in it.targets) + len(it.prompt) for it in items]
    order = list(range(len(items)))
    rng.shuffle(order)
    steps: list[list[int]] = []
    if n_steps is None:
        bucket = per_step * bucket_steps
        for b in range(0, len(order), bucket):
            group = sorted(order[b : b + bucket], key=lambda i: (size[i], i))
            steps += [group[i : i + per_step] for i in range(0, len(group), per_step)]
    else:
        sizes = near_equal(len(order), n_steps)
        start = 0
        for b in range(0, len(sizes), bucket_steps):
            chunk = sizes[b : b + bucket_steps]
            group = sorted(order[start : start + sum(chunk)], key=lambda i: (size[i], i))
            start += sum(chunk)
            at = 0
            for k in chunk:
                steps.append(group[at : at + k])
                at += k
    rng.shuffle(steps)
    return steps


def near_equal(n: int, parts: int) -> list[int]:
    """``n`` split into ``parts`` sizes that differ by at most one (the larger ones first); ``parts`` <= ``n``."""
    q, r = divmod(n, parts)
    return [q + 1] * r + [q] * (parts - r)


def official_pairs(item: TrainItem) -> int:
    """Training examples the official code makes of one MAG: one (positive, negative) pair per chain of
    the larger side, the smaller side repeated (``utils.prepare_contrastive_samples``); no positive means
    the MAG is skipped, no negative means it is paired with an "NA" placeholder (so: #positives)."""
    pos = sum(1 for y in item.labels if y == 1)
    return max(pos, len(item.labels) - pos) if pos else 0


def official_updates(pairs: int, pairs_per_update: int, grad_accum: int) -> int:
    """Updates per epoch of the official run on ``pairs`` (positive, negative) pairs: HF Trainer makes
    ``⌊⌈P / per_device⌉ / grad_accum⌋`` (its dataloader has ⌈P / per_device⌉ batches; an epoch makes one update per
    full accumulation window), with ``per_device = pairs_per_update / grad_accum`` (official: 4 pairs x 4 steps);
    at least one."""
    per_device = pairs_per_update // grad_accum
    return max(1, math.ceil(pairs / per_device) // grad_accum)


def epoch_layout(items: Sequence[TrainItem], cfg: TrainCfg) -> tuple[int | None, list[int] | None]:
    """``(micro-steps, update windows)`` of one epoch with ``train.pairs_per_update`` set, else ``(None, None)``.

    The official count ``U`` (:func:`official_updates`) is made exactly: the epoch's MAGs fill
    ``M = min(#MAGs, U x grad_accum)`` micro-steps of near-equal size, and those form ``U`` updates of
    near-equal numbers of micro-steps (``grad_accum`` each whenever there are MAGs enough; a MAG is never split,
    and ``U`` <= #MAGs because a MAG of at most 9 chains gives at most 9 pairs, fewer than one update's 16)."""
    if cfg.pairs_per_update is None:
        return None, None
    u = official_updates(sum(official_pairs(it) for it in items), cfg.pairs_per_update, cfg.grad_accum)
    u = min(u, len(items)) if items else u
    m = min(len(items), u * cfg.grad_accum) if items else 0
    return m, near_equal(m, u) if m else []


def update_windows(items: Sequence[TrainItem], cfg: TrainCfg, steps_per_epoch: Sequence[int]) -> list[int]:
    """Sizes (in micro-steps) of every optimiser update of the run, in order; they sum to the run's micro-steps.
    ``mags_per_step``: windows of ``grad_accum`` over the whole run (the last may be short); ``pairs_per_update``:
    :func:`epoch_layout`'s windows, epoch by epoch."""
    _, per_epoch = epoch_layout(items, cfg)
    if per_epoch is not None:
        return [w for _ in steps_per_epoch for w in per_epoch]
    total = sum(steps_per_epoch)
    return [min(cfg.grad_accum, total - s) for s in range(0, total, cfg.grad_accum)]


def updates_per_epoch(items: Sequence[TrainItem], cfg: TrainCfg) -> int:
    """Optimiser updates the loop makes in one epoch (the first, where windows span epochs): with
    ``train.pairs_per_update``, the official count (:func:`official_updates`)."""
    m, windows = epoch_layout(items, cfg)
    if windows is not None:
        return len(windows)
    return optimizer_steps(math.ceil(len(items) / cfg.mags_per_step), cfg.grad_accum)


def items_per_step(items: Sequence[TrainItem], cfg: TrainCfg) -> int:
    """Items (MAGs) per micro-step: ``mags_per_step``; with ``pairs_per_update`` the largest micro-step of
    :func:`epoch_layout` (its sizes vary by one)."""
    m, _ = epoch_layout(items, cfg)
    if m is None:
        return cfg.mags_per_step
    return max(1, math.ceil(len(items) / max(m, 1)))


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
            from .encoders import build_encoder

            self.encoder = build_encoder(cfg.encoder, dim, cfg.hidden_dim, dropout=cfg.gcn_dropout)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(lm)
        if cfg.attention == "flex":  # magdi.core.block_mask then hands the decoder a block-sparse BlockMask
            base_model(lm).set_attn_implementation("flex_attention")
        if cfg.compile:
            compile_decoder_layers(lm)
        #: node_repr=frozen: (prompt, chain) -> (pooled base-model rep, its chain token states or None)
        self.frozen_cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor | None]] = {}

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
        if pos_rows and self.cfg.core == "packed":  # only scored positions, in vocab chunks
            l_ntp = ntp_from_hidden(lm_head, hidden[pos_rows], enc.labels[pos_rows], self.cfg.ntp_chunk)
        elif pos_rows:
            logits = lm_head(hidden[pos_rows])
            l_ntp = ntp_loss(logits, enc.labels[pos_rows], torch.ones(len(pos_rows), dtype=torch.bool))
        else:
            l_ntp = hidden.sum() * 0
        out = {"ntp": l_ntp}
        if self.spec.contrastive or self.spec.graph:
            reps_live = position_weighted_mean(hidden, enc.chain_mask)
        if self.spec.contrastive:  # the score head always ranks the live student's chains
            out["contrastive"] = self._contrastive(reps_live, enc, items, step_seed)
        if self.spec.graph:
            out["graph"] = self._graph(*self._graph_inputs(hidden, reps_live, enc, items), enc, items)
        w = self.cfg.weights
        out["loss"] = total_loss(out["ntp"], out.get("contrastive", l_ntp * 0), out.get("graph", l_ntp * 0),
                                 w.ntp, w.contrastive if self.spec.contrastive else 0.0,
                                 w.graph if self.spec.graph else 0.0)
        return out

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
        off = self.lm.disable_adapter() if hasattr(self.lm, "disable_adapter") else contextlib.nullcontext()
        with off:
            decoder, _ = self._backbone()
            if isinstance(enc, Encoded):  # fused rows are independent: run only the new ones
                t = torch.tensor(todo, device=enc.input_ids.device)
                h = lm_hidden(decoder, Encoded(enc.input_ids[t], enc.attention_mask[t], enc.labels[t],
                                               enc.chain_mask[t], [], 0))
            else:  # a pack holds several rows' prompt: the whole step goes through, then the new rows are kept
                h = lm_hidden(decoder, enc)[todo]
        mask = enc.chain_mask[todo]
        pooled = position_weighted_mean(h, mask)
        keep_tokens = self.encoder is not None and self.encoder.takes_tokens
        for j, r in enumerate(todo):
            # token states are large (tokens x hidden per chain): they wait in host memory
            toks = h[j][mask[j].bool()].detach().cpu() if keep_tokens else None
            self.frozen_cache[keys[r]] = (pooled[j].detach(), toks)

    def _contrastive(self, reps, enc, items, step_seed) -> torch.Tensor:
        gen = torch.Generator().manual_seed(step_seed)
        pos, neg = [], []
        for it, rows in zip(items, enc.node_rows, strict=True):
            p, n = pair_indices(it.labels, gen)
            pos += [rows[i] for i in p.tolist()]
            neg += [rows[i] for i in n.tolist()]
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


# ----------------------------------------------------------------------------- checkpoints (no pickle)


def _save_ckpt(final: Path, model: MagdiStudent, opt: torch.optim.Optimizer, step: int, history: list) -> None:
    """Write into a fresh folder, then swap it in: a kill at any point leaves one complete checkpoint."""
    import shutil

    from safetensors.torch import save_file

    path = final.with_name(final.name + ".tmp")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    trainable = {k: v.detach().contiguous() for k, v in model.named_parameters() if v.requires_grad}
    save_file(trainable, str(path / "trainable.safetensors"))
    sd = opt.state_dict()
    tensors = {f"{pid}.{k}": v.contiguous() for pid, st in sd["state"].items() for k, v in st.items()}
    save_file(tensors, str(path / "optimizer.safetensors"))
    meta = {"step": step, "param_groups": sd["param_groups"], "history": history,
            "state_keys": {str(pid): list(st) for pid, st in sd["state"].items()}}
    (path / "state.json").write_text(json.dumps(meta))
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(old)  # a kill from here on finds ".old" complete (see _find_ckpt)
    path.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _find_ckpt(final: Path) -> Path | None:
    """The newest complete checkpoint: the final folder, or the previous one if killed mid-swap."""
    for cand in (final, final.with_name(final.name + ".old")):
        if (cand / "state.json").exists():
            return cand
    return None


def _load_ckpt(path: Path, model: MagdiStudent, opt: torch.optim.Optimizer) -> tuple[int, list]:
    from safetensors.torch import load_file

    meta = json.loads((path / "state.json").read_text())
    params = load_file(str(path / "trainable.safetensors"))
    missing = set(params) - {k for k, _ in model.named_parameters()}
    if missing:
        raise RuntimeError(f"checkpoint {path} does not match the model: {sorted(missing)[:3]}")
    model.load_state_dict(params, strict=False)
    flat = load_file(str(path / "optimizer.safetensors"))
    state = {int(pid): {k: flat[f"{pid}.{k}"] for k in keys} for pid, keys in meta["state_keys"].items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["step"], meta["history"]


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    steps: int
    n_items: int
    n_unique_sequences: int
    tokens: int
    seconds: float
    history: list[dict[str, Any]]
    resumed_from: int
    #: the autocast dtype the run trained in (``train.bf16`` resolved on this machine) and why
    precision: str = "float32"
    precision_reason: str = ""
    #: updates of the linear warm-up (``train.warmup_steps`` or ``warmup_ratio``), and updates in all
    warmup_updates: int = 0


# Launchers ``check_distributed`` refuses (matched in accelerate's ``distributed_type``, case-insensitively), and
# why; each message says what to launch instead.
REFUSED_LAUNCHERS: dict[str, str] = {
    "DeepSpeed": "ZeRO shards parameters like FSDP, and the engine, not this loop, would step, clip and schedule; "
                 "launch with configs/accelerate_ddp.yaml",
    "FSDP": "checkpoints and the adapter are saved unsharded; launch with configs/accelerate_ddp.yaml and "
            "train.gradient_checkpointing: true (a 7B LoRA student fits one GPU, reports/benchmark_gpu_h200.md)",
}


def check_distributed(distributed_type: str) -> None:
    """Refuse a launcher this loop cannot checkpoint (FSDP) or does not drive (DeepSpeed), before any step.

    Under FSDP the parameters and AdamW state are sharded DTensors: ``_save_ckpt`` and ``save_adapter``
    write plain tensors and fail at the first checkpoint (seen on an H200 with configs/accelerate_fsdp.yaml:
    the steps ran, the first save raised "invalid python storage"; reports/benchmark_gpu_h200.md). A 7B LoRA
    student fits one GPU without sharding (19-32 GiB peak measured with gradient checkpointing), so DDP
    is the supported multi-GPU path until checkpoints go through accelerate's sharded state dicts.
    """
    kind = str(distributed_type).upper()
    for name, why in REFUSED_LAUNCHERS.items():
        if name.upper() in kind:
            raise RuntimeError(f"training under {name} is not supported: {why}")


def check_attention(attention: str, device: torch.device) -> None:
    """Refuse ``train.attention: flex`` off CUDA before any step: FlexAttention has no CPU backward (torch
    raises only at the first backward, after the model is built and the first forward is paid for)."""
    if attention == "flex" and device.type != "cuda":
        raise RuntimeError(f"train.attention: flex needs a CUDA device (FlexAttention has no backward on "
                           f"{device.type}); use train.attention: sdpa")


def grad_norm(accel, params: Iterable[nn.Parameter], max_norm: float | None) -> float:
    """The update's gradient L2 norm (after unscaling, as clipping sees it), clipped to ``max_norm`` unless None.

    Unclipped runs still log the norm, computed without touching the gradients (clipping "at infinity" would
    multiply them by inf / inf = NaN when the norm itself overflowed). Under DDP each process holds the
    all-reduced gradient after backward, so its local norm is the global one (FSDP and DeepSpeed are refused).
    ``accel=None`` (the speed benchmarks' bare loops, no loss scaling) clips with torch directly, so a timed step
    pays exactly what the pipeline's update pays.
    """
    params = list(params)
    if max_norm is not None:
        clip = accel.clip_grad_norm_ if accel is not None else torch.nn.utils.clip_grad_norm_
        return float(clip(params, max_norm))
    if accel is not None:
        accel.unscale_gradients()
    return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def rank_share(own: int, step_items: int, processes: int) -> float:
    """The factor on a rank's loss under DDP, which averages the ranks' gradients with equal weights.

    A rank's loss is a mean over its own items' chains (pairs, nodes; an item is a MAG, two for dss_mt), so equal
    weights would count an item on a rank with fewer of them (a step of 5 on 2 ranks: 3 + 2) more than one on a
    fuller rank, and a rank left without an item (it reruns the step's first item to keep the collectives in
    lockstep) would add that item a second time. Weighting rank r by ``n_r * processes / n`` weights each rank by
    its share of the step's items: the one-process mean when items contribute alike (as many positive chains,
    pairs and labelled nodes each; otherwise close to it), and exactly 0 for a rank without a share. One
    process: 1. (Contrastive pairs drawn at random are drawn per rank, so they depend on the split.)
    """
    return own * processes / step_items


def step_losses(accel, out: dict[str, torch.Tensor], own: int, step_items: int) -> dict[str, float]:
    """The step's logged losses over all ranks: each rank's values weighted by its share of the step's MAGs
    (as ``rank_share`` weights the gradients). One process logs its own values as they are, no collective."""
    if accel.num_processes == 1:
        return {k: float(v.detach()) for k, v in out.items()}
    vals = torch.stack([v.detach().float().reshape(()) for v in out.values()]) * own
    total = accel.reduce(vals, reduction="sum") / step_items
    return dict(zip(out, total.tolist(), strict=True))


def summed_over_ranks(accel, *counts: int) -> tuple[int, ...]:
    """Counts (tokens, sequences) of the whole run, not of one rank's share: summed over the DDP processes."""
    if accel.num_processes == 1:
        return counts
    total = accel.reduce(torch.tensor(counts, dtype=torch.long, device=accel.device), reduction="sum")
    return tuple(int(c) for c in total.tolist())


def checkpoint_id(found: Path | None) -> int:
    """Which checkpoint a rank loaded, as a number every rank can compare: the first 8 bytes of the sha256 of its
    ``state.json`` (step, optimiser settings, loss history), 0 for none. Bytes, not tensor sums: ranks on different
    machines sum floats in different orders."""
    import hashlib

    if found is None:
        return 0
    return int.from_bytes(hashlib.sha256((found / "state.json").read_bytes()).digest()[:8], "big", signed=True)


def same_start(accel, start: int, found: Path | None, ckpt: Path) -> None:
    """Every rank must resume from the same checkpoint. Rank 0 alone writes them; a rank that cannot see them (no
    shared filesystem across nodes) would start over at step 0 while the others resume, and the collectives would
    pair different steps (a hang or a silently wrong run); a rank reading a stale node-local copy would resume at
    the same step with other AdamW state (DDP broadcasts rank 0's parameters, not the optimiser's). Refused in one
    line on every rank instead."""
    if accel.num_processes == 1:
        return
    mine = torch.tensor([start, checkpoint_id(found)], dtype=torch.long, device=accel.device)
    seen = accel.gather(mine).reshape(-1, 2).tolist()
    if len({tuple(r) for r in seen}) > 1:
        raise RuntimeError(f"DDP ranks would resume from different checkpoints (steps {[r[0] for r in seen]}): "
                           f"{ckpt} must be one folder every process sees (rank 0 alone writes it)")


def train(
    lm: nn.Module,
    tokenizer,
    items: list[TrainItem],
    spec: MethodSpec,
    cfg: TrainCfg,
    out_dir: Path,
    log_fn=None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train LoRA (+ heads) on ``items``; resume from ``out_dir/checkpoint`` if present.

    ``stop_after`` ends the loop early after that many global steps (used by tests to simulate a kill).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    # accelerate keeps one state per process and refuses a second Accelerator with another precision; a
    # process that trains several runs (tests, one-process matrices) starts each from a clean state. The
    # distributed (partial) state is kept: it belongs to the launcher.
    AcceleratorState._reset_state()
    # accumulation is counted here, not by accelerate: its counter has no "last micro-step of the run". Under a
    # launcher the process group already exists (magdi.launch.is_main_process): its options go there
    prec = training_precision(cfg.bf16)
    accel = Accelerator(mixed_precision="bf16" if prec.bf16 else "no",
                        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    check_distributed(accel.distributed_type)
    check_attention(cfg.attention, accel.device)
    model = MagdiStudent(lm, spec, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    per_step = items_per_step(items, cfg)
    n_steps, _ = epoch_layout(items, cfg)
    plans = [plan_steps(items, per_step, cfg.seed, e, cfg.bucket_steps, n_steps) for e in range(cfg.epochs)]
    # every process takes its share of each step's items (DDP); one process on CPU takes all
    flat_steps = [s for p in plans for s in p]
    total = len(flat_steps)
    windows = update_windows(items, cfg, [len(p) for p in plans])
    ends = list(itertools.accumulate(windows))  # micro-step count at the end of each update
    ends_set = set(ends)
    window_of = [w for w in windows for _ in range(w)]
    n_updates = len(windows)
    sched = lr_schedule(opt, n_updates, cfg.warmup_ratio, cfg.warmup_steps)
    ckpt = out_dir / "checkpoint"
    start, history = 0, []
    found = _find_ckpt(ckpt)
    if found is not None:
        start, history = _load_ckpt(found, model, opt)
        with warnings.catch_warnings():  # replaying the schedule before any opt.step() of this process
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(sum(e <= start for e in ends)):  # it counts updates, not micro-steps
                sched.step()
    same_start(accel, start, found, ckpt)
    model, opt = accel.prepare(model, opt)
    core: MagdiStudent = accel.unwrap_model(model)
    model.train()
    t0, tokens, uniq = time.time(), 0, 0
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not accel.is_main_process)
    for step in range(start, total):
        if stop_after is not None and step >= stop_after:
            break
        torch.manual_seed(cfg.seed * 100003 + step)  # dropout masks independent of resume point
        own = flat_steps[step][accel.process_index :: accel.num_processes]
        batch_items = [items[i] for i in own or flat_steps[step][:1]]  # no share: run the step anyway, weight 0
        share = rank_share(len(own), len(flat_steps[step]), accel.num_processes)
        enc = encode_batch(batch_items, tokenizer, cfg).to(accel.device)
        boundary = step + 1 in ends_set
        window = window_of[step]
        with contextlib.nullcontext() if boundary else accel.no_sync(model):
            out = model(enc, batch_items, cfg.seed * 7919 + step)
            loss = out["loss"] if share == 1 else out["loss"] * share  # one process: share 1, untouched
            accel.backward(loss / window)  # the update is the mean over its micro-steps
        rec = {"step": step + 1, **step_losses(accel, out, len(own), len(flat_steps[step])),
               "lr": sched.get_last_lr()[0]}
        if boundary:  # clip the accumulated gradient only, then one update and one scheduler step
            rec["grad_norm"] = grad_norm(accel, params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad()
        if own:  # a rank that only kept the lockstep trained on nothing
            tokens += enc.n_tokens
            uniq += enc.chain_mask.shape[0]  # unique (prompt, chain) sequences, either core
        history.append(rec)
        if log_fn:
            log_fn(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        bar.update(1)
        # never checkpoint mid-accumulation: those gradients are not saved
        if accel.is_main_process and boundary and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == total):
            _save_ckpt(ckpt, core, opt, step + 1, history)
    bar.close()
    tokens, uniq = summed_over_ranks(accel, tokens, uniq)
    return TrainResult(steps=len(history), n_items=len(items), n_unique_sequences=uniq, tokens=tokens,
                       seconds=time.time() - t0, history=history, resumed_from=start,
                       precision=prec.dtype, precision_reason=prec.reason,
                       warmup_updates=warmup_updates(n_updates, cfg.warmup_ratio, cfg.warmup_steps))


def training_precision(setting: bool | str):
    """``train.bf16`` resolved for this run's device (``magdi.precision``): the one place the loop decides on bf16
    autocast, so ``auto`` on a CPU without native bf16 (AVX2 only) never turns it on."""
    from .precision import capabilities, resolve, train_device

    return resolve(setting, capabilities(), train_device(), "train.bf16")


def save_adapter(lm: nn.Module, out_dir: Path) -> str:
    """LoRA weights only (safetensors); the base student is referenced, not copied.

    Returns the sha256 of the saved weights file, the training twin of evaluation's ``outputs_sha256``: the
    adapters are not committed, so the metrics must say whether two runs trained exactly alike (equal digests:
    byte-identical weights; the loss curve alone may agree to every printed digit while weights differ).
    """
    from .packaged import file_sha256

    lm.save_pretrained(str(out_dir), safe_serialization=True)
    canonical_adapter_config(lm, out_dir)
    return file_sha256(out_dir / "adapter_model.safetensors")


def canonical_adapter_config(lm: nn.Module, out_dir: Path) -> None:
    """Rewrite ``adapter_config.json`` with its set-valued fields (``target_modules``) sorted.

    peft writes a set as ``list(value)``, in the set's iteration order, which follows the process's string-hash
    seed: two runs with byte-identical adapters wrote ``["q_proj", "v_proj"]`` or ``["v_proj", "q_proj"]`` (measured:
    the only file that differed between two `make repro` runs, so DVC saw a changed run folder). Sorted, the folder
    is a function of the run alone. peft reads a list back as the same set; the format is peft's own (indent 2,
    sorted keys)."""
    path = out_dir / "adapter_config.json"
    sets = {k for conf in lm.peft_config.values() for k, v in conf.to_dict().items() if isinstance(v, set)}
    raw = json.loads(path.read_text())
    for k in sets:
        if isinstance(raw.get(k), list):
            raw[k] = sorted(raw[k])
    path.write_text(json.dumps(raw, indent=2, sort_keys=True))


def optimizer_steps(micro_steps: int, grad_accum: int) -> int:
    """Updates made by ``micro_steps`` micro-steps: one per ``grad_accum``, plus one for a partial tail."""
    return math.ceil(micro_steps / grad_accum)




def warmup_updates(n_updates: int, warmup_ratio: float, warmup_steps: int | None = None) -> int:
    """Updates of the linear warm-up: ``warmup_steps`` when set (the official run: a fixed 100), else
    ``round(warmup_ratio * n_updates)``; never more than the run has."""
    w = warmup_steps if warmup_steps is not None else round(warmup_ratio * n_updates)
    return min(w, n_updates)


def lr_schedule(opt: torch.optim.Optimizer, n_updates: int, warmup_ratio: float, warmup_steps: int | None = None):
    """The official recipe (HF Trainer's default): linear warm-up from 0 to the peak, then linear decay to 0.

    Stepped once per optimiser update. The warm-up ``W`` is :func:`warmup_updates` (official: ``warmup_steps``
    100 over its 10 epochs of ~218 updates each); the lr of update ``u`` is ``lr · u / W`` while ``u < W``,
    then ``lr · (n - u) / (n - W)``: it reaches the peak exactly at ``u = W`` and 0 after the last update.
    """
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(opt, warmup_updates(n_updates, warmup_ratio, warmup_steps), n_updates)
