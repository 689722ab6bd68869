"""Evaluation batch size: per-step decoding time and prompt cost of the student at two batch sizes.

An evaluation batch decodes until its longest answer ends (or the limit), so 200 questions in batches of
B cost ``200 / B × (prompt + limit × step(B))``. This measures ``step(B)`` and the prompt cost for the main
student in the evaluation's dtype: the same GSM8K test prompts, greedy, ``short`` and ``long`` new tokens
(the difference is the decoding steps; EOS is not reached that early), the batch sizes taking turns twice.

    python benchmarks/bench_eval_batch.py --batch-sizes 100 200 --out reports/benchmark_eval_batch.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from peak import machine_line

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--task", default="gsm8k")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 200])
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--long", type=int, default=80)
    ap.add_argument("--out", default="reports/benchmark_eval_batch.md")
    a = ap.parse_args()

    import torch

    from magdi.config import TASK_TYPES, cli_params
    from magdi.data import read_jsonl
    from magdi.pipeline import _set_threads, bench_file
    from magdi.student import generate, load_student, student_prompt

    _set_threads()
    p = cli_params(a.params)
    model, tok = load_student(p.paths.student_dir, p.student.gen_dtype, p.student.trust_remote_code)
    ex = read_jsonl(bench_file(p, a.task, "test"))
    prompts = [student_prompt(tok, e, TASK_TYPES[a.task], "") for e in ex]
    times: dict[tuple[int, int], list[float]] = {}
    for _ in range(2):
        for bs in a.batch_sizes:
            for new in (a.short, a.long):
                t = time.perf_counter()
                generate(model, tok, prompts[:bs], new, 0.0)
                times.setdefault((bs, new), []).append(time.perf_counter() - t)
    limit, n = p.evaluate.limit(a.task), p.data.n_test
    lines = [f"# Evaluation batch size ({p.student.model}, {p.student.gen_dtype}, {a.task} test prompts)", "",
             machine_line(), "",
             f"`python benchmarks/bench_eval_batch.py --batch-sizes {' '.join(map(str, a.batch_sizes))}` "
             f"({torch.get_num_threads()} threads; best of 2 per cell)", "",
             f"| batch | {a.short} tokens s | {a.long} tokens s | s per decoding step | prompt + first steps s "
             f"| estimate for {n} questions at {limit} tokens s |", "|---:|---:|---:|---:|---:|---:|"]
    for bs in a.batch_sizes:
        s, lg = min(times[(bs, a.short)]), min(times[(bs, a.long)])
        step = (lg - s) / (a.long - a.short)
        fixed = s - a.short * step
        est = -(-n // bs) * (fixed + limit * step)
        lines.append(f"| {bs} | {s:.1f} | {lg:.1f} | {step:.3f} | {fixed:.1f} | {est:.0f} |")
    lines += ["", "The estimate assumes every batch reaches the limit (one long answer is enough) and a constant step "
              "time; attention grows with length, so real evaluations take somewhat longer at both sizes."]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
