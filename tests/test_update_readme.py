"""The README's results block is generated: its description of the experiment comes from params.yaml and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    return load_script("tools/update_readme.py", "update_readme")


def test_setup_sentence_follows_params_and_metrics(tmp_path, monkeypatch) -> None:
    tool = _tool()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["n_train"] = 7
    params["data"]["n_train_by_task"] = {}
    params["experiments"]["task_train"] = {}
    params["train"]["epochs"] = 3
    params["train"]["lr"] = 1e-4
    params["teachers"]["max_rounds"] = 2
    params["teachers"]["max_rounds_by_task"] = {}
    params["student"]["model"] = "smollm2_135m"
    params["experiments"]["scaling_students"] = []  # it was the scaling student; params must stay valid
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "metrics/eval/zero_shot").mkdir(parents=True)
    (tmp_path / "metrics/eval/zero_shot/gsm8k.json").write_text(json.dumps({"student_parameters": 134_515_008}))
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    s = tool.setup_sentence()
    assert "7 discussions (MAGs) per task with 3 rounds" in s
    assert "the student SmolLM2-135M-Instruct, 135 M parameters" in s
    assert "3 epochs at learning rate 0.0001" in s
    assert "qwen15 (Qwen2.5-Coder-1.5B-Instruct)" in s
    params["data"]["n_train_by_task"] = {params["experiments"]["tasks"][0]: 9}
    params["experiments"]["task_train"] = {params["experiments"]["tasks"][0]: {"lr": 3e-4, "weights": {"graph": 0.1}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    tasks = params["experiments"]["tasks"]
    t0, t1 = tasks[:2]
    s = tool.setup_sentence()
    sizes = ", ".join(f"{9 if t == t0 else 7} on {t}" for t in tasks)
    assert f"discussions (MAGs) per task: {sizes}, with 3 rounds" in s
    assert f"3 epochs at learning rate 0.0003 on {t0}, 0.0001 on {t1}" in s
    w = params["train"]["weights"]
    plain = f"{w['ntp']:g}/{w['contrastive']:g}/{w['graph']:g}"
    weights = ", ".join(f"{w['ntp']:g}/{w['contrastive']:g}/0.1 on {t}" if t == t0 else f"{plain} on {t}" for t in tasks)
    assert f"MAGDi loss weights ntp/contrastive/graph {weights}." in s
    params["teachers"]["max_rounds_by_task"] = {t1: 3}  # a task with the paper's rounds: said per task
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rounds = ", ".join(f"{4 if t == t1 else 3} on {t}" for t in tasks)
    assert f"with rounds per task (at most): {rounds};" in tool.setup_sentence()


def test_a_pair_answering_two_questions_is_listed_once() -> None:
    """With one SiT student, "vs each SiT" and "vs the best SiT" are one comparison: one line, both labels."""
    ur = _tool()
    row = {"task": "svamp", "method_a": "magdi", "method_b": "sit_x", "acc_a": "46.0", "acc_b": "50.5",
           "diff": "-4.5", "ci_low": "-10.5", "ci_high": "1.5", "p_mcnemar": "0.04"}
    rows = [{**row, "comparison": "MAGDi vs single-teacher student"},
            {**row, "comparison": "MAGDi vs best SiT student"},
            {**row, "method_b": "zero_shot", "comparison": "MAGDi vs zero-shot", "p_mcnemar": "0.5"}]
    lines = ur.significance_lines(rows)
    assert len(lines) == 2
    assert "(MAGDi vs single-teacher student; MAGDi vs best SiT student)" in lines[0]
    assert ur.summary(rows).startswith("1 of 2 comparisons")


def test_decoding_noise_sentence_from_the_benchmark_json(tmp_path) -> None:
    ur = _tool()
    assert ur.decoding_noise_sentence(tmp_path / "absent.json") == ""
    f = tmp_path / "n.json"
    f.write_text(json.dumps({"task": "svamp", "settings": ["default", "AVX512_CORE_BF16"], "methods": {
        "magdi": {"default": {"n": 200, "accuracy": 0.45, "outputs_differing": 0, "correctness_flips": 0},
                  "AVX512_CORE_BF16": {"n": 200, "accuracy": 0.435, "outputs_differing": 81,
                                       "correctness_flips": 9}}}}))
    s = ur.decoding_noise_sentence(f)
    assert "magdi 45.0 % with default, 43.5 % with AVX512_CORE_BF16 (81 of 200 answers differ under" in s
    assert "same adapters on the same svamp test questions" in s


def test_decoding_noise_sentence_quotes_the_comparison_under_each_setting(tmp_path) -> None:
    ur = _tool()
    cmp_ = {"method_a": "magdi", "method_b": "sit_qwen15", "by_setting": {
        "default": {"acc_a": 0.43, "acc_b": 0.51, "diff": -0.08, "ci_low": -0.145, "ci_high": -0.015,
                    "p_mcnemar": 0.0328},
        "AVX512_CORE_BF16": {"acc_a": 0.445, "acc_b": 0.5, "diff": -0.055, "ci_low": -0.125, "ci_high": 0.01,
                             "p_mcnemar": 0.161}}}
    f = tmp_path / "n.json"
    f.write_text(json.dumps({"task": "svamp", "settings": ["default", "AVX512_CORE_BF16"], "methods": {},
                             "comparison": cmp_}))
    s = ur.decoding_noise_sentence(f)
    assert ("The comparison magdi vs sit_qwen15 there: -8.0 points [-14.5, -1.5], p = 0.0328 with default; "
            "-5.5 points [-12.5, +1.0], p = 0.161 with AVX512_CORE_BF16.") in s
