"""The two discussion prompts side by side on the default teachers: `compact` (ours) vs `reconcile` (published).

Both styles discuss the same GSM8K train questions with the same agents, sampling and rounds
(params.yaml `teachers`), through the library's own protocol (`discussion.discuss_chunk`, `select_convincing`,
`parse_reply`). Measured per style, agent and round: format compliance (first attempt parses into a valid
answer; node valid after the parse retry), accuracy, answer changes, generated / prompt tokens, truncation
at max_new_tokens, generation seconds; team (vote) accuracy at the end, compared paired (McNemar exact +
paired bootstrap, magdi.report.stats).

Questions: the first ``--n`` questions of the task's train pool are measured. ReConcile's convincing samples
(gold explanations of questions the *other* agents answered correctly in round 0) come from the compact MAGs
of the discussed train questions from ``--pool-start`` on (fixed, so a smaller ``--n`` replays the same
prompts), so the measured reconcile prompt carries its few-shot samples (in `build_mags` they come from
earlier chunks only, and a single chunk would have none).

Every call goes through the agents' CallCache: compact replies replay from the committed teacher_cache/, the
reconcile replies live in ``--cache-dir`` (default teacher_cache/prompt_style/), so a rerun costs seconds.
Generation seconds are recorded when a call is really generated (``timings.jsonl`` next to that cache) and
read back on a replay.

    PYTHONPATH=src python benchmarks/bench_prompt_style.py --params params.yaml \
        --gguf-dir /work/main/models/gguf --data-dir /work/main/data/benchmarks --n 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import yaml
from peak import machine_line

from magdi.cache import cache_key
from magdi.config import TASK_TYPES, load_params
from magdi.discussion import (
    RESPONSE_PREFIX,
    Agent,
    Request,
    _sampling,
    consensus,
    discuss_chunk,
    parse_reply,
    select_convincing,
    weighted_vote,
)
from magdi.mag import MAG
from magdi.pipeline import _set_threads, load_examples, make_agents, model_source
from magdi.report.stats import mcnemar_exact, paired_bootstrap_ci
from magdi.scoring import is_correct, normalize_gold
from magdi.student import chat_prompt

STYLES = ("compact", "reconcile")


@dataclass
class Call:
    """One teacher request as the backend saw it (the attempt is read off the seed: agent seed + 1000*attempt)."""

    style: str
    round: int
    agent: str
    attempt: int
    messages: list[dict]
    text: str
    n_tokens: int
    max_new_tokens: int


@dataclass
class Recorder:
    """Wraps one agent backend: forwards every batch to it, keeps each request/reply and times real generation."""

    backend: object
    agents: list[Agent]
    timings: Path
    replay_only: bool = False
    style: str = ""
    round: int = 0
    calls: list[Call] = field(default_factory=list)

    def generate_many(self, requests: list[Request]) -> list[dict]:
        cache = self.backend.cache  # type: ignore[attr-defined]
        if self.replay_only:
            missing = [r for r in requests if cache_key(self.backend.model_id, r.messages,  # type: ignore[attr-defined]
                                                        _sampling(r)) not in cache]
            if missing:
                raise SystemExit(f"{len(missing)} compact calls are not in the cache: this benchmark replays the "
                                 "committed compact discussions and does not regenerate them")
        before = len(cache)
        t = time.perf_counter()
        out = self.backend.generate_many(requests)  # type: ignore[attr-defined]
        dt = time.perf_counter() - t
        misses = len(self.backend.cache) - before  # type: ignore[attr-defined]
        for r, o in zip(requests, out, strict=True):
            a = next(a for a in self.agents if (r.seed - a.seed) % 1000 == 0 and r.seed >= a.seed)
            self.calls.append(Call(self.style, self.round, a.name, (r.seed - a.seed) // 1000, r.messages,
                                   o["text"], o["n_tokens"], r.max_new_tokens))
        if misses:
            self.timings.parent.mkdir(parents=True, exist_ok=True)
            with self.timings.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"style": self.style, "round": self.round,
                                    "model": self.backend.model_id,  # type: ignore[attr-defined]
                                    "requests": len(requests), "generated": misses, "seconds": round(dt, 2),
                                    "utc": datetime.now(UTC).isoformat(timespec="seconds")}) + "\n")
        return out


def params_for(args: argparse.Namespace, cache_dir: str):
    """params.yaml with the paths pointed at existing models/data (read-only) and the given cache dir."""
    raw = yaml.safe_load(Path(args.params).read_text(encoding="utf-8"))
    for key, val in (("gguf_dir", args.gguf_dir), ("data_dir", args.data_dir), ("student_dir", args.student_dir)):
        if val:
            raw["paths"][key] = val
    raw["paths"]["cache_dir"] = cache_dir
    if args.max_rounds is not None:
        raw["teachers"]["max_rounds"] = args.max_rounds
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, encoding="utf-8") as f:
        yaml.safe_dump(raw, f)
    return load_params(f.name, check_mirror=False)


def recorded_agents(p, timings: Path, replay_only: bool = False) -> tuple[list[Agent], list[Recorder]]:
    agents = make_agents(p)
    recs: dict[int, Recorder] = {}
    for a in agents:
        if a.backend is not None and id(a.backend) not in recs:
            recs[id(a.backend)] = Recorder(a.backend, agents, timings, replay_only)
    return [replace(a, backend=recs[id(a.backend)]) if a.backend is not None else a for a in agents], \
        list(recs.values())


def run_style(style: str, agents: list[Agent], recs: list[Recorder], examples: list[dict], task: str,
              p, chunk: int, convincing: dict[str, list[dict]] | None) -> list[MAG]:
    def on_round(r: int, n: int) -> None:
        for rec in recs:
            rec.style, rec.round = style, r
        print(f"[{datetime.now(UTC):%H:%M:%S}] {style}: round {r}, {n} questions", file=sys.stderr, flush=True)

    mags: list[MAG] = []
    for start in range(0, len(examples), chunk):
        mags += discuss_chunk(agents, examples[start : start + chunk], task, TASK_TYPES[task], p.teachers.max_rounds,
                              p.teachers.parse_retries, p.teachers.context_chars, on_round=on_round,
                              prompt_style=style, convincing=convincing)
    return mags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--gguf-dir", default=None, help="override paths.gguf_dir (assembled teacher GGUFs)")
    ap.add_argument("--data-dir", default=None, help="override paths.data_dir (benchmark jsonl files)")
    ap.add_argument("--student-dir", default=None, help="override paths.student_dir")
    ap.add_argument("--task", default="gsm8k")
    ap.add_argument("--n", type=int, default=16, help="measured questions: the first n of the train pool")
    ap.add_argument("--pool-start", type=int, default=16,
                    help="convincing-sample pool: the discussed train questions from this index on (>= --n)")
    ap.add_argument("--max-rounds", type=int, default=None,
                    help="override teachers.max_rounds (0 = round 0 only: the prompts' direct effect)")
    ap.add_argument("--chunk", type=int, default=8, help="questions per discussion chunk (batched together)")
    ap.add_argument("--compact-cache", default="teacher_cache", help="the committed cache of compact replies")
    ap.add_argument("--cache-dir", default="teacher_cache/prompt_style", help="cache of the reconcile replies")
    ap.add_argument("--out", default="reports/benchmark_prompt_style.md")
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    _set_threads()

    base = params_for(args, args.compact_cache)
    task, atype = args.task, TASK_TYPES[args.task]
    pool = load_examples(base, task, "train")[: base.data.train_size(task)]  # the questions the teachers discussed
    if args.n > args.pool_start:
        ap.error("--n must not exceed --pool-start: measured questions and the convincing pool are disjoint")
    measured, rest = pool[: args.n], pool[args.pool_start :]
    timings = Path(args.cache_dir) / "timings.jsonl"
    t0 = time.perf_counter()

    c_agents, c_recs = recorded_agents(base, timings, replay_only=True)
    pool_mags = run_style("compact", c_agents, c_recs, rest, task, base, args.chunk, None)
    for rec in c_recs:
        rec.calls.clear()  # the pool only supplies convincing samples; it is not measured
    compact = run_style("compact", c_agents, c_recs, measured, task, base, args.chunk, None)
    by_id = {ex["id"]: {**ex, "answer": normalize_gold(ex["answer"], atype)} for ex in rest}
    conv = {a.name: select_convincing(pool_mags, by_id, c_agents, a.name, base.teachers.convincing_per_agent)
            for a in c_agents}

    print("convincing samples per agent: " + ", ".join(f"{k} {len(v)}" for k, v in conv.items()), file=sys.stderr)
    rp = params_for(args, args.cache_dir)
    r_agents, r_recs = recorded_agents(rp, timings)
    reconcile = run_style("reconcile", r_agents, r_recs, measured, task, rp, args.chunk, conv)
    wall = time.perf_counter() - t0
    print(f"discussions done in {wall:.0f} s", file=sys.stderr)

    from_report = {"compact": (compact, [c for r in c_recs for c in r.calls]),
                   "reconcile": (reconcile, [c for r in r_recs for c in r.calls])}
    write_report(args, base, from_report, conv, timings, [a.name for a in c_agents if not a.is_reference], len(rest))


def load_tokenizer(p, model: str):
    """The model's tokenizer only (a replay never loads weights): from its GGUF, or a hub id / path."""
    from transformers import AutoTokenizer

    src = model_source(p, model)
    if src.startswith("gguf:"):
        path = Path(src.removeprefix("gguf:"))
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(src)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _num(x: float | None, fmt: str = ".0f") -> str:
    return "n/a" if x is None else format(x, fmt)


