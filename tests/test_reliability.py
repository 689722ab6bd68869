"""Reliability: real faults (SIGKILL of real processes, a misbehaving teacher endpoint on loopback) and bad
input (malformed benchmark rows, empty splits, one-sided MAGs, unparsable or huge replies, bad params).

Every fault test runs real code paths end to end: child processes import ``magdi`` exactly as the stages do,
teachers are ``OpenAIChatBackend`` instances talking HTTP to a local ``ThreadingHTTPServer`` on 127.0.0.1,
and the training child trains a tiny random Llama (hidden 32, 2 layers) built from a fixed seed.
"""

from __future__ import annotations

import copy
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from magdi.backends_openai import TeacherCallError
from magdi.config import ConfigError, TrainCfg, load_params, parse_params
from magdi.data import LoadReport, load_benchmark, prepare_all, sample_splits
from magdi.discussion import Agent, build_mags, discuss_chunk, parse_reply
from magdi.mag import MAG, Node, append_mag, iter_mags, read_mags
from magdi.scoring import extract_answer, is_correct
from magdi.testing.faults import (
    cache_snapshot,
    child_env,
    close_agents,
    closed_port_url,
    examples,
    n_lines,
    serve,
    teacher_agents,
)

ROOT = Path(__file__).resolve().parents[1]
ANSWER_TYPES = ("yesno", "choice", "number", "latex")


@pytest.fixture
def reap() -> Iterator[list[subprocess.Popen]]:
    """Child processes registered here are killed at the end of the test if still running (e.g. a pre-started
    restart still waiting for its "go" file when an assertion failed)."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# ============================================================================ 1a. SIGKILL the MAG build
# The child waits for a "go" file after its imports, so that the restart can be started (and pay its import
# time) while the first run is still going; it opens the cache only after "go", i.e. after the kill.
MAG_SCRIPT = r"""
import json, sys, time
from pathlib import Path
from magdi.backends_openai import OpenAIChatBackend
from magdi.cache import CallCache
from magdi.discussion import Agent, build_mags
url, work, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
while not go.exists():
    time.sleep(0.01)
ex = [{"id": f"q{i:02d}", "question": f"Item {i}: what is {i} plus {i + 3}?", "choices": None,
       "answer": str(2 * i + 3), "explanation": None} for i in range(12)]
agents = [Agent(n, OpenAIChatBackend(m, url, None, timeout_s=10, max_retries=2, concurrency=2,
                                     cache=CallCache(work / f"cache_{m}.jsonl"), backoff_base_s=0.01),
                "You are a careful reasoner.", 0.7, 0.95, s, 64)
          for n, m, s in (("a", "teacher-a", 1), ("b", "teacher-b", 2))]
mags = build_mags(agents, ex, "gsm8k", "number", work / "mags.jsonl", max_rounds=2, chunk_size=2,
                  parse_retries=0, context_chars=200)
