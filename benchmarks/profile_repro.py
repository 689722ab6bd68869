"""Where the time of `make repro` goes: per stage wall time, split into fixed costs and compute.

Input: a log of `make repro` whose lines carry a wall-clock prefix, made with

    make repro 2>&1 | python benchmarks/profile_repro.py stamp > repro.log
    python benchmarks/profile_repro.py report repro.log        # -> reports/benchmark_pipeline.md

A stage's wall time runs from its "Running stage" line to the next one. Its compute part is what the stage
itself measured and wrote to its metrics file (training: `seconds` of the training loop; evaluation:
`generation_seconds`); the rest is fixed cost: interpreter and library start-up, model load, DVC
bookkeeping. The start-up and model-load costs are also measured directly here, each in a fresh process, and
the machine's matmul peak (benchmarks/peak.py) is the yardstick for the achieved FLOP/s of training
(4 × non-embedding parameters per token: forward 2, backward through activations 2; frozen weights get no
weight gradient) and of generation (2 × parameters per generated token).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^\[(\d+\.\d+)\] (.*)$")
RUNNING = re.compile(r"Running stage '([^']+)'")


def stamp() -> None:
    """Copy stdin to stdout, each line prefixed with the epoch time it arrived."""
    for line in sys.stdin:
        sys.stdout.write(f"[{time.time():.3f}] {line}")
        sys.stdout.flush()


def stage_times(log: Path) -> tuple[list[tuple[str, float]], float]:
    events, first, last = [], None, None
    for raw in log.read_text(errors="replace").splitlines():
        m = STAMP.match(raw)
        if not m:
            continue
        t = float(m.group(1))
        first = t if first is None else first
        last = t
        r = RUNNING.search(m.group(2))
        if r:
            events.append((r.group(1), t))
    out = [(name, (events[i + 1][1] if i + 1 < len(events) else last) - t) for i, (name, t) in enumerate(events)]
    return out, (last - first) if first is not None else 0.0


def compute_seconds(stage: str) -> float | None:
    """What the stage measured itself (metrics files), or None when it does not record it."""
    kind, _, item = stage.partition("@")
    if kind in ("train", "train_ablation", "train_scaling"):
        task, method = item.split("-", 1)
        method = f"magdi@{method}" if kind == "train_scaling" else method
        f = ROOT / "metrics" / "train" / method / f"{task}.json"
        return json.loads(f.read_text()).get("seconds") if f.exists() else None
    if kind in ("evaluate", "evaluate_ablation", "evaluate_scaling"):
        task, method = item.split("-", 1)
        method = f"magdi@{method}" if kind == "evaluate_scaling" else method
        f = ROOT / "metrics" / "eval" / method / f"{task}.json"
        return json.loads(f.read_text()).get("generation_seconds") if f.exists() else None
    if kind in ("zero_shot", "zero_shot_scaling"):
        folder = "zero_shot" if kind == "zero_shot" else f"zero_shot@{item}"
        return sum(json.loads(f.read_text()).get("generation_seconds", 0.0)
                   for f in (ROOT / "metrics" / "eval" / folder).glob("*.json")) or None
    return None


WARM_RUN = re.compile(r"-m magdi\.warm run -- \S*dvc repro")


def warm_server_use(log: Path) -> tuple[bool, int]:
    """(forked, declined) for that `make repro`: whether its stages ran in forks of the warm server, and how many
    stages the server declined (those ran as ordinary processes).

    make echoes its recipe line, ``... -m magdi.warm run -- .../dvc repro`` with ``WARM=1`` and a plain ``dvc repro``
    otherwise; a server that did not start leaves every stage an ordinary process. ``make -s`` hides the echo, so
    such a log reads as ``WARM=0``.
    """
    lines = log.read_text(errors="replace").splitlines()
    requested = any(WARM_RUN.search(line) for line in lines)
    started = not any("magdi.warm: the server did not start" in line for line in lines)
    declined = sum("magdi.warm: the server declined" in line for line in lines)
    return requested and started, declined


def _timed(code: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)
    return time.perf_counter() - t


def fixed_costs() -> dict[str, float]:
    imports = "import torch, transformers, peft, mlflow, magdi.pipeline, magdi.train"
    load = imports + "\nfrom magdi.student import load_student\nload_student('models/student', 'bfloat16')"
    return {"python + torch/transformers/peft/mlflow imports": _timed(imports),
            "imports + loading the student": _timed(load)}


def throughput(student_dir: Path, runs: str = "main") -> dict[str, float]:
    """Achieved FLOP/s of training and generation of one student's runs (``main``: run folders without
    ``@``; else the runs ``*@<runs>``), with that student's parameter count."""
    from peak import matmul_peak  # noqa: E402

    cfg = json.loads((student_dir / "config.json").read_text())
    info = json.loads((student_dir / "magdi_student.json").read_text())
    n_params = info["parameters"]
    n_embed = cfg["vocab_size"] * cfg["hidden_size"]

    def mine(f: Path) -> bool:
        return "@" not in f.parent.name if runs == "main" else f.parent.name.endswith(f"@{runs}")

    tr = [json.loads(f.read_text()) for f in (ROOT / "metrics" / "train").glob("*/*.json") if mine(f)]
    tr_tokens, tr_secs = sum(m["tokens"] for m in tr), sum(m["seconds"] for m in tr)
    ev = [json.loads(f.read_text()) for f in (ROOT / "metrics" / "eval").glob("*/*.json") if mine(f)]
    ev = [m for m in ev if "generation_seconds" in m]
    ev_tokens = sum(m["mean_tokens"] * m["n"] for m in ev)
    ev_secs = sum(m["generation_seconds"] for m in ev)
    peak = matmul_peak(threads=None)
    return {"train_tokens_per_s": tr_tokens / tr_secs if tr_secs else 0.0,
            "train_gflops": 4 * (n_params - n_embed) * tr_tokens / tr_secs / 1e9 if tr_secs else 0.0,
            "gen_tokens_per_s": ev_tokens / ev_secs if ev_secs else 0.0,
            "gen_gflops": 2 * n_params * ev_tokens / ev_secs / 1e9 if ev_secs else 0.0,
            "peak_fp32": peak["float32"], "peak_bf16": peak["bfloat16"], "threads": peak["threads"],
            "n_params": n_params}


