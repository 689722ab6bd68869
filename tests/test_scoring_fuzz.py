"""Property tests: scoring never raises on arbitrary model text and returns canonical shapes."""

from __future__ import annotations

import re
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from magdi.scoring import extract_answer, is_correct, majority_vote

# Arbitrary unicode plus fragments that exercise every extractor path.
FRAGMENTS = [
    "answer is ",
    "Answer: ",
    "#### ",
    "\\boxed{",
    "}",
    "{",
    '{"answer": ',
    '"',
    "yes",
    "no",
    "(B)",
    "option c",
    "bank",
    "$1,000.00",
    "-3",
    "3/4",
    "\\frac{1}{2}",
    "\\sqrt{8}",
    "%",
    ".",
    "\n",
    "__import__('os')",
]
TEXT = st.lists(st.one_of(st.text(max_size=30), st.sampled_from(FRAGMENTS)), max_size=25).map("".join)
CHOICES = st.one_of(st.none(), st.lists(st.text(max_size=12), min_size=1, max_size=5))
CANONICAL_NUMBER = re.compile(r"-?\d+(\.\d*[1-9])?")


def _check_shape(pred: str | None, answer_type: str, choices: list[str] | None) -> None:
    if pred is None:
        return
    assert isinstance(pred, str) and pred
    if answer_type == "yesno":
        assert pred in ("yes", "no")
    elif answer_type == "choice":
        assert pred in "ABCDE"[: len(choices) if choices else 5] and len(pred) == 1
    elif answer_type == "number":
        assert CANONICAL_NUMBER.fullmatch(pred), pred
        assert pred != "-0"
        Decimal(pred)


@settings(max_examples=200, deadline=None)
@given(text=TEXT, choices=CHOICES, answer_type=st.sampled_from(["yesno", "choice", "number", "latex"]))
def test_extract_and_score_never_raise(text: str, choices: list[str] | None, answer_type: str) -> None:
    pred = extract_answer(text, answer_type, choices)
    _check_shape(pred, answer_type, choices)
    gold = {"yesno": "yes", "choice": "B", "number": "0.75", "latex": "\\frac{3}{4}"}[answer_type]
    assert isinstance(is_correct(pred, gold, answer_type), bool)
    assert isinstance(is_correct(text, gold, answer_type), bool)
    assert majority_vote([pred, None, pred], answer_type) == pred
    if pred is not None and answer_type != "latex":  # canonical answers are valid, self-matching golds
        assert is_correct(pred, pred, answer_type)
