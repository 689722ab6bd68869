"""Structure encoders (``magdi.encoders``): hand-computed GCN propagation, batching of variable-size
graphs, attention encoders' invariances, gradient flow."""

from __future__ import annotations

import math

import pytest
import torch
from torch_geometric.data import Batch, Data

from magdi.encoders import GCNEncoder, NodeAttentionEncoder, TokenAttentionEncoder, build_encoder
from magdi.losses import position_weighted_mean

DIM = 8


def _path3() -> torch.Tensor:
    """Undirected path 0 - 1 - 2 as both directed edges."""
    return torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])


def _dmag6() -> torch.Tensor:
    """D-MAG with 3 agents and 1 discussion round: every round-0 node -> every round-1 node (9 edges)."""
    return torch.tensor([[s, t] for s in range(3) for t in range(3, 6)]).t().contiguous()


def _graphs(seed: int = 0) -> list[Data]:
    g = torch.Generator().manual_seed(seed)
    return [
        Data(x=torch.randn(3, DIM, generator=g), edge_index=_path3()),
        Data(x=torch.randn(6, DIM, generator=g), edge_index=_dmag6()),
    ]


# ----------------------------------------------------------------------------------------------- GCN
def _a_hat_path3() -> torch.Tensor:
    # A + I = [[1,1,0],[1,1,1],[0,1,1]], degrees (2, 3, 2), Â_ij = 1/sqrt(d_i d_j)
    r6 = 1 / math.sqrt(6)
    return torch.tensor([[1 / 2, r6, 0.0], [r6, 1 / 3, r6], [0.0, r6, 1 / 2]])


def test_a_hat_matches_dense_formula() -> None:
    a = torch.zeros(3, 3)
    a[_path3()[0], _path3()[1]] = 1
    a_tilde = a + torch.eye(3)
    d = torch.diag(a_tilde.sum(1) ** -0.5)
    torch.testing.assert_close(d @ a_tilde @ d, _a_hat_path3())


def _identity_gcn() -> GCNEncoder:
    enc = GCNEncoder(3, 3)
    with torch.no_grad():
        for conv in (enc.conv1, enc.conv2):
            conv.lin.weight.copy_(torch.eye(3))
            conv.bias.zero_()
        enc.classifier.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        enc.classifier.bias.zero_()
    return enc.eval()


def test_gcn_propagation_equals_hand_computed_a_hat() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0], [2.0, 1.0, -4.0]])
    enc = _identity_gcn()
    a_hat = _a_hat_path3()
    torch.testing.assert_close(enc.conv1(x, _path3()), a_hat @ x)
    # full encoder: logits = (Â ReLU(Â X))[:, :2]
    expected = (a_hat @ torch.relu(a_hat @ x))[:, :2]
    torch.testing.assert_close(enc(x, _path3(), torch.zeros(3, dtype=torch.long)), expected)


def test_gcn_batch_of_different_sizes_equals_each_alone() -> None:
    torch.manual_seed(0)
    enc = GCNEncoder(DIM, 16).eval()
    graphs = _graphs()
    batch = Batch.from_data_list(graphs)
    assert batch.num_nodes == 9
    out = enc(batch.x, batch.edge_index, batch.batch)
    assert out.shape == (9, 2)
    alone = [enc(g.x, g.edge_index, torch.zeros(g.num_nodes, dtype=torch.long)) for g in graphs]
    torch.testing.assert_close(out, torch.cat(alone))


