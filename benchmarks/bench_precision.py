"""What ``auto`` precision buys on a CPU with native bf16, and what it saves on one without (AVX2 only).

Each setting runs in a fresh process (oneDNN reads its ISA cap once, at start-up) and measures, on the Qwen student:

- the matmul peak (2048², fp32 and bf16; ``benchmarks/peak.py``);
- training: the real loop (``magdi.train.train``) on the first MAGs of a task with its MAGDi recipe, seconds per
  step (median of the steps after the first);
- decoding: greedy answers to the first test questions (``magdi.student.generate``), generated tokens/s.

Settings: ``native`` (this machine as it is, ``auto`` and explicit fp32) and ``avx2`` (the same CPU held to AVX2
kernels: ``ONEDNN_MAX_CPU_ISA=AVX2``, ``ATEN_CPU_CAPABILITY=avx2``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``; ``auto``
resolves to fp32 there, and bf16 is emulated). The AVX2 setting is an emulation on this CPU's clock and caches,
not a real AVX2-only machine: it gives the ratios, and the README's time for an AVX2-only machine is derived from
them and the measured per-stage profile (``reports/benchmark_pipeline.md``), and says so.

    python benchmarks/bench_precision.py --task svamp [--mags 8 --steps 4 --questions 16 --new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
#: (name, extra environment, train.bf16, generation dtype, measure training/decoding too)
SETTINGS = [
    ("native, auto", {}, "auto", "auto", True),
    ("native, float32", {}, False, "float32", True),
    ("avx2, auto", AVX2_ENV, "auto", "auto", True),
    ("avx2, bfloat16 (explicit)", AVX2_ENV, True, "bfloat16", False),  # the old default there: matmul only
]


def child(args: argparse.Namespace) -> dict:
    """One setting, in this process: resolve, then time the matmul peak, training steps and decoding."""
    import torch
    from peak import matmul_peak

    from magdi.config import TASK_TYPES, load_params
    from magdi.data import read_jsonl
    from magdi.mag import read_mags
    from magdi.pipeline import bench_file, mags_file
    from magdi.precision import capabilities, cpu_class, resolve
    from magdi.student import attach_lora, generate, load_student, student_prompt
    from magdi.train import build_items, method_spec, train

    torch.set_num_threads(int(os.environ.get("MAGDI_THREADS", os.cpu_count() or 1)))
    bf16 = json.loads(args.bf16)
    caps = capabilities()
    out: dict = {"cpu_class": cpu_class(caps), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                 "peak_gflops": matmul_peak(2048, repeats=2)}
    p = load_params(args.params, check_mirror=False)
    _, cfg = p.train_for("magdi", args.task)
    train_prec = resolve(bf16, caps, "cpu", "train.bf16")
    gen_prec = resolve(args.gen, caps, "cpu", "student.generation_dtype")
    out.update(train_precision=train_prec.dtype, generate_precision=gen_prec.dtype, reason=train_prec.reason)
    if not args.full:
        return out
    cfg = cfg.model_copy(update={"bf16": train_prec.bf16, "checkpoint_every": 10_000})
    lm, tok = load_student(p.paths.student_dir, p.student.dtype)
    lora = p.student.lora
    lm = attach_lora(lm, lora.r, lora.alpha, lora.dropout, lora.target_modules)
    spec = method_spec("magdi")
    items = build_items(read_mags(mags_file(p, args.task))[: args.mags], spec, tok, cfg.graph)
    stamps: list[float] = []
    t0 = time.perf_counter()
    res = train(lm, tok, items, spec, cfg, Path(args.scratch) / re.sub(r"\W+", "_", args.name),
                log_fn=lambda r: stamps.append(time.perf_counter()), stop_after=args.steps)
    steps = [b - a for a, b in zip([t0, *stamps], stamps, strict=False)]
    out.update(train_steps_s=[round(s, 2) for s in steps], train_step_s=statistics.median(steps[1:] or steps),
               train_tokens=res.tokens, trained_in=res.precision)
    del lm
    model, tok = load_student(p.paths.student_dir, gen_prec.dtype)
    qs = read_jsonl(bench_file(p, args.task, "test"))[: args.questions]
    prompts = [student_prompt(tok, q, TASK_TYPES[args.task]) for q in qs]
    generate(model, tok, prompts[:2], 4)  # warm-up: kernel selection, allocator
    t0 = time.perf_counter()
    gens = generate(model, tok, prompts, args.new_tokens)
    secs = time.perf_counter() - t0
    n = sum(g.n_tokens for g in gens)
    out.update(decode_s=round(secs, 2), decode_tokens=n, decode_tokens_per_s=n / secs)
    return out


def derived_repro_minutes(profile: Path, r_train: float, r_gen: float) -> tuple[float, float] | None:
    """(measured, derived for the other class) minutes of `make repro` from the per-stage table of
    ``reports/benchmark_pipeline.md``: compute seconds of the main student's training scaled by ``r_train``, of
    every evaluation by ``r_gen``; fixed costs and the fp32 SmolLM2 training kept (fp32 either way)."""
    if not profile.is_file():
        return None
    text = profile.read_text()
    total = re.search(r"\*\*([\d.]+) min\*\* from the first to the last line", text)
    if not total:
        return None
    extra = 0.0
    for stage, comp in re.findall(r"^\| (\S+) \| \d+ \| (\d+) \| \d+ \|$", text, re.M):
        kind = stage.split("@")[0]
        if kind == "train":
            extra += float(comp) * (r_train - 1)
        elif kind in ("evaluate", "zero_shot", "zero_shot_scaling", "evaluate_scaling"):
            extra += float(comp) * (r_gen - 1)
    return float(total.group(1)), float(total.group(1)) + extra / 60


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="svamp")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--mags", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--scratch", default="runs/bench_precision")
    ap.add_argument("--out", type=Path, default=Path("reports/benchmark_precision.md"))
    ap.add_argument("--render", action="store_true", help="rewrite the report from its .json (no measuring)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--name", default="", help=argparse.SUPPRESS)
    ap.add_argument("--bf16", default='"auto"', help=argparse.SUPPRESS)
    ap.add_argument("--gen", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a)))
        return
    if a.render:  # the measured ratios again, against the current reports/benchmark_pipeline.md
        saved = json.loads(a.out.with_suffix(".json").read_text())
        write(a, saved["results"])
        return
    common = ["--task", a.task, "--params", a.params, "--mags", str(a.mags), "--steps", str(a.steps),
              "--questions", str(a.questions), "--new-tokens", str(a.new_tokens), "--scratch", a.scratch]
    results = {}
    for name, env, bf16, gen, full in SETTINGS:
        cmd = [sys.executable, __file__, "--child", "--name", name, "--bf16", json.dumps(bf16), "--gen", gen,
               *common, *(["--full"] if full else [])]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=False)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{name}: failed\n{proc.stderr[-3000:]}")
        results[name] = {**json.loads(line[0][7:]), "wall_s": round(time.perf_counter() - t0, 1),
                         "env": env}
        print(name, results[name], flush=True)
    write(a, results)


def write(a: argparse.Namespace, results: dict) -> None:
    """reports/benchmark_precision.md and .json from the measured ``results`` (the derived `make repro` time uses the
    per-stage profile as it is now)."""
    nat, avx = results["native, auto"], results["avx2, auto"]
    r_train = avx["train_step_s"] / nat["train_step_s"]
    r_gen = nat["decode_tokens_per_s"] / avx["decode_tokens_per_s"]
    derived = derived_repro_minutes(Path("reports/benchmark_pipeline.md"), r_train, r_gen)
    lines = [f"# Precision: `auto` on a CPU with native bf16 and on one without ({a.task}, Qwen student)", "",
             f"Generated by `python benchmarks/bench_precision.py --task {a.task} --mags {a.mags} --steps {a.steps} "
             f"--questions {a.questions} --new-tokens {a.new_tokens}` (its docstring says what each setting is). "
             f"CPU class of this machine: **{nat['cpu_class']}**; the `avx2` rows hold the same CPU to AVX2 kernels "
             f"({', '.join(f'{k}={v}' for k, v in AVX2_ENV.items())}): an emulation of an AVX2-only machine at this "
             "clock, not a real one.", "",
             "| setting | resolves to (train / generate) | matmul fp32 GFLOP/s | matmul bf16 GFLOP/s | train s/step "
             "| decode tokens/s |", "|---|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        ts = f"{r['train_step_s']:.2f}" if "train_step_s" in r else "—"
        ds = f"{r['decode_tokens_per_s']:.0f}" if "decode_tokens_per_s" in r else "—"
        lines.append(f"| {name} | {r['train_precision']} / {r['generate_precision']} | "
                     f"{r['peak_gflops']['float32']:.0f} | {r['peak_gflops']['bfloat16']:.1f} | {ts} | {ds} |")
    emul = results["avx2, bfloat16 (explicit)"]["peak_gflops"]
    lines += ["", f"- On the AVX2 setting `auto` resolves to float32 ({avx['reason']}); a bf16 matmul there runs at "
              f"{emul['bfloat16']:.1f} GFLOP/s against {emul['float32']:.0f} in fp32, which is why the old default "
              "(bf16 everywhere) crawled on such machines.",
              f"- Ratios AVX2 `auto` / native `auto`: training {r_train:.2f}x the time per step, decoding "
              f"{r_gen:.2f}x the time per token."]
    if derived:
        lines.append(f"- `make repro` measured on this class: {derived[0]:.1f} min "
                     "(reports/benchmark_pipeline.md); **derived** for an AVX2-only machine at this clock, scaling "
                     f"each stage's compute seconds by those ratios: about {derived[1]:.0f} min.")
    a.out.write_text("\n".join(lines) + "\n")
    a.out.with_suffix(".json").write_text(json.dumps({"results": results, "r_train": r_train, "r_gen": r_gen,
                                                      "derived_minutes": derived}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
