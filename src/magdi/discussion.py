"""The ReConcile protocol: agents answer, see each other's answers, revise, until consensus.

Round 0: every agent answers independently with JSON ``{reasoning, answer, confidence}``.
Round r >= 1: every agent sees all agents' round r-1 answers, reasonings and confidences and revises.
Stop at consensus (all agents give the same answer) or after ``max_rounds``. Team answer: a vote weighted
by ReConcile's recalibrated confidences. Every node becomes a MAG node (``magdi.mag``).

Rounds are synchronous across a chunk of questions so each agent's calls are batched; finished MAGs are
appended durably, and every teacher call is cached, so a killed run restarts where it stopped.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from .cache import CallCache, cache_key
from .mag import MAG, Node, append_mag, read_mags, tail_compression
from .scoring import extract_answer, is_correct, normalize_gold
from .student import ANSWER_FORMATS, Generation, chat_prompt, generate, question_text

JSON_INSTRUCTION = (
    'Reply with one JSON object with the keys "reasoning" (your step-by-step reasoning), '
    '"answer" (the final answer only) and "confidence" (how sure you are, from 0.0 to 1.0).'
)
#: Prefilled start of a local model's reply: small models follow the format far more often with it.
RESPONSE_PREFIX = '{"reasoning": "'


class ChatBackend(Protocol):
    def generate(
        self, messages_batch: list[list[dict]], temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> list[dict]: ...


@dataclass(frozen=True)
class Request:
    """One chat call with its own sampling settings (several agents' calls can share a batch)."""

    messages: list[dict]
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int


@dataclass(frozen=True)
class Agent:
    """One discussion participant: a backend plus the sampling settings that make it a distinct voice."""

    name: str
    backend: ChatBackend | None  # None = reference agent (replays the dataset's explanation)
    persona: str
    temperature: float
    top_p: float
    seed: int
    max_new_tokens: int

    @property
    def is_reference(self) -> bool:
        return self.backend is None


class LocalBackend:
    """A transformers model on this machine, with the same cache semantics as the HTTP backend.

    ``generate_many`` lets the agents that share this model (personas of one local model) decode their
    requests in one batch with per-row sampling: on CPU a decode step costs about the same for 8 or 16
    rows, so two agents together take about the time of one.
    """

    def __init__(self, model, tokenizer, model_id: str, cache: CallCache, batch_size: int = 8,
                 loader: Callable[[], tuple[Any, Any]] | None = None):
        if model is None and loader is None:
            raise ValueError("LocalBackend needs a model or a loader")
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.cache, self.batch_size = cache, batch_size
        self._loader = loader

    def _ensure_loaded(self) -> None:
        """Load the model on the first cache miss: a fully cached discussion never pays for loading it."""
        if self.model is None:
            self.model, self.tokenizer = self._loader()  # type: ignore[misc]

    def generate(self, messages_batch, temperature, top_p, max_new_tokens, seed):
        return self.generate_many([Request(m, temperature, top_p, max_new_tokens, seed) for m in messages_batch])

    def generate_many(self, requests: list[Request]) -> list[dict]:
        keys = [cache_key(self.model_id, r.messages, _sampling(r)) for r in requests]
        got = [self.cache.get_finished(partial(self._key_at, r), r.max_new_tokens) for r in requests]
        todo = [i for i, g in enumerate(got) if g is None]
        by_len: dict[int, list[int]] = defaultdict(list)  # one generate call per max_new_tokens
        for i in todo:
            by_len[requests[i].max_new_tokens].append(i)
        if todo:
            self._ensure_loaded()
            made_by = self._made_by()
        for max_new, rows in by_len.items():
            for start in range(0, len(rows), self.batch_size):
                idx = rows[start : start + self.batch_size]
                prompts = [chat_prompt(self.tokenizer, requests[i].messages) + RESPONSE_PREFIX for i in idx]
                # the seed mixes in the first key so that different batches draw different samples
                gens: list[Generation] = generate(
                    self.model, self.tokenizer, prompts, max_new,
                    [requests[i].temperature for i in idx], [requests[i].top_p for i in idx],
                    seed=requests[idx[0]].seed + int(keys[idx[0]][:6], 16))
                for i, g in zip(idx, gens, strict=True):
                    got[i] = {"text": RESPONSE_PREFIX + g.text, "n_tokens": g.n_tokens, **made_by}
                    self.cache.put(keys[i], got[i])
        return got  # type: ignore[return-value]

    def _made_by(self) -> dict[str, str]:
        """Recorded beside each new reply (not in its key, so the cache replays on any machine): the dtype the
        model decoded in and the CPU class, whose kernels decide the exact sampled tokens (``magdi.precision``)."""
        from .precision import capabilities, cpu_class

        dtype = str(getattr(self.model, "dtype", "unknown")).removeprefix("torch.")
        return {"precision": dtype, "cpu_class": cpu_class(capabilities())}

    def _key_at(self, r: Request, max_new_tokens: int) -> str:
        return cache_key(self.model_id, r.messages, {**_sampling(r), "max_new_tokens": max_new_tokens})


def _sampling(r: Request) -> dict:
    return {"temperature": r.temperature, "top_p": r.top_p, "max_new_tokens": r.max_new_tokens,
            "seed": r.seed, "prefix": RESPONSE_PREFIX}


def call_backend(backend: ChatBackend, requests: list[Request]) -> list[dict]:
    """All requests through one backend: in shared batches when it can (``generate_many``), else grouped
    by sampling settings into ``generate`` calls (an HTTP backend sends requests one by one anyway)."""
    if hasattr(backend, "generate_many"):
        return backend.generate_many(requests)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(requests):
        groups[(r.temperature, r.top_p, r.max_new_tokens, r.seed)].append(i)
    out: list[dict | None] = [None] * len(requests)
    for (temp, top_p, max_new, seed), idx in groups.items():
        for i, reply in zip(idx, backend.generate([requests[i].messages for i in idx], temp, top_p, max_new, seed),
                            strict=True):
            out[i] = reply
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- prompts


def round0_messages(agent: Agent, example: dict, answer_type: str) -> list[dict]:
    user = f"{question_text(example)}\n{ANSWER_FORMATS[answer_type]}\n{JSON_INSTRUCTION}"
    return [{"role": "system", "content": agent.persona}, {"role": "user", "content": user}]


def discussion_messages(
    agent: Agent, example: dict, answer_type: str, previous: list[Node], context_chars: int
) -> list[dict]:
    """ReConcile's discussion prompt: the question plus every agent's previous answer, reasoning, confidence."""
    lines = []
    for n in previous:
        reasoning = n.reasoning if len(n.reasoning) <= context_chars else n.reasoning[:context_chars] + "..."
        lines.append(f"- {n.agent}: answer {n.answer or 'none'} (confidence {n.confidence:.2f}). Reasoning: {reasoning}")
    user = (
        f"{question_text(example)}\n\nAnswers of all agents in the previous round:\n" + "\n".join(lines)
        + "\n\nReview these answers and their reasoning critically, then give your updated answer.\n"
        + f"{ANSWER_FORMATS[answer_type]}\n{JSON_INSTRUCTION}"
    )
    return [{"role": "system", "content": agent.persona}, {"role": "user", "content": user}]


# ReConcile as published (github.com/dinobby/ReConcile, utils.prepare_context_for_chat_assistant and
# generation.gpt_debate), adapted only where our tasks differ: options are lettered (ECQA there used 1-5),
# and MATH, which ReConcile did not run, asks for the final LaTeX expression.
RECONCILE_ANSWER_RULE = {
    "yesno": 'Only answer yes or no in the "answer" field.',
    "number": 'Only place a single numeric value in the "answer" field.',
    "choice": 'Only place {letters} representing your choice in the "answer" field.',
    "latex": 'Only place the final answer as a LaTeX expression in the "answer" field.',
}
RECONCILE_JSON = ('Output your answer in json format, with the format as follows: {"reasoning": "", "answer": "", '
                  '"confidence_level": ""}. Please strictly output in JSON format.')
RECONCILE_REVIEW = ("\n\nCarefully review the following solutions from other agents as additional information, "
                    "and provide your own answer and step-by-step reasoning to the question.")
RECONCILE_STANCE = "Clearly states that which pointview do you agree or disagree and why.\n\n"


def reconcile_round0_messages(agent: Agent, example: dict, answer_type: str,
                              convincing: list[dict] | None = None) -> list[dict]:
    """ReConcile's round-0 prompt: convincing samples as few-shot turns (a question, then its gold
    explanation and answer as the assistant's reply), then the question and the answer/JSON rules."""
    msgs: list[dict] = [{"role": "system", "content": agent.persona}]
    for cs in convincing or []:
        msgs.append({"role": "user", "content": f"Q: {question_text(cs)}"})
        msgs.append({"role": "assistant", "content": str({"reasoning": cs["explanation"], "answer": cs["answer"]})})
    user = f"Q: {example['question'].strip()}"
    if example.get("choices"):
        opts = " ".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(example["choices"]))
        user += f" The options are: {opts}. Please select an option as your answer."
    rule = RECONCILE_ANSWER_RULE[answer_type]
    if answer_type == "choice":
        rule = rule.format(letters=",".join(chr(65 + i) for i in range(len(example.get("choices") or "ABCDE"))))
    user += (" Please answer the question with step-by-step reasoning."
             " Also, evaluate your confidence level (between 0.0 and 1.0) to indicate the possibility of your"
             f" answer being right. {RECONCILE_JSON} {rule} Do not output irrelevant content.")
    msgs.append({"role": "user", "content": user})
    return msgs


