"""What each DVC stage does, as one function per stage (the CLIs in ``stages/`` only parse arguments).

Paths of every artefact are derived here from ``params.paths`` so stages, tests and the report agree.
"""

from __future__ import annotations

import json
import os
import re
import sys
from functools import partial
from pathlib import Path
from typing import Any

from .config import MT_METHOD, MT_TASK, TASK_TYPES, Params
from .launch import is_main_process, single_process

ZS_TASK = "base"  # the "training task" of the zero-shot run: the base model, no adapter

# ----------------------------------------------------------------------------- paths


def bench_file(p: Params, task: str, split: str) -> Path:
    return Path(p.paths.data_dir) / task / f"{split}.jsonl"


def mags_file(p: Params, task: str) -> Path:
    return Path(p.paths.mags_dir) / f"{task}.jsonl"


def train_dir(p: Params, task: str, method: str) -> Path:
    return Path(p.paths.runs_dir) / "train" / task / method


def eval_dir(p: Params, task: str, method: str) -> Path:
    return Path(p.paths.runs_dir) / "eval" / task / method


def eval_train_task(method: str, task: str) -> str:
    """Which run evaluated ``method`` on ``task``: zero-shot and multi-task runs cover many tasks each."""
    return ZS_TASK if method_of(method) == "zero_shot" else MT_TASK if method == MT_METHOD else task


def run_name(method: str, student: str | None = None) -> str:
    """Name of a run in ``runs/`` and ``metrics/``: the method, plus ``@<student>`` for a scaling student."""
    return method if student is None else f"{method}@{_safe(student)}"


def method_of(run: str) -> str:
    """The method of a run name (``magdi@qwen`` -> ``magdi``): the inverse of :func:`run_name`."""
    return run.split("@", 1)[0]


def for_run(p: Params, method: str, student: str | None) -> tuple[Params, str]:
    """The params (that student's weights and recipe) and run name of ``method`` on a scaling student, or as
    given for the main student (``student`` None)."""
    return p.for_student(student), run_name(method, student)


def predictions_name(task: str, k: int = 1) -> str:
    """File name of the per-question predictions of one task (``_sc<k>``: the self-consistency decode)."""
    return f"predictions_{task}{f'_sc{k}' if k > 1 else ''}.jsonl"


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
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("MAGDI_THREADS", os.cpu_count() or 1))))


# ----------------------------------------------------------------------------- stages


def stage_download(p: Params) -> dict:
    from .data import prepare_all

    single_process("download")
    summary = prepare_all(p.data.benchmarks, p.data.source, Path(p.paths.mirror_dir), Path(p.paths.data_dir),
                          p.data.n_train, p.data.n_test, p.data.seed, p.data.n_train_by_task)
    write_json(Path(p.paths.data_dir) / "summary.json", summary)
    return summary


def gguf_file(p: Params, name: str) -> Path:
    """Where ``prepare_student`` puts the assembled GGUF of ``models.<name>``."""
    return Path(p.paths.gguf_dir) / f"{_safe(name)}.gguf"


def assemble_models(p: Params) -> dict[str, str]:
    """Assemble and verify every packaged model the run loads (student, local teachers); name -> sha256."""
    from .packaged import assemble, locate_chunk, part_packages

    out = {}
    Path(p.paths.gguf_dir).mkdir(parents=True, exist_ok=True)  # a DVC output even when nothing is packaged
    for name in p.packaged_models_used():
        m = p.models[name]
        chunks = [locate_chunk(pkg, m.member, m.version) for pkg in part_packages(m.package, m.parts)]
        assemble(name, chunks, gguf_file(p, name), m.sha256, m.size)
        out[name] = m.sha256
    return out


def model_source(p: Params, spec: str) -> str:
    """A model reference from params -> what ``convert_student``/``load_gguf_model`` accept."""
    if spec in p.models:
        return f"gguf:{gguf_file(p, spec)}"
    return spec


def stage_prepare_student(p: Params) -> dict:
    """Assemble the pinned packaged models, then materialise the student (and every scaling student, one
    folder each under ``paths.students_dir``) as safetensors."""
    from .student import convert_student

    single_process("prepare_student")
    assembled = assemble_models(p)
    info = convert_student(model_source(p, p.student.model), Path(p.paths.student_dir), p.student.dtype,
                           p.student.trust_remote_code)
    Path(p.paths.students_dir).mkdir(parents=True, exist_ok=True)  # a DVC output even with no scaling student
    scaling = {s: convert_student(model_source(p, s), Path(p.student_folder(s)), p.student.dtype,
                                  p.student.trust_remote_code) for s in p.experiments.scaling_students}
    write_json(Path("metrics") / "student.json", conversion_record(info, scaling))
    return {**info, "assembled": assembled, "scaling_students": scaling}


