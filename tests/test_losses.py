"""Hand-computed checks of the MAGDi objectives (``magdi.losses``)."""

from __future__ import annotations

import math

import pytest
import torch

from magdi.losses import (
    ScoreHead,
    graph_node_loss,
    margin_ranking_loss,
    ntp_loss,
    pair_indices,
    position_weighted_mean,
    token_nll,
    total_loss,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def _logits() -> torch.Tensor:
    """One sequence of 3 positions over a 3-token vocabulary.

    position 0: [0, 0, 0]       -> softmax [1/3, 1/3, 1/3]
    position 1: [0, ln 2, 0]    -> softmax [1/4, 2/4, 1/4]
    position 2: [100, 0, 0]     -> predicts past the end, must never be scored
    """
    return torch.tensor([[[0.0, 0.0, 0.0], [0.0, LN2, 0.0], [100.0, 0.0, 0.0]]], dtype=torch.float64)


# ----------------------------------------------------------------------------------------- token_nll
def test_token_nll_hand_computed_with_shift() -> None:
    # labels[1] = 1 is predicted by position 0: -log(1/3) = ln 3
    # labels[2] = 2 is predicted by position 1: -log(1/4) = ln 4
    labels = torch.tensor([[-100, 1, 2]])
    out = token_nll(_logits(), labels)
    assert out.shape == (1,)
    assert out.item() == pytest.approx((LN3 + math.log(4.0)) / 2, abs=1e-6)


def test_token_nll_masks_ignored_tokens() -> None:
    # only labels[2] = 0 is a target, predicted by position 1: -log(1/4) = ln 4
    labels = torch.tensor([[5, -100, 0]])  # labels[0] is never a target (nothing predicts it)
    assert token_nll(_logits(), labels).item() == pytest.approx(math.log(4.0), abs=1e-6)
    # only labels[1] = 1, predicted by position 0: ln 3 (without the shift it would be -log(2/4) = ln 2)
    labels = torch.tensor([[-100, 1, -100]])
    assert token_nll(_logits(), labels).item() == pytest.approx(LN3, abs=1e-6)


def test_token_nll_row_without_target_is_zero_not_nan() -> None:
    logits = _logits().repeat(2, 1, 1)
    labels = torch.tensor([[-100, -100, -100], [-100, 1, -100]])
    out = token_nll(logits, labels)
    assert torch.isfinite(out).all()
    assert out.tolist() == pytest.approx([0.0, LN3], abs=1e-6)


# ------------------------------------------------------------------------------------------ ntp_loss
def test_ntp_loss_mixed_positive_mask_token_mean_then_chain_mean() -> None:
    logits = _logits().repeat(3, 1, 1)
    labels = torch.tensor(
        [
            [-100, 1, -100],  # positive, 1 target token: ln 3
            [-100, 1, 2],  # positive, 2 target tokens: (ln 3 + ln 4) / 2
            [-100, 0, 0],  # negative: excluded
        ]
    )
    positive = torch.tensor([True, True, False])
    expected = (LN3 + (LN3 + math.log(4.0)) / 2) / 2  # chain mean, not the pooled token mean (2 ln3 + ln4)/3
    assert ntp_loss(logits, labels, positive).item() == pytest.approx(expected, abs=1e-6)
    # a 0/1 mask works the same way
    assert ntp_loss(logits, labels, torch.tensor([1, 0, 0])).item() == pytest.approx(LN3, abs=1e-6)


def test_ntp_loss_no_positive_is_zero_with_grad() -> None:
    logits = _logits().repeat(2, 1, 1).requires_grad_(True)
    labels = torch.tensor([[-100, 1, 2], [-100, 0, 0]])
    loss = ntp_loss(logits, labels, torch.tensor([False, False]))
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) == 0


