"""Benchmark loading: seven reasoning benchmarks, one schema.

Every downstream stage (teacher discussion, MAG construction, training, evaluation) reads the same row shape,
so task quirks are confined to this module::

    {"id": str, "task": str, "question": str, "choices": list[str] | None, "answer": str, "explanation": str | None}

``answer`` is always a string in the task's canonical form: ``"yes"``/``"no"`` (strategyqa, boolq), an option
letter ``"A".."E"`` (ecqa, arc_challenge), a plain number without thousands separators (gsm8k, svamp) or the
LaTeX content of the last ``\\boxed{}`` (math).

Two sources give the same schema:

* ``mirror`` -- read-only offline copies under ``paths.mirror_dir`` (see its ``SOURCES.md``). MATH is not
  mirrored; asking for it raises :class:`MissingBenchmark`, which :func:`prepare_all` turns into a skip.
* ``hub`` -- ``datasets.load_dataset`` on the Hugging Face hub, for machines with network access.

Malformed rows are never silently dropped and never crash a load: each one is counted in a :class:`LoadReport`
with a short reason, so a corrupted mirror shows up in the stage summary instead of as a quietly smaller test set.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

Source = Literal["mirror", "hub"]
Row = dict[str, Any]

#: Keys of a normalised row, in the order they are written.
SCHEMA_KEYS: tuple[str, ...] = ("id", "task", "question", "choices", "answer", "explanation")

#: Option letters; a choice's letter is its position in ``choices``.
LETTERS = "ABCDEFGHIJ"

#: How many malformed-row reasons a :class:`LoadReport` keeps (the count is always complete).
MAX_MALFORMED_EXAMPLES = 5

#: Task -> pool -> files relative to the mirror directory. An empty ``train`` list marks an eval-only task
#: (boolq, svamp: the paper only tests on them) unless the task is in :data:`CARVE_TRAIN_FROM_TEST`.
#: ARC's Dev split joins the train pool because only Test is used for evaluation.
MIRROR_FILES: dict[str, dict[str, list[str]]] = {
    "strategyqa": {"train": ["strategyqa/train.json"], "test": ["strategyqa/dev.json"]},
    "ecqa": {"train": [], "test": ["ecqa/cqa_data_test.csv"]},
    "arc_challenge": {
        "train": ["arc_challenge/ARC-Challenge-Train.jsonl", "arc_challenge/ARC-Challenge-Dev.jsonl"],
        "test": ["arc_challenge/ARC-Challenge-Test.jsonl"],
    },
    "gsm8k": {"train": ["gsm8k/train.jsonl"], "test": ["gsm8k/test.jsonl"]},
    "math": {"train": [], "test": []},  # not mirrored
    "boolq": {"train": [], "test": ["boolq/val.jsonl"]},
    "svamp": {"train": [], "test": ["svamp/SVAMP.json"]},
}

#: Mirrored tasks whose only file is a test file that must also supply training questions: the fraction of
#: the test file moved (deterministically, see :data:`POOL_SPLIT_SEED`) into a disjoint train pool.
#: The mirror holds only ECQA's test CSV; its official train split is available from the hub.
CARVE_TRAIN_FROM_TEST: dict[str, float] = {"ecqa": 0.5, "svamp": 0.5}

#: Seed of the pool carve above. Fixed rather than ``data.seed`` so that the pools -- and therefore the
#: guarantee that no test question is ever trained on -- do not move when the sampling seed changes.
POOL_SPLIT_SEED = 0


@dataclass(frozen=True)
class HubSource:
    """Where a task lives on the Hugging Face hub.

    ``splits`` maps our pools to hub split names; a pool with several splits concatenates them in order,
    and ``configs`` (several for MATH, one subject each) are concatenated in order too.
    """

    path: str
    configs: tuple[str | None, ...]
    splits: dict[str, tuple[str, ...]]


#: Task -> hub dataset. Pools mirror :data:`MIRROR_FILES` where the hub allows (dev/validation splits join
#: train; boolq and svamp stay eval-only), so switching ``data.source`` changes as little as possible.
HUB_SOURCES: dict[str, HubSource] = {
    # ChilleD's test split is a re-split of StrategyQA train, not the 229-question dev set in the mirror.
    "strategyqa": HubSource("ChilleD/StrategyQA", (None,), {"train": ("train",), "test": ("test",)}),
    # tasksource/ecqa has the same columns as the mirrored CSV plus the official train/validation splits.
    "ecqa": HubSource("tasksource/ecqa", (None,), {"train": ("train", "validation"), "test": ("test",)}),
    "arc_challenge": HubSource(
        "allenai/ai2_arc", ("ARC-Challenge",), {"train": ("train", "validation"), "test": ("test",)}
    ),
    "gsm8k": HubSource("openai/gsm8k", ("main",), {"train": ("train",), "test": ("test",)}),
    "math": HubSource(
        "EleutherAI/hendrycks_math",
        (
            "algebra",
            "counting_and_probability",
            "geometry",
            "intermediate_algebra",
            "number_theory",
            "prealgebra",
            "precalculus",
        ),
        {"train": ("train",), "test": ("test",)},
    ),
    "boolq": HubSource("google/boolq", (None,), {"train": (), "test": ("validation",)}),
    # SVAMP is a 1000-question challenge set; its hub train/test halves together equal SVAMP.json.
    "svamp": HubSource("ChilleD/SVAMP", (None,), {"train": (), "test": ("train", "test")}),
}


class MissingBenchmark(Exception):
    """The chosen source has no data for this task; callers skip the task and print :attr:`reason`."""

    def __init__(self, task: str, reason: str) -> None:
        super().__init__(f"{task}: {reason}")
        self.task = task
        self.reason = reason


class MirrorFileMissing(FileNotFoundError):
    """The task's mirror directory exists but a declared file does not: a broken mirror, not a skip."""


