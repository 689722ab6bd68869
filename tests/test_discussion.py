"""The ReConcile protocol (``magdi.discussion``): reply parsing, recalibrated voting, the round loop with a
scripted fake teacher, the reference agent, crash/resume of ``build_mags`` with a real call cache, and the
cache semantics of ``LocalBackend`` on the tiny student."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

import magdi.discussion as disc
from magdi.cache import CallCache, cache_key
from magdi.discussion import (
    RESPONSE_PREFIX,
    Agent,
    LocalBackend,
    build_mags,
    consensus,
    discuss_chunk,
    parse_reply,
    recalibrate,
    reference_reply,
    weighted_vote,
)
from magdi.mag import MAG, Node, read_mags


# ============================================================================== parse_reply
def test_parse_strict_json() -> None:
    text = '{"reasoning": "2 plus 3 is 5.", "answer": "5", "confidence": 0.9}'
    assert parse_reply(text, "number", None) == {"reasoning": "2 plus 3 is 5.", "answer": "5", "confidence": 0.9}
    # surrounding chatter is ignored; a numeric JSON answer is canonicalised
    text = 'Sure! {"reasoning": "r", "answer": 5.0, "confidence": 1} Hope this helps.'
    assert parse_reply(text, "number", None) == {"reasoning": "r", "answer": "5", "confidence": 1.0}
    # the answer goes through the task's scorer: an option text maps to its letter
    text = '{"reasoning": "r", "answer": "(B) river", "confidence": 0.8}'
    assert parse_reply(text, "choice", ["bank", "river", "shop"])["answer"] == "B"
    text = '{"reasoning": "r", "answer": true, "confidence": 0.8}'
    assert parse_reply(text, "yesno", None)["answer"] == "yes"


def test_parse_broken_json_recovered_field_wise() -> None:
    # a literal newline inside a string and a trailing comma: not valid JSON
    text = '{"reasoning": "Add 2 and 3.\nSo 5", "answer": 5, "confidence": 85,}'
    assert parse_reply(text, "number", None) == {"reasoning": "Add 2 and 3.\nSo 5", "answer": "5",
                                                 "confidence": 0.85}
    # cut off by max_new_tokens (no closing brace); escapes of the recovered string are decoded
    text = '{"reasoning": "The sum is \\"5\\".\\nDone.", "answer": "5", "confidence": "85"'
    assert parse_reply(text, "number", None) == {"reasoning": 'The sum is "5".\nDone.', "answer": "5",
                                                 "confidence": 0.85}
    # no confidence anywhere -> 0.5
    assert parse_reply('{"reasoning": "x", "answer": "no"', "yesno", None)["confidence"] == 0.5


def test_parse_keeps_latex_backslashes_of_strict_json() -> None:
    # "\\neq" in JSON text is the LaTeX command \neq, not a newline followed by "eq"
    text = json.dumps({"reasoning": r"Since $x \neq 2$ and $\nu = 1$", "answer": "3", "confidence": 0.9})
    assert parse_reply(text, "latex", None)["reasoning"] == r"Since $x \neq 2$ and $\nu = 1$"


@pytest.mark.parametrize(
    ("text", "answer_type"),
    [
        ('{"reasoning": "hmm", "confidence": 0.3}', "number"),  # no answer field
        ('{"reasoning": "hmm", "answer": "", "confidence": 0.3}', "number"),  # empty answer
        ('{"reasoning": "hmm", "answer": "maybe", "confidence": 0.3}', "yesno"),  # not a yes/no
        ("I really do not know.", "number"),
        ("", "number"),
    ],
)
def test_parse_without_answer_is_none(text: str, answer_type: str) -> None:
    assert parse_reply(text, answer_type, None) is None


@pytest.mark.parametrize(
    ("conf", "expected"),
    [('"85"', 0.85), ("85", 0.85), ("100", 1.0), ("1", 1.0), ("0.3", 0.3), ("150", 1.0), ("-2", 0.0),
     ('"high"', 0.5), ("null", 0.5)],
)
def test_parse_confidence_scaled_and_clamped(conf: str, expected: float) -> None:
    text = f'{{"reasoning": "r", "answer": "5", "confidence": {conf}}}'
    assert parse_reply(text, "number", None)["confidence"] == pytest.approx(expected)


# ============================================================================== voting
@pytest.mark.parametrize(
    ("conf", "weight"),
    [(1.0, 1.0), (0.99, 0.8), (0.9, 0.8), (0.89, 0.5), (0.8, 0.5), (0.79, 0.3), (0.61, 0.3), (0.6, 0.1),
     (0.0, 0.1)],
)
def test_recalibrate_buckets(conf: float, weight: float) -> None:
    assert recalibrate(conf) == weight


def _n(agent: str, answer: str | None, conf: float) -> Node:
    return Node(agent, 0, "r", answer, conf, False)


def test_weighted_vote_by_hand() -> None:
    # "5": 0.3 + 0.3 = 0.6 ; "6": 0.8  -> "6" (one confident agent beats two lukewarm ones)
    assert weighted_vote([_n("a", "5", 0.7), _n("b", "6", 0.95), _n("c", "5", 0.65)]) == "6"
    # "5": 1.0 ; "6": 0.8 + 0.3 = 1.1 -> "6"
    assert weighted_vote([_n("a", "5", 1.0), _n("b", "6", 0.9), _n("c", "6", 0.7)]) == "6"
    # "5": 1.0 ; "6": 0.5 + 0.1 = 0.6 -> "5"
    assert weighted_vote([_n("a", "6", 0.85), _n("b", "5", 1.0), _n("c", "6", 0.2)]) == "5"
    # tie 0.5 vs 0.5 -> the earliest agent's answer
    assert weighted_vote([_n("a", "7", 0.85), _n("b", "5", 0.85)]) == "7"
    assert weighted_vote([_n("b", "5", 0.85), _n("a", "7", 0.85)]) == "5"
    # unparseable nodes do not vote
    assert weighted_vote([_n("a", None, 1.0), _n("b", "5", 0.1)]) == "5"
    assert weighted_vote([_n("a", None, 1.0)]) is None
    assert weighted_vote([]) is None


def test_consensus() -> None:
    assert consensus([_n("a", "5", 0.1), _n("b", "5", 0.9), _n("c", "5", 0.5)])
    assert not consensus([_n("a", "5", 0.1), _n("b", "6", 0.9), _n("c", "5", 0.5)])
    assert not consensus([_n("a", "5", 0.1), _n("b", None, 0.0), _n("c", "5", 0.5)])
    assert not consensus([_n("a", None, 0.1), _n("b", None, 0.0)])
    assert not consensus([])


# ============================================================================== a scripted teacher
PERSONAS = {"You are alice.": "alice", "You are bob.": "bob", "You are carol.": "carol"}
DEFAULT_CONF = {"alice": 0.7, "bob": 0.95, "carol": 0.65}
_QID = re.compile(r"\[(q\d+)\]")
_ROUND_MARK = re.compile(r"@r(\d+)")


def _round_of(user: str) -> int:
    """Round 0 prompts show no previous answers; a round-r prompt quotes reasonings tagged '@r{r-1}'."""
    if "previous round" not in user:
        return 0
    return 1 + max(int(x) for x in _ROUND_MARK.findall(user))


class SimulatedCrash(RuntimeError):
    pass


class ScriptedBackend:
    """Answers from ``table[qid][agent]`` = per-round answer specs (the last one repeats).

    Spec "5" or "5@0.8" (answer@confidence); "?" = always unparseable; "?5" = unparseable on the first
    attempt, "5" on the retry. With ``cache`` it behaves like a paid API behind ``CallCache``: a cached
    call costs nothing, every other message costs one call (``paid``); ``crash_after`` raises once that
    many calls have been paid, like a process killed mid-round.
    """

    def __init__(self, table: dict, cache: CallCache | None = None, crash_after: int | None = None):
        self.table, self.cache, self.crash_after = table, cache, crash_after
        self.paid = 0
        self.batches = 0
        self.log: list[tuple[str, str, int, int, list[dict]]] = []  # (agent, qid, round, attempt, msgs)

    def reply(self, agent: str, qid: str, rnd: int, attempt: int) -> str:
        specs = self.table[qid][agent]
        spec = specs[min(rnd, len(specs) - 1)]
        if spec.startswith("?"):
            if spec == "?" or attempt == 0:
                return f"Let me think @r{rnd} ... I cannot decide."
            spec = spec[1:]
        ans, _, conf = spec.partition("@")
        return json.dumps({"reasoning": f"{agent}@r{rnd} on {qid}", "answer": ans,
                           "confidence": float(conf) if conf else DEFAULT_CONF[agent]})

    def generate(self, messages_batch, temperature, top_p, max_new_tokens, seed):
        self.batches += 1
        out = []
        for msgs in messages_batch:
            key = None
            if self.cache is not None:
                key = cache_key("scripted", msgs, {"temperature": temperature, "top_p": top_p,
                                                   "max_new_tokens": max_new_tokens, "seed": seed})
                hit = self.cache.get(key)
                if hit is not None:
                    out.append(hit)
                    continue
                if self.crash_after is not None and self.paid >= self.crash_after:
                    raise SimulatedCrash(f"killed after {self.paid} paid calls")
            agent, user = PERSONAS[msgs[0]["content"]], msgs[1]["content"]
            qid, rnd, attempt = _QID.search(user).group(1), _round_of(user), seed // 1000
            text = self.reply(agent, qid, rnd, attempt)
            value = {"text": text, "n_tokens": len(text.split())}
            self.paid += 1
            self.log.append((agent, qid, rnd, attempt, msgs))
            if key is not None:
                self.cache.put(key, value)
            out.append(value)
        return out


def _agents(backend, with_reference: bool = False) -> list[Agent]:
    agents = [Agent(name, backend, persona, 0.7, 0.9, seed=i + 1, max_new_tokens=64)
              for i, (persona, name) in enumerate(PERSONAS.items())]
    if with_reference:
        agents = agents[:2] + [Agent("reference", None, "", 0.0, 1.0, 0, 0)]
    return agents


def _ex(qid: str, answer: str = "5", **kw) -> dict:
    return {"id": qid, "question": f"[{qid}] What is 2 plus 3?", "answer": answer, **kw}


def _rounds(mag) -> list[int]:
    return [n.round for n in mag.nodes]


# ============================================================================== discuss_chunk
def test_consensus_at_round_0_stops_with_three_nodes() -> None:
    be = ScriptedBackend({"q1": {"alice": ["5"], "bob": ["5"], "carol": ["5"]}})
    (m,) = discuss_chunk(_agents(be), [_ex("q1")], "gsm8k", "number", max_rounds=3)
    assert _rounds(m) == [0, 0, 0] and [n.agent for n in m.nodes] == ["alice", "bob", "carol"]
    assert m.graph_type == "G0" and m.consensus
    assert m.team_answer == "5" and m.team_correct is True
    assert all(n.correct and n.valid for n in m.nodes)
    assert be.paid == 3 and be.batches == 3  # one batched call per agent, no discussion round
    from magdi.mag import tail_compression

    # each node records how its raw reply compresses (loop detection in length_stats)
    assert [n.tail_compression for n in m.nodes] == [tail_compression(be.reply(n.agent, "q1", 0, 0))
                                                     for n in m.nodes]


@pytest.mark.parametrize("max_rounds", [0, 1, 3])
def test_disagreement_runs_up_to_max_rounds(max_rounds: int) -> None:
    be = ScriptedBackend({"q2": {"alice": ["5"], "bob": ["6"], "carol": ["7"]}})
    (m,) = discuss_chunk(_agents(be), [_ex("q2")], "gsm8k", "number", max_rounds=max_rounds)
    assert _rounds(m) == [r for r in range(max_rounds + 1) for _ in range(3)]
    assert m.graph_type == f"G{max_rounds}" and not m.consensus
    assert [n.correct for n in m.nodes[-3:]] == [True, False, False]
    # final-round vote: alice 0.7 -> 0.3, bob 0.95 -> 0.8, carol 0.65 -> 0.3 => bob's wrong "6"
    assert m.team_answer == "6" and m.team_correct is False
    assert be.paid == 3 * (max_rounds + 1)


def test_consensus_in_round_2_stops_there() -> None:
    be = ScriptedBackend({"q1": {"alice": ["5"], "bob": ["6", "6", "5"], "carol": ["7", "5"]}})
    (m,) = discuss_chunk(_agents(be), [_ex("q1")], "gsm8k", "number", max_rounds=3)
    assert _rounds(m) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [n.answer for n in m.nodes] == ["5", "6", "7", "5", "6", "5", "5", "5", "5"]
    assert m.consensus and m.graph_type == "G2" and m.team_answer == "5"
    assert be.paid == 9


def test_chunk_batches_rounds_and_drops_finished_questions() -> None:
    be = ScriptedBackend({"q1": {"alice": ["5"], "bob": ["5"], "carol": ["5"]},
                          "q2": {"alice": ["5"], "bob": ["6"], "carol": ["7"]}})
    m1, m2 = discuss_chunk(_agents(be), [_ex("q1"), _ex("q2")], "gsm8k", "number", max_rounds=3)
    assert (m1.id, m2.id) == ("q1", "q2")
    assert len(m1.nodes) == 3 and len(m2.nodes) == 12
    assert be.paid == 3 + 12
    assert be.batches == 3 * 4  # each agent: one batch per round (round 0 holds both questions)
    assert {(q, r) for _a, q, r, _t, _m in be.log if q == "q1"} == {("q1", 0)}


def test_unparseable_reply_retried_then_recorded_invalid() -> None:
    # bob never answers in round 0 (3 attempts with parse_retries=2), answers on his retry in round 1
    be = ScriptedBackend({"q1": {"alice": ["5"], "bob": ["?", "?5"], "carol": ["5"]}})
    (m,) = discuss_chunk(_agents(be), [_ex("q1")], "gsm8k", "number", max_rounds=3, parse_retries=2)
    bob0 = m.nodes[1]
    assert (bob0.agent, bob0.round) == ("bob", 0)
    assert bob0.valid is False and bob0.correct is False and bob0.answer is None
    assert bob0.confidence == 0.0
    assert bob0.reasoning == "Let me think @r0 ... I cannot decide."  # the raw reply is kept
    # an invalid node blocks consensus, so a discussion round happened; bob's retry succeeded there
    assert _rounds(m) == [0, 0, 0, 1, 1, 1]
    assert m.nodes[4].valid and m.nodes[4].answer == "5" and m.consensus
    attempts = Counter((a, r) for a, _q, r, _t, _m in be.log)
    assert attempts == {("alice", 0): 1, ("bob", 0): 3, ("carol", 0): 1,
                        ("alice", 1): 1, ("bob", 1): 2, ("carol", 1): 1}
    # every retry is a distinct sampling seed (so a cache does not replay the same bad reply)
    assert sorted(t for a, _q, r, t, _m in be.log if (a, r) == ("bob", 0)) == [0, 1, 2]
    round1 = next(msgs for a, _q, r, _t, msgs in be.log if (a, r) == ("alice", 1))
    assert "- bob: answer none (confidence 0.00)" in round1[1]["content"]


def test_no_retries_records_invalid_after_one_call() -> None:
    be = ScriptedBackend({"q1": {"alice": ["5"], "bob": ["?"], "carol": ["5"]}})
    (m,) = discuss_chunk(_agents(be), [_ex("q1")], "gsm8k", "number", max_rounds=1, parse_retries=0)
    assert be.paid == 6
    assert [n.valid for n in m.nodes] == [True, False, True, True, False, True]
    # the team vote ignores the invalid nodes
    assert m.team_answer == "5" and m.team_correct is True and not m.consensus


def test_reference_agent_replays_gold_and_does_not_vote() -> None:
    be = ScriptedBackend({"q3": {"alice": ["6@0.7"], "bob": ["7@0.7"]}})
    ex = _ex("q3", explanation="2 plus 3 is 5.")
    (m,) = discuss_chunk(_agents(be, with_reference=True), [ex], "gsm8k", "number", max_rounds=1)
    ref = [n for n in m.nodes if n.agent == "reference"]
    assert [n.round for n in ref] == [0, 1]
    for n in ref:
        assert (n.reasoning, n.answer, n.confidence, n.correct, n.valid) == ("2 plus 3 is 5.", "5", 1.0, True, True)
    assert all(a != "reference" for a, *_ in be.log)  # the reference agent never calls a backend
    assert be.paid == 4
    # voters are alice (6, weight 0.3) and bob (7, weight 0.3): tie -> alice. With the reference agent's
    # weight 1.0 the team answer would have been the gold 5.
    assert m.team_answer == "6" and m.team_correct is False
    # the other agents do see the reference answer in the discussion
    round1 = next(msgs for a, _q, r, _t, msgs in be.log if (a, r) == ("alice", 1))
    assert "- reference: answer 5 (confidence 1.00). Reasoning: 2 plus 3 is 5." in round1[1]["content"]


def test_reference_reply_without_explanation_uses_the_gold_option() -> None:
    ex = {"id": "e1", "question": "Where is money kept?", "answer": "A", "choices": ["bank", "river"]}
    r = reference_reply(ex)
    assert json.loads(r["text"]) == {"reasoning": "The correct option is (A) bank.", "answer": "A",
                                     "confidence": 1.0}
    assert parse_reply(r["text"], "choice", ex["choices"])["answer"] == "A"


def test_discussion_prompts_show_previous_round_answers() -> None:
    be = ScriptedBackend({"q2": {"alice": ["5"], "bob": ["6", "8"], "carol": ["7"]}})
    discuss_chunk(_agents(be), [_ex("q2")], "gsm8k", "number", max_rounds=2)
    prompts = {(a, r): msgs for a, _q, r, _t, msgs in be.log}
    assert set(prompts) == {(a, r) for a in ("alice", "bob", "carol") for r in (0, 1, 2)}
    answers = {0: {"alice": "5", "bob": "6", "carol": "7"}, 1: {"alice": "5", "bob": "8", "carol": "7"}}
    for (agent, r), msgs in prompts.items():
        assert msgs[0] == {"role": "system", "content": f"You are {agent}."}
        user = msgs[1]["content"]
        assert "[q2] What is 2 plus 3?" in user
        if r == 0:
            assert "previous round" not in user and "@r" not in user
            continue
        for other in ("alice", "bob", "carol"):
            line = (f"- {other}: answer {answers[r - 1][other]} (confidence {DEFAULT_CONF[other]:.2f}). "
                    f"Reasoning: {other}@r{r - 1} on q2")
            assert line in user
        assert f"@r{r - 2}" not in user  # only the immediately previous round is shown


def test_discussion_prompt_truncates_long_reasoning() -> None:
    agent = _agents(None)[0]
    prev = [Node("bob", 0, "x" * 50, "6", 0.5, False)]
    msgs = disc.discussion_messages(agent, _ex("q1"), "number", prev, context_chars=10)
    assert "Reasoning: " + "x" * 10 + "...\n" in msgs[1]["content"]


# ============================================================================== build_mags: crash and resume
RESUME_TABLE = {
    "q1": {"alice": ["5"], "bob": ["5"], "carol": ["5"]},  # G0: 3 calls
    "q2": {"alice": ["5"], "bob": ["6", "5"], "carol": ["5"]},  # G1: 6 calls
    "q3": {"alice": ["5"], "bob": ["6"], "carol": ["7"]},  # G2 (max_rounds=2): 9 calls
    "q4": {"alice": ["4"], "bob": ["4"], "carol": ["4"]},  # G0, wrong consensus: 3 calls
}
RESUME_EXAMPLES = [_ex(q) for q in RESUME_TABLE]


def _build(backend, out: Path):
    return build_mags(_agents(backend), RESUME_EXAMPLES, "gsm8k", "number", out, max_rounds=2, chunk_size=2)


def test_build_mags_resumes_after_crash_without_paying_twice(tmp_path: Path) -> None:
    # the uninterrupted reference run
    with CallCache(tmp_path / "ref" / "cache.jsonl") as cache:
        ref_be = ScriptedBackend(RESUME_TABLE, cache=cache)
        ref = _build(ref_be, tmp_path / "ref" / "mags.jsonl")
    uninterrupted = ref_be.paid
    assert uninterrupted == 3 + 6 + 9 + 3
    assert [m.graph_type for m in ref] == ["G0", "G1", "G2", "G0"]

    out, cache_path = tmp_path / "run" / "mags.jsonl", tmp_path / "run" / "cache.jsonl"
    # run 1: killed in round 0 of the second chunk, after 9 (chunk 1) + 5 paid calls
    cache = CallCache(cache_path)
    crash_be = ScriptedBackend(RESUME_TABLE, cache=cache, crash_after=14)
    with pytest.raises(SimulatedCrash):
        _build(crash_be, out)
    cache.close()
    assert crash_be.paid == 14
    assert [m.id for m in read_mags(out)] == ["q1", "q2"]  # the finished chunk is on disk
    first_lines = out.read_text().splitlines()
    with out.open("a") as f:  # and, worse, killed in the middle of appending a MAG
        f.write('{"id": "q3", "task": "gsm8k", "nod')

    # run 2: a new process, same cache file
    with CallCache(cache_path) as cache:
        resume_be = ScriptedBackend(RESUME_TABLE, cache=cache)
        mags = _build(resume_be, out)
    assert crash_be.paid + resume_be.paid == uninterrupted  # cache hits cost nothing
    assert {q for _a, q, *_ in resume_be.log} == {"q3", "q4"}  # finished MAGs are not recomputed
    lines = out.read_text().splitlines()
    assert lines[:2] == first_lines and len(lines) == 4
    ids = [json.loads(line)["id"] for line in lines]
    assert sorted(ids) == ["q1", "q2", "q3", "q4"]  # no duplicates
    assert [m.id for m in mags] == ["q1", "q2", "q3", "q4"]
    assert [m.to_json() for m in mags] == [m.to_json() for m in ref]

    # run 3: nothing left to do
    with CallCache(cache_path) as cache:
        idle_be = ScriptedBackend(RESUME_TABLE, cache=cache)
        again = _build(idle_be, out)
    assert idle_be.paid == 0 and idle_be.batches == 0
    assert [m.to_json() for m in again] == [m.to_json() for m in ref]
    assert len(out.read_text().splitlines()) == 4


def test_build_mags_returns_only_requested_examples_in_order(tmp_path: Path) -> None:
    be = ScriptedBackend(RESUME_TABLE)
    out = tmp_path / "mags.jsonl"
    _build(be, out)
    sub = build_mags(_agents(be), [RESUME_EXAMPLES[3], RESUME_EXAMPLES[0]], "gsm8k", "number", out,
                     max_rounds=2, chunk_size=2)
    assert [m.id for m in sub] == ["q4", "q1"]


# ============================================================================== LocalBackend
def test_local_backend_caches_generations(tmp_path: Path, make_lm, tiny_tokenizer, monkeypatch) -> None:
    calls: list[int] = []
    real_generate = disc.generate

    def counting_generate(model, tokenizer, prompts, *args, **kw):
        calls.append(len(prompts))
        return real_generate(model, tokenizer, prompts, *args, **kw)

    monkeypatch.setattr(disc, "generate", counting_generate)
    model = make_lm(lora=False).eval()
    agent = _agents(None)[0]
    batch = [disc.round0_messages(agent, _ex(q), "number") for q in ("q1", "q2")]
    cache_path = tmp_path / "local.jsonl"
    with CallCache(cache_path) as cache:
        be = LocalBackend(model, tiny_tokenizer, "tiny-llama", cache, batch_size=8)
        first = be.generate(batch, 0.7, 0.9, 4, 0)
        assert calls == [2]
        assert len(first) == 2
        for r in first:
            assert r["text"].startswith(RESPONSE_PREFIX)
            assert 1 <= r["n_tokens"] <= 4
        assert be.generate(batch, 0.7, 0.9, 4, 0) == first
        assert calls == [2]  # no generation for cached inputs
        # only the new message is generated
        new = disc.round0_messages(agent, _ex("q3"), "number")
        mixed = be.generate([batch[1], new], 0.7, 0.9, 4, 0)
        assert calls == [2, 1] and mixed[0] == first[1]
        # a different sampling seed is a different call
        be.generate(batch[:1], 0.7, 0.9, 4, 1)
        assert calls == [2, 1, 1]
    # a new process on the same cache file pays nothing
    with CallCache(cache_path) as cache:
        be2 = LocalBackend(model, tiny_tokenizer, "tiny-llama", cache)
        assert be2.generate(batch, 0.7, 0.9, 4, 0) == first
    assert calls == [2, 1, 1]


def test_local_backend_raised_limit_generates_only_the_cut_replies(tmp_path: Path, make_lm, tiny_tokenizer,
                                                                   monkeypatch) -> None:
    calls: list[tuple[int, int]] = []
    real_generate = disc.generate

    def counting_generate(model, tokenizer, prompts, max_new_tokens, *args, **kw):
        calls.append((len(prompts), max_new_tokens))
        return real_generate(model, tokenizer, prompts, max_new_tokens, *args, **kw)

    monkeypatch.setattr(disc, "generate", counting_generate)
    model = make_lm(lora=False).eval()
    agent = _agents(None)[0]
    batch = [disc.round0_messages(agent, _ex(q), "number") for q in ("q1", "q2")]
    with CallCache(tmp_path / "local.jsonl") as cache:
        be = LocalBackend(model, tiny_tokenizer, "tiny-llama", cache)
        # as cached at max_new_tokens 4: the first reply ended by itself (2 of 4 tokens), the second was cut at the limit
        for msgs, n in ((batch[0], 2), (batch[1], 4)):
            cache.put(be._key_at(disc.Request(msgs, 0.7, 0.9, 4, 0), 4), {"text": f"{RESPONSE_PREFIX}{n}", "n_tokens": n})
    with CallCache(tmp_path / "local.jsonl", earlier_limits=[4]) as cache:
        be = LocalBackend(model, tiny_tokenizer, "tiny-llama", cache)
        out = be.generate(batch, 0.7, 0.9, 8, 0)
        assert out[0] == {"text": f"{RESPONSE_PREFIX}2", "n_tokens": 2}  # reused
        assert calls == [(1, 8)] and out[1]["text"] != f"{RESPONSE_PREFIX}4"  # the cut one decoded again at 8
        assert be.generate(batch, 0.7, 0.9, 8, 0) == out and calls == [(1, 8)]  # and now cached at 8


def test_agents_sharing_a_local_model_decode_in_one_batch(tmp_path: Path, make_lm, tiny_tokenizer,
                                                          monkeypatch) -> None:
    """Two personas of one local model: one generate call per round with both agents' rows, each row with
    its agent's own temperature/top_p; replies are cached per agent, so a rerun pays nothing."""
    calls: list[dict] = []
    real_generate = disc.generate

    def spy(model, tokenizer, prompts, max_new_tokens, temperature, top_p, seed=0, **kw):
        calls.append({"rows": len(prompts), "temperature": temperature, "top_p": top_p})
        return real_generate(model, tokenizer, prompts, max_new_tokens, temperature, top_p, seed, **kw)

    monkeypatch.setattr(disc, "generate", spy)
    model = make_lm(lora=False).eval()
    examples = [_ex("q1"), _ex("q2"), _ex("q3")]
    with CallCache(tmp_path / "local.jsonl") as cache:
        be = LocalBackend(model, tiny_tokenizer, "tiny-llama", cache, batch_size=16)
        agents = [Agent("careful", be, "Be careful.", 0.5, 0.95, seed=1, max_new_tokens=6),
                  Agent("creative", be, "Be quick.", 0.9, 1.0, seed=2, max_new_tokens=6)]
        mags = discuss_chunk(agents, examples, "gsm8k", "number", max_rounds=0, parse_retries=0)
        assert calls == [{"rows": 6, "temperature": [0.5] * 3 + [0.9] * 3, "top_p": [0.95] * 3 + [1.0] * 3}]
        assert [[n.agent for n in m.nodes] for m in mags] == [["careful", "creative"]] * 3
        again = discuss_chunk(agents, examples, "gsm8k", "number", max_rounds=0, parse_retries=0)
        assert len(calls) == 1 and again == mags