def test_gcn_isolated_round0_graph() -> None:
    # a MAG with consensus in round 0: 3 nodes, no edges -> each node only sees itself (Â = I)
    enc = _identity_gcn()
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0], [2.0, 1.0, -4.0]])
    out = enc(x, torch.empty(2, 0, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(out, torch.relu(x)[:, :2])


# ------------------------------------------------------------------------------------ NodeAttention
def test_node_attention_ignores_edges() -> None:
    torch.manual_seed(0)
    enc = NodeAttentionEncoder(DIM, 16).eval()
    batch = Batch.from_data_list(_graphs())
    with_edges = enc(batch.x, batch.edge_index, batch.batch)
    without = enc(batch.x, torch.empty(2, 0, dtype=torch.long), batch.batch)
    assert with_edges.shape == (9, 2)
    torch.testing.assert_close(with_edges, without)


def test_node_attention_invariant_to_batch_composition_and_keeps_node_order() -> None:
    torch.manual_seed(0)
    enc = NodeAttentionEncoder(DIM, 16, num_layers=2).eval()
    graphs = _graphs()
    batch = Batch.from_data_list(graphs)
    out = enc(batch.x, batch.edge_index, batch.batch)
    alone = [enc(g.x, g.edge_index, torch.zeros(g.num_nodes, dtype=torch.long)) for g in graphs]
    torch.testing.assert_close(out, torch.cat(alone))
    # interleaved (unsorted) nodes: each output row still belongs to its input row
    perm = torch.tensor([4, 0, 8, 1, 3, 7, 2, 6, 5])
    torch.testing.assert_close(enc(batch.x[perm], None, batch.batch[perm]), out[perm])


def test_node_attention_sparse_graph_ids() -> None:
    torch.manual_seed(0)
    enc = NodeAttentionEncoder(DIM, 16).eval()
    x = torch.randn(5, DIM)
    out = enc(x, None, torch.tensor([0, 0, 3, 3, 3]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, enc(x, None, torch.tensor([0, 0, 1, 1, 1])))


# ----------------------------------------------------------------------------------- TokenAttention
def _token_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """5 nodes (MAG 0: nodes 0-2, MAG 1: nodes 3-4) of up to 6 tokens; mixed left/right padding."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(5, 6, DIM, generator=g)
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1],  # left-padded, 4 tokens
            [1, 1, 1, 0, 0, 0],  # right-padded, 3 tokens
            [1, 1, 1, 1, 1, 1],
            [0, 1, 1, 0, 0, 0],  # prompt + padding around 2 tokens
            [1, 1, 1, 1, 1, 0],
        ]
    )
    return states, mask, torch.tensor([0, 0, 0, 1, 1]), [3, 2]


def _token_reference(enc: TokenAttentionEncoder, states, mask, sizes: list[int]) -> torch.Tensor:
    """Straightforward per-MAG loop: concatenate each node's real tokens in node order, attend, pool."""
    outs, start = [], 0
    for n in sizes:
        spans = [states[i][mask[i].bool()] for i in range(start, start + n)]
        seq = enc.transformer(enc.proj(torch.cat(spans)).unsqueeze(0))[0]
        offset = 0
        for span in spans:
            piece = seq[offset : offset + len(span)].unsqueeze(0)
            outs.append(position_weighted_mean(piece, torch.ones(1, len(span)))[0])
            offset += len(span)
        start += n
    return enc.classifier(torch.stack(outs))


def test_token_attention_matches_per_mag_reference() -> None:
    torch.manual_seed(0)
    enc = TokenAttentionEncoder(DIM, 16).eval()
    states, mask, node_batch, sizes = _token_inputs()
    out = enc(states, mask, node_batch)
    assert out.shape == (5, 2)
    torch.testing.assert_close(out, _token_reference(enc, states, mask, sizes))


def test_token_attention_two_mags_equal_each_alone() -> None:
    torch.manual_seed(0)
    enc = TokenAttentionEncoder(DIM, 16).eval()
    states, mask, node_batch, _ = _token_inputs()
    out = enc(states, mask, node_batch)
    first = enc(states[:3], mask[:3], torch.zeros(3, dtype=torch.long))
    second = enc(states[3:, :5], mask[3:, :5], torch.zeros(2, dtype=torch.long))  # narrower padding
    torch.testing.assert_close(out, torch.cat([first, second]))


def test_token_attention_padding_side_and_interleaved_nodes() -> None:
    torch.manual_seed(0)
    enc = TokenAttentionEncoder(DIM, 16).eval()
    states, mask, node_batch, _ = _token_inputs()
    out = enc(states, mask, node_batch)
    # move node 1's three tokens to the right end (left padding): same output
    s2, m2 = states.clone(), mask.clone()
    s2[1, 3:], m2[1] = states[1, :3], torch.tensor([0, 0, 0, 1, 1, 1])
    torch.testing.assert_close(enc(s2, m2, node_batch), out)
    # interleave the two MAGs' nodes (relative order inside each MAG kept)
    perm = torch.tensor([3, 0, 1, 4, 2])
    torch.testing.assert_close(enc(states[perm], mask[perm], node_batch[perm]), out[perm])


# --------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", ["gcn", "node_attention", "token_attention"])
def test_gradients_reach_the_input(name: str) -> None:
    torch.manual_seed(0)
    enc = build_encoder(name, DIM, 16)
    if name == "token_attention":
        states, mask, node_batch, _ = _token_inputs()
        states.requires_grad_(True)
        enc(states, mask, node_batch).logsumexp(-1).sum().backward()
        grad = states.grad
        assert grad is not None
        assert torch.count_nonzero(grad[~mask.bool()]) == 0  # padding gets no gradient
        assert (grad[mask.bool()].abs().sum(-1) > 0).all()
    else:
        batch = Batch.from_data_list(_graphs())
        x = batch.x.clone().requires_grad_(True)
        enc(x, batch.edge_index, batch.batch).logsumexp(-1).sum().backward()
        grad = x.grad
        assert grad is not None
        assert torch.isfinite(grad).all()
        assert (grad.abs().sum(-1) > 0).all()
    assert enc.takes_tokens is (name == "token_attention")


def test_build_encoder_names() -> None:
    assert isinstance(build_encoder("gcn", DIM, 16), GCNEncoder)
    assert isinstance(build_encoder("node_attention", DIM, 16), NodeAttentionEncoder)
    assert isinstance(build_encoder("token_attention", DIM, 16), TokenAttentionEncoder)
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("gat", DIM, 16)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["gcn", "node_attention", "token_attention", "score_head"])
def test_bf16_parameters_take_fp32_inputs(name: str) -> None:
    """FSDP mixed precision casts a head's parameters to bf16 with no autocast while the pooled inputs are
    fp32: the head casts its input, giving exactly what a bf16 input gives (seen failing on a GPU)."""
    from magdi.losses import ScoreHead

    torch.manual_seed(0)
    mod = (ScoreHead(8, 8) if name == "score_head" else build_encoder(name, 8, 8)).to(torch.bfloat16).eval()
    batch = torch.tensor([0, 0, 1])
    if name == "token_attention":
        x, other = torch.randn(3, 4, 8), torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0]])
    else:
        x, other = torch.randn(3, 8), torch.tensor([[0, 1], [1, 0]])

    def run(inp: torch.Tensor) -> torch.Tensor:
        if name == "score_head":
            return mod(inp)
        return mod(inp, other, batch)

    out = run(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.equal(out, run(x.to(torch.bfloat16)))
