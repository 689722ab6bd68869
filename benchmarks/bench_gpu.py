"""GPU checks and benchmarks at the paper's shape (random weights: speed does not depend on their values).

Subcommands (each writes one JSON file into ``--json-dir``; ``report`` turns them into reports/benchmark_gpu.md):

    python benchmarks/bench_gpu.py methods                   # one bf16 training step of every method (tiny model)
    python benchmarks/bench_gpu.py core --shape mistral7b    # training core: packed vs official pattern, ckpt on/off
    python benchmarks/bench_gpu.py generate --shape mistral7b --batch-sizes 1 16 64
    accelerate launch --config_file configs/accelerate_ddp.yaml --num_processes 1 benchmarks/bench_gpu.py accel
    python benchmarks/bench_gpu.py report --json-dir DIR --out reports/benchmark_gpu.md

``core`` builds a Mistral-7B-shaped student from its config (bf16 frozen weights, LoRA r=16 on q/v, fp32 LoRA,
heads and AdamW state, bf16 autocast), synthetic MAGs of the paper's shape (3 agents, 1-4 rounds, ~250-token
chains) and times optimiser steps of ``--mags-per-step`` MAGs (micro-steps of ``--micro`` MAGs, gradients
accumulated) for each variant: ``magdi.core`` (packed, the default) with and without gradient checkpointing,
and the official code's three-pass pattern (``bench_train_core.naive_forward``). ``--shape small`` and
``--device cpu`` run the same code in seconds on a CPU (a smoke test of this script).

MFU counts the useful work of a step the same way for every variant: each unique token once through the
frozen base (forward 2N + input-gradient backward 2N FLOPs per token, N = non-embedding parameters; frozen
weights need no weight gradient), the vocabulary projection only where L_ntp scores a position (4·V·D), and
causal attention over each token's real context (prompt + own chain prefix; 4·d FLOPs per context token per
layer forward, 3x that with backward). Recomputation, LoRA, heads and masked-out attention are not counted. The
peak is a bf16 8192^3 matmul measured in the same run (and the 989 TFLOP/s datasheet figure for H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from magdi.config import TrainCfg  # noqa: E402
from magdi.core import encode_packed, prompt_ids, target_ids  # noqa: E402
from magdi.mag import MAG, Node  # noqa: E402
from magdi.student import attach_lora, generate  # noqa: E402
from magdi.train import (  # noqa: E402
    MagdiStudent,
    base_model,
    build_items,
    compile_decoder_layers,
    enable_gradient_checkpointing,
    grad_norm,
    method_spec,
    train,
)

#: MistralConfig keyword sets; ``mistral7b`` is Mistral-7B-v0.1's shape.
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab=2000),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, vocab=32000),
    "mistral7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab=32000),
}
DATASHEET_BF16_TFLOPS = 989.4  # H100/H200 SXM dense bf16
AGENTS = ["agent_a", "agent_b", "agent_c"]


# ----------------------------------------------------------------------------- inputs


def word_tokenizer(vocab: int):
    """A word-level tokenizer with ``vocab`` entries: one token per synthetic word ``w<i>``."""
    from bench_train_core import SPECIALS, wrap_word_tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {t: i for i, t in enumerate(SPECIALS)}
    words.update({f"w{i}": len(SPECIALS) + i for i in range(vocab - len(SPECIALS))})
    wl = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    return wrap_word_tokenizer(wl)


def synthetic_mags(n: int, vocab: int, chain_tokens: int, max_rounds: int = 4, seed: int = 0) -> list[MAG]:
    """MAGs of the paper's shape: 3 agents, 1..max_rounds rounds, chains of ~chain_tokens words, mixed labels."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(vocab - 5)}" for _ in range(k))

    mags = []
    for q in range(n):
        nodes = []
        for r in range(1 + q % max_rounds):
            for a in AGENTS:
                ok = rng.random() < 0.6
                k = max(8, int(rng.gauss(chain_tokens, chain_tokens / 10)))
                nodes.append(Node(a, r, words(k), "5" if ok else "7", 0.8, ok))
        if all(nd.correct for nd in nodes) or not any(nd.correct for nd in nodes):
            nodes[0] = Node(nodes[0].agent, 0, nodes[0].reasoning, "7" if nodes[0].correct else "5", 0.8,
                            not nodes[0].correct)
        mags.append(MAG(f"syn-{q}", "gsm8k", words(60), "5", nodes))
    return mags