# ============================================================================== ReConcile's published prompt
def test_reconcile_round0_prompt_with_convincing_samples() -> None:
    agent = _agents(None)[0]
    conv = [{"question": "What is 1 plus 1?", "choices": None, "explanation": "1 + 1 = 2.", "answer": "2"}]
    msgs = disc.reconcile_round0_messages(agent, _ex("q1"), "number", conv)
    assert msgs[:3] == [{"role": "system", "content": "You are alice."},
                        {"role": "user", "content": "Q: What is 1 plus 1?"},
                        {"role": "assistant", "content": "{'reasoning': '1 + 1 = 2.', 'answer': '2'}"}]
    assert msgs[3] == {"role": "user", "content": (
        "Q: [q1] What is 2 plus 3? Please answer the question with step-by-step reasoning. Also, evaluate your "
        "confidence level (between 0.0 and 1.0) to indicate the possibility of your answer being right. Output "
        'your answer in json format, with the format as follows: {"reasoning": "", "answer": "", '
        '"confidence_level": ""}. Please strictly output in JSON format. Only place a single numeric value in '
        'the "answer" field. Do not output irrelevant content.')}
    choice = disc.reconcile_round0_messages(agent, _ex("q1", "B", choices=["bank", "river", "shop"]), "choice")
    assert len(choice) == 2  # no convincing samples: zero-shot
    assert " The options are: (A) bank (B) river (C) shop. Please select an option as your answer." in choice[1]["content"]
    assert 'Only place A,B,C representing your choice in the "answer" field.' in choice[1]["content"]


