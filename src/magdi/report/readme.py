"""``reports/README.md``: the run configuration, cautions, and one line per generated file."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import MT_METHOD
from .format import PAPER_LABEL, PARTIAL, loss_weights, per_task
from .loader import Ctx
from .stats import ordering_verdicts, significance

DESCRIPTIONS = {
    "table1_main": "Main results: methods × tasks accuracy with 95% CIs and average (paper Table 1).",
    "table2_tokens": "Inference cost: ReConcile teachers' tokens per question vs the MAGDi student (Table 2).",
    "table3_teachers_vs_students": "Teachers (team and per-agent round 0, training questions) vs students (Table 3).",
    "table4_ood": "Out-of-domain: multi-task MAGDi vs zero-shot (Table 4).",
    "table5_self_consistency": "Greedy vs self-consistency accuracy (Table 5).",
    "table6_encoder": "GCN vs node/token attention encoders; live vs frozen node representations (Table 6).",
    "table7_student_scaling": "Student scaling: zero-shot and MAGDi per base model, paired difference (Table 7).",
    "table9_graph_types": "Training without some graph types G_k (Table 9).",
    "table10_graph_structure": "Directed vs undirected vs fully-connected MAG edges (graph-structure ablation).",
    "table12_mag_stats": "MAG statistics: nodes per round and agent, graph types, labels (Table 12).",
    "table13_multitask": "Task-specific vs multi-task MAGDi (Table 13).",
    "training_runs": "Every training run: MAGs, lr, epochs, steps, updates, tokens seen, time, cut targets, final loss.",
    "fig2_example_mag.png": "One built MAG (green correct, red incorrect; rounds left to right) (Fig. 2).",
    "fig4_accuracy_vs_tokens.png": "Average accuracy vs generated tokens per method, plus the teachers (Fig. 4).",
    "fig5_student_scaling.png": "Accuracy vs student size, zero-shot and MAGDi (Fig. 5).",
    "fig6_data_scaling.png": "Accuracy vs number of training MAGs (Fig. 6).",
    "training_curves.png": "Training loss vs step per method on the first ablation task.",
    "significance": "Paired tests on the same test questions: bootstrap 95% CI of the accuracy difference and "
                    "McNemar's exact p (MAGDi vs zero-shot, vs each SiT, vs the best SiT; each level vs the one "
                    "below).",
}


def _coverage(ctx: Ctx) -> tuple[int, int, list[str]]:
    want = [(m, t) for m in ctx.main_methods() for t in ctx.tasks]
    want += [("zero_shot", t) for t in ctx.ood] + ([(MT_METHOD, t) for t in ctx.ood]
                                                   if ctx.params.experiments.multitask else [])
    want += [(a, t) for a in ctx.ablations for t in ctx.abl_tasks]
    want = list(dict.fromkeys(want))
    missing = [f"{m}/{t}" for m, t in want if ctx.m.eval(m, t) is None]
    return len(want) - len(missing), len(want), missing


def recorded_cpu_class(num: dict) -> str:
    """The CPU class of a metrics file's ``numerics``: as recorded, else derived from the processor flags and the
    oneDNN cap the fingerprint records (``magdi.precision.cpu_class`` of them)."""
    if num.get("cpu_class"):
        return num["cpu_class"]
    if not num.get("machine"):
        return "unknown (no fingerprint recorded)"
    from ..precision import Capabilities, cpu_class

    flags = set(num.get("cpu_matrix_flags") or [])
    if num.get("cpu_capability") in ("AVX512", "AVX2"):  # torch's own ISA level (AVX2 implies it is there)
        flags |= {"avx2"} | ({"avx512f"} if num["cpu_capability"] == "AVX512" else set())
    return cpu_class(Capabilities(num["machine"], frozenset(flags), onednn_max_isa=num.get("onednn_max_cpu_isa")))


def numerics_lines(metrics_dir: Path) -> list[str]:
    """What the runs computed in, read from each run's ``numerics`` (``magdi.precision``): one line when every
    training and evaluation ran on one CPU class with one resolution of ``auto``, and a caution naming the groups
    when a run in parts mixed machines (their numbers differ within the noise, not bit for bit)."""
    classes: dict[str, list[str]] = {}
    auto: dict[str, dict[str, list[str]]] = {"train": {}, "generate": {}}
    explicit: dict[str, set[str]] = {"train": set(), "generate": set()}
    for kind, what in (("train", "train"), ("eval", "generate")):
        for f in sorted((metrics_dir / kind).glob("*/*.json")):
            if f.name.endswith("_history.json"):
                continue
            try:
                num = json.loads(f.read_text()).get("numerics") or {}
            except (OSError, json.JSONDecodeError):
                continue
            run = f"{kind}/{f.parent.name}/{f.stem}"
            classes.setdefault(recorded_cpu_class(num), []).append(run)
            prec = num.get("precision") or {}
            dtype, reason = prec.get(what), prec.get("reason", "")
            if dtype is None:
                continue
            if "set explicitly" in reason:
                explicit[what].add(dtype)
            else:
                auto[what].setdefault(dtype, []).append(run)
    if not classes:
        return []
    desc = "; ".join(f"{w}: " + ", ".join(f"`{d}` ({len(r)} runs)" for d, r in sorted(auto[w].items()))
                     + (f" (+ explicit {', '.join(sorted(explicit[w]))})" if explicit[w] else "")
                     for w in ("train", "generate") if auto[w] or explicit[w])
    if len(classes) == 1 and all(len(a) <= 1 for a in auto.values()):
        return [f"- numerics: every run on CPU class `{next(iter(classes))}`; precision {desc} "
                "(`numerics` in each metrics file; `python -m magdi precision`)"]
    groups = "; ".join(f"`{c}`: {len(r)} runs (e.g. {r[0]})" for c, r in sorted(classes.items()))
    return [f"- **numerics differ between runs**: CPU classes {groups}; precision {desc}. A run in parts should "
            "keep every part on one CPU class: results of another class differ within the noise, not bit for bit "
            "(compare `outputs_sha256` and `numerics` in the metrics files)."]


def _accuracies(ctx: Ctx) -> dict[str, dict[str, float]]:
    """task -> method -> accuracy % of every main-matrix run evaluated (what the ordering verdicts read)."""
    out: dict[str, dict[str, float]] = {}
    for t in ctx.tasks:
        for m in ctx.main_methods():
            if (a := ctx.m.acc(m, t)) is not None:
                out.setdefault(t, {})[m] = 100 * a
    return out


def write_readme(ctx: Ctx, out: Path, files: list[Path]) -> Path:
    p = ctx.params
    have, total, missing = _coverage(ctx)
    setup = p.magdi_setup()
    mags = {t: n for t, (n, _) in setup.items()}
    lrs, epochs = {t: c.lr for t, (_, c) in setup.items()}, {t: c.epochs for t, (_, c) in setup.items()}
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
        f"up to {per_task({t: p.teachers.rounds(t) + 1 for t in p.experiments.tasks})} rounds per question "
        "(round 0, then discussion rounds until consensus)",
        f"- data: {per_task(mags)} training questions per task (→ MAGs), n_test={p.data.n_test} test questions "
        f"per task, source `{p.data.source}`",
        f"- tasks: {', '.join(p.experiments.tasks)}; OOD: {', '.join(p.experiments.ood_tasks) or 'none'}; "
        f"ablation tasks: {', '.join(p.experiments.ablation_tasks) or 'none'}",
        f"- training: {per_task(epochs)} epoch(s), lr {per_task(lrs, 'g')}, MAGDi loss weights ntp/contrastive/graph "
        f"{per_task({t: loss_weights(c.weights) for t, (_, c) in setup.items()})}"
        f", graph `{p.train.graph}`, encoder "
        f"`{p.train.encoder}`, node_repr `{p.train.node_repr}`",
        *numerics_lines(ctx.m.metrics_dir),
        f"- evaluation cells found: {have} of {total}" + (
            f" (missing, shown as —: {', '.join(missing[:20])}"
            + (f", … {len(missing) - 20} more" if len(missing) > 20 else "") + ")" if missing else ""),
        "",
        "## What these results show",
        "",
        "Per task, is the paper's ordering reproduced? (accuracy % on the test questions; a step is shown only where "
        "its paired McNemar p < 0.05, `significance.md`)",
        "",
        *(ordering_verdicts(_accuracies(ctx), [c.row() for c in significance(ctx)])
          or ["- not enough runs evaluated to compare."]),
        "",
        "## Caution",
        "",
        f"- This run (profile `{p.profile}`): student `{p.student.model}`, teachers "
        f"{', '.join(f'`{a.name}`' + (f' ({a.model})' if a.backend != 'reference' else '') for a in p.teachers.agents)}, "
        f"{per_task(mags)} MAGs per task and {p.data.n_test} test questions per task. Small teachers and few MAGs "
        "against the paper's GPT-4/Bard/Claude and 1K MAGs: read every accuracy with its 95% interval, and every "
        "comparison with its paired interval and McNemar p-value (`significance.md`); a difference inside them "
        "says nothing.",
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
    pages = [f for f in files if f.suffix == ".html"]
    for f in files:
        key = f.stem if f.suffix in (".md", ".csv") else f.name
        if f.suffix in (".csv", ".html"):
            continue
        desc = DESCRIPTIONS.get(key, "")
        extra = f" (+ `{key}.csv`, machine-readable, with a `source` column)" if f.suffix == ".md" else ""
        lines.append(f"- `{f.name}`{extra}: {desc}")
    if pages:
        lines += ["", "## Pages: what produced the numbers", "",
                  "Self-contained HTML (inline CSS and SVG, no network, no server): open them from a clone, or "
                  "download them from the repository host's file viewer. Model text is shown escaped, as text.", ""]
        for f in pages:
            rel = f.relative_to(out).as_posix()
            kind = ("MAG browser: every teachers' discussion (graph, each node's reasoning, answer, confidence), "
                    "per-agent summary, filters by graph type / team result / agent" if f.parent.name == "mags" else
                    "predictions: every test question on which the Table 1 methods disagree, each method's output "
                    "side by side, and the (right, wrong) counts behind McNemar's test")
            kb, rows = f.stat().st_size / 1024, f.read_text(encoding="utf-8").count('<section class="row')
            what = ("MAG" if f.parent.name == "mags" else "question") + ("" if rows == 1 else "s")
            per = f", {kb / rows:.1f} KB per entry" if rows else ""
            lines.append(f"- [`{rel}`]({rel}) ({kb:.0f} KB: {rows} {what}{per}): {kind}.")
        lines += ["", "Page size grows linearly with what it shows: each MAG carries its nodes' full reasoning "
                  "(teachers' max_new_tokens bounds it) plus a small SVG, each prediction row the methods' full "
                  "outputs (evaluate.max_new_tokens bounds them); nothing else is embedded."]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path

