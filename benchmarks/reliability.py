"""Reliability and security scenarios, measured, written to ``reports/reliability.md``.

The same scenarios as ``tests/test_reliability.py`` and ``tests/test_security.py`` (sharing their
fault-injection helpers, ``magdi.testing.faults``), run once with every number measured at run time:

* faults -- SIGKILL of a real MAG build (several times, at different points) and of a real training run
  (twice), a MAG record torn mid-append, a kill *during* a checkpoint write, and a teacher endpoint that is
  down / slow / rate-limiting forever / answering garbage. Teachers are ``OpenAIChatBackend`` instances
  talking HTTP to a local server on 127.0.0.1; the training child trains a tiny random Llama.
* bad input -- malformed benchmark rows, an empty split, one-sided MAGs, unparsable and 1 MB replies,
  unknown tasks, bad params, damaged MAG files.
* security -- injection payloads fed as answers, a token scan of the source for pickle/eval/remote code,
  and a fake API key followed through a discussion, the caches, the MAG file, the logs and MLflow.

    .venv/bin/python benchmarks/reliability.py            # -> reports/reliability.md (about a minute)
    .venv/bin/python benchmarks/reliability.py --out /tmp/r.md

Run from the repository root. ``--mag-child`` / ``--train-child`` are the entry points of the child
processes it starts and kills; they are not meant to be called by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import io
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
from collections.abc import Callable
from pathlib import Path
from typing import Any

from magdi.testing.faults import cache_snapshot as cache_entries
from magdi.testing.faults import (
    child_env,
    close_agents,
    closed_port_url,
    examples,
    n_lines,
    serve,
    teacher_agents,
    tiny_student,
    train_cfg,
)

ROOT = Path(__file__).resolve().parents[1]


def ids_in(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_bytes().decode().split("\n") if line.strip()]


# ============================================================================ child processes
def mag_child(url: str, work: Path) -> None:
    from magdi.discussion import build_mags

    agents = teacher_agents(url, work, timeout=10.0)
    mags = build_mags(agents, examples(12), "gsm8k", "number", work / "mags.jsonl", max_rounds=2, chunk_size=2,
                      parse_retries=0, context_chars=200)
    print(json.dumps({"n": len(mags)}))


def train_child(out: Path, pause: float) -> None:
    import torch

    torch.set_num_threads(1)
    from magdi.train import build_items, method_spec, train

    tok, lm, mags = tiny_student()
    items = build_items(mags, method_spec("magdi"), tok)
    res = train(lm, tok, items, method_spec("magdi"), train_cfg(), out, log_fn=lambda rec: time.sleep(pause))
    print(json.dumps({"resumed_from": res.resumed_from, "steps": res.steps, "history": res.history}))


def spawn(args: list[str], log: Path, stdout: Any = subprocess.DEVNULL) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as err:
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], env=child_env(),
                                stdout=stdout, stderr=err, text=stdout is subprocess.PIPE)


def wait_until(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float, log: Path) -> bool:
    """True once ``cond()`` holds; False if ``proc`` finished first."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            if proc.returncode != 0:
                raise RuntimeError(f"child failed:\n{log.read_text()[-3000:]}")
            return False
        if time.monotonic() > deadline:
            raise TimeoutError("child made no progress")
        time.sleep(0.005)
    return True


# ============================================================================ faults
Row = dict[str, Any]