def test_ntp_loss_positive_without_target_does_not_dilute() -> None:
    logits = _logits().repeat(2, 1, 1)
    labels = torch.tensor([[-100, 1, -100], [-100, -100, -100]])
    assert ntp_loss(logits, labels, torch.tensor([True, True])).item() == pytest.approx(LN3, abs=1e-6)


# ---------------------------------------------------------------------------- position_weighted_mean
def test_position_weighted_mean_hand_computed() -> None:
    hidden = torch.tensor([[[1.0], [2.0], [4.0]]])
    out = position_weighted_mean(hidden, torch.ones(1, 3))
    assert out.shape == (1, 1)
    assert out.item() == pytest.approx((1 * 1 + 2 * 2 + 3 * 4) / 6)  # 17/6


def test_position_weighted_mean_counts_ranks_over_mask_only() -> None:
    # prompt tokens (10, 20) are masked out: the chain [1, 2, 4] still gets weights 1, 2, 3
    hidden = torch.tensor([[[10.0], [20.0], [1.0], [2.0], [4.0]]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    assert position_weighted_mean(hidden, mask).item() == pytest.approx(17 / 6)


def test_position_weighted_mean_invariant_to_padding_and_batch() -> None:
    chain = torch.tensor([[1.0, -1.0], [2.0, 0.5], [4.0, 3.0]], dtype=torch.float64)
    expected = (1 * chain[0] + 2 * chain[1] + 3 * chain[2]) / 6
    pad = torch.full((2, 2), 7.0, dtype=torch.float64)
    left = torch.cat([pad, chain]).unsqueeze(0)
    right = torch.cat([chain, pad]).unsqueeze(0)
    m_left = torch.tensor([[0, 0, 1, 1, 1]])
    m_right = torch.tensor([[1, 1, 1, 0, 0]])
    longer = torch.arange(14, dtype=torch.float64).reshape(1, 7, 2)
    # batched with a longer sequence, both left-padded (the official code's absolute weights would shift)
    batch = torch.cat([torch.cat([torch.zeros(2, 2, dtype=torch.float64), pad, chain]).unsqueeze(0), longer])
    m_batch = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [1] * 7])
    for h, m in ((left, m_left), (right, m_right)):
        torch.testing.assert_close(position_weighted_mean(h, m)[0], expected)
    torch.testing.assert_close(position_weighted_mean(batch, m_batch)[0], expected)
    torch.testing.assert_close(position_weighted_mean(chain.unsqueeze(0), torch.ones(1, 3))[0], expected)


def test_position_weighted_mean_ignores_nan_padding_and_empty_mask() -> None:
    hidden = torch.tensor([[[float("nan")], [1.0], [2.0], [4.0]], [[5.0], [6.0], [7.0], [8.0]]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0]])
    out = position_weighted_mean(hidden, mask)
    assert out[0].item() == pytest.approx(17 / 6)
    assert out[1].item() == 0.0


def test_position_weighted_mean_gradient_equals_weights() -> None:
    hidden = torch.ones(1, 4, 1, requires_grad=True)
    position_weighted_mean(hidden, torch.tensor([[0, 1, 1, 0]])).sum().backward()
    assert hidden.grad is not None
    assert hidden.grad.flatten().tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 0.0])


# ---------------------------------------------------------------------------------------- ScoreHead
def test_score_head_formula_and_range() -> None:
    head = ScoreHead(2, 2)
    with torch.no_grad():
        head.w1.weight.copy_(torch.eye(2))
        head.w1.bias.zero_()
        head.w2.weight.copy_(torch.ones(1, 2))
        head.w2.bias.zero_()
    out = head(torch.tensor([[1.0, -2.0], [0.5, 0.25]]))
    # tanh(1·relu(1) + 1·relu(-2)) = tanh(1); tanh(0.5 + 0.25) = tanh(0.75)
    assert out.shape == (2,)
    assert out.tolist() == pytest.approx([math.tanh(1.0), math.tanh(0.75)], abs=1e-6)
    torch.manual_seed(0)
    scores = ScoreHead(8, 16)(torch.randn(32, 8))
    assert scores.shape == (32,)
    assert scores.abs().max() < 1
    assert ScoreHead(8, 16)(1e4 * torch.randn(32, 8)).abs().max() <= 1  # float32 tanh saturates at ±1