def group_previous_answers(previous: list[Node], context_chars: int) -> str:
    """ReConcile's discussion context: the two most common previous answers, each with its count and the
    solution of every agent that gave it ("I think the answer is X because ... My confidence level is c.").
    Nodes without an answer are left out; as published, a third answer group is not shown."""
    answered = [n for n in previous if n.answer is not None]
    counts: dict[str, int] = {}
    for n in answered:
        counts[n.answer] = counts.get(n.answer, 0) + 1  # type: ignore[index]
    top = sorted(counts, key=lambda a: -counts[a])[:2]  # stable: ties keep first-seen order (Counter.most_common)
    parts = []
    for ans in top:
        sols = []
        for n in answered:
            if n.answer == ans:
                why = n.reasoning if len(n.reasoning) <= context_chars else n.reasoning[:context_chars] + "..."
                sols.append(f"One agent's solution: I think the answer is {ans} because {why} "
                            f"My confidence level is {n.confidence}.")
        agents = "agent who thinks" if counts[ans] == 1 else "agents who think"
        parts.append(f"There {'is' if counts[ans] == 1 else 'are'} {counts[ans]} {agents} the answer is {ans}. "
                     + "\n".join(sols) + "\n\n")
    return "".join(parts)


def reconcile_discussion_messages(agent: Agent, example: dict, answer_type: str, previous: list[Node],
                                  context_chars: int, convincing: list[dict] | None = None) -> list[dict]:
    """ReConcile's round r >= 1 prompt: the round-0 prompt (convincing samples included) plus the request
    to review the grouped previous answers and say which view the agent agrees or disagrees with."""
    msgs = reconcile_round0_messages(agent, example, answer_type, convincing)
    extra = [RECONCILE_REVIEW, RECONCILE_STANCE, group_previous_answers(previous, context_chars), RECONCILE_JSON]
    msgs[-1] = {"role": "user", "content": msgs[-1]["content"] + " ".join(extra)}
    return msgs


