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
     (["stages/build_mags.py", "--task", "mmlu"], "--task 'mmlu'")],
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
    assert "valid:" in lines[0] and "Traceback" not in res.stderr


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