def machine_class() -> str:
    from magdi.precision import capabilities, cpu_class

    return cpu_class(capabilities())


def report(log: Path, out: Path) -> None:
    stages, total = stage_times(log)
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    lines = ["# Where `make repro` spends its time", "",
             f"From the timestamped log of one `make repro` on a fresh clone (`{log.name}`): "
             f"**{total / 60:.1f} min** from the first to the last line (install included), on a CPU of class "
             f"**{machine_class()}** (`python -m magdi precision`; compare timings within one class only).", "",
             "| stage | wall s | compute s (measured by the stage) | fixed s (start-up, model load, DVC) |",
             "|---|---:|---:|---:|"]
    for name, wall in stages:
        comp = compute_seconds(name)
        fixed = wall - comp if comp is not None else None
        lines.append(f"| {name} | {wall:.0f} | {comp:.0f} | {fixed:.0f} |" if comp is not None
                     else f"| {name} | {wall:.0f} | — | — |")
        g = groups[name.split("@")[0]]
        g[0] += wall
        g[1] += comp or 0.0
        g[2] += 1
    lines += ["", "| stage kind | runs | wall min | compute min | share of wall |", "|---|---:|---:|---:|---:|"]
    all_wall = sum(w for _, w in stages) or 1.0
    for kind, (wall, comp, n) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {kind} | {n} | {wall / 60:.1f} | {comp / 60:.1f} | {100 * wall / all_wall:.0f} % |")
    fc = fixed_costs()
    forked, declined = warm_server_use(log)
    if forked:
        fell_back = f" ({declined} declined by the server ran as ordinary processes)" if declined else ""
        lines += ["", f"This run used `make repro WARM=1`: each stage{fell_back} ran in a fork of the warm server "
                  "(src/magdi/warm/, reports/benchmark_warm.md), which imported the libraries once; a stage's fixed "
                  "column above is what remains (fork, model load, MLflow, DVC). Without it (`make repro`, plain "
                  "`dvc repro`) each stage also pays a cold start; measured directly (fresh process each, same "
                  "machine, after the run), a cold start costs:", ""]
    else:
        lines += ["", "Each stage ran as a fresh Python process (`make repro`, the default), so its fixed column "
                  "includes a cold start; measured directly (fresh process each, same machine, after the run), a "
                  "cold start costs:", ""]
    lines += [f"- {k}: {v:.1f} s" for k, v in fc.items()]
    if not forked:
        lines += ["", "`make repro WARM=1` shares the imports through a fork server (reports/benchmark_warm.md; the "
                  "README's 'Shared start-up' says why it is not the default)."]
    students = [("main", ROOT / "models" / "student")]
    students += [(d.name, d) for d in sorted((ROOT / "models" / "students").glob("*")) if d.is_dir()]
    from magdi.config import load_params

    params = load_params(ROOT / "params.yaml", check_mirror=False)
    for runs, folder in students:
        tp = throughput(folder, runs)
        from magdi.train import training_precision

        # the precision its training ran in (train.bf16 resolved on this machine, as the stage resolved it)
        bf16 = training_precision(params.for_student(None if runs == "main" else runs).train.bf16).bf16
        tr_kind, tr_peak = ("bf16", tp["peak_bf16"]) if bf16 else ("fp32", tp["peak_fp32"])
        lines += ["", f"Achieved throughput of the {'main student' if runs == 'main' else runs} "
                  f"({tp['n_params'] / 1e6:.0f} M parameters; sum of tokens / sum of compute seconds of its runs) against "
                  f"the matmul peak measured now ({tp['threads']} threads, 2048², FLOPs = 2n³; training counts "
                  "4 × non-embedding parameters per token: forward + activation gradients, LoRA weight gradients "
                  "are negligible):", "",
                  f"- training: {tp['train_tokens_per_s']:.0f} tokens/s = {tp['train_gflops']:.1f} GFLOP/s "
                  f"({tr_kind} training, {tr_kind} peak {tr_peak:.0f} GFLOP/s: {100 * tp['train_gflops'] / tr_peak:.0f} %)",
                  f"- generation: {tp['gen_tokens_per_s']:.0f} generated tokens/s = {tp['gen_gflops']:.1f} GFLOP/s "
                  f"(bf16 peak {tp['peak_bf16']:.0f} GFLOP/s: {100 * tp['gen_gflops'] / tp['peak_bf16']:.0f} %; "
                  "decoding is bound by reading weights and by per-step overhead, not by matmul peak)"]
    lines.append("")
    out.write_text("\n".join(lines))
    print(out.read_text())


if __name__ == "__main__":
    if sys.argv[1:2] == ["stamp"]:
        stamp()
    elif sys.argv[1:2] == ["report"]:
        report(Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else ROOT / "reports" / "benchmark_pipeline.md")
    else:
        raise SystemExit(__doc__)
