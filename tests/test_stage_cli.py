"""Stage CLIs reject an unknown ``--task``/``--method`` in one line naming the valid choices, before any
model is loaded (no traceback, no model-hub access)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from magdi.config import ConfigError, check_run, parse_params

ROOT = Path(__file__).resolve().parents[1]


def _raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize(
    ("argv", "needle"),
    [(["stages/train.py", "--task", "gsm9k", "--method", "magdi"], "--task 'gsm9k'"),
     (["stages/train.py", "--task", "gsm8k", "--method", "magdi_xl"], "--method 'magdi_xl'"),
     (["stages/evaluate.py", "--task", "gsm8k", "--method", "nope"], "--method 'nope'"),
     (["stages/build_mags.py", "--task", "mmlu"], "--task 'mmlu'"),
     (["stages/train.py", "--task", "gsm8k", "--method", "magdi", "--student", "gpt9"], "--student 'gpt9'"),
     (["stages/evaluate.py", "--zero-shot", "--student", "gpt9"], "--student 'gpt9'")],
)
def test_stage_cli_rejects_unknown_choices_in_one_line(tmp_path: Path, argv: list[str], needle: str) -> None:
    raw = _raw()
    raw["paths"]["mirror_dir"] = str(tmp_path)  # exists; no benchmark folder in it, so nothing to check
    raw["paths"]["student_dir"] = str(tmp_path / "no_student")  # loading a model would fail loudly
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, *argv, "--params", str(params)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert ("valid:" in lines[0] or "scaling_students" in lines[0]) and "Traceback" not in res.stderr


def test_check_run_accepts_what_params_can_resolve() -> None:
    raw = _raw()  # the real params file, with agents and ablations fixed here so the test reads on its own
    raw["teachers"]["agents"] = [{"name": "smol_careful", "backend": "local", "model": "student"},
                                 {"name": "reference", "backend": "reference"}]
    raw["data"]["benchmarks"] = ["strategyqa", "ecqa", "arc_challenge", "gsm8k", "math", "boolq", "svamp"]
    raw["experiments"].update(methods=["magdi"], ablations={"magdi_frozen": {"node_repr": "frozen"}})
    p = parse_params(raw)
    for task, method in [("gsm8k", "magdi"), ("gsm8k", "sit_reference"), ("strategyqa", "magdi_frozen"),
                         ("strategyqa", "scale_4"), ("multitask", "magdi_mt"), ("ecqa", "dss_mt")]:
        check_run(p, task, method)
    check_run(p, "gsm8k", "zero_shot", evaluate=True)
    check_run(p, "gsm8k")
    with pytest.raises(ConfigError, match="valid: .*magdi_an.*sit_smol_careful.*magdi_frozen"):
        check_run(p, "gsm8k", "zero_shot")  # nothing to train
    with pytest.raises(ConfigError, match="valid: strategyqa, ecqa"):
        check_run(p, "gsm9k", "magdi")
    with pytest.raises(ConfigError, match="goes with"):
        check_run(p, "multitask", "magdi")


# ----------------------------------------------------------------------------- student scaling params


def _scaling(students: list[str], tasks: list[str]) -> dict:
    raw = _raw()
    raw["student"]["model"] = "smollm2_135m"  # whatever the default's main student is
    raw["experiments"].update(scaling_students=students, scaling_tasks=tasks, scaling_train={})
    return raw


def test_scaling_student_params_resolve_to_their_own_folder_and_run_names() -> None:
    from magdi.pipeline import eval_train_task, for_run, method_of, run_name

    task = _raw()["experiments"]["tasks"][0]
    p = parse_params(_scaling(["qwen_coder_0_5b"], [task]))
    q = p.for_student("qwen_coder_0_5b")
    assert (q.student.model, q.paths.student_dir) == ("qwen_coder_0_5b", "models/students/qwen_coder_0_5b")
    assert (p.student.model, p.paths.student_dir) == ("smollm2_135m", "models/student")  # unchanged
    assert q.train == p.train and q.evaluate == p.evaluate  # same recipe as the main student (no scaling_train)
    raw = _scaling(["qwen_coder_0_5b"], [task])
    raw["train"]["bf16"] = False
    raw["experiments"]["scaling_train"] = {"bf16": True}
    p2 = parse_params(raw)
    assert p2.for_student("qwen_coder_0_5b").train.bf16 and not p2.train.bf16  # only the scaling runs
    assert p2.for_student("qwen_coder_0_5b").train.lr == p2.train.lr
    assert p.for_student(None) is p
    assert "qwen_coder_0_5b" in p.packaged_models_used()
    assert (run_name("magdi"), run_name("magdi", "qwen_coder_0_5b")) == ("magdi", "magdi@qwen_coder_0_5b")
    assert eval_train_task("zero_shot@qwen_coder_0_5b", task) == "base"
    assert eval_train_task("magdi@qwen_coder_0_5b", task) == task
    assert (method_of("magdi@qwen_coder_0_5b"), method_of("sit_qwen15")) == ("magdi", "sit_qwen15")
    q2, run = for_run(p, "magdi", "qwen_coder_0_5b")
    assert (q2.paths.student_dir, run) == (q.paths.student_dir, "magdi@qwen_coder_0_5b")
    assert for_run(p, "magdi", None) == (p, "magdi")
    with pytest.raises(ConfigError, match="--student 'gpt9' is not in experiments.scaling_students"):
        p.for_student("gpt9")


@pytest.mark.parametrize(
    ("students", "tasks", "needle"),
    [(["qwen_coder_0_5b"], ["math"], "experiments.scaling_tasks.0: 'math' is not in experiments.tasks"),
     (["qwen_coder_0_5b"], [], "experiments.scaling_tasks: empty"),
     (["smollm2_135m"], ["gsm8k"], "experiments.scaling_students.0: 'smollm2_135m' is the main student"),
     (["meta-llama/Llama-2-7b-chat-hf"], ["gsm8k"], "experiments.scaling_students.0: 'meta-llama/Llama-2-7b"),
     (["a", "a"], ["gsm8k"], "experiments.scaling_students: listed twice"),
     (["a"], ["gsm8k"], "experiments.scaling_train.lr: Input should be greater than 0")],
)
def test_scaling_params_errors_name_the_key(students: list[str], tasks: list[str], needle: str) -> None:
    raw = _scaling(students, tasks)
    if "scaling_train" in needle:
        raw["experiments"]["scaling_train"] = {"lr": -1}
    raw["experiments"]["tasks"] = ["gsm8k", "svamp"]
    raw["student"]["model"] = "smollm2_135m"
    with pytest.raises(ConfigError) as e:
        parse_params(raw)
    assert needle in str(e.value)


@pytest.mark.parametrize(
    ("over", "needle"),
    [({"lr": 0}, "experiments.ablations.bad.lr: Input should be greater than 0"),
     ({"lrr": 1e-4}, "experiments.ablations.bad.lrr: unknown key (typo?)"),
     ({"method": "magdi", "epochs": "many"}, "experiments.ablations.bad.epochs: Input should be a valid integer")],
)
def test_ablation_errors_name_the_overriding_key(over: dict, needle: str) -> None:
    raw = _raw()
    raw["experiments"]["ablations"] = {"bad": over}
    with pytest.raises(ConfigError) as e:
        parse_params(raw)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_train_overrides_resolve_through_one_rule() -> None:
    raw = _raw()
    raw["experiments"]["ablations"] = {"short": {"method": "magdi", "epochs": 7}}
    p = parse_params(raw)
    base, cfg = p.train_for("short")
    assert (base, cfg.epochs, cfg.lr) == ("magdi", 7, p.train.lr)
    assert p.train_for("scale_3")[1].max_mags == 3 and p.train_for("scale_3")[0] == "magdi"
    assert p.train_for("magdi") == ("magdi", p.train)


def test_nested_train_overrides_keep_the_other_nested_values() -> None:
    """An ablation that changes one loss weight keeps the others of `train.weights`, not the class defaults."""
    raw = _scaling(["qwen_coder_0_5b"], [_raw()["experiments"]["tasks"][0]])
    raw["train"]["weights"] = {"ntp": 2.0, "contrastive": 0.3, "graph": 1.0}
    raw["experiments"]["ablations"] = {"no_graph": {"weights": {"graph": 0.0}}}
    raw["experiments"]["scaling_train"] = {"weights": {"ntp": 0.5}}
    p = parse_params(raw)
    w = p.train_for("no_graph")[1].weights
    assert (w.ntp, w.contrastive, w.graph) == (2.0, 0.3, 0.0)
    s = p.for_student("qwen_coder_0_5b").train.weights
    assert (s.ntp, s.contrastive, s.graph) == (0.5, 0.3, 1.0)
    assert p.train.weights.graph == 1.0  # the base recipe is untouched


def test_override_error_counts_the_other_errors() -> None:
    raw = _raw()
    raw["experiments"]["ablations"] = {"bad": {"lr": 0, "epochs": 0}}
    with pytest.raises(ConfigError, match=r"experiments\.ablations\.bad\.\w+: .* \(\+1 more\)"):
        parse_params(raw)


def test_answer_limit_per_task_overrides_the_default() -> None:
    raw = _raw()
    raw["evaluate"]["max_new_tokens"] = 300
    raw["evaluate"]["max_new_tokens_by_task"] = {"gsm8k": 450}
    e = parse_params(raw).evaluate
    assert (e.limit("gsm8k"), e.limit("svamp")) == (450, 300)
    raw["evaluate"]["max_new_tokens_by_task"] = {"gsm9k": 450}
    with pytest.raises(ConfigError, match=r"evaluate\.max_new_tokens_by_task: .*unknown task\(s\) \['gsm9k'\]"):
        parse_params(raw)
    raw["evaluate"]["max_new_tokens_by_task"] = {"gsm8k": 0}
    with pytest.raises(ConfigError, match=r"evaluate\.max_new_tokens_by_task: .*>= 1"):
        parse_params(raw)


def test_mag_count_per_task_overrides_the_default() -> None:
    raw = _raw()
    raw["data"].update(n_train=64, n_train_by_task={"gsm8k": 100})
    d = parse_params(raw).data
    assert (d.train_size("gsm8k"), d.train_size("svamp")) == (100, 64)
    raw["data"]["n_train_by_task"] = {"gsm9k": 100}
    with pytest.raises(ConfigError, match=r"data\.n_train_by_task: .*unknown task\(s\) \['gsm9k'\]"):
        parse_params(raw)
    raw["data"]["n_train_by_task"] = {"gsm8k": 0}
    with pytest.raises(ConfigError, match=r"data\.n_train_by_task: .*>= 1"):
        parse_params(raw)


def test_task_recipe_applies_under_the_ablation_and_over_the_scaling_recipe() -> None:
    """train -> scaling_train (scaling student) -> task_train[task] -> the ablation's own overrides."""
    task = _raw()["experiments"]["tasks"][0]
    raw = _scaling(["qwen_coder_0_5b"], [task])
    raw["train"].update(lr=1e-3, epochs=1)
    raw["experiments"]["task_train"] = {task: {"lr": 3e-4, "weights": {"graph": 0.5}}}
    raw["experiments"]["scaling_train"] = {"bf16": False, "lr": 5e-4}
    raw["experiments"]["ablations"] = {"long": {"epochs": 3}, "fast": {"lr": 2e-3}}
    p = parse_params(raw)
    other = next(t for t in ("gsm8k", "svamp") if t != task)
    assert p.train_for("magdi", other) == ("magdi", p.train)  # no entry: the plain recipe
    assert p.train_for("magdi") == ("magdi", p.train)
    cfg = p.train_for("sit_qwen15", task)[1]
    assert (cfg.lr, cfg.epochs, cfg.weights.graph, cfg.weights.ntp) == (3e-4, 1, 0.5, p.train.weights.ntp)
    assert p.train_for("long", task)[1].lr == 3e-4 and p.train_for("long", task)[1].epochs == 3
    assert p.train_for("fast", task)[1].lr == 2e-3  # the ablation's own key wins
    assert p.train_for("scale_5", task)[1].lr == 3e-4
    s = p.for_student("qwen_coder_0_5b")
    assert (s.train_for("magdi", task)[1].lr, s.train_for("magdi", task)[1].bf16) == (3e-4, False)
    assert s.train_for("magdi", other)[1].lr == 5e-4


