"""How much of Table 1 is decoding noise? The same adapters, the same test questions, two CPU kernel paths.

Greedy bf16 decoding on the CPU is deterministic for one machine and one kernel choice, but the matrix products
round differently when oneDNN picks other kernels (AMX tiles vs AVX-512 BF16 instructions, other blockings on
another processor), and greedy decoding turns a last-bit difference into another token and then another answer.
Two fresh-clone runs of `make repro` produced byte-identical SVAMP MAGDi adapters whose evaluations differed in 46
of 200 answers (45.0 vs 43.5 %). This script measures that noise floor directly: each method's test set is decoded
exactly as the ``evaluate`` stage does (``bench_recipe.evaluate_on``: merged adapter, greedy, ``evaluate.*``) once
per kernel setting, each in a fresh process (``ONEDNN_MAX_CPU_ISA`` is read when oneDNN starts), and compared
with the predictions the ``evaluate`` stage wrote (``runs/eval/<task>/<method>/``).

    python benchmarks/bench_eval_numerics.py --task svamp --methods magdi sit_qwen15 \\
        [--isa default AVX512_CORE_BF16] [--out reports/benchmark_eval_numerics.md]

Run it where ``dvc repro`` has trained and evaluated the methods. Per (method, setting) the outputs go to
``runs/bench_eval_numerics/<task>/<method>/<setting>.json`` (resumable: an existing file is reused when it was
made on the same questions with the same adapter).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from peak import machine_line

ROOT = Path(__file__).resolve().parents[1]


def adapter_of(p, task: str, method: str) -> Path | None:
    """The adapter the ``evaluate`` stage merges for ``method`` (none for zero-shot)."""
    from magdi.pipeline import method_of, train_dir

    return None if method_of(method) == "zero_shot" else train_dir(p, task, method) / "adapter"


def adapter_digest(adapter: Path | None) -> str | None:
    if adapter is None:
        return None
    return hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]


def worker(task: str, method: str, out: Path) -> None:
    """Decode ``task``'s test questions with ``method``'s adapter in this process (its env sets the kernels)."""
    import torch
    from bench_recipe import evaluate_on

    from magdi.config import cli_params
    from magdi.data import read_jsonl
    from magdi.pipeline import _set_threads, bench_file

    _set_threads()
    p = cli_params("params.yaml")
    adapter = adapter_of(p, task, method)
    qs = read_jsonl(bench_file(p, task, "test"))
    preds, seconds = evaluate_on(p, adapter, task, qs, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "ids": [q.id for q in preds], "outputs": [q.output for q in preds], "correct": [q.correct for q in preds],
        "seconds": seconds, "adapter_sha256": adapter_digest(adapter), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default"),
    }) + "\n")


def stage_predictions(task: str, method: str) -> dict | None:
    """What the ``evaluate`` stage wrote for (task, method): id -> (output, correct)."""
    from magdi.config import cli_params
    from magdi.pipeline import ZS_TASK, eval_dir, method_of, predictions_name

    p = cli_params("params.yaml")
    f = eval_dir(p, ZS_TASK if method_of(method) == "zero_shot" else task, method) / predictions_name(task)
    if not f.exists():
        return None
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return {r["id"]: (r["output"], bool(r["correct"])) for r in rows}


def run_setting(task: str, method: str, isa: str, runs: Path) -> dict:
    out = runs / task / method / f"{isa}.json"
    from magdi.config import cli_params
    from magdi.data import read_jsonl
    from magdi.pipeline import bench_file

    p = cli_params("params.yaml")
    ids = [q["id"] for q in read_jsonl(bench_file(p, task, "test"))]
    adapter = adapter_of(p, task, method)
    if out.exists():
        old = json.loads(out.read_text())
        if old["ids"] == ids and old["adapter_sha256"] == adapter_digest(adapter):
            print(f"{task}/{method}/{isa}: reused {out}", flush=True)
            return old
    env = dict(os.environ)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa != "default":
        env["ONEDNN_MAX_CPU_ISA"] = isa
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--worker", "--task", task, "--methods", method, "--worker-out", str(out)],
                   env=env, check=True, cwd=ROOT)
    print(f"{task}/{method}/{isa}: {time.perf_counter() - t:.0f} s", flush=True)
    return json.loads(out.read_text())


def report(task: str, methods: list[str], isas: list[str], res: dict, stage: dict, cmp: dict) -> str:
    from magdi.evaluate import numerics_fingerprint
    from magdi.report.stats import mcnemar_exact

    fp = numerics_fingerprint()
    first = res[methods[0]][isas[0]]
    lines = [
        f"# Decoding noise: the same adapters under two CPU kernel paths ({task}, {len(first['ids'])} test questions)\n",
        f"{machine_line()}\n",
        "Generated by `benchmarks/bench_eval_numerics.py` (its docstring says why). Each row decodes the test set "
        "exactly as the `evaluate` stage does, in a fresh process; `default` lets oneDNN pick its kernels "
        "(AMX on this processor), `AVX512_CORE_BF16` caps it at AVX-512 BF16 instructions "
        "(`ONEDNN_MAX_CPU_ISA`). `stage` is what the `evaluate` stage of the last `make repro` wrote.\n",
        f"Machine: {fp.get('cpu_model')} (family/model {fp.get('cpu_family_model')}; matrix flags "
        f"{', '.join(fp.get('cpu_matrix_flags', [])) or 'none'}), torch {first['torch']}, {first['threads']} threads.\n",
        "## Accuracy and changed answers per setting\n",
        "| method | setting | accuracy % | s | answers differing from `default` | correctness flips vs `default` "
        "| answers differing from `stage` |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        base = res[m][isas[0]]
        st = stage.get(m)
        for isa in isas:
            r = res[m][isa]
            acc = 100 * sum(r["correct"]) / len(r["correct"])
            diff = sum(a != b for a, b in zip(r["outputs"], base["outputs"], strict=True))
            flips = sum(a != b for a, b in zip(r["correct"], base["correct"], strict=True))
            vs_stage = ("" if st is None else
                        str(sum(o != st[i][0] for i, o in zip(r["ids"], r["outputs"], strict=True))))
            lines.append(f"| {m} | {isa} | {acc:.1f} | {r['seconds']:.0f} | {diff} | {flips} | {vs_stage} |")
        if st is not None:
            acc = 100 * sum(st[i][1] for i in base["ids"]) / len(base["ids"])
            lines.append(f"| {m} | stage | {acc:.1f} | | "
                         f"{sum(st[i][0] != o for i, o in zip(base['ids'], base['outputs'], strict=True))} | "
                         f"{sum(st[i][1] != c for i, c in zip(base['ids'], base['correct'], strict=True))} | 0 |")
    lines.append("")
    if cmp:
        a_m, b_m = methods[0], methods[1]
        lines += [f"## The comparison {a_m} vs {b_m} under each setting\n",
                  "Paired over the same questions (bootstrap 95 % interval of the accuracy difference, McNemar's "
                  "exact p), as in reports/significance.md.\n",
                  f"| setting | {a_m} % | {b_m} % | diff | 95 % CI | p (McNemar) |", "|---|---:|---:|---:|---|---:|"]
        for isa in isas:
            c = cmp[isa]
            lines.append(f"| {isa} | {100 * c.acc_a:.1f} | {100 * c.acc_b:.1f} | {100 * c.diff:+.1f} | "
                         f"[{100 * c.ci_low:+.1f}, {100 * c.ci_high:+.1f}] | {c.p_mcnemar:.3f} |")
        lines.append("")
    lines += ["## Same model, two kernel paths\n",
              "McNemar's exact p between the two settings of one adapter: the chance that the correctness flips "
              "alone look like a real difference.\n",
              "| method | settings | flips (only a / only b right) | p (McNemar) |", "|---|---|---:|---:|"]
    for m in methods:
        for isa in isas[1:]:
            a, b = res[m][isas[0]]["correct"], res[m][isa]["correct"]
            n01, n10, pv = mcnemar_exact(a, b)
            lines.append(f"| {m} | {isas[0]} vs {isa} | {n01} / {n10} | {pv:.3f} |")
    return "\n".join(lines) + "\n"


def comparisons(task: str, methods: list[str], isas: list[str], res: dict) -> dict:
    """The first method vs the second under each setting, by reports/significance.csv's own ``compare``
    (``{}`` with fewer than two methods); computed once for the markdown report and the JSON summary."""
    from magdi.report.stats import compare

    if len(methods) < 2:
        return {}

    def preds(r: dict) -> dict[str, dict]:
        return {i: {"correct": c} for i, c in zip(r["ids"], r["correct"], strict=True)}

    a_m, b_m = methods[0], methods[1]
    return {isa: compare(task, a_m, b_m, preds(res[a_m][isa]), preds(res[b_m][isa]), isa) for isa in isas}


def summary(task: str, methods: list[str], isas: list[str], res: dict, cmp: dict) -> dict:
    """The numbers the README's results paragraph quotes (tools/update_readme.py): per method and setting
    the accuracy and how many answers differ from the first setting; with two or more methods, the first
    vs the second under each setting (whether a comparison's verdict survives a change of kernels)."""
    out: dict = {"task": task, "settings": isas, "methods": {}}
    if cmp:
        keys = ("acc_a", "acc_b", "diff", "ci_low", "ci_high", "p_mcnemar")
        out["comparison"] = {"method_a": methods[0], "method_b": methods[1], "by_setting": {
            isa: {k: getattr(c, k) for k in keys} for isa, c in cmp.items()}}
    for m in methods:
        base = res[m][isas[0]]
        out["methods"][m] = {isa: {
            "n": len(r["correct"]), "accuracy": sum(r["correct"]) / len(r["correct"]),
            "outputs_differing": sum(x != y for x, y in zip(r["outputs"], base["outputs"], strict=True)),
            "correctness_flips": sum(x != y for x, y in zip(r["correct"], base["correct"], strict=True)),
        } for isa, r in res[m].items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="svamp")
    ap.add_argument("--methods", nargs="+", default=["magdi", "sit_qwen15"])
    ap.add_argument("--isa", nargs="+", default=["default", "AVX512_CORE_BF16"],
                    help="ONEDNN_MAX_CPU_ISA values; 'default' leaves oneDNN's own choice")
    ap.add_argument("--runs", type=Path, default=Path("runs/bench_eval_numerics"))
    ap.add_argument("--out", type=Path, default=Path("reports/benchmark_eval_numerics.md"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.task, a.methods[0], a.worker_out)
        return 0
    res = {m: {isa: run_setting(a.task, m, isa, a.runs) for isa in a.isa} for m in a.methods}
    stage = {m: s for m in a.methods if (s := stage_predictions(a.task, m)) is not None}
    cmp = comparisons(a.task, a.methods, a.isa, res)
    text = report(a.task, a.methods, a.isa, res, stage, cmp)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    a.out.with_suffix(".json").write_text(json.dumps(summary(a.task, a.methods, a.isa, res, cmp), indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