def conversion_record(info: dict, scaling: dict[str, dict]) -> dict[str, Any]:
    """``metrics/student.json``: each converted file's sha256 (main and scaling students) with the library versions
    and CPU class that converted them, so a folder whose DVC hash differs on another machine can be located file by
    file (the weights are the same on AVX-512 and AVX2 kernels: README, "Precision and CPU classes")."""
    from importlib.metadata import version

    from .precision import capabilities, cpu_class

    return {"student": info["files_sha256"], "scaling_students": {s: i["files_sha256"] for s, i in scaling.items()},
            "versions": {pkg: version(pkg) for pkg in ("torch", "transformers", "gguf", "numpy", "safetensors",
                                                       "tokenizers")},
            "cpu_class": cpu_class(capabilities())}


def student_info(p: Params) -> dict[str, Any]:
    """Which base model a run used and its size (from ``prepare_student``'s record), for Table 7 / Fig. 5."""
    path = Path(p.paths.student_dir) / "magdi_student.json"
    n = json.loads(path.read_text())["parameters"] if path.is_file() else None
    return {"student": p.student.model, "student_parameters": n}


def load_examples(p: Params, task: str, split: str) -> list[dict]:
    from .data import read_jsonl

    path = bench_file(p, task, split)
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: task '{task}' was skipped by `download` (see {p.paths.data_dir}/summary.json)")
    return read_jsonl(path)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _load_teacher(p: Params, model: str, dtype: str):
    """A local teacher in eval mode: the converted student, an assembled packaged GGUF, or a path / hub id."""
    from .student import load_source, load_student, ready_for_generation

    if model == "student":
        lm, tok = load_student(p.paths.student_dir, dtype, p.student.trust_remote_code)
    else:
        lm, tok = ready_for_generation(*load_source(model_source(p, model), dtype, p.student.trust_remote_code))
    return lm.eval(), tok


def make_agents(p: Params, student=None):
    """Backends for the configured agents; local agents on the same model share one loaded copy."""
    from .backends_openai import OpenAIChatBackend
    from .cache import CallCache
    from .discussion import Agent, LocalBackend

    cache_dir = Path(p.paths.cache_dir)
    limits = p.teachers.earlier_limits
    backends: dict[str, Any] = {}
    servers: dict[str, Any] = {}
    agents = []
    for a in p.teachers.agents:
        if a.backend == "reference":
            backend = None
        elif a.backend == "llama_server":
            if a.model not in servers:  # one server (and one cache file) per model, shared by its agents
                from .discussion import RESPONSE_PREFIX
                from .llama_server import LlamaServer, LlamaServerBackend

                ls = p.teachers.llama_server
                if a.model not in p.models:
                    raise ValueError(f"teachers.agents.{a.name}.model: '{a.model}' is not a key of `models`")
                server = LlamaServer(ls.binary, gguf_file(p, a.model), Path(p.paths.runs_dir) / "logs" /
                                     f"llama_server_{_safe(a.model)}.log", ls.parallel, ls.ctx_per_slot, ls.threads,
                                     extra_args=ls.extra_args)
                servers[a.model] = LlamaServerBackend(
                    server, a.model, CallCache(cache_dir / f"llama_{_safe(a.model)}.jsonl", limits), p.teachers.http_retries,
                    a.timeout_s, RESPONSE_PREFIX if ls.prefill else "")
            backend = servers[a.model]
        elif a.backend == "openai":
            backend = OpenAIChatBackend(a.model, a.base_url, a.api_key_env, a.timeout_s, p.teachers.http_retries,
                                        CallCache(cache_dir / f"openai_{_safe(a.model)}.jsonl", limits))
        else:
            path = p.paths.student_dir if a.model == "student" else a.model
            if path not in backends:  # one backend per model: its personas decode in shared batches
                sharing = sum(b.backend == "local" and b.model == a.model for b in p.teachers.agents)
                if a.model == "student" and student is not None:
                    model, tok = student
                else:  # loaded lazily: a discussion already in the cache never loads the model
                    model, tok = None, None
                backends[path] = LocalBackend(model, tok, f"local:{a.model}",
                                              CallCache(cache_dir / f"local_{_safe(a.model)}.jsonl", limits),
                                              p.teachers.batch_size * sharing,
                                              loader=partial(_load_teacher, p, a.model, p.teacher_precision(a).dtype))
            backend = backends[path]
        agents.append(Agent(a.name, backend, a.persona, a.temperature, a.top_p, a.seed, a.max_new_tokens))
    return agents


def import_official_mags(p: Params, task: str) -> list:
    """``teachers.source: official``: the authors' MAG release for ``task`` (a JSON list of records),
    its first ``data.n_train`` (or ``n_train_by_task``) questions, converted to our MAGs (labels re-derived by our
    scorer)."""
    from .official import import_official

    path = Path(p.teachers.official_files[task])
    if not path.is_file():
        raise FileNotFoundError(f"teachers.official_files.{task}: file not found: {path}")
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"teachers.official_files.{task}: {path} is not a JSON list of MAG records")
    return import_official(records[: p.data.train_size(task)], task, TASK_TYPES[task], max_rounds=10,
                           clean_agreement=p.teachers.clean_agreement, lookup=options_lookup(p, task))


