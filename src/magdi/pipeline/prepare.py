"""Stages ``download`` (benchmarks from the mirror or the hub) and ``prepare_student`` (the pinned packaged models
assembled, the students converted to safetensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Params
from ..launch import single_process
from .paths import gguf_file, model_source, write_json


def stage_download(p: Params) -> dict:
    from ..data import prepare_all

    single_process("download")
    summary = prepare_all(p.data.benchmarks, p.data.source, Path(p.paths.mirror_dir), Path(p.paths.data_dir),
                          p.data.n_train, p.data.n_test, p.data.seed, p.data.n_train_by_task)
    write_json(Path(p.paths.data_dir) / "summary.json", summary)
    return summary


def assemble_models(p: Params) -> dict[str, str]:
    """Assemble and verify every packaged model the run loads (student, local teachers); name -> sha256."""
    from ..packaged import assemble, locate_chunk, part_packages

    out = {}
    Path(p.paths.gguf_dir).mkdir(parents=True, exist_ok=True)  # a DVC output even when nothing is packaged
    for name in p.packaged_models_used():
        m = p.models[name]
        chunks = [locate_chunk(pkg, m.member, m.version) for pkg in part_packages(m.package, m.parts)]
        assemble(name, chunks, gguf_file(p, name), m.sha256, m.size)
        out[name] = m.sha256
    return out


def stage_prepare_student(p: Params) -> dict:
    """Assemble the pinned packaged models, then materialise the student (and every scaling student, one
    folder each under ``paths.students_dir``) as safetensors."""
    from ..student import convert_student

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

    from ..precision import capabilities, cpu_class

    return {"student": info["files_sha256"], "scaling_students": {s: i["files_sha256"] for s, i in scaling.items()},
            "versions": {pkg: version(pkg) for pkg in ("torch", "transformers", "gguf", "numpy", "safetensors",
                                                       "tokenizers")},
            "cpu_class": cpu_class(capabilities())}