def agent_round_rows(style: str, mags: list[MAG], calls: list[Call], agent: str, rnd: int, prompt_tokens,
                     seconds: float | None, atype: str) -> dict:
    """One table row: what `agent` did in round `rnd` of `style` (nodes from the MAGs, replies from the calls)."""
    nodes = [n for m in mags for n in m.nodes if n.agent == agent and n.round == rnd]
    mine = [c for c in calls if c.agent == agent and c.round == rnd]
    first = [c for c in mine if c.attempt == 0]
    parsed_first = [parse_reply(c.text, atype, None) is not None for c in first]
    carried = []  # the agent's standing answer after this round, over all questions (consensus stops a MAG early)
    for m in mags:
        own = [n for n in m.nodes if n.agent == agent and n.round <= rnd]
        carried.append(bool(own) and max(own, key=lambda n: n.round).correct)
    changes = None
    if rnd > 0:
        prev = {m.id: next(n for n in m.nodes if n.agent == agent and n.round == rnd - 1) for m in mags
                if any(n.agent == agent and n.round == rnd for n in m.nodes)}
        now = [(m.id, n) for m in mags for n in m.nodes if n.agent == agent and n.round == rnd]
        changes = {"changed": sum(n.answer != prev[q].answer for q, n in now),
                   "w2r": sum(n.correct and not prev[q].correct for q, n in now),
                   "r2w": sum(prev[q].correct and not n.correct for q, n in now)}
    return {
        "style": style, "agent": agent, "round": rnd, "questions": len(nodes),
        "first_ok": _mean([float(x) for x in parsed_first]), "retries": len(mine) - len(first),
        "valid": _mean([float(n.valid) for n in nodes]), "acc": _mean([float(n.correct) for n in nodes]),
        "acc_all": _mean([float(x) for x in carried]), "changes": changes,
        "gen_tokens": _mean([c.n_tokens for c in mine]),
        "truncated": _mean([float(c.n_tokens >= c.max_new_tokens) for c in mine]),
        "prompt_tokens": _mean([prompt_tokens(agent, c.messages) for c in mine]), "seconds": seconds,
        "calls": len(mine),
    }


