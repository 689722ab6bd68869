"""Benchmark: student generation (``magdi.student.generate``, greedy, KV cache) in fp32 vs bf16 on CPU.

For each batch size (default 1, 16, 64) the same prompts (student prompts of the downloaded test questions,
in evaluation's shortest-first order) are generated with the student loaded in fp32 and in bf16, the two
taking turns (A B, then B A on the next repeat) so that load from other processes hits both. Measured:
generated tokens/s (tokens up to and including EOS, the Table 2 count) and achieved model FLOP/s against the
machine's matmul peak measured in the same run (``peak.matmul_peak``). Model FLOPs are counted as
``2 × parameters × positions computed`` (prefill: batch × padded prompt length; decoding: batch × decoding
steps, finished rows included since they are computed too); the embedding lookup is counted as a matmul
because SmolLM2 ties it to the output projection, and attention score FLOPs are left out (small at these
lengths), so it is a slight underestimate.

Accuracy: the greedy answers of the largest batch (a fixed set of questions) are parsed with
``magdi.scoring`` and compared between fp32 and bf16: identical outputs, identical parsed answers, accuracy
of each and the paired difference.

    .venv/bin/python benchmarks/bench_generation.py            # -> reports/benchmark_generation.md (+ .json)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from peak import cpu_flags, machine_line, matmul_peak

from magdi.config import TASK_TYPES
from magdi.data import read_jsonl
from magdi.scoring import extract_answer, is_correct
from magdi.student import generate, load_student, student_prompt


def fixed_set(bench_dir: Path, tasks: list[str], n: int) -> list[dict]:
    """Up to ``n`` test questions, round-robin over ``tasks``, then shortest first (evaluation's order)."""
    pools = [[{**ex, "task": t} for ex in read_jsonl(bench_dir / t / "test.jsonl")] for t in tasks
             if (bench_dir / t / "test.jsonl").exists()]
    out: list[dict] = []
    for i in range(max((len(p) for p in pools), default=0)):
        out += [p[i] for p in pools if i < len(p)]
    out = out[:n]
    return sorted(out, key=lambda ex: len(ex["question"]))


def model_flops(n_params: int, batch: int, prompt_len: int, steps: int) -> float:
    return 2.0 * n_params * batch * (prompt_len + steps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", type=Path, default=Path("models/student"))
    ap.add_argument("--benchmarks", type=Path, default=Path("data/benchmarks"), help="download stage output")
    ap.add_argument("--tasks", nargs="+", default=["strategyqa", "gsm8k", "arc_challenge", "svamp"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per (batch size, dtype); 1 for the largest")
    ap.add_argument("--min-prompts", type=int, default=4, help="prompts per timed run at small batch sizes")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=Path("reports/benchmark_generation.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    peak = {"1 thread": matmul_peak(threads=1)}
    if args.threads > 1:
        peak[f"{args.threads} threads"] = matmul_peak(threads=args.threads)
    print(f"matmul peak GFLOP/s: {peak}", flush=True)
    models = {d: load_student(args.student, d) for d in ("float32", "bfloat16")}
    tok = models["float32"][1]
    n_params = sum(p.numel() for p in models["float32"][0].parameters())
    exs = fixed_set(args.benchmarks, args.tasks, max(args.batch_sizes))
    if not exs:
        ap.error(f"no test questions under {args.benchmarks} (run the download stage first)")
    prompts = [student_prompt(tok, ex, TASK_TYPES[ex["task"]]) for ex in exs]

    for model, t in models.values():  # warm-up: the first call of each model pays one-off costs
        generate(model, t, prompts[:2], 4)
    runs: dict[str, dict[str, list[dict]]] = {}
    answers: dict[str, list] = {}
    for bs in args.batch_sizes:
        # small batches run over several prompts one batch after another, so one short answer does not decide
        work = prompts[: max(bs, args.min_prompts)]
        chunks = [work[i : i + bs] for i in range(0, len(work), bs)]
        reps = 1 if bs == max(args.batch_sizes) else args.repeats
        runs[str(bs)] = {"float32": [], "bfloat16": []}
        for r in range(reps):
            for d in (("float32", "bfloat16") if r % 2 == 0 else ("bfloat16", "float32")):
                model, t = models[d]
                sec = ntok = gfl = 0.0
                gens_all = []
                for batch in chunks:
                    plen = t(batch, return_tensors="pt", padding=True, add_special_tokens=False)["input_ids"].shape[1]
                    t0 = time.perf_counter()
                    gens = generate(model, t, batch, args.max_new_tokens)
                    sec += time.perf_counter() - t0
                    ntok += sum(g.n_tokens for g in gens)
                    gfl += model_flops(n_params, len(batch), plen, max(g.n_tokens for g in gens)) / 1e9
                    gens_all += gens
                runs[str(bs)][d].append({"seconds": sec, "tokens": ntok, "prompts": len(work), "gflops": gfl})
                print(f"batch {bs} {d}: {sec:.1f}s, {ntok:.0f} tokens, {ntok / sec:.1f} tokens/s", flush=True)
                if bs == max(args.batch_sizes) and r == 0:
                    answers[d] = gens_all

    summary = {}
    for bs, per in runs.items():
        summary[bs] = {}
        for d, rs in per.items():
            summary[bs][d] = {
                "tokens_per_s": statistics.median(x["tokens"] / x["seconds"] for x in rs),
                "seconds": statistics.median(x["seconds"] for x in rs),
                "gflops_per_s": statistics.median(x["gflops"] / x["seconds"] for x in rs),
                "runs": rs,
            }
        summary[bs]["speedup_bf16"] = summary[bs]["bfloat16"]["tokens_per_s"] / summary[bs]["float32"]["tokens_per_s"]

    n = min(len(answers["float32"]), len(answers["bfloat16"]))
    rows = []
    for ex, a, b in zip(exs[:n], answers["float32"], answers["bfloat16"], strict=False):
        at = TASK_TYPES[ex["task"]]
        pa, pb = extract_answer(a.text, at, ex.get("choices")), extract_answer(b.text, at, ex.get("choices"))
        rows.append({"same_text": a.text == b.text, "same_answer": pa == pb,
                     "fp32_correct": is_correct(pa, ex["answer"], at), "bf16_correct": is_correct(pb, ex["answer"], at)})
    d = [int(r["bf16_correct"]) - int(r["fp32_correct"]) for r in rows]
    mean_d = statistics.mean(d)
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
    acc = {"n": len(rows), "same_text": sum(r["same_text"] for r in rows), "same_answer": sum(r["same_answer"] for r in rows),
           "fp32_accuracy": statistics.mean(r["fp32_correct"] for r in rows),
           "bf16_accuracy": statistics.mean(r["bf16_correct"] for r in rows),
           "paired_diff": mean_d, "paired_diff_95ci": [mean_d - 1.96 * se, mean_d + 1.96 * se]}

    res = {"date": dt.datetime.now().isoformat(timespec="seconds"), "cpu": _cpu_name(), "cpu_flags": cpu_flags(),
           "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
           "model": str(args.student), "n_params": n_params, "max_new_tokens": args.max_new_tokens,
           "tasks": args.tasks, "matmul_peak_gflops": peak, "batches": summary, "answers": acc}
    write_report(args.out, res)
    print(args.out.read_text())
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_report(out: Path, res: dict) -> None:
    pk = res["matmul_peak_gflops"]
    all_thr = list(pk)[-1]
    peak_rows = "".join(f"| {k} | {v['float32']:.1f} | {v['bfloat16']:.1f} | {v['bfloat16'] / v['float32']:.2f}× |\n"
                        for k, v in pk.items())
    gen_rows = ""
    for bs, s in res["batches"].items():
        f, b = s["float32"], s["bfloat16"]
        gen_rows += (f"| {bs} ({f['runs'][0]['prompts']}) | {f['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | **{s['speedup_bf16']:.2f}×** | "
                     f"{f['gflops_per_s']:.1f} ({f['gflops_per_s'] / pk[all_thr]['float32']:.0%}) | "
                     f"{b['gflops_per_s']:.1f} ({b['gflops_per_s'] / pk[all_thr]['bfloat16']:.0%}) | "
                     f"{len(f['runs'])} |\n")
    a = res["answers"]
    lo, hi = a["paired_diff_95ci"]
    text = f"""# Generation throughput: fp32 vs bf16 (student, CPU)

{machine_line()}

Generated by `benchmarks/bench_generation.py` on {res['date']}. CPU: {res['cpu']} (flags {res['cpu_flags']}),
torch {res['torch']}, {res['threads']} torch threads. Student `{res['model']}` ({res['n_params']:,} parameters),
greedy `magdi.student.generate`, at most {res['max_new_tokens']} new tokens, KV cache.
**The machine was shared** (2 cores, 3 other workers and a long job): absolute numbers are noisy; fp32 and bf16
took turns on the same prompts (A B / B A), so their ratio is the result.

## Matmul peak (2048 × 2048, best of 3, FLOPs = 2n³)

| threads | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |
|---|---:|---:|---:|
{peak_rows}
## Generated tokens/s

Tokens = generated tokens up to and including EOS (Table 2's count), summed over the batch. Achieved
model FLOP/s = 2 × parameters × (batch × padded prompt length + batch × decoding steps) / seconds, shown
against the {all_thr} matmul peak of the same dtype.

| batch (prompts) | fp32 tokens/s | bf16 tokens/s | bf16 speed-up | fp32 GFLOP/s (of peak) | bf16 GFLOP/s (of peak) | runs each |
|---:|---:|---:|---:|---:|---:|---:|
{gen_rows}
## Same answers? (the batch of {a['n']} questions from {', '.join(res['tasks'])}, greedy)

- identical generated text: {a['same_text']}/{a['n']}; identical parsed answer: {a['same_answer']}/{a['n']}
- accuracy fp32 {a['fp32_accuracy']:.1%}, bf16 {a['bf16_accuracy']:.1%}; paired difference (bf16 − fp32)
  {a['paired_diff']:+.1%}, 95% interval [{lo:+.1%}, {hi:+.1%}] (normal approximation on the paired differences)
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