def test_reconcile_groups_previous_answers_and_asks_for_a_stance() -> None:
    prev = [Node("alice", 0, "2 and 3 make 5.", "5", 0.9, True), Node("bob", 0, "I add: 6.", "6", 0.8, False),
            Node("carol", 0, "Five.", "5", 0.7, True), Node("dave", 0, "x" * 20, "7", 0.5, False),
            Node("erin", 0, "garbled", None, 0.0, False, valid=False)]
    assert disc.group_previous_answers(prev, context_chars=100) == (
        "There are 2 agents who think the answer is 5. "
        "One agent's solution: I think the answer is 5 because 2 and 3 make 5. My confidence level is 0.9.\n"
        "One agent's solution: I think the answer is 5 because Five. My confidence level is 0.7.\n\n"
        "There is 1 agent who thinks the answer is 6. "
        "One agent's solution: I think the answer is 6 because I add: 6. My confidence level is 0.8.\n\n")
    # as published, only the two most common answers are shown; no answer, no solution
    msgs = disc.reconcile_discussion_messages(_agents(None)[1], _ex("q1"), "number", prev[:2], 4)
    user = msgs[-1]["content"]
    assert user.startswith(disc.reconcile_round0_messages(_agents(None)[1], _ex("q1"), "number")[-1]["content"])
    assert ("\n\nCarefully review the following solutions from other agents as additional information, and provide "
            "your own answer and step-by-step reasoning to the question. Clearly states that which pointview do you "
            "agree or disagree and why.\n\n There is 1 agent who thinks the answer is 5. One agent's solution: I "
            "think the answer is 5 because 2 an... My confidence level is 0.9.") in user
    assert user.endswith('"confidence_level": ""}. Please strictly output in JSON format.')


