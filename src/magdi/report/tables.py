"""The paper's tables (markdown + CSV), one function per table, all read through :class:`Ctx`."""

from __future__ import annotations

from typing import Any

from ..config import MT_METHOD, MT_TASK
from ..mag import LOOP_RATIO, LOOP_TAIL_CHARS, MAG
from ..names import BEYOND_PAPER_METHODS
from ..pipeline.paths import run_name
from .format import (
    DASH,
    OURS,
    PAPER_LABEL,
    PAPER_NOTE,
    PARTIAL_NOTE,
    Section,
    Table,
    _mean,
    _num,
    _r,
    acc_ci,
    avg_cell,
    num,
    paper_num,
    pct,
)
from .loader import Ctx
from .stats import ALPHA, significance, table1_marks


def _mark(cell: str, mark: str) -> str:
    """'62.5 [41.7, 83.3]' -> '62.5* [41.7, 83.3]'."""
    head, sep, tail = cell.partition(" ")
    return head + mark + sep + tail if mark and cell != DASH else cell


def _acc_row(ctx: Ctx, method: str, tasks: list[str], label: str | None = None,
             with_avg: bool = True, marks: dict[tuple[str, str], str] | None = None
             ) -> tuple[list[Any], dict[str, Any]]:
    """(markdown row, CSV row) of accuracies with CIs for one method; ``marks`` flag cells (significance)."""
    row: list[Any] = [label or method]
    rec: dict[str, Any] = {"method": method, "source": OURS}
    accs = []
    for t in tasks:
        m = ctx.m.eval(method, t)
        row.append(_mark(acc_ci(m), (marks or {}).get((method, t), "")))
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


def _sit_chain_notes(ctx: Ctx) -> list[str]:
    """How many chains each single-teacher student trained on (its teacher's correct round-0 chains, one per MAG it
    answered right; metrics/train n_items): a weak teacher gives few."""
    parts = []
    for m in ctx.params.experiments.methods:
        if m.startswith("sit_"):
            counts = [f"{n} on {t}" for t in ctx.tasks if (n := (ctx.m.train(m, t) or {}).get("n_items")) is not None]
            if counts:
                parts.append(f"{m} {', '.join(counts)}")
    return [f"Training chains of each single-teacher student (its teacher's correct round-0 chains): "
            f"{'; '.join(parts)}."] if parts else []


def table1(ctx: Ctx) -> Table:
    rows, recs = [], []
    marks = table1_marks(ctx)
    for meth in ctx.main_methods():
        beyond = meth in BEYOND_PAPER_METHODS
        r, rec = _acc_row(ctx, meth, ctx.tasks, label=f"{meth} (beyond the paper)" if beyond else None, marks=marks)
        rec["beyond_paper"] = beyond
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
                 [*_sit_chain_notes(ctx),
                  "Rows in params order: zero_shot, experiments.methods"
                  + (f", {MT_METHOD} (multi-task)." if ctx.params.experiments.multitask else "."),
                  *([f"Beyond the paper: {', '.join(b)} (preference optimisation on MAGDi's (correct, incorrect) "
                     "pairs; docs/methods.md); their `*` compares them with MAGDi."]
                    if (b := [m for m in ctx.params.experiments.methods if m in BEYOND_PAPER_METHODS]) else []),
                  "Cells: accuracy % on the test split [95% bootstrap CI]; — = metrics file missing.",
                  f"`*` after a number: on that task the row differs significantly (McNemar exact p < {ALPHA}, "
                  "same test questions) from its comparison partner: MAGDi for zero_shot and sit_* rows, the next "
                  "level up for magdi_r0 / magdi_cn / magdi_an; see significance.md for every p-value and paired "
                  "interval.",
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
                  "over the training questions (metrics/mags teacher_tokens_per_question)"
                  + (". The offline `reference` agent counts words+4 of the dataset explanation."
                     if _has_reference(ctx) else "."),
                  "Student: mean generated tokens per test question (metrics/eval/magdi mean_tokens), student "
                  "tokenizer; teachers and student may use different tokenizers.",
                  "Avg row: tasks with both numbers; reduction = avg teacher tokens / avg student tokens.",
                  PAPER_NOTE])


