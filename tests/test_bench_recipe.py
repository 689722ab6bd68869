"""The validation sweep's grid (benchmarks/bench_recipe.py --set): every combination, first value first, as
nested ``train`` overrides that the config validates like any other override."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    return load_script("benchmarks/bench_recipe.py", "bench_recipe")


def test_grid_is_every_combination_in_written_order() -> None:
    b = _bench()
    grid = b.parse_grid(["node_repr=live,frozen", "weights.graph=1.0,0.1"])
    assert grid == [
        {"node_repr": "live", "weights": {"graph": 1.0}},
        {"node_repr": "live", "weights": {"graph": 0.1}},
        {"node_repr": "frozen", "weights": {"graph": 1.0}},
        {"node_repr": "frozen", "weights": {"graph": 0.1}},
    ]
    assert [b.grid_label(g) for g in grid][1] == "node_repr=live weights.graph=0.1"
    assert b.parse_grid([]) == [{}] and b.grid_label({}) == ""


def test_grid_values_are_yaml_scalars_never_evaluated() -> None:
    b = _bench()
    assert b.parse_grid(["bf16=false", "seed=2", "weights.contrastive=1e-2"]) == [
        {"bf16": False, "seed": 2, "weights": {"contrastive": 0.01}}]
    assert b.parse_grid(["graph=__import__('os')"]) == [{"graph": "__import__('os')"}]  # a string, not code
    with pytest.raises(SystemExit, match="KEY=V1"):
        b.parse_grid(["node_repr"])


def test_grid_overrides_are_validated_as_train_keys() -> None:
    from magdi.config import load_params

    p = load_params(ROOT / "params.yaml")
    b = _bench()
    ok = p.train_with(b.parse_grid(["weights.graph=0.1"])[0], "--set")
    assert ok.weights.graph == 0.1 and ok.weights.contrastive == p.train.weights.contrastive  # deep merge
    with pytest.raises(ValueError, match="--set.*node_repr"):
        p.train_with(b.parse_grid(["node_repr=sideways"])[0], "--set")


def test_explicit_candidates_one_value_per_key() -> None:
    b = _bench()
    assert b.parse_candidates(["weights.graph=1.0 weights.contrastive=0.1", "weights.graph=0.1 node_repr=frozen"]) == [
        {"weights": {"graph": 1.0, "contrastive": 0.1}},
        {"weights": {"graph": 0.1}, "node_repr": "frozen"},
    ]
    assert b.grid_label(b.parse_candidates(["weights.graph=0.1 weights.contrastive=0.01"])[0]) == \
        "weights.graph=0.1 weights.contrastive=0.01"
    with pytest.raises(SystemExit, match="one value per key"):
        b.parse_candidates(["weights.graph=1.0,0.1"])


def test_candidate_keeps_the_task_recipe_under_its_overrides(tmp_path: Path) -> None:
    """A candidate is the train stage's config for its method and task with the overrides deep-merged on top:
    setting one weight keeps the task's other weights and lr (not the bare ``train`` section's)."""
    from magdi.config import load_params

    b = _bench()
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["experiments"]["task_train"] = {"svamp": {"lr": 3e-4, "weights": {"contrastive": 0.01, "graph": 0.1}},
                                        "gsm8k": {}, "arc_challenge": {}}  # every trained task has an entry (`{}`: plain `train`)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    p = load_params(tmp_path / "params.yaml")
    base, cfg = b.candidate_cfg(p, "svamp", "magdi", b.parse_grid(["weights.graph=0.5"])[0])
    assert base == "magdi" and (cfg.lr, cfg.weights.contrastive, cfg.weights.graph) == (3e-4, 0.01, 0.5)
    base, cfg = b.candidate_cfg(p, "svamp", "magdi_frozen", {})
    assert base == "magdi" and cfg.node_repr == "frozen" and cfg.weights.graph == 0.1
    with pytest.raises(SystemExit, match="own flags"):
        b.parse_grid(["epochs=1,2"])