def test_parse_reads_reconcile_confidence_level() -> None:
    text = '{"reasoning": "2+3", "answer": "5", "confidence_level": "0.8"}'
    assert parse_reply(text, "number", None)["confidence"] == 0.8
    assert parse_reply('{"reasoning": "2+3", "answer": "5", "confidence_level": 0.6', "number", None)["confidence"] == 0.6


def test_reconcile_build_mags_takes_convincing_samples_from_earlier_chunks(tmp_path: Path) -> None:
    """Chunk 1 is zero-shot; chunk 2 shows alice the gold explanations of questions bob or carol got right."""
    seen: list[list[dict]] = []

    class Recorder:
        def generate(self, messages_batch, temperature, top_p, max_new_tokens, seed):
            out = []
            for msgs in messages_batch:
                seen.append(msgs)
                agent = PERSONAS[msgs[0]["content"]]
                qid = _QID.search(msgs[-1]["content"]).group(1)
                ans = {"q1": {"bob": "6"}, "q2": {"carol": "6"}}.get(qid, {}).get(agent, "5")
                out.append({"text": json.dumps({"reasoning": f"{agent} on {qid}", "answer": ans,
                                                "confidence_level": 0.9}), "n_tokens": 3})
            return out

    exs = [_ex("q1", explanation="q1 gold why"), _ex("q2", explanation="q2 gold why"), _ex("q3")]
    mags = build_mags(_agents(Recorder()), exs, "gsm8k", "number", tmp_path / "m.jsonl", max_rounds=1,
                      chunk_size=2, prompt_style="reconcile", convincing_per_agent=1)
    assert [m.id for m in mags] == ["q1", "q2", "q3"]
    assert mags[0].nodes[0].confidence == 0.9
    q3 = {PERSONAS[m[0]["content"]]: m for m in seen if "[q3]" in m[-1]["content"]}
    shots = {a: [m["content"] for m in msgs[1:-1] if m["role"] == "assistant"] for a, msgs in q3.items()}
    # alice: bob's first correct question (q2) and carol's (q1); bob: alice's (q1) and carol's (q1)
    assert shots["alice"] == ["{'reasoning': 'q2 gold why', 'answer': '5'}", "{'reasoning': 'q1 gold why', 'answer': '5'}"]
    assert shots["bob"] == ["{'reasoning': 'q1 gold why', 'answer': '5'}"] * 2
    first_chunk = [m for m in seen if "[q1]" in m[-1]["content"] or "[q2]" in m[-1]["content"]]
    assert all(len(m) == 2 for m in first_chunk)  # nothing built yet: zero-shot
    assert any("Carefully review" in m[-1]["content"] for m in first_chunk)  # q1/q2 disagreed: round 1 ran


