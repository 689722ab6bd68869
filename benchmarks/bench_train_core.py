"""Benchmark: the packed MAGDi training core vs the fused one vs the official code's three-pass pattern.

"packed" is what ``magdi.train.train`` does per step with ``train.core: packed`` (``magdi.core``): each MAG
prompt once, followed by its unique chains under a block attention mask (packs share rows where they fit),
so every unique token goes through the LM once; L_ntp projects only the scored positions, in chunks. It is
also measured under bf16 autocast with fp32 weights and with bf16 frozen weights (fp32 LoRA/heads/AdamW).

"fused" is the previous core (``train.core: fused``): ``encode_step`` (each unique (prompt, chain) of the
step once, right-padded), one LM pass, vocab logits only for positive rows, the pooled hidden states
reused for L_contrastive and L_graph (``MagdiStudent.forward``), then backward, gradient clipping and an
AdamW step.

"naive" is the pattern of the authors' code, implemented here with the *same* modules (LM + LoRA, score
head, GCN) and the same loss functions, so both variants optimise the same objective:

- pass A: every positive chain (duplicates included) through ``lm(...)`` -> full-vocab logits -> L_ntp
  (duplicates are masked out of the mean, so the value equals the fused one);
- pass B: for every (positive, negative) pair of every MAG (``losses.pair_indices``, sampled minority
  partners included) both chains are re-encoded, ``lm(..., output_hidden_states=True)`` -> pooled -> score
  head -> L_contrastive;
- pass C: every node of every MAG (duplicates included, e.g. the reference agent repeating its text
  across rounds) through ``lm(...)`` again -> pooled -> node features padded to 12 nodes per graph with
  zeros (masked out of the loss) -> GCN -> L_graph.

Batches are left-padded and every pass computes logits for every position (as a plain HF ``model(...)``
call does). Before timing, both variants are evaluated (eval mode, no grad) on one item and their losses
compared, which shows the comparison is like for like.

Measured per step (median over steps, after one warm-up step per variant): wall seconds, LM tokens (real
and incl. padding), vocab-logit positions, peak RSS; "useful tokens/s" = unique real tokens of the step
(the same numerator for both variants) / seconds, so its ratio is the speed-up.

    .venv/bin/python benchmarks/bench_train_core.py              # real student + MAGs -> reports/
    .venv/bin/python benchmarks/bench_train_core.py --smoke      # tiny random model, a few seconds
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peak import machine_line, matmul_peak

from magdi.config import TrainCfg
from magdi.core import PackedEncoded, encode_packed
from magdi.encoders import GCNEncoder
from magdi.losses import (
    graph_node_loss,
    margin_ranking_loss,
    ntp_loss,
    pair_indices,
    position_weighted_mean,
    total_loss,
)
from magdi.mag import MAG, Node, read_mags
from magdi.student import attach_lora, load_student
from magdi.train import (
    MagdiStudent,
    TrainItem,
    build_items,
    encode_step,
    grad_norm,
    method_spec,
    plan_steps,
)

VARIANTS = ("packed", "packed + bf16 autocast", "packed + bf16 weights", "fused", "naive")
#: The official code pads every graph to this many nodes.
OFFICIAL_GRAPH_NODES = 12
LORA_TARGETS = ["q_proj", "v_proj"]


# ----------------------------------------------------------------------------- measurement helpers


@dataclass
class StepStats:
    seconds: float
    passes: int
    rows: int  # sequences through the LM
    lm_tokens_real: int  # non-pad tokens through the LM
    lm_tokens_padded: int  # incl. padding
    logit_positions: int  # positions whose full-vocab logits were computed
    peak_rss_mb: float | None
    loss: float
    rows_per_pass: dict[str, int] = field(default_factory=dict)


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process (Linux >= 4.0).

    Freed heap memory is first handed back to the OS (glibc ``malloc_trim``): otherwise what the previous
    variant freed but the allocator kept would count towards the next variant's peak.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb(reset_ok: bool) -> float | None:
    if reset_ok:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
    # fallback: whole-process peak (ru_maxrss is in KiB on Linux)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if sys.platform.startswith("linux") else None


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- the naive (official) pattern


def _tokenize(tok, prompt: str, target: str, cfg: TrainCfg) -> tuple[list[int], list[int]]:
    """Exactly the truncation of ``encode_step`` (so both variants see the same sequences)."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"][-cfg.max_prompt_tokens :]
    t_ids = (tok(target, add_special_tokens=False)["input_ids"] + eos)[: cfg.max_target_tokens]
    return p_ids, t_ids


