"""Security: model output is data, never code; nothing is unpickled; API keys stay in the environment.

* Every answer type, scorer and reply parser is fed code-injection payloads as the *answer*; a sentinel file
  that any evaluation of the payload would create must not appear (and ``os.system`` must not be called).
* The source tree is scanned token by token (comments and docstrings excluded) for pickle, ``torch.load``,
  ``eval``/``exec``, ``sympify``/``parse_expr``, unsafe YAML loading and ``trust_remote_code=True``.
* A fake API key in an environment variable drives a real discussion through ``magdi.pipeline.make_agents``
  against a loopback server, then an MLflow run is logged; every byte written and every log line is scanned.
"""

from __future__ import annotations

import copy
import inspect
import io
import json
import logging
import os
import re
import subprocess
import threading
import tokenize
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from magdi.backends_openai import TeacherCallError
from magdi.cache import CallCache
from magdi.config import AgentCfg, StudentCfg, load_params, parse_params
from magdi.discussion import Agent, build_mags, discuss_chunk, parse_reply
from magdi.mag import append_mag, read_mags
from magdi.scoring import extract_answer, is_correct, majority_vote, normalize_gold
from magdi.testing.loopback import running

ROOT = Path(__file__).resolve().parents[1]
ANSWER_TYPES = ("yesno", "choice", "number", "latex")
GOLD = {"yesno": "yes", "choice": "B", "number": "5", "latex": "\\frac{1}{2}"}


# ============================================================================ 1. model output is never code
def payloads(sentinel: Path) -> list[str]:
    s = str(sentinel)
    return [
        f"__import__('os').system('touch {s}')",
        f"The answer is __import__('os').system('touch {s}')",
        f"\\boxed{{__import__('os').system('touch {s}')}}",
        f"$\\boxed{{\\text{{__import__('os').system('touch {s}')}}}}$",
        f"The answer is eval(\"__import__('os').system('touch {s}')\")",
        f"exec(\"import os; os.system('touch {s}')\")",
        f"Lambda(x, __import__('os').system('touch {s}'))",
        f"(lambda: __import__('subprocess').run(['touch', '{s}']))()",
        f"open('{s}', 'w').write('pwned')",
        f"{{\"answer\": \"__import__('os').system('touch {s}')\", \"confidence\": 1}}",
        f"#### __import__('os').popen('touch {s}').read()",
        f"cos\nsystem\n(S'touch {s}'\ntR.",  # a pickle program, as text
        f"{{{{ ''.__class__.__mro__[1].__subclasses__() }}}} {{% import os %}}{{{{ os.system('touch {s}') }}}}",
    ]


