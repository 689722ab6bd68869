"""The training loop (``train``): accelerate, accumulation windows, the lr schedule, DDP shares, checkpoints
(safetensors + JSON, no pickle; resume bit-exactly on CPU) and the saved adapter."""

from __future__ import annotations

import contextlib
import itertools
import json
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TrainCfg
from .items import (
    MethodSpec,
    TrainItem,
    encode_batch,
    epoch_layout,
    items_per_step,
    plan_steps,
    update_windows,
)
from .model import MagdiStudent

# ----------------------------------------------------------------------------- checkpoints (no pickle)


def _save_ckpt(final: Path, model: MagdiStudent, opt: torch.optim.Optimizer, step: int, history: list) -> None:
    """Write into a fresh folder, then swap it in: a kill at any point leaves one complete checkpoint."""
    import shutil

    from safetensors.torch import save_file

    path = final.with_name(final.name + ".tmp")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    trainable = {k: v.detach().contiguous() for k, v in model.named_parameters() if v.requires_grad}
    save_file(trainable, str(path / "trainable.safetensors"))
    sd = opt.state_dict()
    tensors = {f"{pid}.{k}": v.contiguous() for pid, st in sd["state"].items() for k, v in st.items()}
    save_file(tensors, str(path / "optimizer.safetensors"))
    meta = {"step": step, "param_groups": sd["param_groups"], "history": history,
            "state_keys": {str(pid): list(st) for pid, st in sd["state"].items()}}
    (path / "state.json").write_text(json.dumps(meta))
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(old)  # a kill from here on finds ".old" complete (see _find_ckpt)
    path.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _find_ckpt(final: Path) -> Path | None:
    """The newest complete checkpoint: the final folder, or the previous one if killed mid-swap."""
    for cand in (final, final.with_name(final.name + ".old")):
        if (cand / "state.json").exists():
            return cand
    return None


