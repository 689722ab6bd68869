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
    monkeypatch.setattr("magdi.pipeline.mags.make_agents", lambda *_: pytest.fail("no teacher may be built"))
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


MIRROR = (ROOT / ".." / "shared" / "data").resolve()


def _official_record(question: str, gold: str, answers: list[str], **extra) -> dict:
    rec = {"question": question, "gold_answer": gold, **extra}
    for agent, ans in zip(("claude", "gpt4", "bard"), answers, strict=True):
        rec[f"{agent}_output_0"] = {"reasoning": f"{agent} thinks it through.", "answer": ans, "confidence_level": 0.8}
    return rec


@pytest.mark.skipif(not (MIRROR / "arc_challenge").is_dir(), reason="needs the benchmark mirror (../shared/data)")
def test_ecqa_and_arc_imports_train_on_the_evaluation_prompt_and_letters(tmp_path: Path, monkeypatch,
                                                                         tiny_tokenizer) -> None:
    """The release's key scheme, file -> build_mags -> training items -> the prompt the evaluation builds: ECQA
    with option numbers (options written into the question, or as ReConcile's separate ``options`` list), ARC with
    no options at all (recovered from the mirrored benchmark by question text); answers become letters."""
    from magdi.data import load_benchmark
    from magdi.student import student_prompt

    arc_row = load_benchmark("arc_challenge", "mirror", MIRROR)[0]["train"][0]  # a real ARC question
    stem = arc_row["question"]
    release = {
        "ecqa": [_official_record("Where do fish live? 1. tree 2. sea 3. shop 4. car 5. desk", "2", ["2", "3", "2"]),
                 _official_record("What do you sit on?", "1", ["1", "1", "4"],
                                  options=["chair", "sky", "rain", "noise", "idea"])],
        "arc_challenge": [_official_record(stem, arc_row["answer"], [arc_row["answer"], "B", arc_row["answer"]])],
    }
    for task, records in release.items():
        f = tmp_path / f"{task}.json"
        f.write_text(json.dumps(records))
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        raw["paths"].update(mags_dir=str(tmp_path / "mags"), mirror_dir=str(MIRROR))
        raw["data"]["n_train"] = 2
        raw["experiments"].update(tasks=[task], methods=["sit_claude", "magdi"], scaling_students=[],
                                  scaling_tasks=[])
        raw["teachers"].update(source="official", official_files={task: str(f)})
        p = parse_params(raw)
        monkeypatch.chdir(tmp_path)
        stage_build_mags(p, task)
        mags = read_mags(mags_file(p, task))
        items = build_items(mags, method_spec("sit_claude"), tiny_tokenizer)
        for m, it in zip(mags, items, strict=True):
            assert m.choices and len(m.choices) >= 3, task
            # the training prompt is the evaluation's prompt for the same question
            assert it.prompt == student_prompt(tiny_tokenizer, {"question": m.question, "choices": m.choices},
                                               "choice")
            assert all(t.endswith(f"The answer is {m.gold}.") for t in it.targets)  # letters, as evaluated
        if task == "ecqa":
            assert [(m.question, m.gold) for m in mags] == [("Where do fish live?", "B"), ("What do you sit on?", "A")]
            assert mags[1].choices == ["chair", "sky", "rain", "noise", "idea"]
        else:
            assert (mags[0].question, mags[0].choices) == (arc_row["question"], arc_row["choices"])
            assert items[0].prompt == student_prompt(tiny_tokenizer, arc_row, "choice")  # the evaluation's prompt
