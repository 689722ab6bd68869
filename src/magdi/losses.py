"""MAGDi training objectives (paper §3.3, App. A; ``DESIGN.md`` "Student objectives").

Every equation of the student objective lives here once, as a pure tensor function:

- ``token_nll`` / ``ntp_loss`` .......... Objective 1, L_ntp (next-token prediction on positive chains)
- ``position_weighted_mean`` ............ chain representation h (SGPT-style weighted mean pool)
- ``ScoreHead`` ......................... s = tanh(w2ᵀ ReLU(W1 h))
- ``pair_indices`` ...................... positive/negative pairing inside one MAG (App. A)
- ``margin_ranking_loss`` ............... Objective 2, L_contrastive = mean(max(0, m − s⁺ + s⁻))
- ``graph_node_loss`` ................... Objective 3, L_graph (node-correctness cross-entropy)
- ``dpo_loss`` .......................... beyond the paper: L_DPO on the same (correct, incorrect) pairs
- ``total_loss`` ........................ L = w_ntp·L_ntp + w_con·L_contrastive + w_graph·L_graph (+ w_dpo·L_DPO)

Degenerate inputs (no positive chain, no pair, no labelled node) give an exact 0 that still belongs to
the autograd graph, so a training step never sees NaN and ``backward()`` never fails on a constant.
None of these functions synchronises with the device (no ``.item()`` / data-dependent Python branches)
except ``pair_indices``, which runs on the CPU labels of one MAG.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def _zero_like_graph(*tensors: Tensor) -> Tensor:
    """An exact scalar 0 connected to the autograd graph of ``tensors`` (grad is 0, never None)."""
    return sum((t.sum() * 0.0 for t in tensors), start=torch.zeros((), device=tensors[0].device))


def token_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sequence mean next-token negative log-likelihood over target tokens.

    ``nll_b = −(1/|T_b|) Σ_{t ∈ T_b} log p(labels[b, t] | logits[b, t−1])`` where ``T_b`` is the set of
    positions ``t ≥ 1`` with ``labels[b, t] != -100`` (the chain's reasoning + answer; prompt and padding
    carry -100). Causal LMs predict token ``t`` from position ``t−1``, hence the shift by one:
    ``logits[:, :-1]`` are scored against ``labels[:, 1:]``.

    Args:
        logits: ``[B, T, V]`` language-model logits.
        labels: ``[B, T]`` token ids, ``-100`` where no loss is taken.

    Returns:
        ``[B]`` float32 mean NLL per sequence; exactly 0 for a row with no target token (never NaN).
        The cross-entropy runs in the logits' own dtype (no float32 copy of ``[B, T, V]``); the per-token
        values are accumulated in float32.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits [B,T,V] and labels [B,T] expected, got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    # Shift the labels rather than the logits: ``logits.reshape`` stays a view, so no copy of the
    # (large) [B, T, V] tensor is made. Position t scores labels[:, t + 1]; the last position scores nothing.
    shift_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    per_token = (
        F.cross_entropy(
            logits.reshape(-1, logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        .view_as(shift_labels)
        .float()
    )  # 0 at ignored positions
    count = (shift_labels != IGNORE_INDEX).sum(dim=1)
    return per_token.sum(dim=1) / count.clamp(min=1).to(per_token.dtype)


def mean_over_rows(sums: Tensor, count: Tensor, reduction: str = "chain") -> Tensor:
    """L_ntp from per-row NLL sums and target-token counts (``core.row_nll``, ``ntp_loss``): ``chain`` = token mean per
    row, then mean over the rows that have a target; ``token`` = the mean over all their target tokens."""
    if reduction == "token":
        return sums.sum() / count.sum().clamp(min=1).to(sums.dtype)
    per_row = sums / count.clamp(min=1).to(sums.dtype)
    use = count > 0
    return (per_row * use.to(per_row.dtype)).sum() / use.sum().clamp(min=1).to(per_row.dtype)


def ntp_loss(logits: Tensor, labels: Tensor, positive_mask: Tensor, reduction: str = "chain") -> Tensor:
    """Objective 1, next-token prediction on positive (correct) chains.

    ``L_ntp = (1/|P|) Σ_{b ∈ P} token_nll_b``: token-mean within each chain, then mean over chains, so a
    long chain does not outweigh a short one. ``P`` = rows with ``positive_mask`` true *and* at least one
    target token (a positive row whose target was entirely truncated away would otherwise pull the mean
    towards 0).

    Args:
        logits: ``[B, T, V]``; labels: ``[B, T]`` with -100 on prompt/pad; positive_mask: ``[B]`` bool
            (or 0/1) marking the positive chains.

    ``reduction="token"`` (``train.ntp_reduction``): the mean over every target token of the positive rows instead
    (the official code's causal-LM loss), so each token weighs the same and a short chain ("The answer is 12.")
    no more than its few tokens.

    Returns:
        Scalar float32. Exactly 0, still attached to ``logits``' graph, when there is no positive row.
    """
    per_seq = token_nll(logits, labels)
    has_target = (labels[:, 1:] != IGNORE_INDEX).any(dim=1)
    use = positive_mask.to(device=per_seq.device, dtype=torch.bool) & has_target
    if reduction == "token":
        count = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).to(per_seq.dtype) * use.to(per_seq.dtype)
        return mean_over_rows(per_seq * count, count, "token")
    n = use.sum()
    # ``per_seq * 0`` keeps the result attached to ``logits``' graph even when no row is used.
    return (per_seq * use.to(per_seq.dtype)).sum() / n.clamp(min=1).to(per_seq.dtype)


def position_weighted_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Chain representation: position-weighted mean of hidden states over the chain's own tokens.

    ``h_b = Σ_t w_bt · hidden[b, t]`` with ``w_bt = k_bt / Σ_t k_bt`` where ``k_bt`` is the rank (1, 2, …,
    n_b) of position ``t`` among the positions with ``mask[b, t] = 1`` and 0 elsewhere (SGPT weighting:
    in a causal LM later tokens have seen more of the chain, so they get more weight).

    The rank is counted over mask positions only (``cumsum(mask)``), so ``h_b`` does not depend on the
    padding side nor on the length of the other sequences in the batch. The official MAGDi code instead
    uses the absolute position in a left-padded batch, which changes a chain's weights with padding.

    Args:
        hidden: ``[B, T, D]`` (e.g. the LM's last hidden layer).
        mask: ``[B, T]`` 1/True on the tokens to pool (the chain's own tokens), 0 elsewhere.

    Returns:
        ``[B, D]`` in ``promote(hidden.dtype, float32)``; a row with an empty mask gives zeros. Values at
        masked-out positions never leak in (even NaN/inf there are ignored).
    """
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden [B,T,D] and mask [B,T] expected, got {tuple(hidden.shape)} and {tuple(mask.shape)}"
        )
    out_dtype = torch.promote_types(hidden.dtype, torch.float32)
    m = mask.to(device=hidden.device, dtype=torch.bool)
    ranks = torch.cumsum(m.to(out_dtype), dim=1) * m.to(out_dtype)  # k = 1..n on mask positions, 0 elsewhere
    weights = ranks / ranks.sum(dim=1, keepdim=True).clamp(min=1.0)
    h = torch.where(
        m.unsqueeze(-1), hidden.to(out_dtype), torch.zeros((), dtype=out_dtype, device=hidden.device)
    )
    return torch.bmm(weights.unsqueeze(1), h).squeeze(1)


