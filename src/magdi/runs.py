"""Every run the pipeline defines, with its fully resolved configuration (``python -m magdi show-runs``).

A run is one DVC stage of ``dvc.yaml`` (matrix stages expanded as DVC expands them: ``train@gsm8k-magdi``), read
back from its command line (``--task``, ``--method``, ``--student``) and resolved the way the stage resolves it:
``train``, then ``experiments.scaling_train`` for a scaling student, then the task's ``experiments.task_train``
entry, then the ablation's overrides (``Params.train_for``). Given ``-S key=value`` edits in DVC's syntax, the
runs whose resolved configuration they change are listed, so a user sees what an edit does before paying for it.
"""

from __future__ import annotations

import copy
import itertools
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import MT_METHOD, MT_TASK, ConfigError, Params, check_stage_params, parse_params

_REF = re.compile(r"\$\{\s*([A-Za-z0-9_.]+)\s*\}")


@dataclass(frozen=True)
class Run:
    """One stage of the pipeline and what it resolves to."""

    stage: str                      # DVC's address, e.g. ``train@gsm8k-magdi``
    kind: str                       # train | evaluate | other
    task: str | None
    method: str | None
    student: str | None
    base_method: str | None = None
    train: dict[str, Any] | None = None       # the resolved ``train`` settings (training runs)
    evaluate: dict[str, Any] | None = None    # the evaluation settings (evaluation runs)
    trains: tuple[str, ...] = field(default_factory=tuple)  # training stages whose adapter it evaluates

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "kind": self.kind, "task": self.task, "method": self.method,
                "student": self.student, "base_method": self.base_method, "train": self.train,
                "evaluate": self.evaluate, "trains": list(self.trains)}


def _lookup(raw: dict[str, Any], dotted: str) -> Any:
    cur: Any = raw
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise ConfigError(f"dvc.yaml refers to ${{{dotted}}}, which params has not")
        cur = cur[part]
    return cur


def expand_stages(dvc: dict[str, Any], raw: dict[str, Any]) -> list[tuple[str, str]]:
    """``(stage address, command)`` of every stage, matrix stages expanded as DVC does
    (``dvc.parsing.MatrixDefinition.normalized_iterable``: the product of the matrix lists in key order, named
    ``<stage>@<v1>-<v2>``; a mapping iterates over its keys)."""
    out = []
    for name, st in (dvc.get("stages") or {}).items():
        cmd = st["cmd"] if isinstance(st["cmd"], str) else " && ".join(st["cmd"])
        if "matrix" not in st:
            out.append((name, cmd))
            continue
        axes = {}
        for key, spec in st["matrix"].items():
            m = _REF.fullmatch(spec.strip()) if isinstance(spec, str) else None
            vals = _lookup(raw, m.group(1)) if m else spec
            axes[key] = list(vals)
        for combo in itertools.product(*axes.values()):
            item = dict(zip(axes, combo, strict=True))
            address = f"{name}@{'-'.join(str(v) for v in combo)}"
            out.append((address, _substitute_items(cmd, item)))
    return out


def _substitute_items(cmd: str, item: dict[str, Any]) -> str:
    """``${item.<key>}`` in a matrix stage's command replaced by that stage's values."""
    return _REF.sub(lambda m: str(item[m.group(1)[5:]]) if m.group(1).startswith("item.") else m.group(0), cmd)


def _args(cmd: str) -> dict[str, Any]:
    words = shlex.split(cmd)
    out: dict[str, Any] = {"script": next((w for w in words if w.startswith("stages/")), None)}
    for flag in ("--task", "--method", "--student"):
        if flag in words:
            out[flag[2:]] = words[words.index(flag) + 1]
    out["zero_shot"], out["multitask"] = "--zero-shot" in words, "--multitask" in words
    return out