def select_convincing(done: list[MAG], examples: dict[str, dict], agents: list[Agent], agent: str,
                      per_agent: int) -> list[dict]:
    """Convincing samples for ``agent``: for every other (non-reference) agent, the first ``per_agent``
    already-built questions that agent answered correctly in round 0 and that have a gold explanation;
    shown with the dataset's explanation and gold answer (ReConcile's ``convincing_samples`` of the
    other agents). Questions still being discussed are never in ``done``, so no answer leaks."""
    out: list[dict] = []
    for other in agents:
        if other.name == agent or other.is_reference:
            continue
        picked = 0
        for m in done:
            ex = examples.get(m.id)
            if picked >= per_agent or ex is None or not (ex.get("explanation") or "").strip():
                continue
            if any(n.agent == other.name and n.round == 0 and n.correct for n in m.nodes):
                out.append({"question": ex["question"], "choices": ex.get("choices"),
                            "explanation": ex["explanation"].strip(), "answer": m.gold})
                picked += 1
    return out


def reference_reply(example: dict) -> dict:
    """The opt-in offline 'reference' agent: the dataset's own explanation and gold answer."""
    expl = (example.get("explanation") or "").strip()
    if not expl and example.get("choices"):
        letter = example["answer"]
        expl = f"The correct option is ({letter}) {example['choices'][ord(letter) - 65]}."
    return {"text": json.dumps({"reasoning": expl, "answer": example["answer"], "confidence": 1.0}),
            "n_tokens": len(expl.split()) + 4}