class HubUnavailable(RuntimeError):
    """``datasets.load_dataset`` failed (typically: no network); the message says how to fall back."""


class Malformed(ValueError):
    """One raw row cannot be normalised; the message is the short reason recorded in the report."""


@dataclass
class LoadReport:
    """What happened while loading one task, so malformed or missing data is visible in stage summaries."""

    task: str
    n_raw: int = 0
    n_malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)
    skipped: bool = False
    reason: str | None = None

    def add_malformed(self, reason: str) -> None:
        self.n_malformed += 1
        if len(self.malformed_examples) < MAX_MALFORMED_EXAMPLES:
            self.malformed_examples.append(reason)


# --------------------------------------------------------------------------------------------------------
# Field helpers
# --------------------------------------------------------------------------------------------------------


def _req(raw: Row, key: str) -> Any:
    """``raw[key]``, treating absent, null and blank-string values alike as a malformed row."""
    value = raw.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise Malformed(f"missing '{key}'")
    return value


def _text(raw: Row, key: str) -> str:
    value = _req(raw, key)
    if not isinstance(value, str):
        raise Malformed(f"'{key}' is {type(value).__name__}, expected a string")
    return value.strip()


def _opt_text(value: Any) -> str | None:
    """Optional free text: blank or non-string becomes None rather than a malformed row."""
    if not isinstance(value, str):
        return None
    return value.strip() or None


def _yes_no(raw: Row, key: str) -> str:
    value = _req(raw, key)
    if not isinstance(value, bool):
        raise Malformed(f"'{key}' is {value!r}, expected true/false")
    return "yes" if value else "no"


def _row(
    task: str, id_: Any, question: str, choices: list[str] | None, answer: str, explanation: str | None
) -> Row:
    return {
        "id": str(id_),
        "task": task,
        "question": question,
        "choices": choices,
        "answer": answer,
        "explanation": explanation,
    }


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_CALCULATOR = re.compile(r"<<[^>]*>>")


def canonical_number(value: Any) -> str:
    """``8.0 -> "8"``, ``"1,080" -> "1080"``, ``2.5 -> "2.5"``: one spelling per number, for exact-match scoring."""
    try:
        number = float(str(value).replace(",", "").strip())
    except ValueError:
        raise Malformed(f"answer {value!r} is not a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise Malformed(f"answer {value!r} is not a finite number")
    return str(int(number)) if number.is_integer() else repr(number)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced; None if absent.

    Brace counting rather than a regex because MATH answers nest braces (``\\boxed{\\frac{1}{2}}``).
    ``\\boxed 5`` (no braces) yields ``5``.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox")) :]
    if rest.startswith(" "):
        match = re.match(r"\s+([^\s$]+)", rest)
        return match.group(1) if match else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, char in enumerate(rest):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i].strip()
    return None


