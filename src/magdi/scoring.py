"""Answer extraction and scoring for model-generated text.

Teacher discussions, student generations and self-consistency all end here, so this module
must turn *any* string into either ``None`` or one canonical answer per type, and must never
raise on model text:

- ``yesno``  -> ``"yes"`` / ``"no"``            (StrategyQA, BoolQ)
- ``choice`` -> ``"A"`` .. ``"E"``              (ECQA, ARC, AQuA)
- ``number`` -> canonical decimal string        (GSM8K, SVAMP), e.g. ``"1234"``, ``"0.5"``, ``"-3"``
- ``latex``  -> an expression string compared with ``math_verify`` (MATH)

Security: model text is untrusted. Nothing here calls ``eval``/``exec``/``sympify``; numbers are
parsed with ``Decimal`` and LaTeX only through ``math_verify``'s LaTeX (ANTLR) parser.
math_verify's ``ExprExtractionConfig`` is deliberately *not* used, because it calls sympy's
``parse_expr``, which evaluates Python code.

Extraction priority (the same for every type):
1. a JSON object with an ``"answer"`` key (teacher outputs are JSON);
2. the last ``answer is X`` / ``Answer: X`` / ``#### X`` / ``\\boxed{X}`` (for ``latex`` the last
   ``\\boxed{}`` wins over ``answer is``);
3. the last valid token of the type anywhere in the text (for ``latex``: the last number).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from decimal import Decimal

ANSWER_TYPES: tuple[str, ...] = ("yesno", "choice", "number", "latex")
LETTERS = "ABCDE"

# math_verify warns (once) when its signal-based timeout is disabled off the main thread; we
# bound the work ourselves by capping the input length instead.
logging.getLogger("math_verify").setLevel(logging.ERROR)
_MAX_MATH_CHARS = 1000
_SPAN_CHARS = 300  # how much text after an "answer is" marker is considered the answer

# --- generic markers ------------------------------------------------------------------------
_JSON_ANSWER = re.compile(r'"answer"\s*:\s*("(?:[^"\\]|\\.)*"|-?[\d.,]+|true|false|null)', re.I)
_MARKER = re.compile(r"answer\s*(?:(?:is|would be|should be|must be|will be)\b|:|=)\s*:?|####", re.I)
_BRACE_TOKEN = re.compile(r"\\(?:boxed|fbox)\s*\{|[{}]")
_INLINE_MATH = re.compile(r"\$([^$]+)\$")
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_NONE_OF = re.compile(r"\bnone of (?:the|these)\b", re.I)
_MARKDOWN = re.compile(r"[*`]+")  # not "_": option texts such as "MgBr_{2}" use it

# --- yes/no ---------------------------------------------------------------------------------
_YESNO_WORD = re.compile(r"\b(yes|no|true|false)\b", re.I)
# In free text "no" is often not an answer ("no doubt", "no one"); count it only when it stands
# alone, i.e. is followed by punctuation or the end of the text.
_YESNO_FREE = re.compile(r"\b(?:(yes)\b|(no)(?=\s*(?:[.,;:!?)\]\"'*]|$)))", re.I)
_BOOL = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}

# --- choice ---------------------------------------------------------------------------------
_OPTION_WORD = re.compile(r"\b(?:option|choice|letter)\s*\(?([a-e])\b", re.I)
_LETTER_STRONG = re.compile(r"^\W*\(([a-e])\)|^\W*([a-e])(?=\s*(?:[).:,]|$))", re.I)
_LETTER_WEAK = re.compile(r"^\W*([A-E])\b")
_LETTER_PARENS = re.compile(r"\(([A-Ea-e])\)")
_LETTER_LINE = re.compile(r"^[\s*]*([A-Ea-e])(?:[).:]|\s*$)", re.M)  # a line that is just "B)" / "B."

# --- numbers --------------------------------------------------------------------------------
_NUMBER = re.compile(
    r"(?<![\w.])(?P<neg>(?<![\d)]\s)-)?\$?\s?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?!\d)"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?"
)
_MAX_DIGITS = 50
_MAX_MARKERS = 32
_LATEX_FRAC = re.compile(r"(-?)\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}")
_LATEX_NOISE = re.compile(r"\\[$%!,;: ]|\{,\}|\\left|\\right")
_LATEX_DELIMS = re.compile(r"^\\[(\[]|\\[)\]]$")
_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-"})


# --- helpers --------------------------------------------------------------------------------
def _check_type(answer_type: str) -> None:
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"unknown answer_type {answer_type!r}; expected one of {ANSWER_TYPES}")


def _boxed_contents(text: str) -> list[tuple[int, str]]:
    """(start, content) of every balanced ``\\boxed{...}`` (nested braces allowed), in one pass."""
    found, stack = [], []  # stack of (boxed start or -1 for a plain brace, content start)
    for m in _BRACE_TOKEN.finditer(text):
        if m.group() == "}":
            if stack:
                start, content_start = stack.pop()
                if start >= 0:
                    found.append((start, text[content_start : m.start()]))
        else:
            stack.append((m.start() if m.group() != "{" else -1, m.end()))
    return sorted(found)


def _json_answer(text: str) -> str | None:
    """Value of the last ``"answer": ...`` pair, as text (teacher outputs are JSON objects)."""
    matches = list(_JSON_ANSWER.finditer(text))
    if not matches:
        return None
    raw = matches[-1].group(1)
    if raw.isalpha():
        return {"true": "yes", "false": "no"}.get(raw.lower())
    if not raw.startswith('"'):
        return raw
    try:
        value = json.loads(raw)
    except ValueError:
        value = "\0"
    if any(ord(c) < 32 for c in value):  # un-escaped LaTeX such as "\frac" (\f is a JSON escape)
        value = raw[1:-1].replace("\\\\", "\\")
    return value


def _marker_spans(text: str) -> list[tuple[int, str]]:
    """(position, text after the marker up to the end of its line) for every answer marker."""
    spans = []
    for m in _MARKER.finditer(text):
        line = text[m.end() : m.end() + _SPAN_CHARS].split("\n", 1)[0]
        spans.append((m.start(), line))
    return spans


# --- yes/no ---------------------------------------------------------------------------------
def _yesno_span(span: str) -> str | None:
    m = _YESNO_WORD.search(_MARKDOWN.sub("", span))
    return _BOOL[m.group(1).lower()] if m else None


def _yesno_free(text: str) -> str | None:
    last = None
    for last in _YESNO_FREE.finditer(text):  # noqa: B007 - we want the last match
        pass
    return ("yes" if last.group(1) else "no") if last else None


# --- choice ---------------------------------------------------------------------------------
def _valid_letters(choices: list[str] | None) -> str:
    return LETTERS[: len(choices)] if choices else LETTERS


def _option_in(text: str, choices: list[str] | None, last: bool) -> tuple[int, str] | None:
    """(end position, letter) of the first/last option text mentioned in ``text``.

    Matching ignores case, but among options at the same place the longest wins ("take charge"
    beats "charge"), then the one whose case matches exactly ("Rr" beats "rr" and "RR")."""
    best: tuple[int, int, bool, str] | None = None  # (position key, length, exact case, letter)
    for letter, option in zip(LETTERS, choices or [], strict=False):
        option = option.strip()
        if not option:
            continue
        pattern = re.compile(r"(?<!\w)" + re.escape(option) + r"(?!\w)", re.I)
        hits = list(pattern.finditer(text))
        if not hits:
            continue
        hit = hits[-1] if last else hits[0]
        key = (hit.end() if last else -hit.start(), len(option), hit.group() == option, letter)
        if best is None or key[:3] > best[:3]:
            best = key
    return (abs(best[0]), best[3]) if best else None


def _choice_span(span: str, choices: list[str] | None) -> str | None:
    """Letter named in an answer span; "" when the span explicitly rejects every option."""
    span = _MARKDOWN.sub("", span).strip()
    valid = _valid_letters(choices)
    for pattern in (_OPTION_WORD, _LETTER_STRONG):
        m = pattern.search(span)
        letter = m and next(g for g in m.groups() if g).upper()
        if letter and letter in valid:
            return letter
    hit = _option_in(span, choices, last=False)
    if hit:
        return hit[1]
    m = _LETTER_WEAK.search(span)
    if m and m.group(1) in valid:
        return m.group(1)
    return "" if _NONE_OF.search(span) else None


def _choice_free(text: str, choices: list[str] | None) -> str | None:
    valid = _valid_letters(choices)
    hits = [
        (m.end(), m.group(1).upper())
        for p in (_LETTER_PARENS, _OPTION_WORD, _LETTER_LINE)
        for m in p.finditer(text)
    ]
    hits = [h for h in hits if h[1] in valid]
    option = _option_in(text, choices, last=True)
    if option:
        hits.append(option)
    return max(hits, key=lambda h: h[0])[1] if hits else None


# --- numbers --------------------------------------------------------------------------------
def _canon_decimal(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def _number_value(m: re.Match[str]) -> str | None:
    num, den = m.group("num").replace(",", ""), m.group("den")
    if len(num) > _MAX_DIGITS or (den and len(den) > _MAX_DIGITS):
        return None  # not a plausible answer, and huge Decimals are slow
    value = Decimal(num)
    if den and Decimal(den) != 0:
        value /= Decimal(den)  # 28 significant digits: exact for the fractions answers use
    return _canon_decimal(-value if m.group("neg") else value)


def _prep_number_text(text: str) -> str:
    text = text.translate(_MINUS)
    text = _LATEX_FRAC.sub(lambda m: f"{m.group(1)}{m.group(2)}/{m.group(3)}", text)
    return _LATEX_NOISE.sub("", text)


def _number_span(span: str) -> str | None:
    span = _prep_number_text(span)
    if "=" in span:  # "the answer is 3 * 5 = 15" -> the result, not the first operand
        span = span.rsplit("=", 1)[1]
    for m in _NUMBER.finditer(span):
        value = _number_value(m)
        if value is not None:
            return value
    return None


def _number_free(text: str) -> str | None:
    for m in reversed(list(_NUMBER.finditer(_prep_number_text(text)))):
        value = _number_value(m)
        if value is not None:
            return value
    return None


# --- latex ----------------------------------------------------------------------------------
def _latex_span(span: str) -> str | None:
    boxed = _boxed_contents(span)
    if boxed:
        span = boxed[-1][1]
    else:
        math = _INLINE_MATH.search(span)
        span = math.group(1) if math else _SENTENCE_END.split(span, 1)[0]
    span = _LATEX_DELIMS.sub("", span.strip().strip("$")).strip().rstrip(".").strip()
    return span or None


def _latex_free(text: str) -> str | None:
    matches = list(_NUMBER.finditer(text.translate(_MINUS)))
    return matches[-1].group(0).replace("$", "").replace(",", "").strip() if matches else None


def _math_parse(expr: str) -> list:
    """math_verify.parse restricted to its LaTeX parser (no sympy ``parse_expr``, which evals).

    The signal-based timeout only works on the main thread; elsewhere it is disabled and the
    input length cap bounds the work instead."""
    from math_verify import LatexExtractionConfig, parse

    if len(expr) > _MAX_MATH_CHARS:
        return []
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        return parse(
            f"$\\boxed{{{expr}}}$",
            extraction_config=[LatexExtractionConfig()],
            fallback_mode="no_fallback",
            parsing_timeout=timeout,
        )
    except Exception:  # math_verify/sympy can raise almost anything on garbage input
        return []


def _latex_equal(pred: str, gold: str) -> bool:
    if pred.strip() == gold.strip():
        return True
    from math_verify import verify

    gold_parsed, pred_parsed = _math_parse(gold), _math_parse(pred)
    if not gold_parsed or not pred_parsed:
        return False
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:
        return False


# --- public API -----------------------------------------------------------------------------
_SPAN: dict[str, Callable[[str, list[str] | None], str | None]] = {
    "yesno": lambda s, _c: _yesno_span(s),
    "choice": _choice_span,
    "number": lambda s, _c: _number_span(s),
    "latex": lambda s, _c: _latex_span(s),
}
_FREE: dict[str, Callable[[str, list[str] | None], str | None]] = {
    "yesno": lambda t, _c: _yesno_free(t),
    "choice": _choice_free,
    "number": lambda t, _c: _number_free(t),
    "latex": lambda t, _c: _latex_free(t),
}


def extract_answer(text: str, answer_type: str, choices: list[str] | None = None) -> str | None:
    """Canonical answer of ``answer_type`` stated in model ``text``, or None if none is found.

    Teachers answer in JSON and students in free text, so we try JSON, then explicit answer
    markers (the last one wins, so a revised answer beats the first guess), then the last
    valid token. ``choices`` are the option texts in letter order, to map "the answer is bank"
    to its letter. Never raises on any string: model text is untrusted."""
    _check_type(answer_type)
    if not isinstance(text, str) or not text:
        return None
    span_parser = _SPAN[answer_type]
    from_json = _json_answer(text)
    if from_json is not None:
        answer = span_parser(from_json, choices)
        if answer is not None:
            return answer or None
    boxed = _boxed_contents(text)
    spans = boxed if answer_type == "latex" and boxed else sorted(_marker_spans(text) + boxed)
    # the last marker wins; looking further back than a few dozen only costs time on flooded text
    for _pos, span in reversed(spans[-_MAX_MARKERS:]):
        answer = span_parser(span, choices)
        if answer is not None:
            return answer or None  # "" = explicit "none of the above"
    return _FREE[answer_type](text, choices)


def normalize_gold(answer: str, answer_type: str) -> str:
    """Canonical form of a dataset gold answer, so it compares equal to ``extract_answer``.

    Accepts bools/"True"/"yes" (yesno), "C"/"(C)"/"3" (choice; digits 1-5 map to A-E as in
    some ARC rows), "51.0"/"1,000"/a full GSM8K solution ending in "#### N" (number), and a
    LaTeX answer or solution with ``\\boxed{}`` (latex). Raises ValueError on a gold answer that
    is not valid for its type: that is a data bug and must not be scored silently."""
    _check_type(answer_type)
    text = str(answer).strip()
    result: str | None
    if answer_type == "yesno":
        result = _BOOL.get(text.lower()) or {"1": "yes", "0": "no"}.get(text)
    elif answer_type == "choice":
        letter = text.strip("()").strip().upper()
        if letter in "12345" and len(letter) == 1:
            letter = LETTERS[int(letter) - 1]
        result = letter if len(letter) == 1 and letter in LETTERS else None
    elif answer_type == "number":
        text = text.rsplit("####", 1)[-1]
        result = _number_span(text)
    else:
        boxed = _boxed_contents(text)
        result = _latex_span(boxed[-1][1] if boxed else text)
    if result is None:
        raise ValueError(f"not a valid {answer_type} gold answer: {answer!r}")
    return result


def _canonical_pred(pred: str, answer_type: str) -> str | None:
    """Re-canonicalize a prediction (it may be raw, e.g. "(B)" or "3.50")."""
    if answer_type == "latex":
        return pred.strip() or None
    if answer_type == "choice":  # an option number, e.g. the official ECQA MAGs' "1".."5": same map as gold
        bare = pred.strip().strip("()").strip()
        if len(bare) == 1 and bare in "12345":
            return LETTERS[int(bare) - 1]
    return _SPAN[answer_type](pred, None)


def is_correct(pred: str | None, gold: str, answer_type: str) -> bool:
    """Whether prediction ``pred`` (usually from ``extract_answer``) matches ``gold``.

    Numbers compare by exact value (so "3.50" == "3.5", "3/4" == "0.75"); LaTeX compares by
    math_verify equivalence (so "\\frac{1}{2}" == "0.5", "2\\sqrt{2}" == "\\sqrt{8}"). Never raises
    on ``pred``; raises ValueError (via ``normalize_gold``) only on an invalid gold answer."""
    gold = normalize_gold(gold, answer_type)
    if not isinstance(pred, str):
        return False
    if answer_type == "latex":
        return _latex_equal(pred, gold)
    canon = _canonical_pred(pred, answer_type)
    if canon is None:
        return False
    if answer_type == "number":
        return Decimal(canon) == Decimal(gold)
    return canon == gold


def majority_vote(preds: list[str | None], answer_type: str) -> str | None:
    """Self-consistency answer: the most common prediction, None ignored.

    Equivalent answers vote together ("3.5" and "3.50"; for LaTeX, math_verify-equivalent
    expressions). Ties go to the answer that appeared first, so the result is deterministic.
    Returns None when every prediction is None."""
    _check_type(answer_type)
    reps: list[str] = []
    counts: list[int] = []
    for pred in preds:
        if pred is None:
            continue
        canon = _canonical_pred(pred, answer_type) or pred
        for i, rep in enumerate(reps):
            same = _latex_equal(canon, rep) if answer_type == "latex" else canon == rep
            if same:
                counts[i] += 1
                break
        else:
            reps.append(canon)
            counts.append(1)
    if not reps:
        return None
    return reps[counts.index(max(counts))]
