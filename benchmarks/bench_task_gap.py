"""Teacher-student gap per candidate task, on VALIDATION questions (never test ones).

Which non-arithmetic task gives the teachers the most to distil? Each model (the student, and teachers given by
their ``models`` key) answers the same validation questions of each task with the evaluation's own prompt,
decoding and scoring (``magdi.evaluate.evaluate_examples``, greedy at temperature 0, ``evaluate.batch_size``,
the task's ``evaluate.limit``), in ``student.gen_dtype``. The validation questions are
``bench_recipe.validation_questions``: the ``--n-val`` training-pool questions after the task's
``data.n_train_by_task`` MAG questions of the seeded draw (disjoint from the MAGs and the test set; it asserts so).
Set the candidate tasks' MAG count in params to what the task will get (e.g. 100) before `download`, so the
validation questions stay disjoint from the MAGs the chosen task will be given.

    HF_HUB_OFFLINE=1 python benchmarks/bench_task_gap.py --tasks strategyqa ecqa arc_challenge \\
        --models student qwen_coder_1_5b [smollm2_135m] --n-val 60

Per task: each model's accuracy with its bootstrap 95 % interval, the paired difference teacher - student with
its paired bootstrap interval and McNemar's exact p (``magdi.report.stats``), the truncated share. Predictions
go to ``runs/bench_task_gap/<task>/<model>.jsonl`` (+ ``.meta.json``); a rerun reuses those made on the same
question ids, dtype and limit. Report: ``reports/benchmark_task_gap.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench_recipe import validation_questions

ROOT = Path(__file__).resolve().parents[1]

STUDENT = "student"


def model_label(p, name: str) -> str:
    return f"student ({p.student.model})" if name == STUDENT else name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--tasks", nargs="+", default=["strategyqa", "ecqa", "arc_challenge"])
    ap.add_argument("--models", nargs="+", default=[STUDENT, "qwen_coder_1_5b"],
                    help="'student' (models/student) and/or keys of `models` (packaged teachers)")
    ap.add_argument("--n-val", type=int, default=60)
    ap.add_argument("--workdir", default="runs/bench_task_gap")
    ap.add_argument("--out", default="reports/benchmark_task_gap.md")
    a = ap.parse_args()
    if STUDENT not in a.models:
        raise SystemExit("--models must include 'student': the gaps are teacher - student")

    import torch

    from magdi.config import TASK_TYPES, cli_params
    from magdi.evaluate import (
        bootstrap_ci,
        evaluate_examples,
        hf_generator,
        numerics_fingerprint,
        prediction_rows,
    )
    from magdi.pipeline import _load_teacher, _set_threads, decoding, generation_precision
    from magdi.precision import capabilities, cpu_class
    from magdi.report.stats import mcnemar_exact, paired_bootstrap_ci

    _set_threads()
    p = cli_params(a.params)
    dtype = p.student.gen_dtype
    ev = p.evaluate
    val = {t: validation_questions(p, t, a.n_val) for t in a.tasks}
    work = Path(a.workdir)

    def meta_of(task: str) -> dict:
        return {"ids": [r["id"] for r in val[task]], "dtype": str(dtype), "limit": ev.limit(task),
                "decoding": decoding(p, 1)}

    def cached(task: str, name: str) -> tuple[list[dict], dict] | None:
        f, m = work / task / f"{name}.jsonl", work / task / f"{name}.meta.json"
        if not (f.exists() and m.exists()):
            return None
        meta = json.loads(m.read_text())
        if {k: meta.get(k) for k in meta_of(task)} != json.loads(json.dumps(meta_of(task))):
            return None
        return [json.loads(ln) for ln in f.read_text().splitlines()], meta

    results: dict[str, dict[str, tuple[list[dict], dict]]] = {t: {} for t in a.tasks}
    for name in a.models:
        todo = [t for t in a.tasks if cached(t, name) is None]
        if todo:
            t0 = time.perf_counter()
            lm, tok = _load_teacher(p, name, dtype)
            load_s = time.perf_counter() - t0
            print(f"{name}: loaded in {load_s:.0f} s ({dtype})", file=sys.stderr, flush=True)
            gen = hf_generator(lm, tok)
            for t in todo:
                t1 = time.perf_counter()
                preds = evaluate_examples(gen, tok, val[t], t, TASK_TYPES[t], ev.batch_size, ev.limit(t), "", k=1,
                                          **decoding(p, 1))
                secs = time.perf_counter() - t1
                (work / t).mkdir(parents=True, exist_ok=True)
                with (work / t / f"{name}.jsonl").open("w") as f:
                    for row in prediction_rows(preds):
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                meta = {**meta_of(t), "seconds": round(secs, 1), "load_seconds": round(load_s, 1),
                        "numerics": numerics_fingerprint()}
                (work / t / f"{name}.meta.json").write_text(json.dumps(meta, indent=1))
                print(f"{name} {t}: {sum(pr.correct for pr in preds)}/{len(preds)} in {secs:.0f} s",
                      file=sys.stderr, flush=True)
            del lm, gen
        for t in a.tasks:
            results[t][name] = cached(t, name)

    # ------------------------------------------------------------------ statistics
    B, seed = ev.bootstrap_samples, ev.seed
    rows = []
    for t in a.tasks:
        limit = ev.limit(t)
        correct = {m: [bool(r["correct"]) for r in results[t][m][0]] for m in a.models}
        per_model = {}
        for m in a.models:
            preds, meta = results[t][m]
            c = correct[m]
            lo, hi = bootstrap_ci(c, B, seed)
            per_model[m] = {"n": len(c), "acc": sum(c) / len(c), "ci": [lo, hi],
                            "truncated": sum(r["n_tokens"] >= limit for r in preds) / len(preds),
                            "unparsed": sum(r["parsed"] is None for r in preds),
                            "mean_tokens": sum(r["n_tokens"] for r in preds) / len(preds),
                            "seconds": meta["seconds"], "load_seconds": meta.get("load_seconds")}
        gaps = {}
        for m in a.models:
            if m == STUDENT:
                continue
            n01, n10, pv = mcnemar_exact(correct[m], correct[STUDENT])
            lo, hi = paired_bootstrap_ci(correct[m], correct[STUDENT], B, seed)
            gaps[m] = {"diff": per_model[m]["acc"] - per_model[STUDENT]["acc"], "ci": [lo, hi], "p_mcnemar": pv,
                       "teacher_only": n01, "student_only": n10}
        rows.append({"task": t, "n_val": len(val[t]), "n_mags": p.data.train_size(t), "limit": limit,
                     "models": per_model, "gaps": gaps})

    main_teacher = next(m for m in a.models if m != STUDENT)
    best = max(rows, key=lambda r: r["gaps"][main_teacher]["diff"])
    others = [r for r in rows if r is not best]
    overlap = [r["task"] for r in others
               if r["gaps"][main_teacher]["ci"][1] >= best["gaps"][main_teacher]["ci"][0]]

    cmd = "HF_HUB_OFFLINE=1 python benchmarks/bench_task_gap.py " + shlex.join(sys.argv[1:])
    cls = cpu_class(capabilities())
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = [
        "# Teacher-student gap per candidate task (validation questions)",
        "",
        f"`{cmd}`, {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, CPU class {cls}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, dtype {dtype}.",
        "",
        f"Each model answers the same {a.n_val} validation questions per task (the training-pool questions after the "
        "task's MAG questions in the seeded draw: disjoint from the MAGs and from the test set) with the evaluation's "
        f"prompt, scoring and decoding (greedy, temperature 0, one batch of up to {ev.batch_size}, the task's answer "
        "limit). Accuracy with a bootstrap 95 % interval; the gap is teacher - student on the same questions, with "
        f"a paired bootstrap 95 % interval and McNemar's exact p ({B} resamples, seed {seed}). "
        "Wall times are per model and task (model loading separate); the machine had 2 cores and was shared with "
        "another process part of the time, so times are indicative only.",
        "",
    ]
    head = "| task | MAGs | limit | " + " | ".join(f"{model_label(p, m)} acc % [95 % CI]" for m in a.models)
    head += " | " + " | ".join(f"{m} - student, points [paired 95 % CI], McNemar p" for m in a.models if m != STUDENT)
    head += " | truncated % (" + " / ".join(a.models) + ") |"
    lines += [head, "|" + "|".join([":---", "---:", "---:"] + ["---:"] * (2 * len(a.models) - 1 + 1)) + "|"]
    for r in rows:
        cells = [r["task"], str(r["n_mags"]), str(r["limit"])]
        cells += [f"{pct(r['models'][m]['acc'])} [{pct(r['models'][m]['ci'][0])}, {pct(r['models'][m]['ci'][1])}]"
                  for m in a.models]
        cells += [f"{100 * g['diff']:+.1f} [{100 * g['ci'][0]:+.1f}, {100 * g['ci'][1]:+.1f}], p={g['p_mcnemar']:.3g}"
                  for g in r["gaps"].values()]
        cells.append(" / ".join(pct(r["models"][m]["truncated"]) for m in a.models))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Wall time (seconds of decoding per model and task; model load in parentheses), mean answer tokens, unparsed answers:", "",
              "| task | model | decode s | load s | mean tokens | unparsed |", "|:---|:---|---:|---:|---:|---:|"]
    for r in rows:
        for m in a.models:
            d = r["models"][m]
            lines.append(f"| {r['task']} | {model_label(p, m)} | {d['seconds']:.0f} | {d['load_seconds'] or 0:.0f} "
                         f"| {d['mean_tokens']:.0f} | {d['unparsed']} |")
    g = best["gaps"][main_teacher]
    lines += ["", f"**Choice: {best['task']}**, the largest {main_teacher} - student gap on validation questions "
              f"({100 * g['diff']:+.1f} points [{100 * g['ci'][0]:+.1f}, {100 * g['ci'][1]:+.1f}], McNemar p = "
              f"{g['p_mcnemar']:.3g}); "
              + (f"its interval overlaps those of {', '.join(overlap)}, so the ranking is not significant."
                 if overlap else "its interval does not overlap the other tasks' intervals."), ""]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines))
    Path(a.out).with_suffix(".json").write_text(json.dumps(
        {"command": cmd, "cpu_class": cls, "dtype": str(dtype), "threads": torch.get_num_threads(),
         "precision": generation_precision(p), "n_val": a.n_val, "models": a.models, "rows": rows,
         "chosen": best["task"], "overlapping": overlap}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
