"""Teacher engines side by side: llama.cpp's server (parallel slots) vs transformers (batched generate).

Same model file (the assembled, pinned GGUF of params.yaml `models`), same round-0 discussion prompts
(GSM8K train questions), same greedy decoding and token limit, measured in one run. Generated tokens per
second counts completion tokens only (what the engines report: usage.completion_tokens / generate's new
tokens); peak memory is the RSS high-water mark of the process that holds the weights.

    PYTHONPATH=src python benchmarks/bench_teacher_engines.py --models qwen_coder_1_5b qwen_coder_0_5b
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from peak import machine_line

from magdi.cache import CallCache
from magdi.config import load_params
from magdi.discussion import RESPONSE_PREFIX, Agent, round0_messages
from magdi.llama_server import LlamaServer, LlamaServerBackend
from magdi.pipeline import gguf_file, load_examples


def _prompts(p, n: int) -> list[list[dict]]:
    agent = Agent("bench", None, "You are a careful reasoner.", 0.0, 1.0, 0, 0)
    return [round0_messages(agent, ex, "number") for ex in load_examples(p, "gsm8k", "train")[:n]]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_llama(p, model: str, msgs, parallel: int, max_new: int, binary: str, tmp: Path) -> dict:
    server = LlamaServer(binary, gguf_file(p, model), tmp / f"{model}_{parallel}.log", parallel, 2048,
                         extra_args=p.teachers.llama_server.extra_args)
    b = LlamaServerBackend(server, model, CallCache(tmp / f"cache_{model}_{parallel}_{time.time_ns()}.jsonl"),
                           max_retries=0, timeout_s=3600, prefill=RESPONSE_PREFIX)
    server.ensure()
    t = time.perf_counter()
    out = b.generate(msgs, 0.0, 1.0, max_new, 0)
    dt = time.perf_counter() - t
    rss = _rss_mb(server._proc.pid)  # noqa: SLF001 (benchmark reads the child's memory)
    b.close()
    n = sum(o["n_tokens"] for o in out)
    return {"engine": f"llama.cpp server, {parallel} slots", "tokens": n, "seconds": dt, "tok_s": n / dt,
            "peak_rss_mb": rss}


def bench_transformers(p, model: str, msgs, batch: int, max_new: int, dtype: str) -> dict:
    code = f"""
import json, resource, sys, time, torch
from magdi.config import load_params
from magdi.pipeline import model_source
from magdi.student import chat_prompt, generate, load_source, ready_for_generation
from magdi.discussion import RESPONSE_PREFIX
p = load_params()
lm, tok = ready_for_generation(*load_source(model_source(p, {model!r}), {dtype!r}))
msgs = json.loads(sys.stdin.read())
prompts = [chat_prompt(tok, m) + RESPONSE_PREFIX for m in msgs]
t = time.perf_counter(); n = 0
for i in range(0, len(prompts), {batch}):
    n += sum(g.n_tokens for g in generate(lm.eval(), tok, prompts[i:i+{batch}], {max_new}, [0.0]*len(prompts[i:i+{batch}]), [1.0]*len(prompts[i:i+{batch}]), seed=0))
dt = time.perf_counter() - t
print(json.dumps({{"tokens": n, "seconds": dt, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
    r = subprocess.run([sys.executable, "-c", code], input=json.dumps(msgs), capture_output=True, text=True, check=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {"engine": f"transformers {dtype}, batch {batch}", **res, "tok_s": res["tokens"] / res["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["qwen_coder_1_5b"])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--slots", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--binary", default="llama-server")
    ap.add_argument("--out", default="reports/benchmark_teacher_engines.md")
    a = ap.parse_args()
    torch.set_num_threads(2)
    p = load_params()
    msgs = _prompts(p, a.n)
    tmp = Path(".cache/bench_engines")
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in a.models:
        for slots in a.slots:
            rows.append({"model": model, **bench_llama(p, model, msgs, slots, a.max_new, a.binary, tmp)})
            print(rows[-1], flush=True)
        rows.append({"model": model, **bench_transformers(p, model, msgs, a.n, a.max_new, "bfloat16")})
        print(rows[-1], flush=True)
    lines = ["# Teacher engines: llama.cpp server vs transformers", "", machine_line(), "",
             f"Command: `PYTHONPATH=src python benchmarks/bench_teacher_engines.py --models {' '.join(a.models)} "
             f"--n {a.n} --max-new {a.max_new} --slots {' '.join(map(str, a.slots))}`", "",
             f"{a.n} GSM8K round-0 discussion prompts, greedy, at most {a.max_new} new tokens, prefilled JSON "
             "reply start, 2 threads; same assembled GGUF for both engines (transformers dequantises it to bf16).",
             "", "| model | engine | completion tokens | seconds | tokens/s | peak RSS (MB) |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['engine']} | {r['tokens']} | {r['seconds']:.1f} | {r['tok_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    lines += ["", f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on the 2-core CPU machine "
              f"(load average at the end: {Path('/proc/loadavg').read_text().split()[0]}); other work was "
              "running, so compare rows with each other rather than with other reports.", ""]
    Path(a.out).write_text("\n".join(lines))
    print(Path(a.out).read_text())


if __name__ == "__main__":
    main()
