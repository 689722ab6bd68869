"""Stage ``train``: one (task, method) run: LoRA adapter, metrics, loss curve, resolved configuration."""

from __future__ import annotations

from ..config import MT_METHOD, MT_TASK, Params
from ..launch import is_main_process
from .paths import (
    _set_threads,
    for_run,
    history_file,
    log_precision,
    mags_file,
    metrics_file,
    student_info,
    train_dir,
    write_json,
)


def _select_mags(p: Params, task: str, cfg) -> list:
    from ..mag import read_mags

    tasks = p.experiments.tasks if task == MT_TASK else [task]
    out = []
    for t in tasks:
        mags = [m for m in read_mags(mags_file(p, t)) if m.graph_type not in cfg.exclude_graph_types]
        out += mags[: cfg.max_mags] if cfg.max_mags else mags
    return out


def stage_train(p: Params, task: str, method: str, student: str | None = None) -> dict:
    """Train one (task, method) run: LoRA adapter + metrics + loss curve, logged to MLflow.

    ``student``: one of ``experiments.scaling_students`` instead of the main student (run ``method@student``).
    """
    import torch

    from ..evaluate import numerics_fingerprint
    from ..student import attach_lora, load_student
    from ..tracking import mlflow_run
    from ..train import (
        build_items,
        last_epoch_means,
        method_spec,
        save_adapter,
        train,
        training_precision,
        truncation_stats,
    )

    _set_threads()
    main = is_main_process()  # before any loading: an inconsistent launch fails at once
    p, run = for_run(p, method, student)  # a scaling student: its own weights, train + experiments.scaling_train
    base, cfg = p.train_for(method if method != MT_METHOD else "magdi", task)  # MT_TASK has no task_train entry
    method = run
    prec = training_precision(cfg.bf16)  # resolved once, here: the loop below runs what this line logs
    log_precision("train", prec)
    cfg = cfg.model_copy(update={"bf16": prec.bf16})
    spec = method_spec(base)
    out = train_dir(p, task, method)
    mags = _select_mags(p, task, cfg)
    torch.manual_seed(cfg.seed)
    lm, tok = load_student(p.paths.student_dir, p.student.dtype, p.student.trust_remote_code)
    lm = attach_lora(lm, p.student.lora.r, p.student.lora.alpha, p.student.lora.dropout, p.student.lora.target_modules)
    items = build_items(mags, spec, tok, cfg.graph)
    if not main:  # DDP ranks > 0: train in lockstep; rank 0 alone writes the adapter and metrics
        train(lm, tok, items, spec, cfg, out)
        return {}
    run_params = {"task": task, "method": method, "base_method": base, "train": cfg.model_dump(),
                  "student": p.student.model_dump(), "n_mags": len(mags), "n_items": len(items)}
    # the resolved configuration beside the adapter (what `python -m magdi show-runs` predicts, as it ran)
    write_json(out / "config.json", {**run_params, "precision": prec.reason})
    with mlflow_run(p.paths.tracking_uri, "magdi-train", f"{task}/{method}", run_params) as mlf:
        res = train(lm, tok, items, spec, cfg, out,
                    log_fn=lambda r: mlf.log_metrics({k: v for k, v in r.items() if k != "step"}, step=r["step"]))
        adapter_sha256 = save_adapter(lm, out / "adapter")
        summary = {"task": task, "method": method, "base_method": base, **student_info(p),
                   "n_mags": len(mags), "n_items": len(items),
                   "steps": res.steps, "tokens": res.tokens, "unique_sequences": res.n_unique_sequences,
                   "seconds": round(res.seconds, 2), "tokens_per_s": round(res.tokens / max(res.seconds, 1e-9), 1),
                   "resumed_from": res.resumed_from, "epochs": cfg.epochs, "lr": cfg.lr,
                   "graph": cfg.graph, "encoder": cfg.encoder, "node_repr": cfg.node_repr, "max_mags": cfg.max_mags,
                   "exclude_graph_types": cfg.exclude_graph_types, "warmup_updates": res.warmup_updates,
                   **{f"w_{k}": v for k, v in cfg.weights.model_dump().items()},
                   "updates": sum("grad_norm" in r for r in res.history), "max_grad_norm": cfg.max_grad_norm,
                   **truncation_stats(items, tok, cfg.max_prompt_tokens, cfg.max_target_tokens),
                   "final_loss": res.history[-1]["loss"] if res.history else None,
                   # each term's mean over the last epoch: the last step alone may have no positive chain
                   "last_epoch_loss": last_epoch_means(res.history),
                   "adapter_sha256": adapter_sha256,  # two runs trained alike iff equal
                   # what the numbers depend on besides code and data: the kernels and the resolved precision
                   "numerics": {**numerics_fingerprint(),
                                # the resolution of the setting as written (the loop got it resolved: a bool)
                                "precision": {"train": res.precision, "reason": prec.reason,
                                              "setting": prec.setting}}}
        mlf.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, int | float)})
    write_json(metrics_file(task, method, "train"), summary)
    import csv

    with history_file(task, method).open("w", newline="") as f:
        keys = sorted({k for r in res.history for k in r})
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(res.history)
    return summary