# --------------------------------------------------------------------------------------------------------
# One normaliser per task: raw record (mirror or hub field names) + fallback id -> schema row
# --------------------------------------------------------------------------------------------------------


def _norm_strategyqa(raw: Row, default_id: str) -> Row:
    facts = raw.get("facts") or []
    if isinstance(facts, str):  # some hub copies store facts pre-joined
        facts = [facts]
    explanation = " ".join(f.strip() for f in facts if isinstance(f, str) and f.strip()) or None
    id_ = raw.get("qid") or default_id
    return _row("strategyqa", id_, _text(raw, "question"), None, _yes_no(raw, "answer"), explanation)


def _norm_ecqa(raw: Row, default_id: str) -> Row:
    """ECQA stores the gold option as text; the letter is the first option equal to it.

    A handful of CommonsenseQA questions repeat an option verbatim; the first copy's letter is gold there.
    """
    choices = [_text(raw, f"q_op{k}") for k in range(1, 6)]
    gold = _text(raw, "q_ans")
    folded = [c.casefold() for c in choices]
    if gold.casefold() not in folded:
        raise Malformed(f"q_ans {gold!r} is none of the options {choices}")
    answer = LETTERS[folded.index(gold.casefold())]
    id_ = raw.get("q_no") or default_id
    return _row("ecqa", id_, _text(raw, "q_text"), choices, answer, _opt_text(raw.get("taskA_pos")))


def _arc_choices(raw: Row) -> tuple[str, list[dict[str, str]]]:
    """Mirror rows nest ``{stem, choices: [{text, label}]}``; hub rows have ``question`` and ``choices`` columns."""
    question = _req(raw, "question")
    if isinstance(question, dict):
        return _text(question, "stem"), list(_req(question, "choices"))
    choices = _req(raw, "choices")
    if isinstance(choices, dict):
        texts, labels = choices.get("text") or [], choices.get("label") or []
        if len(texts) != len(labels):
            raise Malformed(f"{len(texts)} choice texts but {len(labels)} labels")
        choices = [{"text": t, "label": lab} for t, lab in zip(texts, labels, strict=True)]
    return _text(raw, "question"), list(choices)


def _norm_arc(raw: Row, default_id: str) -> Row:
    """Choices in label order; the answer is the letter of the gold label's position ("1".."4" -> A..D)."""
    stem, options = _arc_choices(raw)
    try:
        labels = [str(o["label"]).strip() for o in options]
        texts = [str(o["text"]).strip() for o in options]
    except (KeyError, TypeError):
        raise Malformed("choices lack 'label'/'text'") from None
    if all(lab.isdigit() for lab in labels):
        order = sorted(range(len(labels)), key=lambda i: int(labels[i]))
    elif all(len(lab) == 1 and lab.isalpha() for lab in labels):
        order = sorted(range(len(labels)), key=lambda i: labels[i].upper())
    else:
        raise Malformed(f"choice labels {labels} are neither letters nor digits")
    labels = [labels[i].upper() for i in order]
    if len(labels) < 2 or len(labels) > len(LETTERS) or len(set(labels)) != len(labels):
        raise Malformed(f"bad choice labels {labels}")
    key = str(_req(raw, "answerKey")).strip().upper()
    if key not in labels:
        raise Malformed(f"answerKey {key!r} is none of the labels {labels}")
    answer = LETTERS[labels.index(key)]
    return _row("arc_challenge", raw.get("id") or default_id, stem, [texts[i] for i in order], answer, None)


def _norm_gsm8k(raw: Row, default_id: str) -> Row:
    """Answer = the number after ``####``; explanation = the worked solution minus ``<<...>>`` calculator calls."""
    solution = _text(raw, "answer")
    if "####" not in solution:
        raise Malformed("answer has no '####' final line")
    body, _, final = solution.rpartition("####")
    answer = final.strip().replace(",", "")
    if not _NUMBER.fullmatch(answer):
        raise Malformed(f"final answer {final.strip()!r} is not a number")
    explanation = _CALCULATOR.sub("", body).strip() or None
    return _row("gsm8k", default_id, _text(raw, "question"), None, answer, explanation)