# ----------------------------------------------------------------------------- parsing

_FIELD = {
    "reasoning": re.compile(r'"reasoning"\s*:\s*"((?:[^"\\]|\\.)*)', re.S),
    "answer": re.compile(r'"answer"\s*:\s*"?((?:[^"\\,}\n]|\\.)*)'),
    "confidence": re.compile(r'"confidence(?:_level)?"\s*:\s*"?([0-9]*\.?[0-9]+)'),  # ReConcile: _level
}


def _json_object(text: str) -> dict | None:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        obj = json.loads(text[start : end + 1])
    except (json.JSONDecodeError, RecursionError):  # RecursionError: absurdly nested brackets
        return None
    return obj if isinstance(obj, dict) else None


def _unescape(s: str) -> str:
    """Decode the JSON escapes of a field recovered by regex (strictly parsed fields are already decoded;
    decoding those again would turn LaTeX such as ``\\neq`` into a newline)."""
    try:
        return json.loads(f'"{s}"', strict=False)
    except json.JSONDecodeError:  # e.g. cut off mid-escape
        return s.replace("\\n", "\n").replace('\\"', '"')


#: Longest tail of a reply's "answer" field that is read (see ``parse_reply``).
MAX_ANSWER_CHARS = 1000


def parse_reply(text: str, answer_type: str, choices: list[str] | None) -> dict | None:
    """Reply text -> {reasoning, answer, confidence}, or None when no valid answer can be read.

    Strict JSON first; then field-wise recovery (small models often break JSON quoting); the answer is
    canonicalised by the task's scorer so that consensus compares like with like.
    """
    obj = _json_object(text) or {}
    fields: dict[str, Any] = {k: obj.get(k) for k in ("reasoning", "answer", "confidence")}
    if fields["confidence"] is None:
        fields["confidence"] = obj.get("confidence_level")  # the key of ReConcile's published prompt
    for k, rx in _FIELD.items():
        if fields[k] in (None, ""):
            m = rx.search(text)
            fields[k] = _unescape(m.group(1).strip()) if m else None
    raw_answer = fields["answer"]
    if raw_answer is None or str(raw_answer).strip() == "":
        return None
    # an "answer" field is a short final answer; only its tail can matter, and scanning a huge one (untrusted
    # model text) for answer markers would take seconds per reply
    raw_answer = str(raw_answer)[-MAX_ANSWER_CHARS:]
    answer = extract_answer(f"The answer is {raw_answer}", answer_type, choices)
    if answer is None:
        answer = extract_answer(str(raw_answer), answer_type, choices)
    if answer is None:
        return None
    try:
        conf = float(fields["confidence"])
    except (TypeError, ValueError):
        conf = 0.5
    conf = conf / 100 if 1 < conf <= 100 else conf
    reasoning = fields["reasoning"]
    if not isinstance(reasoning, str):
        reasoning = json.dumps(reasoning) if reasoning is not None else ""
    return {"reasoning": reasoning.strip(), "answer": answer,
            "confidence": min(max(conf, 0.0), 1.0)}


# ----------------------------------------------------------------------------- voting