def _has_reference(ctx: Ctx) -> bool:
    """Whether the run has the offline ``reference`` agent (an oracle): only then do the notes describe it."""
    return any(a.backend == "reference" for a in ctx.params.teachers.agents)


def _round0_acc(mags: list[MAG], agent: str) -> float | None:
    nodes = [n for m in mags for n in m.nodes if n.agent == agent and n.round == 0]
    return sum(n.correct for n in nodes) / len(nodes) if nodes else None


def _agent_answers(mags: list[MAG], agent: str, final: bool) -> dict[str, dict]:
    """MAG id -> {"correct": ...} of ``agent``'s round-0 (or its last round's) answer: paired per question."""
    out = {}
    for m in mags:
        nodes = sorted((n for n in m.nodes if n.agent == agent), key=lambda n: n.round)
        if nodes:
            out[m.id] = {"correct": bool((nodes[-1] if final else nodes[0]).correct)}
    return out


def discussion_effect(ctx: Ctx, task: str) -> tuple[list[Any], dict[str, Any]] | None:
    """Did the discussion help on ``task``'s training questions? The team's final answer against its best member
    alone at round 0 (the agent with the highest round-0 accuracy), paired per question (McNemar, bootstrap
    interval), and per agent how many answers the discussion turned right -> wrong and wrong -> right."""
    from .stats import compare

    mags = ctx.m.mags(task)
    if not mags:
        return None
    agents = [a.name for a in ctx.params.teachers.agents if a.backend != "reference"]
    accs = {a: _round0_acc(mags, a) for a in agents}
    accs = {a: v for a, v in accs.items() if v is not None}
    if not accs:
        return None
    best = max(accs, key=lambda a: accs[a])
    team = {m.id: {"correct": bool(m.team_correct)} for m in mags}
    ev = ctx.params.evaluate
    c = compare(task, "team", best, team, _agent_answers(mags, best, False), "team vs best member at round 0",
                ev.bootstrap_samples, ev.seed)
    if c is None:
        return None
    flips = []
    for a in agents:
        r0, last = _agent_answers(mags, a, False), _agent_answers(mags, a, True)
        rw = sum(r0[i]["correct"] and not last[i]["correct"] for i in r0)
        wr = sum(not r0[i]["correct"] and last[i]["correct"] for i in r0)
        flips.append(f"{a} {rw}/{wr}")
    verdict = ((("helped" if c.diff > 0 else "hurt") + f" (p = {c.p_mcnemar:.3g}, significant)") if c.significant
               else f"no evidence either way (p = {c.p_mcnemar:.3g})")
    row = [task, c.n, f"{100 * c.acc_a:.1f}", f"{best} {100 * c.acc_b:.1f}", f"{100 * c.diff:+.1f}",
           f"[{100 * c.ci_low:+.1f}, {100 * c.ci_high:+.1f}]", f"{c.a_only} / {c.b_only}", f"{c.p_mcnemar:.3g}",
           verdict, ", ".join(flips)]
    rec = {"row": "discussion_effect", "task": task, "source": OURS, "n": c.n, "team": _r(c.acc_a),
           "best_member": best, "best_member_round0": _r(c.acc_b), "diff": _r(c.diff), "ci_low": _r(c.ci_low),
           "ci_high": _r(c.ci_high), "p_mcnemar": round(c.p_mcnemar, 6), "flips_right_wrong_wrong_right": flips}
    return row, rec


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
    effects = [e for t in tasks if (e := discussion_effect(ctx, t))]
    if effects:
        secs.append(Section(["task", "questions", "team %", "best member alone, round 0 %", "diff", "95% CI (paired)",
                             "only team / only member right", "p McNemar", "the discussion",
                             "per agent: right→wrong / wrong→right"], [r for r, _ in effects],
                            "did the discussion help? the team's final answer vs its best member alone "
                            "(training questions, paired per question)"))
        recs += [rec for _, rec in effects]
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
                  "Did the discussion help: the team's answer (the weighted vote after the last round) against the "
                  "round-0 answer of the agent that was most accurate at round 0, on the same training questions: "
                  "McNemar's exact test on the questions where exactly one is right, and a paired bootstrap 95% "
                  "interval. right→wrong / wrong→right: an agent's answer at its last round against its round-0 "
                  "answer.",
                  *(["The offline `reference` agent replays the gold answer (an oracle); it is excluded from the "
                     "team vote, and its round-0 accuracy is not a real teacher's accuracy."]
                    if _has_reference(ctx) else []),
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
                  "GSM8K; ours are the methods listed in experiments.self_consistency_methods.",
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
                           ["node_repr=live: the structure encoder's node inputs come from the LoRA-adapted "
                            "student (gradients of the graph loss reach LoRA); frozen: from the base model without "
                            "the adapter, computed once and cached, as in the official code. L_ntp and "
                            "L_contrastive always use the live student."])