# ------------------------------------------------------------------------------------- pair_indices
def test_pair_indices_five_positives_three_negatives() -> None:
    labels = [1, 1, 0, 1, 0, 1, 0, 1]  # P = [0, 1, 3, 5, 7], N = [2, 4, 6]
    pos, neg = pair_indices(labels, torch.Generator().manual_seed(0))
    assert pos.dtype == neg.dtype == torch.long
    assert len(pos) == len(neg) == 5
    assert pos.tolist() == [0, 1, 3, 5, 7]  # every positive exactly once, in natural order
    assert neg[:3].tolist() == [2, 4, 6]  # the 3 natural pairs
    assert set(neg[3:].tolist()) <= {2, 4, 6}  # 2 sampled negatives
    assert set(neg.tolist()) == {2, 4, 6}


def test_pair_indices_two_positives_four_negatives() -> None:
    labels = torch.tensor([0, 1, 0, 0, 1, 0])  # P = [1, 4], N = [0, 2, 3, 5]
    pos, neg = pair_indices(labels, torch.Generator().manual_seed(0))
    assert len(pos) == len(neg) == 4
    assert neg.tolist() == [0, 2, 3, 5]
    assert pos[:2].tolist() == [1, 4]
    assert set(pos[2:].tolist()) <= {1, 4}


def test_pair_indices_equal_counts_pair_in_order() -> None:
    pos, neg = pair_indices([0, 1, 1, 0], torch.Generator().manual_seed(0))
    assert pos.tolist() == [1, 2] and neg.tolist() == [0, 3]


def test_pair_indices_without_a_group_is_empty() -> None:
    for labels in ([1, 1, 1], [0, 0], [], [2, 1, 2]):  # 2 = placeholder node: neither group
        pos, neg = pair_indices(labels, torch.Generator().manual_seed(0))
        assert pos.numel() == 0 and neg.numel() == 0
        assert pos.dtype == neg.dtype == torch.long


def test_pair_indices_deterministic_and_covers_minority() -> None:
    labels = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]  # 7 positives, 3 negatives: 4 sampled negatives
    a = pair_indices(labels, torch.Generator().manual_seed(123))
    b = pair_indices(labels, torch.Generator().manual_seed(123))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    seen = set()
    for seed in range(50):
        _, neg = pair_indices([1, 1, 1, 1, 0, 0, 0], torch.Generator().manual_seed(seed))
        seen.add(neg[3].item())  # the one sampled partner
    assert seen == {4, 5, 6}  # every negative can be drawn


# ------------------------------------------------------------------------------ margin_ranking_loss
def test_margin_ranking_loss_hand_computed() -> None:
    s_pos = torch.tensor([0.5, 0.9])
    s_neg = torch.tensor([0.2, 0.95])
    # max(0, 1 - 0.5 + 0.2) = 0.7; max(0, 1 - 0.9 + 0.95) = 1.05; mean = 0.875
    assert margin_ranking_loss(s_pos, s_neg, margin=1.0).item() == pytest.approx(0.875, abs=1e-6)


def test_margin_ranking_loss_zero_gradient_when_satisfied() -> None:
    s_pos = torch.tensor([1.0, 0.0], requires_grad=True)
    s_neg = torch.tensor([-0.5, 0.0], requires_grad=True)
    loss = margin_ranking_loss(s_pos, s_neg)  # pair 0: max(0, -0.5) = 0; pair 1: 1
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert s_pos.grad is not None and s_neg.grad is not None
    assert s_pos.grad.tolist() == pytest.approx([0.0, -0.5])
    assert s_neg.grad.tolist() == pytest.approx([0.0, 0.5])