@pytest.fixture
def spy_shell(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and still perform) every os.system / os.popen / subprocess.Popen call."""
    calls: list[str] = []
    real_system, real_popen, real_sp = os.system, os.popen, subprocess.Popen.__init__

    def system(cmd):
        calls.append(f"os.system {cmd}")
        return real_system(cmd)

    def popen(cmd, *a, **k):
        calls.append(f"os.popen {cmd}")
        return real_popen(cmd, *a, **k)

    def sp_init(self, args, *a, **k):
        calls.append(f"subprocess {args}")
        return real_sp(self, args, *a, **k)

    monkeypatch.setattr(os, "system", system)
    monkeypatch.setattr(os, "popen", popen)
    monkeypatch.setattr(subprocess.Popen, "__init__", sp_init)
    return calls


class _Canned:
    def __init__(self, text: str) -> None:
        self.text = text

    def generate(self, batch, temperature, top_p, max_new_tokens, seed):
        return [{"text": self.text, "n_tokens": 3} for _ in batch]


def test_model_output_is_never_evaluated(tmp_path: Path, spy_shell: list[str]) -> None:
    sentinel = tmp_path / "pwned"
    n_calls = 0
    for payload in payloads(sentinel):
        wrapped = json.dumps({"reasoning": payload, "answer": payload, "confidence": payload})
        for at in ANSWER_TYPES:
            for choices in (None, ["bank", payload, "river"]):
                for text in (payload, wrapped):
                    extract_answer(text, at, choices)
                    parse_reply(text, at, choices)
                    is_correct(text, GOLD[at], at)
                    majority_vote([text, text, GOLD[at]], at)
                    n_calls += 4
            try:  # a poisoned dataset gold answer is rejected, never evaluated
                normalize_gold(payload, at)
            except ValueError:
                pass
            # a whole discussion whose teachers reply with the payload
            agents = [Agent(n, _Canned(wrapped), payload, 0.7, 0.95, s, 16) for n, s in (("a", 1), ("b", 2))]
            ex = {"id": "q", "question": payload, "answer": GOLD[at] if at != "choice" else "B",
                  "choices": ["bank", payload, "river"] if at == "choice" else None}
            (mag,) = discuss_chunk(agents, [ex], "ecqa" if at == "choice" else "gsm8k", at, 1, 0)
            append_mag(tmp_path / "mags.jsonl", mag)
        with CallCache(tmp_path / "cache.jsonl") as cache:
            cache.put(f"k{n_calls}", {"text": payload, "n_tokens": 1})
    assert len(read_mags(tmp_path / "mags.jsonl")) == len(payloads(sentinel)) * len(ANSWER_TYPES)
    with CallCache(tmp_path / "cache.jsonl") as cache:
        assert len(cache) == len(payloads(sentinel))
    assert n_calls > 800
    assert not any("pwned" in c for c in spy_shell) and not sentinel.exists(), "model output was executed"


def test_poisoned_benchmark_rows_are_data(tmp_path: Path, spy_shell: list[str]) -> None:
    from magdi.data import load_benchmark

    sentinel = tmp_path / "pwned"
    (tmp_path / "gsm8k").mkdir()
    rows = [{"question": p, "answer": f"x #### {p}"} for p in payloads(sentinel)]
    rows.append({"question": payloads(sentinel)[0], "answer": "because #### 5"})
    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / "gsm8k" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    pools, report = load_benchmark("gsm8k", "mirror", tmp_path)
    assert report.n_malformed == 2 * len(payloads(sentinel)) and len(pools["train"]) == 1
    assert not any("pwned" in c for c in spy_shell) and not sentinel.exists()


# ============================================================================ 2. no pickle, no eval, no remote code
BANNED_NAMES = {  # a NAME token that is banned wherever it appears in code
    "pickle": "pickle", "cPickle": "pickle", "cloudpickle": "pickle", "dill": "pickle", "joblib": "pickle",
    "shelve": "pickle", "marshal": "pickle", "sympify": "sympy evaluates strings", "parse_expr": "sympy eval",
    "unsafe_load": "unsafe YAML", "full_load": "unsafe YAML", "log_model": "MLflow model logging pickles",
}
BANNED_CALLS = {"eval", "exec", "compile", "__import__"}  # bare builtins only: model.eval() is a method
BANNED_ATTRS = {("torch", "load"), ("torch", "save"), ("yaml", "load"), ("pickle", "loads")}
BANNED_KWARGS = {("trust_remote_code", "True"), ("weights_only", "False"), ("allow_pickle", "True")}
SKIP = {tokenize.COMMENT, tokenize.STRING, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}


def scan_source(text: str, where: str = "<src>") -> list[str]:
    """Banned constructs in Python source, from its tokens (comments and strings/docstrings are not code)."""
    toks = [t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type not in SKIP]
    hits = []
    for i, t in enumerate(toks):
        prev = toks[i - 1].string if i else ""
        nxt = toks[i + 1].string if i + 1 < len(toks) else ""
        nxt2 = toks[i + 2].string if i + 2 < len(toks) else ""
        at = f"{where}:{t.start[0]}"
        if t.type != tokenize.NAME:
            continue
        if t.string in BANNED_NAMES:
            hits.append(f"{at}: {t.string} ({BANNED_NAMES[t.string]})")
        if t.string in BANNED_CALLS and nxt == "(" and prev not in (".", "def"):  # obj.eval(), def eval(
            hits.append(f"{at}: {t.string}(")
        if nxt == "." and (t.string, nxt2) in BANNED_ATTRS:
            hits.append(f"{at}: {t.string}.{nxt2}")
        if nxt in ("=", ":") and (t.string, nxt2) in BANNED_KWARGS:
            hits.append(f"{at}: {t.string}={nxt2}")
        if t.string == "from" and nxt in ("torch", "yaml", "pickle"):  # from torch import load
            j = i + 2
            while j < len(toks) and toks[j].start[0] == t.start[0]:
                if (nxt, toks[j].string) in BANNED_ATTRS:
                    hits.append(f"{at}: from {nxt} import {toks[j].string}")
                j += 1
    # dict form: {"trust_remote_code": True}
    for m in re.finditer(r"""["']trust_remote_code["']\s*:\s*True""", text):
        hits.append(f"{where}:{text.count(chr(10), 0, m.start()) + 1}: trust_remote_code: True")
    return hits


def test_scanner_finds_planted_violations_and_ignores_prose() -> None:
    planted = (
        "import pickle\nfrom torch import load\nx = eval('1')\nexec(code)\nm = torch.load(p)\n"
        "torch.save(m, p)\ny = sympy.sympify(s)\nf(trust_remote_code=True)\nyaml.load(s)\n"
        "cfg = {'trust_remote_code': True}\n"
    )
    assert len(scan_source(planted)) == 10
    prose = (
        '"""Never pickle; never torch.load( or eval( model text; trust_remote_code=True is off."""\n'
        "# eval(x) and pickle in a comment\nmodel.eval()\nre.compile('x')\ny = yaml.safe_load(s)\n"
        "f(trust_remote_code=False)\ntorch.manual_seed(0)\nmsg = f'eval({x})'\nclass M:\n    def eval(self):\n        pass\n"
    )
    assert scan_source(prose) == []


def test_no_pickle_eval_or_remote_code_in_the_source_tree() -> None:
    files = sorted(p for d in ("src", "stages") for p in (ROOT / d).rglob("*.py"))
    assert len(files) >= 15
    hits = [h for f in files for h in scan_source(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert hits == [], "\n".join(hits)


def test_trust_remote_code_is_off_by_default() -> None:
    from magdi.student import convert_student, load_student

    assert StudentCfg(model="m").trust_remote_code is False
    assert StudentCfg.model_fields["trust_remote_code"].default is False
    for name in ("params.yaml", "params.paper.yaml"):
        if (ROOT / name).exists():
            assert load_params(ROOT / name, check_mirror=False).student.trust_remote_code is False, name
    for fn in (load_student, convert_student):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False


# ============================================================================ 3. API keys
SECRET = "sk-test-SECRET-123"
KEY_ENV = "MAGDI_TEST_KEY"
ITEM = re.compile(r"Item (\d+): what is (\d+) plus (\d+)\?")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.auth: list[str | None] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:  # noqa: N802
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        auth = self.headers.get("Authorization")
        with self.server.lock:
            self.server.auth.append(auth)
        i, a, b = (int(g) for g in ITEM.search(req["messages"][-1]["content"]).groups())  # type: ignore[union-attr]
        if i == 99:  # a careless server that echoes the credential in its error body
            code, body = 401, {"error": {"message": f"Incorrect API key provided: {auth}", "type": "auth"}}
        else:
            ans = a + b + (1 if req["model"] == "teacher-b" and i == 0 and "previous" not in str(req) else 0)
            text = json.dumps({"reasoning": f"{a} plus {b} is {ans}", "answer": str(ans), "confidence": 0.8})
            code, body = 200, {"id": "x", "object": "chat.completion", "created": 0, "model": req["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": text}}]}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextmanager
def serve() -> Iterator[_Server]:
    with running(_Server()) as srv:
        yield srv


def test_keys_only_come_from_the_environment() -> None:
    assert "api_key_env" in AgentCfg.model_fields
    assert not [f for f in AgentCfg.model_fields if re.search(r"(key|token|secret|password)$", f)]


def test_api_key_never_reaches_disk_logs_or_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    from magdi.pipeline import mags_file, make_agents
    from magdi.tracking import mlflow_run

    monkeypatch.setenv(KEY_ENV, SECRET)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands in tmp too
    caplog.set_level(logging.DEBUG)  # including openai/httpx debug logging
    raw = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    raw["paths"] = {**raw["paths"], "cache_dir": str(tmp_path / "cache"), "mags_dir": str(tmp_path / "mags"),
                    "runs_dir": str(tmp_path / "runs"), "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    with serve() as srv:
        raw["teachers"]["agents"] = [
            {"name": f"gpt_{x}", "backend": "openai", "model": f"teacher-{x}", "base_url": srv.url,
             "api_key_env": KEY_ENV, "timeout_s": 5.0, "max_new_tokens": 32} for x in "ab"]
        raw["teachers"]["http_retries"] = 1
        raw["experiments"]["methods"] = ["magdi", "sit_gpt_a"]
        p = parse_params(raw)
        agents = make_agents(p)
        examples = [{"id": f"q{i}", "question": f"Item {i}: what is {i} plus 2?", "choices": None,
                     "answer": str(i + 2), "explanation": None} for i in range(2)]
        mags = build_mags(agents, examples, "gsm8k", "number", mags_file(p, "gsm8k"), p.teachers.max_rounds,
                          p.teachers.batch_size, p.teachers.parse_retries, p.teachers.context_chars)
        with pytest.raises(TeacherCallError) as ei:  # the server echoes the bearer token in a 401
            agents[0].backend.generate([[{"role": "user", "content": "Item 99: what is 1 plus 1?"}]],
                                       0.7, 0.95, 32, 1)
        logging.getLogger("magdi.stage").error("build_mags failed: %s", ei.value)
        auth = list(srv.auth)
    assert len(mags) == 2 and mags[0].graph_type == "G1"
    assert auth and set(auth) == {f"Bearer {SECRET}"}  # the key was used, read from the environment only

    run_params = {"params": p.model_dump(), "agents": [repr(a.backend) for a in agents],
                  "teacher_api_key": os.environ[KEY_ENV], "openai": {"token": os.environ[KEY_ENV]}}
    with mlflow_run(p.paths.tracking_uri, "magdi-security", "leak-check", run_params) as mlf:
        mlf.log_metrics({"n_mags": len(mags)})
        mlf.set_tag("error", str(ei.value))
    for a in agents:
        a.backend.cache.close()  # type: ignore[union-attr]

    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    names = {f.name for f in files}
    assert {"mlflow.db", "gsm8k.jsonl"} <= names and any(n.startswith("openai_teacher") for n in names)
    out, err = capfd.readouterr()
    texts = {str(f): f.read_bytes() for f in files}
    texts["logs"] = (caplog.text + " ".join(str(r.args) for r in caplog.records)).encode()
    texts["stdout/stderr"] = (out + err).encode()
    texts["error"] = (str(ei.value) + repr(ei.value)).encode()
    texts["params dump"] = json.dumps(p.model_dump()).encode()
    mlflow_db = texts[str(tmp_path / "mlflow.db")]
    assert KEY_ENV.encode() in mlflow_db and b"teacher-a" in mlflow_db  # params were logged: the variable's name
    for where, blob in texts.items():
        assert SECRET.encode() not in blob and b"SECRET-123" not in blob, f"API key leaked into {where}"
    assert "***" in str(ei.value)  # the echoed key was scrubbed, the error itself kept


KEY_LIKE = re.compile(rb"(sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{30,}|Bearer\s+[A-Za-z0-9._-]{12,})")


def test_no_key_like_strings_in_tracked_outputs() -> None:
    """dvc.lock, params files, reports and metrics hold no credential-looking string."""
    candidates = [ROOT / n for n in ("dvc.lock", "dvc.yaml", "params.yaml", "params.paper.yaml")]
    for d in ("reports", "metrics", "configs"):
        candidates += [f for f in (ROOT / d).rglob("*") if f.is_file()] if (ROOT / d).is_dir() else []
    found = []
    for f in candidates:
        if f.is_file() and f.stat().st_size < 50_000_000:
            found += [f"{f.relative_to(ROOT)}: {m.group()[:12]!r}..." for m in KEY_LIKE.finditer(f.read_bytes())]
    assert found == []
