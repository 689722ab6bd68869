"""Rewrite the results block at the top of README.md from a finished `make repro`: the timestamped log
(benchmarks/profile_repro.py stamp), reports/table1_main.md, reports/table7_student_scaling.md,
reports/significance.csv and reports/benchmark_eval_numerics.json. Nothing in the block is typed by hand.

    python tools/update_readme.py /path/to/repro.log
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
START = "Measured on this workplace's 2-core CPU machine"
END = "## What it does"


def ours_tables(md: str) -> list[str]:
    """The markdown tables of the 'ours' sections of a report table, in order."""
    return [m.group(1).strip() for m in re.finditer(r"## ours[^\n]*\n\n?(\|.*?)(?:\n\n|\n##|$)", md, flags=re.S)]


def merged(rows: list[dict]) -> list[dict]:
    """One row per (task, method_a, method_b): a pair that answers two questions (with one SiT student, "vs each
    SiT" and "vs the best SiT" are the same comparison) is listed once, with both labels."""
    out: dict[tuple[str, str, str], dict] = {}
    for r in rows:
        key = (r["task"], r["method_a"], r["method_b"])
        if key in out:
            out[key]["comparison"] += f"; {r['comparison']}"
        else:
            out[key] = dict(r)
    return list(out.values())


def significance_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in merged(rows):
        p = float(r["p_mcnemar"])
        verdict = "**significant** (p < 0.05)" if p < 0.05 else "not significant"
        out.append(f"- {r['task']}: {r['method_a']} vs {r['method_b']} ({r['comparison']}): "
                   f"{float(r['acc_a']):.1f} vs {float(r['acc_b']):.1f} %, difference {float(r['diff']):+.1f} points "
                   f"[{float(r['ci_low']):+.1f}, {float(r['ci_high']):+.1f}], McNemar p = {p:.3g}: {verdict}")
    return out


def summary(rows: list[dict]) -> str:
    rows = merged(rows)
    sig = [r for r in rows if float(r["p_mcnemar"]) < 0.05]
    if not sig:
        return "No comparison reaches p < 0.05 in this run."
    parts = [f"{r['method_a']} vs {r['method_b']} on {r['task']} ({float(r['diff']):+.1f} points)" for r in sig]
    return f"{len(sig)} of {len(rows)} comparisons reach p < 0.05: " + "; ".join(parts) + ". The others do not."


def setup_sentence() -> str:
    """What the default experiment is, read from params.yaml and the run's metrics (nothing typed by hand)."""
    from magdi.config import parse_params
    from magdi.report.format import loss_weights, per_task

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    p = parse_params(params)
    models = params["models"]
    teachers = ", ".join(f"{a['name']} ({models[a['model']]['description'].split(',')[0]})"
                         if a.get("model") in models else a["name"] for a in params["teachers"]["agents"])
    student = params["student"]["model"]
    zs = sorted((ROOT / "metrics/eval/zero_shot").glob("*.json"))
    n_params = json.loads(zs[0].read_text())["student_parameters"] if zs else None
    size = f", {n_params / 1e6:.0f} M parameters" if n_params else ""
    desc = models[student]["description"].split(",")[0] if student in models else student
    setup = p.magdi_setup()
    epochs = {t: c.epochs for t, (_, c) in setup.items()}
    plural = "s" if any(e != 1 for e in epochs.values()) else ""
    sizes = {t: n for t, (n, _) in setup.items()}
    mags = (f"{per_task(sizes)} discussions (MAGs) per task" if len(set(sizes.values())) <= 1
            else f"discussions (MAGs) per task: {per_task(sizes)},")
    rounds = {t: p.teachers.rounds(t) + 1 for t in setup}  # round 0 + the task's discussion rounds, at most
    rounds_txt = (f"with {per_task(rounds)} rounds" if len(set(rounds.values())) <= 1
                  else f"with rounds per task (at most): {per_task(rounds)}")
    return (f"The default is a real but small MAGDi experiment: teachers {teachers}; "
            f"{mags} {rounds_txt}; the student {desc}{size}; "
            f"{per_task(epochs)} epoch{plural} at learning rate {per_task({t: c.lr for t, (_, c) in setup.items()}, 'g')}"
            f"; MAGDi loss weights ntp/contrastive/graph {per_task({t: loss_weights(c.weights) for t, (_, c) in setup.items()})}.")


def decoding_noise_sentence(path: Path) -> str:
    """What the same adapters score under another CPU kernel path (benchmarks/bench_eval_numerics.py), so the
    reader can size the differences above against the noise of decoding itself; empty when not measured."""
    if not path.exists():
        return ""
    d = json.loads(path.read_text())
    base, other = d["settings"][0], d["settings"][1:]
    parts = []
    for m, by in d["methods"].items():
        accs = ", ".join(f"{100 * by[s]['accuracy']:.1f} % with {s}" for s in [base, *other])
        diff = ", ".join(f"{by[s]['outputs_differing']} of {by[s]['n']} answers differ under {s}" for s in other)
        parts.append(f"{m} {accs} ({diff})")
    verdict = ""
    if "comparison" in d:  # written by bench_eval_numerics since session 12
        c = d["comparison"]
        per = "; ".join(f"{100 * x['diff']:+.1f} points [{100 * x['ci_low']:+.1f}, {100 * x['ci_high']:+.1f}], "
                        f"p = {x['p_mcnemar']:.3g} with {s}" for s, x in c["by_setting"].items())
        verdict = f" The comparison {c['method_a']} vs {c['method_b']} there: {per}."
    return (f"Decoding itself is noisy at this size: greedy bf16 decoding on the CPU depends on which matrix "
            f"kernels oneDNN picks, and the same adapters on the same {d['task']} test questions score "
            f"{'; '.join(parts)} ([reports/benchmark_eval_numerics.md](reports/benchmark_eval_numerics.md); each "
            f"evaluation records its kernels in `metrics/eval/*` under `numerics`).{verdict} A difference of that "
            "size between methods is not evidence of either.")


def recorded_cpu_class(num: dict) -> str:
    from magdi.report.readme import recorded_cpu_class as rc

    return rc(num)


def numerics_sentence(metrics: Path, precision_json: Path) -> str:
    """The CPU class and precision the run's metrics record (``numerics``), and the `make repro` time derived for a
    CPU without native bf16 from ``reports/benchmark_precision.json`` (benchmarks/bench_precision.py)."""
    classes, prec = set(), {"train": set(), "generate": set()}
    for kind, what in (("train", "train"), ("eval", "generate")):
        for f in (metrics / kind).glob("*/*.json"):
            num = json.loads(f.read_text()).get("numerics") or {}
            classes.add(recorded_cpu_class(num))
            p = num.get("precision") or {}
            if p.get(what) and "@" not in f.parent.name:  # the main student's runs (a scaling student sets its own)
                prec[what].add(p[what])
    if not classes:
        return ""
    out = (f"The committed results ran on a CPU of class **{', '.join(sorted(classes))}**, where the main student "
           f"trained in {'/'.join(sorted(prec['train'])) or '?'} and decoded in "
           f"{'/'.join(sorted(prec['generate'])) or '?'} (`auto`; each metrics file's `numerics`).")
    if precision_json.is_file():
        d = json.loads(precision_json.read_text())
        if d.get("derived_minutes"):
            out += (f" On a CPU without native bf16 (AVX2 only) `auto` is float32 throughout; the run is derived to take "
                    f"about {d['derived_minutes'][1]:.0f} min there (training {d['r_train']:.2f}x and decoding "
                    f"{d['r_gen']:.2f}x the time, measured on this CPU held to AVX2 kernels, not on a real AVX2 "
                    "machine: [`reports/benchmark_precision.md`](reports/benchmark_precision.md)).")
    return out


def table1_accuracies(path: Path) -> dict[str, dict[str, float]]:
    """task -> method -> accuracy % of our rows of ``reports/table1_main.csv``."""
    out: dict[str, dict[str, float]] = {}
    for r in csv.DictReader(path.open()):
        if r.get("source") != "ours":  # the paper's transcribed rows sit in the same file
            continue
        for task in [k for k in r if f"{k}_n" in r]:  # a task column has its question count beside it
            if r[task] not in ("", None):
                out.setdefault(task, {})[r["method"]] = float(r[task])
    return out


def ordering_lines(rows: list[dict]) -> list[str]:
    from magdi.report.stats import ordering_verdicts

    return ordering_verdicts(table1_accuracies(ROOT / "reports/table1_main.csv"), rows)


def block(total_s: int, command: str = "make repro") -> str:
    t1 = ours_tables((ROOT / "reports/table1_main.md").read_text())[0]
    t7 = ours_tables((ROOT / "reports/table7_student_scaling.md").read_text())
    rows = list(csv.DictReader((ROOT / "reports/significance.csv").open()))
    scaling = any("@" in r["method_a"] for r in rows)
    t7_text = (f"Student scaling (Table 7: the same MAGs and recipe, a second student on the scaling task):\n\n"
               f"{t7[0]}\n\n{t7[1] if len(t7) > 1 else ''}\n\n" if scaling else "")
    return f"""{START} (fresh clone, nothing else of ours running, pip cache warm): `{command}`
took **{total_s // 60} min {total_s % 60} s** from the first line to the last, install included; where the time goes, stage by
stage, and exactly which run it was, is in [`reports/benchmark_pipeline.md`](reports/benchmark_pipeline.md). It replays the teachers' discussions
from the committed `teacher_cache/` ([`docs/teachers.md`](docs/teachers.md)); generating them is measured in
[`reports/teacher_generation.md`](reports/teacher_generation.md). `make test` runs the unit tests plus one end-to-end `dvc repro` + `dvc exp run -S` on tiny sizes.
{numerics_sentence(ROOT / "metrics", ROOT / "reports/benchmark_precision.json")}

The results of that run are committed: [`reports/`](reports/README.md) (tables and figures mirroring the
paper), `metrics/` (one JSON per run, `dvc metrics show`) and `dvc.lock`. What produced the numbers can be read
too: the teachers' discussions in a MAG browser per task (e.g. [`reports/mags/gsm8k.html`](reports/mags/gsm8k.html)),
every test question the methods disagree on in `reports/predictions/<task>.html`, and the paired significance of
every comparison (bootstrap interval + McNemar's exact test) in [`reports/significance.md`](reports/significance.md).

Table 1 of this run (accuracy %, 95 % bootstrap interval, 200 test questions per task; `*` marks a cell whose
paired comparison in `reports/significance.md` has p < 0.05; [all tables](reports/README.md)):

{t1}

{t7_text}**What these results show.** Is the paper's ordering reproduced, per task (from `reports/table1_main.csv` and
`reports/significance.csv`; a step counts as shown only where McNemar's exact p < 0.05)?

{chr(10).join(ordering_lines(rows))}

Every paired comparison (same test questions, paired bootstrap 95 % interval of the difference, McNemar's exact
test, Holm's adjustment over all of them in `reports/significance.md`):

{chr(10).join(significance_lines(rows))}

{summary(rows)} Read them for what they are.

{decoding_noise_sentence(ROOT / "reports/benchmark_eval_numerics.json")}
{setup_sentence()}
The size is what the 2-core machine allows (per-stage times in reports/benchmark_pipeline.md; generating the
discussions: reports/teacher_generation.md). A difference without "significant" above is inside the noise of
the test set; growing the experiment is one edit (`data.n_train`, or `data.n_train_by_task` for one task; the
cache keeps what was already generated) and more CPU time.

"""


def main(log: Path) -> None:
    stamps = [float(t) for t in re.findall(r"^\[(\d+\.\d+)\]", log.read_text(errors="replace"), flags=re.M)]
    total_s = round(stamps[-1] - stamps[0])  # first to last line of the timestamped `make repro` output
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(START), readme.index(END)
    from profile_repro import warm_server_use

    command = "make repro WARM=1" if warm_server_use(log)[0] else "make repro"
    (ROOT / "README.md").write_text(readme[:start] + block(total_s, command) + readme[end:])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