def min_discordant(n: int) -> int | str:
    """Fewest discordant pairs, all one way, for which McNemar's exact test gives p < 0.05 (n + 1: never)."""
    for k in range(1, n + 1):
        if mcnemar_exact([True] * k, [False] * k)[2] < 0.05:
            return k
    return f"{n + 1} (impossible)"


def read_timings(path: Path) -> dict[tuple[str, int, str], float]:
    """Seconds spent really generating, per (style, round, model id), as recorded when the calls were made."""
    out: dict[tuple[str, int, str], float] = defaultdict(float)
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                t = json.loads(line)
                out[(t["style"], t["round"], t["model"])] += t["seconds"]
    return out


def write_report(args, p, runs, conv, timings_path: Path, agent_names: list[str], n_pool: int) -> None:
    """reports/benchmark_prompt_style.md: every number below is computed here from the MAGs and the calls."""
    atype = TASK_TYPES[args.task]
    model_of = {a.name: a.model for a in p.teachers.agents}
    max_new = {a.name: a.max_new_tokens for a in p.teachers.agents}
    toks = {m: load_tokenizer(p, m) for m in sorted({model_of[a] for a in agent_names})}
    memo: dict[str, int] = {}

    def prompt_tokens(agent: str, messages: list[dict]) -> int:
        key = agent + json.dumps(messages)
        if key not in memo:
            tok = toks[model_of[agent]]
            memo[key] = len(tok(chat_prompt(tok, messages) + RESPONSE_PREFIX, add_special_tokens=False).input_ids)
        return memo[key]

    params_rounds = yaml.safe_load(Path(args.params).read_text(encoding="utf-8"))["teachers"]["max_rounds"]
    timings = read_timings(timings_path)
    rounds = range(p.teachers.max_rounds + 1)
    rows = []
    for style in STYLES:
        mags, calls = runs[style]
        for agent in agent_names:
            for r in rounds:
                secs = timings.get((style, r, f"local:{model_of[agent]}"))
                rows.append(agent_round_rows(style, mags, calls, agent, r, prompt_tokens, secs, atype))
    n = len(runs["compact"][0])
    team = {s: [bool(m.team_correct) for m in runs[s][0]] for s in STYLES}
    assert [m.id for m in runs["compact"][0]] == [m.id for m in runs["reconcile"][0]]
    n01, n10, p_mc = mcnemar_exact(team["reconcile"], team["compact"])
    lo, hi = paired_bootstrap_ci(team["reconcile"], team["compact"], args.bootstrap, seed=0)
    acc = {s: sum(team[s]) / n for s in STYLES}
    r0team = {s: _mean([float(is_correct(v, m.gold, atype)) if (v := weighted_vote(
        [x for x in m.nodes if x.round == 0])) is not None else 0.0 for m in runs[s][0]]) for s in STYLES}
    per_q = {s: {"gen": sum(c.n_tokens for c in runs[s][1]) / n,
                 "prompt": sum(prompt_tokens(c.agent, c.messages) for c in runs[s][1]) / n,
                 "calls": len(runs[s][1]) / n,
                 "r0_consensus": sum(consensus([x for x in m.nodes if x.round == 0]) for m in runs[s][0]),
                 "consensus": sum(bool(m.consensus) for m in runs[s][0]),
                 "first_ok": _mean([float(parse_reply(c.text, atype, None) is not None)
                                    for c in runs[s][1] if c.attempt == 0]),
                 "valid": _mean([float(x.valid) for m in runs[s][0] for x in m.nodes]),
                 "truncated": _mean([float(c.n_tokens >= c.max_new_tokens) for c in runs[s][1]])}
             for s in STYLES}
    secs = {s: sum(v for (st, _, _), v in timings.items() if st == s) or None for s in STYLES}
    seen_ids = ", ".join(m.id for m in runs["compact"][0])

    L = ["# Discussion prompt: `compact` vs `reconcile` on the default teachers", "", machine_line(), "",
         f"Written by `benchmarks/bench_prompt_style.py` ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC). Task "
         f"{args.task}: the first {n} questions of the train pool ({seen_ids}). Teachers, sampling and rounds are "
         f"params.yaml's: {', '.join(f'{a} ({model_of[a]}, max_new_tokens {max_new[a]})' for a in agent_names)}; "
         f"temperature/top_p per agent, `teachers.max_rounds` {p.teachers.max_rounds}"
         + (" (set by --max-rounds)" if args.max_rounds is not None else "") + ", "
         f"`parse_retries` {p.teachers.parse_retries}, `context_chars` {p.teachers.context_chars}, "
         f"backend local (transformers, {', '.join(sorted({a.dtype or p.student.gen_dtype for a in p.teachers.agents}))}).",
         "",
         "Command: `PYTHONPATH=src python benchmarks/bench_prompt_style.py " + " ".join(sys.argv[1:]) + "`", "",
         "* **compact** replies replay from the committed `teacher_cache/` (the pipeline's own GSM8K discussions: "
         "same prompts, same sampling keys); they were not re-generated or re-timed here.",
         f"* **reconcile** replies were generated for this benchmark and are cached in `{args.cache_dir}/` "
         f"(generation seconds in `{timings_path}`). Convincing samples (ReConcile's few-shot gold explanations "
         f"of questions the *other* agents answered correctly in round 0, `teachers.convincing_per_agent` "
         f"{p.teachers.convincing_per_agent} per other agent) come from the compact MAGs of the other {n_pool} "
         "discussed train questions (disjoint from the measured ones); per agent: "
         + ", ".join(f"{a} {len(conv.get(a, []))}" for a in agent_names) + ". In `build_mags` they come from "
         "earlier chunks, and with `batch_size` 32 a 32-question run would have none, so this pool is what makes "
         "the measured prompt the published one.",
         *([f"* Scope: only rounds 0..{p.teachers.max_rounds} were run (`--max-rounds`; params.yaml runs "
            f"{params_rounds}), so the team answer is the vote at round {p.teachers.max_rounds}"
            + (" of the independent answers and the discussion-round prompt is not measured here."
               if p.teachers.max_rounds == 0 else ".")] if p.teachers.max_rounds != params_rounds else []),
         f"* Power: with n = {n} paired questions McNemar's exact test reaches p < 0.05 only if at least "
         f"{min_discordant(n)} questions are discordant and all go the same way; only a large difference can show.",
         "* The machine: 2 CPU cores, shared with other workers' jobs during the run, so seconds are indicative "
         "only.", "",
         "## Team result (paired, same questions)", "",
         "| style | team accuracy (final vote) | round-0 vote accuracy | round-0 consensus | "
         "consensus at the end | first-attempt format compliance | valid nodes | replies truncated | "
         "calls / question | generated tokens / question | prompt tokens / question | generation seconds |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in STYLES:
        q = per_q[s]
        L.append(f"| {s} | {sum(team[s])}/{n} = {_pct(acc[s])} | {_pct(r0team[s])} | {q['r0_consensus']}/{n} | "
                 f"{q['consensus']}/{n} | {_pct(q['first_ok'])} | {_pct(q['valid'])} | {_pct(q['truncated'])} | "
                 f"{q['calls']:.2f} | {q['gen']:.0f} | {q['prompt']:.0f} | "
                 + (f"{secs[s]:.0f}" if secs[s] else "not re-timed") + " |")
    L += ["", f"Paired difference reconcile - compact in team accuracy: {100 * (acc['reconcile'] - acc['compact']):+.1f} "
          f"points, 95 % paired bootstrap interval [{100 * lo:+.1f}, {100 * hi:+.1f}] ({args.bootstrap} resamples); "
          f"McNemar exact: {n01} questions only reconcile got right, {n10} only compact, p = {p_mc:.3f}.", "",
          "## Per agent and round", "",
          "Accuracy (discussed) is over the questions discussed in that round (round 1 only runs where round 0 "
          "had no consensus); accuracy (all) carries an agent's standing answer forward over all questions. "
          "First-attempt compliance: share of first replies that `discussion.parse_reply` turns into a valid "
          "answer; retries: re-asks after an unparseable reply (`parse_retries`); valid: nodes with a valid "
          "answer after the retry. Token and truncation columns count every call (retries included); prompt "
          "tokens are the chat-templated prompt plus the prefilled reply start, in the agent's own tokenizer.", "",
          "| style | agent | round | questions | first-attempt compliance | retries | valid | accuracy (discussed) | "
          "accuracy (all) | answer changed (wrong->right / right->wrong) | mean generated tokens | truncated | "
          "mean prompt tokens | generation seconds |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ch = r["changes"]
        chs = "-" if ch is None else f"{ch['changed']}/{r['questions']} ({ch['w2r']} / {ch['r2w']})"
        L.append(f"| {r['style']} | {r['agent']} | {r['round']} | {r['questions']} | {_pct(r['first_ok'])} | "
                 f"{r['retries']} | {_pct(r['valid'])} | {_pct(r['acc'])} | {_pct(r['acc_all'])} | {chs} | "
                 f"{_num(r['gen_tokens'])} | {_pct(r['truncated'])} | {_num(r['prompt_tokens'])} | "
                 + ("not re-timed" if r["seconds"] is None and r["style"] == "compact" else _num(r["seconds"]))
                 + " |")
    L += ["", "## Per-agent round-0 answers, paired", ""]
    for a in agent_names:
        c0 = [any(x.agent == a and x.round == 0 and x.correct for x in m.nodes) for m in runs["compact"][0]]
        r0 = [any(x.agent == a and x.round == 0 and x.correct for x in m.nodes) for m in runs["reconcile"][0]]
        m01, m10, pm = mcnemar_exact(r0, c0)
        L.append(f"* {a}: compact {sum(c0)}/{n}, reconcile {sum(r0)}/{n} correct in round 0; only reconcile "
                 f"right {m01}, only compact right {m10}, McNemar p = {pm:.3f}.")
    L += ["", "## Verdict", "", verdict(acc, p_mc, lo, hi, per_q, n), ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(L), encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)


def verdict(acc: dict[str, float], p_mc: float, lo: float, hi: float, per_q: dict, n: int) -> str:
    """The decision rule, fixed before the run: switch the default to `reconcile` only if its team accuracy is
    significantly higher (McNemar p < 0.05 and the paired interval above 0); otherwise keep `compact`, the
    cheaper prompt, unless reconcile is at least as accurate and complies with the format more often."""
    ratio = per_q["reconcile"]["prompt"] / per_q["compact"]["prompt"]
    cost = (f"reconcile reads {ratio:.1f}x the prompt tokens per question "
            f"({per_q['reconcile']['prompt']:.0f} vs {per_q['compact']['prompt']:.0f})")
    fmt = (f"first-attempt format compliance {_pct(per_q['reconcile']['first_ok'])} (reconcile) vs "
           f"{_pct(per_q['compact']['first_ok'])} (compact), valid nodes after the parse retry "
           f"{_pct(per_q['reconcile']['valid'])} vs {_pct(per_q['compact']['valid'])}, replies truncated at "
           f"max_new_tokens {_pct(per_q['reconcile']['truncated'])} vs {_pct(per_q['compact']['truncated'])}")
    if p_mc < 0.05 and lo > 0:
        return (f"**Switch the default to `reconcile`**: its team accuracy is significantly higher "
                f"({_pct(acc['reconcile'])} vs {_pct(acc['compact'])}, p = {p_mc:.3f}), although {cost}; {fmt}.")
    if p_mc < 0.05 and hi < 0:
        why = "is significantly worse"
    elif acc["reconcile"] >= acc["compact"] and per_q["reconcile"]["first_ok"] > per_q["compact"]["first_ok"]:
        return (f"**No significant difference** on n = {n} (team accuracy {_pct(acc['reconcile'])} reconcile vs "
                f"{_pct(acc['compact'])} compact, p = {p_mc:.3f}), but reconcile is not worse and {fmt}; {cost}. "
                "A larger sample should decide; until then `compact` stays the cheaper default.")
    else:
        why = "is not significantly better"
    return (f"**Keep `compact` as the default**: on these {n} questions reconcile's team accuracy {why} "
            f"({_pct(acc['reconcile'])} vs {_pct(acc['compact'])}, paired interval "
            f"[{100 * lo:+.1f}, {100 * hi:+.1f}] points, McNemar p = {p_mc:.3f}), {cost}, and {fmt}. "
            "`reconcile` stays available (`teachers.prompt_style`) for larger teachers, for which it was written.")


if __name__ == "__main__":
    main()
