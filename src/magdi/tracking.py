"""MLflow tracking: one helper used by every stage.

A SQLite URI is the default because MLflow 3.17 refuses the deprecated file store. Params are
flattened (``train.weights.ntp``) so runs of an ablation line up column by column in the MLflow UI.
Secrets never reach MLflow: keys whose name looks like a credential are dropped before logging.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

_SECRET = re.compile(r"(api[_-]?key|token|secret|password)$", re.IGNORECASE)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys; lists become their string form (MLflow params are strings)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def safe_params(d: Mapping[str, Any]) -> dict[str, str]:
    """Flatten and drop anything that looks like a credential (we only ever store env-var *names*)."""
    return {k: str(v)[:500] for k, v in flatten(d).items() if not _SECRET.search(k.split(".")[-1])}


@contextlib.contextmanager
def mlflow_run(
    tracking_uri: str, experiment: str, run_name: str, params: Mapping[str, Any] | None = None
) -> Iterator[Any]:
    """Start an MLflow run (quietly); yields the ``mlflow`` module so callers log metrics/artifacts."""
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name):
        if params:
            mlflow.log_params(safe_params(params))
        yield mlflow


def log_predictions(mlf: Any, path: Path, task: str) -> None:
    """Attach one predictions JSONL to the active run under ``predictions/<task>/``, so ``mlflow ui`` shows the
    very outputs the report's pages are made from (run tags ``task``/``method`` say whose they are)."""
    mlf.log_artifact(str(path), artifact_path=f"predictions/{task}")
