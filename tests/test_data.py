"""Benchmark loading: counts and hand-checked first rows against the read-only mirror, plus synthetic
broken mirrors for the error paths. Expected rows were written by reading the raw files, not by running
the loader."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from magdi.data import (
    HUB_SOURCES,
    MIRROR_FILES,
    SCHEMA_KEYS,
    TASKS,
    HubUnavailable,
    LoadReport,
    MirrorFileMissing,
    MissingBenchmark,
    canonical_number,
    last_boxed,
    load_benchmark,
    prepare_all,
    read_jsonl,
    sample_splits,
    write_jsonl,
)

MIRROR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_mirror = pytest.mark.skipif(not (MIRROR / "SOURCES.md").is_file(), reason=f"no data mirror at {MIRROR}")

#: (train pool, test pool) sizes from SOURCES.md; ECQA's single test CSV (2194) is carved in half.
EXPECTED_COUNTS = {
    "strategyqa": (2061, 229),
    "ecqa": (1097, 1097),
    "arc_challenge": (1119 + 299, 1172),
    "gsm8k": (7473, 1319),
    "boolq": (0, 3270),
    "svamp": (500, 500),  # carved into disjoint train/test pools (CARVE_TRAIN_FROM_TEST)
}

_CACHE: dict[str, tuple[dict[str, list[dict]], LoadReport]] = {}


def _mirror(task: str) -> tuple[dict[str, list[dict]], LoadReport]:
    if task not in _CACHE:
        _CACHE[task] = load_benchmark(task, "mirror", MIRROR)
    return _CACHE[task]


def _by_id(rows: list[dict], id_: str) -> dict:
    return next(r for r in rows if r["id"] == id_)


# ------------------------------------------------------------------------------------------------ mirror


@needs_mirror
@pytest.mark.parametrize("task", sorted(EXPECTED_COUNTS))
def test_mirror_counts_and_schema(task: str) -> None:
    pools, report = _mirror(task)
    assert (len(pools["train"]), len(pools["test"])) == EXPECTED_COUNTS[task]
    assert report.n_malformed == 0 and report.n_raw == sum(EXPECTED_COUNTS[task])
    ids = [r["id"] for pool in pools.values() for r in pool]
    assert len(ids) == len(set(ids))
    for row in pools["train"] + pools["test"]:
        assert tuple(row) == SCHEMA_KEYS and row["task"] == task
        assert isinstance(row["question"], str) and row["question"]
        assert isinstance(row["answer"], str) and row["answer"]
        if row["choices"] is not None:
            assert row["answer"] in "ABCDE"[: len(row["choices"])]


@needs_mirror
def test_gsm8k_first_test_row() -> None:
    assert _mirror("gsm8k")[0]["test"][0] == {
        "id": "gsm8k-test-00000",
        "task": "gsm8k",
        "question": "Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
        "muffins for her friends every day with four. She sells the remainder at the farmers' market daily for "
        "$2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?",
        "choices": None,
        "answer": "18",
        "explanation": "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
        "She makes 9 * 2 = $18 every day at the farmer\u2019s market.",
    }


@needs_mirror
def test_gsm8k_commas_removed() -> None:
    # test.jsonl line 3: "... #### 70000" with 130,000 in the working; train has "#### 1,080"-style answers
    train = _mirror("gsm8k")[0]["train"]
    assert all("," not in r["answer"] for r in train)
    assert _mirror("gsm8k")[0]["test"][2]["answer"] == "70000"


@needs_mirror
def test_strategyqa_first_test_row() -> None:
    assert _mirror("strategyqa")[0]["test"][0] == {
        "id": "e0044a7b4d146d611e73",
        "task": "strategyqa",
        "question": "Will the Albany in Georgia reach a hundred thousand occupants before the one in New York?",
        "choices": None,
        "answer": "no",
        "explanation": "Albany, GA has around 75,000 people Albany, NY has almost 100,000 people",
    }
    assert _mirror("strategyqa")[0]["train"][0]["answer"] == "yes"


@needs_mirror
def test_arc_first_test_row_and_numeric_labels() -> None:
    test = _mirror("arc_challenge")[0]["test"]
    assert test[0] == {
        "id": "Mercury_7175875",
        "task": "arc_challenge",
        "question": "An astronomer observes that a planet rotates faster after a meteorite impact. "
        "Which is the most likely effect of this increase in rotation?",
        "choices": [
            "Planetary density will decrease.",
            "Planetary years will become longer.",
            "Planetary days will become shorter.",
            "Planetary gravity will become stronger.",
        ],
        "answer": "C",
        "explanation": None,
    }
    # line 129: labels "1".."4", answerKey "4" -> D
    fungi = _by_id(test, "NYSEDREGENTS_2008_8_11")
    assert fungi["choices"] == ["sunlight", "oxygen", "carbon dioxide", "dead organisms"]
    assert fungi["answer"] == "D"
    assert len(_by_id(test, "TIMSS_1995_8_J7")["choices"]) == 5  # a five-option question


@needs_mirror
def test_ecqa_first_csv_row() -> None:
    pools = _mirror("ecqa")[0]
    first = _by_id(pools["train"] + pools["test"], "26f7c29d5acb341f79610f7c040412a4")
    assert first == {
        "id": "26f7c29d5acb341f79610f7c040412a4",
        "task": "ecqa",
        "question": "What kind of people will someone who is in charge of project look for?",
        "choices": ["greedy", "worry", "have knowledge", "take charge", "boss"],
        "answer": "C",
        "explanation": "Have knowledge means information, understanding or skill that you get from experience "
        "or education.\nSomeone who is in charge of project look for people who have knowledge.",
    }
    # options repeat verbatim ("northern" twice): the first copy's letter is gold
    southern = _by_id(pools["train"] + pools["test"], "38693bc43b019f1e32558f4ca8f0c70a")
    assert southern["answer"] == "B"


@needs_mirror
def test_ecqa_pools_disjoint_and_stable() -> None:
    pools = _mirror("ecqa")[0]
    assert not {r["id"] for r in pools["train"]} & {r["id"] for r in pools["test"]}
    again, _ = load_benchmark("ecqa", "mirror", MIRROR)
    assert [r["id"] for r in again["test"]] == [r["id"] for r in pools["test"]]


@needs_mirror
def test_boolq_first_row() -> None:
    row = _mirror("boolq")[0]["test"][0]
    assert row["id"] == "boolq-test-00000" and row["answer"] == "no" and row["choices"] is None
    assert row["question"].startswith("Passage: Ethanol fuel -- All biomass goes through")
    assert row["question"].endswith(
        "producing ethanol from corn uses much less petroleum than producing gasoline.\n"
        "Question: does ethanol take more energy make that produces?"
    )


@needs_mirror
def test_svamp_first_row() -> None:
    pools = _mirror("svamp")[0]
    assert not {r["id"] for r in pools["train"]} & {r["id"] for r in pools["test"]}
    rows = {r["id"]: r for pool in pools.values() for r in pool}
    assert rows["chal-1"] == {
        "id": "chal-1",
        "task": "svamp",
        "question": "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
        "How much do you have to pay to buy each pack?",
        "choices": None,
        "answer": "51",
        "explanation": "( 76.0 - 25.0 )",
    }


@needs_mirror
def test_math_not_mirrored() -> None:
    with pytest.raises(MissingBenchmark, match="math: not in mirror"):
        load_benchmark("math", "mirror", MIRROR)


# ------------------------------------------------------------------------------------------------ sampling


def _pool(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}{i:03d}", "task": "t"} for i in range(n)]


def test_sampling_deterministic_and_order_free() -> None:
    pools = {"train": _pool("a", 50), "test": _pool("b", 40)}
    first = sample_splits(pools, 10, 8, seed=3)
    shuffled = {k: list(reversed(v)) for k, v in pools.items()}
    assert sample_splits(shuffled, 10, 8, seed=3) == first
    assert len(first["train"]) == 10 and len(first["test"]) == 8
    assert sample_splits(pools, 10, 8, seed=4) != first


def test_sampling_disjoint_even_when_pools_overlap() -> None:
    shared = _pool("s", 20)
    out = sample_splits({"train": shared, "test": shared}, 20, 5, seed=0)
    assert len(out["test"]) == 5 and len(out["train"]) == 15
    assert not {r["id"] for r in out["train"]} & {r["id"] for r in out["test"]}


def test_sampling_n_larger_than_pool_takes_all() -> None:
    out = sample_splits({"train": [], "test": _pool("b", 3)}, 16, 24, seed=0)
    assert out["train"] == [] and sorted(r["id"] for r in out["test"]) == ["b000", "b001", "b002"]


def test_sampling_rejects_duplicate_ids() -> None:
    with pytest.raises(ValueError, match="duplicate id"):
        sample_splits({"train": _pool("a", 2) * 2, "test": []}, 1, 1, seed=0)


# ------------------------------------------------------------------------------------------------ broken mirrors


def _gsm_line(q: str, ans: str) -> str:
    return json.dumps({"question": q, "answer": ans})


def test_malformed_rows_counted_rest_loads(tmp_path: Path) -> None:
    gsm = tmp_path / "gsm8k"
    gsm.mkdir()
    (gsm / "train.jsonl").write_text(
        "\n".join(
            [
                _gsm_line("q0", "a <<1+1=2>>2\n#### 1,080"),
                '{"question": "broken", "answer": ',  # row 2: invalid JSON
                json.dumps({"question": "no answer"}),  # row 3: missing field
                _gsm_line("q3", "no final line"),  # row 4: no ####
                _gsm_line("q4", "#### 5"),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    (gsm / "test.jsonl").write_text(_gsm_line("t0", "x\n#### -3") + "\n", encoding="utf-8")
    pools, report = load_benchmark("gsm8k", "mirror", tmp_path)
    assert report.n_raw == 6 and report.n_malformed == 3
    assert any("row 2: invalid JSON" in m for m in report.malformed_examples)
    assert "gsm8k/train.jsonl row 3: missing 'answer'" in report.malformed_examples
    assert [r["id"] for r in pools["train"]] == ["gsm8k-train-00000", "gsm8k-train-00004"]
    assert pools["train"][0]["answer"] == "1080" and pools["train"][0]["explanation"] == "a 2"
    assert pools["test"][0]["answer"] == "-3"


def test_ecqa_answer_not_an_option_is_malformed(tmp_path: Path) -> None:
    (tmp_path / "ecqa").mkdir()
    header = "q_no,q_text,q_op1,q_op2,q_op3,q_op4,q_op5,q_ans,taskA_pos\n"
    rows = [
        'a1,Where?,x,y,z,w,v,y,"line one\nline two"\n',  # multi-line explanation
        "a2,Why?,x,y,z,w,v,nowhere,expl\n",
        "a3,How?,x,y,z,w,v,V,expl\n",  # case differs from option
    ]
    (tmp_path / "ecqa" / "cqa_data_test.csv").write_text(header + "".join(rows), encoding="utf-8")
    pools, report = load_benchmark("ecqa", "mirror", tmp_path)
    assert report.n_raw == 3 and report.n_malformed == 1
    assert "none of the options" in report.malformed_examples[0] and "row 2" in report.malformed_examples[0]
    rows_by_id = {r["id"]: r for r in pools["train"] + pools["test"]}
    assert rows_by_id["a1"]["answer"] == "B" and rows_by_id["a1"]["explanation"] == "line one\nline two"
    assert rows_by_id["a3"]["answer"] == "E"


def test_missing_benchmark_directory(tmp_path: Path) -> None:
    with pytest.raises(MissingBenchmark) as info:
        load_benchmark("svamp", "mirror", tmp_path)
    assert info.value.task == "svamp" and "hub" in info.value.reason


def test_declared_file_missing_names_file(tmp_path: Path) -> None:
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(_gsm_line("q", "#### 1") + "\n", encoding="utf-8")
    with pytest.raises(MirrorFileMissing, match=r"gsm8k/train\.jsonl"):
        load_benchmark("gsm8k", "mirror", tmp_path)


def test_unknown_task_and_absent_mirror(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("aqua", "mirror", tmp_path)
    with pytest.raises(FileNotFoundError, match="mirror directory"):
        load_benchmark("gsm8k", "mirror", tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------ hub (faked)


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, tables: dict[tuple, list[dict]] | Exception) -> None:
    def load_dataset(path: str, name: str | None = None, split: str | None = None) -> list[dict]:
        if isinstance(tables, Exception):
            raise tables
        return tables.get((path, name, split), [])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hub_field_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    arc = {
        "id": "Q1",
        "question": "Stem?",
        "choices": {"text": ["b", "a"], "label": ["2", "1"]},
        "answerKey": "2",
    }
    algebra = {
        "problem": "1+1?",
        "solution": "So $\\boxed{\\frac{1}{2}}$.",
        "level": "Level 1",
        "type": "Algebra",
    }
    _fake_datasets(
        monkeypatch,
        {
            ("allenai/ai2_arc", "ARC-Challenge", "test"): [arc],
            ("EleutherAI/hendrycks_math", "algebra", "test"): [algebra],
            ("EleutherAI/hendrycks_math", "geometry", "test"): [{"problem": "p", "solution": "no box"}],
            ("google/boolq", None, "validation"): [{"question": "is it", "passage": "P", "answer": True}],
        },
    )
    pools, _ = load_benchmark("arc_challenge", "hub")
    assert pools["test"][0]["choices"] == ["a", "b"] and pools["test"][0]["answer"] == "B"
    pools, report = load_benchmark("math", "hub")
    assert pools["test"][0]["answer"] == "\\frac{1}{2}" and pools["test"][0]["id"] == "math-test-00000"
    assert report.n_malformed == 1 and "geometry:test row 1" in report.malformed_examples[0]
    pools, _ = load_benchmark("boolq", "hub")
    assert (
        pools["test"][0]["question"] == "Passage: P\nQuestion: is it?" and pools["test"][0]["answer"] == "yes"
    )


def test_hub_failure_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_datasets(monkeypatch, ConnectionError("no route to host"))
    with pytest.raises(HubUnavailable, match=r"openai/gsm8k.*data\.source: mirror"):
        load_benchmark("gsm8k", "hub")


def test_every_task_has_both_sources() -> None:
    assert set(MIRROR_FILES) == set(HUB_SOURCES) == set(TASKS)


# ------------------------------------------------------------------------------------------------ helpers, I/O


def test_last_boxed_and_numbers() -> None:
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{\\sqrt{b}}}.") == "\\frac{a}{\\sqrt{b}}"
    assert last_boxed("\\boxed 5$") == "5"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("none") is None
    assert [canonical_number(x) for x in (8.0, "1,080", 2.5, -3)] == ["8", "1080", "2.5", "-3"]


def test_jsonl_roundtrip_and_bad_line(tmp_path: Path) -> None:
    rows = [{"id": "1", "q": "caf\u00e9"}, {"id": "2", "q": None}]
    path = tmp_path / "deep" / "rows.jsonl"
    write_jsonl(path, rows)
    assert read_jsonl(path) == rows
    path.write_text('{"id": 1}\n\n{"id": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows\.jsonl:3"):
        read_jsonl(path)


@needs_mirror
def test_prepare_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = prepare_all(
        ["gsm8k", "svamp", "ecqa", "math"], "mirror", MIRROR, tmp_path, n_train=4, n_test=6, seed=0
    )
    assert summary["math"]["status"] == "skipped" and "not in mirror" in summary["math"]["reason"]
    assert "math: skipped" in capsys.readouterr().out
    assert not (tmp_path / "math").exists()
    assert summary["gsm8k"] | {"malformed_examples": []} == {
        "status": "ok",
        "reason": None,
        "n_train": 4,
        "n_test": 6,
        "n_raw": 8792,
        "n_malformed": 0,
        "malformed_examples": [],
    }
    # boolq stays eval-only; svamp's 1000 questions are carved into train/test pools like ecqa's
    assert summary["svamp"]["n_train"] == 4 and len(read_jsonl(tmp_path / "svamp" / "train.jsonl")) == 4
    for task in ("gsm8k", "svamp", "ecqa"):
        train = read_jsonl(tmp_path / task / "train.jsonl")
        test = read_jsonl(tmp_path / task / "test.jsonl")
        assert len(test) == 6 and not {r["id"] for r in train} & {r["id"] for r in test}
    # a per-task size draws more of the same seeded prefix for that task only, and the same test questions
    more = tmp_path / "more"
    sized = prepare_all(["gsm8k", "svamp"], "mirror", MIRROR, more, n_train=4, n_test=6, seed=0,
                        n_train_by_task={"gsm8k": 7})
    assert (sized["gsm8k"]["n_train"], sized["svamp"]["n_train"]) == (7, 4)
    assert read_jsonl(more / "gsm8k" / "train.jsonl")[:4] == read_jsonl(tmp_path / "gsm8k" / "train.jsonl")
    assert (more / "gsm8k" / "test.jsonl").read_text() == (tmp_path / "gsm8k" / "test.jsonl").read_text()
    again = tmp_path / "again"
    prepare_all(["ecqa"], "mirror", MIRROR, again, n_train=4, n_test=6, seed=0)
    assert (again / "ecqa" / "test.jsonl").read_text() == (tmp_path / "ecqa" / "test.jsonl").read_text()
