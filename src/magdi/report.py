"""The paper's tables and figures, regenerated from the pipeline's metrics (the DVC ``report`` stage).

Every number of ours is read from ``metrics/`` (eval, train, mags) or from the built MAGs; nothing is typed
here. The paper's numbers (``paper_numbers.yaml``) only ever appear in sections and CSV rows labelled
:data:`PAPER_LABEL`. A missing metrics file (task skipped, method not in params, stage not run yet) is a
"—" cell, never a crash.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .config import Params
from .mag import MAG, draw_mag, read_mags

DASH = "—"
PAPER_LABEL = "paper (Mistral-7B-Instruct, reference only)"
OURS = "ours"
MT_METHOD = "magdi_mt"
PARTIAL = "†"
PARTIAL_NOTE = f"{PARTIAL} Avg over the tasks available for that row only (some cells are missing)."
PAPER_NOTE = ("Paper numbers are transcribed from the MAGDi paper text (Mistral-7B-Instruct student, GPT-4/Bard/"
              "Claude2 teachers, 1K MAGs per task, full test sets): reference only, not comparable with ours.")


def load_paper_numbers() -> dict[str, Any]:
    return yaml.safe_load(Path(__file__).with_name("paper_numbers.yaml").read_text()) or {}


# ----------------------------------------------------------------------------- reading metrics


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        warnings.warn(f"report: skipping unreadable {path} ({e})", stacklevel=2)
        return None
    return obj if isinstance(obj, dict) else None


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


class Metrics:
    """Cached, crash-free access to ``metrics/`` and the MAG files."""

    def __init__(self, metrics_dir: Path, mags_dir: Path):
        self.metrics_dir, self.mags_dir = Path(metrics_dir), Path(mags_dir)
        self._mags: dict[str, list[MAG]] = {}

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


# ----------------------------------------------------------------------------- formatting


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


# ----------------------------------------------------------------------------- context


@dataclass
class Ctx:
    params: Params
    m: Metrics
    paper: dict[str, Any]

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

    def student_name(self) -> str:
        name = self.params.student.model.split("/")[-1]
        return name[: -len(".gguf")] if name.endswith(".gguf") else name


def _acc_row(ctx: Ctx, method: str, tasks: list[str], label: str | None = None,
             with_avg: bool = True) -> tuple[list[Any], dict[str, Any]]:
    """(markdown row, CSV row) of accuracies with CIs for one method."""
    row: list[Any] = [label or method]
    rec: dict[str, Any] = {"method": method, "source": OURS}
    accs = []
    for t in tasks:
        m = ctx.m.eval(method, t)
        row.append(acc_ci(m))
        a = None if m is None else _num(m["accuracy"])
        accs.append(a)
        rec[t] = _r(a)
        rec[f"{t}_ci_low"] = _r(_num(m.get("ci95_low"))) if m else None
        rec[f"{t}_ci_high"] = _r(_num(m.get("ci95_high"))) if m else None
        rec[f"{t}_n"] = m.get("n") if m else None
    if with_avg:
        row.append(avg_cell(accs))
        mean, _ = _mean(accs)
        rec["avg"] = _r(mean)
        rec["avg_n_tasks"] = sum(a is not None for a in accs)
    return row, rec


def _paper_rows(rows: dict[str, dict], cols: list[str], label_col: bool = True) -> tuple[list, list]:
    md, recs = [], []
    for key, vals in rows.items():
        lab = f"{key} ({vals['label']})" if label_col and "label" in vals else key
        md.append([lab, *(paper_num(vals.get(c)) for c in cols)])
        recs.append({"method": key, "source": PAPER_LABEL, **{c: vals.get(c) for c in cols}})
    return md, recs


def _paper_task_cols(rows: dict[str, dict], extra: tuple[str, ...] = ("avg",)) -> list[str]:
    cols: list[str] = []
    for vals in rows.values():
        cols += [k for k in vals if k not in cols and k != "label"]
    return [c for c in cols if c not in extra] + [c for c in extra if c in cols]


# ----------------------------------------------------------------------------- tables


def table1(ctx: Ctx) -> Table:
    rows, recs = [], []
    for meth in ctx.main_methods():
        r, rec = _acc_row(ctx, meth, ctx.tasks)
        rows.append(r)
        recs.append(rec)
    secs = [Section(["method", *ctx.tasks, "Avg"], rows,
                    f"student {ctx.student_name()}, accuracy % [95% bootstrap CI]")]
    p = ctx.paper.get("table1_main", {})
    if p:
        cols = _paper_task_cols(p, ("avg", "avg_gain"))
        prow, precs = _paper_rows(p, cols)
        secs.append(Section(["method", *cols], prow, "Table 1, accuracy %; avg_gain = [+x%] over SiT-GPT4",
                            paper=True))
        recs += precs
    return Table("table1_main", "Table 1: main results (methods × tasks)", secs, recs,
                 [f"Rows in params order: zero_shot, experiments.methods, {MT_METHOD} (multi-task).",
                  "Cells: accuracy % on the test split [95% bootstrap CI]; — = metrics file missing.",
                  PARTIAL_NOTE, PAPER_NOTE])


def table2(ctx: Ctx) -> Table:
    rows, recs, tt, st = [], [], [], []
    for t in ctx.tasks:
        stats, ev = ctx.m.mag_stats(t), ctx.m.eval("magdi", t)
        teach = _num(stats.get("teacher_tokens_per_question")) if stats else None
        stud = _num(ev.get("mean_tokens")) if ev else None
        red = teach / stud if teach is not None and stud else None
        rows.append([t, num(teach), num(stud), DASH if red is None else f"{red:.1f}x"])
        recs.append({"task": t, "source": OURS, "reconcile_tokens": teach, "magdi_tokens": stud, "reduction": red})
        if teach is not None and stud is not None:
            tt.append(teach)
            st.append(stud)
    if tt:
        at, ast = sum(tt) / len(tt), sum(st) / len(st)
        red = at / ast if ast else None
        rows.append([f"Avg ({len(tt)} tasks)", num(at), num(ast), DASH if red is None else f"{red:.1f}x"])
        recs.append({"task": "avg", "source": OURS, "reconcile_tokens": at, "magdi_tokens": ast, "reduction": red})
    secs = [Section(["task", "ReConcile teachers (tokens/question)", "MAGDi student (tokens/question)",
                     "reduction"], rows, f"teachers = params.teachers.agents, student {ctx.student_name()}")]
    p = ctx.paper.get("table2_tokens", {})
    if p:
        prow = [[k, paper_num(v.get("reconcile"), 1), paper_num(v.get("magdi"), 1),
                 f"{paper_num(v.get('reduction'), 1)}x"] for k, v in p.items()]
        secs.append(Section(["task", "ReConcile", "MAGDi", "reduction"], prow, "Table 2, tokens per question",
                            paper=True))
        recs += [{"task": k, "source": PAPER_LABEL, "reconcile_tokens": v.get("reconcile"),
                  "magdi_tokens": v.get("magdi"), "reduction": v.get("reduction")} for k, v in p.items()]
    p10 = ctx.paper.get("table10_tokens_accuracy", {})
    if p10:
        cols = _paper_task_cols(p10)
        prow = [[k, *(paper_num(v.get(c), 1) for c in cols)] for k, v in p10.items()]
        secs.append(Section(["row", *cols], prow, "Table 10, per-dataset tokens and accuracy %", paper=True))
    return Table("table2_tokens", "Table 2: inference tokens, ReConcile teachers vs MAGDi student", secs, recs,
                 ["Teachers: all output tokens of all agents over all rounds of one discussion (MAG), averaged "
                  "over the training questions (metrics/mags teacher_tokens_per_question). The offline "
                  "`reference` agent counts words+4 of the dataset explanation.",
                  "Student: mean generated tokens per test question (metrics/eval/magdi mean_tokens), student "
                  "tokenizer; teachers and student may use different tokenizers.",
                  "Avg row: tasks with both numbers; reduction = avg teacher tokens / avg student tokens.",
                  PAPER_NOTE])


def _round0_acc(mags: list[MAG], agent: str) -> float | None:
    nodes = [n for m in mags for n in m.nodes if n.agent == agent and n.round == 0]
    return sum(n.correct for n in nodes) / len(nodes) if nodes else None


def table3(ctx: Ctx) -> Table:
    tasks, rows, recs = ctx.tasks, [], []

    def add(label: str, key: str, vals: list[float | None]) -> None:
        rows.append([label, *(pct(v) for v in vals), avg_cell(vals)])
        mean, _ = _mean(vals)
        recs.append({"row": key, "source": OURS, **{t: _r(v) for t, v in zip(tasks, vals, strict=True)},
                     "avg": _r(mean)})

    team = [_num((ctx.m.mag_stats(t) or {}).get("team_accuracy")) for t in tasks]
    add("ReConcile team (teachers, training questions)", "reconcile_team", team)
    for a in ctx.params.teachers.agents:
        oracle = " [oracle]" if a.backend == "reference" else ""
        add(f"teacher {a.name}{oracle}, round 0 (training questions)", f"teacher_{a.name}_round0",
            [_round0_acc(ctx.m.mags(t), a.name) for t in tasks])
    for meth in ctx.params.experiments.methods:
        if meth.startswith("sit_"):
            add(f"{meth} (student, test)", meth, [ctx.m.acc(meth, t) for t in tasks])
    add("magdi (student, test)", "magdi", [ctx.m.acc("magdi", t) for t in tasks])
    secs = [Section(["row", *tasks, "Avg"], rows, "accuracy %")]
    p = ctx.paper.get("table3_teachers_vs_students", {})
    if p:
        cols = _paper_task_cols(p)
        prow, precs = _paper_rows(p, cols)
        secs.append(Section(["row", *cols], prow, "Table 3, accuracy %", paper=True))
        recs += [{"row": r.pop("method"), **r} for r in precs]
    return Table("table3_teachers_vs_students", "Table 3: teachers vs distilled students", secs, recs,
                 ["Teacher rows are measured on the TRAINING questions (the MAGs: team_accuracy from "
                  "metrics/mags, round-0 node accuracy per agent from data/mags); student rows on the TEST "
                  "questions. They are not the same questions.",
                  "The offline `reference` agent replays the gold answer (an oracle); it is excluded from the "
                  "team vote, and its round-0 accuracy is not a real teacher's accuracy.",
                  PARTIAL_NOTE, PAPER_NOTE])


def table4(ctx: Ctx) -> Table:
    rows, recs = [], []
    for meth in ("zero_shot", MT_METHOD):
        r, rec = _acc_row(ctx, meth, ctx.ood)
        rows.append(r)
        recs.append(rec)
    delta = []
    for t in ctx.ood:
        a, b = ctx.m.acc(MT_METHOD, t), ctx.m.acc("zero_shot", t)
        delta.append(DASH if a is None or b is None else f"{100 * (a - b):+.1f}")
    rows.append([f"{MT_METHOD} − zero_shot (points)", *delta, DASH])
    secs = [Section(["method", *ctx.ood, "Avg"], rows, "out-of-domain accuracy % [95% CI]")]
    p = ctx.paper.get("table4_ood", {})
    if p:
        cols = _paper_task_cols(p)
        prow, precs = _paper_rows(p, cols)
        secs.append(Section(["method", *cols], prow, "Table 4, accuracy %", paper=True))
        recs += precs
    return Table("table4_ood", "Table 4: out-of-domain generalisation of the multi-task model", secs, recs,
                 [f"{MT_METHOD} is trained on the MAGs of experiments.tasks only; the OOD tasks "
                  f"({', '.join(ctx.ood) or 'none configured'}) are never seen in training.",
                  "The paper compares with a multi-task single-teacher student (SiT-GPT4-MT), which we do not "
                  "train; our baseline is the zero-shot student.", PAPER_NOTE])


def table5(ctx: Ctx) -> Table:
    rows, recs = [], []
    methods = list(dict.fromkeys([*ctx.main_methods(), *ctx.ablations]))
    for meth in methods:
        for t in list(dict.fromkeys([*ctx.tasks, *ctx.ood])):
            m = ctx.m.eval(meth, t)
            sc = m.get("sc") if m else None
            if not isinstance(sc, dict) or _num(sc.get("accuracy")) is None:
                continue
            k = sc.get("k", ctx.params.evaluate.self_consistency.k)
            d = 100 * (sc["accuracy"] - m["accuracy"])
            rows.append([meth, t, k, acc_ci(m), acc_ci(sc), f"{d:+.1f}"])
            recs.append({"method": meth, "task": t, "source": OURS, "k": k, "greedy": _r(m["accuracy"]),
                         "sc": _r(sc["accuracy"]), "delta": round(d, 4), "greedy_tokens": m.get("mean_tokens"),
                         "sc_tokens": sc.get("mean_tokens")})
    secs = [Section(["method", "task", "k", "greedy", "self-consistency", "Δ (points)"], rows,
                    "accuracy % [95% CI]")]
    p = ctx.paper.get("table5_self_consistency", {})
    if p:
        prow = [[f"{key} ({v.get('label', key)})", p.get("task"), p.get("k"), paper_num(v.get("greedy")),
                 paper_num(v.get("sc")), f"+{paper_num(v.get('gain_pct'))}"] for key, v in p["rows"].items()]
        secs.append(Section(["method", "task", "k", "w/o SC", "w/ SC", "gain"], prow, "Table 5", paper=True))
        recs += [{"method": key, "task": p.get("task"), "source": PAPER_LABEL, "k": p.get("k"),
                  "greedy": v.get("greedy"), "sc": v.get("sc"), "delta": v.get("gain_pct")}
                 for key, v in p["rows"].items()]
    sc = ctx.params.evaluate.self_consistency
    return Table("table5_self_consistency", "Table 5: greedy decoding vs self-consistency", secs, recs,
                 [f"Methods listed in experiments.self_consistency_methods are also decoded k={sc.k} times "
                  f"(temperature {sc.temperature}, top_p {sc.top_p}, one sampling batch) and majority-voted on "
                  f"experiments.self_consistency_tasks ({', '.join(ctx.params.experiments.self_consistency_tasks) or 'all tasks'}); "
                  "rows appear only where the metrics contain an `sc` entry.",
                  "The paper's rows are the base model, the best single-teacher student (SiT-GPT4) and MAGDi on "
                  "GSM8K; our analogues are zero_shot, sit_reference (the dataset-explanation teacher) and magdi.",
                  PAPER_NOTE])


def _describe(over: dict[str, Any]) -> str:
    def val(v: Any) -> str:
        return ("+".join(map(str, v)) or "none") if isinstance(v, list) else str(v)

    return ", ".join(f"{k}={val(v)}" for k, v in over.items())


def _ablation_table(ctx: Ctx, name: str, title: str, keys: set[str], base_keys: list[str],
                    paper: Section | None, paper_recs: list[dict], notes: list[str],
                    show_mags: bool = False) -> Table:
    tasks = ctx.abl_tasks
    base_desc = _describe({k: getattr(ctx.params.train, k) for k in base_keys})
    entries = [("magdi", f"magdi ({base_desc})")]
    entries += [(a, f"{a} ({_describe(o)})") for a, o in ctx.ablations.items() if keys & set(o)]
    rows, recs = [], []
    for meth, label in entries:
        r, rec = _acc_row(ctx, meth, tasks, label=label, with_avg=len(tasks) > 1)
        if show_mags:
            n = [(ctx.m.train(meth, t) or {}).get("n_mags") for t in tasks]
            r += [DASH if x is None else x for x in n]
            rec.update({f"{t}_n_mags": x for t, x in zip(tasks, n, strict=True)})
        rows.append(r)
        recs.append(rec)
    heads = ["run", *tasks, *(["Avg"] if len(tasks) > 1 else []), *([f"train MAGs ({t})" for t in tasks]
                                                                     if show_mags else [])]
    secs = [Section(heads, rows, "accuracy % [95% CI] on experiments.ablation_tasks")]
    if paper is not None:
        secs.append(paper)
    return Table(name, title, secs, recs + paper_recs,
                 [f"Ablations (experiments.ablations) are trained and evaluated on experiments.ablation_tasks "
                  f"({', '.join(tasks) or 'none configured'}) only; everything else as in magdi.", *notes,
                  PAPER_NOTE])


def _paper_section(ctx: Ctx, key: str, caption: str) -> tuple[Section | None, list[dict]]:
    p = ctx.paper.get(key, {})
    if not p:
        return None, []
    cols = _paper_task_cols(p)
    prow, precs = _paper_rows(p, cols)
    return Section(["run", *cols], prow, caption, paper=True), precs


def table6(ctx: Ctx) -> Table:
    sec, recs = _paper_section(ctx, "table6_encoder", "encoder ablation (tab:structure_ablation), accuracy %")
    return _ablation_table(ctx, "table6_encoder", "Table 6: graph encoder (GCN vs attention) and node "
                           "representations", {"encoder", "node_repr"}, ["encoder", "node_repr"], sec, recs,
                           ["node_repr=live: node embeddings come from the LoRA-adapted student (gradients of "
                            "the graph loss reach LoRA); frozen: from the base model, as in the official code."])


def table7(ctx: Ctx) -> Table:
    tasks, rows, recs = ctx.tasks, [], []
    for meth, lab in (("zero_shot", "No Teacher"), ("magdi", "MAGDi")):
        r, rec = _acc_row(ctx, meth, tasks, label=f"{ctx.student_name()} · {lab}")
        rows.append(r)
        recs.append({**rec, "student": ctx.params.student.model})
    secs = [Section(["base · distilled", *tasks, "Avg"], rows, "accuracy % [95% CI]")]
    p = ctx.paper.get("table7_student_scaling", {})
    if p:
        cols: list[str] = []
        for base in p.values():
            for v in base.values():
                cols += [c for c in v if c not in cols]
        prow = []
        for base, by in p.items():
            for meth, v in by.items():
                prow.append([f"{base} · {meth}", *(paper_num(v.get(c)) for c in cols)])
                recs.append({"method": meth, "source": PAPER_LABEL, "student": base, **{c: v.get(c) for c in cols}})
        secs.append(Section(["base · distilled", *cols], prow, "Table 7, accuracy %", paper=True))
    return Table("table7_student_scaling", "Table 7: student scaling", secs, recs,
                 [f"Only one student is available offline ({ctx.params.student.model}), so this table has one "
                  "base model. Other sizes need `student.model` set to other hub ids (e.g. "
                  "meta-llama/Llama-2-7b-chat-hf, meta-llama/Llama-2-13b-chat-hf, "
                  "mistralai/Mistral-7B-Instruct-v0.2) and network access; no numbers are filled in for them.",
                  PARTIAL_NOTE, PAPER_NOTE])


def table9(ctx: Ctx) -> Table:
    p = ctx.paper.get("table9_graph_types", {})
    sec, recs = None, []
    if p:
        sec = Section(["training MAGs", "task", "accuracy"],
                      [[r["label"], p.get("task"), paper_num(r.get("accuracy"))] for r in p.get("rows", [])],
                      "Table 9, accuracy %", paper=True)
        recs = [{"method": r["label"], "source": PAPER_LABEL, p.get("task", "task"): r.get("accuracy")}
                for r in p.get("rows", [])]
    return _ablation_table(ctx, "table9_graph_types", "Table 9: training on subsets of graph types",
                           {"exclude_graph_types"}, ["exclude_graph_types"], sec, recs,
                           ["G0..G3 = MAGs with 0..3 discussion rounds; exclude_graph_types drops those MAGs "
                            "from training (see table12 for how many each type has)."], show_mags=True)


def table10(ctx: Ctx) -> Table:
    sec, recs = _paper_section(ctx, "graph_structure", "graph-structure ablation (tab:graph_ablation), accuracy %")
    return _ablation_table(ctx, "table10_graph_structure", "Table 10: MAG edge structure (D vs UD vs FC)",
                           {"graph"}, ["graph"], sec, recs,
                           ["d: directed round r-1 -> round r edges (MAGDi); ud: the same edges undirected; "
                            "fc: fully connected.",
                            "In the paper text this ablation is labelled tab:graph_ablation; the paper's "
                            "'Table 10' is the per-dataset tokens/accuracy table (shown in table2_tokens)."])


def table12(ctx: Ctx) -> Table:
    stats = {t: ctx.m.mag_stats(t) for t in ctx.tasks}
    present = [s for s in stats.values() if s]
    rounds = sorted({int(k.split("_")[1]) for s in present for k in (s.get("nodes_per_round") or {})}
                    | set(range(ctx.params.teachers.max_rounds + 1)))
    agents = list(dict.fromkeys([a.name for a in ctx.params.teachers.agents]
                                + [a for s in present for a in (s.get("nodes_per_agent") or {})]))
    gtypes = sorted({g for s in present for g in (s.get("graph_types") or {})} | {"G0", "G1", "G2", "G3"},
                    key=lambda g: int(g[1:]))
    heads = ["task", "MAGs", *(f"round {r} nodes" for r in rounds), *(f"{a} nodes" for a in agents),
             *gtypes, "positive", "negative", "invalid", "MAGs with pos & neg", "team acc %",
             "teacher tokens/q", "test n"]
    rows, recs = [], []
    for t, s in stats.items():
        s = s or {}
        ev = ctx.m.eval("zero_shot", t) or ctx.m.eval("magdi", t)
        rec: dict[str, Any] = {"task": t, "source": OURS, "n_mags": s.get("n_mags")}
        rec.update({f"round_{r}": (s.get("nodes_per_round") or {}).get(f"round_{r}") for r in rounds})
        rec.update({f"agent_{a}": (s.get("nodes_per_agent") or {}).get(a) for a in agents})
        rec.update({g: (s.get("graph_types") or {}).get(g) for g in gtypes})
        rec.update({"positive": s.get("positive_nodes"), "negative": s.get("negative_nodes"),
                    "invalid": s.get("invalid_nodes"), "mags_with_pos_and_neg": s.get("mags_with_pos_and_neg"),
                    "team_accuracy": _r(_num(s.get("team_accuracy"))),
                    "teacher_tokens_per_question": s.get("teacher_tokens_per_question"),
                    "test_n": ev.get("n") if ev else None})
        vals = [v for k, v in rec.items() if k not in ("task", "source")]
        row = [t] + [DASH if v is None else v for v in vals]
        row[-3] = DASH if rec["team_accuracy"] is None else f"{rec['team_accuracy']:.1f}"
        row[-2] = num(rec["teacher_tokens_per_question"])
        if not s:  # no stats at all for this task: every MAG cell is missing, test n may still be known
            row[1:-1] = [DASH] * (len(row) - 2)
        rows.append(row)
        recs.append(rec)
    secs = [Section(heads, rows, "training MAGs built by `build_mags` (metrics/mags)")]
    p = ctx.paper.get("table12_mag_stats", {})
    if p:
        prow = [[t, v.get("rounds"), v.get("agent_each"), v.get("graphs"), v.get("test")] for t, v in p.items()]
        secs.append(Section(["task", "nodes round 0 / 1 / 2 / 3", "nodes per agent (each)",
                             "graphs G0 / G1 / G2 / G3 / All", "test"], prow, "Table 12, as printed", paper=True))
        recs += [{"task": t, "source": PAPER_LABEL, **v} for t, v in p.items()]
    return Table("table12_mag_stats", "Table 12: MAG statistics", secs, recs,
                 ["G_k = MAGs with k discussion rounds after round 0 (G0 = immediate consensus). Absent rounds "
                  "are absent nodes, so per-agent counts can differ when an agent's reply is missing.",
                  "invalid = replies that could not be parsed after retries (kept as incorrect nodes).",
                  "team acc = the teachers' final-round majority on the training questions (oracle "
                  "`reference` agent excluded from the vote). test n = test questions evaluated (zero_shot).",
                  PAPER_NOTE])


def table13(ctx: Ctx) -> Table:
    rows, recs = [], []
    for meth, lab in (("magdi", "magdi (task-specific)"), (MT_METHOD, f"{MT_METHOD} (one multi-task model)")):
        r, rec = _acc_row(ctx, meth, ctx.tasks, label=lab)
        rows.append(r)
        recs.append(rec)
    secs = [Section(["model", *ctx.tasks, "Avg"], rows, "accuracy % [95% CI]")]
    p = ctx.paper.get("table13_multitask", {})
    if p:
        cols = _paper_task_cols(p)
        prow, precs = _paper_rows(p, cols)
        secs.append(Section(["model", *cols], prow, "Table 13, accuracy %", paper=True))
        recs += precs
    return Table("table13_multitask", "Table 13: multi-task vs task-specific MAGDi", secs, recs,
                 [PARTIAL_NOTE, PAPER_NOTE])


# ----------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _placeholder(path: Path, title: str, msg: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    ax.text(0.5, 0.5, msg, ha="center", va="center", wrap=True, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _save(fig, ax, path: Path, legend_fontsize: int | None = None, **legend_kw: Any) -> Path:
    """The common ending of every figure: optional legend, light grid, tight layout, 120-dpi PNG."""
    if legend_fontsize:
        ax.legend(fontsize=legend_fontsize, **legend_kw)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def _pick_mag(ctx: Ctx) -> MAG | None:
    mags = [m for t in dict.fromkeys([*ctx.tasks, *ctx.abl_tasks]) for m in ctx.m.mags(t)]

    def mixed(m: MAG) -> bool:
        return {n.correct for n in m.nodes} == {True, False}

    for ok in (lambda m: mixed(m) and m.n_rounds >= 2, lambda m: mixed(m) and m.n_rounds >= 1, mixed,
               lambda m: m.n_rounds >= 1, lambda m: bool(m.nodes)):
        for m in mags:
            if ok(m):
                return m
    return None


def fig2(ctx: Ctx, out: Path) -> Path:
    path = out / "fig2_example_mag.png"
    mag = _pick_mag(ctx)
    if mag is None:
        return _placeholder(path, "Fig. 2: example MAG", "no MAGs built yet (data/mags/<task>.jsonl missing)")
    draw_mag(mag, path, kind=ctx.params.train.graph)
    return path


def _avg_over(ctx: Ctx, method: str, key: str) -> tuple[float | None, int]:
    vals = []
    for t in ctx.tasks:
        m = ctx.m.eval(method, t)
        if m is not None and _num(m.get(key)) is not None:
            vals.append(float(m[key]))
    return (sum(vals) / len(vals) if vals else None), len(vals)


def _merge_close_labels(pts: list[tuple[str, float, float, str]], rel_x: float = 0.15,
                        abs_y: float = 1.0) -> list[tuple[str, float, float, str]]:
    """Points that (nearly) coincide get one joined label: on tiny test sets several methods often share an
    accuracy, and overprinted names are unreadable. Each point keeps its own position."""
    names: list[list[str]] = [[] for _ in pts]
    anchors: list[int] = []
    for i, (lab, x, y, c) in enumerate(pts):
        near = [a for a in anchors if pts[a][3] == c and abs(pts[a][2] - y) <= abs_y
                and abs(pts[a][1] - x) <= rel_x * max(abs(pts[a][1]), 1e-9)]
        if near:
            names[near[0]].append(lab)
        else:
            anchors.append(i)
            names[i].append(lab)
    return [(", ".join(names[i]), x, y, c) for i, (_, x, y, c) in enumerate(pts)]


def fig4(ctx: Ctx, out: Path) -> Path:
    path = out / "fig4_accuracy_vs_tokens.png"
    pts = []
    for meth in ctx.main_methods():
        a, n = _avg_over(ctx, meth, "accuracy")
        tok, _ = _avg_over(ctx, meth, "mean_tokens")
        if a is not None and tok is not None:
            pts.append((meth + ("*" if n < len(ctx.tasks) else ""), tok, 100 * a, "C0"))
    st = [s for s in (ctx.m.mag_stats(t) for t in ctx.tasks) if s]
    ta = [_num(s.get("team_accuracy")) for s in st]
    tt = [_num(s.get("teacher_tokens_per_question")) for s in st]
    pairs = [(a, t) for a, t in zip(ta, tt, strict=True) if a is not None and t is not None]
    if pairs:
        star = "*" if len(pairs) < len(ctx.tasks) else ""
        pts.append((f"ReConcile teachers{star}\n(training questions)", sum(t for _, t in pairs) / len(pairs),
                    100 * sum(a for a, _ in pairs) / len(pairs), "C3"))
    if not pts:
        return _placeholder(path, "Fig. 4: accuracy vs tokens", "no evaluation metrics yet")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lab, x, y, c in _merge_close_labels(pts):
        ax.scatter([x], [y], color=c, s=40, zorder=3)
        ax.annotate(lab, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    xs = [p[1] for p in pts]
    if min(xs) > 0 and max(xs) / min(xs) > 10:
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(0.2)
    ax.set_xlabel("average generated tokens per question")
    ax.set_ylabel("average accuracy %")
    ax.set_title(f"Fig. 4: accuracy vs inference tokens, student {ctx.student_name()}\n"
                 f"avg over {', '.join(ctx.tasks)} (* = some tasks missing)", fontsize=9)
    return _save(fig, ax, path)


def fig5(ctx: Ctx, out: Path) -> Path:
    path = out / "fig5_student_scaling.png"
    z, _ = _avg_over(ctx, "zero_shot", "accuracy")
    g, _ = _avg_over(ctx, "magdi", "accuracy")
    title = f"Fig. 5: student scaling — only one student size available offline\n({ctx.student_name()})"
    if z is None and g is None:
        return _placeholder(path, title, "no zero_shot / magdi metrics yet")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for val, lab, c in ((z, "No Teacher (zero-shot)", "C7"), (g, "MAGDi", "C0")):
        if val is not None:
            ax.scatter([0], [100 * val], color=c, s=60, label=lab, zorder=3)
    ax.set_xticks([0], [ctx.student_name()])
    ax.set_xlim(-1, 1)
    ax.set_ylabel("average accuracy %")
    ax.set_title(title + f"\navg over {', '.join(ctx.tasks)}; other sizes: set student.model to other hub ids",
                 fontsize=8)
    return _save(fig, ax, path, legend_fontsize=8)


def _scaling_runs(ctx: Ctx) -> list[tuple[str, int | None]]:
    runs: list[tuple[str, int | None]] = [("magdi", None)]
    runs += [(a, o["max_mags"]) for a, o in ctx.ablations.items()
             if o.get("max_mags") and set(o) <= {"max_mags", "method"} and o.get("method", "magdi") == "magdi"]
    runs += [(f"scale_{n}", n) for n in ctx.params.experiments.data_scaling]
    return list(dict.fromkeys(runs))


def fig6(ctx: Ctx, out: Path) -> Path:
    path = out / "fig6_data_scaling.png"
    series = {}
    for t in ctx.abl_tasks:
        pts = []
        for meth, cap in _scaling_runs(ctx):
            m = ctx.m.eval(meth, t)
            n = _num((ctx.m.train(meth, t) or {}).get("n_mags"))
            n = n if n is not None else cap
            if m is not None and n is not None:
                lo, hi = _num(m.get("ci95_low")), _num(m.get("ci95_high"))
                pts.append((n, 100 * m["accuracy"], None if lo is None else 100 * lo, None if hi is None else 100 * hi))
        if pts:
            series[t] = sorted(pts)
    if not series:
        return _placeholder(path, "Fig. 6: data scaling", "no magdi / max_mags ablation metrics yet")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for t, pts in series.items():
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        err = [[y - (lo if lo is not None else y) for _, y, lo, _ in pts],
               [(hi if hi is not None else y) - y for _, y, _, hi in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=t)
    ax.set_xlabel("training MAGs (metrics/train n_mags)")
    ax.set_ylabel("accuracy % [95% CI]")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Fig. 6: data scaling (magdi + max_mags ablations)\nstudent {ctx.student_name()}", fontsize=9)
    return _save(fig, ax, path, legend_fontsize=8)


def training_curves(ctx: Ctx, out: Path) -> Path:
    path = out / "training_curves.png"
    task = (ctx.abl_tasks or ctx.tasks or [None])[0]
    methods = [m for m in dict.fromkeys([*ctx.main_methods(), *ctx.ablations]) if m != "zero_shot"]
    curves = {m: h for m in methods if task and (h := ctx.m.history(m, task)) is not None}
    if not curves:
        return _placeholder(path, "training curves", f"no training history for task {task} yet")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for meth, h in curves.items():
        ax.plot(h["step"], h["loss"], label=meth, lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("total training loss")
    ax.set_title(f"Training loss per method on {task}\n(metrics/train/<method>/{task}_history.csv)", fontsize=9)
    return _save(fig, ax, path, legend_fontsize=7, ncol=2)


# ----------------------------------------------------------------------------- README


DESCRIPTIONS = {
    "table1_main": "Main results: methods × tasks accuracy with 95% CIs and average (paper Table 1).",
    "table2_tokens": "Inference cost: ReConcile teachers' tokens per question vs the MAGDi student (Table 2).",
    "table3_teachers_vs_students": "Teachers (team and per-agent round 0, training questions) vs students (Table 3).",
    "table4_ood": "Out-of-domain: multi-task MAGDi vs zero-shot (Table 4).",
    "table5_self_consistency": "Greedy vs self-consistency accuracy (Table 5).",
    "table6_encoder": "GCN vs node/token attention encoders; live vs frozen node representations (Table 6).",
    "table7_student_scaling": "Student scaling; one student size offline (Table 7).",
    "table9_graph_types": "Training without some graph types G_k (Table 9).",
    "table10_graph_structure": "Directed vs undirected vs fully-connected MAG edges (graph-structure ablation).",
    "table12_mag_stats": "MAG statistics: nodes per round and agent, graph types, labels (Table 12).",
    "table13_multitask": "Task-specific vs multi-task MAGDi (Table 13).",
    "fig2_example_mag.png": "One built MAG (green correct, red incorrect; rounds left to right) (Fig. 2).",
    "fig4_accuracy_vs_tokens.png": "Average accuracy vs generated tokens per method, plus the teachers (Fig. 4).",
    "fig5_student_scaling.png": "Student scaling, one available point (Fig. 5).",
    "fig6_data_scaling.png": "Accuracy vs number of training MAGs (Fig. 6).",
    "training_curves.png": "Training loss vs step per method on the first ablation task.",
}


def _coverage(ctx: Ctx) -> tuple[int, int, list[str]]:
    want = [(m, t) for m in ctx.main_methods() for t in ctx.tasks]
    want += [("zero_shot", t) for t in ctx.ood] + ([(MT_METHOD, t) for t in ctx.ood]
                                                   if ctx.params.experiments.multitask else [])
    want += [(a, t) for a in ctx.ablations for t in ctx.abl_tasks]
    want = list(dict.fromkeys(want))
    missing = [f"{m}/{t}" for m, t in want if ctx.m.eval(m, t) is None]
    return len(want) - len(missing), len(want), missing


def write_readme(ctx: Ctx, out: Path, files: list[Path]) -> Path:
    p = ctx.params
    have, total, missing = _coverage(ctx)
    lines = [
        "# MAGDi reproduction: report",
        "",
        "Generated by the DVC `report` stage (`dvc repro`, or `python stages/report.py`) from `metrics/` "
        "(eval, train, mags) and the built MAGs; every number of ours is read from those files.",
        "",
        "## Run configuration",
        "",
        f"- params profile: `{p.profile}`",
        f"- student: `{p.student.model}`",
        f"- teachers: {', '.join(f'`{a.name}` ({a.backend})' for a in p.teachers.agents)}, "
        f"up to {p.teachers.max_rounds} discussion rounds",
        f"- data: n_train={p.data.n_train} questions per task (→ MAGs), n_test={p.data.n_test} test questions "
        f"per task, source `{p.data.source}`",
        f"- tasks: {', '.join(p.experiments.tasks)}; OOD: {', '.join(p.experiments.ood_tasks) or 'none'}; "
        f"ablation tasks: {', '.join(p.experiments.ablation_tasks) or 'none'}",
        f"- training: {p.train.epochs} epoch(s), lr {p.train.lr}, graph `{p.train.graph}`, encoder "
        f"`{p.train.encoder}`, node_repr `{p.train.node_repr}`",
        f"- evaluation cells found: {have} of {total}" + (
            f" (missing, shown as —: {', '.join(missing[:20])}"
            + (f", … {len(missing) - 20} more" if len(missing) > 20 else "") + ")" if missing else ""),
        "",
        "## Caution",
        "",
        "- The CPU-default profile (`cpu_default`) uses a 135M-parameter student (SmolLM2-135M-Instruct), weak "
        "offline teachers (personas of the same small model plus an oracle `reference` agent replaying the "
        "dataset's explanation), a few MAGs per task and tiny test sets: accuracies are noisy and their 95% "
        "bootstrap CIs are wide. Differences between methods inside a CI say nothing.",
        "- Teacher numbers (team accuracy, teacher tokens) are measured on the training questions, student "
        "numbers on the test questions.",
        f"- Numbers in sections labelled **{PAPER_LABEL}** are transcribed from the paper "
        "(`src/magdi/paper_numbers.yaml`): reference only, from a different student, teachers and data size; "
        "they are never mixed into our rows or figures.",
        "- `—` marks a cell whose metrics file is missing (task skipped or stage not run); "
        f"`{PARTIAL}` marks an average over fewer tasks than the row has columns.",
        "",
        "## Files",
        "",
    ]
    for f in files:
        key = f.stem if f.suffix in (".md", ".csv") else f.name
        if f.suffix == ".csv":
            continue
        desc = DESCRIPTIONS.get(key, "")
        extra = f" (+ `{key}.csv`, machine-readable, with a `source` column)" if f.suffix == ".md" else ""
        lines.append(f"- `{f.name}`{extra}: {desc}")
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- entry point


def build_report(params: Params, out_dir: Path, metrics_dir: Path = Path("metrics"),
                 mags_dir: Path | None = None) -> list[Path]:
    """Write every table (markdown + CSV), figure (PNG) and the README to ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(params, Metrics(Path(metrics_dir), Path(mags_dir or params.paths.mags_dir)), load_paper_numbers())
    files: list[Path] = []
    for make in (table1, table2, table3, table4, table5, table6, table7, table9, table10, table12, table13):
        files += make(ctx).write(out_dir)
    for fig in (fig2, fig4, fig5, fig6, training_curves):
        files.append(fig(ctx, out_dir))
    files.append(write_readme(ctx, out_dir, files))
    return files


__all__ = ["PAPER_LABEL", "DASH", "build_report", "load_paper_numbers", "md_table", "pct", "acc_ci"]