def test_compact_prompt_is_the_default() -> None:
    be = ScriptedBackend({"q1": {"alice": ["5"], "bob": ["5"], "carol": ["5"]}})
    discuss_chunk(_agents(be), [_ex("q1")], "gsm8k", "number", max_rounds=1)
    assert [msgs for *_, msgs in be.log][0] == disc.round0_messages(_agents(None)[0], _ex("q1"), "number")


def test_build_mags_stage_never_reuses_a_mag_file_from_other_settings(tmp_path: Path, monkeypatch) -> None:
    """Run by hand after a params change, the stage rebuilds every MAG (from the cache) instead of resuming
    from the old file; cached replies are not paid again."""
    import yaml

    import magdi.pipeline.mags as pl
    from magdi.config import parse_params

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["paths"]["mags_dir"] = str(tmp_path / "mags")
    p = parse_params(raw)
    exs = [_ex("q1"), _ex("q2")]
    table = {"q1": {"alice": ["5"], "bob": ["5"], "carol": ["5"]}, "q2": {"alice": ["5"], "bob": ["5"], "carol": ["5"]}}
    with CallCache(tmp_path / "c.jsonl") as cache:
        be = ScriptedBackend(table, cache=cache)
        monkeypatch.setattr(pl, "load_examples", lambda *_: exs)
        monkeypatch.setattr(pl, "make_agents", lambda *_: _agents(be))
        monkeypatch.chdir(tmp_path)
        stale = pl.mags_file(p, "gsm8k")
        stale.parent.mkdir(parents=True)
        old = MAG(id="q1", task="gsm8k", question="old", gold="5", nodes=[
            Node("alice", 0, "stale", "7", 0.5, False, 3), Node("bob", 0, "stale", "7", 0.5, False, 3)])
        stale.write_text(json.dumps(old.to_json()) + "\n")
        pl.stage_build_mags(p, "gsm8k")
        mags = read_mags(stale)
        assert [m.id for m in mags] == ["q1", "q2"] and all(n.reasoning != "stale" for m in mags for n in m.nodes)
        paid = be.paid
        pl.stage_build_mags(p, "gsm8k")  # again: everything from the cache
        assert be.paid == paid and [m.to_json() for m in read_mags(stale)] == [m.to_json() for m in mags]