def test_magdi_setup_states_each_tasks_mags_and_recipe() -> None:
    """What the reports and the README state per task: its own MAG count and its own lr, the rest the defaults."""
    raw = _raw()
    task, *rest = raw["experiments"]["tasks"]
    raw["data"]["n_train_by_task"] = {task: 7}
    raw["experiments"]["task_train"] = {task: {"lr": 3e-4}}
    p = parse_params(raw)
    setup = p.magdi_setup()
    assert list(setup) == raw["experiments"]["tasks"]
    assert (setup[task][0], setup[task][1].lr, setup[task][1].epochs) == (7, 3e-4, p.train.epochs)
    for t in rest:
        assert setup[t] == (p.data.n_train, p.train)


@pytest.mark.parametrize(("over", "needle"), [
    ({"gsm9k": {"lr": 1e-4}}, r"experiments\.task_train: .*unknown task\(s\) \['gsm9k'\]"),
    ({"gsm8k": {"lr": -1}}, r"experiments\.task_train\.gsm8k\.lr: Input should be greater than 0"),
    ({"gsm8k": {"learning_rate": 1e-4}}, r"experiments\.task_train\.gsm8k\.learning_rate: unknown key"),
])
def test_task_recipe_errors_name_the_key(over: dict, needle: str) -> None:
    raw = _raw()
    raw["experiments"]["task_train"] = over
    with pytest.raises(ConfigError, match=needle):
        parse_params(raw)