def test_margin_ranking_loss_empty_is_zero_with_grad() -> None:
    s_pos = torch.empty(0, requires_grad=True)
    s_neg = torch.empty(0, requires_grad=True)
    loss = margin_ranking_loss(s_pos, s_neg)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


# --------------------------------------------------------------------------------- graph_node_loss
def test_graph_node_loss_hand_computed_and_ignore() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0], [9.0, -9.0]])
    labels = torch.tensor([1, 0, -100])
    # node 0: softmax [1/4, 3/4], label 1 -> ln(4/3); node 1: ln 2; node 2 ignored
    expected = (math.log(4 / 3) + LN2) / 2
    assert graph_node_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_graph_node_loss_all_ignored_is_zero_with_grad() -> None:
    logits = torch.randn(3, 2, requires_grad=True)
    loss = graph_node_loss(logits, torch.full((3,), -100))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


# ------------------------------------------------------------------------------------- total_loss
def test_total_loss_weights() -> None:
    l1, l2, l3 = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(4.0)
    assert total_loss(l1, l2, l3).item() == pytest.approx(2 + 0.1 * 3 + 4)
    assert total_loss(l1, l2, l3, w_ntp=0.5, w_con=0.0, w_graph=2.0).item() == pytest.approx(9.0)
    # a disabled term cannot poison the sum
    assert total_loss(l1, torch.tensor(float("nan")), l3, w_con=0.0).item() == pytest.approx(6.0)


def test_graph_loss_equals_the_official_log_softmax_then_cross_entropy() -> None:
    """The official code feeds log_softmax output to CrossEntropyLoss: the same loss and gradient as the logits
    (log_softmax is idempotent), so our raw-logit L_graph is no behavioural difference."""
    import torch
    import torch.nn.functional as F

    from magdi.losses import graph_node_loss

    logits = torch.tensor([[2.0, -1.0], [0.3, 0.7], [-0.5, 1.5]], requires_grad=True)
    labels = torch.tensor([0, 1, -100])
    ours = graph_node_loss(logits, labels)
    (g_ours,) = torch.autograd.grad(ours, logits)
    official = F.cross_entropy(F.log_softmax(logits, dim=-1), labels, ignore_index=-100)
    (g_off,) = torch.autograd.grad(official, logits)
    assert torch.allclose(ours, official) and torch.allclose(g_ours, g_off)
    by_hand = (-(F.log_softmax(logits[0], -1)[0]) - F.log_softmax(logits[1], -1)[1]) / 2
    assert torch.allclose(ours, by_hand)


def test_ntp_token_reduction_by_hand() -> None:
    """Two positive chains, NLL sums 2 (1 token) and 10 (4 tokens): chain reduction (2 + 2.5) / 2 = 2.25; token
    reduction 12 / 5 = 2.4 (the short chain weighs 1 token of 5, not half)."""
    from magdi.losses import mean_over_rows

    sums, count = torch.tensor([2.0, 10.0]), torch.tensor([1, 4])
    assert mean_over_rows(sums, count).item() == pytest.approx(2.25)
    assert mean_over_rows(sums, count, "token").item() == pytest.approx(2.4)
    # ntp_loss on logits: uniform logits over V give log V per token, whatever the reduction; with one row's
    # logits sharpened on its labels, the token mean weighs that row by its token count
    V = 5
    labels = torch.tensor([[-100, 1, -100, -100, -100], [-100, 2, 3, 4, 1]])
    logits = torch.zeros(2, 5, V)
    logits[1, :4] = torch.nn.functional.one_hot(torch.tensor([2, 3, 4, 1]), V) * 50.0  # row 1: ~0 loss
    mask = torch.tensor([True, True])
    assert ntp_loss(logits, labels, mask).item() == pytest.approx(math.log(V) / 2, rel=1e-4)
    assert ntp_loss(logits, labels, mask, "token").item() == pytest.approx(math.log(V) / 5, rel=1e-4)