print(json.dumps({"n": len(mags), "requests": sum(a.backend.n_requests for a in agents)}))
"""


def start_mag_child(url: str, work: Path, go: Path) -> subprocess.Popen:
    work.mkdir(parents=True, exist_ok=True)
    with (work / "stdout.txt").open("ab") as out, (work / "stderr.txt").open("ab") as err:
        return subprocess.Popen([sys.executable, "-c", MAG_SCRIPT, url, str(work), str(go)], env=child_env(),
                                stdout=out, stderr=err)


def test_mag_build_sigkill_and_restart_loses_nothing_and_pays_nothing_twice(tmp_path: Path,
                                                                             reap: list[subprocess.Popen]) -> None:
    work, ref_dir = tmp_path / "run", tmp_path / "ref"
    go1, go2 = tmp_path / "go1", tmp_path / "go2"
    mags_path = work / "mags.jsonl"
    with serve(delay=0.03) as ref_srv, serve(delay=0.03) as srv:
        run = start_mag_child(srv.url, work, go1)
        restart = start_mag_child(srv.url, work, go2)  # imports now, starts after the kill
        reap += [run, restart]
        go1.touch()
        # the uninterrupted reference run, in this process, meanwhile
        ref_agents = teacher_agents(ref_srv.url, ref_dir, timeout=10)
        ref_thread = threading.Thread(target=build_mags, args=(ref_agents, examples(12), "gsm8k", "number",
                                                               ref_dir / "mags.jsonl", 2, 2, 0, 200))
        ref_thread.start()
        deadline = time.monotonic() + 60
        while n_lines(mags_path) < 3:
            assert run.poll() is None, (work / "stderr.txt").read_text()[-2000:]
            assert time.monotonic() < deadline, "the MAG build made no progress"
            time.sleep(0.005)
        srv.hold()  # calls in flight at the kill are paid for and lost, as with a real endpoint
        time.sleep(0.1)
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=10)
        srv.release()
        assert run.returncode == -signal.SIGKILL
        records_at_kill = n_lines(mags_path)
        paid_first = srv.n
        cached = len(cache_snapshot(work))
        assert 3 <= records_at_kill < 12, "killed too late to test anything"

        go2.touch()
        assert restart.wait(timeout=120) == 0, (work / "stderr.txt").read_text()[-2000:]
        ref_thread.join(timeout=120)
        close_agents(ref_agents)
        paid_second = srv.n - paid_first
        total_needed = ref_srv.n

    lines = mags_path.read_bytes().decode().split("\n")[:-1]
    ids = [json.loads(line)["id"] for line in lines]  # every record is one whole JSON line
    assert sorted(ids) == [f"q{i:02d}" for i in range(12)]  # each question exactly once
    assert len(ids) == len(set(ids)) == 12
    mags = list(iter_mags(mags_path, strict=True))
    reference = {m.id: m.to_json() for m in iter_mags(ref_dir / "mags.jsonl", strict=True)}
    assert {m.id: m.to_json() for m in mags} == reference  # same discussion as without the kill
    assert {m.graph_type for m in mags} == {"G0", "G1", "G2"}
    # nothing paid twice: the restart only asks what the cache does not hold ...
    assert paid_second == total_needed - cached
    # ... and the only calls paid twice are the ones in flight at the kill (answers never received)
    assert paid_first - cached == paid_first + paid_second - total_needed >= 0


# ============================================================================ 1b. SIGKILL the training
# argv: OUT PAUSE GO REF. After its imports and model build the child waits for GO (so the restart is
# pre-started); with REF != "-" it then also trains a fresh model from scratch into REF: the uninterrupted
# reference, computed by the same code in the same kind of process (one thread, fixed seeds).
TRAIN_SCRIPT = r"""
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
out, pause, go, ref, tests_dir = Path(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5]
sys.path.insert(0, tests_dir)
from magdi.testing.faults import tiny_student, train_cfg
from magdi.train import build_items, method_spec, train

spec = method_spec("magdi")
tok, lm, mags = tiny_student()
items = build_items(mags, spec, tok)
while not go.exists():
    time.sleep(0.01)
res = train(lm, tok, items, spec, train_cfg(), out, log_fn=lambda rec: time.sleep(pause))
result = {"run": {"resumed_from": res.resumed_from, "steps": res.steps, "history": res.history}}
if ref != "-":
    res = train(tiny_student()[1], tok, items, spec, train_cfg(), Path(ref))
    result["ref"] = {"resumed_from": res.resumed_from, "steps": res.steps, "history": res.history}
