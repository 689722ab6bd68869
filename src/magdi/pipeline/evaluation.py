"""Stages ``evaluate``, ``zero_shot`` and the multi-task evaluation: decode, score, write metrics and predictions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import MT_METHOD, MT_TASK, TASK_TYPES, Params
from ..launch import single_process
from .paths import (
    ZS_TASK,
    _set_threads,
    eval_dir,
    for_run,
    load_examples,
    log_precision,
    method_of,
    metrics_file,
    predictions_name,
    student_info,
    train_dir,
    write_json,
)


def decoding(p: Params, k: int) -> dict[str, Any]:
    """Sampling settings of one evaluation: ``evaluate.*`` for a single answer (greedy at temperature 0),
    ``evaluate.self_consistency.*`` for k > 1 samples."""
    e = p.evaluate
    src = e.self_consistency if k > 1 else e
    greedy = k == 1 and e.temperature <= 0
    return {"temperature": 0.0 if greedy else src.temperature, "top_p": 1.0 if greedy else src.top_p,
            "top_k": 0 if greedy else src.top_k, "seed": e.self_consistency.seed if k > 1 else e.seed}


def _eval_one(p: Params, generator, tok, task: str, out: Path, prefix: str, k: int = 1) -> dict:
    import time

    from ..evaluate import evaluate_examples, numerics_fingerprint, outputs_digest, prediction_rows, summarise

    examples = load_examples(p, task, "test")
    t0 = time.perf_counter()
    preds = evaluate_examples(generator, tok, examples, task, TASK_TYPES[task], p.evaluate.batch_size,
                              p.evaluate.limit(task), prefix, k=k, **decoding(p, k))
    seconds = time.perf_counter() - t0
    res = summarise(preds, p.evaluate.bootstrap_samples, p.evaluate.seed, p.evaluate.limit(task))
    res["max_new_tokens"] = p.evaluate.limit(task)
    res["generation_seconds"] = round(seconds, 2)  # the compute part of the stage (reports/benchmark_pipeline.md)
    # the kernels and the resolved precision behind the exact tokens (why two runs may differ)
    res["numerics"] = {**numerics_fingerprint(), "precision": generation_precision(p)}
    res["outputs_sha256"] = outputs_digest(preds)  # two runs decoded alike iff equal
    out.mkdir(parents=True, exist_ok=True)
    with (out / predictions_name(task, k)).open("w") as f:
        for row in prediction_rows(preds):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return res


def generation_precision(p: Params) -> dict[str, str]:
    """The evaluation's generation dtype as run: vLLM takes ``student.dtype``; transformers the resolved
    ``student.generation_dtype``."""
    if p.evaluate.backend == "vllm":
        return {"generate": p.student.dtype, "reason": f"{p.student.dtype}: evaluate.backend vllm uses student.dtype"}
    prec = p.student.gen_precision
    return {"generate": prec.dtype, "reason": prec.reason}


def wants_self_consistency(p: Params, method: str, task: str) -> bool:
    """Table 5 rows: listed methods (by exact name, so ablations stay greedy) on the listed tasks (all if none)."""
    sc_tasks = p.experiments.self_consistency_tasks
    return method in p.experiments.self_consistency_methods and (not sc_tasks or task in sc_tasks)


def _student_generator(p: Params, adapter: Path | None):
    """(generator, tokenizer) for the evaluated student: transformers with the LoRA merged, or vLLM with the
    adapter served as is (``evaluate.backend``). Training heads are never used at inference."""
    from ..evaluate import hf_generator
    from ..student import load_student

    if p.evaluate.backend == "vllm":
        from transformers import AutoTokenizer

        from ..backends_vllm import VLLMGenerator

        tok = AutoTokenizer.from_pretrained(p.paths.student_dir, trust_remote_code=p.student.trust_remote_code)
        return VLLMGenerator(p.paths.student_dir, tok, adapter, p.student.dtype, p.student.lora.r,
                             p.evaluate.seed, p.evaluate.vllm_engine, p.student.trust_remote_code), tok
    log_precision("generate", p.student.gen_precision)
    model, tok = load_student(p.paths.student_dir, p.student.gen_dtype, p.student.trust_remote_code)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    return hf_generator(model, tok), tok


def stage_evaluate(p: Params, train_task: str, method: str, eval_tasks: list[str] | None = None,
                   student: str | None = None) -> dict:
    """Evaluate a trained adapter (or the base model for zero_shot) on its task(s); write metrics JSON.

    ``student``: one of ``experiments.scaling_students`` instead of the main student (run ``method@student``).
    """
    from ..student import DSS_ANSWER_PREFIX
    from ..tracking import log_predictions, mlflow_run

    single_process("evaluate")
    _set_threads()
    prefix = DSS_ANSWER_PREFIX if method == "dss_mt" else ""
    p, method = for_run(p, method, student)
    adapter = None if method_of(method) == "zero_shot" else train_dir(p, train_task, method) / "adapter"
    generator, tok = _student_generator(p, adapter)
    tasks = eval_tasks or [train_task]
    results = {}
    out = eval_dir(p, train_task, method)
    with mlflow_run(p.paths.tracking_uri, "magdi-eval", f"{train_task}/{method}",
                    {"train_task": train_task, "method": method, "evaluate": p.evaluate.model_dump()}) as mlf:
        mlf.set_tags({"task": ",".join(tasks), "method": method, "train_task": train_task})
        for t in tasks:
            res = _eval_one(p, generator, tok, t, out, prefix)
            log_predictions(mlf, out / predictions_name(t), t)
            if wants_self_consistency(p, method, t):
                k = p.evaluate.self_consistency.k
                sc = _eval_one(p, generator, tok, t, out, prefix, k=k)
                log_predictions(mlf, out / predictions_name(t, k), t)
                res["sc"] = {k: v for k, v in sc.items()}
            res.update({"task": t, "method": method, "train_task": train_task, **student_info(p)})
            mlf.log_metrics({f"{t}.{k}": float(v) for k, v in res.items() if isinstance(v, int | float)})
            results[t] = res
    for t, res in results.items():
        write_json(metrics_file(t, method), res)
    write_json(out / "config.json", {"train_task": train_task, "method": method, "tasks": tasks,
                                     "evaluate": p.evaluate.model_dump(), "precision": generation_precision(p),
                                     "adapter": str(adapter) if adapter else None})
    return results


def stage_zero_shot(p: Params, student: str | None = None) -> dict:
    """The base model without adapter: the main student on every task, a scaling student on the scaling tasks."""
    tasks = p.experiments.tasks + p.experiments.ood_tasks if student is None else p.experiments.scaling_tasks
    return stage_evaluate(p, ZS_TASK, "zero_shot", tasks, student=student)


def stage_evaluate_mt(p: Params) -> dict:
    return stage_evaluate(p, MT_TASK, MT_METHOD, p.experiments.tasks + p.experiments.ood_tasks)
