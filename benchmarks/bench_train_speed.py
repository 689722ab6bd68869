"""Benchmark: training speed of the default training core against the previous default, and our SiT training
against TRL's ``SFTTrainer`` (packing on), each pair in the same run on the same machine.

Part 1, MAGDi (every loss on) on one task's MAGs, the first ``--steps`` steps of the real loop
(``magdi.train.train``, ``stop_after``), each variant on a freshly loaded student, in turn, ``--repeats`` times:

- **previous** (the default until this benchmark): ``train.attention: sdpa``, a dense ``[N, 1, L, L]`` block
  mask over packed rows as wide as the longest pack;
- **default** (``params.yaml`` as it is): ``train.attention: segments`` (``magdi.core.segment_attention``: one
  SDPA call per prompt and per chain; every pack of the step in one row, so no position is padding).

Before the measured runs one untimed run of each variant (``--warmup-steps`` steps) loads the weights into the
page cache and creates the kernels' primitives, so the first measured run pays no more than the others.

Useful tokens are the real tokens of the step's unique (prompt, chain) sequences (``TrainResult.tokens``: the same
numerator for every variant), so ratios of useful tokens/s are speed-ups. The loss of each step is recorded: the
variants optimise the same objective, so their first-step losses agree up to bf16 rounding.

Part 2, SiT (``sit_<agent>``: L_ntp on one teacher's correct chains) for one epoch: our loop (the default above)
against TRL's ``SFTTrainer`` with ``packing=True`` (best-fit-decreasing packing, padding-free rows with
per-sequence position ids, transformers' SDPA with the block-diagonal mask it derives from them), given the same
(prompt, chain) pairs as prompt/completion records (loss on the completion only, as ours), the same LoRA, lr,
warm-up share, gradient clipping, seed and precision (bf16 autocast with fp32 weights where native). Useful
tokens: the sum over the chains of prompt + chain tokens as our loop counts them; seconds: the training loop
only (TRL's tokenisation and packing happen before ``train()``, ours inside the loop: counted against us).

    .venv/bin/python benchmarks/bench_train_speed.py --task gsm8k          # -> reports/benchmark_train_speed.md
    .venv/bin/python benchmarks/bench_train_speed.py --smoke               # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peak import machine_line

VARIANTS = ("previous", "default")


def _cfg_for(cfg, variant: str):
    return cfg if variant != "previous" else cfg.model_copy(update={"attention": "sdpa"})


def _fresh_student(a, p):
    from magdi.student import attach_lora, load_student

    torch.manual_seed(0)
    if a.smoke:
        from magdi.testing.faults import tiny_student

        tok, lm, _ = tiny_student()
        return lm, tok
    lm, tok = load_student(p.paths.student_dir, p.student.dtype, p.student.trust_remote_code)
    lora = p.student.lora
    return attach_lora(lm, lora.r, lora.alpha, lora.dropout, lora.target_modules), tok


def _magdi_part(a, p, mags) -> list[dict]:
    from magdi.train import build_items, method_spec, train, training_precision

    _, cfg = p.train_for("magdi", a.task)
    cfg = cfg.model_copy(update={"bf16": training_precision(cfg.bf16).bf16})
    spec = method_spec("magdi")
    runs = []
    for v in VARIANTS:  # untimed
        lm, tok = _fresh_student(a, p)
        with tempfile.TemporaryDirectory() as d:
            train(lm, tok, build_items(mags, spec, tok, cfg.graph), spec, _cfg_for(cfg, v), Path(d),
                  stop_after=a.warmup_steps)
        del lm
    for rep in range(a.repeats):
        order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]  # machine drift hits every variant alike
        for v in order:
            lm, tok = _fresh_student(a, p)
            items = build_items(mags, spec, tok, cfg.graph)
            with tempfile.TemporaryDirectory() as d:
                res = train(lm, tok, items, spec, _cfg_for(cfg, v), Path(d), stop_after=a.steps)
            runs.append({"variant": v, "repeat": rep, "steps": res.steps, "tokens": res.tokens,
                         "seconds": round(res.seconds, 2), "tokens_per_s": round(res.tokens / res.seconds, 1),
                         "losses": [round(r["loss"], 4) for r in res.history], "precision": res.precision})
            print(json.dumps(runs[-1]), flush=True)
            del lm
    return runs


def _sit_part(a, p, mags) -> dict:
    from magdi.core import prompt_ids, target_ids
    from magdi.train import build_items, method_spec, train, training_precision

    method = f"sit_{a.sit_agent}"
    base, cfg = p.train_for(method, a.task)
    prec = training_precision(cfg.bf16)
    cfg = cfg.model_copy(update={"bf16": prec.bf16})
    spec = method_spec(base)
    lm, tok = _fresh_student(a, p)
    items = build_items(mags, spec, tok, cfg.graph)
    pairs = [(it.prompt, t) for it in items for t in it.targets]
    useful = sum(len(prompt_ids(tok, q, cfg.max_prompt_tokens)) + len(target_ids(tok, c, cfg.max_target_tokens))
                 for q, c in pairs)
    with tempfile.TemporaryDirectory() as d:
        ours = train(lm, tok, items, spec, cfg, Path(d))
    del lm
    trl = _trl_sft(a, p, cfg, pairs, prec.bf16)
    return {"method": method, "chains": len(pairs), "useful_tokens": useful, "precision": prec.dtype,
            "ours": {"seconds": round(ours.seconds, 2), "updates": ours.steps,
                     "tokens_per_s": round(useful / ours.seconds, 1),
                     "last_loss": round(ours.history[-1]["loss"], 4)},
            "trl": {**trl, "tokens_per_s": round(useful / trl["seconds"], 1)}}


def _trl_sft(a, p, cfg, pairs, bf16: bool) -> dict:
    """TRL's SFTTrainer on the same pairs; returns its training-loop seconds, updates and tokens it trained on."""
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    model, tok = _fresh_student(a, p)
    model = model.unload()  # the plain model: TRL attaches its own LoRA from the same settings
    tok.padding_side = "right"
    lora = p.student.lora
    with tempfile.TemporaryDirectory() as d:
        args = SFTConfig(output_dir=d, packing=True, max_length=cfg.max_prompt_tokens + cfg.max_target_tokens,
                         per_device_train_batch_size=1, num_train_epochs=cfg.epochs, learning_rate=cfg.lr,
                         lr_scheduler_type="linear", warmup_steps=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm,
                         weight_decay=0.0, bf16=bf16, use_cpu=not torch.cuda.is_available(), seed=cfg.seed,
                         report_to="none", save_strategy="no", logging_steps=10**6, dataloader_num_workers=0,
                         disable_tqdm=True)
        ds = Dataset.from_list([{"prompt": q, "completion": c} for q, c in pairs])
        peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_cfg)
        trained = sum(len(r["input_ids"]) for r in trainer.train_dataset)
        t0 = time.time()
        out = trainer.train()
        seconds = time.time() - t0
    return {"seconds": round(seconds, 2), "updates": out.global_step, "tokens_trained": trained,
            "last_loss": round(out.training_loss, 4), "version": trl.__version__}