print(json.dumps(result))
"""


def start_train_child(out: Path, pause: float, go: Path, ref: Path | None = None) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "stderr.txt").open("ab") as err:
        return subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, str(out), str(pause), str(go), str(ref or "-"),
                                 str(Path(__file__).resolve().parent)],
                                env=child_env(), stdout=subprocess.PIPE, stderr=err, text=True)


def ckpt_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_training_sigkill_resumes_from_checkpoint_with_identical_result(tmp_path: Path,
                                                                        reap: list[subprocess.Popen]) -> None:
    from safetensors.torch import load_file

    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    go1, go2 = tmp_path / "go1", tmp_path / "go2"
    # pause in log_fn (called before each checkpoint save) so the kill lands between saves, mid-training
    run = start_train_child(run_dir, 0.3, go1)
    restart = start_train_child(run_dir, 0.0, go2, ref_dir)  # imports now, resumes after the kill
    reap += [run, restart]
    go1.touch()
    deadline = time.monotonic() + 120
    while ckpt_step(run_dir) < 2:
        assert run.poll() is None, (run_dir / "stderr.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=10)
    killed_at = ckpt_step(run_dir)
    assert run.returncode == -signal.SIGKILL and 2 <= killed_at < 8

    go2.touch()
    out, _ = restart.communicate(timeout=180)
    assert restart.returncode == 0, (run_dir / "stderr.txt").read_text()[-3000:]
    result = json.loads(out)
    resumed, full = result["run"], result["ref"]
    assert resumed["resumed_from"] == killed_at and full["resumed_from"] == 0
    assert resumed["steps"] == full["steps"] == 8

    a = load_file(str(run_dir / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(ref_dir / "checkpoint" / "trainable.safetensors"))
    assert set(a) == set(b) and any("lora_" in k for k in a) and any("score_head" in k for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    for ha, hb in zip(resumed["history"], full["history"], strict=True):
        assert ha.keys() == hb.keys()
        for k in ha:
            assert abs(ha[k] - hb[k]) <= 1e-6, (k, ha, hb)


def _train_mags(n: int) -> list[MAG]:
    return [MAG(f"m{i}", "gsm8k", f"What is {i} plus 3?", str(i + 3),
                [Node("a", 0, f"{i} plus 3 is {i + 3}", str(i + 3), 0.9, True),
                 Node("b", 0, f"{i} plus 3 is {i + 4}", str(i + 4), 0.6, False)]) for i in range(n)]


def test_kill_during_checkpoint_write_still_resumes_exactly(make_lm, tiny_tokenizer, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch
    from safetensors.torch import load_file

    import magdi.train as train_mod
    from magdi.train import build_items, method_spec, train

    cfg = TrainCfg(epochs=1, lr=1e-2, mags_per_step=2, max_prompt_tokens=48, max_target_tokens=16,
                   hidden_dim=16, checkpoint_every=1, seed=0)
    spec = method_spec("magdi")
    items = build_items(_train_mags(8), spec, tiny_tokenizer)
    train(make_lm(), tiny_tokenizer, items, spec, cfg, tmp_path / "ref")

    class Killed(BaseException):
        pass

    real_save, calls = safetensors.torch.save_file, [0]

    def dying_save(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 6:  # step 3's checkpoint: weights written, optimizer not yet
            raise Killed
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    monkeypatch.setattr(train_mod, "save_file", dying_save, raising=False)
    with pytest.raises(Killed):
        train(make_lm(), tiny_tokenizer, items, spec, cfg, tmp_path / "run")
    monkeypatch.undo()
    train(make_lm(), tiny_tokenizer, items, spec, cfg, tmp_path / "run")
    a = load_file(str(tmp_path / "run" / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "ref" / "checkpoint" / "trainable.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


# ============================================================================ 1c. teacher endpoint faults
FAULTS = {  # fault -> what the one-line error must name
    "down": "APIConnectionError",
    "slow": "APITimeoutError",
    "429": "RateLimitError (HTTP 429)",
    "garbage": "MalformedResponseError",
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_endpoint_fault_bounded_retries_clear_error_cache_intact(tmp_path: Path, fault: str) -> None:
    ex = examples(3)
    out = tmp_path / "mags.jsonl"
    with serve() as srv:
        agents = teacher_agents(srv.url, tmp_path)
        build_mags(agents, ex[:2], "gsm8k", "number", out, 2, 2, 0, 200)
        close_agents(agents)
        cache_before, mags_before = cache_snapshot(tmp_path), out.read_bytes()
        assert len(cache_before) == srv.n > 0

        srv.mode = fault
        url = closed_port_url() if fault == "down" else srv.url
        agents = teacher_agents(url, tmp_path, retries=2, timeout=0.3)
        paid, t0 = srv.n, time.monotonic()
        with pytest.raises(TeacherCallError) as ei:
            build_mags(agents, ex, "gsm8k", "number", out, 2, 2, 0, 200)
        elapsed = time.monotonic() - t0
        close_agents(agents)
        attempts = srv.n - paid
        msg = str(ei.value)
        assert "\n" not in msg and len(msg) < 500
        for part in ("teacher-a", url, "gave up after 3 attempts", FAULTS[fault]):
            assert part in msg, (part, msg)
        assert attempts == (0 if fault == "down" else 3)  # max_retries + 1, never more
        assert elapsed < 10
        assert cache_snapshot(tmp_path) == cache_before  # earlier answers intact on disk
        assert out.read_bytes() == mags_before  # finished MAGs intact

        srv.mode = "ok"  # the endpoint recovers: the rerun pays only for the new question
        agents = teacher_agents(srv.url, tmp_path)
        paid = srv.n
        mags = build_mags(agents, ex, "gsm8k", "number", out, 2, 2, 0, 200)
        close_agents(agents)
        with srv.lock:
            asked = set(srv.items[paid:])
    assert [m.id for m in mags] == ["q00", "q01", "q02"]
    assert asked == {2}


# ============================================================================ 2. bad input
def _write_mirror(root: Path, train_lines: list[str], test_lines: list[str]) -> None:
    (root / "gsm8k").mkdir(parents=True)
    (root / "gsm8k" / "train.jsonl").write_text("".join(line + "\n" for line in train_lines))
    (root / "gsm8k" / "test.jsonl").write_text("".join(line + "\n" for line in test_lines))


def _gsm(i: int, q: str | None = "How many?", a: str = "x #### 5") -> str:
    return json.dumps({"question": q.replace("?", f" {i}?") if q else q, "answer": a})


def test_malformed_benchmark_rows_are_counted_and_skipped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mirror = tmp_path / "mirror"
    train_lines = [_gsm(0), "{not json", _gsm(1, q=None), _gsm(2, a="no final line"), "[1, 2]", _gsm(3),
                   "", _gsm(4, a="#### five")]
    test_lines = [_gsm(10), _gsm(11), '"just a string"']
    _write_mirror(mirror, train_lines, test_lines)
    pools, report = load_benchmark("gsm8k", "mirror", mirror)
    assert isinstance(report, LoadReport)
    assert (report.n_raw, report.n_malformed) == (10, 6)  # blank lines are not rows
    assert (len(pools["train"]), len(pools["test"])) == (2, 2)
    reasons = " | ".join(report.malformed_examples)
    for part in ("gsm8k/train.jsonl row 2: invalid JSON", "row 3: missing 'question'", "row 4: answer has no '####'",
                 "row 5: not a JSON object (list)"):
        assert part in reasons, (part, reasons)
    assert len(report.malformed_examples) == 5  # examples are capped, the count is not

    summary = prepare_all(["gsm8k"], "mirror", mirror, tmp_path / "out", n_train=8, n_test=8, seed=0)
    assert summary["gsm8k"]["status"] == "ok"
    assert (summary["gsm8k"]["n_raw"], summary["gsm8k"]["n_malformed"]) == (10, 6)
    assert (summary["gsm8k"]["n_train"], summary["gsm8k"]["n_test"]) == (2, 2)
    assert "6 of 10 raw rows malformed and left out" in capsys.readouterr().out


def test_empty_split_goes_on_with_zero_counts(tmp_path: Path) -> None:
    from magdi.evaluate import evaluate_examples, summarise

    assert sample_splits({"train": [], "test": []}, 8, 20, 0) == {"train": [], "test": []}
    assert sample_splits({}, 8, 20, 0) == {"train": [], "test": []}
    mirror = tmp_path / "mirror"
    _write_mirror(mirror, [_gsm(0), _gsm(1)], [])  # an empty test file
    summary = prepare_all(["gsm8k"], "mirror", mirror, tmp_path / "out", n_train=8, n_test=8, seed=0)
    assert summary["gsm8k"]["status"] == "ok" and summary["gsm8k"]["n_test"] == 0
    assert (tmp_path / "out" / "gsm8k" / "test.jsonl").read_text() == ""
    # downstream stages accept the empty split: no MAGs, no evaluation rows, counts of zero
    assert build_mags([], [], "gsm8k", "number", tmp_path / "mags.jsonl", 2, 2) == []
    assert summarise(evaluate_examples(None, None, [], "gsm8k", "number", 4, 8), 100, 0)["n"] == 0
    # an empty JSON-list mirror file is a corrupt mirror: one clear error naming the file
    (mirror / "svamp").mkdir()
    (mirror / "svamp" / "SVAMP.json").write_text("")
    with pytest.raises(ValueError, match=r"SVAMP\.json: not valid JSON .*corrupt"):
        load_benchmark("svamp", "mirror", mirror)


def test_one_sided_mags_contribute_zero_contrastive_and_train(make_lm, tiny_tokenizer, tmp_path: Path) -> None:
    from magdi.train import MagdiStudent, build_items, encode_step, method_spec, train

    all_right = MAG("r", "gsm8k", "What is 1 plus 3?", "4",
                    [Node("a", 0, "1 plus 3 is 4", "4", 0.9, True), Node("b", 0, "it is 4", "4", 0.8, True)])
    all_wrong = MAG("w", "gsm8k", "What is 2 plus 3?", "5",
                    [Node("a", 0, "2 plus 3 is 6", "6", 0.9, False),
                     Node("b", 0, "garbled", None, 0.0, False, valid=False)])
    cfg = TrainCfg(epochs=1, lr=1e-2, mags_per_step=2, max_prompt_tokens=48, max_target_tokens=16,
                   hidden_dim=16, checkpoint_every=1)
    spec = method_spec("magdi")
    items = build_items([all_right, all_wrong], spec, tiny_tokenizer)
    assert [it.labels for it in items] == [[1, 1], [0, 0]]
    # methods that train on correct chains only skip the all-wrong MAG (1 of 2 skipped), without error
    assert len(build_items([all_right, all_wrong], method_spec("magdi_cn"), tiny_tokenizer)) == 1
    model = MagdiStudent(make_lm(), spec, cfg)
    for batch in ([items[0]], [items[1]], items):
        enc = encode_step(batch, tiny_tokenizer, 48, 16)
        out = model(enc, batch, step_seed=0)
        assert out["contrastive"].item() == 0.0  # no positive/negative pair: nothing invented
        assert all(torch.isfinite(v) for v in out.values())
        out["loss"].backward()
    res = train(make_lm(), tiny_tokenizer, items, spec, cfg, tmp_path / "run")
    assert res.steps == 1 and res.history[0]["contrastive"] == 0.0


class _Canned:
    """A backend that always says the same thing (e.g. a refusal that is not JSON)."""

    def __init__(self, text: str) -> None:
        self.text, self.calls = text, 0

    def generate(self, batch, temperature, top_p, max_new_tokens, seed):
        self.calls += len(batch)
        return [{"text": self.text, "n_tokens": 5} for _ in batch]


@pytest.mark.parametrize("reply", ["I cannot help with that.", "", "{}", '{"answer": ""}', "null", "[1, 2]",
                                   '{"reasoning": "so the answer is", "confidence": 0.9}'])
def test_reply_that_is_not_a_json_answer_becomes_an_invalid_node(reply: str) -> None:
    for at in ANSWER_TYPES:
        assert parse_reply(reply, at, ["bank", "river"] if at == "choice" else None) is None
    be = _Canned(reply)
    agents = [Agent(n, be, "p", 0.7, 0.95, s, 32) for n, s in (("a", 1), ("b", 2))]
    (mag,) = discuss_chunk(agents, examples(1), "gsm8k", "number", max_rounds=2, parse_retries=1)
    assert be.calls == 2 * 2 * 3  # 2 agents x (1 + 1 retry) x rounds 0..2: bounded, then given up
    assert len(mag.nodes) == 6 and all(not n.valid and n.answer is None and not n.correct for n in mag.nodes)
    assert mag.team_answer is None and mag.team_correct is False and mag.nodes[0].reasoning == reply


N = 1_000_000
HUGE_REPLIES = {
    "prose": ("lorem ipsum dolor sit amet " * (N // 27)) + "The answer is 5.",
    "marker flood in the answer field": '{"reasoning": "r", "answer": "' + "The answer is " * (N // 14) + '"}',
    "marker flood, broken JSON": '{"reasoning": "' + "Answer: 12 " * (N // 11),
    "digits": "7" * N,
    "braces": "{" * N,
    "nested brackets": '{"answer": "5", "x": ' + "[" * N + "}",
    "backslashes": "\\" * N,
}


@pytest.mark.parametrize("name", list(HUGE_REPLIES))
def test_huge_reply_is_handled_quickly(name: str) -> None:
    text = HUGE_REPLIES[name]
    for at in ANSWER_TYPES:
        choices = ["bank", "river", "shop"] if at == "choice" else None
        t0 = time.perf_counter()
        parse_reply(text, at, choices)
        assert time.perf_counter() - t0 < 2.0, (name, at)
    if name in ("prose", "digits", "nested brackets"):  # scorers on huge student text
        for at in ANSWER_TYPES:
            choices = ["bank", "river", "shop"] if at == "choice" else None
            t0 = time.perf_counter()
            pred = extract_answer(text, at, choices)
            is_correct(pred, {"yesno": "yes", "choice": "A", "number": "5", "latex": "5"}[at], at)
            assert time.perf_counter() - t0 < 2.0, (name, at)


def test_scorer_on_one_megabyte_of_answer_markers_is_quick() -> None:
    def alarm(signum, frame):
        raise TimeoutError("extract_answer took more than 2 s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 2.0)
    try:
        extract_answer("The answer is " * (N // 14), "choice", ["bank", "river", "shop"])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- params
BASE_PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _with(dotted: str, value: object) -> dict:
    raw = copy.deepcopy(BASE_PARAMS)
    *parents, last = dotted.split(".")
    node = raw
    for k in parents:
        node = node[int(k)] if isinstance(node, list) else node[k]
    node[last] = value
    return raw


def test_base_params_are_valid() -> None:
    parse_params(BASE_PARAMS)


@pytest.mark.parametrize(("key", "value", "says"), [
    ("train.lr", "fast", "valid number"),
    ("train.lr", -3e-4, "greater than 0"),
    ("train.lrr", 1e-3, "unknown key"),
    ("teachers.max_rounds", 99, "less than or equal to 10"),
    ("data.n_train", 0, "greater than or equal to 1"),
    ("student.trust_remote_code", "maybe", "valid boolean"),
    ("train.graph", "zz", "'d', 'ud' or 'fc'"),
    ("teachers.agents.0.api_key", "sk-live-0123456789", "unknown key"),
    ("data.benchmarks", ["gsm8k", "strategyqa", "ecqa", "arc_challenge", "boolq", "svamp", "mathqa"], "mathqa"),
    ("experiments.tasks", ["gsm8k", "mathqa"], "mathqa"),
    ("experiments.methods", ["magdi", "magdi_xx"], "magdi_xx"),
])
def test_bad_params_fail_in_one_line_naming_the_key(key: str, value: object, says: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_params(_with(key, value))
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("params.yaml: ")
    assert key in msg and says in msg, msg
    assert "sk-live" not in msg  # a value is never echoed back (it could be a credential)


def test_unknown_task_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.benchmarks: .*unknown benchmark\(s\) \['mathqa'\]"):
        parse_params(_with("data.benchmarks", ["mathqa"]))
    with pytest.raises(ValueError, match="unknown benchmark 'mathqa'"):
        load_benchmark("mathqa", "mirror", tmp_path)


def test_every_trained_task_needs_its_recipe_entry(tmp_path: Path) -> None:
    """dvc.yaml makes each training stage depend on `experiments.task_train.<its task>`: a trained task without
    an entry fails when the file is read (one line naming the key and the task), not when DVC reaches the stage."""
    raw = _with("experiments.tasks", ["gsm8k", "svamp"])
    raw["data"]["benchmarks"] = sorted({*raw["data"]["benchmarks"], "gsm8k", "svamp"})
    raw["experiments"].update(task_train={"gsm8k": {"lr": 1e-4}}, ablation_tasks=[], multitask_methods=[])
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as ei:
        load_params(p, check_mirror=False)
    msg = str(ei.value)
    assert msg.startswith("params.yaml: experiments.task_train: ") and "['svamp']" in msg and "\n" not in msg
    raw["experiments"]["task_train"]["svamp"] = {}  # {} = the plain `train` settings
    p.write_text(yaml.safe_dump(raw))
    assert load_params(p, check_mirror=False).train_for("magdi", "svamp")[1] == parse_params(raw).train
    # an ablation task needs an entry only when there are ablations (no ablation stage exists otherwise)
    raw["data"]["benchmarks"] = sorted({*raw["data"]["benchmarks"], "boolq"})
    raw["experiments"].update(ablation_tasks=["boolq"], ablations={})
    p.write_text(yaml.safe_dump(raw))
    load_params(p, check_mirror=False)
    raw["experiments"]["ablations"] = {"magdi_ud": {"graph": "ud"}}
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"task_train: no entry for trained task\(s\) \['boolq'\]"):
        load_params(p, check_mirror=False)


def test_training_stages_depend_on_their_own_recipe_entries_only() -> None:
    """dvc.yaml: a training stage names its own task's `task_train` entry (and an ablation run its own ablation),
    never the whole mapping, so an edit to one entry leaves every other run's lock valid."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    training = {n for n, st in stages.items() if "stages/train.py" in st["cmd"]}
    assert training == {"train", "train_ablation", "train_data_scaling", "train_scaling", "train_mt"}  # a new one: decide its deps here
    for name in training - {"train_mt"}:
        params = stages[name]["params"]
        assert "experiments.task_train.${item.task}" in params, (name, params)
        assert not {"experiments", "experiments.task_train", "experiments.ablations"} & set(params), (name, params)
    assert "experiments.ablations.${item.method}" in stages["train_ablation"]["params"]
    assert not [k for k in stages["train_mt"]["params"] if "task_train" in k]  # multi-task keeps `train`