def recalibrate(conf: float) -> float:
    """ReConcile's confidence recalibration (LLMs are over-confident): bucketed weights."""
    if conf >= 1.0:
        return 1.0
    if conf >= 0.9:
        return 0.8
    if conf >= 0.8:
        return 0.5
    if conf > 0.6:
        return 0.3
    return 0.1


def weighted_vote(nodes: list[Node]) -> str | None:
    """Team answer: sum of recalibrated confidences per answer; ties go to the earliest agent's answer."""
    score: dict[str, float] = defaultdict(float)
    order: list[str] = []
    for n in nodes:
        if n.answer is None:
            continue
        if n.answer not in score:
            order.append(n.answer)
        score[n.answer] += recalibrate(n.confidence)
    if not order:
        return None
    return max(order, key=lambda a: (score[a], -order.index(a)))


def consensus(nodes: list[Node]) -> bool:
    answers = {n.answer for n in nodes}
    return len(nodes) > 0 and None not in answers and len(answers) == 1


# ----------------------------------------------------------------------------- the protocol


def _ask(agents: list[Agent], build: Callable[[Agent, int], list[dict]], examples: list[dict],
         answer_type: str, round_: int, parse_retries: int) -> dict[str, list[Node]]:
    """One round for a chunk of questions: every agent answers all of them, unparseable replies are retried.

    Agents that share a backend (e.g. two personas of one local model) are asked together, so their
    calls are batched; each keeps its own sampling settings and seed (part of the cache key).
    """
    n = len(examples)
    replies: dict[str, list[dict]] = {}
    parsed: dict[str, list[dict | None]] = {}
    groups: dict[int, list[Agent]] = defaultdict(list)
    for agent in agents:
        if agent.is_reference:
            replies[agent.name] = [reference_reply(ex) for ex in examples]
            parsed[agent.name] = [parse_reply(r["text"], answer_type, ex.get("choices"))
                                  for r, ex in zip(replies[agent.name], examples, strict=True)]
        else:
            groups[id(agent.backend)].append(agent)
    for group in groups.values():
        msgs = {a.name: [build(a, i) for i in range(n)] for a in group}
        pending = {a.name: list(range(n)) for a in group}
        for a in group:
            replies[a.name], parsed[a.name] = [None] * n, [None] * n  # type: ignore[list-item]
        for attempt in range(parse_retries + 1):
            asks = [(a, i) for a in group for i in pending[a.name]]
            if not asks:
                break
            got = call_backend(group[0].backend, [
                Request(msgs[a.name][i], a.temperature, a.top_p, a.max_new_tokens, a.seed + 1000 * attempt)
                for a, i in asks])
            for (a, i), r in zip(asks, got, strict=True):
                replies[a.name][i] = r
                parsed[a.name][i] = parse_reply(r["text"], answer_type, examples[i].get("choices"))
            pending = {a.name: [i for i in pending[a.name] if parsed[a.name][i] is None] for a in group}
    out: dict[str, list[Node]] = {ex["id"]: [] for ex in examples}
    for agent in agents:
        for ex, r, p in zip(examples, replies[agent.name], parsed[agent.name], strict=True):
            tail = tail_compression(r["text"])
            if p is None:  # recorded as an invalid node, never replaced with a made-up answer
                node = Node(agent.name, round_, r["text"], None, 0.0, False, r["n_tokens"], valid=False,
                            tail_compression=tail)
            else:
                node = Node(agent.name, round_, p["reasoning"], p["answer"], p["confidence"],
                            is_correct(p["answer"], ex["answer"], answer_type), r["n_tokens"],
                            tail_compression=tail)
            out[ex["id"]].append(node)
    return out