def fault_mag_kills(tmp: Path, kill_at: tuple[int, ...] = (3, 7)) -> Row:
    """SIGKILL the MAG build once it has k records, for each k, then let a last run finish."""
    ref_dir, run_dir = tmp / "mag_ref", tmp / "mag_run"
    mags_path = run_dir / "mags.jsonl"
    at_kill, paid, in_flight = [], [], 0
    t0 = time.monotonic()
    with serve(delay=0.03) as ref_srv, serve(delay=0.03) as srv:
        ref = spawn(["--mag-child", ref_srv.url, str(ref_dir)], ref_dir / "stderr.txt")
        for k in kill_at:
            before_paid, before_cached = srv.n, len(cache_entries(run_dir))
            proc = spawn(["--mag-child", srv.url, str(run_dir)], run_dir / "stderr.txt")
            if not wait_until(lambda k=k: n_lines(mags_path) >= k, proc, 120, run_dir / "stderr.txt"):
                break  # finished before reaching k
            srv.hold()  # calls in flight at the kill: paid for, never received
            time.sleep(0.1)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            srv.release()
            at_kill.append(n_lines(mags_path))
            paid.append(srv.n - before_paid)
            in_flight += (srv.n - before_paid) - (len(cache_entries(run_dir)) - before_cached)
        before_paid, cached = srv.n, len(cache_entries(run_dir))
        last = spawn(["--mag-child", srv.url, str(run_dir)], run_dir / "stderr.txt")
        if last.wait(timeout=180) != 0 or ref.wait(timeout=180) != 0:
            raise RuntimeError((run_dir / "stderr.txt").read_text()[-3000:])
        last_paid, total_needed, total_paid = srv.n - before_paid, ref_srv.n, srv.n
    from magdi.mag import iter_mags

    ids = ids_in(mags_path)
    ref_mags = {m.id: m.to_json() for m in iter_mags(ref_dir / "mags.jsonl", strict=True)}
    got = {m.id: m.to_json() for m in iter_mags(mags_path, strict=True)}
    return {
        "kind": "SIGKILL of the MAG build (12 questions, 2 HTTP teachers)",
        "attempts": f"{len(at_kill)} kills",
        "outcome": ("restart finished; MAGs identical to an uninterrupted run" if got == ref_mags
                    else "MAGs DIFFER from the uninterrupted run"),
        "before": "/".join(map(str, at_kill)) + " records at the kills",
        "after": len(ids),
        "lost": len(set(ref_mags) - set(ids)),
        "duplicates": len(ids) - len(set(ids)),
        "paid_twice": f"{total_paid - total_needed} (= {in_flight} calls in flight at the kills); "
                      f"last run paid {last_paid} = {total_needed} needed - {cached} cached",
        "seconds": time.monotonic() - t0,
        "ok": got == ref_mags and total_paid - total_needed == in_flight and last_paid == total_needed - cached,
    }


