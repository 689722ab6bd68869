"""Helpers of the `make repro` profile and the lock tool that decide what a report or a committed file says:
whether a run's log shows the warm server (the profile and the README block word their start-up costs by it),
and which dvc.lock entries belong to stages the pipeline no longer defines."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the scripts import their sibling `peak`
    return load_script(f"benchmarks/{name}.py", name)


def _log(tmp_path: Path, *lines: str) -> Path:
    f = tmp_path / "repro.log"
    f.write_text("".join(f"[1700000000.{i:03d}] {line}\n" for i, line in enumerate(lines)))
    return f


def test_warm_server_use_reads_the_mode_from_the_make_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use = _module("profile_repro", monkeypatch).warm_server_use
    stage = "Running stage 'train@svamp-magdi':"
    cold = _log(tmp_path, " .venv/bin/dvc repro", stage)
    assert use(cold) == (False, 0)
    warm = [".venv/bin/python -m magdi.warm run -- .venv/bin/dvc repro", stage]
    assert use(_log(tmp_path, *warm)) == (True, 0)
    declined = "magdi.warm: the server declined (magdi module changed on disk); running in-process"
    assert use(_log(tmp_path, *warm, declined, stage, declined)) == (True, 2)
    # WARM=1 whose server never came up: every stage was an ordinary process
    assert use(_log(tmp_path, *warm[:1], "magdi.warm: the server did not start; stages run as ordinary processes",
                    stage)) == (False, 0)
    # a stage's own output naming the module is not the recipe line
    assert use(_log(tmp_path, " .venv/bin/dvc repro", "see python -m magdi.warm run --help")) == (False, 0)


def test_prune_lock_keeps_only_stages_the_pipeline_defines() -> None:
    stale_entries = load_script("tools/prune_lock.py", "prune_lock").stale_entries
    lock = {"download": {}, "train@ecqa-magdi": {}, "train@gsm8k-magdi": {}, "train_mt": {}, "report": {}}
    defined = ["download", "train@gsm8k-magdi", "report", "evaluate@gsm8k-magdi"]  # not run yet: no entry
    assert stale_entries(lock, defined) == ["train@ecqa-magdi", "train_mt"]  # in lock order
    assert stale_entries(lock, lock) == []
    assert stale_entries({}, defined) == []
