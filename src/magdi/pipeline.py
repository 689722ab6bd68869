"""What each DVC stage does, as one function per stage (the CLIs in ``stages/`` only parse arguments).

Paths of every artefact are derived here from ``params.paths`` so stages, tests and the report agree.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .config import TASK_TYPES, Params

MT_TASK = "multitask"
MT_METHOD = "magdi_mt"


# ----------------------------------------------------------------------------- paths


def bench_file(p: Params, task: str, split: str) -> Path:
    return Path(p.paths.data_dir) / task / f"{split}.jsonl"


def mags_file(p: Params, task: str) -> Path:
    return Path(p.paths.mags_dir) / f"{task}.jsonl"


def train_dir(p: Params, task: str, method: str) -> Path:
    return Path(p.paths.runs_dir) / "train" / task / method


def eval_dir(p: Params, task: str, method: str) -> Path:
    return Path(p.paths.runs_dir) / "eval" / task / method


def metrics_file(task: str, method: str, kind: str = "eval") -> Path:
    """Git-tracked metrics (``dvc metrics show``): ``metrics/<kind>/<method>/<task>.json``."""
    return Path("metrics") / kind / method / f"{task}.json"


def history_file(task: str, method: str) -> Path:
    """Git-tracked per-step training losses (``dvc plots``)."""
    return Path("metrics") / "train" / method / f"{task}_history.csv"


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _set_threads() -> None:
    import os

    import torch

    torch.set_num_threads(max(1, int(os.environ.get("MAGDI_THREADS", os.cpu_count() or 1))))


# ----------------------------------------------------------------------------- stages


def stage_download(p: Params) -> dict:
    from .data import prepare_all

    summary = prepare_all(p.data.benchmarks, p.data.source, Path(p.paths.mirror_dir), Path(p.paths.data_dir),
                          p.data.n_train, p.data.n_test, p.data.seed)
    write_json(Path(p.paths.data_dir) / "summary.json", summary)
    return summary


def stage_prepare_student(p: Params) -> dict:
    from .student import convert_student

    return convert_student(p.student.model, Path(p.paths.student_dir), p.student.dtype, p.student.trust_remote_code)


def load_examples(p: Params, task: str, split: str) -> list[dict]:
    from .data import read_jsonl

    path = bench_file(p, task, split)
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: task '{task}' was skipped by `download` (see {p.paths.data_dir}/summary.json)")
    return read_jsonl(path)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def make_agents(p: Params, student=None):
    """Backends for the configured agents; local agents on the same model share one loaded copy."""
    from .backends_openai import OpenAIChatBackend
    from .cache import CallCache
    from .discussion import Agent, LocalBackend
    from .student import load_student

    cache_dir = Path(p.paths.cache_dir)
    loaded: dict[str, Any] = {}
    backends: dict[str, Any] = {}
    agents = []
    for a in p.teachers.agents:
        if a.backend == "reference":
            backend = None
        elif a.backend == "openai":
            backend = OpenAIChatBackend(a.model, a.base_url, a.api_key_env, a.timeout_s, p.teachers.http_retries,
                                        CallCache(cache_dir / f"openai_{_safe(a.model)}.jsonl"))
        else:
            path = p.paths.student_dir if a.model == "student" else a.model
            if path not in loaded:
                if a.model == "student" and student is not None:
                    loaded[path] = student
                else:
                    loaded[path] = load_student(path, p.student.gen_dtype, p.student.trust_remote_code)
                    loaded[path][0].eval()
            model, tok = loaded[path]
            if path not in backends:  # one backend per model: its personas decode in shared batches
                sharing = sum(b.backend == "local" and b.model == a.model for b in p.teachers.agents)
                backends[path] = LocalBackend(model, tok, f"local:{a.model}",
                                              CallCache(cache_dir / f"local_{_safe(a.model)}.jsonl"),
                                              p.teachers.batch_size * sharing)
            backend = backends[path]
        agents.append(Agent(a.name, backend, a.persona, a.temperature, a.top_p, a.seed, a.max_new_tokens))
    return agents


def stage_build_mags(p: Params, task: str) -> dict:
    from .discussion import build_mags
    from .mag import mag_stats

    _set_threads()
    examples = load_examples(p, task, "train")
    agents = make_agents(p)
    mags = build_mags(agents, examples, task, TASK_TYPES[task], mags_file(p, task), p.teachers.max_rounds,
                      p.teachers.batch_size, p.teachers.parse_retries, p.teachers.context_chars)
    stats = mag_stats(mags)
    stats["team_accuracy"] = sum(bool(m.team_correct) for m in mags) / len(mags) if mags else 0.0
    stats["teacher_tokens_per_question"] = sum(n.n_tokens for m in mags for n in m.nodes) / len(mags) if mags else 0.0
    write_json(Path("metrics") / "mags" / f"{task}.json", stats)
    return stats


def _select_mags(p: Params, task: str, cfg) -> list:
    from .mag import read_mags

    tasks = p.experiments.tasks if task == MT_TASK else [task]
    out = []
    for t in tasks:
        mags = [m for m in read_mags(mags_file(p, t)) if m.graph_type not in cfg.exclude_graph_types]
        out += mags[: cfg.max_mags] if cfg.max_mags else mags
    return out


def stage_train(p: Params, task: str, method: str) -> dict:
    """Train one (task, method) run: LoRA adapter + metrics + loss curve, logged to MLflow."""
    import torch

    from .student import attach_lora, load_student
    from .tracking import mlflow_run
    from .train import build_items, method_spec, save_adapter, train

    _set_threads()
    base, cfg = p.train_for(method if method != MT_METHOD else "magdi")
    spec = method_spec(base)
    out = train_dir(p, task, method)
    mags = _select_mags(p, task, cfg)
    torch.manual_seed(cfg.seed)
    lm, tok = load_student(p.paths.student_dir, p.student.dtype, p.student.trust_remote_code)
    lm = attach_lora(lm, p.student.lora.r, p.student.lora.alpha, p.student.lora.dropout, p.student.lora.target_modules)
    items = build_items(mags, spec, tok, cfg.graph)
    run_params = {"task": task, "method": method, "base_method": base, "train": cfg.model_dump(),
                  "student": p.student.model_dump(), "n_mags": len(mags), "n_items": len(items)}
    with mlflow_run(p.paths.tracking_uri, "magdi-train", f"{task}/{method}", run_params) as mlf:
        res = train(lm, tok, items, spec, cfg, out,
                    log_fn=lambda r: mlf.log_metrics({k: v for k, v in r.items() if k != "step"}, step=r["step"]))
        save_adapter(lm, out / "adapter")
        summary = {"task": task, "method": method, "base_method": base, "n_mags": len(mags), "n_items": len(items),
                   "steps": res.steps, "tokens": res.tokens, "unique_sequences": res.n_unique_sequences,
                   "seconds": round(res.seconds, 2), "tokens_per_s": round(res.tokens / max(res.seconds, 1e-9), 1),
                   "resumed_from": res.resumed_from,
                   "final_loss": res.history[-1]["loss"] if res.history else None}
        mlf.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, int | float)})
    write_json(metrics_file(task, method, "train"), summary)
    import csv

    with history_file(task, method).open("w", newline="") as f:
        keys = sorted({k for r in res.history for k in r})
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(res.history)
    return summary


def _eval_one(p: Params, generator, tok, task: str, out: Path, prefix: str, k: int = 1) -> dict:
    from .evaluate import evaluate_examples, prediction_rows, summarise

    sc = p.evaluate.self_consistency
    examples = load_examples(p, task, "test")
    preds = evaluate_examples(generator, tok, examples, task, TASK_TYPES[task], p.evaluate.batch_size,
                              p.evaluate.max_new_tokens, prefix, k=k,
                              temperature=sc.temperature if k > 1 else 0.0,
                              top_p=sc.top_p if k > 1 else 1.0, seed=sc.seed if k > 1 else p.evaluate.seed)
    res = summarise(preds, p.evaluate.bootstrap_samples, p.evaluate.seed)
    suffix = f"_sc{k}" if k > 1 else ""
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"predictions_{task}{suffix}.jsonl").open("w") as f:
        for row in prediction_rows(preds):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return res


def wants_self_consistency(p: Params, method: str, task: str) -> bool:
    """Table 5 rows: listed methods (by exact name, so ablations stay greedy) on the listed tasks (all if none)."""
    sc_tasks = p.experiments.self_consistency_tasks
    return method in p.experiments.self_consistency_methods and (not sc_tasks or task in sc_tasks)


def _student_generator(p: Params, adapter: Path | None):
    """(generator, tokenizer) for the evaluated student: transformers with the LoRA merged, or vLLM with the
    adapter served as is (``evaluate.backend``). Training heads are never used at inference."""
    from .evaluate import hf_generator
    from .student import load_student

    if p.evaluate.backend == "vllm":
        from transformers import AutoTokenizer

        from .backends_vllm import VLLMGenerator

        tok = AutoTokenizer.from_pretrained(p.paths.student_dir, trust_remote_code=p.student.trust_remote_code)
        return VLLMGenerator(p.paths.student_dir, tok, adapter, p.student.dtype, p.student.lora.r,
                             p.evaluate.seed, p.evaluate.vllm_engine, p.student.trust_remote_code), tok
    model, tok = load_student(p.paths.student_dir, p.student.gen_dtype, p.student.trust_remote_code)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    return hf_generator(model, tok), tok


def stage_evaluate(p: Params, train_task: str, method: str, eval_tasks: list[str] | None = None) -> dict:
    """Evaluate a trained adapter (or the base model for zero_shot) on its task(s); write metrics JSON."""
    from .student import DSS_ANSWER_PREFIX
    from .tracking import mlflow_run

    _set_threads()
    adapter = None if method == "zero_shot" else train_dir(p, train_task, method) / "adapter"
    generator, tok = _student_generator(p, adapter)
    prefix = DSS_ANSWER_PREFIX if method == "dss_mt" else ""
    tasks = eval_tasks or [train_task]
    results = {}
    with mlflow_run(p.paths.tracking_uri, "magdi-eval", f"{train_task}/{method}",
                    {"train_task": train_task, "method": method, "evaluate": p.evaluate.model_dump()}) as mlf:
        for t in tasks:
            res = _eval_one(p, generator, tok, t, eval_dir(p, train_task, method), prefix)
            if wants_self_consistency(p, method, t):
                sc = _eval_one(p, generator, tok, t, eval_dir(p, train_task, method), prefix,
                               k=p.evaluate.self_consistency.k)
                res["sc"] = {k: v for k, v in sc.items()}
            res.update({"task": t, "method": method, "train_task": train_task})
            mlf.log_metrics({f"{t}.{k}": float(v) for k, v in res.items() if isinstance(v, int | float)})
            results[t] = res
    for t, res in results.items():
        write_json(metrics_file(t, method), res)
    return results


def stage_zero_shot(p: Params) -> dict:
    return stage_evaluate(p, "base", "zero_shot", p.experiments.tasks + p.experiments.ood_tasks)


def stage_train_mt(p: Params) -> dict:
    return stage_train(p, MT_TASK, MT_METHOD)


def stage_evaluate_mt(p: Params) -> dict:
    return stage_evaluate(p, MT_TASK, MT_METHOD, p.experiments.tasks + p.experiments.ood_tasks)
