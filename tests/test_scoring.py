"""Answer extraction/scoring on real benchmark rows with hand-written (often nasty) model outputs."""

from __future__ import annotations

import csv
import itertools
import json
import threading
from pathlib import Path

import pytest

from magdi.scoring import extract_answer, is_correct, majority_vote, normalize_gold

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TYPES = ["yesno", "choice", "number", "latex"]


def _data(rel: str) -> Path:
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"benchmark mirror file {rel} not available")
    return path


def _first_jsonl(rel: str) -> dict:
    with _data(rel).open() as f:
        return json.loads(f.readline())


# --- number: GSM8K / SVAMP --------------------------------------------------------------------
def test_gsm8k_first_test_row() -> None:
    row = _first_jsonl("gsm8k/test.jsonl")  # Janet's ducks: 16 - 3 - 4 = 9 eggs, 9 * $2 = $18
    gold = normalize_gold(row["answer"], "number")  # the whole solution, ending in "#### 18"
    assert gold == "18"
    assert normalize_gold(row["answer"].split("####")[-1], "number") == "18"
    outputs = {
        "She sells 16 - 3 - 4 = 9 eggs and makes 9 * 2 = $18.": "18",
        "The answer is $18.00 per day.": "18",
        "I first thought 12, but the answer is 18": "18",
        "The answer is 18, not 12 as I said before.": "18",
        '{"reasoning": "16-3-4=9, 9*2=18", "answer": "$18", "confidence": 0.9}': "18",
        '{"answer": 18}': "18",
        "9 eggs * $2 = $18\n#### 18": "18",
        "The answer is \\boxed{18}.": "18",
        "So the answer is 9 * 2 = 18 dollars": "18",  # result after '=', not the first operand
    }
    for text, expected in outputs.items():
        pred = extract_answer(text, "number")
        assert pred == expected, text
        assert is_correct(pred, row["answer"], "number")
    assert not is_correct(extract_answer("the answer is 9 eggs", "number"), gold, "number")
    assert not is_correct(None, gold, "number")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("It costs $1,000.00 in total.", "1000"),
        ("Total: 1,234 apples", "1234"),
        ("The temperature dropped to -3 degrees.", "-3"),
        ("The temperature dropped to \u22123 degrees.", "-3"),  # unicode minus
        ("10 - 5 leaves us with", "5"),  # a subtraction is not a negative number
        ("Answer: 12 apples", "12"),
        ("The answer is 3.50", "3.5"),
        ("the answer is 3/4", "0.75"),
        ("the answer is \\boxed{\\dfrac{3}{4}}", "0.75"),
        ("the answer is 25%.", "25"),
        ("the answer is .5", "0.5"),
        ("It is 1, 2, or 3", "3"),
        ("no digits here at all", None),
        ("", None),
    ],
)
def test_number_extraction(text: str, expected: str | None) -> None:
    assert extract_answer(text, "number") == expected


def test_svamp_row_float_gold() -> None:
    rows = json.loads(_data("svamp/SVAMP.json").read_text())
    row = rows[0]  # 76 dollars - 25 dollars discount = 51.0
    assert row["Answer"] == 51.0
    gold = normalize_gold(str(row["Answer"]), "number")
    assert gold == "51"
    assert is_correct(extract_answer("76 - 25 = 51. The answer is 51 dollars.", "number"), gold, "number")
    assert is_correct("51.00", str(row["Answer"]), "number")
    assert not is_correct("101", gold, "number")


def test_number_equivalences() -> None:
    assert is_correct("3.50", "3.5", "number")
    assert is_correct("3/4", "0.75", "number")
    assert is_correct("$1,000", "1000", "number")
    assert normalize_gold("1,000.00", "number") == "1000"
    assert normalize_gold("-0.0", "number") == "0"
    with pytest.raises(ValueError):
        normalize_gold("no number", "number")


# --- yesno: StrategyQA / BoolQ ----------------------------------------------------------------
def test_strategyqa_first_dev_row() -> None:
    row = json.loads(_data("strategyqa/dev.json").read_text())[0]  # Albany GA reaching 100k first
    assert row["answer"] is False
    gold = normalize_gold(str(row["answer"]), "yesno")
    assert gold == "no"
    outputs = {
        "Albany, GA has about 75,000 people, Albany, NY about 100,000. So the answer is no.": "no",
        '{"reasoning": "GA is smaller", "answer": "no", "confidence": 0.8}': "no",
        '{"answer": false}': "no",
        "Answer: No, because Albany NY is larger.": "no",
        "No. Albany, New York is much closer to a hundred thousand.": "no",
        "**No**": "no",
        # "no doubt" is not an answer: the buried standalone "Yes" is
        "Yes, Georgia's Albany is growing fast, no doubt about it, and no one disputes this": "yes",
        "I first said yes, but the answer is no": "no",
    }
    for text, expected in outputs.items():
        assert extract_answer(text, "yesno") == expected, text
    assert is_correct(extract_answer("The answer is: no", "yesno"), gold, "yesno")
    assert not is_correct("yes", gold, "yesno")