def discuss_chunk(agents: list[Agent], examples: list[dict], task: str, answer_type: str, max_rounds: int,
                  parse_retries: int = 1, context_chars: int = 600,
                  on_round: Callable[[int, int], None] | None = None, prompt_style: str = "compact",
                  convincing: dict[str, list[dict]] | None = None) -> list[MAG]:
    """Run the full protocol on a chunk of questions; return one MAG per question.

    ``on_round(round, n_active)`` is called before each round (progress display). ``prompt_style``:
    ``compact`` (our short prompt) or ``reconcile`` (the published one, with ``convincing`` samples per agent).
    """
    conv = convincing or {}
    reconcile = prompt_style == "reconcile"

    def first(a: Agent, ex: dict) -> list[dict]:
        if reconcile:
            return reconcile_round0_messages(a, ex, answer_type, conv.get(a.name))
        return round0_messages(a, ex, answer_type)

    def later(a: Agent, ex: dict, prev: list[Node]) -> list[dict]:
        if reconcile:
            return reconcile_discussion_messages(a, ex, answer_type, prev, context_chars, conv.get(a.name))
        return discussion_messages(a, ex, answer_type, prev, context_chars)

    examples = [{**ex, "answer": normalize_gold(ex["answer"], answer_type)} for ex in examples]
    by_id = {ex["id"]: ex for ex in examples}
    nodes: dict[str, list[Node]] = {ex["id"]: [] for ex in examples}
    if on_round:
        on_round(0, len(examples))
    last: dict[str, list[Node]] = _ask(agents, lambda a, i: first(a, examples[i]),
                                       examples, answer_type, 0, parse_retries)
    done: set[str] = set()
    for qid, ns in last.items():
        nodes[qid].extend(ns)
        if consensus(ns):
            done.add(qid)
    for r in range(1, max_rounds + 1):
        active = [by_id[q] for q in by_id if q not in done]
        if not active:
            break
        if on_round:
            on_round(r, len(active))
        prev = {ex["id"]: last[ex["id"]] for ex in active}
        last = _ask(agents, lambda a, i, act=active, pv=prev: later(a, act[i], pv[act[i]["id"]]),
                    active, answer_type, r, parse_retries)
        for qid, ns in last.items():
            nodes[qid].extend(ns)
            if consensus(ns):
                done.add(qid)
    mags = []
    for ex in examples:
        ns = nodes[ex["id"]]
        final_round = max(n.round for n in ns)
        voters = [n for n in ns if n.round == final_round and not _agent(agents, n.agent).is_reference]
        team = weighted_vote(voters)
        mags.append(MAG(
            id=ex["id"], task=task, question=ex["question"], gold=ex["answer"], nodes=ns,
            choices=ex.get("choices"), team_answer=team,
            team_correct=is_correct(team, ex["answer"], answer_type) if team is not None else False,
            consensus=consensus([n for n in ns if n.round == final_round]),
            meta={"explanation_available": bool(ex.get("explanation"))},
        ))
    return mags


def _agent(agents: list[Agent], name: str) -> Agent:
    return next(a for a in agents if a.name == name)


def build_mags(agents: list[Agent], examples: list[dict], task: str, answer_type: str, out_path: Path,
               max_rounds: int, chunk_size: int, parse_retries: int = 1, context_chars: int = 600,
               prompt_style: str = "compact", convincing_per_agent: int = 4) -> list[MAG]:
    """Resumable MAG construction: questions already in ``out_path`` are skipped, new MAGs appended.

    With ``prompt_style: reconcile`` each chunk's convincing samples come from the MAGs built before it
    (so the first chunk has none)."""
    have = {m.id for m in read_mags(out_path)}
    todo = [ex for ex in examples if ex["id"] not in have]
    by_id = {ex["id"]: {**ex, "answer": normalize_gold(ex["answer"], answer_type)} for ex in examples}
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=f"MAGs {task}", unit="q")
    for start in range(0, len(todo), chunk_size):
        conv = None
        if prompt_style == "reconcile":
            done = read_mags(out_path)
            conv = {a.name: select_convincing(done, by_id, agents, a.name, convincing_per_agent) for a in agents}
        for mag in discuss_chunk(agents, todo[start : start + chunk_size], task, answer_type, max_rounds,
                                 parse_retries, context_chars,
                                 on_round=lambda r, n: bar.set_postfix(round=r, discussing=n),
                                 prompt_style=prompt_style, convincing=conv):
            append_mag(out_path, mag)
        bar.update(len(todo[start : start + chunk_size]))
    bar.close()
    order = {ex["id"]: i for i, ex in enumerate(examples)}
    return sorted((m for m in read_mags(out_path) if m.id in order), key=lambda m: order[m.id])