def resolve_runs(p: Params, dvc: dict[str, Any], raw: dict[str, Any]) -> list[Run]:
    """Every stage of ``dvc`` under params ``p`` (``raw`` is the same params as a mapping, for the matrices)."""
    runs = []
    for address, cmd in expand_stages(dvc, raw):
        a = _args(cmd)
        student = a.get("student")
        if a["script"] == "stages/train.py":
            task, method = a["task"], a["method"]
            q = p.for_student(student)
            base, cfg = q.train_for("magdi" if method == MT_METHOD else method, None if task == MT_TASK else task)
            runs.append(Run(address, "train", task, method, student, base, cfg.model_dump()))
        elif a["script"] == "stages/evaluate.py":
            q = p.for_student(student)
            ev = {**q.evaluate.model_dump(), "generation_dtype": q.student.generation_dtype}
            if a["zero_shot"]:
                runs.append(Run(address, "evaluate", None, "zero_shot", student, "zero_shot", evaluate=ev))
                continue
            task = MT_TASK if a["multitask"] else a["task"]
            method = MT_METHOD if a["multitask"] else a["method"]
            run = method if student is None else f"{method}@{student}"
            trains = tuple(r.stage for r in runs if r.kind == "train" and r.task == task
                           and (r.method if r.student is None else f"{r.method}@{r.student}") == run)
            runs.append(Run(address, "evaluate", task, method, student, evaluate=ev, trains=trains))
        else:
            runs.append(Run(address, "other", None, None, None))
    return runs


def set_key(raw: dict[str, Any], assignment: str) -> dict[str, Any]:
    """``raw`` with one DVC-style ``-S key=value`` edit (``[params.yaml:]a.b.c=value``, the value read as YAML,
    as DVC reads it) applied; a missing intermediate mapping is created, as DVC does."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"-S {assignment!r}: expected key=value")
    if ":" in key:
        file, _, key = key.partition(":")
        if Path(file).name not in ("params.yaml", "params.paper.yaml"):
            raise ConfigError(f"-S {assignment!r}: only params files are resolved here")
    out = copy.deepcopy(raw)
    cur = out
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(cur.get(part, {}), dict):
            raise ConfigError(f"-S {assignment!r}: '{part}' is not a mapping")
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = yaml.safe_load(value)
    return out


def load(params_path: str | Path = "params.yaml", dvc_path: str | Path = "dvc.yaml",
         edits: list[str] | None = None) -> tuple[list[Run], Params]:
    """The runs of ``dvc_path`` under ``params_path`` with ``edits`` applied, validated as a stage would."""
    raw = yaml.safe_load(Path(params_path).read_text(encoding="utf-8")) or {}
    for e in edits or []:
        raw = set_key(raw, e)
    p = parse_params(raw, Path(params_path).name)
    check_stage_params(p, Path(params_path).name)
    dvc = yaml.safe_load(Path(dvc_path).read_text(encoding="utf-8"))
    return resolve_runs(p, dvc, raw), p


def _flat(d: dict[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changes(before: list[Run], after: list[Run]) -> dict[str, list[str]]:
    """Stage -> what an edit changes in it: the settings whose resolved value differs (``train.lr: 0.0001 ->
    0.001``), ``added``/``removed`` for stages the edit creates or drops, and ``retrained: <stage>`` for an
    evaluation whose adapter comes from a changed training run."""
    old = {r.stage: r for r in before}
    new = {r.stage: r for r in after}
    out: dict[str, list[str]] = {}
    for s in new.keys() - old.keys():
        out[s] = ["added"]
    for s in old.keys() - new.keys():
        out[s] = ["removed"]
    for s in new.keys() & old.keys():
        diff = []
        for section in ("train", "evaluate"):
            a, b = _flat(getattr(old[s], section)), _flat(getattr(new[s], section))
            diff += [f"{section}.{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
        if diff:
            out[s] = diff
    for s in new.keys() & old.keys():
        upstream = [t for t in new[s].trains if t in out]
        if upstream and s not in out:
            out[s] = [f"retrained: {t}" for t in upstream]
    return dict(sorted(out.items()))


#: the settings a run table shows (the rest are in --json)
SHOWN = ("lr", "epochs", "weights", "graph", "encoder", "node_repr", "bf16", "max_mags", "exclude_graph_types")


def table(runs: list[Run]) -> str:
    """The training runs as a text table (stage, student, base method and the settings of :data:`SHOWN`)."""
    rows = [("stage", "student", "base", *SHOWN)]
    for r in runs:
        if r.kind == "train" and r.train:
            w = r.train["weights"]
            vals = {**r.train, "weights": f"{w['ntp']:g}/{w['contrastive']:g}/{w['graph']:g}"}
            rows.append((r.stage, r.student or "-", r.base_method or "-", *(str(vals[k]) for k in SHOWN)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)
