"""What each DVC stage does, as one function per stage (the CLIs in ``stages/`` only parse arguments), by concern:
``paths`` (where every artefact lives), ``prepare`` (download, prepare_student), ``mags`` (build_mags), ``training``
(train), ``evaluation`` (evaluate, zero_shot, the multi-task evaluation).

A stage script imports only its own module (``from magdi.pipeline.training import stage_train``), so it loads only
what it uses and dvc.yaml lists exactly those files as its code dependencies (tests/test_layout.py checks it). Names are
also reachable here (``magdi.pipeline.stage_train``), loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..config import MT_METHOD, MT_TASK  # noqa: F401 -- re-exported: stage CLIs and tests name them here

#: name -> submodule that defines it
_WHERE = {
    **dict.fromkeys(["ZS_TASK", "_safe", "_set_threads", "bench_file", "eval_dir", "eval_train_task", "for_run", "gguf_file", "history_file", "load_examples", "log_precision", "mags_file", "method_of", "metrics_file", "model_source", "predictions_name", "run_name", "student_info", "train_dir", "write_json"], "paths"),
    **dict.fromkeys(["assemble_models", "conversion_record", "stage_download", "stage_prepare_student"], "prepare"),
    **dict.fromkeys(["_load_teacher", "import_official_mags", "make_agents", "options_lookup", "stage_build_mags"], "mags"),
    **dict.fromkeys(["_select_mags", "stage_train"], "training"),
    **dict.fromkeys(["_eval_one", "_student_generator", "decoding", "generation_precision", "stage_evaluate", "stage_evaluate_mt", "stage_zero_shot", "wants_self_consistency"], "evaluation"),
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
