"""How long the student's answers are, to choose ``evaluate.max_new_tokens`` (per task) from a measurement.

Decodes validation questions (the training-pool questions after the MAG questions: never the test set; see
benchmarks/bench_recipe.py) with the evaluation's own settings but a generous limit, and reports the share of
answers that a limit of L tokens would cut, for several L.

    python benchmarks/bench_answer_lengths.py --task gsm8k --n 100 --limit 640 [--student smollm2_135m] \\
        --out reports/benchmark_answer_lengths_gsm8k.md
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from peak import machine_line

ROOT = Path(__file__).resolve().parents[1]


def cut_share(lengths: list[int], limit: int) -> float:
    """Share of answers that a limit of ``limit`` new tokens would cut (they reach it)."""
    return sum(n >= limit for n in lengths) / len(lengths) if lengths else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--task", required=True)
    ap.add_argument("--student", default=None)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--limit", type=int, default=640)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import torch
    from bench_recipe import evaluate_on, validation_questions

    from magdi.config import cli_params
    from magdi.pipeline import _set_threads

    _set_threads()
    p = cli_params(a.params)
    if a.student:
        p = p.for_student(a.student)
    val = validation_questions(p, a.task, a.n)
    preds, secs = evaluate_on(p, None, a.task, val, a.limit)
    lengths = sorted(pr.n_tokens for pr in preds)
    q = statistics.quantiles(lengths, n=20)
    limits = sorted({128, 192, 256, 320, 384, 448, 512, a.limit, p.evaluate.limit(a.task)})
    lines = [
        f"# Answer lengths of the student ({a.student or p.student.model}) on {a.task}", "", machine_line(),
        "",
        f"`python benchmarks/bench_answer_lengths.py --task {a.task} --n {a.n} --limit {a.limit}"
        + (f" --student {a.student}" if a.student else "") + f"` ({secs:.0f} s, {torch.get_num_threads()} threads)",
        "",
        f"{len(val)} validation questions (training pool after the {p.data.train_size(a.task)} MAG questions; no test question), "
        f"zero-shot, the evaluation's decoding, at most {a.limit} new tokens. Median {statistics.median(lengths):.0f}, "
        f"p90 {q[17]:.0f}, p95 {q[18]:.0f}, max {lengths[-1]} tokens; the limit in params.yaml for this task: "
        f"{p.evaluate.limit(a.task)}.",
        "",
        "| limit (new tokens) | answers cut % |",
        "|---:|---:|",
        *[f"| {lim} | {100 * cut_share(lengths, lim):.1f} |" for lim in limits],
        "",
        f"(At {a.limit} an answer that reaches the limit may be a repetition loop that no limit ends.)",
    ]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