def _norm_math(raw: Row, default_id: str) -> Row:
    solution = _text(raw, "solution")
    answer = last_boxed(solution)
    if not answer:
        raise Malformed("solution has no \\boxed{} answer")
    return _row("math", default_id, _text(raw, "problem"), None, answer, solution)


def _norm_boolq(raw: Row, default_id: str) -> Row:
    question = _text(raw, "question")
    if not question.endswith("?"):
        question += "?"
    prompt = f"Passage: {_text(raw, 'passage')}\nQuestion: {question}"
    answer = _yes_no(raw, "label" if "label" in raw else "answer")  # mirror: label, hub: answer
    return _row("boolq", default_id, prompt, None, answer, None)


def _norm_svamp(raw: Row, default_id: str) -> Row:
    question = f"{_text(raw, 'Body')} {_text(raw, 'Question')}"
    answer = canonical_number(_req(raw, "Answer"))
    return _row("svamp", raw.get("ID") or default_id, question, None, answer, _opt_text(raw.get("Equation")))


#: Task -> normaliser. Each takes one raw record (mirror or hub field names) and the positional fallback id
#: ``<task>-<pool>-<index>``, returns a schema row, and raises :class:`Malformed` with a reason otherwise.
NORMALISERS: dict[str, Callable[[Row, str], Row]] = {
    "strategyqa": _norm_strategyqa,
    "ecqa": _norm_ecqa,
    "arc_challenge": _norm_arc,
    "gsm8k": _norm_gsm8k,
    "math": _norm_math,
    "boolq": _norm_boolq,
    "svamp": _norm_svamp,
}

TASKS: tuple[str, ...] = tuple(NORMALISERS)


# --------------------------------------------------------------------------------------------------------
# Raw readers: yield (where, record-or-None) so malformed lines are reported with their position
# --------------------------------------------------------------------------------------------------------

#: (position such as "gsm8k/test.jsonl row 12", parsed record or None, parse error or None)
RawItem = tuple[str, Any, str | None]


def _iter_jsonl(path: Path, rel: str) -> Iterator[RawItem]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield f"{rel} row {lineno}", json.loads(line), None
            except json.JSONDecodeError as err:
                yield f"{rel} row {lineno}", None, f"invalid JSON ({err.msg})"


def _iter_json_list(path: Path, rel: str) -> Iterator[RawItem]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}); the mirror file is corrupt"
        ) from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, record in enumerate(data, 1):
        yield f"{rel} row {i}", record, None


def _iter_csv(path: Path, rel: str) -> Iterator[RawItem]:
    """csv module rather than line splitting: ECQA explanations contain quoted newlines."""
    with path.open(encoding="utf-8", newline="") as fh:
        for i, record in enumerate(csv.DictReader(fh), 1):
            if None in record:
                yield f"{rel} row {i}", None, "more fields than the header"
            else:
                yield f"{rel} row {i}", record, None


def _iter_file(path: Path, rel: str) -> Iterator[RawItem]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _iter_jsonl(path, rel)
    if suffix == ".json":
        return _iter_json_list(path, rel)
    if suffix == ".csv":
        return _iter_csv(path, rel)
    raise ValueError(f"{path}: no reader for '{suffix}' files")


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def _normalise_all(
    task: str, items: Iterator[tuple[str, str, Row | None, str | None]], report: LoadReport
) -> dict[str, list[Row]]:
    """Normalise ``(pool, position, record, parse_error)`` items; count every failure and duplicate id."""
    normalise = NORMALISERS[task]
    pools: dict[str, list[Row]] = {"train": [], "test": []}
    seen: dict[str, str] = {}
    counters = {"train": 0, "test": 0}
    for pool, where, record, error in items:
        report.n_raw += 1
        index = counters[pool]
        counters[pool] += 1
        if error is None and not isinstance(record, dict):
            error = f"not a JSON object ({type(record).__name__})"
        if error is None:
            try:
                row = normalise(record, f"{task}-{pool}-{index:05d}")  # type: ignore[arg-type]
            except Malformed as err:
                error = str(err)
            except (ValueError, TypeError, KeyError, AttributeError) as err:  # odd types in a raw field
                error = f"{type(err).__name__}: {err}"
            else:
                if row["id"] in seen:
                    error = f"duplicate id {row['id']!r} (first at {seen[row['id']]})"
                else:
                    seen[row["id"]] = where
                    pools[pool].append(row)
        if error is not None:
            report.add_malformed(f"{where}: {error}")
    return pools