def options_lookup(p: Params, task: str) -> dict[str, list[str]] | None:
    """For a choice task: question text -> the benchmark's options (every pool of the mirror or hub), so imported
    records whose options are neither in the record nor in its text get them back (``magdi.official``)."""
    if TASK_TYPES[task] != "choice":
        return None
    from .data import MissingBenchmark, load_benchmark
    from .official import benchmark_lookup

    try:
        pools, _ = load_benchmark(task, p.data.source, p.paths.mirror_dir)
    except (MissingBenchmark, FileNotFoundError):  # no benchmark to look in: the record's own options only
        return None
    return benchmark_lookup([r for rows in pools.values() for r in rows])


def stage_build_mags(p: Params, task: str) -> dict:
    from .mag import length_stats, mag_stats, write_mags
    from .official import clean_mag

    single_process("build_mags")
    _set_threads()
    if p.teachers.source == "official":
        mags = import_official_mags(p, task)
        write_mags(mags_file(p, task), mags)
    else:
        from .discussion import build_mags

        examples = load_examples(p, task, "train")
        # build_mags resumes from a partial MAG file, but that file may come from other teacher settings (a
        # raised max_new_tokens, another agent): start from none, as `dvc repro` does. Nothing is paid twice:
        # every reply already generated comes back from the teacher cache.
        mags_file(p, task).unlink(missing_ok=True)
        agents = make_agents(p)
        try:
            mags = build_mags(agents, examples, task, TASK_TYPES[task], mags_file(p, task), p.teachers.max_rounds,
                              p.teachers.batch_size, p.teachers.parse_retries, p.teachers.context_chars,
                              p.teachers.prompt_style, p.teachers.convincing_per_agent)
        finally:  # servers started for this stage stop with it
            for b in {id(a.backend): a.backend for a in agents if hasattr(a.backend, "close")}.values():
                b.close()
        if p.teachers.clean_agreement:
            mags = [clean_mag(m) for m in mags]
            write_mags(mags_file(p, task), mags)
    stats = mag_stats(mags)
    if p.teachers.source != "official":
        stats["lengths"] = length_stats(mags, {a.name: a.max_new_tokens for a in p.teachers.agents
                                               if a.backend != "reference"})
    if p.teachers.source != "official":  # the local teachers' precision on this machine (cached replies keep theirs)
        from .precision import capabilities, cpu_class

        stats["teacher_precision"] = {a.name: p.teacher_precision(a).dtype for a in p.teachers.agents
                                      if a.backend == "local"}
        stats["cpu_class"] = cpu_class(capabilities())
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


def stage_train(p: Params, task: str, method: str, student: str | None = None) -> dict:
    """Train one (task, method) run: LoRA adapter + metrics + loss curve, logged to MLflow.

    ``student``: one of ``experiments.scaling_students`` instead of the main student (run ``method@student``).
    """
    import torch

    from .evaluate import numerics_fingerprint
    from .student import attach_lora, load_student
    from .tracking import mlflow_run
    from .train import build_items, method_spec, save_adapter, train, training_precision, truncation_stats

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
                   "adapter_sha256": adapter_sha256,  # two runs trained alike iff equal
                   # what the numbers depend on besides code and data: the kernels and the resolved precision
                   "numerics": {**numerics_fingerprint(),
                                "precision": {"train": res.precision, "reason": res.precision_reason}}}
        mlf.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, int | float)})
    write_json(metrics_file(task, method, "train"), summary)
    import csv

    with history_file(task, method).open("w", newline="") as f:
        keys = sorted({k for r in res.history for k in r})
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(res.history)
    return summary


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

    from .evaluate import evaluate_examples, numerics_fingerprint, outputs_digest, prediction_rows, summarise

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


def log_precision(what: str, prec) -> None:
    """One line at start-up saying which precision runs and why (``magdi.precision``)."""
    print(f"precision: {what} {prec.reason}", file=sys.stderr, flush=True)


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
    from .evaluate import hf_generator
    from .student import load_student

    if p.evaluate.backend == "vllm":
        from transformers import AutoTokenizer

        from .backends_vllm import VLLMGenerator

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
    from .student import DSS_ANSWER_PREFIX
    from .tracking import log_predictions, mlflow_run

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


def stage_train_mt(p: Params) -> dict:
    return stage_train(p, MT_TASK, MT_METHOD)


def stage_evaluate_mt(p: Params) -> dict:
    return stage_evaluate(p, MT_TASK, MT_METHOD, p.experiments.tasks + p.experiments.ood_tasks)
