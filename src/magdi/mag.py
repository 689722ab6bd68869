"""Multi-Agent Interaction Graphs: data model, edges, storage, PyG conversion and statistics (the official
release's importer: ``magdi.official``).

A MAG holds one node per (agent, round) that actually happened. Rounds that did not happen because the
agents reached consensus are *absent*, not placeholder nodes (the official release keeps them as "None"
texts with label 2, and pads MAGs without negatives with "NA"; we never invent nodes or negatives).
"""

from __future__ import annotations

import json
import os
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .names import GRAPH_KINDS


@dataclass
class Node:
    agent: str
    round: int
    reasoning: str
    answer: str | None
    confidence: float
    correct: bool
    n_tokens: int = 0
    #: False when the reply could not be parsed after retries: kept (it *is* a wrong chain) and flagged.
    valid: bool = True
    #: :func:`tail_compression` of the raw reply (None: not measured, e.g. MAGs imported or built before it):
    #: tells a reply cut at the limit while still reasoning from a repetition loop no limit would end.
    tail_compression: float | None = None

    @property
    def label(self) -> int:
        return int(self.correct)


@dataclass
class MAG:
    id: str
    task: str
    question: str
    gold: str
    nodes: list[Node]
    choices: list[str] | None = None
    team_answer: str | None = None
    team_correct: bool | None = None
    consensus: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_rounds(self) -> int:
        """Number of discussion rounds after round 0 (0 when all agents agreed at once)."""
        return max((n.round for n in self.nodes), default=0)

    @property
    def graph_type(self) -> str:
        """Paper Table 12: G0 = no discussion, G1..G3 = 1..3 rounds of discussion."""
        return f"G{self.n_rounds}"

    def node_index(self) -> dict[tuple[str, int], int]:
        return {(n.agent, n.round): i for i, n in enumerate(self.nodes)}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MAG:
        """A MAG from its JSON object; ``TypeError``/``KeyError`` when a field is missing or mistyped."""
        if not isinstance(d, dict):
            raise TypeError(f"expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        nodes = d.pop("nodes")
        if not isinstance(nodes, list) or not all(isinstance(n, dict) for n in nodes):
            raise TypeError("'nodes' must be a list of objects")
        mag = cls(nodes=[Node(**n) for n in nodes], **d)
        _check_types(mag)
        return mag


_STR, _OPT_STR, _BOOL = (str,), (str, type(None)), (bool,)
_MAG_TYPES = {"id": _STR, "task": _STR, "question": _STR, "gold": _STR, "choices": (list, type(None)),
              "team_answer": _OPT_STR, "team_correct": (bool, type(None)), "consensus": _BOOL, "meta": (dict,)}
_NODE_TYPES = {"agent": _STR, "round": (int,), "reasoning": _STR, "answer": _OPT_STR,
               "confidence": (int, float), "correct": _BOOL, "n_tokens": (int,), "valid": _BOOL,
               "tail_compression": (int, float, type(None))}


def _check_types(mag: MAG) -> None:
    """Reject records whose fields have the wrong JSON type (a file edited by hand, or not a MAG file)."""
    for obj, types, where in [(mag, _MAG_TYPES, "")] + [(n, _NODE_TYPES, f"nodes[{i}].")
                                                      for i, n in enumerate(mag.nodes)]:
        for name, allowed in types.items():
            value = getattr(obj, name)
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise TypeError(f"field '{where}{name}' is {type(value).__name__}")
    if mag.choices is not None and not all(isinstance(c, str) for c in mag.choices):
        raise TypeError("field 'choices' must be a list of strings")


def edges(mag: MAG, kind: str = "d") -> list[tuple[int, int]]:
    """Edge list (src, dst) over node indices.

    d  : every node of round r-1 -> every node of round r (agent j's round-r answer saw all round r-1 answers)
    ud : the d edges in both directions
    fc : every ordered pair of distinct nodes
    """
    if kind not in GRAPH_KINDS:
        raise ValueError(f"graph kind must be one of {GRAPH_KINDS}, got {kind!r}")
    n = len(mag.nodes)
    if kind == "fc":
        return [(i, j) for i in range(n) for j in range(n) if i != j]
    by_round: dict[int, list[int]] = {}
    for i, node in enumerate(mag.nodes):
        by_round.setdefault(node.round, []).append(i)
    d = [(i, j) for r in sorted(by_round) if r - 1 in by_round for i in by_round[r - 1] for j in by_round[r]]
    return d + [(j, i) for i, j in d] if kind == "ud" else d


def to_pyg(mag: MAG, kind: str = "d"):
    """A ``torch_geometric.data.Data`` with node labels ``y`` and ``edge_index``; features come later."""
    import torch
    from torch_geometric.data import Data

    e = edges(mag, kind)
    edge_index = torch.tensor(e, dtype=torch.long).t().contiguous() if e else torch.zeros(2, 0, dtype=torch.long)
    y = torch.tensor([n.label for n in mag.nodes], dtype=torch.long)
    return Data(edge_index=edge_index, y=y, num_nodes=len(mag.nodes))


# ----------------------------------------------------------------------------- storage


def write_mags(path: Path, mags: Iterable[MAG]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for m in mags:
            f.write(json.dumps(m.to_json(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _repair_tail(path: Path) -> None:
    """A run killed mid-append leaves a last line without its newline: complete it when it is a whole
    record, else cut it off, so that the next append does not glue a new record onto a torn one."""
    if not path.exists():
        return
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:])
            f.write(b"\n")
        except ValueError:
            f.truncate(start)
        f.flush()
        os.fsync(f.fileno())


def append_mag(path: Path, mag: MAG) -> None:
    """Durable append: a MAG is either fully on disk or not at all after a crash (reader skips a torn line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(path)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(mag.to_json(), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def iter_mags(path: Path, strict: bool = False) -> Iterator[MAG]:
    """Read MAG JSONL; a torn last line (killed mid-write) is skipped, any other bad line is an error."""
    # Split on b"\n" only: str.splitlines() also splits on U+2028, U+0085 etc., which json.dumps leaves
    # unescaped (ensure_ascii=False) inside model text. Decode per line, so that a last line torn in the
    # middle of a multi-byte character is skipped like any other torn line.
    lines = path.read_bytes().split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for i, raw in enumerate(lines, 1):
        torn_ok = i == len(lines) and not strict
        try:
            line = raw.decode("utf-8")
            if not line.strip():
                continue
            mag = MAG.from_json(json.loads(line))
        except (ValueError, TypeError, KeyError, RecursionError) as e:  # JSON/UTF-8 errors are ValueErrors
            if torn_ok and isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
                continue
            raise ValueError(f"{path}:{i}: not a MAG record ({type(e).__name__}: {str(e)[:200]})") from None
        yield mag


def read_mags(path: Path) -> list[MAG]:
    return list(iter_mags(path)) if path.exists() else []


# ----------------------------------------------------------------------------- statistics (Table 12)


def mag_stats(mags: list[MAG]) -> dict[str, Any]:
    """Counts along the paper's three dimensions: rounds, agents, graph types; plus label balance."""
    per_round: Counter[int] = Counter()
    per_agent: Counter[str] = Counter()
    per_agent_correct: Counter[str] = Counter()
    per_type: Counter[str] = Counter()
    pos = neg = invalid = 0
    for m in mags:
        per_type[m.graph_type] += 1
        for n in m.nodes:
            per_round[n.round] += 1
            per_agent[n.agent] += 1
            per_agent_correct[n.agent] += int(n.correct)
            pos += int(n.correct)
            neg += int(not n.correct)
            invalid += int(not n.valid)
    return {
        "n_mags": len(mags),
        "n_nodes": pos + neg,
        "positive_nodes": pos,
        "negative_nodes": neg,
        "invalid_nodes": invalid,
        "nodes_per_round": {f"round_{r}": c for r, c in sorted(per_round.items())},
        "nodes_per_agent": dict(sorted(per_agent.items())),
        "agent_node_accuracy": {a: per_agent_correct[a] / per_agent[a] for a in sorted(per_agent)},
        "graph_types": {g: per_type.get(g, 0) for g in sorted(set(per_type) | {"G0", "G1", "G2", "G3"})},
        "mags_with_pos_and_neg": sum(1 for m in mags if {n.correct for n in m.nodes} == {True, False}),
    }


#: a reply whose last ``LOOP_TAIL_CHARS`` characters compress below ``LOOP_RATIO`` of their size is a loop.
#: Measured on the committed teacher replies (teacher_cache/, replies of >= 600 characters): finished
#: replies compress to 0.25-0.6 (1st percentile 0.34-0.36 for the Qwen teachers), replies looping over one
#: sentence to 0.03-0.3.
LOOP_TAIL_CHARS, LOOP_RATIO = 600, 0.3


def tail_compression(text: str, tail_chars: int = LOOP_TAIL_CHARS) -> float:
    """zlib-compressed size / raw size of the last ``tail_chars`` characters of ``text`` (UTF-8).

    Small teachers often end in a loop ("The answer is 44. The answer is 45. ...", "8888...") that runs until
    the token limit; such a reply is cut at any limit, so the share of cut replies alone cannot say whether a
    larger ``max_new_tokens`` would help. Repetition is what a compressor removes, whatever the unit that
    repeats (words, counting numbers, single characters), and only the tail matters: a loop that began late
    still fills it.
    """
    raw = text[-tail_chars:].encode("utf-8")
    return len(zlib.compress(raw, 9)) / len(raw) if raw else 1.0


def is_loop(node: Node) -> bool:
    """Whether a node's raw reply ends in a repetition loop (:data:`LOOP_RATIO`).

    Nodes built before ``tail_compression`` was recorded (or imported from the official release, which keeps
    no raw reply) carry ``None`` and count as no loop: unknown is never reported as a loop.
    """
    return node.tail_compression is not None and node.tail_compression < LOOP_RATIO


def length_stats(mags: list[MAG], limits: dict[str, int]) -> dict[str, Any]:
    """Teacher reply lengths per agent, the share that hit the agent's ``max_new_tokens`` (cut off), and how
    many of those were repetition loops.

    A reply of exactly the limit is counted as cut: the decoder stopped because of the limit, so its answer
    line may be missing. ``looping_fraction``: cut and looping (:func:`is_loop`; a larger limit only makes
    the loop longer); ``cut_reasoning_fraction``: cut without a detected loop, at most the replies a larger
    limit would let finish. This is what the generation limits in ``params.yaml`` are chosen from.
    """
    by_agent: dict[str, list[Node]] = {}
    for m in mags:
        for n in m.nodes:
            if n.agent in limits:
                by_agent.setdefault(n.agent, []).append(n)
    out: dict[str, Any] = {}
    for agent, nodes in sorted(by_agent.items()):
        s = sorted(n.n_tokens for n in nodes)
        cut = [n for n in nodes if n.n_tokens >= limits[agent]]
        loops = sum(is_loop(n) for n in cut)
        out[agent] = {"n": len(s), "median": s[len(s) // 2], "p95": s[min(len(s) - 1, int(0.95 * len(s)))],
                      "max": s[-1], "limit": limits[agent], "truncated_fraction": len(cut) / len(s),
                      "looping_fraction": loops / len(s), "cut_reasoning_fraction": (len(cut) - loops) / len(s)}
    total = sum(v["n"] for v in out.values())

    def pooled(key: str) -> float:
        return sum(v[key] * v["n"] for v in out.values()) / total if total else 0.0

    return {"per_agent": out, "truncated_fraction": pooled("truncated_fraction"),
            "looping_fraction": pooled("looping_fraction"), "cut_reasoning_fraction": pooled("cut_reasoning_fraction")}


def draw_mag(mag: MAG, path: Path, kind: str = "d") -> None:
    """Fig. 2 style: rounds left to right, agents top to bottom, green = correct, red = incorrect."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = sorted({n.agent for n in mag.nodes})
    pos = {i: (n.round, -agents.index(n.agent)) for i, n in enumerate(mag.nodes)}
    fig, ax = plt.subplots(figsize=(2.6 * (mag.n_rounds + 1) + 1.5, 1.2 * len(agents) + 1.2))
    for s, d in edges(mag, kind):
        (x0, y0), (x1, y1) = pos[s], pos[d]
        ax.annotate("", xy=(x1 - 0.12, y1), xytext=(x0 + 0.12, y0),
                    arrowprops={"arrowstyle": "->", "color": "0.6", "lw": 0.8})
    for i, n in enumerate(mag.nodes):
        x, y = pos[i]
        ax.scatter([x], [y], s=700, color="#2e9e4f" if n.correct else "#d1453b", zorder=3,
                   edgecolors="black", linewidths=0.5 if n.valid else 2.0)
        ax.text(x, y - 0.38, f"{(n.answer or '∅')[:14]}", ha="center", fontsize=7)
    ax.set_yticks([-i for i in range(len(agents))], agents)
    ax.set_xticks(range(mag.n_rounds + 1), [f"round {r}" for r in range(mag.n_rounds + 1)])
    ax.set_xlim(-0.6, mag.n_rounds + 0.6)
    ax.set_ylim(-len(agents) + 0.4, 0.6)
    q = mag.question if len(mag.question) < 90 else mag.question[:87] + "..."
    ax.set_title(f"{mag.task} · {mag.graph_type} · gold {mag.gold}\n{q}", fontsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    from matplotlib.lines import Line2D

    def key(color: str, width: float, label: str) -> Line2D:
        return Line2D([], [], marker="o", ls="", ms=9, markerfacecolor=color, markeredgecolor="black",
                      markeredgewidth=width, label=label)

    ax.legend(handles=[key("#2e9e4f", 0.5, "correct"), key("#d1453b", 0.5, "incorrect"),
                       key("white", 2.0, "invalid reply (thick rim; no parsable answer)"),
                       Line2D([], [], ls="", label="∅ = no answer given")],
              loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.08 / max(1, len(agents))), ncol=2, fontsize=7,
              frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