def _left_padded(tok, pairs: Sequence[tuple[str, str]], cfg: TrainCfg):
    """Tokenise every (prompt, chain) again (no dedup) into one left-padded batch."""
    seqs = [_tokenize(tok, p, t, cfg) for p, t in pairs]
    width = max(len(p) + len(t) for p, t in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (p, t) in enumerate(seqs):
        n = len(p) + len(t)
        ids[i, width - n :] = torch.tensor(p + t)
        att[i, width - n :] = 1
        lab[i, width - n + len(p) :] = torch.tensor(t)
    return ids, att, lab


def naive_forward(core: MagdiStudent, items: Sequence[TrainItem], tok, cfg: TrainCfg, step_seed: int):
    """The three losses from three separate LM passes; returns (losses, counters)."""
    lm = core.lm
    zero = _trainable(core)[0].sum() * 0
    dev = zero.device  # CPU here; CUDA in bench_gpu.py (the batches are built on the CPU, then moved)
    cnt = {"passes": 0, "rows": 0, "real": 0, "padded": 0, "logits": 0, "rows_per_pass": {}}

    def run(name: str, pairs, hidden: bool):
        ids, att, lab = (t.to(dev) for t in _left_padded(tok, pairs, cfg))
        out = lm(input_ids=ids, attention_mask=att, output_hidden_states=hidden)  # full-vocab logits
        cnt["passes"] += 1
        cnt["rows"] += ids.shape[0]
        cnt["real"] += int(att.sum())
        cnt["padded"] += ids.numel()
        cnt["logits"] += ids.numel()
        cnt["rows_per_pass"][name] = ids.shape[0]
        return out, lab

    # pass A: positive chains -> L_ntp (a duplicate is encoded but counted once, as in the fused core)
    pos, first = [], []
    seen: set[tuple[str, str]] = set()
    for it in items:
        for t, y in zip(it.targets, it.labels, strict=True):
            if y == 1:
                pos.append((it.prompt, t))
                first.append((it.prompt, t) not in seen)
                seen.add((it.prompt, t))
    if pos:
        out, lab = run("A_ntp", pos, hidden=False)
        l_ntp = ntp_loss(out.logits, lab, torch.tensor(first, device=dev))
        del out
    else:
        l_ntp = zero

    # pass B: both chains of every pair, re-encoded per pair -> L_contrastive
    gen = torch.Generator().manual_seed(step_seed)
    p_seq, n_seq = [], []
    for it in items:
        p, n = pair_indices(it.labels, gen)
        p_seq += [(it.prompt, it.targets[i]) for i in p.tolist()]
        n_seq += [(it.prompt, it.targets[i]) for i in n.tolist()]
    if p_seq:
        out, lab = run("B_contrastive", p_seq + n_seq, hidden=True)
        reps = position_weighted_mean(out.hidden_states[-1], lab != -100)
        del out
        scores = core.score_head(reps)
        l_con = margin_ranking_loss(scores[: len(p_seq)], scores[len(p_seq) :], cfg.margin)
    else:
        l_con = zero

    # pass C: every node of every MAG -> node features (padded to 12 per graph) -> encoder -> L_graph
    nodes = [(it.prompt, t) for it in items for t in it.targets]
    out, lab = run("C_graph", nodes, hidden=True)
    hid = out.hidden_states[-1]
    del out
    mask = lab != -100
    enc = core.encoder
    if enc.takes_tokens:  # token attention: no fixed node padding in this variant
        gid = torch.tensor([g for g, it in enumerate(items) for _ in it.targets], device=dev)
        logits = enc(hid, mask, gid)
        y = torch.tensor([y for it in items for y in it.labels], device=dev)
    else:
        reps = position_weighted_mean(hid, mask)
        # fixed-size graphs with zero features on padding nodes, labels -100 (masked out). Exact for the
        # GCN (a padding node has no edge, so it never reaches a real node); node attention has no key
        # mask in our encoder, so there graphs keep their own size.
        pad_to = OFFICIAL_GRAPH_NODES if isinstance(enc, GCNEncoder) else 0
        xs, ys, es, bs, k, off = [], [], [], [], 0, 0
        for g, it in enumerate(items):
            n = len(it.targets)
            size = max(n, pad_to)
            x = reps.new_zeros(size, reps.shape[1])
            x[:n] = reps[k : k + n]
            yy = torch.full((size,), -100, dtype=torch.long, device=dev)
            yy[:n] = torch.tensor(it.labels, device=dev)
            if it.edge_index:
                es.append(torch.tensor(it.edge_index, dtype=torch.long, device=dev).t() + off)
            xs.append(x)
            ys.append(yy)
            bs.append(torch.full((size,), g, dtype=torch.long, device=dev))
            k, off = k + n, off + size
        e = torch.cat(es, dim=1) if es else torch.zeros(2, 0, dtype=torch.long, device=dev)
        logits = enc(torch.cat(xs), e, torch.cat(bs))
        y = torch.cat(ys)
    l_graph = graph_node_loss(logits, y)

    w = cfg.weights
    loss = total_loss(l_ntp, l_con, l_graph, w.ntp, w.contrastive, w.graph)
    return {"ntp": l_ntp, "contrastive": l_con, "graph": l_graph, "loss": loss}, cnt


# ----------------------------------------------------------------------------- one training step of each


def _fused_counts(enc, items) -> tuple[int, int]:
    labels = [y for it in items for y in it.labels]
    rows = [r for rr in enc.node_rows for r in rr]
    n_pos = len({r for r, y in zip(rows, labels, strict=True) if y == 1})
    return n_pos, n_pos * enc.input_ids.shape[1]


def _timed_step(core, opt, fwd) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = fwd()
    out["loss"].backward()
    grad_norm(None, _trainable(core), core.cfg.max_grad_norm)  # as the pipeline clips
    opt.step()
    opt.zero_grad()
    return time.perf_counter() - t0, out


def step_fused(core, opt, items, tok, cfg, step_seed, rss_ok) -> StepStats:
    """Today's core: one row per unique (prompt, chain), logits for every position of the positive rows."""
    core.cfg = cfg.model_copy(update={"core": "fused"})
    box = {}

    def fwd():
        box["enc"] = encode_step(items, tok, cfg.max_prompt_tokens, cfg.max_target_tokens)
        return core(box["enc"], items, step_seed)

    sec, out = _timed_step(core, opt, fwd)
    enc = box["enc"]
    n_pos, logit_pos = _fused_counts(enc, items)
    return StepStats(sec, 1, enc.input_ids.shape[0], enc.n_tokens, enc.input_ids.numel(), logit_pos,
                     _peak_rss_mb(rss_ok), float(out["loss"].detach()),
                     {"unique (all losses)": enc.input_ids.shape[0], "of which positive (logits)": n_pos})


def _packed_counts(enc: PackedEncoded, items) -> tuple[int, int]:
    labels = [y for it in items for y in it.labels]
    rows = [r for rr in enc.node_rows for r in rr]
    pos = sorted({r for r, y in zip(rows, labels, strict=True) if y == 1})
    return len(pos), int((enc.labels[pos] != -100).sum()) if pos else 0


def step_packed(core, opt, items, tok, cfg, step_seed, rss_ok, autocast: bool = False) -> StepStats:
    """The new core (``magdi.core``): one pack per MAG prompt, only scored positions projected, chunked."""
    core.cfg = cfg.model_copy(update={"core": "packed"})
    box = {}

    def fwd():
        box["enc"] = encode_packed(items, tok, cfg.max_prompt_tokens, cfg.max_target_tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return core(box["enc"], items, step_seed)

    sec, out = _timed_step(core, opt, fwd)
    enc = box["enc"]
    n_pos, logit_pos = _packed_counts(enc, items)
    return StepStats(sec, 1, enc.input_ids.shape[0], enc.lm_tokens, enc.input_ids.numel(), logit_pos,
                     _peak_rss_mb(rss_ok), float(out["loss"].detach()),
                     {"packs (one per MAG prompt)": enc.input_ids.shape[0], "unique chains": enc.labels.shape[0],
                      "of which positive": n_pos})


def step_naive(core, opt, items, tok, cfg, step_seed, rss_ok) -> StepStats:
    t0 = time.perf_counter()
    out, c = naive_forward(core, items, tok, cfg, step_seed)
    out["loss"].backward()
    grad_norm(None, _trainable(core), cfg.max_grad_norm)
    opt.step()
    opt.zero_grad()
    sec = time.perf_counter() - t0
    return StepStats(sec, c["passes"], c["rows"], c["real"], c["padded"], c["logits"], _peak_rss_mb(rss_ok),
                     float(out["loss"].detach()), c["rows_per_pass"])


# ----------------------------------------------------------------------------- inputs

#: special tokens of the synthetic benchmarks' word-level tokenizers (pad, eos, unk, ChatML markers)
SPECIALS = ["<pad>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>"]


def wrap_word_tokenizer(wl):
    """A ``tokenizers`` word-level model as a transformers tokenizer with pad/eos/unk and a ChatML template."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=wl, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


def smoke_inputs():
    """A tiny random Llama (hidden 32, 2 layers), a WordLevel tokenizer and 6 synthetic MAGs."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    from magdi.student import ANSWER_FORMATS

    mags = []
    for q in range(6):
        nodes, rounds = [], 1 + q % 3
        ref = f"Fact {q}: the reference explanation says so because of reason {q} and more detail."
        for r in range(rounds):
            for a, agent in enumerate(["smol_careful", "smol_creative"]):
                ok = (q + r + a) % 3 != 0
                words = " ".join(f"step{j} word{(q * 7 + r * 3 + a + j) % 50}" for j in range(6 + 3 * a + q))
                nodes.append(Node(agent, r, f"Agent {agent} round {r}: {words}.", "yes" if ok else "no",
                                  0.8, ok))
            nodes.append(Node("reference", r, ref, "yes", 1.0, True))  # repeats its text every round
        if q == 5:  # a MAG with only correct nodes: no contrastive pair
            nodes = [Node(n.agent, n.round, n.reasoning, "yes", 1.0, True) for n in nodes]
        mags.append(MAG(f"smoke-{q}", "strategyqa", f"Is statement number {q} true for question {q}?",
                        "yes", nodes))
    corpus = [m.question for m in mags] + [n.reasoning for m in mags for n in m.nodes]
    corpus += list(ANSWER_FORMATS.values()) + ["The answer is yes. The answer is no. user assistant"]
    wl = Tokenizer(models.WordLevel(unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    wl.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIALS, show_progress=False))
    tok = wrap_word_tokenizer(wl)
    tok.padding_side = "left"
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None))
    return lm, tok, mags, "tiny random LlamaForCausalLM (hidden 32, 2 layers), WordLevel tokenizer"