def build_lm(shape: str, vocab: int, device: str, dtype: torch.dtype):
    """A MistralForCausalLM of ``shape`` with random weights, built directly on ``device`` in ``dtype``."""
    from transformers import MistralConfig, MistralForCausalLM

    kw = {k: v for k, v in SHAPES[shape].items() if k != "vocab"}
    cfg = MistralConfig(**kw, vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                        max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            lm = MistralForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return lm


def n_nonembedding(lm) -> int:
    base = base_model(lm)
    skip = {id(base.get_input_embeddings().weight), id(base.get_output_embeddings().weight)}
    return sum(p.numel() for n, p in base.named_parameters() if id(p) not in skip and "lora_" not in n)


def useful_flops(items, tok, cfg: TrainCfg, n_nonemb: int, vocab: int, hidden: int, layers: int) -> dict:
    """Model FLOPs of the useful work of one optimiser step over ``items`` (see the module docstring)."""
    tokens = ctx = scored = 0
    for it in items:
        p = len(prompt_ids(tok, it.prompt, cfg.max_prompt_tokens))
        tokens += p
        ctx += p * (p + 1) // 2
        seen = set()
        for t, y in zip(it.targets, it.labels, strict=True):
            if t in seen:
                continue
            seen.add(t)
            c = len(target_ids(tok, t, cfg.max_target_tokens))
            tokens += c
            ctx += c * p + c * (c + 1) // 2
            if y == 1:
                scored += c
    linear = 4 * n_nonemb * tokens
    head = 4 * vocab * hidden * scored
    attn = 3 * 4 * hidden * layers * ctx
    return {"tokens": tokens, "scored_positions": scored, "linear": linear, "head": head, "attention": attn,
            "total": linear + head + attn}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_tflops(device: str, n: int = 8192, reps: int = 10) -> float:
    """bf16 matmul rate on random data (mean of ``reps`` products after 3 warm-ups)."""
    if not device.startswith("cuda"):
        n, reps = 1024, 3
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def peak_mem_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def env_info(device: str) -> dict:
    import transformers

    info = {"date": dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def dump(json_dir: Path, name: str, res: dict) -> None:
    json_dir.mkdir(parents=True, exist_ok=True)
    (json_dir / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res)[:2000], flush=True)


# ----------------------------------------------------------------------------- methods: one step each


METHOD_CASES = [
    ("sit_agent_a", {}), ("dss_mt", {}), ("magdi_r0", {}), ("magdi_cn", {}), ("magdi_an", {}),
    ("magdi", {}), ("magdi", {"core": "fused", "attention": "sdpa"}), ("magdi", {"encoder": "node_attention"}),
    ("magdi", {"encoder": "token_attention"}), ("magdi", {"node_repr": "frozen"}),
    ("magdi", {"gradient_checkpointing": True}),
] + ([("magdi", {"attention": "flex"})] if torch.cuda.is_available() else [])  # FlexAttention: no CPU backward


def cmd_methods(a) -> dict:
    """One bf16 training step (``magdi.train.train``, accelerate picks the device) of every method."""
    import tempfile

    tok = word_tokenizer(SHAPES["tiny"]["vocab"])
    mags = synthetic_mags(8, SHAPES["tiny"]["vocab"], 40)
    rows = []
    for method, over in METHOD_CASES:
        lm = attach_lora(build_lm("tiny", len(tok), "cpu", torch.float32), 16, 32, 0.05, ["q_proj", "v_proj"])
        spec = method_spec(method)
        cfg = TrainCfg(mags_per_step=4, max_prompt_tokens=96, max_target_tokens=64, bf16=True, hidden_dim=16,
                       **over)
        items = build_items(mags, spec, tok, cfg.graph)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            res = train(lm, tok, items, spec, cfg, Path(d), stop_after=1)
        rec = res.history[0]
        dev = next(p for p in lm.parameters() if p.requires_grad).device.type
        ok = all(math.isfinite(v) for k, v in rec.items() if k not in ("step", "lr"))
        rows.append({"method": method, "overrides": over, "device": dev, "finite": ok,
                     "seconds": round(time.perf_counter() - t0, 2),
                     **{k: rec[k] for k in ("loss", "ntp", "contrastive", "graph", "grad_norm") if k in rec}})
        print(rows[-1], flush=True)
    return {"env": env_info("cuda" if torch.cuda.is_available() else "cpu"), "rows": rows,
            "all_ok": all(r["finite"] and r["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
                          for r in rows)}


# ----------------------------------------------------------------------------- core at paper shape


def set_checkpointing(lm, on: bool) -> None:
    base = base_model(lm)
    if on:
        enable_gradient_checkpointing(lm)
    else:
        for name in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
            if hasattr(base, name):
                getattr(base, name)()
                break


def compile_layers(lm, on: bool) -> None:
    """``torch.compile`` each decoder layer (dynamic shapes: packed rows change width every step), so the
    elementwise work around the matmuls (fp32 RMSNorm, rotary, SwiGLU, LoRA scaling) is fused into fewer
    kernels; ``on=False`` restores eager layers. The layers share code, so one graph serves all of them."""
    if on:
        compile_decoder_layers(lm)  # what train.compile does
        return
    base = base_model(lm)
    for layer in base.get_decoder().layers:
        layer._compiled_call_impl = None


def cmd_core(a) -> dict:
    from bench_train_core import naive_forward

    dev, shape = a.device, a.shape
    vocab = SHAPES[shape]["vocab"]
    tok = word_tokenizer(vocab)
    t0 = time.perf_counter()
    lm = build_lm(shape, len(tok), dev, torch.bfloat16)  # student.dtype: bfloat16 (frozen base)
    lm = attach_lora(lm, 16, 32, 0.05, ["q_proj", "v_proj"])  # peft keeps the adapter in fp32
    build_s = time.perf_counter() - t0
    cfg = TrainCfg(mags_per_step=a.micro, max_prompt_tokens=160, max_target_tokens=a.chain_tokens + 64,
                   bf16=True, core="packed")
    spec = method_spec("magdi")
    core = MagdiStudent(lm, spec, cfg).to(dev)
    params = [p for p in core.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    n_steps = a.steps + 1
    mags = synthetic_mags(a.mags_per_step * n_steps, vocab, a.chain_tokens, seed=1)
    items = build_items(mags, spec, tok, cfg.graph)
    steps = [items[i * a.mags_per_step:(i + 1) * a.mags_per_step] for i in range(n_steps)]
    lcfg = lm.get_base_model().config
    nn_ = n_nonembedding(lm)
    flops = [useful_flops(s, tok, cfg, nn_, lcfg.vocab_size, lcfg.hidden_size, lcfg.num_hidden_layers)
             for s in steps]
    peak = matmul_tflops(dev)
    print(f"built {shape} in {build_s:.1f}s; {nn_ / 1e9:.2f}B non-embedding params; matmul {peak:.0f} TFLOP/s",
          flush=True)

    def one_step(batch, variant: str, micro: int, seed: int) -> dict:
        groups = [batch[i:i + micro] for i in range(0, len(batch), micro)]
        lm_tokens = padded = 0
        enc_s = 0.0
        for g in groups:
            with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16):
                if variant == "naive":  # "flex" runs the packed core with the BlockMask attention
                    out, cnt = naive_forward(core, g, tok, cfg, seed)
                    lm_tokens += cnt["real"]
                    padded += cnt["padded"]
                else:
                    t_enc = time.perf_counter()
                    enc = encode_packed(g, tok, cfg.max_prompt_tokens, cfg.max_target_tokens).to(dev)
                    enc_s += time.perf_counter() - t_enc
                    out = core(enc, g, seed)
                    lm_tokens += enc.lm_tokens
                    padded += enc.input_ids.numel()
            (out["loss"] / len(groups)).backward()
            del out
        grad_norm(None, params, cfg.max_grad_norm)  # the pipeline's clip (train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"lm_tokens_real": lm_tokens, "lm_tokens_padded": padded, "encode_seconds": enc_s}

    base = lm.get_base_model()
    variants = []
    for v in a.variants:
        kind, *flags = v.split("+")
        micro = a.micro if not kind.endswith("16") else a.mags_per_step
        variants.append((v, kind.rstrip("0123456789"), "ckpt" in flags, "compile" in flags, micro))
    results = {}

    def use_attention(kind: str) -> None:  # flex: magdi.core hands the decoder a BlockMask (train.attention)
        base.set_attn_implementation("flex_attention" if kind == "flex" else "sdpa")

    def eval_loss(kind: str) -> float:
        use_attention(kind)
        core.eval()
        g = steps[0][:2]
        with torch.no_grad(), torch.autocast(dev.split(":")[0], dtype=torch.bfloat16):
            out = core(encode_packed(g, tok, cfg.max_prompt_tokens, cfg.max_target_tokens).to(dev), g, 1)
        core.train()
        return float(out["loss"])

    for name, kind, ckpt, comp, micro in variants:
        set_checkpointing(lm, ckpt)
        compile_layers(lm, comp)
        core.train()
        reset_peak(dev)
        rec = {"kind": kind, "checkpointing": ckpt, "compiled": comp, "micro_mags": micro, "seconds": []}
        try:
            if kind == "flex":  # same objective: the loss on two MAGs (eval mode) under both attentions
                rec["loss_check"] = {"sdpa": eval_loss("packed"), "flex": eval_loss("flex")}
            use_attention(kind)
            for i, batch in enumerate(steps):
                sync(dev)
                t = time.perf_counter()
                cnt = one_step(batch, kind, micro, 7919 + i)
                sync(dev)
                if i > 0:  # step 0 is the warm-up (and, compiled, the compilation)
                    rec["seconds"].append(time.perf_counter() - t)
                    rec.update(cnt)
                else:
                    rec["first_step_seconds"] = time.perf_counter() - t
                print(f"{name} step {i}: {time.perf_counter() - t:.2f}s", flush=True)
        except Exception as e:  # one broken variant (out of memory, say) must not lose the others' numbers
            import traceback

            traceback.print_exc(limit=-12)  # the log keeps the cause; the JSON keeps its first line
            what = "out of memory" if isinstance(e, torch.OutOfMemoryError) else type(e).__name__
            rec["error"] = f"{what}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            opt.zero_grad(set_to_none=True)
        rec["peak_mem_gib"] = peak_mem_gib(dev)
        if rec["seconds"]:
            sec = statistics.median(rec["seconds"])
            fl = statistics.mean(f["total"] for f in flops[1:])
            toks = statistics.mean(f["tokens"] for f in flops[1:])
            rec.update(seconds_median=sec, useful_tokens_per_s=toks / sec, tflops=fl / sec / 1e12,
                       mfu_measured_peak=fl / sec / 1e12 / peak, mfu_datasheet=fl / sec / 1e12 / DATASHEET_BF16_TFLOPS)
        results[name] = rec
        print(name, {k: v for k, v in rec.items() if k != "seconds"}, flush=True)
    profile = None
    if a.profile:  # where the time of one step goes (first variant's settings)
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        name, kind, ckpt, comp, micro = variants[0]
        set_checkpointing(lm, ckpt)
        compile_layers(lm, comp)
        use_attention(kind)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
        with torch_profile(activities=acts) as prof:
            one_step(steps[1], kind, micro, 1)
            sync(dev)
        ev = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        profile = {"variant": name,
                   "top": [{"name": e.key[:120], "self_device_ms": e.self_device_time_total / 1e3,
                            "device_ms": e.device_time_total / 1e3, "calls": e.count} for e in ev[:40]]}
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70),
              flush=True)
    set_checkpointing(lm, False)
    compile_layers(lm, False)
    use_attention("packed")
    return {"env": env_info(dev), "profile": profile, "shape": shape, "lm_config": {k: getattr(lcfg, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size")}, "non_embedding_params": nn_, "params_trainable": sum(p.numel() for p in params),
        "build_seconds": build_s, "matmul_bf16_tflops": peak, "mags_per_step": a.mags_per_step,
        "chain_tokens": a.chain_tokens, "measured_steps": a.steps,
        "flops_per_step": {k: statistics.mean(f[k] for f in flops[1:]) for k in flops[0]},
        "nodes_per_step": statistics.mean(sum(len(it.targets) for it in s) for s in steps[1:]),
        "variants": results}


# ----------------------------------------------------------------------------- generation


def cmd_generate(a) -> dict:
    dev, shape = a.device, a.shape
    vocab = SHAPES[shape]["vocab"]
    tok = word_tokenizer(vocab)
    lm = build_lm(shape, len(tok), dev, torch.bfloat16).eval()
    lm.generation_config.eos_token_id = None  # random weights: every row decodes the full length
    rng = random.Random(3)
    prompts = [" ".join(f"w{rng.randrange(vocab - 5)}" for _ in range(a.prompt_tokens))
               for _ in range(max(a.batch_sizes))]
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    with torch.no_grad():
        generate(lm, tok, prompts[:2], 8)  # warm-up
        rows = []
        for bs in a.batch_sizes:
            sync(dev)
            t = time.perf_counter()
            out = generate(lm, tok, prompts[:bs], a.new_tokens)
            sync(dev)
            sec = time.perf_counter() - t
            n = sum(g.n_tokens for g in out)
            rows.append({"batch": bs, "new_tokens": a.new_tokens, "generated": n, "seconds": sec,
                         "tokens_per_s": n / sec, "ms_per_step": 1000 * sec / a.new_tokens,
                         "weight_read_tb_per_s": weight_bytes * a.new_tokens / sec / 1e12})
            print(rows[-1], flush=True)
    return {"env": env_info(dev), "shape": shape, "prompt_tokens": a.prompt_tokens, "weight_gib": weight_bytes / 2**30,
            "rows": rows}


# ----------------------------------------------------------------------------- accelerate launch


def cmd_accel(a) -> dict:
    """``magdi.train.train`` under whatever ``accelerate launch`` configured (DDP, FSDP, ...)."""
    import tempfile

    from accelerate import PartialState

    state = PartialState()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = SHAPES[a.shape]["vocab"]
    tok = word_tokenizer(vocab)
    on = dev if a.shape == "mistral7b" else "cpu"
    lm = build_lm(a.shape, len(tok), on, torch.bfloat16 if a.shape == "mistral7b" else torch.float32)
    lm = attach_lora(lm, 16, 32, 0.05, ["q_proj", "v_proj"])
    spec = method_spec("magdi")
    cfg = TrainCfg(mags_per_step=a.micro, max_prompt_tokens=160, max_target_tokens=a.chain_tokens + 64, bf16=True,
                   gradient_checkpointing=a.shape == "mistral7b", hidden_dim=256 if a.shape == "mistral7b" else 16)
    items = build_items(synthetic_mags(a.micro * state.num_processes * a.steps, vocab, a.chain_tokens), spec, tok)
    with tempfile.TemporaryDirectory() as d:
        res = train(lm, tok, items, spec, cfg, Path(d))
    from accelerate.state import AcceleratorState

    st = AcceleratorState()
    out = {"env": env_info(dev), "shape": a.shape, "distributed_type": str(st.distributed_type),
           "num_processes": st.num_processes, "mixed_precision": str(st.mixed_precision),
           "fsdp_plugin": None if getattr(st, "fsdp_plugin", None) is None else str(
               getattr(st.fsdp_plugin, "fsdp_version", "?")),
           "steps": res.steps, "seconds": res.seconds, "tokens": res.tokens, "tokens_per_s": res.tokens / res.seconds,
           "losses": [round(h["loss"], 4) for h in res.history], "peak_mem_gib": peak_mem_gib(dev),
           "all_finite": all(math.isfinite(h["loss"]) for h in res.history)}
    return out if state.is_main_process else {}


# ----------------------------------------------------------------------------- report


def cmd_report(a) -> str:
    d = a.json_dir
    load = {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))}
    parts = ["# GPU checks and benchmarks\n",
             "Generated by `benchmarks/bench_gpu.py report` from the JSON files that `benchmarks/gpu_check.sh` wrote "
             "on a lent GPU machine (random weights built from a config; speed does not depend on their values).\n"]
    if "pytest" in load:
        parts.append(f"## `pytest -k cuda`\n\n```\n{load['pytest']['tail']}\n```\n")
    if "methods" in load:
        m = load["methods"]
        parts.append(f"## One bf16 training step of every method on {m['env'].get('gpu', m['env']['device'])}\n\n"
                     "`magdi.train.train(..., stop_after=1)` with `train.bf16: true` on a tiny random Mistral "
                     "(hidden 64, 2 layers) and 8 synthetic MAGs; accelerate places the run on the GPU.\n\n"
                     "| method | overrides | device | loss | ntp | contrastive | graph | grad norm | finite |\n"
                     "|---|---|---|---:|---:|---:|---:|---:|---|\n")
        for r in m["rows"]:
            parts[-1] += (f"| {r['method']} | {json.dumps(r['overrides']) if r['overrides'] else ''} | {r['device']} | "
                          + " | ".join(f"{r[k]:.4f}" if k in r else "" for k in
                                       ("loss", "ntp", "contrastive", "graph", "grad_norm")) + f" | {r['finite']} |\n")
    for key in sorted(k for k in load if k.startswith("core")):
        c = load[key]
        env = c["env"]
        f = c["flops_per_step"]
        parts.append(
            f"## Training core at the paper's shape ({key})\n\n"
            f"{env.get('gpu', env['device'])}, torch {env['torch']}, transformers {env['transformers']}. "
            f"Student: MistralForCausalLM of shape {c['lm_config']} ({c['non_embedding_params'] / 1e9:.2f}B "
            f"non-embedding parameters), bf16 frozen weights, LoRA r=16/alpha 32 on q/v + score head + GCN "
            f"({c['params_trainable']:,} trainable, fp32), bf16 autocast, AdamW. One optimiser step = "
            f"{c['mags_per_step']} synthetic MAGs (3 agents, 1-4 rounds, ~{c['chain_tokens']}-token chains; "
            f"{c['nodes_per_step']:.0f} nodes/step on average), method `magdi` (all three losses); median of "
            f"{c['measured_steps']} steps after one warm-up step. Useful work per step: {f['tokens']:,.0f} unique "
            f"tokens, {f['total'] / 1e12:.1f} TFLOP (linear {f['linear'] / 1e12:.1f}, vocab head "
            f"{f['head'] / 1e12:.2f}, attention {f['attention'] / 1e12:.2f}). Measured bf16 matmul peak "
            f"(8192^3, random data): {c['matmul_bf16_tflops']:.0f} TFLOP/s. Model built in {c['build_seconds']:.1f} s.\n\n"
            "| variant | MAGs / micro-step | checkpointing | s / step | useful tokens/s | TFLOP/s | MFU (measured peak) "
            "| MFU (989 datasheet) | LM tokens / step (real, padded) | peak GPU memory GiB | first step s |\n"
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        for name, r in c["variants"].items():
            if "seconds_median" not in r:
                parts[-1] += f"| {name} | {r['micro_mags']} | {r['checkpointing']} | {r.get('error', 'failed')} ||||||||\n"
                continue
            parts[-1] += (f"| {name} | {r['micro_mags']} | {r['checkpointing']} | {r['seconds_median']:.2f} | "
                          f"{r['useful_tokens_per_s']:,.0f} | {r['tflops']:.0f} | {r['mfu_measured_peak']:.1%} | "
                          f"{r['mfu_datasheet']:.1%} | {r['lm_tokens_real']:,} / {r['lm_tokens_padded']:,} | "
                          f"{'n/a' if r['peak_mem_gib'] is None else format(r['peak_mem_gib'], '.1f')} | "
                          f"{format(r['first_step_seconds'], '.1f') if 'first_step_seconds' in r else ''} |\n")
        prof = c.get("profile")
        step_ms = 1000 * c["variants"].get(prof["variant"], {}).get("seconds_median", 0) if prof else 0
        if prof and step_ms:
            # operators only: a kernel's time is also its operator's self time, so kernels would count twice
            ops = sorted((e for e in prof["top"] if e["name"].startswith("aten::") and e["self_device_ms"] >= 1),
                         key=lambda e: -e["self_device_ms"])
            parts[-1] += (f"\nWhere the GPU time of one `{prof['variant']}` step goes (torch.profiler; self device time "
                          f"of the costliest operators, share of the {step_ms / 1e3:.2f} s median step):\n\n"
                          "| operator | self device ms | share of the step | calls |\n|---|---:|---:|---:|\n")
            parts[-1] += "".join(f"| `{e['name']}` | {e['self_device_ms']:,.0f} | {e['self_device_ms'] / step_ms:.0%} | "
                                 f"{e['calls']} |\n" for e in ops[:12])
        for n, r in c["variants"].items():
            if "loss_check" in r:
                lc = r["loss_check"]
                parts[-1] += (f"\nSame objective for `{n}`: the loss of two MAGs (eval mode, bf16 autocast) is "
                              f"{lc['sdpa']:.4f} with SDPA and the dense mask, {lc['flex']:.4f} with the BlockMask.\n")
        base = next((r for n, r in c["variants"].items() if r.get("kind") == "naive" and "seconds_median" in r), None)
        if base:
            parts[-1] += "\nSpeed-up over the official three-pass pattern (useful tokens/s): " + ", ".join(
                f"{n} {r['useful_tokens_per_s'] / base['useful_tokens_per_s']:.2f}x"
                for n, r in c["variants"].items() if "seconds_median" in r and r is not base) + ".\n"
    if "generate" in load:
        g = load["generate"]
        parts.append(f"## Batched greedy generation, {g['shape']} shape, bf16 ({g['env'].get('gpu', '')})\n\n"
                     f"`magdi.student.generate` (HF `generate`, KV cache), {g['prompt_tokens']}-token prompts, "
                     f"EOS disabled so every row decodes the full length; weights {g['weight_gib']:.1f} GiB. "
                     "'weight reads' = weight bytes x decoding steps / s (the floor at batch 1 is one read of "
                     "the weights per step).\n\n| batch | new tokens | s | tokens/s | ms / step | weight reads TB/s |\n"
                     "|---:|---:|---:|---:|---:|---:|\n" + "".join(
                         f"| {r['batch']} | {r['new_tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | "
                         f"{r['ms_per_step']:.1f} | {r['weight_read_tb_per_s']:.2f} |\n" for r in g["rows"]))
    acc = {k: v for k, v in load.items() if k.startswith("accel")}
    if acc:
        parts.append("## `accelerate launch` (configs/accelerate_*.yaml, `--num_processes` as run)\n\n"
                     "`magdi.train.train` on synthetic MAGs (method `magdi`, bf16) under the launcher.\n\n"
                     "| run | shape | distributed type | processes | steps | s | tokens/s | peak GPU GiB | losses |\n"
                     "|---|---|---|---:|---:|---:|---:|---:|---|\n")
        for k, r in acc.items():
            if "error" in r or "steps" not in r:
                parts[-1] += f"| {k} | | failed: {r.get('error', 'no result')} |||||||\n"
                continue
            pm = "" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
            parts[-1] += (f"| {k} | {r['shape']} | {r['distributed_type']} | {r['num_processes']} | {r['steps']} | "
                          f"{r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | {pm} | {r['losses']} |\n")
    text = "\n".join(parts)
    if a.extra and a.extra.exists():
        text += "\n" + a.extra.read_text()
    a.out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cmd", choices=["methods", "core", "generate", "accel", "report"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="mistral7b", choices=list(SHAPES))
    ap.add_argument("--mags-per-step", type=int, default=16)
    ap.add_argument("--micro", type=int, default=4, help="MAGs per micro-step (gradients accumulated)")
    ap.add_argument("--chain-tokens", type=int, default=250)
    ap.add_argument("--steps", type=int, default=2, help="measured steps (after one warm-up)")
    ap.add_argument("--variants", nargs="+", default=["packed", "packed+ckpt", "packed16+ckpt", "naive+ckpt"],
                    help="packed|flex|naive ('flex': packed with train.attention: flex), '16' = all MAGs of the "
                         "step in one micro-step, '+ckpt' = checkpointing, '+compile' = torch.compile per layer")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--profile", action="store_true", help="core: one step under torch.profiler (CUDA)")
    ap.add_argument("--name", default=None, help="JSON file name (default: the subcommand)")
    ap.add_argument("--json-dir", type=Path, default=Path(os.environ.get("OUT", "runs/bench_gpu")))
    ap.add_argument("--out", type=Path, default=Path("reports/benchmark_gpu.md"))
    ap.add_argument("--extra", type=Path, default=None, help="markdown appended to the report (notes)")
    a = ap.parse_args(argv)
    if a.cmd == "report":
        print(cmd_report(a))
        return 0
    fn = {"methods": cmd_methods, "core": cmd_core, "generate": cmd_generate, "accel": cmd_accel}[a.cmd]
    res = fn(a)
    if res:
        dump(a.json_dir, a.name or a.cmd, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
