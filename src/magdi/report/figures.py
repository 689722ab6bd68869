"""The paper's figures (PNG, matplotlib Agg), each a placeholder image with a reason when its data is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..mag import MAG, draw_mag
from .format import _num
from .loader import Ctx


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


def _avg_over(ctx: Ctx, method: str, key: str, tasks: list[str] | None = None) -> tuple[float | None, int]:
    """Mean of ``key`` over the tasks (default: experiments.tasks) where ``method`` has it, and how many."""
    vals = []
    for t in ctx.tasks if tasks is None else tasks:
        m = ctx.m.eval(method, t)
        if m is not None and _num(m.get(key)) is not None:
            vals.append(float(m[key]))
    return (sum(vals) / len(vals) if vals else None), len(vals)


def _avg_halfwidth(ctx: Ctx, method: str, tasks: list[str] | None = None) -> float | None:
    """Half-width (percentage points) of a 95 % interval of the mean accuracy over the tasks: each task's bootstrap
    interval taken as normal (half-width h_t = (high − low) / 2) and the tasks as independent, so
    h = √(Σ h_t²) / T. ``None`` if a task lacks its interval."""
    hs = []
    for t in ctx.tasks if tasks is None else tasks:
        m = ctx.m.eval(method, t)
        lo, hi = (_num(m.get("ci95_low")), _num(m.get("ci95_high"))) if m else (None, None)
        if lo is None or hi is None:
            return None
        hs.append((hi - lo) / 2)
    return 100 * (sum(h * h for h in hs) ** 0.5) / len(hs) if hs else None


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
    pts, errs = [], {}
    for meth in ctx.main_methods():
        a, n = _avg_over(ctx, meth, "accuracy")
        tok, _ = _avg_over(ctx, meth, "mean_tokens")
        if a is not None and tok is not None:
            lab = meth + ("*" if n < len(ctx.tasks) else "")
            pts.append((lab, tok, 100 * a, "C0"))
            errs[lab] = _avg_halfwidth(ctx, meth) if n == len(ctx.tasks) else None
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
    for lab, x, y, c in pts:
        if errs.get(lab) is not None:
            ax.errorbar([x], [y], yerr=[errs[lab]], color=c, capsize=3, lw=0.8, zorder=2)
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
                 f"avg over {', '.join(ctx.tasks)} (* = some tasks missing); bars: 95 % interval of the average",
                 fontsize=9)
    return _save(fig, ax, path)


def fig5(ctx: Ctx, out: Path) -> Path:
    """Accuracy vs student size, zero-shot and MAGDi with 95 % intervals: one panel per task that every student
    ran (each scaling task), so no panel mixes students evaluated on different tasks."""
    path = out / "fig5_student_scaling.png"
    runs = [r for r in ctx.students() if r.parameters]
    common = [t for t in runs[0].tasks if all(t in r.tasks for r in runs)] if runs else []
    title = "Fig. 5: student scaling"

    def point(method: str, task: str) -> tuple[float, float, float] | None:
        m = ctx.m.eval(method, task)
        if m is None:
            return None
        a, lo, hi = 100 * float(m["accuracy"]), _num(m.get("ci95_low")), _num(m.get("ci95_high"))
        return a, a - (100 * lo if lo is not None else a), (100 * hi if hi is not None else a) - a

    panels = {t: [(r, point(r.zero_shot, t), point(r.magdi, t)) for r in runs] for t in common}
    panels = {t: [p for p in pts if p[1] or p[2]] for t, pts in panels.items()}
    panels = {t: pts for t, pts in panels.items() if pts}
    if not panels:
        return _placeholder(path, title, "no zero_shot / magdi metrics with a student size yet")
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (task, pts) in zip(axes[0], panels.items(), strict=True):
        xs = [r.parameters / 1e6 for r, _, _ in pts]
        for i, lab, c in ((1, "No Teacher (zero-shot)", "C7"), (2, "MAGDi", "C0")):
            have = [(x, p[i]) for x, p in zip(xs, pts, strict=True) if p[i] is not None]
            ax.errorbar([x for x, _ in have], [v[0] for _, v in have],
                        yerr=[[v[1] for _, v in have], [v[2] for _, v in have]], fmt="o-", color=c, capsize=3,
                        label=lab, zorder=3)
        for (r, _, _), x in zip(pts, xs, strict=True):
            ax.annotate(r.label, (x, 0), xycoords=("data", "axes fraction"), xytext=(0, 4),
                        textcoords="offset points", ha="center", fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("student parameters (millions)")
        ax.set_ylabel("accuracy % [95% CI]")
        ax.set_title(f"{title}: {task}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    terms = [t for t in ("loss", "ntp", "contrastive", "graph", "dpo") if any(t in h.columns for h in curves.values())]
    plt = _plt()
    fig, axes = plt.subplots(1, len(terms), figsize=(3.4 * len(terms), 3.8), squeeze=False)
    for ax, term in zip(axes[0], terms, strict=True):
        for i, (meth, h) in enumerate(curves.items()):
            if term in h.columns:
                ax.plot(h["step"], h[term], label=meth, lw=1, color=f"C{i % 10}")
        ax.set_title({"loss": "total loss", "ntp": "L_ntp", "contrastive": "L_contrastive", "graph": "L_graph",
                      "dpo": "L_DPO"}[term], fontsize=9)
        ax.set_xlabel("micro-step")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=7, frameon=False)
    fig.suptitle(f"Training loss terms per method on {task} (metrics/train/<method>/{task}_history.csv)", fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