def train_cfg(params: Path, mags_per_step: int, smoke: bool) -> TrainCfg:
    """The ``train`` section of params.yaml (defaults if absent), with this run's MAGs per step."""
    import yaml

    raw = {}
    if params.exists():
        raw = (yaml.safe_load(params.read_text()) or {}).get("train", {}) or {}
    # the dense-mask kernel for every variant: this script compares cores (fused rows need a mask), not
    # attention kernels (benchmarks/bench_train_speed.py does)
    over = {"mags_per_step": mags_per_step, "attention": "sdpa"}
    if smoke:
        over["hidden_dim"] = 16
    return TrainCfg(**{**raw, **over})


# ----------------------------------------------------------------------------- report


def _fmt(x: float, nd: int = 2) -> str:
    return f"{x:,.{nd}f}"


def model_gflops(st: StepStats, n_nonemb: int, vocab_dim: int) -> float:
    """Model FLOPs of a step: forward + activation backward (frozen weights need no weight gradient), i.e.
    4 × non-embedding parameters × real LM tokens + 4 × (V × D) × vocab-logit positions. Attention scores,
    LoRA/heads and recomputation are not counted."""
    return (4 * n_nonemb * st.lm_tokens_real + 4 * vocab_dim * st.logit_positions) / 1e9