def test_boolq_first_val_row() -> None:
    row = _first_jsonl("boolq/val.jsonl")  # "does ethanol take more energy make that produces"
    assert row["label"] is False
    gold = normalize_gold(str(row["label"]), "yesno")
    assert gold == "no"
    assert extract_answer("Ethanol returns 1.3 units per unit of input.\nAnswer: False", "yesno") == "no"
    assert extract_answer('{"answer": "False"}', "yesno") == "no"
    assert is_correct(extract_answer("The answer is false.", "yesno"), gold, "yesno")
    assert extract_answer("There is no clear evidence either way", "yesno") is None


def test_yesno_gold_forms() -> None:
    assert [normalize_gold(a, "yesno") for a in ["True", "yes", "1", "FALSE", "No"]] == [
        "yes",
        "yes",
        "yes",
        "no",
        "no",
    ]
    with pytest.raises(ValueError):
        normalize_gold("maybe", "yesno")


# --- choice: ECQA / ARC -----------------------------------------------------------------------
def _ecqa_first() -> tuple[list[str], str]:
    with _data("ecqa/cqa_data_test.csv").open(newline="") as f:
        row = next(csv.DictReader(f))
    options = [row[f"q_op{i}"] for i in range(1, 6)]
    return options, row["q_ans"]


def test_ecqa_first_row() -> None:
    options, answer_text = _ecqa_first()
    assert options == ["greedy", "worry", "have knowledge", "take charge", "boss"]
    gold = normalize_gold("ABCDE"[options.index(answer_text)], "choice")
    assert gold == "C"
    outputs = {
        "People in charge look for those who have knowledge. The answer is have knowledge.": "C",
        "the answer is C": "C",
        "Answer: (C)": "C",
        "Answer: C) have knowledge": "C",
        "Answer: c.": "C",
        "I'd pick option c": "C",
        '{"reasoning": "skill matters", "answer": "C", "confidence": 0.7}': "C",
        '{"answer": "have knowledge"}': "C",
        "**Answer:** **C**": "C",
        "C)": "C",
        "(A) is tempting, but (C) fits better": "C",
        # "take charge" must not be mistaken for some shorter overlapping option text
        "They look for people who take charge": "D",
        "The answer is None of the above.": None,
        "I cannot decide.": None,
    }
    for text, expected in outputs.items():
        assert extract_answer(text, "choice", options) == expected, text
    assert is_correct(extract_answer("the answer is have knowledge", "choice", options), gold, "choice")
    assert not is_correct(extract_answer("the answer is boss", "choice", options), gold, "choice")


def test_arc_first_test_row() -> None:
    row = _first_jsonl("arc_challenge/ARC-Challenge-Test.jsonl")  # faster rotation -> shorter days
    labels = [c["label"] for c in row["question"]["choices"]]
    options = [c["text"] for c in row["question"]["choices"]]
    assert labels == ["A", "B", "C", "D"] and row["answerKey"] == "C"
    gold = normalize_gold(row["answerKey"], "choice")
    assert extract_answer("The answer is Planetary days will become shorter.", "choice", options) == "C"
    assert extract_answer("Faster spin, so planetary days will become shorter.", "choice", options) == "C"
    assert extract_answer("The answer is (B)", "choice", options) == "B"
    assert extract_answer("The answer is E", "choice", options) is None  # only 4 options here
    assert is_correct("(C)", gold, "choice")
    assert not is_correct("D", gold, "choice")


def test_every_arc_test_row_option_text_maps_to_its_letter() -> None:
    """Option texts can differ only by case or a subscript ("Rr" vs "rr", "MgBr" vs "MgBr_{2}")."""
    with _data("arc_challenge/ARC-Challenge-Test.jsonl").open() as f:
        rows = [json.loads(line) for line in f]
    tricky = 0
    for row in rows:
        options = [c["text"] for c in row["question"]["choices"]]
        labels = [c["label"] for c in row["question"]["choices"]]
        gold = normalize_gold(row["answerKey"], "choice")
        text = options[labels.index(row["answerKey"])]
        tricky += text in ("Rr", "MgBr_{2}")
        assert extract_answer(f"The answer is {text}.", "choice", options) == gold, options
        assert extract_answer(json.dumps({"reasoning": "...", "answer": text}), "choice", options) == gold
    assert tricky == 2


def test_ecqa_rows_option_text_maps_to_its_letter() -> None:
    with _data("ecqa/cqa_data_test.csv").open(newline="") as f:
        for row in itertools.islice(csv.DictReader(f), 500):
            options = [row[f"q_op{i}"] for i in range(1, 6)]
            gold = "ABCDE"[options.index(row["q_ans"])]
            assert extract_answer(f"So the answer is {row['q_ans']}.", "choice", options) == gold, options