def test_evaluation_decodes_and_counts_truncation_at_the_tasks_own_limit(tmp_path: Path, monkeypatch) -> None:
    import magdi.evaluate
    from magdi.pipeline import evaluation as pipeline

    raw = _raw()
    raw["evaluate"].update(max_new_tokens=300, max_new_tokens_by_task={"gsm8k": 450})
    p = parse_params(raw)
    decoded, counted = {}, []
    monkeypatch.setattr(pipeline, "load_examples", lambda p, task, split: [])

    def fake_evaluate(gen, tok, examples, task, answer_type, batch_size, limit, *a, **k):
        decoded[task] = limit
        return []

    monkeypatch.setattr(magdi.evaluate, "evaluate_examples", fake_evaluate)
    monkeypatch.setattr(magdi.evaluate, "summarise", lambda preds, samples, seed, limit: counted.append(limit) or {})
    for task in ("gsm8k", "svamp"):
        res = pipeline._eval_one(p, None, None, task, tmp_path / task, "")
        assert res["max_new_tokens"] == {"gsm8k": 450, "svamp": 300}[task]
    assert decoded == {"gsm8k": 450, "svamp": 300} and counted == [450, 300]


def test_teachers_earlier_limits_validated() -> None:
    raw = _raw()
    raw["teachers"]["earlier_limits"] = [384, 64]
    assert parse_params(raw).teachers.earlier_limits == [384, 64]
    raw["teachers"]["earlier_limits"] = [0]
    with pytest.raises(ConfigError, match="teachers.earlier_limits"):
        parse_params(raw)


def test_max_rounds_by_task() -> None:
    from magdi.config import TeachersCfg

    raw = {"agents": [{"name": "a", "backend": "reference"}, {"name": "b", "backend": "reference"}],
           "earlier_limits": [], "max_rounds": 1, "max_rounds_by_task": {"arc_challenge": 3}}
    t = TeachersCfg(**raw)
    assert (t.rounds("arc_challenge"), t.rounds("gsm8k")) == (3, 1)
    with pytest.raises(ValueError, match="unknown task"):
        TeachersCfg(**{**raw, "max_rounds_by_task": {"arc": 3}})
    with pytest.raises(ValueError, match="rounds must be in 0..10"):
        TeachersCfg(**{**raw, "max_rounds_by_task": {"gsm8k": 11}})
