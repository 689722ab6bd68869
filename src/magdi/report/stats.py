"""Paired significance of every comparison the paper makes, on the same test questions.

Two methods evaluated on the same questions are paired: per question both are right, only one is, or neither.
The accuracy difference gets a paired bootstrap 95% interval (resample questions, keep each question's pair),
and McNemar's exact test looks only at the discordant questions (one right, the other wrong): under "no
difference" each discordant question is a fair coin, so the p-value is a two-sided binomial test of
``n01`` successes in ``n01 + n10`` trials at 0.5. Both are far more sensitive than comparing two unpaired CIs.

Comparisons (only between methods whose predictions exist): MAGDi vs zero-shot, MAGDi vs each ``sit_<agent>``,
MAGDi vs the best SiT student and the best SiT student vs zero-shot (the teachers' own accuracy on the TEST questions is never measured, so the best
single-teacher *student* stands in for "the best teacher"), and each MAGDi level vs the nearest lower one
present (magdi_r0 < magdi_cn < magdi_an < magdi); beyond the paper, each preference-optimisation method (dpo,
magdi_dpo) vs MAGDi and vs the best SiT student.

Many comparisons are made at once, so ``p_holm`` adjusts the McNemar p-values with Holm's step-down method over
all of the run's comparisons (family-wise error ≤ α). Which decides: McNemar's exact test (with Holm for a claim
about the family); the bootstrap interval gives the size. The two can disagree at the edge (an interval that
just excludes 0 with p slightly above α): the interval is a percentile bootstrap of a mean of −1/0/+1 values and
is slightly too narrow on a few hundred questions, while the exact test makes no approximation, so a difference
is called significant only by the test. ``minimum_detectable_difference`` says what effect size a task's number
of questions can show at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import brentq
from scipy.stats import binomtest, bootstrap, norm
from statsmodels.stats.multitest import multipletests

from ..names import BEYOND_PAPER_METHODS
from .format import DASH, md_table
from .loader import Ctx

#: significance level of the marks in Table 1 and significance.md (a reporting convention, not a tunable)
ALPHA = 0.05
MAGDI = "magdi"
ZERO_SHOT = "zero_shot"
LEVELS = ("magdi_r0", "magdi_cn", "magdi_an", "magdi")
BEST_SIT = "best SiT student"
#: the label suffix of comparisons of methods beyond the paper (their Table 1 mark goes on method_a's cell)
BEYOND = "(beyond the paper)"
COLUMNS = ["task", "method_a", "method_b", "n", "acc_a", "acc_b", "diff", "ci_low", "ci_high", "p_mcnemar",
           "p_holm", "comparison"]


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, float]:
    """``(n01, n10, p)``: questions only ``a`` got right, only ``b`` got right, and McNemar's exact two-sided
    p-value (binomial test on the discordant pairs; 1.0 when there are none)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    n01 = sum(x and not y for x, y in zip(a, b, strict=True))
    n10 = sum(y and not x for x, y in zip(a, b, strict=True))
    p = 1.0 if n01 + n10 == 0 else float(binomtest(n01, n01 + n10, 0.5).pvalue)
    return n01, n10, min(p, 1.0)