def fault_torn_append(tmp: Path) -> Row:
    """A record torn mid-append (killed inside the write), then a resumed build."""
    from magdi.discussion import build_mags

    work, out = tmp / "torn", tmp / "torn" / "mags.jsonl"
    t0 = time.monotonic()
    with serve() as srv:
        agents = teacher_agents(srv.url, work, timeout=10.0)
        build_mags(agents, examples(4), "gsm8k", "number", out, 2, 2, 0, 200)
        full = out.read_bytes().split(b"\n")[3]
        out.write_bytes(b"\n".join(out.read_bytes().split(b"\n")[:3]) + b"\n" + full[: len(full) // 2])
        before, paid = n_lines(out), srv.n
        build_mags(agents, examples(12), "gsm8k", "number", out, 2, 2, 0, 200)
        close_agents(agents)
        paid_again = sum(1 for i in srv.items[paid:] if i < 4)
    ids = ids_in(out)
    return {"kind": "MAG record torn mid-append, then resume", "attempts": 1,
            "outcome": "torn line cut off, its question redone from the cache",
            "before": f"{before} whole + 1 torn", "after": len(ids),
            "lost": 12 - len(set(ids)), "duplicates": len(ids) - len(set(ids)),
            "paid_twice": paid_again, "seconds": time.monotonic() - t0,
            "ok": sorted(set(ids)) == [e["id"] for e in examples(12)] and len(ids) == 12 and paid_again == 0}


def ckpt_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def fault_train_kills(tmp: Path, kill_at: tuple[int, ...] = (2, 5)) -> Row:
    from safetensors.torch import load_file

    ref_dir, run_dir = tmp / "train_ref", tmp / "train_run"
    t0 = time.monotonic()
    ref = spawn(["--train-child", str(ref_dir), "0"], ref_dir / "stderr.txt", subprocess.PIPE)
    at_kill = []
    for k in kill_at:
        proc = spawn(["--train-child", str(run_dir), "0.3"], run_dir / "stderr.txt")
        if not wait_until(lambda k=k: ckpt_step(run_dir) >= k, proc, 180, run_dir / "stderr.txt"):
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        at_kill.append(ckpt_step(run_dir))
    last = spawn(["--train-child", str(run_dir), "0"], run_dir / "stderr.txt", subprocess.PIPE)
    out, _ = last.communicate(timeout=300)
    ref_out, _ = ref.communicate(timeout=300)
    if last.returncode or ref.returncode:
        raise RuntimeError((run_dir / "stderr.txt").read_text()[-3000:] + (ref_dir / "stderr.txt").read_text()[-3000:])
    resumed, full = json.loads(out), json.loads(ref_out)
    a = load_file(str(run_dir / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(ref_dir / "checkpoint" / "trainable.safetensors"))
    dw = max((a[k] - b[k]).abs().max().item() for k in a)
    dl = max(abs(x[k] - y[k]) for x, y in zip(resumed["history"], full["history"], strict=True) for k in x)
    ok = set(a) == set(b) and dw <= 1e-6 and dl <= 1e-6 and resumed["steps"] == full["steps"]
    return {"kind": "SIGKILL of training (tiny Llama + LoRA, method magdi, 8 steps, checkpoint every step)",
            "attempts": f"{len(at_kill)} kills",
            "outcome": f"resumed from step {resumed['resumed_from']}; final LoRA+heads max |Δ| = {dw:.1e}, "
                       f"loss history max |Δ| = {dl:.1e} vs uninterrupted",
            "before": "checkpoint step " + "/".join(map(str, at_kill)) + " at the kills",
            "after": f"{resumed['steps']} steps", "lost": 0 if ok else "RESULT DIFFERS",
            "duplicates": "0 steps counted twice" if len(resumed["history"]) == full["steps"] else "history duplicated",
            "paid_twice": f"{len(at_kill)} partial steps recomputed", "seconds": time.monotonic() - t0, "ok": ok}


def fault_kill_in_checkpoint_write(tmp: Path) -> Row:
    """A kill between the weight file and the optimizer file of one checkpoint (simulated in-process)."""
    import safetensors.torch
    from safetensors.torch import load_file

    import magdi.train as train_mod
    from magdi.train import build_items, method_spec, train

    class Killed(BaseException):
        pass

    t0 = time.monotonic()
    cfg = train_cfg(epochs=1)  # 4 steps; the kill hits step 3's checkpoint
    spec = method_spec("magdi")
    tok, lm, mags = tiny_student(dropout=0.0)
    items = build_items(mags, spec, tok)
    train(lm, tok, items, spec, cfg, tmp / "ckw_ref")
    real, calls = safetensors.torch.save_file, [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 6:
            raise Killed
        return real(*args, **kwargs)

    safetensors.torch.save_file = dying
    had = hasattr(train_mod, "save_file")
    if had:
        real_mod = train_mod.save_file
        train_mod.save_file = dying
    try:
        train(tiny_student(dropout=0.0)[1], tok, items, spec, cfg, tmp / "ckw_run")
        killed = False
    except Killed:
        killed = True
    finally:
        safetensors.torch.save_file = real
        if had:
            train_mod.save_file = real_mod
    try:
        train(tiny_student(dropout=0.0)[1], tok, items, spec, cfg, tmp / "ckw_run")
        a = load_file(str(tmp / "ckw_run" / "checkpoint" / "trainable.safetensors"))
        b = load_file(str(tmp / "ckw_ref" / "checkpoint" / "trainable.safetensors"))
        dw = max((a[k] - b[k]).abs().max().item() for k in a)
        outcome = f"resumed; final weights max |Δ| = {dw:.1e} vs uninterrupted"
        ok = dw <= 1e-6
    except Exception as e:  # a torn checkpoint may not even load
        outcome, ok, dw = f"resume FAILED: {type(e).__name__}: {str(e)[:120]}", False, float("nan")
    if not ok:
        outcome += (" -- KNOWN ISSUE: magdi.train.loop._save_ckpt overwrites the .safetensors files in place before "
                    "renaming state.json (test xfail: test_kill_during_checkpoint_write_still_resumes_exactly)")
    return {"kind": "kill inside a checkpoint write (after the weights, before the optimizer state)",
            "attempts": 1 if killed else "0 (kill point not reached)", "outcome": outcome,
            "before": "checkpoint step 2 + step-3 weights", "after": "4 steps",
            "lost": 0 if ok else "result differs", "duplicates": 0 if ok else "step 3 applied twice",
            "paid_twice": "-", "seconds": time.monotonic() - t0, "ok": ok, "known_issue": not ok}


FAULT_NAMES = {"down": "APIConnectionError", "slow": "APITimeoutError", "429": "RateLimitError (HTTP 429)",
               "garbage": "MalformedResponseError"}


def fault_endpoint(tmp: Path, fault: str) -> Row:
    from magdi.backends_openai import TeacherCallError
    from magdi.discussion import build_mags

    work, out = tmp / f"endpoint_{fault}", tmp / f"endpoint_{fault}" / "mags.jsonl"
    ex = examples(3)
    with serve() as srv:
        agents = teacher_agents(srv.url, work, timeout=10.0)
        build_mags(agents, ex[:2], "gsm8k", "number", out, 2, 2, 0, 200)
        close_agents(agents)
        cache_before, mags_before = cache_entries(work), out.read_bytes()
        srv.mode = fault
        url = closed_port_url() if fault == "down" else srv.url
        agents = teacher_agents(url, work, retries=2, timeout=0.3)
        paid, t0 = srv.n, time.monotonic()
        msg = "no error raised"
        try:
            build_mags(agents, ex, "gsm8k", "number", out, 2, 2, 0, 200)
        except TeacherCallError as e:
            msg = str(e)
        elapsed = time.monotonic() - t0
        close_agents(agents)
        attempts = srv.n - paid
        m = re.search(r"gave up after (\d+) attempts", msg)
        intact = cache_entries(work) == cache_before and out.read_bytes() == mags_before
        srv.mode = "ok"
        agents = teacher_agents(srv.url, work, timeout=10.0)
        paid = srv.n
        build_mags(agents, ex, "gsm8k", "number", out, 2, 2, 0, 200)
        close_agents(agents)
        paid_twice = sum(1 for i in srv.items[paid:] if i != 2)
    ids = ids_in(out)
    ok = (bool(m) and m.group(1) == "3" and FAULT_NAMES[fault] in msg and "\n" not in msg and intact
          and paid_twice == 0 and len(ids) == 3)
    return {"kind": f"teacher endpoint {fault}", "attempts": f"{m.group(1) if m else '?'} "
            f"({attempts} reached the server)", "outcome": f"TeacherCallError after {elapsed:.2f} s: "
            + msg.replace(url, "<url>"),
            "before": f"{len(mags_before.splitlines())} records, {len(cache_before)} cached calls",
            "after": f"{len(mags_before.splitlines())} records + cache intact = {intact}; after recovery {len(ids)}",
            "lost": 0 if intact else "CACHE/MAGS CHANGED", "duplicates": len(ids) - len(set(ids)),
            "paid_twice": paid_twice, "seconds": elapsed, "ok": ok}


# ============================================================================ bad inputs
def _timed(fn: Callable[[], str]) -> tuple[str, str, float]:
    t0 = time.perf_counter()
    try:
        outcome, msg = "ok", fn()
    except Exception as e:
        outcome, msg = f"{type(e).__name__}", str(e)
    return outcome, msg, time.perf_counter() - t0


def bad_inputs(tmp: Path) -> list[Row]:
    import torch
    import yaml

    from magdi.config import load_params, parse_params
    from magdi.data import load_benchmark, prepare_all
    from magdi.discussion import Agent, discuss_chunk, parse_reply
    from magdi.mag import MAG, Node, append_mag, read_mags
    from magdi.scoring import extract_answer
    from magdi.train import MagdiStudent, build_items, encode_step, method_spec

    rows: list[Row] = []

    def add(name: str, fn: Callable[[], str], expect: str) -> None:
        outcome, msg, secs = _timed(fn)
        rows.append({"input": name, "outcome": outcome, "message": msg, "seconds": secs,
                     "ok": outcome == expect or (expect == "Error" and outcome != "ok")})

    def gsm(i: int, q: str | None = "How many?", a: str = "x #### 5") -> str:
        return json.dumps({"question": q.replace("?", f" {i}?") if q else q, "answer": a})

    mirror = tmp / "mirror"
    (mirror / "gsm8k").mkdir(parents=True)
    (mirror / "gsm8k" / "train.jsonl").write_text("\n".join(
        [gsm(0), "{not json", gsm(1, q=None), gsm(2, a="no final line"), "[1, 2]", gsm(3), "", gsm(4, a="#### five")]) + "\n")
    (mirror / "gsm8k" / "test.jsonl").write_text("\n".join([gsm(10), gsm(11), '"just a string"']) + "\n")

    def malformed() -> str:
        pools, rep = load_benchmark("gsm8k", "mirror", mirror)
        return (f"kept {len(pools['train']) + len(pools['test'])} of {rep.n_raw} rows, {rep.n_malformed} malformed "
                f"counted and skipped, e.g. {rep.malformed_examples[0]}; {rep.malformed_examples[3]}")

    add("gsm8k mirror with 6 malformed rows of 10 (bad JSON, missing field, no ####, list, string)", malformed, "ok")

    empty = tmp / "mirror_empty"
    (empty / "gsm8k").mkdir(parents=True)
    (empty / "gsm8k" / "train.jsonl").write_text(gsm(0) + "\n")
    (empty / "gsm8k" / "test.jsonl").write_text("")

    def empty_split() -> str:
        with open(os.devnull, "w") as null:
            old, sys.stdout = sys.stdout, null
            try:
                s = prepare_all(["gsm8k"], "mirror", empty, tmp / "prep", 8, 8, 0)["gsm8k"]
            finally:
                sys.stdout = old
        return f"status {s['status']}, n_train {s['n_train']}, n_test {s['n_test']} (empty test.jsonl written)"

    add("empty test split (gsm8k/test.jsonl is empty)", empty_split, "ok")
    (empty / "svamp").mkdir()
    (empty / "svamp" / "SVAMP.json").write_text("")
    add("empty JSON-list mirror file (svamp/SVAMP.json)", lambda: str(load_benchmark("svamp", "mirror", empty)),
        "ValueError")

    tok, lm, _ = tiny_student(dropout=0.0)
    right = MAG("r", "gsm8k", "what is 1 plus 3 ?", "4", [Node("x", 0, "1 plus 3 is 4", "4", 0.9, True),
                                                           Node("y", 0, "still 4", "4", 0.8, True)])
    wrong = MAG("w", "gsm8k", "what is 2 plus 3 ?", "5", [Node("x", 0, "2 plus 3 is 6", "6", 0.9, False),
                                                           Node("y", 0, "garbled", None, 0.0, False, valid=False)])
    cfg = train_cfg()

    def one_sided() -> str:
        items = build_items([right, wrong], method_spec("magdi"), tok)
        model = MagdiStudent(lm, method_spec("magdi"), cfg)
        enc = encode_step(items, tok, 64, 16)
        out = model(enc, items, 0)
        out["loss"].backward()
        skipped = 2 - len(build_items([right, wrong], method_spec("magdi_cn"), tok))
        assert torch.isfinite(out["loss"])
        return (f"L_contrastive = {abs(out['contrastive'].item()):.1f}, loss {out['loss'].item():.3f} "
                f"(finite, backward ok); "
                f"magdi_cn skips {skipped} of 2 MAGs")

    add("MAGs with no incorrect / no correct node (method magdi)", one_sided, "ok")

    class Canned:
        def generate(self, batch, temperature, top_p, max_new_tokens, seed):
            return [{"text": "I am sorry, I cannot answer that.", "n_tokens": 7} for _ in batch]

    def not_json() -> str:
        agents = [Agent(n, Canned(), "p", 0.7, 0.95, s, 32) for n, s in (("a", 1), ("b", 2))]
        (mag,) = discuss_chunk(agents, examples(1), "gsm8k", "number", 1, 1)
        return (f"parse_reply -> {parse_reply('I am sorry.', 'number', None)}; MAG with {len(mag.nodes)} nodes, "
                f"{sum(not n.valid for n in mag.nodes)} flagged invalid, team answer {mag.team_answer}")

    add("teacher reply that is not JSON (a refusal)", not_json, "ok")

    n = 1_000_000
    huge = {"prose + answer": ("lorem ipsum dolor sit amet " * (n // 27)) + "The answer is 5.",
            "answer field = 1 MB of 'The answer is'": '{"answer": "' + "The answer is " * (n // 14) + '"}',
            "1 MB of '{'": "{" * n, "1 MB of '['": '{"x": ' + "[" * n + "}"}

    def huge_replies() -> str:
        worst = 0.0
        for text in huge.values():
            for at in ("yesno", "choice", "number", "latex"):
                t0 = time.perf_counter()
                parse_reply(text, at, ["bank", "river"] if at == "choice" else None)
                worst = max(worst, time.perf_counter() - t0)
        return f"parse_reply worst {worst:.2f} s over {len(huge)} payloads x 4 answer types"

    add("1 MB teacher replies (prose, marker flood, brace flood, 1M nested brackets)", huge_replies, "ok")

    def scorer_flood() -> str:
        def alarm(signum, frame):
            raise TimeoutError("extract_answer took more than 2 s (stopped)")

        old = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, 2.0)
        try:
            t0 = time.perf_counter()
            extract_answer("The answer is " * (n // 14), "choice", ["bank", "river"])
            return f"{time.perf_counter() - t0:.2f} s"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    add("scorer on 1 MB of 'The answer is' (student text; KNOWN ISSUE, xfail)", scorer_flood, "ok")

    base = yaml.safe_load((ROOT / "params.yaml").read_text())

    def with_(dotted: str, value: Any) -> dict:
        raw = copy.deepcopy(base)
        *parents, last = dotted.split(".")
        node = raw
        for k in parents:
            node = node[k]
        node[last] = value
        return raw

    for name, key, value in [("unknown task in data.benchmarks", "data.benchmarks", ["gsm8k", "mathqa"]),
                             ("unknown task in experiments.tasks", "experiments.tasks", ["gsm8k", "mathqa"]),
                             ("wrong type: train.lr = 'fast'", "train.lr", "fast"),
                             ("negative lr: train.lr = -3e-4", "train.lr", -3e-4),
                             ("unknown key: train.lrr", "train.lrr", 1e-3),
                             ("API key in params: teachers.agents.0.api_key", "teachers", None)]:
        if value is None:
            raw = copy.deepcopy(base)
            raw["teachers"]["agents"][0]["api_key"] = "sk-live-0123456789abcdef"
        else:
            raw = with_(key, value)
        add(name, lambda raw=raw: str(parse_params(raw)), "ConfigError")
    bad_yaml = tmp / "params_bad.yaml"
    bad_yaml.write_text("train: {lr: 0.1\n")
    add("params.yaml with a YAML syntax error", lambda: str(load_params(bad_yaml, check_mirror=False)), "ConfigError")

    def reader(blob: bytes) -> Callable[[], str]:
        def run() -> str:
            p = tmp / "mags_bad.jsonl"
            good = json.dumps(MAG("q0", "gsm8k", "Q", "5", []).to_json()).encode()
            p.write_bytes(good + b"\n" + blob + b"\n" + good.replace(b'"q0"', b'"q1"') + b"\n")
            return f"{len(read_mags(p))} MAGs"
        return run

    add("MAG file line that is not UTF-8", reader(b"\xff\xfe garbage"), "ValueError")
    add("MAG file line of 100k '['", reader(b"[" * 100_000), "ValueError")
    add("MAG file line with a mistyped field (id: 1)", reader(b'{"id": 1, "task": "gsm8k", "question": "Q", '
                                                             b'"gold": "5", "nodes": []}'), "ValueError")

    def sep_roundtrip() -> str:
        p = tmp / "mags_sep.jsonl"
        mag = MAG("q0", "gsm8k", "Q", "5", [Node("a", 0, "one\u2028two\x85three", "5", 0.9, True)])
        append_mag(p, mag)
        back = read_mags(p)
        assert back == [mag]
        return "U+2028 / U+0085 inside reasoning: record read back intact"

    add("model text with Unicode line separators", sep_roundtrip, "ok")
    for r in rows:
        r["message"] = " ".join(str(r["message"]).split())
        r["message"] = r["message"].replace(str(tmp), "<tmp>")
    return rows


# ============================================================================ security
BANNED_NAMES = {"pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal", "sympify", "parse_expr",
                "unsafe_load", "full_load", "log_model"}
BANNED_CALLS = {"eval", "exec", "compile", "__import__"}
BANNED_ATTRS = {("torch", "load"), ("torch", "save"), ("yaml", "load"), ("pickle", "loads")}
BANNED_KWARGS = {("trust_remote_code", "True"), ("weights_only", "False"), ("allow_pickle", "True")}
SKIP = {tokenize.COMMENT, tokenize.STRING, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}


def scan_source(text: str, where: str) -> list[str]:
    toks = [t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type not in SKIP]
    hits = []
    for i, t in enumerate(toks):
        if t.type != tokenize.NAME:
            continue
        prev = toks[i - 1].string if i else ""
        nxt = toks[i + 1].string if i + 1 < len(toks) else ""
        nxt2 = toks[i + 2].string if i + 2 < len(toks) else ""
        at = f"{where}:{t.start[0]}"
        if t.string in BANNED_NAMES:
            hits.append(f"{at}: {t.string}")
        if t.string in BANNED_CALLS and nxt == "(" and prev not in (".", "def"):
            hits.append(f"{at}: {t.string}(")
        if nxt == "." and (t.string, nxt2) in BANNED_ATTRS:
            hits.append(f"{at}: {t.string}.{nxt2}")
        if nxt in ("=", ":") and (t.string, nxt2) in BANNED_KWARGS:
            hits.append(f"{at}: {t.string}={nxt2}")
    hits += [f"{where}: trust_remote_code: True" for _ in re.finditer(r"""["']trust_remote_code["']\s*:\s*True""", text)]
    return hits


def security(tmp: Path) -> list[Row]:
    import yaml

    from magdi.backends_openai import TeacherCallError
    from magdi.config import StudentCfg, parse_params
    from magdi.discussion import parse_reply
    from magdi.pipeline import mags_file, make_agents
    from magdi.scoring import extract_answer, is_correct, majority_vote
    from magdi.tracking import mlflow_run

    rows: list[Row] = []
    sentinel = tmp / "pwned"
    s = str(sentinel)
    payloads = [f"__import__('os').system('touch {s}')", f"\\boxed{{__import__('os').system('touch {s}')}}",
                f"The answer is eval(\"__import__('os').system('touch {s}')\")",
                f"exec(\"import os; os.system('touch {s}')\")", f"Lambda(x, __import__('os').system('touch {s}'))",
                f"open('{s}', 'w').write('x')", f"cos\nsystem\n(S'touch {s}'\ntR.",
                f"{{\"answer\": \"__import__('os').system('touch {s}')\"}}"]
    gold = {"yesno": "yes", "choice": "B", "number": "5", "latex": "\\frac{1}{2}"}
    calls = 0
    for p in payloads:
        wrapped = json.dumps({"reasoning": p, "answer": p, "confidence": p})
        for at in gold:
            for text in (p, wrapped):
                choices = ["bank", p] if at == "choice" else None
                extract_answer(text, at, choices)
                parse_reply(text, at, choices)
                is_correct(text, gold[at], at)
                majority_vote([text, text], at)
                calls += 4
    rows.append({"check": "code-injection payloads as answers (scorers of 4 answer types, parse_reply, vote)",
                 "measured": f"{len(payloads)} payloads, {calls} calls; sentinel file created: {sentinel.exists()}",
                 "ok": not sentinel.exists()})

    files = sorted(p for d in ("src", "stages") for p in (ROOT / d).rglob("*.py"))
    hits = [h for f in files for h in scan_source(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    rows.append({"check": "token scan of src/ + stages/ for pickle, torch.load/save, eval/exec, sympify/parse_expr, "
                          "yaml.load, trust_remote_code=True",
                 "measured": f"{len(files)} files, {len(hits)} hits" + (f": {hits[:5]}" if hits else ""),
                 "ok": not hits})
    rows.append({"check": "trust_remote_code default", "measured": f"StudentCfg(model='m').trust_remote_code = "
                 f"{StudentCfg(model='m').trust_remote_code}", "ok": StudentCfg(model="m").trust_remote_code is False})

    secret, env = "sk-test-SECRET-123", "MAGDI_TEST_KEY"
    os.environ[env] = secret
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    cwd = os.getcwd()
    work = tmp / "secret"
    work.mkdir()
    os.chdir(work)
    try:
        raw = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
        raw["paths"] = {**raw["paths"], "cache_dir": str(work / "cache"), "mags_dir": str(work / "mags"),
                        "runs_dir": str(work / "runs"), "tracking_uri": f"sqlite:///{work}/mlflow.db"}
        with serve() as srv:
            raw["teachers"]["agents"] = [{"name": f"gpt_{x}", "backend": "openai", "model": f"teacher-{x}",
                                          "base_url": srv.url, "api_key_env": env, "timeout_s": 5.0} for x in "ab"]
            raw["experiments"]["methods"] = ["magdi"]
            p = parse_params(raw)
            agents = make_agents(p)
            from magdi.discussion import build_mags

            mags = build_mags(agents, examples(3), "gsm8k", "number", mags_file(p, "gsm8k"), 2, 8, 1, 300)
            try:
                agents[0].backend.generate([[{"role": "user", "content": "Item 99: what is 1 plus 1?"}]],
                                           0.7, 0.95, 32, 1)
                err = ""
            except TeacherCallError as e:
                err = str(e)
                logging.getLogger("magdi.stage").error("teacher failed: %s", e)
            used = set(srv.auth) == {f"Bearer {secret}"}
        with mlflow_run(p.paths.tracking_uri, "magdi-security", "leak-check",
                        {"params": p.model_dump(), "teacher_api_key": secret}) as mlf:
            mlf.log_metrics({"n_mags": len(mags)})
            mlf.set_tag("error", err)
        for a in agents:
            a.backend.cache.close()
    finally:
        os.chdir(cwd)
        root.removeHandler(handler)
        root.setLevel(old_level)
        del os.environ[env]
    blobs = {str(f.relative_to(work)): f.read_bytes() for f in work.rglob("*") if f.is_file()}
    blobs["logs"] = stream.getvalue().encode()
    blobs["error message"] = err.encode()
    leaks = [k for k, v in blobs.items() if secret.encode() in v]
    nbytes = sum(len(v) for v in blobs.values())
    rows.append({"check": "fake API key (env var) through make_agents -> discussion -> 401 echo -> logs -> MLflow",
                 "measured": f"key sent as Bearer: {used}; scanned {len(blobs)} files/streams ({nbytes:,} bytes: "
                             f"caches, MAG jsonl, mlflow.db, debug logs, error): {len(leaks)} contain the key"
                             + (f" {leaks}" if leaks else "") + f"; echoed key scrubbed: {'***' in err}",
                 "ok": used and not leaks and "***" in err})
    key_like = re.compile(rb"(sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{30,}|Bearer\s+[A-Za-z0-9._-]{12,})")
    tracked = [ROOT / n for n in ("dvc.lock", "dvc.yaml", "params.yaml", "params.paper.yaml")]
    for d in ("reports", "metrics", "configs"):
        tracked += [f for f in (ROOT / d).rglob("*") if f.is_file()] if (ROOT / d).is_dir() else []
    found = [str(f.relative_to(ROOT)) for f in tracked if f.is_file() and key_like.search(f.read_bytes())]
    rows.append({"check": "credential-like strings in dvc.lock, dvc.yaml, params*.yaml, reports/, metrics/, configs/",
                 "measured": f"{sum(f.is_file() for f in tracked)} files, {len(found)} with a match {found or ''}",
                 "ok": not found})
    return rows


# ============================================================================ report
def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def write_report(out: Path, faults: list[Row], bad: list[Row], sec: list[Row], seconds: float) -> None:
    import torch

    lines = [
        "# Reliability and security",
        "",
        f"Generated by `benchmarks/reliability.py` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC "
        f"in {seconds:.0f} s; Python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs. Every number below was measured by "
        "that run. Teachers are `OpenAIChatBackend` clients of a local HTTP server on 127.0.0.1; kills are "
        "real `SIGKILL`s of child processes; the student is a tiny random Llama (hidden 32, 2 layers) + LoRA.",
        "",
        "## Faults",
        "",
        "| kind | attempts | outcome | records before | records after | records lost | duplicates | calls paid twice | s | ok |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in faults:
        ok = "yes" if r["ok"] else ("**no (known issue)**" if r.get("known_issue") else "**NO**")
        lines.append("| " + " | ".join(_cell(r[k]) for k in ("kind", "attempts", "outcome", "before", "after", "lost",
                                                             "duplicates", "paid_twice"))
                     + f" | {r['seconds']:.1f} | {ok} |")
    lines += ["", "\"Calls paid twice\" after a kill are the teacher calls that were in flight at the moment of the "
              "kill (sent, never answered to the dead process); every answer that came back was cached and never "
              "asked again. Endpoint faults use `max_retries=2` (3 attempts), 10 ms backoff, a 0.3 s timeout.",
              "", "## Bad input", "", "| input | outcome | message / result | s | as expected |", "|---|---|---|---|---|"]
    for r in bad:
        lines.append(f"| {_cell(r['input'])} | {_cell(r['outcome'])} | {_cell(r['message'][:300])} | "
                     f"{r['seconds']:.2f} | {'yes' if r['ok'] else '**no**'} |")
    lines += ["", "## Security checks", "", "| check | measured | ok |", "|---|---|---|"]
    for r in sec:
        lines.append(f"| {_cell(r['check'])} | {_cell(r['measured'])} | {'yes' if r['ok'] else '**NO**'} |")
    known = [r["kind"] for r in faults if r.get("known_issue")] + [r["input"] for r in bad if not r["ok"]]
    if known:
        lines += ["", "## Open issues found by this run", ""] + [f"- {k}" for k in known]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "reliability.md")
    ap.add_argument("--mag-child", nargs=2, metavar=("URL", "WORK"), help=argparse.SUPPRESS)
    ap.add_argument("--train-child", nargs=2, metavar=("OUT", "PAUSE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mag_child:
        return mag_child(args.mag_child[0], Path(args.mag_child[1]))
    if args.train_child:
        return train_child(Path(args.train_child[0]), float(args.train_child[1]))
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("magdi").setLevel(logging.ERROR)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="magdi-reliability-") as d:
        tmp = Path(d)
        faults: list[Row] = []
        box: dict[str, Row] = {}
        # the training kills run in the background (their own processes) while the rest proceeds
        def train_kills() -> None:
            try:
                box["train"] = fault_train_kills(tmp)
            except Exception as e:  # reported as a failed row
                box["error"] = {"kind": "SIGKILL of training", "attempts": "-", "outcome": f"{type(e).__name__}: {e}",
                                "before": "-", "after": "-", "lost": "-", "duplicates": "-", "paid_twice": "-",
                                "seconds": 0.0, "ok": False}

        bg = threading.Thread(target=train_kills, daemon=True)
        bg.start()
        faults.append(fault_mag_kills(tmp))
        faults.append(fault_torn_append(tmp))
        faults += [fault_endpoint(tmp, f) for f in FAULT_NAMES]
        bad = bad_inputs(tmp)
        with contextlib.redirect_stderr(io.StringIO()):  # the in-process training's progress bars
            faults.append(fault_kill_in_checkpoint_write(tmp))
        sec = security(tmp)
        bg.join(timeout=600)
        faults.insert(2, box.get("train") or box.get("error") or {
            "kind": "SIGKILL of training", "attempts": "-", "outcome": "did not finish", "before": "-", "after": "-",
            "lost": "-", "duplicates": "-", "paid_twice": "-", "seconds": 0.0, "ok": False})
    write_report(args.out, faults, bad, sec, time.monotonic() - t0)
    print(args.out.read_text())
    print(f"wrote {args.out} in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
