"""Structure encoders: node (or token) representations of a batch of MAGs → 2-class node logits.

Used by Objective 3 (L_graph, ``magdi.losses.graph_node_loss``) and the encoder ablation (paper Table 6):

- ``GCNEncoder`` (MAGDi default): ``H¹ = ReLU(Â H⁰ W⁰)``, ``H² = Â H¹ W¹``, ``Â = D̃^(−1/2)(A + I)D̃^(−1/2)``
  (PyG ``GCNConv``), then ``Linear(hidden, 2)``.
- ``NodeAttentionEncoder``: the nodes of each MAG form a sequence; a Transformer encoder attends over all
  nodes of the same MAG (no graph mask: edges are ignored), then ``Linear(hidden, 2)``.
- ``TokenAttentionEncoder``: all chains of a MAG are linearised into one token sequence; a Transformer
  encoder attends over the tokens of the whole MAG, tokens are pooled back per node with
  ``position_weighted_mean``, then ``Linear(hidden, 2)``.

Graphs have variable size: node encoders take a PyG batch (``x``, ``edge_index``, ``batch``) built with
``Batch.from_data_list``; nothing pads to a fixed node count, and every encoder gives each MAG the same
output whatever else is in the batch (in eval mode). ``takes_tokens`` tells the trainer which
``forward`` signature an encoder has.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import GCNConv
from torch_geometric.utils import to_dense_batch

from magdi.losses import as_param_dtype, position_weighted_mean
from magdi.names import ENCODERS, EncoderName


def _num_heads(hidden_dim: int, preferred: int) -> int:
    """Largest head count ≤ ``preferred`` that divides ``hidden_dim``."""
    for h in range(min(preferred, hidden_dim), 0, -1):
        if hidden_dim % h == 0:
            return h
    return 1


def _dense_ids(graph_ids: Tensor) -> Tensor:
    """Graph ids relabelled to 0..G−1 (ids may be sparse, e.g. a MAG whose nodes all lack tokens):
    ``to_dense_batch`` would otherwise create all-padding rows, whose attention is NaN."""
    return torch.unique(graph_ids, return_inverse=True)[1]


def _transformer(hidden_dim: int, num_layers: int, num_heads: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        d_model=hidden_dim,
        nhead=_num_heads(hidden_dim, num_heads),
        dim_feedforward=2 * hidden_dim,
        dropout=dropout,
        batch_first=True,
        norm_first=True,
    )
    # enable_nested_tensor=False: the nested-tensor fast path changes numerics with padding and warns
    # with norm_first; the plain path gives a MAG the same output whatever else is in the batch.
    return nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)


def _attend_within_graphs(transformer: nn.TransformerEncoder, rows: Tensor, graph_ids: Tensor) -> Tensor:
    """Self-attention among the rows (nodes or tokens) of the same MAG; output in the input row order.

    A stable sort by graph id keeps each MAG's rows in their given order, ``to_dense_batch`` stacks the
    MAGs with a padding mask, and the result is scattered back, so ``graph_ids`` need not be sorted.
    """
    graph_ids = _dense_ids(graph_ids)
    order = torch.argsort(graph_ids, stable=True)
    dense, mask = to_dense_batch(rows[order], graph_ids[order])  # [G, Lmax, H], [G, Lmax]
    attended = transformer(dense, src_key_padding_mask=~mask)[mask]  # [L, H] in sorted order
    out = torch.empty_like(attended)
    out[order] = attended
    return out


class _AttentionEncoder(nn.Module):
    """Shared parameters of the attention encoders: input projection, Transformer encoder, classifier."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        num_classes: int = 2,
        dropout: float = 0.0,
        num_layers: int = 1,
        num_heads: int = 4,
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden_dim)
        self.transformer = _transformer(hidden_dim, num_layers, num_heads, dropout)
        self.classifier = nn.Linear(hidden_dim, num_classes)


