"""The authors' MAG release (``teachers.source: official``): import into our MAGs, in the evaluation's format.

The release (dinobby/MAGDi, ``MAG/<TASK>_1000.json``) holds one record per question: ``question``,
``gold_answer`` and ``<agent>_output_<round>`` objects ``{reasoning, answer, confidence_level}``, in ReConcile's
answer conventions: ECQA answers are option numbers 1-5 (ReConcile shows the options as a separate "The options
are: ..." line), ARC answers letters. Our evaluation asks every choice task with lettered options
(``magdi.student.question_text``) and reads a letter, so a MAG imported as is would train the student on
"The answer is 3." and then test it where a digit cannot be read. Here every record is brought into that format:

- options: from the record (``options`` / ``choices``), else split off the question text ("1. tree 2. sea ..." or
  "(A) ... (B) ..."), else looked up by question text in the benchmark (``lookup``: the mirrored or hub pools);
  the question keeps its stem only, so the prompt shows the options once, as the evaluation shows them;
- answers: digits 1-5 become letters A-E (gold and every node), so the training targets say "The answer is B.".

Correctness is re-derived from the gold answer with our scorer rather than trusting stored labels; the team
answer is ReConcile's recalibrated-confidence vote over the last round (``magdi.discussion``), as for our own
discussions. ``clean_agreement`` applies the official ``remove_agreement`` to every chain.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from .discussion import consensus, weighted_vote
from .mag import MAG, Node
from .scoring import LETTERS, is_correct, normalize_gold

#: inline options: "1. tree 2. sea", "(A) tree (B) sea", "A) tree B) sea", "A: tree B: sea" (ReConcile, ARC)
_MARK = re.compile(r"(?:^|\s)\(?([1-5]|[A-E])(?:\)|\.|:)\s+")


def remove_agreement(text: str, phrases: tuple[str, ...] = ("I disagree", "I agree")) -> str:
    """The official text cleaning (``utils.remove_agreement``): drop the sentences (split on ". ") that
    start with "I agree" / "I disagree", so a chain reads as reasoning rather than as a reply."""
    return ". ".join(s for s in text.split(". ") if not s.startswith(phrases))


def clean_mag(mag: MAG) -> MAG:
    """``mag`` with ``remove_agreement`` applied to every chain (``n_tokens`` stays what the teacher wrote)."""
    nodes = [replace(n, reasoning=remove_agreement(n.reasoning)) for n in mag.nodes]
    return replace(mag, nodes=nodes)


def question_key(text: str) -> str:
    """Question text folded for lookup: case, whitespace and trailing punctuation do not matter."""
    return " ".join(text.casefold().split()).rstrip(" ?.")


def split_inline_options(question: str) -> tuple[str, list[str] | None]:
    """``(stem, options)`` when the question text ends with a run of consecutively numbered or lettered
    options (1., 2., ... or (A), (B), ...; at least two, starting at 1 or A), else ``(question, None)``."""
    marks = list(_MARK.finditer(question))
    for i, m in enumerate(marks):
        first = m.group(1)
        if first not in ("1", "A"):
            continue
        run = [m]
        for nxt in marks[i + 1 :]:
            want = chr(ord(run[-1].group(1)) + 1)
            if nxt.group(1) == want:
                run.append(nxt)
        if len(run) < 2:
            continue
        bounds = [r.start() for r in run] + [len(question)]
        opts = [question[r.end() : bounds[k + 1]].strip().rstrip(",;") for k, r in enumerate(run)]
        stem = question[: run[0].start()].strip()
        stem = re.sub(r"\s*(?:answer choices|options|choices)\s*:?\s*$", "", stem, flags=re.I).strip()
        if stem and all(opts):
            return stem, opts
    return question, None


def record_options(rec: Mapping[str, Any], lookup: Mapping[str, list[str]] | None = None
                   ) -> tuple[str, list[str] | None]:
    """``(question stem, options)`` of a choice-task record: the record's own ``options``/``choices``, else the
    options written into its question, else the benchmark's options for the same question text (``lookup``)."""
    question = str(rec["question"]).strip()
    own = rec.get("options", rec.get("choices"))
    if isinstance(own, Sequence) and not isinstance(own, str) and own:
        stem, _ = split_inline_options(question)
        return stem, [re.sub(r"^\(?[1-5A-E][).:]\s*", "", str(o)).strip() for o in own]
    stem, opts = split_inline_options(question)
    if opts is None and lookup:
        opts = lookup.get(question_key(question))
    return stem, opts


def as_letter(answer: str | None, n_options: int | None) -> str | None:
    """A choice answer as the evaluation reads it: "3" / "(C)" / "c" -> "C"; anything else (or a letter past the
    options) is kept as given and scores as wrong."""
    if answer is None:
        return None
    try:
        letter = normalize_gold(answer, "choice")
    except ValueError:
        return answer
    return letter if n_options is None or LETTERS.index(letter) < n_options else answer


def import_official(records: list[dict[str, Any]], task: str, answer_type: str, max_rounds: int = 3,
                    clean_agreement: bool = False, lookup: Mapping[str, list[str]] | None = None) -> list[MAG]:
    """Convert the authors' released MAG JSON (``<agent>_output_<round>`` objects) to our MAGs, in the
    evaluation's format (module docstring). Absent or "None" rounds become absent nodes. ``lookup``: question key
    (:func:`question_key`) -> options, for choice records whose options are neither in the record nor in its text.
    """
    mags = []
    for qi, rec in enumerate(records):
        question, choices = str(rec["question"]), None
        if answer_type == "choice":
            question, choices = record_options(rec, lookup)
        gold = normalize_gold(str(rec["gold_answer"]), answer_type)
        agents = sorted({k.split("_output_")[0] for k in rec if "_output_" in k})
        nodes = []
        for r in range(max_rounds + 1):
            for a in agents:
                out = rec.get(f"{a}_output_{r}")
                if not isinstance(out, dict) or out.get("reasoning") in (None, "None", "NA"):
                    continue
                ans = out.get("answer")
                ans = None if ans in (None, "None") else str(ans)
                if answer_type == "choice":
                    ans = as_letter(ans, len(choices) if choices else None)
                text = str(out.get("reasoning", ""))
                text = remove_agreement(text) if clean_agreement else text
                nodes.append(
                    Node(
                        agent=a,
                        round=r,
                        reasoning=text,
                        answer=ans,
                        confidence=float(out.get("confidence_level", out.get("confidence", 0.0)) or 0.0),
                        correct=is_correct(ans, gold, answer_type) if ans is not None else False,
                        n_tokens=len(text.split()),
                    )
                )
        last = [n for n in nodes if nodes and n.round == max(x.round for x in nodes)]
        team = weighted_vote(last)
        if answer_type == "choice" and not choices:
            warnings.warn(f"official {task} record {qi}: no options found (record, question text or benchmark); "
                          "the student sees the question without them", stacklevel=2)
        mags.append(
            MAG(
                id=str(rec.get("id", f"{task}-official-{qi:05d}")),
                task=task,
                question=question,
                gold=gold,
                choices=choices,
                nodes=nodes,
                team_answer=team,
                team_correct=is_correct(team, gold, answer_type) if team is not None else False,
                consensus=consensus(last),
                meta={"source": "official_release"},
            )
        )
    return mags


def benchmark_lookup(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Question key -> options of benchmark rows (``magdi.data`` schema), for :func:`import_official`."""
    return {question_key(r["question"]): list(r["choices"]) for r in rows if r.get("choices")}