def as_param_dtype(module: nn.Module, x: Tensor) -> Tensor:
    """``x`` in the dtype of ``module``'s parameters, called inside ``forward``.

    Under FSDP mixed precision the parameters are cast to bf16 only when the module runs, and no autocast
    is active, while pooled representations arrive in fp32 (``position_weighted_mean``): without this cast
    the first matmul of a head fails with a dtype mismatch (seen under ``accelerate launch`` with
    configs/accelerate_fsdp.yaml, reports/benchmark_gpu_h200.md). A no-op when the dtypes agree.
    """
    p = next(module.parameters(), None)
    return x if p is None or x.dtype == p.dtype or not x.is_floating_point() else x.to(p.dtype)


class ScoreHead(nn.Module):
    """Scalar plausibility score of a chain: ``s = tanh(w2ᵀ ReLU(W1 h))`` (paper Objective 2).

    ``tanh`` bounds s to (−1, 1), so with margin 1 the hinge can be satisfied but not trivially by blowing
    up the scores. The official code uses ``hidden = dim`` (a ``D×D`` W1); both layers carry a bias.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, 1)

    def forward(self, h: Tensor) -> Tensor:
        """``h`` ``[N, D]`` → scores ``[N]`` in (−1, 1)."""
        return torch.tanh(self.w2(torch.relu(self.w1(as_param_dtype(self, h))))).squeeze(-1)


def pair_indices(labels: Sequence[int] | Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Positive/negative chain pairs inside ONE MAG (paper App. A).

    Positives P = node indices with label 1, negatives N = label 0 (any other label, e.g. a placeholder,
    is neither). The first ``min(|P|, |N|)`` of each group are paired in natural order; every remaining
    member of the majority group gets a partner drawn uniformly from the minority group with
    ``generator``. Draws are without replacement within a cycle (concatenated random permutations of the
    minority group), so partners are reused as evenly as possible; each single draw is uniform. Example:
    5 positives, 3 negatives → 3 natural pairs + 2 pairs with sampled negatives = 5 pairs, every positive
    exactly once. A MAG with no positive or no negative yields no pair (never an invented negative).

    Args:
        labels: node labels of one MAG in node order (list or 1-D tensor).
        generator: a CPU ``torch.Generator``; fixing its seed makes the pairing deterministic.

    Returns:
        ``(pos_idx, neg_idx)``: two int64 CPU tensors of equal length (indices into the MAG's node list).
    """
    lab = torch.as_tensor(labels).detach().to("cpu").reshape(-1)
    pos = torch.nonzero(lab == 1).flatten().to(torch.long)
    neg = torch.nonzero(lab == 0).flatten().to(torch.long)
    n_pos, n_neg = pos.numel(), neg.numel()
    if n_pos == 0 or n_neg == 0:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty.clone()
    m = min(n_pos, n_neg)
    pos_idx, neg_idx = pos[:m], neg[:m]
    if n_pos != n_neg:
        minority = neg if n_pos > n_neg else pos
        extra = max(n_pos, n_neg) - m
        cycles = -(-extra // minority.numel())
        perms = [torch.randperm(minority.numel(), generator=generator) for _ in range(cycles)]
        draws = torch.cat(perms)[:extra]
        sampled = minority[draws]
        if n_pos > n_neg:
            pos_idx, neg_idx = pos, torch.cat([neg_idx, sampled])
        else:
            pos_idx, neg_idx = torch.cat([pos_idx, sampled]), neg
    return pos_idx.clone(), neg_idx.clone()


def margin_ranking_loss(s_pos: Tensor, s_neg: Tensor, margin: float = 1.0) -> Tensor:
    """Objective 2, ``L_contrastive = mean_pairs max(0, m − s⁺ + s⁻)`` (margin m = 1 in the paper).

    A pair stops contributing (zero gradient) once the positive scores at least ``m`` above the negative.
    Empty input (no pair in the batch) → exact 0 attached to the inputs' graph.
    """
    if s_pos.shape != s_neg.shape:
        raise ValueError(
            f"s_pos and s_neg must have the same shape, got {tuple(s_pos.shape)} and {tuple(s_neg.shape)}"
        )
    if s_pos.numel() == 0:
        return _zero_like_graph(s_pos, s_neg)
    return torch.clamp(margin - s_pos + s_neg, min=0.0).mean()


def graph_node_loss(node_logits: Tensor, labels: Tensor) -> Tensor:
    """Objective 3, ``L_graph``: cross-entropy of the structure encoder's node logits against node
    correctness (0 = incorrect, 1 = correct), averaged over labelled nodes of the batch; label -100 is
    ignored. Exactly 0 (with graph) when no node is labelled. Takes raw logits. The official code applies
    ``log_softmax`` before ``CrossEntropyLoss``: no behavioural difference, because ``log_softmax`` is idempotent
    (log-probabilities already normalise: their logsumexp is 0), so cross-entropy on its output equals
    cross-entropy on the logits, in value and gradient (tests/test_losses.py checks it).
    """
    per_node = F.cross_entropy(
        node_logits.float(), labels.long(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    count = (labels != IGNORE_INDEX).sum()
    # Ignored nodes contribute an exact 0 that is still part of the graph, so an all-ignored batch gives 0.
    return per_node.sum() / count.clamp(min=1).to(per_node.dtype)


def dpo_loss(pol_pos: Tensor, pol_neg: Tensor, ref_pos: Tensor, ref_neg: Tensor, beta: float) -> Tensor:
    """Direct preference optimisation (Rafailov et al., 2023, Eq. 7) on (correct, incorrect) chain pairs:

    ``L_DPO = mean_pairs −log σ(β [(log π(y⁺|x) − log π_ref(y⁺|x)) − (log π(y⁻|x) − log π_ref(y⁻|x))])``

    where π is the trained student and π_ref the same student with its adapter disabled. The log-probabilities
    are per chain (sums of token log-probabilities, or their per-token means for the length-normalised variant:
    the caller decides). Written with ``logsigmoid`` (never ``log(sigmoid(.))``), so a large margin gives 0, not
    ``log 0``. Empty input (no pair) → exact 0 attached to the inputs' graph.
    """
    if not (pol_pos.shape == pol_neg.shape == ref_pos.shape == ref_neg.shape):
        raise ValueError(f"dpo_loss: shapes differ: {[tuple(t.shape) for t in (pol_pos, pol_neg, ref_pos, ref_neg)]}")
    if pol_pos.numel() == 0:
        return _zero_like_graph(pol_pos, pol_neg)
    margin = (pol_pos.float() - ref_pos.float()) - (pol_neg.float() - ref_neg.float())
    return -F.logsigmoid(beta * margin).mean()


def total_loss(
    l_ntp: Tensor,
    l_con: Tensor,
    l_graph: Tensor,
    w_ntp: float = 1.0,
    w_con: float = 0.1,
    w_graph: float = 1.0,
    l_dpo: Tensor | None = None,
    w_dpo: float = 0.0,
) -> Tensor:
    """``L = w_ntp·L_ntp + w_con·L_contrastive + w_graph·L_graph (+ w_dpo·L_DPO)`` (defaults: official code,
    1.0/0.1/1.0; the DPO term only for the methods beyond the paper).

    A weight of 0 drops its term entirely (so a disabled, possibly-NaN term cannot poison the sum).
    """
    total = torch.zeros((), device=l_ntp.device, dtype=torch.promote_types(l_ntp.dtype, torch.float32))
    for w, term in ((w_ntp, l_ntp), (w_con, l_con), (w_graph, l_graph), (w_dpo, l_dpo)):
        if w != 0.0 and term is not None:
            total = total + w * term
    return total