def paired_bootstrap_ci(a: Sequence[bool], b: Sequence[bool], samples: int = 1000,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of ``acc(a) - acc(b)``, resampling questions with their pair.

    The per-question differences ``a_i - b_i`` carry the pairing, so the interval of their mean is the paired
    interval (resampling ``a`` and ``b`` independently would ignore that both saw the same question).
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) == 0:
        return (0.0, 0.0)
    if len(d) == 1 or np.all(d == d[0]):
        return (float(d[0]), float(d[0]))
    ci = bootstrap((d,), np.mean, n_resamples=samples, method="percentile", confidence_level=0.95,
                   rng=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


@dataclass
class Comparison:
    task: str
    method_a: str
    method_b: str
    n: int
    acc_a: float
    acc_b: float
    diff: float
    ci_low: float
    ci_high: float
    p_mcnemar: float
    comparison: str
    #: McNemar's p adjusted by Holm's method over every comparison of the run (set by :func:`significance`)
    p_holm: float = float("nan")
    #: the 2x2 table of (a, b) correctness: both right, only a, only b, both wrong
    both_right: int = 0
    a_only: int = 0
    b_only: int = 0
    both_wrong: int = 0

    @property
    def significant(self) -> bool:
        return self.p_mcnemar < ALPHA

    def row(self) -> dict:
        """The CSV row: accuracies and the interval in percent (as every table CSV), p as a probability."""
        d = asdict(self)
        for k in ("acc_a", "acc_b", "diff", "ci_low", "ci_high"):
            d[k] = round(100 * d[k], 4)
        d["p_mcnemar"] = round(d["p_mcnemar"], 6)
        d["p_holm"] = round(d["p_holm"], 6)
        return {k: d[k] for k in COLUMNS}


def compare(task: str, method_a: str, method_b: str, preds_a: dict[str, dict], preds_b: dict[str, dict],
            label: str, samples: int = 1000, seed: int = 0) -> Comparison | None:
    """Compare two methods on the questions both answered (by id); ``None`` when they share none."""
    ids = [i for i in preds_a if i in preds_b]
    if not ids:
        return None
    a = [bool(preds_a[i]["correct"]) for i in ids]
    b = [bool(preds_b[i]["correct"]) for i in ids]
    n01, n10, p = mcnemar_exact(a, b)
    lo, hi = paired_bootstrap_ci(a, b, samples, seed)
    n = len(ids)
    both = sum(x and y for x, y in zip(a, b, strict=True))
    return Comparison(task, method_a, method_b, n, sum(a) / n, sum(b) / n, (sum(a) - sum(b)) / n, lo, hi, p, label,
                      both_right=both, a_only=n01, b_only=n10, both_wrong=n - both - n01 - n10)


def best_sit(ctx: Ctx, task: str) -> str | None:
    """The ``sit_*`` method with the highest test accuracy on ``task`` (first in params order on ties)."""
    best, best_acc = None, -1.0
    for m in ctx.params.experiments.methods:
        preds = ctx.m.predictions(m, task) if m.startswith("sit_") else None
        if preds:
            acc = sum(bool(r["correct"]) for r in preds.values()) / len(preds)
            if acc > best_acc:
                best, best_acc = m, acc
    return best


def significance(ctx: Ctx) -> list[Comparison]:
    """Every paired comparison of the run (computed once per report, cached on ``ctx``)."""
    if "significance" in ctx.cache:
        return ctx.cache["significance"]
    ev = ctx.params.evaluate
    out: list[Comparison] = []
    for t in ctx.tasks:
        have = {m: p for m in ctx.main_methods() if (p := ctx.m.predictions(m, t))}

        def add(a: str, b: str, label: str, task: str = t, have: dict = have) -> None:
            if a in have and b in have:
                c = compare(task, a, b, have[a], have[b], label, ev.bootstrap_samples, ev.seed)
                if c is not None:
                    out.append(c)

        add(MAGDI, ZERO_SHOT, "MAGDi vs zero-shot")
        for m in ctx.params.experiments.methods:
            if m.startswith("sit_"):
                add(MAGDI, m, "MAGDi vs single-teacher student")
        if (bs := best_sit(ctx, t)) is not None:
            add(MAGDI, bs, f"MAGDi vs {BEST_SIT}")
            add(bs, ZERO_SHOT, f"{BEST_SIT} vs zero-shot")  # the paper's ordering: MAGDi > best SiT > zero-shot
        present = [lv for lv in LEVELS if lv in have]
        for lower, upper in zip(present, present[1:], strict=False):
            add(upper, lower, "level vs the level below")
        for m in BEYOND_PAPER_METHODS:
            add(m, MAGDI, f"{m} vs MAGDi {BEYOND}")
            if (bs := best_sit(ctx, t)) is not None:
                add(m, bs, f"{m} vs {BEST_SIT} {BEYOND}")
    for r in ctx.students():
        for t in r.tasks if r.magdi != MAGDI else []:  # the main student's pair is above
            pa, pb = ctx.m.predictions(r.magdi, t), ctx.m.predictions(r.zero_shot, t)
            if pa and pb and (c := compare(t, r.magdi, r.zero_shot, pa, pb, f"MAGDi vs zero-shot, student {r.label}",
                                           ev.bootstrap_samples, ev.seed)):
                out.append(c)
    for c, p in zip(out, holm([c.p_mcnemar for c in out]), strict=True):
        c.p_holm = p
    ctx.cache["significance"] = out
    return out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (statsmodels ``multipletests(method="holm")``): the i-th smallest of m
    p-values becomes ``max_{j<=i} min(1, (m - j + 1) p_(j))``."""
    if not pvalues:
        return []
    return [float(x) for x in multipletests(list(pvalues), alpha=ALPHA, method="holm")[1]]


def minimum_detectable_difference(n: int, discordant: float, alpha: float = ALPHA, power: float = 0.8) -> float:
    """Smallest accuracy difference (a proportion) that a paired comparison on ``n`` questions detects with
    ``power`` at two-sided ``alpha`` when a share ``discordant`` of the questions is answered right by exactly one
    of the two methods: the difference ``d`` solving Connor's (1987) sample-size formula for McNemar's test,
    ``n d² = (z_{1-α/2} √ψ + z_power √(ψ − d²))²`` with ψ the discordant share. ``nan`` without discordance."""
    psi = float(discordant)
    if n <= 0 or psi <= 0:
        return float("nan")
    za, zb = norm.ppf(1 - alpha / 2), norm.ppf(power)

    def gap(d: float) -> float:
        return n * d * d - (za * psi**0.5 + zb * max(psi - d * d, 0.0) ** 0.5) ** 2

    hi = psi ** 0.5  # d² cannot exceed ψ (|p01 − p10| <= p01 + p10)
    return float(brentq(gap, 1e-9, hi)) if gap(hi) > 0 else float("nan")


def detectable_by_task(comps: Sequence[Comparison]) -> dict[str, tuple[int, float, float]]:
    """Per task: (questions, mean discordant share over its comparisons, minimum detectable difference)."""
    out: dict[str, tuple[int, float, float]] = {}
    for t in dict.fromkeys(c.task for c in comps):
        cs = [c for c in comps if c.task == t]
        n = max(c.n for c in cs)
        psi = float(np.mean([(c.a_only + c.b_only) / c.n for c in cs]))
        out[t] = (n, psi, minimum_detectable_difference(n, psi))
    return out


def table1_marks(ctx: Ctx) -> dict[tuple[str, str], str]:
    """``(method, task) -> "*"`` for the Table 1 cells whose comparison partner differs significantly: MAGDi for
    the zero-shot and SiT rows, the next level up for magdi_r0 / magdi_cn / magdi_an."""
    marks = {(c.method_b, c.task): "*" for c in significance(ctx)
             if c.significant and not c.comparison.startswith((f"MAGDi vs {BEST_SIT}", f"{BEST_SIT} vs zero-shot"))
             and BEYOND not in c.comparison}
    marks.update({(c.method_a, c.task): "*" for c in significance(ctx)
                  if c.significant and c.comparison == f"{c.method_a} vs MAGDi {BEYOND}"})
    return marks


def write_significance(ctx: Ctx, out_dir: Path) -> list[Path]:
    """``significance.csv`` (the columns of :data:`COLUMNS`) and ``significance.md``."""
    comps = significance(ctx)
    csv, md = out_dir / "significance.csv", out_dir / "significance.md"
    pd.DataFrame([c.row() for c in comps], columns=COLUMNS).to_csv(csv, index=False)
    ev = ctx.params.evaluate
    rows = [[c.task, c.method_a, c.method_b, c.n, f"{100 * c.acc_a:.1f}", f"{100 * c.acc_b:.1f}",
             f"{100 * c.diff:+.1f}", f"[{100 * c.ci_low:+.1f}, {100 * c.ci_high:+.1f}]",
             f"{c.a_only} / {c.b_only}", f"{c.p_mcnemar:.3g}" + (" *" if c.significant else ""),
             f"{c.p_holm:.3g}" + (" *" if c.p_holm < ALPHA else ""), c.comparison]
            for c in comps]
    mdd = detectable_by_task(comps)
    lines = [
        "# Paired significance: every comparison on the same test questions",
        "",
        f"- Paired bootstrap 95% interval of the accuracy difference (a − b, percentage points; "
        f"{ev.bootstrap_samples} resamples of the questions, seed {ev.seed}) and McNemar's exact two-sided "
        f"p-value (binomial test on the discordant questions). `*` = p < {ALPHA}.",
        "- Compared only where both methods' predictions exist (runs/eval); n = test questions both answered.",
        f"- `MAGDi vs {BEST_SIT}`: the sit_* method with the highest accuracy on that task's test questions. The "
        "teachers' own accuracy on the TEST questions is never measured (they discuss the training questions), so "
        "the best single-teacher student stands in for the best teacher; it repeats one of the SiT rows.",
        "- Levels: each of magdi_r0 < magdi_cn < magdi_an < magdi vs the nearest lower level present.",
        "- Tiny test sets (CPU default) give few discordant questions: p-values near 1 and wide intervals are "
        "expected there and mean *no evidence*, not *no difference*.",
        "",
        md_table(["task", "a", "b", "n", "acc a %", "acc b %", "diff", "95% CI (paired)", "only a / only b right",
                  "p McNemar", "p Holm", "comparison"], rows) if rows
        else f"_no comparison possible: predictions missing {DASH}_\n",
        "",
        "## What this many questions can show",
        "",
        f"Minimum detectable difference per task: the smallest accuracy difference a paired comparison on that "
        f"task's questions detects with 80 % power at two-sided α = {ALPHA} (McNemar, Connor 1987), given the share "
        "of questions on which exactly one of two methods is right (the mean over the task's comparisons above). "
        "A true difference smaller than this is more likely missed than found.",
        "",
        md_table(["task", "questions", "discordant share %", "minimum detectable difference (points)"],
                 [[t, n, f"{100 * psi:.1f}", f"{100 * d:.1f}"] for t, (n, psi, d) in mdd.items()]) if mdd
        else f"_{DASH}_\n",
        "",
        "## Which test decides",
        "",
        "McNemar's exact test decides whether a difference is significant (`*`); Holm's column is the claim for "
        "the whole family of comparisons at once. The bootstrap interval gives the size of the difference. Where "
        "they disagree (an interval that just excludes 0 with p just above α, or the reverse), the test decides: "
        "the percentile bootstrap of a mean of −1/0/+1 values is slightly too narrow on a few hundred questions, "
        "the exact test makes no approximation.",
    ]
    md.write_text("\n".join(lines))
    return [md, csv]


def ordering_verdicts(acc: dict[str, dict[str, float]], comps: Sequence[dict]) -> list[str]:
    """Per task, in words: is the paper's ordering reproduced? (1) the MAGDi levels increase (magdi_r0 <= magdi_cn
    <= magdi_an <= magdi, over the levels present), and (2) MAGDi > best SiT student > zero-shot. ``acc``: task ->
    method -> accuracy %; ``comps``: significance.csv rows (``p_mcnemar``), to say whether a step is significant.
    A step goes the paper's way when the accuracy does; it is *shown* only when its McNemar p < α as well."""
    def p_of(task: str, a: str, b: str) -> float | None:
        for c in comps:
            if c["task"] == task and {c["method_a"], c["method_b"]} == {a, b}:
                return float(c["p_mcnemar"])
        return None

    def step(task: str, hi: str, lo: str, a: dict[str, float]) -> tuple[bool, bool, str]:
        ok = a[hi] > a[lo]
        p = p_of(task, hi, lo)
        shown = ok and p is not None and p < ALPHA
        sig = "" if p is None else (f", p = {p:.3g}" + (" (significant)" if p < ALPHA else ""))
        return ok, shown, f"{hi} {a[hi]:.1f} {'>' if ok else '=' if a[hi] == a[lo] else '<'} {lo} {a[lo]:.1f}{sig}"

    def verdict(steps: list[tuple[bool, bool, str]]) -> str:
        if not all(ok for ok, _, _ in steps):
            return "**no**"
        return "**yes**, every step significant" if all(sh for _, sh, _ in steps) else \
            "**in direction only** (not every step significant)"

    out = []
    for task, a in acc.items():
        parts = []
        levels = [lv for lv in LEVELS if lv in a]
        if len(levels) >= 2:
            steps = [step(task, hi, lo, a) for lo, hi in zip(levels, levels[1:], strict=False)]
            parts.append(f"levels increase: {verdict(steps)} ({'; '.join(s for _, _, s in steps)})")
        sits = {m: v for m, v in a.items() if m.startswith("sit_") and "@" not in m}
        if MAGDI in a and ZERO_SHOT in a and sits:
            best = max(sits, key=lambda m: sits[m])
            steps = [step(task, MAGDI, best, a), step(task, best, ZERO_SHOT, a)]
            parts.append(f"MAGDi > best SiT > zero-shot: {verdict(steps)} ({'; '.join(s for _, _, s in steps)})")
        if parts:
            out.append(f"- {task}: " + "; ".join(parts) + ".")
    return out