@pytest.mark.parametrize(("text", "says"), [
    ("train: {lr: 0.1\n", "not valid YAML"),
    ("- a\n- b\n", "top level must be a mapping"),
    (b"\xff\xfeprofile: x\n", "not UTF-8"),
])
def test_unreadable_params_file_fails_in_one_line(tmp_path: Path, text: str | bytes, says: str) -> None:
    p = tmp_path / "params.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as ei:
        load_params(p, check_mirror=False)
    assert says in str(ei.value) and "\n" not in str(ei.value)
    r = subprocess.run([sys.executable, "-c", "import sys; from magdi.config import cli_params; "
                        "cli_params(sys.argv[1])", str(p)], env=child_env(), capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


# ============================================================================ 4. the MAG JSONL reader, fuzzed
def _good_line(i: int, text: str = "ok") -> str:
    return json.dumps(MAG(f"q{i}", "gsm8k", text, "5", [Node("a", 0, text, "5", 0.9, True)]).to_json(),
                      ensure_ascii=False)


def _check_reader(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mags.jsonl"
        path.write_bytes(data)
        n = data.count(b"\n") + 1
        for strict in (False, True):
            try:
                mags = list(iter_mags(path, strict=strict))
            except ValueError as e:
                m = re.match(rf"{re.escape(str(path))}:(\d+): ", str(e))
                assert m and 1 <= int(m.group(1)) <= n, str(e)
                assert "\n" not in str(e)
                continue
            for mag in mags:  # anything returned is a well-typed MAG
                assert isinstance(mag, MAG) and isinstance(mag.id, str) and isinstance(mag.nodes, list)
                assert all(isinstance(nd, Node) and isinstance(nd.round, int) for nd in mag.nodes)
                json.dumps(mag.to_json())


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                           max_leaves=8)
FIELDS = ["id", "task", "question", "gold", "nodes", "choices", "team_answer", "team_correct", "consensus", "meta"]
NODE_FIELDS = ["agent", "round", "reasoning", "answer", "confidence", "correct", "n_tokens", "valid"]


@st.composite
def mutated_mag_line(draw) -> str:
    """A valid MAG record with some fields dropped, retyped or added."""
    rec = json.loads(_good_line(0, draw(st.text(max_size=10))))
    for _ in range(draw(st.integers(0, 3))):
        nodes = rec.get("nodes")
        node_ok = isinstance(nodes, list) and nodes and isinstance(nodes[0], dict)
        target = nodes[0] if node_ok and draw(st.booleans()) else rec
        key = draw(st.sampled_from((FIELDS if target is rec else NODE_FIELDS) + ["extra"]))
        if draw(st.booleans()):
            target.pop(key, None)
        else:
            target[key] = draw(JSON_VALUES)
    return json.dumps(rec, ensure_ascii=draw(st.booleans()))


FRAGMENTS = [b"\n", b"\r\n", b"{", b"}", b"[", b'"', b"\xff", b"\xe2\x80\xa8", b"\xc2\x85", b"\x00", b"null",
             _good_line(1).encode(), _good_line(2, "sep\u2028nel\x85").encode()]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.binary(max_size=40), st.sampled_from(FRAGMENTS)), max_size=12).map(b"".join))
