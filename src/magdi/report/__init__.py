"""The paper's tables and figures, regenerated from the pipeline's metrics (the DVC ``report`` stage).

Every number of ours is read from ``metrics/`` (eval, train, mags) or from the built MAGs; nothing is typed
here. The paper's numbers (``paper_numbers.yaml``) only ever appear in sections and CSV rows labelled
:data:`PAPER_LABEL`. A missing metrics file (task skipped, method not in params, stage not run yet) is a
"—" cell, never a crash.

Layout: ``loader`` (the one reader of metrics, MAGs and predictions), ``format`` (cells, markdown tables),
``tables`` (one function per paper table), ``figures``, ``stats`` (paired significance tests), ``pages`` (the
HTML MAG browser and predictions pages), ``readme``.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Params
from .figures import fig2, fig4, fig5, fig6, training_curves
from .format import DASH, OURS, PAPER_LABEL, acc_ci, md_table, pct
from .loader import Ctx, Metrics, load_paper_numbers
from .pages import write_pages
from .readme import write_readme
from .stats import write_significance
from .tables import (
    table1,
    table2,
    table3,
    table4,
    table5,
    table6,
    table7,
    table9,
    table10,
    table12,
    table13,
    training_runs,
)


def build_report(params: Params, out_dir: Path, metrics_dir: Path = Path("metrics"),
                 mags_dir: Path | None = None, runs_dir: Path | None = None) -> list[Path]:
    """Write every table (markdown + CSV), figure (PNG), the significance tests, the HTML pages and the README
    to ``out_dir``; return their paths. Per-question data comes from ``runs_dir`` (``paths.runs_dir``)."""
    from ..launch import single_process

    single_process("report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = Metrics(Path(metrics_dir), Path(mags_dir or params.paths.mags_dir), Path(runs_dir or params.paths.runs_dir))
    ctx = Ctx(params, m, load_paper_numbers())
    files: list[Path] = []
    for make in (table1, table2, table3, table4, table5, table6, table7, table9, table10, table12, table13,
                 training_runs):
        files += make(ctx).write(out_dir)
    files += write_significance(ctx, out_dir)
    for fig in (fig2, fig4, fig5, fig6, training_curves):
        files.append(fig(ctx, out_dir))
    files += write_pages(ctx, out_dir)
    files.append(write_readme(ctx, out_dir, files))
    return files


__all__ = ["PAPER_LABEL", "DASH", "build_report", "load_paper_numbers", "md_table", "pct", "acc_ci", "OURS"]
