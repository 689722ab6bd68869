"""``python -m magdi show-runs``: every run dvc.yaml defines, resolved as its stage resolves it; the README's ``-S``
examples change exactly the runs the README names; params.yaml is the one source of defaults."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from magdi.config import Params
from magdi.runs import changes, expand_stages, load, set_key

ROOT = Path(__file__).resolve().parents[1]


def _runs(edits=None):
    return load(ROOT / "params.yaml", ROOT / "dvc.yaml", edits)[0]


def test_stage_names_are_dvcs_own() -> None:
    """The matrix expansion names every stage as DVC does (compared with DVC's resolution of dvc.yaml)."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        dvc_names = sorted(s.addressing for s in repo.index.stages)
    assert sorted(r.stage for r in _runs()) == dvc_names


def test_runs_resolve_as_their_stage_resolves() -> None:
    runs = {r.stage: r for r in _runs()}
    p = load(ROOT / "params.yaml", ROOT / "dvc.yaml")[1]
    r = runs["train@svamp-magdi"]
    assert (r.kind, r.task, r.method, r.base_method) == ("train", "svamp", "magdi", "magdi")
    assert r.train == p.train_for("magdi", "svamp")[1].model_dump()
    s = runs["train_scaling@svamp-smollm2_135m"]
    assert s.student == "smollm2_135m" and s.train == p.for_student("smollm2_135m").train_for("magdi", "svamp")[1].model_dump()
    assert runs["evaluate@svamp-magdi"].trains == ("train@svamp-magdi",)
    assert runs["evaluate_scaling@svamp-smollm2_135m"].trains == ("train_scaling@svamp-smollm2_135m",)


def test_set_key_follows_dvc_syntax() -> None:
    raw = {"train": {"weights": {"ntp": 1.0}}}
    assert set_key(raw, "train.weights.ntp=0.5")["train"]["weights"]["ntp"] == 0.5
    assert set_key(raw, "params.yaml:train.epochs=2")["train"]["epochs"] == 2
    assert set_key(raw, "experiments.tasks=[gsm8k, svamp]")["experiments"]["tasks"] == ["gsm8k", "svamp"]
    assert raw == {"train": {"weights": {"ntp": 1.0}}}  # not edited in place


def _readme_examples() -> list[tuple[str, set[str]]]:
    """The table of `-S` edits in the README's "Changing things": (edit, the training runs it says change)."""
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `([^`]+=[^`]+)` \| (.+) \|$", text, re.M)
    assert len(rows) >= 3, "the README's table of -S examples is missing"
    return [(edit, set(re.findall(r"`([a-z_]+@[^`]+)`", named))) for edit, named in rows]


@pytest.mark.parametrize(("edit", "patterns"), _readme_examples())
def test_readme_examples_change_the_runs_they_name(edit: str, patterns: set[str]) -> None:
    runs = _runs()
    diff = changes(runs, _runs([edit]))
    changed_training = {s for s in diff if s.startswith("train")}
    named = set()
    for pat in patterns:  # the README may write `train@gsm8k-*` for every run of a kind on a task
        hits = {r.stage for r in runs if fnmatch.fnmatchcase(r.stage, pat)}
        assert hits, f"{pat} names no run"
        named |= hits
    assert changed_training == named, edit
    for s in named:  # and each evaluation of a retrained run follows it
        ev = s.replace("train", "evaluate", 1)
        assert ev in diff and diff[ev] == [f"retrained: {s}"]


def test_every_command_example_in_the_readme_is_valid() -> None:
    """Every `-S` edit anywhere in the README resolves (a typo'd key would fail validation)."""
    for edit in re.findall(r"-S ([\w.:]+=\S+)", (ROOT / "README.md").read_text()):
        assert changes(_runs(), _runs([edit.strip("`")])), edit


def test_show_runs_cli_json(capsys) -> None:
    from magdi.__main__ import main

    assert main(["show-runs", "--json", "--params", str(ROOT / "params.yaml"), "--dvc", str(ROOT / "dvc.yaml")]) == 0
    out = json.loads(capsys.readouterr().out)
    row = next(r for r in out if r["stage"] == "train@gsm8k-magdi")
    assert (row["task"], row["method"], row["train"]["lr"], row["train"]["weights"]["contrastive"]) == \
        ("gsm8k", "magdi", 1e-4, 0.1)
    assert main(["show-runs", "-S", "train.lrr=1", "--params", str(ROOT / "params.yaml"),
                 "--dvc", str(ROOT / "dvc.yaml")]) == 2  # a typo: one-line error naming the key
    assert "train.lrr: unknown key" in capsys.readouterr().err


def test_expand_stages_by_hand() -> None:
    dvc = {"stages": {"a": {"cmd": "x"}, "t": {"matrix": {"task": "${ex.tasks}", "m": "${ex.abl}"},
                                               "cmd": "run --task ${item.task} --method ${item.m}"}}}
    raw = {"ex": {"tasks": ["g", "s"], "abl": {"u": {}, "f": {}}}}
    assert expand_stages(dvc, raw) == [("a", "x"), ("t@g-u", "run --task g --method u"), ("t@g-f", "run --task g --method f"),
                                       ("t@s-u", "run --task s --method u"), ("t@s-f", "run --task s --method f")]


# ----------------------------------------------------------------------------- one source of defaults
def _walk(model: type[BaseModel], data: dict, prefix: str, missing: list, differ: list) -> None:
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = f.annotation if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) else None
        if name not in data:
            missing.append(key)
            continue
        if sub is not None and isinstance(data[name], dict):
            _walk(sub, data[name], key + ".", missing, differ)
            continue
        if f.default is PydanticUndefined and f.default_factory is None:
            continue  # required: params.yaml is its only home
        default = f.default_factory() if f.default_factory else f.default
        default = default.model_dump() if isinstance(default, BaseModel) else default
        if default != data[name]:
            differ.append(f"{key}: config.py {default!r} vs params.yaml {data[name]!r}")


def test_params_yaml_is_the_one_source_of_defaults() -> None:
    """Every setting appears in params.yaml, and config.py's default (where it keeps one) is the file's value."""
    missing: list[str] = []
    differ: list[str] = []
    _walk(Params, yaml.safe_load((ROOT / "params.yaml").read_text()), "", missing, differ)
    assert not missing, f"settings missing from params.yaml: {missing}"
    assert not differ, differ


def test_no_train_setting_is_ignored_by_every_run() -> None:
    """Each key of `train` in params.yaml reaches some training run with the value the file gives."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    runs = [r for r in _runs() if r.kind == "train"]
    for key, value in raw["train"].items():
        assert any(r.train[key] == value for r in runs), f"train.{key}: {value!r} reaches no run"