class GCNEncoder(nn.Module):
    """Two-layer GCN + linear node classifier (paper Objective 3).

    ``H¹ = ReLU(Â H⁰ W⁰)``, ``H² = Â H¹ W¹``, logits ``= H² W_out + b``, with ``Â`` the symmetrically
    normalised adjacency with self-loops (``GCNConv`` defaults). For a directed ``edge_index`` PyG
    aggregates messages source → target and normalises by the (in-degree + 1) of the target nodes.
    """

    takes_tokens = False

    def __init__(self, in_dim: int, hidden_dim: int, num_classes: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = GCNConv(in_dim, hidden_dim)
        self.conv2 = GCNConv(hidden_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: Tensor, edge_index: Tensor, batch: Tensor | None = None) -> Tensor:
        """``x`` ``[N, D]``, ``edge_index`` ``[2, E]`` (batch-global node ids) → logits ``[N, C]``.

        ``batch`` is accepted for a uniform signature; message passing only follows ``edge_index``, and
        ``Batch.from_data_list`` never connects two MAGs, so graphs stay independent.
        """
        h = self.dropout(torch.relu(self.conv1(as_param_dtype(self, x), edge_index)))
        h = self.conv2(h, edge_index)
        return self.classifier(h)


class NodeAttentionEncoder(_AttentionEncoder):
    """Transformer over the node sequence of each MAG (edges ignored), then a linear node classifier.

    ``x → Linear(in, hidden) → TransformerEncoder`` (self-attention among the nodes of one MAG, key
    padding mask so MAGs of different sizes share a batch) ``→ Linear(hidden, C)``. No positional
    encoding: like the GCN, the encoder is equivariant to node order; who-said-what-when is only in the
    node texts.
    """

    takes_tokens = False

    def forward(self, x: Tensor, edge_index: Tensor | None, batch: Tensor) -> Tensor:
        """``x`` ``[N, D]``, ``edge_index`` (ignored), ``batch`` ``[N]`` graph id per node → ``[N, C]``.

        Output rows follow the input node order (``batch`` need not be sorted).
        """
        return self.classifier(_attend_within_graphs(self.transformer, self.proj(as_param_dtype(self, x)), batch))


class TokenAttentionEncoder(_AttentionEncoder):
    """Self-attention over the tokens of a whole MAG, pooled back per node, then a linear classifier.

    Each node contributes its real tokens (``token_mask``); the tokens of all nodes of one MAG are
    concatenated in node order into one sequence, projected to ``hidden_dim`` and run through a
    Transformer encoder (key padding mask between MAGs of different lengths). Every node is then
    represented by ``position_weighted_mean`` over its own token span and classified.
    Attention cost is quadratic in the total token count of a MAG.
    """

    takes_tokens = True

    def forward(self, token_states: Tensor, token_mask: Tensor, node_batch: Tensor) -> Tensor:
        """``token_states`` ``[B, T, D]`` (one row per node), ``token_mask`` ``[B, T]`` 1 on the node's own
        chain tokens, ``node_batch`` ``[B]`` MAG id per node → logits ``[B, C]`` in the input node order.

        Padding side is irrelevant: only masked positions are gathered, in increasing position order.
        """
        mask = token_mask.to(torch.bool)
        node_idx, pos_idx = torch.nonzero(mask, as_tuple=True)  # row-major: by node, then by position
        tokens = self.proj(as_param_dtype(self, token_states[node_idx, pos_idx]))  # [L, H], the linearisation of each MAG
        flat = _attend_within_graphs(self.transformer, tokens, node_batch[node_idx])
        per_node = flat.new_zeros(token_states.shape[0], token_states.shape[1], flat.shape[-1])
        per_node[node_idx, pos_idx] = flat
        return self.classifier(as_param_dtype(self, position_weighted_mean(per_node, mask)))  # pooled in fp32


def build_encoder(
    name: EncoderName, in_dim: int, hidden_dim: int, num_classes: int = 2, dropout: float = 0.0
) -> nn.Module:
    """Encoder by its ``params.yaml`` name (``train.encoder``): gcn | node_attention | token_attention."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; expected one of {sorted(ENCODERS)}")
    return ENCODER_CLASSES[name](in_dim, hidden_dim, num_classes=num_classes, dropout=dropout)


#: ``train.encoder`` name -> class, one entry per name of the registry (``magdi.names.ENCODERS``)
ENCODER_CLASSES: dict[str, type[nn.Module]] = {
    "gcn": GCNEncoder,
    "node_attention": NodeAttentionEncoder,
    "token_attention": TokenAttentionEncoder,
}
assert set(ENCODER_CLASSES) == set(ENCODERS), "magdi.names.ENCODERS and the encoder classes disagree"
