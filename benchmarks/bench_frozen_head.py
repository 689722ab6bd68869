"""Benchmark: decoding with frozen weights (a merged adapter) with and without ``contiguous_logits_input``.

``PeftModel.merge_and_unload`` leaves every weight with ``requires_grad=False``. At the first decoding step
transformers hands the LM head the strided view ``hidden[:, -1:, :]``; for a 3-D strided input
``torch.matmul`` folds into one ``mm`` only when the weight requires grad, otherwise it expands the head to
batch x hidden x vocab and copies it (ATen ``should_fold``). ``magdi.student.ready_for_generation`` installs
a pre-hook that makes the head's input contiguous. Three states of the same model, same prompts, taking turns:

* ``trainable``: weights require grad (what ``load_student`` returns: the zero-shot evaluation);
* ``frozen``: ``requires_grad_(False)``, hook removed (what MAGDi/SiT evaluations ran before the fix);
* ``frozen + hook``: ``requires_grad_(False)`` with the hook (what they run now).

Measured per batch size: seconds of a ``generate`` call of ``--new-tokens`` greedy tokens, the process's
peak-RSS growth during the call (``VmHWM`` after resetting it), and whether the outputs are identical
across the three states (in bf16 the mm and bmm kernels may round differently, so a difference there is
information, not an error). Batch sizes are kept small by default: the copy grows as batch x hidden x vocab
(Qwen2.5-0.5B in bf16: 0.27 GB per row) and at the evaluation's batch 100 it would not fit this machine.

    .venv/bin/python benchmarks/bench_frozen_head.py      # the first scaling student, SVAMP test prompts
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import torch
from peak import machine_line

from magdi.config import load_params
from magdi.data import read_jsonl
from magdi.student import generate, load_student, student_prompt

STATES = ("trainable", "frozen", "frozen + hook")


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _reset_hwm() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _set_state(model, state: str, hooks: dict) -> None:
    head = model.get_output_embeddings()
    model.requires_grad_(state == "trainable")
    head._forward_pre_hooks.clear()
    if state != "frozen":
        head._forward_pre_hooks.update(hooks)


def run(student_dir: str, dtype: str, bench_file: Path, batches: list[int], new_tokens: int, repeats: int) -> dict:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model, tok = load_student(student_dir, dtype)
    model.eval()
    hooks = dict(model.get_output_embeddings()._forward_pre_hooks)  # the one ready_for_generation installed
    rows = list(read_jsonl(bench_file))
    if max(batches) > len(rows):
        raise SystemExit(f"{bench_file} has {len(rows)} questions, fewer than batch {max(batches)}")
    generate(model, tok, [student_prompt(tok, rows[0], "number")], 2, 0.0, 1.0, 0)  # warm-up, not measured
    results = []
    for b in batches:
        prompts = [student_prompt(tok, r, "number") for r in rows[:b]]
        times: dict[str, list[float]] = {s: [] for s in STATES}
        rss: dict[str, list[float]] = {s: [] for s in STATES}
        texts: dict[str, list[str]] = {}
        for rep in range(repeats):
            order = STATES if rep % 2 == 0 else tuple(reversed(STATES))
            for s in order:
                _set_state(model, s, hooks)
                _reset_hwm()
                base = _hwm_kib()
                t = time.perf_counter()
                out = generate(model, tok, prompts, new_tokens, 0.0, 1.0, 0)
                times[s].append(time.perf_counter() - t)
                rss[s].append((_hwm_kib() - base) / 1024)
                texts[s] = [g.text for g in out]
        results.append({"batch": b, "seconds": {s: min(v) for s, v in times.items()},
                        "peak_rss_growth_mib": {s: max(v) for s, v in rss.items()},
                        "identical_outputs": texts["frozen"] == texts["frozen + hook"] == texts["trainable"]})
    _set_state(model, "frozen + hook", hooks)
    head = model.get_output_embeddings().weight
    return {"student_dir": student_dir, "dtype": dtype, "parameters": sum(p.numel() for p in model.parameters()),
            "head": list(head.shape), "new_tokens": new_tokens, "repeats": repeats,
            "threads": torch.get_num_threads(), "results": results,
            "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def write_md(res: dict, out: Path, cmd: str) -> None:
    lines = [
        "# Decoding a merged (frozen) student: the LM-head copy and its fix", "", machine_line(),
        "",
        f"Written by `benchmarks/bench_frozen_head.py` ({res['when']}); command: `{cmd}`. Student "
        f"`{res['student_dir']}` ({res['parameters'] / 1e6:.0f} M parameters, LM head {res['head'][0]} x "
        f"{res['head'][1]}), {res['dtype']} (student.generation_dtype), {res['threads']} threads, greedy, {res['new_tokens']} new tokens per call, best "
        f"of {res['repeats']} calls per state, the states taking turns. Why and what the states are: the "
        "script's docstring.",
        "",
        "| batch | trainable s | frozen s | frozen + hook s | frozen / frozen + hook | peak RSS growth MiB "
        "(trainable / frozen / frozen + hook) | outputs identical |",
        "|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in res["results"]:
        s, m = r["seconds"], r["peak_rss_growth_mib"]
        lines.append(f"| {r['batch']} | {s['trainable']:.2f} | {s['frozen']:.2f} | {s['frozen + hook']:.2f} | "
                     f"{s['frozen'] / s['frozen + hook']:.2f}x | {m['trainable']:.0f} / {m['frozen']:.0f} / "
                     f"{m['frozen + hook']:.0f} | {'yes' if r['identical_outputs'] else 'no'} |")
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--student", default=None,
                    help="a key of experiments.scaling_students (default: the first one; 'main': the main student)")
    ap.add_argument("--task", default="svamp", help="test questions of this task (paths.data_dir)")
    ap.add_argument("--batches", default="4,16")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="reports/benchmark_frozen_head.md")
    a = ap.parse_args()
    p = load_params(a.params, check_mirror=False)
    name = a.student or (p.experiments.scaling_students or ["main"])[0]
    student_dir = p.paths.student_dir if name == "main" else p.student_folder(name)
    bench = Path(p.paths.data_dir) / a.task / "test.jsonl"
    res = run(student_dir, p.student.gen_dtype, bench, [int(x) for x in a.batches.split(",")], a.new_tokens, a.repeats)
    cmd = (f".venv/bin/python benchmarks/bench_frozen_head.py --student {name} --task {a.task} --batches {a.batches} "
           f"--new-tokens {a.new_tokens} --repeats {a.repeats}")
    write_md(res, Path(a.out), cmd)
    print(Path(a.out).read_text())


if __name__ == "__main__":
    main()