def test_arc_numeric_labels_map_to_letters() -> None:
    with _data("arc_challenge/ARC-Challenge-Test.jsonl").open() as f:
        row = next(r for r in map(json.loads, f) if r["answerKey"].isdigit())
    letter = "ABCDE"[int(row["answerKey"]) - 1]
    assert normalize_gold(row["answerKey"], "choice") == letter
    with pytest.raises(ValueError):
        normalize_gold("bank", "choice")


# --- latex ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so we get \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{\\dfrac{3}{4}}", "\\dfrac{3}{4}"),
        ("first \\boxed{1}, then \\boxed{x^{2}+\\frac{1}{2}}", "x^{2}+\\frac{1}{2}"),
        ("The final answer is $2\\sqrt{2}$. I hope it is correct.", "2\\sqrt{2}"),
        ('{"answer": "\\frac{1}{2}"}', "\\frac{1}{2}"),  # un-escaped LaTeX in JSON (\f!)
        ('{"answer": "\\\\sqrt{8}"}', "\\sqrt{8}"),
        ("\\boxed{7} and then an unbalanced \\boxed{\\frac{1}{2}", "7"),
        ("", None),
    ],
)
def test_latex_extraction(text: str, expected: str | None) -> None:
    assert extract_answer(text, "latex") == expected


def test_latex_equivalence() -> None:
    assert is_correct("\\frac{1}{2}", "0.5", "latex")
    assert is_correct("0.5", "\\frac{1}{2}", "latex")
    assert is_correct("\\dfrac{3}{4}", "\\frac{3}{4}", "latex")
    assert is_correct("2\\sqrt{2}", "\\sqrt{8}", "latex")
    assert is_correct(
        extract_answer("\\boxed{\\sqrt{8}}", "latex"), "The result is \\boxed{2\\sqrt{2}}", "latex"
    )
    assert not is_correct("\\frac{1}{3}", "0.5", "latex")
    assert not is_correct(None, "0.5", "latex")
    assert normalize_gold("so \\boxed{\\frac{1}{2}}", "latex") == "\\frac{1}{2}"


def test_latex_off_main_thread() -> None:
    """math_verify's signal-based timeout fails off the main thread; we must disable it there."""
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.append(is_correct("2\\sqrt{2}", "\\sqrt{8}", "latex")))
    worker.start()
    worker.join(30)
    assert results == [True]


# --- majority vote ----------------------------------------------------------------------------
def test_majority_vote() -> None:
    assert majority_vote(["3.5", None, "4", "3.50", "4", None], "number") == "3.5"  # tie -> first
    assert majority_vote(["4", "3.5", "3.50"], "number") == "3.5"
    assert majority_vote([None, None], "yesno") is None
    assert majority_vote([], "choice") is None
    assert majority_vote(["no", "yes", "yes"], "yesno") == "yes"
    assert majority_vote(["B", "(C)", "C"], "choice") == "C"
    assert majority_vote(["1", "\\frac{1}{2}", "0.5"], "latex") == "\\frac{1}{2}"


# --- robustness & security --------------------------------------------------------------------
def test_unknown_answer_type_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        extract_answer("yes", "bool")


def test_malicious_text_is_plain_text(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payloads = [
        f"__import__('os').system('touch {marker}')",
        f"The answer is __import__('os').system('touch {marker}')",
        f"{{\"answer\": \"__import__('os').system('touch {marker}')\"}}",
        f"\\boxed{{__import__('os').system('touch {marker}')}}",
        f"#### exec(\"open('{marker}', 'w')\")",
        f"Answer: eval(compile('open(\"{marker}\", \"w\")', 's', 'exec'))",
    ]
    for text in payloads:
        for answer_type in TYPES:
            pred = extract_answer(text, answer_type, ["bank", "river"])
            for gold in ("0.5", "1", "yes", "A"):
                try:
                    gold_ok = normalize_gold(gold, answer_type)
                except ValueError:
                    continue
                is_correct(pred, gold_ok, answer_type)
                is_correct(text, gold_ok, answer_type)
            majority_vote([pred, text, None], answer_type)
    assert not marker.exists()


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "{",
        "}}}{{{",
        "\\boxed{",
        "\\boxed{" * 2000,
        '"answer": "',
        '{"answer": "\\ud800"}',
        "答案是 (B) 😀 ¿sí? \u0000",
        "1" * 10_000,
        "1,2" * 5000,
        "no " * 5000,
    ],
)
def test_never_raises(text: str) -> None:
    for answer_type in TYPES:
        extract_answer(text, answer_type, ["x", "", "y"])
        is_correct(text, "1", answer_type if answer_type != "choice" else "number")


def test_choice_option_numbers_score_as_letters() -> None:
    """The official ECQA MAGs answer with option numbers 1-5: a number maps to its letter on both sides."""
    assert is_correct("3", "3", "choice")
    assert is_correct("3", "C", "choice") and is_correct("(2)", "B", "choice") and is_correct("5", "(E)", "choice")
    assert not is_correct("3", "4", "choice") and not is_correct("1", "B", "choice")
    assert not is_correct("6", "A", "choice")  # no sixth option
    assert majority_vote(["1", "A", "B"], "choice") == "A"
