"""Stage ``build_mags``: the teachers' discussions (or the official release) into MAGs, with their statistics."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from ..config import TASK_TYPES, Params
from ..launch import single_process
from .paths import _safe, _set_threads, gguf_file, load_examples, mags_file, model_source, write_json


def _load_teacher(p: Params, model: str, dtype: str):
    """A local teacher in eval mode: the converted student, an assembled packaged GGUF, or a path / hub id."""
    from ..student import load_source, load_student, ready_for_generation

    if model == "student":
        lm, tok = load_student(p.paths.student_dir, dtype, p.student.trust_remote_code)
    else:
        lm, tok = ready_for_generation(*load_source(model_source(p, model), dtype, p.student.trust_remote_code))
    return lm.eval(), tok


def make_agents(p: Params, student=None):
    """Backends for the configured agents; local agents on the same model share one loaded copy."""
    from ..backends_openai import OpenAIChatBackend
    from ..cache import CallCache
    from ..discussion import Agent, LocalBackend

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
                from ..discussion import RESPONSE_PREFIX
                from ..llama_server import LlamaServer, LlamaServerBackend

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
    from ..official import import_official

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
    from ..data import MissingBenchmark, load_benchmark
    from ..official import benchmark_lookup

    try:
        pools, _ = load_benchmark(task, p.data.source, p.paths.mirror_dir)
    except (MissingBenchmark, FileNotFoundError):  # no benchmark to look in: the record's own options only
        return None
    return benchmark_lookup([r for rows in pools.values() for r in rows])


def stage_build_mags(p: Params, task: str) -> dict:
    from ..mag import length_stats, mag_stats, write_mags
    from ..official import clean_mag

    single_process("build_mags")
    _set_threads()
    if p.teachers.source == "official":
        mags = import_official_mags(p, task)
        write_mags(mags_file(p, task), mags)
    else:
        from ..discussion import build_mags

        examples = load_examples(p, task, "train")
        # build_mags resumes from a partial MAG file, but that file may come from other teacher settings (a
        # raised max_new_tokens, another agent): start from none, as `dvc repro` does. Nothing is paid twice:
        # every reply already generated comes back from the teacher cache.
        mags_file(p, task).unlink(missing_ok=True)
        agents = make_agents(p)
        try:
            mags = build_mags(agents, examples, task, TASK_TYPES[task], mags_file(p, task), p.teachers.rounds(task),
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
        from ..precision import capabilities, cpu_class

        stats["teacher_precision"] = {a.name: p.teacher_precision(a).dtype for a in p.teachers.agents
                                      if a.backend == "local"}
        stats["cpu_class"] = cpu_class(capabilities())
    stats["team_accuracy"] = sum(bool(m.team_correct) for m in mags) / len(mags) if mags else 0.0
    stats["teacher_tokens_per_question"] = sum(n.n_tokens for m in mags for n in m.nodes) / len(mags) if mags else 0.0
    write_json(Path("metrics") / "mags" / f"{task}.json", stats)
    return stats