def _render(a, meta: dict, runs: list[dict], sit: dict | None) -> str:
    by = {v: [r for r in runs if r["variant"] == v] for v in VARIANTS}
    med = {v: statistics.median(r["tokens_per_s"] for r in rs) for v, rs in by.items()}
    lines = [f"# Training speed: the default core vs the previous one, and SiT vs TRL's SFTTrainer ({a.task})", "",
             machine_line(), "",
             f"Generated by `python benchmarks/bench_train_speed.py {meta['argv']}` on {meta['when']} "
             f"({meta['threads']} torch threads; torch {torch.__version__}).", "",
             f"## MAGDi, the first {a.steps} steps on {meta['n_mags']} {a.task} MAGs "
             f"({meta['mags_per_step']} per step), {a.repeats} run(s) per variant, in turn", "",
             "| variant | attention | useful tokens/s (median) | each run | first-step loss |",
             "|---|---|---:|---|---:|"]
    what = {"previous": "sdpa (dense L x L mask, rows as wide as the longest pack)",
            "default": "segments (one SDPA call per segment, one row, no padding)"}
    for v in VARIANTS:
        rs = by[v]
        lines.append(f"| {v} | {what[v]} | {med[v]:.1f} | "
                     f"{', '.join(format(r['tokens_per_s'], '.1f') for r in rs)} | {rs[0]['losses'][0]:.4f} |")
    lines += ["", f"speed-up: {med['default'] / med['previous']:.2f}× (default vs previous, useful tokens/s)", "",
              f"Precision: {runs[0]['precision']} autocast. Each run trained {runs[0]['tokens']} useful tokens in "
              f"{runs[0]['steps']} steps. Losses of every step (same objective, bf16 rounding apart): "
              + "; ".join(f"{v}: {by[v][0]['losses']}" for v in VARIANTS) + "."]
    if sit:
        o, t = sit["ours"], sit["trl"]
        lines += ["", f"## SiT ({sit['method']}): one epoch over {sit['chains']} chains, ours vs TRL {t['version']} "
                  "SFTTrainer (packing on)", "",
                  "| trainer | updates | seconds | useful tokens/s | last loss |", "|---|---:|---:|---:|---:|",
                  f"| ours (default) | {o['updates']} | {o['seconds']} | {o['tokens_per_s']} | {o['last_loss']} |",
                  f"| TRL SFTTrainer | {t['updates']} | {t['seconds']} | {t['tokens_per_s']} | {t['last_loss']} "
                  "(mean over the run) |", "",
                  f"ours / TRL: {o['tokens_per_s'] / t['tokens_per_s']:.2f}× (useful tokens/s; {sit['useful_tokens']} "
                  f"useful tokens, TRL's packed dataset holds {t['tokens_trained']}). Precision: {sit['precision']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--task", default="gsm8k")
    ap.add_argument("--steps", type=int, default=6, help="MAGDi steps per run (stop_after)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per variant")
    ap.add_argument("--warmup-steps", type=int, default=1, help="steps of the untimed run of each variant")
    ap.add_argument("--sit-agent", default="qwen15", help="the teacher whose chains SiT trains on")
    ap.add_argument("--no-sit", action="store_true", help="skip part 2 (SiT vs TRL)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, the task's MAGs (seconds)")
    ap.add_argument("--out", default="reports/benchmark_train_speed.md")
    a = ap.parse_args()
    import sys

    from magdi.config import cli_params
    from magdi.mag import read_mags
    from magdi.pipeline import _set_threads
    from magdi.pipeline.paths import mags_file

    _set_threads()
    p = cli_params(a.params)
    if a.smoke:
        from magdi.testing.faults import tiny_student

        mags, a.sit_agent = tiny_student()[2], "x"
    else:
        mags = read_mags(mags_file(p, a.task))
    n_mags = a.steps * p.train_for("magdi", a.task)[1].mags_per_step
    runs = _magdi_part(a, p, mags[:n_mags])
    sit = None if a.no_sit else _sit_part(a, p, mags)
    meta = {"argv": " ".join(sys.argv[1:]), "when": dt.datetime.now().isoformat(timespec="seconds"),
            "threads": torch.get_num_threads(), "n_mags": n_mags,
            "mags_per_step": p.train_for("magdi", a.task)[1].mags_per_step}
    text = _render(a, meta, runs, sit)
    print(text)
    if not a.smoke:
        out = Path(a.out)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "magdi": runs, "sit": sit}, indent=1) + "\n")


if __name__ == "__main__":
    main()