def _load_ckpt(path: Path, model: MagdiStudent, opt: torch.optim.Optimizer) -> tuple[int, list]:
    from safetensors.torch import load_file

    meta = json.loads((path / "state.json").read_text())
    params = load_file(str(path / "trainable.safetensors"))
    missing = set(params) - {k for k, _ in model.named_parameters()}
    if missing:
        raise RuntimeError(f"checkpoint {path} does not match the model: {sorted(missing)[:3]}")
    model.load_state_dict(params, strict=False)
    flat = load_file(str(path / "optimizer.safetensors"))
    state = {int(pid): {k: flat[f"{pid}.{k}"] for k in keys} for pid, keys in meta["state_keys"].items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["step"], meta["history"]


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    steps: int
    n_items: int
    n_unique_sequences: int
    tokens: int
    seconds: float
    history: list[dict[str, Any]]
    resumed_from: int
    #: the autocast dtype the run trained in (``train.bf16`` resolved on this machine) and why
    precision: str = "float32"
    precision_reason: str = ""
    #: updates of the linear warm-up (``train.warmup_steps`` or ``warmup_ratio``), and updates in all
    warmup_updates: int = 0


# Launchers ``check_distributed`` refuses (matched in accelerate's ``distributed_type``, case-insensitively), and
# why; each message says what to launch instead.
REFUSED_LAUNCHERS: dict[str, str] = {
    "DeepSpeed": "ZeRO shards parameters like FSDP, and the engine, not this loop, would step, clip and schedule; "
                 "launch with configs/accelerate_ddp.yaml",
    "FSDP": "checkpoints and the adapter are saved unsharded; launch with configs/accelerate_ddp.yaml and "
            "train.gradient_checkpointing: true (a 7B LoRA student fits one GPU, reports/benchmark_gpu_h200.md)",
}


def check_distributed(distributed_type: str) -> None:
    """Refuse a launcher this loop cannot checkpoint (FSDP) or does not drive (DeepSpeed), before any step.

    Under FSDP the parameters and AdamW state are sharded DTensors: ``_save_ckpt`` and ``save_adapter``
    write plain tensors and fail at the first checkpoint (seen on an H200 with configs/accelerate_fsdp.yaml:
    the steps ran, the first save raised "invalid python storage"; reports/benchmark_gpu_h200.md). A 7B LoRA
    student fits one GPU without sharding (19-32 GiB peak measured with gradient checkpointing), so DDP
    is the supported multi-GPU path until checkpoints go through accelerate's sharded state dicts.
    """
    kind = str(distributed_type).upper()
    for name, why in REFUSED_LAUNCHERS.items():
        if name.upper() in kind:
            raise RuntimeError(f"training under {name} is not supported: {why}")


def check_attention(attention: str, device: torch.device) -> None:
    """Refuse ``train.attention: flex`` off CUDA before any step: FlexAttention has no CPU backward (torch
    raises only at the first backward, after the model is built and the first forward is paid for)."""
    if attention == "flex" and device.type != "cuda":
        raise RuntimeError(f"train.attention: flex needs a CUDA device (FlexAttention has no backward on "
                           f"{device.type}); use train.attention: sdpa")


def grad_norm(accel, params: Iterable[nn.Parameter], max_norm: float | None) -> float:
    """The update's gradient L2 norm (after unscaling, as clipping sees it), clipped to ``max_norm`` unless None.

    Unclipped runs still log the norm, computed without touching the gradients (clipping "at infinity" would
    multiply them by inf / inf = NaN when the norm itself overflowed). Under DDP each process holds the
    all-reduced gradient after backward, so its local norm is the global one (FSDP and DeepSpeed are refused).
    ``accel=None`` (the speed benchmarks' bare loops, no loss scaling) clips with torch directly, so a timed step
    pays exactly what the pipeline's update pays.
    """
    params = list(params)
    if max_norm is not None:
        clip = accel.clip_grad_norm_ if accel is not None else torch.nn.utils.clip_grad_norm_
        return float(clip(params, max_norm))
    if accel is not None:
        accel.unscale_gradients()
    return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def rank_share(own: int, step_items: int, processes: int) -> float:
    """The factor on a rank's loss under DDP, which averages the ranks' gradients with equal weights.

    A rank's loss is a mean over its own items' chains (pairs, nodes; an item is a MAG, two for dss_mt), so equal
    weights would count an item on a rank with fewer of them (a step of 5 on 2 ranks: 3 + 2) more than one on a
    fuller rank, and a rank left without an item (it reruns the step's first item to keep the collectives in
    lockstep) would add that item a second time. Weighting rank r by ``n_r * processes / n`` weights each rank by
    its share of the step's items: the one-process mean when items contribute alike (as many positive chains,
    pairs and labelled nodes each; otherwise close to it), and exactly 0 for a rank without a share. One
    process: 1. (Contrastive pairs drawn at random are drawn per rank, so they depend on the split.)
    """
    return own * processes / step_items


def step_losses(accel, out: dict[str, torch.Tensor], own: int, step_items: int) -> dict[str, float]:
    """The step's logged losses over all ranks: each rank's values weighted by its share of the step's MAGs
    (as ``rank_share`` weights the gradients). One process logs its own values as they are, no collective."""
    if accel.num_processes == 1:
        return {k: float(v.detach()) for k, v in out.items()}
    vals = torch.stack([v.detach().float().reshape(()) for v in out.values()]) * own
    total = accel.reduce(vals, reduction="sum") / step_items
    return dict(zip(out, total.tolist(), strict=True))


def summed_over_ranks(accel, *counts: int) -> tuple[int, ...]:
    """Counts (tokens, sequences) of the whole run, not of one rank's share: summed over the DDP processes."""
    if accel.num_processes == 1:
        return counts
    total = accel.reduce(torch.tensor(counts, dtype=torch.long, device=accel.device), reduction="sum")
    return tuple(int(c) for c in total.tolist())


def checkpoint_id(found: Path | None) -> int:
    """Which checkpoint a rank loaded, as a number every rank can compare: the first 8 bytes of the sha256 of its
    ``state.json`` (step, optimiser settings, loss history), 0 for none. Bytes, not tensor sums: ranks on different
    machines sum floats in different orders."""
    import hashlib

    if found is None:
        return 0
    return int.from_bytes(hashlib.sha256((found / "state.json").read_bytes()).digest()[:8], "big", signed=True)


def same_start(accel, start: int, found: Path | None, ckpt: Path) -> None:
    """Every rank must resume from the same checkpoint. Rank 0 alone writes them; a rank that cannot see them (no
    shared filesystem across nodes) would start over at step 0 while the others resume, and the collectives would
    pair different steps (a hang or a silently wrong run); a rank reading a stale node-local copy would resume at
    the same step with other AdamW state (DDP broadcasts rank 0's parameters, not the optimiser's). Refused in one
    line on every rank instead."""
    if accel.num_processes == 1:
        return
    mine = torch.tensor([start, checkpoint_id(found)], dtype=torch.long, device=accel.device)
    seen = accel.gather(mine).reshape(-1, 2).tolist()
    if len({tuple(r) for r in seen}) > 1:
        raise RuntimeError(f"DDP ranks would resume from different checkpoints (steps {[r[0] for r in seen]}): "
                           f"{ckpt} must be one folder every process sees (rank 0 alone writes it)")


def train(
    lm: nn.Module,
    tokenizer,
    items: list[TrainItem],
    spec: MethodSpec,
    cfg: TrainCfg,
    out_dir: Path,
    log_fn=None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train LoRA (+ heads) on ``items``; resume from ``out_dir/checkpoint`` if present.

    ``stop_after`` ends the loop early after that many global steps (used by tests to simulate a kill).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    # accelerate keeps one state per process and refuses a second Accelerator with another precision; a
    # process that trains several runs (tests, one-process matrices) starts each from a clean state. The
    # distributed (partial) state is kept: it belongs to the launcher.
    AcceleratorState._reset_state()
    # accumulation is counted here, not by accelerate: its counter has no "last micro-step of the run". Under a
    # launcher the process group already exists (magdi.launch.is_main_process): its options go there
    prec = training_precision(cfg.bf16)
    accel = Accelerator(mixed_precision="bf16" if prec.bf16 else "no",
                        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    check_distributed(accel.distributed_type)
    check_attention(cfg.attention, accel.device)
    model = MagdiStudent(lm, spec, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    per_step = items_per_step(items, cfg)
    n_steps, _ = epoch_layout(items, cfg)
    plans = [plan_steps(items, per_step, cfg.seed, e, cfg.bucket_steps, n_steps) for e in range(cfg.epochs)]
    # every process takes its share of each step's items (DDP); one process on CPU takes all
    flat_steps = [s for p in plans for s in p]
    epoch_of = [e + 1 for e, p in enumerate(plans) for _ in p]
    total = len(flat_steps)
    windows = update_windows(items, cfg, [len(p) for p in plans])
    ends = list(itertools.accumulate(windows))  # micro-step count at the end of each update
    ends_set = set(ends)
    window_of = [w for w in windows for _ in range(w)]
    n_updates = len(windows)
    sched = lr_schedule(opt, n_updates, cfg.warmup_ratio, cfg.warmup_steps)
    ckpt = out_dir / "checkpoint"
    start, history = 0, []
    found = _find_ckpt(ckpt)
    if found is not None:
        start, history = _load_ckpt(found, model, opt)
        with warnings.catch_warnings():  # replaying the schedule before any opt.step() of this process
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(sum(e <= start for e in ends)):  # it counts updates, not micro-steps
                sched.step()
    same_start(accel, start, found, ckpt)
    model, opt = accel.prepare(model, opt)
    core: MagdiStudent = accel.unwrap_model(model)
    model.train()
    t0, tokens, uniq = time.time(), 0, 0
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not accel.is_main_process)
    for step in range(start, total):
        if stop_after is not None and step >= stop_after:
            break
        torch.manual_seed(cfg.seed * 100003 + step)  # dropout masks independent of resume point
        own = flat_steps[step][accel.process_index :: accel.num_processes]
        batch_items = [items[i] for i in own or flat_steps[step][:1]]  # no share: run the step anyway, weight 0
        share = rank_share(len(own), len(flat_steps[step]), accel.num_processes)
        enc = encode_batch(batch_items, tokenizer, cfg).to(accel.device)
        boundary = step + 1 in ends_set
        window = window_of[step]
        with contextlib.nullcontext() if boundary else accel.no_sync(model):
            out = model(enc, batch_items, cfg.seed * 7919 + step)
            loss = out["loss"] if share == 1 else out["loss"] * share  # one process: share 1, untouched
            accel.backward(loss / window)  # the update is the mean over its micro-steps
        rec = {"step": step + 1, "epoch": epoch_of[step],
               **step_losses(accel, out, len(own), len(flat_steps[step])), "lr": sched.get_last_lr()[0]}
        if boundary:  # clip the accumulated gradient only, then one update and one scheduler step
            rec["grad_norm"] = grad_norm(accel, params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad()
        if own:  # a rank that only kept the lockstep trained on nothing
            tokens += enc.n_tokens
            uniq += enc.chain_mask.shape[0]  # unique (prompt, chain) sequences, either core
        history.append(rec)
        if log_fn:
            log_fn(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        bar.update(1)
        # never checkpoint mid-accumulation: those gradients are not saved
        if accel.is_main_process and boundary and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == total):
            _save_ckpt(ckpt, core, opt, step + 1, history)
    bar.close()
    tokens, uniq = summed_over_ranks(accel, tokens, uniq)
    return TrainResult(steps=len(history), n_items=len(items), n_unique_sequences=uniq, tokens=tokens,
                       seconds=time.time() - t0, history=history, resumed_from=start,
                       precision=prec.dtype, precision_reason=prec.reason,
                       warmup_updates=warmup_updates(n_updates, cfg.warmup_ratio, cfg.warmup_steps))


#: history keys that are not loss terms
NOT_LOSSES = ("step", "epoch", "lr", "grad_norm")


def last_epoch_means(history: list[dict[str, Any]]) -> dict[str, float]:
    """Each loss term's mean over the micro-steps of the run's last epoch (what the run ended at; the last step
    alone can be a step with no positive chain, whose L_ntp is 0). Records without ``epoch`` (a checkpoint of
    an older run) count as one epoch."""
    if not history:
        return {}
    last = max(r.get("epoch", 1) for r in history)
    recs = [r for r in history if r.get("epoch", 1) == last]
    keys = [k for k in recs[0] if k not in NOT_LOSSES]
    return {k: sum(float(r[k]) for r in recs) / len(recs) for k in keys}


def training_precision(setting: bool | str):
    """``train.bf16`` resolved for this run's device (``magdi.precision``): the one place the loop decides on bf16
    autocast, so ``auto`` on a CPU without native bf16 (AVX2 only) never turns it on."""
    from ..precision import capabilities, resolve, train_device

    return resolve(setting, capabilities(), train_device(), "train.bf16")


def save_adapter(lm: nn.Module, out_dir: Path) -> str:
    """LoRA weights only (safetensors); the base student is referenced, not copied.

    Returns the sha256 of the saved weights file, the training twin of evaluation's ``outputs_sha256``: the
    adapters are not committed, so the metrics must say whether two runs trained exactly alike (equal digests:
    byte-identical weights; the loss curve alone may agree to every printed digit while weights differ).
    """
    from ..packaged import file_sha256

    lm.save_pretrained(str(out_dir), safe_serialization=True)
    canonical_adapter_config(lm, out_dir)
    return file_sha256(out_dir / "adapter_model.safetensors")


def canonical_adapter_config(lm: nn.Module, out_dir: Path) -> None:
    """Rewrite ``adapter_config.json`` with its set-valued fields (``target_modules``) sorted.

    peft writes a set as ``list(value)``, in the set's iteration order, which follows the process's string-hash
    seed: two runs with byte-identical adapters wrote ``["q_proj", "v_proj"]`` or ``["v_proj", "q_proj"]`` (measured:
    the only file that differed between two `make repro` runs, so DVC saw a changed run folder). Sorted, the folder
    is a function of the run alone. peft reads a list back as the same set; the format is peft's own (indent 2,
    sorted keys)."""
    path = out_dir / "adapter_config.json"
    sets = {k for conf in lm.peft_config.values() for k, v in conf.to_dict().items() if isinstance(v, set)}
    raw = json.loads(path.read_text())
    for k in sets:
        if isinstance(raw.get(k), list):
            raw[k] = sorted(raw[k])
    path.write_text(json.dumps(raw, indent=2, sort_keys=True))


def warmup_updates(n_updates: int, warmup_ratio: float, warmup_steps: int | None = None) -> int:
    """Updates of the linear warm-up: ``warmup_steps`` when set (the official run: a fixed 100), else
    ``round(warmup_ratio * n_updates)``; never more than the run has."""
    w = warmup_steps if warmup_steps is not None else round(warmup_ratio * n_updates)
    return min(w, n_updates)


def lr_schedule(opt: torch.optim.Optimizer, n_updates: int, warmup_ratio: float, warmup_steps: int | None = None):
    """The official recipe (HF Trainer's default): linear warm-up from 0 to the peak, then linear decay to 0.

    Stepped once per optimiser update. The warm-up ``W`` is :func:`warmup_updates` (official: ``warmup_steps``
    100 over its 10 epochs of ~218 updates each); the lr of update ``u`` is ``lr · u / W`` while ``u < W``,
    then ``lr · (n - u) / (n - W)``: it reaches the peak exactly at ``u = W`` and 0 after the last update.
    """
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(opt, warmup_updates(n_updates, warmup_ratio, warmup_steps), n_updates)

__all__ = ["TrainResult", "_find_ckpt", "_load_ckpt", "_save_ckpt", "canonical_adapter_config", "check_attention", "last_epoch_means", "check_distributed", "checkpoint_id", "grad_norm", "lr_schedule", "rank_share", "same_start", "save_adapter", "step_losses", "summed_over_ranks", "train", "training_precision", "warmup_updates"]
