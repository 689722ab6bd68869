"""Formatting shared by every table: percentages, CI cells, markdown tables, the Table/Section writer.

Our numbers and the paper's never share a section: :class:`Table` labels paper sections with
:data:`PAPER_LABEL`, and a missing value is always :data:`DASH`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from magdi.config import LossWeights

DASH = "—"
PAPER_LABEL = "paper (Mistral-7B-Instruct, reference only)"
OURS = "ours"
PARTIAL = "†"
PARTIAL_NOTE = f"{PARTIAL} Avg over the tasks available for that row only (some cells are missing)."
PAPER_NOTE = ("Paper numbers are transcribed from the MAGDi paper text (Mistral-7B-Instruct student, GPT-4/Bard/"
              "Claude2 teachers, 1K MAGs per task, full test sets): reference only, not comparable with ours.")


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


# ----------------------------------------------------------------------------- formatting


def per_task(values: dict[str, Any], fmt: str = "") -> str:
    """A setting that can differ by task, in one phrase: ``64`` when every task shares it, else ``100 on gsm8k, 64 on
    svamp`` (so a per-task size or recipe is never reported as one number)."""
    shown = {t: format(v, fmt) for t, v in values.items()}
    if len(set(shown.values())) <= 1:
        return next(iter(shown.values()), DASH)
    return ", ".join(f"{v} on {t}" for t, v in shown.items())


def loss_weights(weights: LossWeights) -> str:
    """``1/0.1/1``: the weights of L = w_ntp L_ntp + w_con L_contrastive + w_graph L_graph, in that order, as the
    report README and the repository README both print them."""
    w = weights.model_dump()
    return "/".join(f"{w[k]:g}" for k in ("ntp", "contrastive", "graph"))


def pct(x: float | None, digits: int = 1) -> str:
    """A fraction as a percentage string: 0.5 -> '50.0'."""
    return DASH if x is None else f"{100 * x:.{digits}f}"


def acc_ci(m: dict | None) -> str:
    """'41.7 [25.0, 58.3]' from an eval metrics dict (CI omitted when absent)."""
    if m is None or _num(m.get("accuracy")) is None:
        return DASH
    lo, hi = _num(m.get("ci95_low")), _num(m.get("ci95_high"))
    ci = f" [{pct(lo)}, {pct(hi)}]" if lo is not None and hi is not None else ""
    return pct(m["accuracy"]) + ci


def num(x: Any, fmt: str = ".1f") -> str:
    v = _num(x)
    return DASH if v is None else format(v, fmt)


def paper_num(x: Any, digits: int = 2) -> str:
    """A paper value with the paper's precision (2 decimals for accuracies, 1 for tokens)."""
    v = _num(x)
    return DASH if v is None else f"{v:.{digits}f}"


def _mean(xs: list[float | None]) -> tuple[float | None, bool]:
    """(mean of the present values, whether some were missing)."""
    vals = [x for x in xs if x is not None]
    return (sum(vals) / len(vals) if vals else None), len(vals) < len(xs)


def avg_cell(xs: list[float | None]) -> str:
    m, partial = _mean(xs)
    return DASH if m is None else pct(m) + (PARTIAL if partial else "")


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; first column left-aligned, the rest right-aligned; None -> '—'."""
    if not rows:
        return "_no data_\n"

    def cell(c: Any) -> str:
        return DASH if c is None or (isinstance(c, float) and math.isnan(c)) else str(c).replace("|", "\\|")

    body = [[cell(c) for c in r] for r in rows]
    head = [cell(h) for h in headers]
    w = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) + " |"

    sep = "|" + "|".join(("-" * (w[i] + 1) + ":") if i else (":" + "-" * (w[i] + 1)) for i in range(len(w))) + "|"
    return "\n".join([line(head), sep, *(line(r) for r in body)]) + "\n"


@dataclass
class Section:
    headers: list[str]
    rows: list[list[Any]]
    caption: str = ""
    paper: bool = False


@dataclass
class Table:
    name: str
    title: str
    sections: list[Section]
    csv_rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        out = [f"# {self.title}\n"]
        out += [f"- {n}" for n in self.notes]
        if self.notes:
            out.append("")
        for s in self.sections:
            head = f"## {PAPER_LABEL}" + (f": {s.caption}" if s.caption else "") if s.paper else \
                f"## {OURS}" + (f": {s.caption}" if s.caption else "")
            out += [head, "", md_table(s.headers, s.rows)]
        return "\n".join(out)

    def write(self, out_dir: Path) -> list[Path]:
        md, cs = out_dir / f"{self.name}.md", out_dir / f"{self.name}.csv"
        md.write_text(self.markdown())
        if self.csv_rows:
            cols: list[str] = []
            for r in self.csv_rows:
                cols += [k for k in r if k not in cols]
            df = pd.DataFrame(self.csv_rows, columns=cols)
            for c in cols:  # keep counts integral despite missing cells
                vals = [r[c] for r in self.csv_rows if r.get(c) is not None]
                if vals and all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
                    df[c] = df[c].astype("Int64")
            df.to_csv(cs, index=False)
        else:
            cs.write_text("source\n")
        return [md, cs]


def _r(x: float | None, scale: float = 100.0) -> float | None:
    return None if x is None else round(scale * x, 4)

