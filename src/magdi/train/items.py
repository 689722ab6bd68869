"""Methods and their training items: which chains of a MAG a method trains on (``method_spec``, ``build_items``),
how items are tokenised (``encode_step``, ``encode_batch``) and how an epoch is cut into micro-steps and updates
(``plan_steps``; with ``train.pairs_per_update`` the official count, ``updates_per_epoch``)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..config import TASK_TYPES, TrainCfg
from ..core import PackedEncoded, encode_packed, prompt_ids, target_ids
from ..mag import MAG, edges
from ..names import TRAINED_METHODS
from ..student import DSS_ANSWER_PREFIX, DSS_RATIONALE_PREFIX, student_prompt, student_target


@dataclass(frozen=True)
class MethodSpec:
    """Which nodes feed the student and which losses are on."""

    nodes: str  # "round0_correct" | "correct" | "all" | "agent_round0_correct" | "dss"
    contrastive: bool = False
    graph: bool = False
    #: L_DPO on the same (correct, incorrect) pairs as L_contrastive (beyond the paper)
    dpo: bool = False
    agent: str | None = None


def method_spec(method: str) -> MethodSpec:
    if method.startswith("sit_"):
        return MethodSpec("agent_round0_correct", agent=method[4:])
    if method not in METHOD_SPECS:
        raise ValueError(f"method '{method}' has no training recipe (zero_shot is evaluated untrained)")
    return METHOD_SPECS[method]


#: the training recipe of each trained method of the registry (``magdi.names.TRAINED_METHODS``)
METHOD_SPECS = {
    "dss_mt": MethodSpec("dss"),
    "magdi_r0": MethodSpec("round0_correct"),
    "magdi_cn": MethodSpec("correct"),
    "magdi_an": MethodSpec("all", contrastive=True),
    "magdi": MethodSpec("all", contrastive=True, graph=True),
    # beyond the paper: every chain of the MAG, L_ntp on the correct ones and L_DPO on MAGDi's pairs (dpo), or
    # MAGDi with L_DPO in place of the margin ranking loss (magdi_dpo)
    "dpo": MethodSpec("all", dpo=True),
    "magdi_dpo": MethodSpec("all", graph=True, dpo=True),
}
assert set(METHOD_SPECS) == set(TRAINED_METHODS), "magdi.names.TRAINED_METHODS and the recipes disagree"


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
        return encode_packed(items, tokenizer, cfg.max_prompt_tokens, cfg.max_target_tokens,
                             one_row=cfg.attention == "segments")
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



def optimizer_steps(micro_steps: int, grad_accum: int) -> int:
    """Updates made by ``micro_steps`` micro-steps: one per ``grad_accum``, plus one for a partial tail."""
    return math.ceil(micro_steps / grad_accum)

__all__ = ["Encoded", "METHOD_SPECS", "MethodSpec", "TrainItem", "_node_target", "build_items", "encode_batch", "encode_step", "epoch_layout", "items_per_step", "method_spec", "near_equal", "official_pairs", "official_updates", "optimizer_steps", "plan_steps", "truncation_stats", "update_windows", "updates_per_epoch"]