def _params_label(n: int | None) -> str:
    return DASH if n is None else f"{n / 1e6:.0f}M"


def table7(ctx: Ctx) -> Table:
    """Student scaling: zero-shot and MAGDi per base model, and the paired MAGDi − zero-shot difference."""
    runs = ctx.students()
    tasks = list(dict.fromkeys(t for r in runs for t in r.tasks))
    rows, recs, diffs = [], [], []
    comps = {(c.task, c.method_a, c.method_b): c for c in significance(ctx)}
    for r in runs:
        size = _params_label(r.parameters)
        for meth, lab in ((r.zero_shot, "No Teacher"), (r.magdi, "MAGDi")):
            row, rec = _acc_row(ctx, meth, tasks, label=f"{r.label} ({size}) · {lab}")
            rows.append(row)
            recs.append({**rec, "student": r.label, "student_parameters": r.parameters})
        cells = []
        for t in tasks:
            c = comps.get((t, r.magdi, r.zero_shot))
            cells.append(DASH if c is None else f"{100 * c.diff:+.1f} [{100 * c.ci_low:+.1f}, {100 * c.ci_high:+.1f}] "
                         f"p={c.p_mcnemar:.3g}" + (" *" if c.significant else ""))
        diffs.append([f"{r.label} ({size})", *cells])
    secs = [Section(["base · distilled", *tasks, "Avg"], rows, "accuracy % [95% CI]"),
            Section(["base", *tasks], diffs, "MAGDi − No Teacher, points [paired 95% CI], McNemar p (* p < "
                    f"{ALPHA})")]
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
    ex = ctx.params.experiments
    notes = [f"Base models: the main student ({ctx.student_name()}) on every task"
             + (f"; {', '.join(ex.scaling_students)} (experiments.scaling_students) on "
                f"{', '.join(ex.scaling_tasks)} (experiments.scaling_tasks)" if ex.scaling_students else
                "; no other student in experiments.scaling_students")
             + ". Every student is trained on the same MAGs with the same `train` settings"
             + (f" (scaling students with the overrides {ex.scaling_train} of experiments.scaling_train)"
                if ex.scaling_train and ex.scaling_students else "")
             + " and evaluated on the same test questions; sizes are parameter counts of the converted weights.",
             PARTIAL_NOTE, PAPER_NOTE]
    return Table("table7_student_scaling", "Table 7: student scaling", secs, recs, notes)


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
                    | set(range(max(ctx.params.teachers.rounds(t) for t in ctx.tasks) + 1 if ctx.tasks else 1)))
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
    cut_rows = []
    for rec, (t, s) in zip(recs, stats.items(), strict=True):
        per = ((s or {}).get("lengths") or {}).get("per_agent") or {}
        cells = []
        for a in agents:
            v = per.get(a) or {}
            rec.update({f"cut_{a}": _r(_num(v.get("truncated_fraction"))), f"loop_{a}": _r(_num(v.get("looping_fraction"))),
                        f"limit_{a}": v.get("limit")})
            cells.append(DASH if "looping_fraction" not in v else
                         f"{100 * v['truncated_fraction']:.1f} ({100 * v['looping_fraction']:.1f} + "
                         f"{100 * v['cut_reasoning_fraction']:.1f}) @ {v['limit']}")
        cut_rows.append([t, *cells])
    if any(c != DASH for r in cut_rows for c in r[1:]):
        secs.append(Section(["task", *(f"{a} cut % (loop + reasoning) @ limit" for a in agents)], cut_rows,
                            "teacher replies cut at their token limit: repetition loops (no limit ends them) "
                            "+ replies cut while still reasoning (a larger limit would let them finish)"))
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
                  "team acc = the teachers' final answer (weighted vote after the last round) on the training "
                  "questions" + (" (oracle `reference` agent excluded from the vote)" if _has_reference(ctx) else "")
                  + ". test n = test questions evaluated (zero_shot).",
                  f"cut = replies that reached the agent's `max_new_tokens`; loop = cut and the last {LOOP_TAIL_CHARS} "
                  f"characters of the raw reply compress (zlib) below {LOOP_RATIO:.0%} of their size "
                  "(`magdi.mag.tail_compression`); the rest were cut while still reasoning.",
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