def test_iter_mags_fuzz_bytes(data: bytes) -> None:
    _check_reader(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(mutated_mag_line(), st.just(_good_line(3)), st.text(max_size=20)), min_size=1, max_size=5),
       st.booleans())
def test_iter_mags_fuzz_records(lines: list[str], final_newline: bool) -> None:
    _check_reader(("\n".join(lines) + ("\n" if final_newline else "")).encode())


def test_unicode_line_separators_in_model_text_roundtrip(tmp_path: Path) -> None:
    # json.dumps(ensure_ascii=False) leaves U+2028/U+0085 raw; they must not split a record
    path = tmp_path / "mags.jsonl"
    mag = MAG("q0", "gsm8k", "Q\u2029?", "5", [Node("a", 0, "one\u2028two\x85three\x1cfour", "5", 0.9, True)])
    append_mag(path, mag)
    append_mag(path, MAG("q1", "gsm8k", "Q?", "5", []))
    assert read_mags(path) == [mag, MAG("q1", "gsm8k", "Q?", "5", [])]


def test_reader_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "mags.jsonl"
    for bad in (b"\xff\xfe not utf-8", b"[" * 100_000, b'"a string"', b'{"id": 1}', b"[1, 2]"):
        path.write_bytes((_good_line(0) + "\n").encode() + bad + b"\n" + (_good_line(1) + "\n").encode())
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:2: not a MAG record"):
            read_mags(path)
    path.write_bytes((_good_line(0) + "\n").encode() + "{\"id\": \"é".encode()[:-1])  # torn mid-character
    assert [m.id for m in read_mags(path)] == ["q0"]
