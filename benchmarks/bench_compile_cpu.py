"""``train.compile`` on the CPU: seconds per training step of the real student, eager vs compiled, same steps.

The same first ``--steps`` steps of one task's MAGDi run (``magdi.train.train`` with the task's recipe, real
student and MAGs built by ``dvc repro``), once with eager decoder layers and once with each layer through
``torch.compile`` (``train.compile: true``); the first step of the compiled run includes the compilation. Reports
the first step, the sum of the later steps, and the losses of both runs side by side (bf16 autocast: compiled
kernels round differently, so the losses agree only approximately).

    python benchmarks/bench_compile_cpu.py --task svamp --steps 10 --out reports/benchmark_compile_cpu.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from peak import machine_line

ROOT = Path(__file__).resolve().parents[1]


def run(p, task: str, steps: int, compiled: bool) -> dict:
    """Train ``steps`` steps; the wall time of each step, measured between the loop's per-step log calls."""
    import torch

    from magdi.pipeline import _select_mags
    from magdi.student import attach_lora, load_student
    from magdi.train import build_items, method_spec, train

    base, cfg = p.train_for("magdi", task)
    cfg = cfg.model_copy(update={"compile": compiled, "checkpoint_every": 10**9})
    spec = method_spec(base)
    torch.manual_seed(cfg.seed)
    lm, tok = load_student(p.paths.student_dir, p.student.dtype, p.student.trust_remote_code)
    lora = p.student.lora
    lm = attach_lora(lm, lora.r, lora.alpha, lora.dropout, lora.target_modules)
    items = build_items(_select_mags(p, task, cfg), spec, tok, cfg.graph)
    marks: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        res = train(lm, tok, items, spec, cfg, Path(d), stop_after=steps,
                    log_fn=lambda rec: marks.append(time.perf_counter()))
    later = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return {"first": marks[0] - t0, "later": later, "losses": [h["loss"] for h in res.history]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--task", default="svamp")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import torch

    from magdi.config import cli_params
    from magdi.pipeline import _set_threads

    _set_threads()
    p = cli_params(a.params)
    eager = run(p, a.task, a.steps, False)
    comp = run(p, a.task, a.steps, True)
    se, sc = sum(eager["later"]), sum(comp["later"])
    n = len(eager["later"])
    lines = [
        f"# `train.compile` on the CPU ({p.student.model}, {a.task}, MAGDi)", "", machine_line(), "",
        f"`python benchmarks/bench_compile_cpu.py --task {a.task} --steps {a.steps}` ({torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; eager first, then compiled, in one process)", "",
        "| run | first step s | later steps s (sum of " + str(n) + ") | s / later step |",
        "|---|---:|---:|---:|",
        f"| eager | {eager['first']:.1f} | {se:.1f} | {se / max(n, 1):.2f} |",
        f"| compiled | {comp['first']:.1f} | {sc:.1f} | {sc / max(n, 1):.2f} |", "",
        f"Later steps: compiled / eager = {sc / se:.2f} ({se / sc:.2f}x); the compiled run's first step costs "
        f"{comp['first'] - eager['first']:.0f} s more (compilation). Over a run of S steps compiling pays off when "
        f"S > {1 + (comp['first'] - eager['first']) / max((se - sc) / max(n, 1), 1e-9):.0f} "
        "(if the later steps keep this ratio).", "",
        "| step | loss, eager | loss, compiled |", "|---:|---:|---:|",
        *(f"| {i + 1} | {x:.4f} | {y:.4f} |" for i, (x, y) in enumerate(zip(eager["losses"], comp["losses"],
                                                                              strict=False))),
    ]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
