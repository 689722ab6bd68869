"""The one loader of everything the report reads: ``metrics/`` (eval, train, mags), the built MAGs and the
per-question predictions of every evaluation run (``runs/eval``), plus the run context :class:`Ctx`.

Every reader is crash-free: a missing or torn file is ``None`` / empty (with a warning when it exists but
cannot be read), so a stage that has not run yet becomes a "—" cell, never a crash.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from ..config import MT_METHOD, Params
from ..mag import MAG, read_mags
from ..pipeline.paths import eval_train_task, predictions_name, run_name
from .format import _num


def _read_predictions(path: Path) -> dict[str, dict] | None:
    if not path.is_file():
        return None
    out: dict[str, dict] = {}
    bad = 0
    for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("id"), str) and isinstance(row.get("correct"), bool):
            out[row["id"]] = row
        else:
            bad += 1
    if bad:
        warnings.warn(f"report: skipped {bad} unreadable line(s) of {path}", stacklevel=3)
    return out


def load_paper_numbers() -> dict[str, Any]:
    return yaml.safe_load((Path(__file__).parent.parent / "paper_numbers.yaml").read_text()) or {}


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        warnings.warn(f"report: skipping unreadable {path} ({e})", stacklevel=2)
        return None
    return obj if isinstance(obj, dict) else None


class Metrics:
    """Cached, crash-free access to ``metrics/``, the MAG files and the per-question predictions."""

    def __init__(self, metrics_dir: Path, mags_dir: Path, runs_dir: Path | None = None):
        self.metrics_dir, self.mags_dir = Path(metrics_dir), Path(mags_dir)
        self.runs_dir = None if runs_dir is None else Path(runs_dir)
        self._mags: dict[str, list[MAG]] = {}
        self._preds: dict[tuple[str, str], dict[str, dict] | None] = {}

    def predictions(self, method: str, task: str) -> dict[str, dict] | None:
        """The greedy predictions of ``method`` on ``task``, keyed by question id in file order; ``None`` when the
        run is absent. Rows are ``evaluate.Prediction`` dicts; a torn or foreign line is skipped with a warning."""
        key = (method, task)
        if key not in self._preds:
            self._preds[key] = None if self.runs_dir is None else _read_predictions(
                self.runs_dir / "eval" / eval_train_task(method, task) / method / predictions_name(task))
        return self._preds[key]

    def eval(self, method: str, task: str) -> dict | None:
        m = _read_json(self.metrics_dir / "eval" / method / f"{task}.json")
        return m if m is not None and _num(m.get("accuracy")) is not None else None

    def acc(self, method: str, task: str) -> float | None:
        m = self.eval(method, task)
        return None if m is None else _num(m["accuracy"])

    def train(self, method: str, task: str) -> dict | None:
        return _read_json(self.metrics_dir / "train" / method / f"{task}.json")

    def mag_stats(self, task: str) -> dict | None:
        return _read_json(self.metrics_dir / "mags" / f"{task}.json")

    def history(self, method: str, task: str) -> pd.DataFrame | None:
        path = self.metrics_dir / "train" / method / f"{task}_history.csv"
        if not path.is_file():
            return None
        try:
            df = pd.read_csv(path)
        except (OSError, ValueError, pd.errors.ParserError) as e:
            warnings.warn(f"report: skipping unreadable {path} ({e})", stacklevel=2)
            return None
        return df if {"step", "loss"} <= set(df.columns) and len(df) else None

    def mags(self, task: str) -> list[MAG]:
        if task not in self._mags:
            try:
                self._mags[task] = read_mags(self.mags_dir / f"{task}.jsonl")
            except (OSError, ValueError) as e:
                warnings.warn(f"report: skipping unreadable MAGs of {task} ({e})", stacklevel=2)
                self._mags[task] = []
        return self._mags[task]


@dataclass
class StudentRuns:
    """One base model of the student-scaling comparison: its zero-shot and MAGDi run names, the tasks it
    ran on, and its parameter count (from the evaluation metrics; ``None`` until it ran)."""

    label: str
    zero_shot: str
    magdi: str
    tasks: list[str]
    parameters: int | None = None


@dataclass
class Ctx:
    params: Params
    m: Metrics
    paper: dict[str, Any]
    #: results computed once per report and shared by several outputs (e.g. the significance tests)
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.params.experiments.tasks)

    @property
    def ood(self) -> list[str]:
        return list(self.params.experiments.ood_tasks)

    @property
    def abl_tasks(self) -> list[str]:
        return list(self.params.experiments.ablation_tasks)

    @property
    def ablations(self) -> dict[str, dict[str, Any]]:
        return dict(self.params.experiments.ablations)

    def main_methods(self) -> list[str]:
        out = ["zero_shot", *self.params.experiments.methods]
        if self.params.experiments.multitask:
            out.append(MT_METHOD)
        return list(dict.fromkeys(out))

    def students(self) -> list[StudentRuns]:
        """The student-scaling runs (Table 7 / Fig. 5): the main student on every task, then each of
        ``experiments.scaling_students`` on ``experiments.scaling_tasks``, ordered by parameter count."""
        ex = self.params.experiments
        out = [StudentRuns(self.student_name(), "zero_shot", "magdi", self.tasks)]
        out += [StudentRuns(s, run_name("zero_shot", s), run_name("magdi", s), list(ex.scaling_tasks))
                for s in ex.scaling_students]
        for r in out:
            for meth in (r.zero_shot, r.magdi):
                sizes = [m.get("student_parameters") for t in r.tasks if (m := self.m.eval(meth, t))]
                r.parameters = next((int(n) for n in sizes if isinstance(n, int | float)), r.parameters)
        return sorted(out, key=lambda r: (r.parameters is None, r.parameters or 0))

    def student_name(self) -> str:
        name = self.params.student.model.split("/")[-1]
        return name[: -len(".gguf")] if name.endswith(".gguf") else name