def training_runs(ctx: Ctx) -> Table:
    """What every training run of the report saw and with which recipe (metrics/train): a reader compares
    methods knowing their steps, epochs and tokens, and sees a per-task recipe (experiments.task_train)."""
    ex = ctx.params.experiments
    runs = [(t, m) for t in ctx.tasks for m in ex.methods]
    runs += [(t, a) for t in ctx.abl_tasks for a in ex.ablations]
    runs += [(t, run_name("magdi", s)) for t in ex.scaling_tasks for s in ex.scaling_students]
    runs += [(MT_TASK, MT_METHOD)] if ex.multitask else []
    runs += [(t, f"scale_{n}") for t in ctx.abl_tasks for n in ex.data_scaling]
    keys = ["n_mags", "lr", "epochs", "w_ntp", "w_contrastive", "w_graph", "w_dpo", "steps", "updates", "tokens",
            "seconds", "tokens_per_s", "targets_truncated_fraction", "adapter_sha256"]
    terms = ("loss", "ntp", "contrastive", "graph", "dpo")
    heads = ["task", "run", "MAGs", "lr", "epochs", "w ntp", "w con", "w graph", "w dpo", "steps", "updates",
             "tokens seen", "train s", "tokens/s", "targets cut %",
             *(f"last-epoch {t}" for t in terms), "adapter sha256"]
    rows, recs = [], []
    for task, run in runs:
        m = ctx.m.train(run, task) or {}
        last = m.get("last_epoch_loss") or {}
        rec = {"task": task, "run": run, "source": OURS, **{k: m.get(k) for k in keys},
               **{f"last_epoch_{t}": last.get(t) for t in terms}}
        cut = _num(rec["targets_truncated_fraction"])
        rows.append([task, run, *(rec[k] for k in keys[:10]), num(rec["seconds"], ".0f"), num(rec["tokens_per_s"]),
                     DASH if cut is None else f"{100 * cut:.1f}",
                     *(num(rec[f"last_epoch_{t}"], ".3f") for t in terms),
                     rec["adapter_sha256"][:12] if rec["adapter_sha256"] else DASH])
        recs.append(rec)
    return Table("training_runs", "Training runs: what each run saw", [Section(heads, rows, "metrics/train")], recs,
                 ["tokens seen = tokens through the student's LM over all steps and epochs (each unique prompt and "
                  "chain of a step once); steps = batches of `train.mags_per_step` MAGs, updates = optimiser updates.",
                  "lr, epochs and the loss weights (w: L = w_ntp L_ntp + w_con L_contrastive + w_graph L_graph "
                  "+ w_dpo L_DPO; a run uses only the terms of its method) are the run's own: `train` (+ "
                  "`experiments.scaling_train` for a scaling student), then the task's `experiments.task_train` "
                  "entry, then the ablation's overrides.",
                  "targets cut % = training chains cut at `train.max_target_tokens`.",
                  "last-epoch loss and terms: each one's mean over the micro-steps of the run's last epoch (the "
                  "last step alone can hold no correct chain, so its L_ntp is 0); — = the run has no such term. "
                  "Curves per term: training_curves.png.",
                  "adapter sha256 = first 12 hex digits of the saved LoRA weights' digest (full in the CSV and "
                  "metrics/train): equal digests mean byte-identical adapters, so a rerun is checked without them."])