def _carve_train(pools: dict[str, list[Row]], fraction: float) -> dict[str, list[Row]]:
    """Split the test pool into disjoint train/test pools, independent of file order."""
    rows = sorted(pools["test"], key=lambda r: r["id"])
    random.Random(POOL_SPLIT_SEED).shuffle(rows)
    n_train = round(len(rows) * fraction)
    return {"train": pools["train"] + rows[:n_train], "test": rows[n_train:]}


def _load_mirror(task: str, mirror_dir: Path, report: LoadReport) -> dict[str, list[Row]]:
    if not mirror_dir.is_dir():
        raise FileNotFoundError(
            f"mirror directory {mirror_dir} does not exist; set paths.mirror_dir, or data.source: hub"
        )
    files = MIRROR_FILES[task]
    declared = files["train"] + files["test"]
    hint = "(set data.source: hub with network access)"
    if not declared:
        raise MissingBenchmark(task, f"not in mirror {mirror_dir} {hint}")
    task_dirs = {(mirror_dir / rel).parent for rel in declared}
    if not any(d.is_dir() for d in task_dirs):
        raise MissingBenchmark(task, f"no {', '.join(sorted(str(d) for d in task_dirs))} in mirror {hint}")
    for rel in declared:
        if not (mirror_dir / rel).is_file():
            raise MirrorFileMissing(f"{task}: declared mirror file {mirror_dir / rel} is missing")

    def items() -> Iterator[tuple[str, str, Row | None, str | None]]:
        for pool in ("train", "test"):
            for rel in files[pool]:
                for where, record, error in _iter_file(mirror_dir / rel, rel):
                    yield pool, where, record, error

    pools = _normalise_all(task, items(), report)
    if not files["train"] and task in CARVE_TRAIN_FROM_TEST:
        pools = _carve_train(pools, CARVE_TRAIN_FROM_TEST[task])
    return pools


def _load_hub(task: str, report: LoadReport) -> dict[str, list[Row]]:
    spec = HUB_SOURCES[task]
    try:
        from datasets import load_dataset  # lazy: heavy import, and unused by mirror runs
    except ImportError as err:
        raise HubUnavailable(f"{task}: data.source is hub but `datasets` is not importable ({err})") from err

    def fetch(config: str | None, split: str) -> Any:
        try:
            return load_dataset(spec.path, config, split=split)
        except Exception as err:  # any hub failure means the same thing to the caller
            raise HubUnavailable(
                f"{task}: could not load {spec.path}"
                f"{f' config {config}' if config else ''} split {split} from the Hugging Face hub "
                f"({type(err).__name__}: {err}). Without network access use data.source: mirror."
            ) from err

    def items() -> Iterator[tuple[str, str, Row | None, str | None]]:
        for pool in ("train", "test"):
            for config in spec.configs:
                for split in spec.splits[pool]:
                    where = f"{spec.path}{f'/{config}' if config else ''}:{split}"
                    for i, record in enumerate(fetch(config, split), 1):
                        yield pool, f"{where} row {i}", dict(record), None

    return _normalise_all(task, items(), report)


def load_benchmark(
    task: str, source: Source = "mirror", mirror_dir: Path | str | None = None
) -> tuple[dict[str, list[Row]], LoadReport]:
    """Load one task as ``{"train": [...], "test": [...]}`` schema rows plus a :class:`LoadReport`.

    Pools are complete (sampling is :func:`sample_splits`' job) so that the same pools serve every seed.
    Raises :class:`MissingBenchmark` when the source has no data for the task (callers skip it),
    :class:`MirrorFileMissing` when the mirror is incomplete, :class:`HubUnavailable` when the hub fails,
    and ``ValueError`` for an unknown task or source.
    """
    if task not in NORMALISERS:
        raise ValueError(f"unknown benchmark {task!r}; known: {sorted(NORMALISERS)}")
    report = LoadReport(task=task)
    if source == "mirror":
        if mirror_dir is None:
            raise ValueError("source 'mirror' needs mirror_dir")
        pools = _load_mirror(task, Path(mirror_dir), report)
    elif source == "hub":
        pools = _load_hub(task, report)
    else:
        raise ValueError(f"unknown data source {source!r}; expected 'mirror' or 'hub'")
    return pools, report


