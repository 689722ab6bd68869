"""The names ``params.yaml`` may use for methods, structure encoders and graph kinds: one registry that the
configuration validates against (``magdi.config``) and the code dispatches on (``magdi.train.method_spec``,
``magdi.encoders.build_encoder``, ``magdi.mag.edges``), so a name cannot be valid in one and unknown in the other."""

from __future__ import annotations

from typing import Literal, get_args

#: methods by name (besides ``sit_<agent>``, one per teacher): the rows of the paper's Table 1; zero_shot is evaluated
#: untrained, the others each have a training recipe (``magdi.train.method_spec``)
PAPER_METHODS = ("zero_shot", "dss_mt", "magdi_r0", "magdi_cn", "magdi_an", "magdi")
#: beyond the paper: preference optimisation on MAGDi's (correct, incorrect) pairs. ``dpo``: L_ntp + L_DPO;
#: ``magdi_dpo``: MAGDi with L_DPO in place of the margin ranking loss (``magdi.losses.dpo_loss``)
BEYOND_PAPER_METHODS = ("dpo", "magdi_dpo")
BASE_METHODS = PAPER_METHODS + BEYOND_PAPER_METHODS
TRAINED_METHODS = BASE_METHODS[1:]
#: the structure encoder of L_graph (``train.encoder``)
EncoderName = Literal["gcn", "node_attention", "token_attention"]
ENCODERS: tuple[str, ...] = get_args(EncoderName)
#: MAG edges (``train.graph``): directed round r-1 -> r, undirected, fully connected
GraphKind = Literal["d", "ud", "fc"]
GRAPH_KINDS: tuple[str, ...] = get_args(GraphKind)
#: where the structure encoder's node inputs come from (``train.node_repr``)
NodeRepr = Literal["live", "frozen"]
