"""One training core for every method of the paper.

A method only decides *which* chains of a MAG are used and *which* losses are on (``method_spec``,
``build_items``). Everything else is shared: each step runs every unique (prompt, chain) through the
LM once, and L_ntp, L_contrastive and L_graph all reuse that one pass (``MagdiStudent.forward``).
Graphs keep their own size (PyG batching); steps are length-grouped; checkpoints hold only
safetensors + JSON (no pickle) and resume bit-exactly on CPU.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TASK_TYPES, TrainCfg
from .core import PackedEncoded, encode_packed, lm_hidden, ntp_from_hidden
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
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for it in items:
        p_ids = tokenizer(it.prompt, add_special_tokens=False)["input_ids"][-max_prompt:]
        idx = []
        for t in it.targets:
            key = (it.prompt, t)
            if key not in rows:
                t_ids = (tokenizer(t, add_special_tokens=False)["input_ids"] + eos)[:max_target]
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


def encode_batch(items: Sequence[TrainItem], tokenizer, cfg: TrainCfg) -> Encoded | PackedEncoded:
    """The step's LM input for ``train.core``: one row per (prompt, chain), or one pack per prompt."""
    if cfg.core == "packed":
        return encode_packed(items, tokenizer, cfg.max_prompt_tokens, cfg.max_target_tokens)
    return encode_step(items, tokenizer, cfg.max_prompt_tokens, cfg.max_target_tokens)


def plan_steps(items: Sequence[TrainItem], per_step: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-grouped steps: sort by size, chunk, then shuffle chunk order (seeded per epoch)."""
    size = [sum(len(t) for t in it.targets) + len(it.prompt) for it in items]
    order = sorted(range(len(items)), key=lambda i: (size[i], i))
    steps = [order[i : i + per_step] for i in range(0, len(order), per_step)]
    random.Random(seed * 1000 + epoch).shuffle(steps)
    return steps


# ----------------------------------------------------------------------------- the model


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

            self.encoder = build_encoder(cfg.encoder, dim, cfg.hidden_dim)
        self.frozen_cache: dict[int, torch.Tensor] = {}

    def _backbone(self):
        base = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
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
            reps = self._node_reps(hidden, enc)
        if self.spec.contrastive:
            out["contrastive"] = self._contrastive(reps, enc, items, step_seed)
        if self.spec.graph:
            out["graph"] = self._graph(reps, hidden, enc, items)
        w = self.cfg.weights
        out["loss"] = total_loss(out["ntp"], out.get("contrastive", l_ntp * 0), out.get("graph", l_ntp * 0),
                                 w.ntp, w.contrastive if self.spec.contrastive else 0.0,
                                 w.graph if self.spec.graph else 0.0)
        return out

    def _node_reps(self, hidden: torch.Tensor, enc: Encoded) -> torch.Tensor:
        """Pooled chain representations: live (from this pass) or frozen (base model, no adapter)."""
        if self.cfg.node_repr == "live":
            return position_weighted_mean(hidden, enc.chain_mask)
        with torch.no_grad(), self.lm.disable_adapter():
            decoder, _ = self._backbone()
            return position_weighted_mean(lm_hidden(decoder, enc), enc.chain_mask).detach()

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

    def _graph(self, reps, hidden, enc, items) -> torch.Tensor:
        from torch_geometric.data import Batch, Data

        datas, rows_all = [], []
        for it, rows in zip(items, enc.node_rows, strict=True):
            e = torch.tensor(it.edge_index, dtype=torch.long).t() if it.edge_index else torch.zeros(2, 0, dtype=torch.long)
            datas.append(Data(edge_index=e.reshape(2, -1), y=torch.tensor(it.labels), num_nodes=len(rows)))
            rows_all += rows
        batch = Batch.from_data_list(datas).to(reps.device)  # labels/edges are built on the CPU
        if self.encoder.takes_tokens:
            logits = self.encoder(hidden[rows_all], enc.chain_mask[rows_all], batch.batch)
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
    from accelerate.utils import DistributedDataParallelKwargs
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    accel = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no",
                        gradient_accumulation_steps=cfg.grad_accum,
                        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    model = MagdiStudent(lm, spec, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    plans = [plan_steps(items, cfg.mags_per_step, cfg.seed, e) for e in range(cfg.epochs)]
    # every process takes its share of each step's items (DDP); one process on CPU takes all
    flat_steps = [s for p in plans for s in p]
    total = len(flat_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, total // 10)) * max(0.0, 1 - s / max(1, total)))
    ckpt = out_dir / "checkpoint"
    start, history = 0, []
    found = _find_ckpt(ckpt)
    if found is not None:
        start, history = _load_ckpt(found, model, opt)
        for _ in range(start):
            sched.step()
    model, opt = accel.prepare(model, opt)
    core: MagdiStudent = accel.unwrap_model(model)
    model.train()
    t0, tokens, uniq = time.time(), 0, 0
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not accel.is_main_process)
    for step in range(start, total):
        if stop_after is not None and step >= stop_after:
            break
        torch.manual_seed(cfg.seed * 100003 + step)  # dropout masks independent of resume point
        idx = flat_steps[step][accel.process_index :: accel.num_processes] or flat_steps[step][:1]
        batch_items = [items[i] for i in idx]
        enc = encode_batch(batch_items, tokenizer, cfg).to(accel.device)
        with accel.accumulate(model):
            out = model(enc, batch_items, cfg.seed * 7919 + step)
            accel.backward(out["loss"])
            accel.clip_grad_norm_(params, 1.0)
            opt.step()  # accelerate makes this a no-op on accumulation micro-steps
            if accel.sync_gradients:
                sched.step()
            opt.zero_grad()
        tokens += enc.n_tokens
        uniq += enc.input_ids.shape[0]
        rec = {"step": step + 1, **{k: float(v.detach()) for k, v in out.items()}, "lr": sched.get_last_lr()[0]}
        history.append(rec)
        if log_fn:
            log_fn(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        bar.update(1)
        at_boundary = accel.sync_gradients  # never checkpoint mid-accumulation: those gradients are not saved
        if accel.is_main_process and at_boundary and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == total):
            _save_ckpt(ckpt, core, opt, step + 1, history)
    bar.close()
    return TrainResult(steps=len(history), n_items=len(items), n_unique_sequences=uniq, tokens=tokens,
                       seconds=time.time() - t0, history=history, resumed_from=start)


def save_adapter(lm: nn.Module, out_dir: Path) -> None:
    """LoRA weights only (safetensors); the base student is referenced, not copied."""
    lm.save_pretrained(str(out_dir), safe_serialization=True)


def steps_per_epoch(n_items: int, per_step: int) -> int:
    return math.ceil(n_items / per_step)
