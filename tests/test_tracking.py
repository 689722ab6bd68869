"""Every evaluation run logs its predictions file to MLflow (artifact + task/method tags), so `mlflow ui` shows the
same per-question outputs the report's pages are made from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import magdi.evaluate as ev
import magdi.pipeline.evaluation as pl
from magdi.config import parse_params
from magdi.student import Generation

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_evaluation_logs_its_predictions_to_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # metrics/ and MLflow's default artifact root (./mlruns) land here
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"].update({"data_dir": "data", "runs_dir": "runs", "tracking_uri": f"sqlite:///{tmp_path}/m.db"})
    raw["experiments"]["self_consistency_methods"] = []
    p = parse_params(raw)
    examples = [{"id": "q1", "question": "Is ice cold?", "answer": "yes"},
                {"id": "q2", "question": "Is fire cold?", "answer": "no"}]
    (tmp_path / "data" / "strategyqa").mkdir(parents=True)
    (tmp_path / "data" / "strategyqa" / "test.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))

    def fake_generator(prompts, max_new_tokens, temperature, top_p, seed, num_samples=1, top_k=0):
        return [Generation("The answer is yes.", 5) for _ in prompts for _ in range(num_samples)]

    monkeypatch.setattr(pl, "_student_generator", lambda params, adapter: (fake_generator, None))
    monkeypatch.setattr(ev, "student_prompt", lambda tok, ex, at, prefix="": ex["question"])
    pl.stage_evaluate(p, "strategyqa", "magdi")

    client = MlflowClient(p.paths.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("magdi-eval").experiment_id])
    assert run.data.tags["task"] == "strategyqa" and run.data.tags["method"] == "magdi"
    (art,) = client.list_artifacts(run.info.run_id, "predictions/strategyqa")
    assert art.path == "predictions/strategyqa/predictions_strategyqa.jsonl"
    local = Path(client.download_artifacts(run.info.run_id, art.path, str(tmp_path / "dl")))
    rows = [json.loads(line) for line in local.read_text().splitlines()]
    assert [(r["id"], r["question"], r["correct"]) for r in rows] == [("q1", "Is ice cold?", True),
                                                                      ("q2", "Is fire cold?", False)]
    assert local.read_bytes() == (pl.eval_dir(p, "strategyqa", "magdi") / "predictions_strategyqa.jsonl").read_bytes()
