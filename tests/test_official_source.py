"""``teachers.source: official``: the build_mags stage imports the authors' MAG release instead of
running a discussion, and every method can train on the imported MAGs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from magdi.config import ConfigError, parse_params
from magdi.mag import read_mags
from magdi.pipeline import mags_file, stage_build_mags
from magdi.train import build_items, method_spec

ROOT = Path(__file__).resolve().parents[1]

# two ECQA questions in the release format (agents claude, gpt4, bard; answers are option numbers)
RELEASE = [
    {"question": "Where do fish live? 1. tree 2. sea 3. shop 4. car 5. desk", "gold_answer": "2",
     "claude_output_0": {"reasoning": "Fish swim in the sea.", "answer": "2", "confidence_level": 0.9},
     "gpt4_output_0": {"reasoning": "Shops sell fish.", "answer": "3", "confidence_level": 0.7},
     "bard_output_0": {"reasoning": "The sea.", "answer": "2", "confidence_level": 0.95},
     "claude_output_1": {"reasoning": "I agree with bard. The sea", "answer": "2", "confidence_level": 1.0},
     "gpt4_output_1": {"reasoning": "I disagree with claude. A shop", "answer": "3", "confidence_level": 0.9},
     "bard_output_1": {"reasoning": "Sea", "answer": "2", "confidence_level": 0.9},
     "claude_output_2": "None", "gpt4_output_2": "None", "bard_output_2": "None"},
    {"question": "What do you sit on? 1. chair 2. sky 3. rain 4. noise 5. idea", "gold_answer": "1",
     "claude_output_0": {"reasoning": "A chair.", "answer": "1", "confidence_level": 0.9},
     "gpt4_output_0": {"reasoning": "Chairs are for sitting.", "answer": "1", "confidence_level": 0.9},
     "bard_output_0": {"reasoning": "chair", "answer": "1", "confidence_level": 0.9}},
    {"question": "not imported: beyond data.n_train", "gold_answer": "1"},
]


def _params(tmp_path: Path, **teachers):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"]["mags_dir"] = str(tmp_path / "mags")
    raw["data"]["n_train"] = 2
    raw["experiments"]["tasks"] = ["ecqa"]
    raw["experiments"].update(scaling_students=[], scaling_tasks=[])  # the default's scaling task is not ecqa
    raw["experiments"]["methods"] = ["sit_claude", "dss_mt", "magdi_r0", "magdi_cn", "magdi_an", "magdi"]
    raw["teachers"].update(teachers)
    return parse_params(raw)


def test_build_mags_imports_the_official_release(tmp_path: Path, monkeypatch, tiny_tokenizer) -> None:
    release = tmp_path / "ECQA_1000.json"
    release.write_text(json.dumps(RELEASE))
    p = _params(tmp_path, source="official", official_files={"ecqa": str(release)}, clean_agreement=True)
    monkeypatch.chdir(tmp_path)  # the stage writes metrics/mags/<task>.json
    monkeypatch.setattr("magdi.pipeline.make_agents", lambda *_: pytest.fail("no teacher may be built"))
    stats = stage_build_mags(p, "ecqa")
    mags = read_mags(mags_file(p, "ecqa"))
    assert [m.gold for m in mags] == ["B", "A"]
    assert stats["n_mags"] == 2 and stats["positive_nodes"] == 7 and stats["negative_nodes"] == 2
    assert stats["team_accuracy"] == 1.0
    assert stats["graph_types"]["G1"] == 1 and stats["graph_types"]["G0"] == 1
    assert json.loads((tmp_path / "metrics" / "mags" / "ecqa.json").read_text()) == stats
    assert [n.reasoning for n in mags[0].nodes if n.round == 1] == ["Sea", "The sea", "A shop"]
    for method in p.experiments.methods:  # every method has something to train on
        assert build_items(mags, method_spec(method), tiny_tokenizer), method


def test_official_source_needs_a_file_per_task(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="official_files.*ecqa"):
        _params(tmp_path, source="official", official_files={})
    with pytest.raises(ConfigError, match="sit_claude"):  # with discussions, sit_ must name an agent
        _params(tmp_path)