# --------------------------------------------------------------------------------------------------------
# Sampling and I/O
# --------------------------------------------------------------------------------------------------------


def _ids_unique(rows: list[Row], pool: str) -> None:
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{pool} pool has duplicate id {dup!r}; sampling would depend on row order")


def sample_splits(pools: dict[str, list[Row]], n_train: int, n_test: int, seed: int) -> dict[str, list[Row]]:
    """Fixed seeded subsets of each pool: the questions every method is trained and tested on.

    Deterministic regardless of pool order (rows are sorted by id, then shuffled with ``random.Random(seed)``);
    a pool smaller than ``n`` is taken whole; ids drawn for test are excluded from train, so the two never
    share a question even if the pools overlap.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"sample sizes must be >= 0, got n_train={n_train}, n_test={n_test}")

    def draw(rows: list[Row], n: int) -> list[Row]:
        ordered = sorted(rows, key=lambda r: r["id"])
        random.Random(seed).shuffle(ordered)
        return ordered[:n]

    train_pool, test_pool = pools.get("train", []), pools.get("test", [])
    _ids_unique(train_pool, "train")
    _ids_unique(test_pool, "test")
    test = draw(test_pool, n_test)
    test_ids = {r["id"] for r in test}
    train = draw([r for r in train_pool if r["id"] not in test_ids], n_train)
    return {"train": train, "test": test}


def write_jsonl(path: Path, rows: list[Row]) -> None:
    """One JSON object per line, UTF-8; written to a temp file then renamed so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[Row]:
    """Rows of a JSONL file (blank lines ignored); a bad line raises ``ValueError`` naming file and line."""
    path = Path(path)
    rows: list[Row] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def prepare_all(
    benchmarks: list[str],
    source: Source,
    mirror_dir: Path,
    out_dir: Path,
    n_train: int,
    n_test: int,
    seed: int,
    n_train_by_task: Mapping[str, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Write ``out_dir/<task>/{train,test}.jsonl`` for every available task and return a per-task summary.

    ``n_train_by_task`` sizes some tasks' training draws differently from ``n_train`` (each a prefix of the
    task's seeded draw, so raising one only adds questions).

    Unavailable tasks (e.g. MATH from the mirror) are skipped with a printed reason instead of failing the
    stage, so an offline run still produces every benchmark it can; a broken mirror or hub still raises.
    Eval-only tasks get an empty ``train.jsonl`` so downstream stages can rely on both files existing.
    """
    summary: dict[str, dict[str, Any]] = {}
    for task in tqdm(benchmarks, desc="benchmarks", unit="task"):
        try:
            if task not in NORMALISERS:
                raise MissingBenchmark(task, f"no loader in magdi.data (supported: {', '.join(NORMALISERS)})")
            pools, report = load_benchmark(task, source, mirror_dir)
        except MissingBenchmark as err:
            tqdm.write(f"{task}: skipped — {err.reason}")
            summary[task] = {
                "status": "skipped",
                "reason": err.reason,
                "n_train": 0,
                "n_test": 0,
                "n_raw": 0,
                "n_malformed": 0,
            }
            continue
        if report.n_malformed:
            tqdm.write(
                f"{task}: {report.n_malformed} of {report.n_raw} raw rows malformed and left out, e.g. "
                + "; ".join(report.malformed_examples[:3])
            )
        splits = sample_splits(pools, (n_train_by_task or {}).get(task, n_train), n_test, seed)
        for name, rows in splits.items():
            write_jsonl(Path(out_dir) / task / f"{name}.jsonl", rows)
        summary[task] = {
            "status": "ok",
            "reason": None,
            "n_train": len(splits["train"]),
            "n_test": len(splits["test"]),
            "n_raw": report.n_raw,
            "n_malformed": report.n_malformed,
            "malformed_examples": report.malformed_examples,
        }
    return summary
