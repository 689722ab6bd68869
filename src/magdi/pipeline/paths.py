"""Where every artefact of a run lives (derived from ``params.paths`` so stages, tests and the report agree), and
the small helpers every stage shares."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..config import MT_METHOD, MT_TASK, Params

ZS_TASK = "base"  # the "training task" of the zero-shot run: the base model, no adapter


def bench_file(p: Params, task: str, split: str) -> Path:
    return Path(p.paths.data_dir) / task / f"{split}.jsonl"


def mags_file(p: Params, task: str) -> Path:
    return Path(p.paths.mags_dir) / f"{task}.jsonl"


def train_dir(p: Params, task: str, method: str) -> Path:
    return Path(p.paths.runs_dir) / "train" / task / method


def eval_dir(p: Params, task: str, method: str) -> Path:
    return Path(p.paths.runs_dir) / "eval" / task / method


def eval_train_task(method: str, task: str) -> str:
    """Which run evaluated ``method`` on ``task``: zero-shot and multi-task runs cover many tasks each."""
    return ZS_TASK if method_of(method) == "zero_shot" else MT_TASK if method == MT_METHOD else task


def run_name(method: str, student: str | None = None) -> str:
    """Name of a run in ``runs/`` and ``metrics/``: the method, plus ``@<student>`` for a scaling student."""
    return method if student is None else f"{method}@{_safe(student)}"


def method_of(run: str) -> str:
    """The method of a run name (``magdi@qwen`` -> ``magdi``): the inverse of :func:`run_name`."""
    return run.split("@", 1)[0]


def for_run(p: Params, method: str, student: str | None) -> tuple[Params, str]:
    """The params (that student's weights and recipe) and run name of ``method`` on a scaling student, or as
    given for the main student (``student`` None)."""
    return p.for_student(student), run_name(method, student)


def predictions_name(task: str, k: int = 1) -> str:
    """File name of the per-question predictions of one task (``_sc<k>``: the self-consistency decode)."""
    return f"predictions_{task}{f'_sc{k}' if k > 1 else ''}.jsonl"


def metrics_file(task: str, method: str, kind: str = "eval") -> Path:
    """Git-tracked metrics (``dvc metrics show``): ``metrics/<kind>/<method>/<task>.json``."""
    return Path("metrics") / kind / method / f"{task}.json"


def history_file(task: str, method: str) -> Path:
    """Git-tracked per-step training losses (``dvc plots``)."""
    return Path("metrics") / "train" / method / f"{task}_history.csv"


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _set_threads() -> None:
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("MAGDI_THREADS", os.cpu_count() or 1))))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def gguf_file(p: Params, name: str) -> Path:
    """Where ``prepare_student`` puts the assembled GGUF of ``models.<name>``."""
    return Path(p.paths.gguf_dir) / f"{_safe(name)}.gguf"


def model_source(p: Params, spec: str) -> str:
    """A model reference from params -> what ``convert_student``/``load_gguf_model`` accept."""
    if spec in p.models:
        return f"gguf:{gguf_file(p, spec)}"
    return spec


def student_info(p: Params) -> dict[str, Any]:
    """Which base model a run used and its size (from ``prepare_student``'s record), for Table 7 / Fig. 5."""
    path = Path(p.paths.student_dir) / "magdi_student.json"
    n = json.loads(path.read_text())["parameters"] if path.is_file() else None
    return {"student": p.student.model, "student_parameters": n}


def load_examples(p: Params, task: str, split: str) -> list[dict]:
    from ..data import read_jsonl

    path = bench_file(p, task, split)
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: task '{task}' was skipped by `download` (see {p.paths.data_dir}/summary.json)")
    return read_jsonl(path)


def log_precision(what: str, prec) -> None:
    """One line at start-up saying which precision runs and why (``magdi.precision``)."""
    print(f"precision: {what} {prec.reason}", file=sys.stderr, flush=True)