def summarise(stats: list[StepStats], useful: list[int], n_nonemb: int = 0, vocab_dim: int = 0) -> dict:
    sec = statistics.median(s.seconds for s in stats)
    return {
        "model_gflops_per_s": statistics.median(model_gflops(s, n_nonemb, vocab_dim) / s.seconds for s in stats),
        "seconds_per_step_median": sec,
        "seconds_per_step": [s.seconds for s in stats],
        "passes_per_step": stats[0].passes,
        "lm_rows_per_step": statistics.mean(s.rows for s in stats),
        "lm_tokens_real_per_step": statistics.mean(s.lm_tokens_real for s in stats),
        "lm_tokens_padded_per_step": statistics.mean(s.lm_tokens_padded for s in stats),
        "logit_positions_per_step": statistics.mean(s.logit_positions for s in stats),
        "useful_tokens_per_step": statistics.mean(useful),
        "useful_tokens_per_s": statistics.median(u / s.seconds for u, s in zip(useful, stats, strict=True)),
        "lm_tokens_real_per_s": statistics.median(s.lm_tokens_real / s.seconds for s in stats),
        "peak_rss_mb": max((s.peak_rss_mb for s in stats if s.peak_rss_mb is not None), default=None),
        "rows_per_pass_first_step": stats[0].rows_per_pass,
    }


def write_report(out: Path, res: dict) -> str:
    s, v, pk = res["setup"], res["variants"], res["matmul_peak_gflops"]
    names = list(v)

    def rss(x: float | None) -> str:
        return "n/a" if x is None else _fmt(x, 0)

    spd = res.get("speedup_vs_fused", {})
    rows = [
        ("LM passes / step", [str(v[k]["passes_per_step"]) for k in names]),
        ("rows through the LM / step", [_fmt(v[k]["lm_rows_per_step"], 1) for k in names]),
        ("LM tokens / step, real", [_fmt(v[k]["lm_tokens_real_per_step"], 0) for k in names]),
        ("LM tokens / step, incl. padding", [_fmt(v[k]["lm_tokens_padded_per_step"], 0) for k in names]),
        ("vocab-logit positions / step", [_fmt(v[k]["logit_positions_per_step"], 0) for k in names]),
        ("seconds / step (median)", [_fmt(v[k]["seconds_per_step_median"], 3) for k in names]),
        ("useful tokens / s", [_fmt(v[k]["useful_tokens_per_s"], 1) for k in names]),
        ("speed-up vs fused (useful tokens/s)", [f"{spd[k]:.2f}×" if k in spd else "" for k in names]),
        ("achieved model GFLOP/s (% of matmul peak)",
         [f"{v[k]['model_gflops_per_s']:.1f} ({v[k]['model_gflops_per_s'] / pk['bfloat16' if 'bf16' in k else 'float32']:.0%})"
          for k in names]),
        ("peak RSS during a step (MiB)", [rss(v[k]["peak_rss_mb"]) for k in names]),
    ]
    table = "| | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names) + "\n"
    table += "".join(f"| {a} | " + " | ".join(c) + " |\n" for a, c in rows)
    chk, rel = res["equivalence_check"], res["equivalence_max_rel_diff_vs_fused"]
    keys = list(next(iter(chk.values())))
    chk_table = "| variant | " + " | ".join(keys) + " | max rel. diff vs fused |\n|---|" + "---:|" * (len(keys) + 1) + "\n"
    chk_table += "".join(f"| {n} | " + " | ".join(f"{chk[n][k]:.6f}" for k in keys) + f" | {rel[n]:.1e} |\n"
                         for n in names)
    first = "; ".join(f"{k}: " + ", ".join(f"{a} {b}" for a, b in v[k]["rows_per_pass_first_step"].items())
                      for k in names)
    text = f"""# Training-core efficiency: packed (prefix sharing) vs fused vs naive (official-code pattern)

{machine_line()}

Generated by `benchmarks/bench_train_core.py` on {s['date']}{' (**smoke run: tiny random model, numbers meaningless**)' if s['smoke'] else ''}.

## Setup

- Student: {s['model']} — {s['params_total']:,} parameters, {s['params_trainable']:,} trainable (LoRA r=16, alpha=32 on q/v + score head + {s['encoder']} encoder)
- MAGs: `{s['mags']}` ({s['n_mags']} MAGs, {s['n_nodes']} nodes; {s['duplicate_node_share']:.0%} of the nodes repeat a (prompt, chain) already in their MAG)
- Method `magdi` (L_ntp + L_contrastive + L_graph, weights {s['weights']}), {s['mags_per_step']} MAGs per step, max prompt/target tokens {s['max_prompt_tokens']}/{s['max_target_tokens']}
- {s['measured_steps']} measured steps per variant (median reported) after 1 warm-up step each; the variants take turns within every step, in an order rotated from step to step, so that load from other processes hits all of them{'; stopped early by the time budget' if s['stopped_by_budget'] else ''}
- CPU: {s['cpu']}, torch threads {s['threads']}; torch {s['torch']}, transformers {s['transformers']}, Python {s['python']}
- **The machine was shared** (2 cores, other workers running): absolute seconds are noisy; the ratios between variants measured in the same steps are the result.

Variants (one student and optimiser shared by all but "bf16 weights", stepping in turn; same loss functions):

- **packed** (new default, `train.core: packed`, `magdi.core`): one row per MAG prompt holding the prompt once
  and then each unique chain, with a block attention mask (a chain sees the prompt and itself) and position ids
  restarting after the prompt for every chain, so each unique token goes through the LM once; L_ntp projects
  onto the vocabulary only the scored positions, in checkpointed chunks of `train.ntp_chunk` positions.
- **packed + bf16 autocast**: the same under `torch.autocast("cpu", bfloat16)` with fp32 weights (what
  `train.bf16: true` does through accelerate).
- **packed + bf16 weights**: frozen base weights stored in bf16 (`student.dtype: bfloat16`), fp32 LoRA, heads
  and AdamW state (master weights), under bf16 autocast. A copy of the student (same initial weights) with its
  own optimiser.
- **fused** (`train.core: fused`, the previous core): one right-padded row per unique (prompt, chain), logits
  for every position of the positive rows.
- **naive** (the authors' pattern, in this script): three LM passes (positive chains; both chains of every
  pair; every node, graphs padded to 12 nodes), full-vocab logits everywhere, left padding.

A step is tokenisation + forward + backward + gradient clipping + AdamW step, in train mode. "Useful tokens"
are the real tokens of the unique (prompt, chain) sequences of the step ({_fmt(next(iter(v.values()))['useful_tokens_per_step'], 0)}
per step on average), the same numerator for every variant, so ratios of useful tokens/s are speed-ups.
"LM tokens, real" is what actually went through the LM (for packed: each prompt once).

## Result

{table}
Peak RSS is the process high-water mark during the step (reset before each step), so it includes the loaded
weights: {rss(s['rss_after_load_mb'])} MiB before the first step, which holds the fp32 student and its
bf16 copy (about 0.26 GiB of the latter would be absent in a real run of either kind).

Rows per pass in the first measured step — {first}.

Achieved model FLOP/s: 4 × non-embedding parameters × real LM tokens + 4 × V × D × vocab-logit positions
per step (forward + activation backward; the frozen base needs no weight gradients; attention scores, LoRA,
heads and recomputation not counted), against the matmul peak measured in this run with the same threads
(2048² matmul, FLOPs = 2n³): fp32 {pk['float32']:.1f} GFLOP/s, bf16 {pk['bfloat16']:.1f} GFLOP/s (bf16 variants
are compared with the bf16 peak).

## Same objective (eval mode, no dropout, one item, same weights)

{chk_table}
fp32 variants agree with fused to float rounding; the bf16 rows show the size of bf16 rounding in the losses.

Notes: the naive passes are batched over all MAGs of the step (the most favourable batching for it) and pool
with our padding-invariant weights so that its losses match; accelerate, the LR schedule and checkpointing
are left out of all variants.
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    return table


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mags", type=Path, default=Path("data/mags/strategyqa.jsonl"), help="MAG JSONL")
    ap.add_argument("--student", type=Path, default=Path("models/student"), help="converted student dir")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="train section used for TrainCfg")
    ap.add_argument("--steps", type=int, default=None,
                    help="measured steps per variant, after 1 warm-up step (default 4; 2 with --smoke)")
    ap.add_argument("--mags-per-step", type=int, default=4)
    ap.add_argument("--time-budget", type=float, default=210.0,
                    help="seconds for the measured steps: no new step pair starts if it would end later "
                         "(at least one is always measured)")
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown report (default reports/benchmark_train_core.md; a temp dir with --smoke)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all CPUs)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model and synthetic MAGs (seconds)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    help="which variants to measure (default: all)")
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 2 if args.smoke else 4
    if args.steps < 1 or args.mags_per_step < 1 or args.threads < 1:
        ap.error("--steps, --mags-per-step and --threads must be >= 1")

    threads = args.threads
    torch.set_num_threads(threads)
    cfg = train_cfg(args.params, args.mags_per_step, args.smoke)
    torch.manual_seed(cfg.seed)
    t_load = time.perf_counter()
    if args.smoke:
        lm, tok, mags, model_name = smoke_inputs()
        mags_src = "synthetic (6 MAGs)"
        out_path = args.out or Path(tempfile.mkdtemp(prefix="bench_train_core_")) / "benchmark_train_core.md"
    else:
        mags = read_mags(args.mags)
        if not mags:
            print(f"error: no MAGs in {args.mags} (run the build_mags stage first)", file=sys.stderr)
            return 2
        lm, tok = load_student(args.student)
        model_name = f"`{args.student}` ({type(lm).__name__})"
        mags_src = str(args.mags)
        out_path = args.out or Path("reports/benchmark_train_core.md")
    lm = attach_lora(lm, 16, 32, 0.05, LORA_TARGETS)
    spec = method_spec("magdi")
    core = MagdiStudent(lm, spec, cfg)
    opt = torch.optim.AdamW(_trainable(core), lr=cfg.lr, weight_decay=0.0)
    items = build_items(mags, spec, tok, cfg.graph)
    print(f"loaded in {time.perf_counter() - t_load:.1f}s: {len(items)} items, {threads} threads", flush=True)

    # batches: length-grouped steps as in train(), cycling over epochs until there are enough
    batches: list[list[TrainItem]] = []
    epoch = 0
    while len(batches) < args.steps:
        batches += [[items[i] for i in s] for s in plan_steps(items, cfg.mags_per_step, cfg.seed, epoch)]
        epoch += 1
    batches = batches[: args.steps]
    # warm-up and equivalence check on the smallest item that has both a positive and a negative chain
    both = [it for it in items if {0, 1} <= set(it.labels)] or items
    warm = [min(both, key=lambda it: sum(len(t) for t in it.targets))]

    # the bf16-weights variant: a copy of the same student whose frozen base weights are bf16, with fp32
    # LoRA/heads (master weights) and its own fp32 AdamW; it runs under bf16 autocast
    core16 = copy.deepcopy(core)
    for prm in core16.parameters():
        if not prm.requires_grad:
            prm.data = prm.data.to(torch.bfloat16)
    opt16 = torch.optim.AdamW(_trainable(core16), lr=cfg.lr, weight_decay=0.0)
    variants = {
        "packed": lambda *a: step_packed(core, opt, *a),
        "packed + bf16 autocast": lambda *a: step_packed(core, opt, *a, autocast=True),
        "packed + bf16 weights": lambda *a: step_packed(core16, opt16, *a, autocast=True),
        "fused": lambda *a: step_fused(core, opt, *a),
        "naive": lambda *a: step_naive(core, opt, *a),
    }
    variants = {k: v for k, v in variants.items() if k in args.variants}

    def eval_losses(name: str) -> dict[str, float]:
        m = core16 if name == "packed + bf16 weights" else core
        m.eval()
        m.cfg = cfg.model_copy(update={"core": "fused" if name in ("fused", "naive") else "packed"})
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in name):
            if name == "naive":
                out, _ = naive_forward(m, warm, tok, cfg, 12345)
            elif name == "fused":
                out = m(encode_step(warm, tok, cfg.max_prompt_tokens, cfg.max_target_tokens), warm, 12345)
            else:
                out = m(encode_packed(warm, tok, cfg.max_prompt_tokens, cfg.max_target_tokens), warm, 12345)
        m.train()
        return {k: float(v) for k, v in out.items()}

    check = {name: eval_losses(name) for name in variants}
    ref = check.get("fused") or next(iter(check.values()))
    rel = {name: max(abs(v[k] - ref[k]) / max(abs(ref[k]), 1e-12) for k in ref) for name, v in check.items()}
    print("equivalence check (eval, one item): max relative loss difference vs fused: "
          + ", ".join(f"{k} {v:.1e}" for k, v in rel.items()), flush=True)

    emb = core.lm.get_input_embeddings().weight
    vocab_dim = emb.numel()
    n_nonemb = sum(p.numel() for p in core.lm.parameters()) - vocab_dim  # tied embedding counted once
    peak = matmul_peak(threads=threads)
    print(f"matmul peak GFLOP/s ({threads} threads): fp32 {peak['float32']:.1f}, bf16 {peak['bfloat16']:.1f}", flush=True)
    rss_ok = _reset_peak_rss()
    base_rss = _peak_rss_mb(rss_ok)
    for fn in variants.values():  # warm-up (not measured)
        torch.manual_seed(cfg.seed * 100003)
        fn(warm, tok, cfg, cfg.seed * 7919, rss_ok)
    stats: dict[str, list[StepStats]] = {k: [] for k in variants}
    useful: list[int] = []
    t_start, stopped = time.perf_counter(), False
    names = list(variants)
    for i, batch in enumerate(batches):
        elapsed = time.perf_counter() - t_start
        if i > 0 and elapsed + elapsed / i > args.time_budget:
            stopped = True
            break
        useful.append(encode_step(batch, tok, cfg.max_prompt_tokens, cfg.max_target_tokens).n_tokens)
        order = names[i % len(names):] + names[: i % len(names)]  # rotate: no systematic order bias
        for name in order:
            torch.manual_seed(cfg.seed * 100003 + i + 1)
            _reset_peak_rss()
            stats[name].append(variants[name](batch, tok, cfg, cfg.seed * 7919 + i + 1, rss_ok))
        print(f"step {i + 1}/{len(batches)} ({useful[-1]} useful tokens): "
              + ", ".join(f"{k} {stats[k][-1].seconds:.2f}s" for k in names), flush=True)

    n_nodes = sum(len(it.targets) for it in items)
    n_unique = sum(len(set(it.targets)) for it in items)
    res = {
        "setup": {
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "smoke": args.smoke,
            "model": model_name,
            "params_total": sum(p.numel() for p in core.parameters()),
            "params_trainable": sum(p.numel() for p in _trainable(core)),
            "encoder": cfg.encoder,
            "mags": mags_src,
            "n_mags": len(mags),
            "n_items": len(items),
            "n_nodes": n_nodes,
            "duplicate_node_share": 1 - n_unique / max(n_nodes, 1),
            "weights": cfg.weights.model_dump(),
            "mags_per_step": cfg.mags_per_step,
            "max_prompt_tokens": cfg.max_prompt_tokens,
            "max_target_tokens": cfg.max_target_tokens,
            "measured_steps": len(useful),
            "stopped_by_budget": stopped,
            "time_budget_s": args.time_budget,
            "threads": threads,
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
            "rss_after_load_mb": base_rss,
        },
        "variants": {k: summarise(v, useful, n_nonemb, vocab_dim) for k, v in stats.items()},
        "matmul_peak_gflops": peak,
        "equivalence_check": check,
        "equivalence_max_rel_diff_vs_fused": rel,
    }
    try:  # a readable CPU name where the kernel gives one
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                res["setup"]["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    v = res["variants"]
    if "fused" in v:
        res["speedup_vs_fused"] = {k: x["useful_tokens_per_s"] / v["fused"]["useful_tokens_per_s"] for k, x in v.items()}
    table = write_report(out_path, res)
    print(table)
    print(f"speed-up vs fused (useful tokens/s): {res.get('speedup_vs_fused')}")
    print(f"report: {out_path}  (+ {out_path.with_suffix('.json')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
