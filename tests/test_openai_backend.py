"""OpenAIChatBackend against a real, scriptable OpenAI-compatible HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from magdi.backends_openai import OpenAIChatBackend, TeacherCallError, TeacherConfigError
from magdi.cache import CallCache, cache_key
from magdi.testing.loopback import running

SECRET = "sk-test-SECRET123"
KEY_ENV = "MAGDI_TEST_TEACHER_KEY"
FAST = {"backoff_base_s": 0.01, "max_backoff_s": 0.1, "timeout_s": 2.0}


def convo(q: str) -> list[dict]:
    return [{"role": "system", "content": "You are a careful reasoner."}, {"role": "user", "content": q}]


# ---------------------------------------------------------------------------------------------- fake server
class FakeOpenAI(ThreadingHTTPServer):
    """``POST /v1/chat/completions`` that plays a queue of scripted behaviours, then answers OK.

    Behaviours: ``("ok", text)``, ``("ok_no_usage", text)``, ``("status", code, headers)``, ``("sleep", s)``,
    ``("malformed",)``, ``("empty_choices",)``, ``("null_content",)``, ``("echo_auth", code)``.
    With an empty queue the answer is ``"echo: <last user message>"`` with ``completion_tokens=3``, or HTTP 500
    when that message starts with ``FAIL``.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script: deque[tuple] = deque()
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.auth_headers: list[str | None] = []

    @property
    def n_requests(self) -> int:
        with self.lock:
            return len(self.requests)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def push(self, *behaviours: tuple) -> None:
        with self.lock:
            self.script.extend(behaviours)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeOpenAI

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence stderr
        pass

    def _send(
        self, code: int, body: bytes, headers: dict | None = None, ctype: str = "application/json"
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _completion(self, req: dict, text: str | None, choices: bool = True, usage: bool = True) -> bytes:
        out: dict = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.get("model", "?"),
            "choices": (
                [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]
                if choices
                else []
            ),
        }
        if usage:
            out["usage"] = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
        return json.dumps(out).encode()

    def do_POST(self) -> None:  # noqa: N802
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, b'{"error": {"message": "no such route"}}')
            return
        req = json.loads(raw)
        srv = self.server
        with srv.lock:
            srv.requests.append(req)
            srv.auth_headers.append(self.headers.get("Authorization"))
            behaviour = srv.script.popleft() if srv.script else None
        try:
            self._play(req, behaviour)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and hung up
            pass

    def _play(self, req: dict, b: tuple | None) -> None:
        if b is None:
            content = req["messages"][-1]["content"]
            if content.startswith("FAIL"):  # content-keyed failure, independent of thread ordering
                self._send(500, b'{"error": {"message": "always fails"}}')
            else:
                self._send(200, self._completion(req, "echo: " + content))
            return
        kind = b[0]
        if kind == "ok":
            self._send(200, self._completion(req, b[1]))
        elif kind == "ok_no_usage":
            self._send(200, self._completion(req, b[1], usage=False))
        elif kind == "status":
            body = json.dumps(
                {"error": {"message": f"scripted {b[1]}", "type": "test", "code": None}}
            ).encode()
            self._send(b[1], body, b[2] if len(b) > 2 else None)
        elif kind == "sleep":
            time.sleep(b[1])
            self._send(200, self._completion(req, "too late"))
        elif kind == "malformed":
            self._send(200, b'{"id": "chatcmpl-x", "choices": [{"index": 0, "mess')
        elif kind == "empty_choices":
            self._send(200, self._completion(req, None, choices=False))
        elif kind == "null_content":
            self._send(200, self._completion(req, None))
        elif kind == "echo_auth":  # a careless server that echoes the credential back in its error
            auth = self.headers.get("Authorization", "")
            body = json.dumps({"error": {"message": f"Incorrect API key provided: {auth}", "type": "auth"}})
            self._send(b[1], body.encode())
        else:  # pragma: no cover
            raise AssertionError(kind)


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with running(FakeOpenAI(), poll_interval=0.05) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)


def make(server: FakeOpenAI, tmp_path: Path | None = None, **kw: object) -> OpenAIChatBackend:
    cache = CallCache(tmp_path / "teacher.jsonl") if tmp_path is not None else None
    opts = {**FAST, "max_retries": 3, "cache": cache, **kw}
    return OpenAIChatBackend("test-model", server.base_url, KEY_ENV, **opts)  # type: ignore[arg-type]


GEN = {"temperature": 0.7, "top_p": 0.95, "max_new_tokens": 32, "seed": 7}


# ---------------------------------------------------------------------------------------------- tests
def test_happy_path_text_usage_and_request_shape(server: FakeOpenAI) -> None:
    server.push(("ok", "Yes. 7 is prime."), ("ok_no_usage", "four word answer here"))
    be = make(server, concurrency=1)
    out = be.generate([convo("Is 7 prime?"), convo("Say four words")], **GEN)
    assert out == [
        {"text": "Yes. 7 is prime.", "n_tokens": 3},
        {"text": "four word answer here", "n_tokens": 4},
    ]
    assert server.n_requests == 2
    req = server.requests[0]
    assert req["model"] == "test-model" and req["messages"] == convo("Is 7 prime?")
    assert req["temperature"] == 0.7 and req["top_p"] == 0.95 and req["seed"] == 7 and req["max_tokens"] == 32
    assert server.auth_headers[0] == f"Bearer {SECRET}"  # key read from the environment variable


def test_no_key_env_sends_placeholder(server: FakeOpenAI) -> None:
    be = OpenAIChatBackend("m", server.base_url, None, **FAST)  # type: ignore[arg-type]
    assert be.generate([convo("hi")], **GEN)[0]["text"] == "echo: hi"
    assert server.auth_headers == ["Bearer EMPTY"]


def test_cache_hit_makes_zero_requests(server: FakeOpenAI, tmp_path: Path) -> None:
    batch = [convo("a"), convo("b"), convo("a")]  # duplicate conversation is asked once
    be = make(server, tmp_path)
    first = be.generate(batch, **GEN)
    assert [r["text"] for r in first] == ["echo: a", "echo: b", "echo: a"]
    assert server.n_requests == 2
    assert be.generate(batch, **GEN) == first
    assert server.n_requests == 2
    # a fresh process (new backend, cache reloaded from disk) pays nothing either
    be2 = make(server, tmp_path)
    assert be2.generate(batch, **GEN) == first and server.n_requests == 2
    assert len(be2.cache) == 2  # type: ignore[arg-type]
    key = cache_key("test-model", convo("a"), {**{k: GEN[k] for k in GEN}, "attempt": 0})
    assert be2.cache.get(key) == {"text": "echo: a", "n_tokens": 3}  # type: ignore[union-attr]
    # different sampling params or attempt index -> a new call
    be2.generate([convo("a")], **{**GEN, "seed": 8})
    assert server.n_requests == 3
    be2.generate([convo("a")], **GEN, attempt=1)
    assert server.n_requests == 4 and server.requests[-1]["seed"] == GEN["seed"] + 1


def test_raised_limit_reuses_finished_replies_only(server: FakeOpenAI, tmp_path: Path) -> None:
    """teachers.earlier_limits: after max_new_tokens 32 -> 64 a reply that ended (3 tokens < 32) is not
    asked again; one cut at the old limit is."""
    be = make(server, tmp_path)
    first = be.generate([convo("a")], **GEN)
    assert server.n_requests == 1 and first[0]["n_tokens"] < GEN["max_new_tokens"]
    cut_key = cache_key("test-model", convo("b"), {**GEN, "attempt": 0})
    be.cache.put(cut_key, {"text": "b cut", "n_tokens": GEN["max_new_tokens"]})  # type: ignore[union-attr]
    raised = {**GEN, "max_new_tokens": 64}
    cache = CallCache(tmp_path / "teacher.jsonl", earlier_limits=[GEN["max_new_tokens"]])
    be2 = make(server, tmp_path, cache=cache)
    out = be2.generate([convo("a"), convo("b")], **raised)
    assert out[0] == first[0] and out[1]["text"] == "echo: b"
    assert server.n_requests == 2 and server.requests[-1]["max_tokens"] == 64  # only "b" went out again
    assert make(server, tmp_path).generate([convo("a")], **raised)[0]["text"] == "echo: a"  # no earlier_limits
    assert server.n_requests == 3


def test_429_then_500_then_ok(server: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    server.push(("status", 429, {"Retry-After": "0"}), ("status", 500), ("ok", "finally"))
    with caplog.at_level(logging.WARNING, logger="magdi.backends_openai"):
        out = make(server).generate([convo("q")], **GEN)
    assert out == [{"text": "finally", "n_tokens": 3}]
    assert server.n_requests == 3
    assert "429" in caplog.text and "500" in caplog.text  # each retry is logged


def test_retry_after_is_honoured(server: FakeOpenAI) -> None:
    server.push(("status", 429, {"Retry-After": "1"}), ("ok", "waited"))
    t0 = time.monotonic()
    out = make(server, max_backoff_s=5.0).generate([convo("q")], **GEN)
    assert out[0]["text"] == "waited" and server.n_requests == 2
    assert time.monotonic() - t0 >= 0.9


def test_timeout_then_ok(server: FakeOpenAI) -> None:
    server.push(("sleep", 1.0), ("ok", "on time"))
    t0 = time.monotonic()
    out = make(server, timeout_s=0.25).generate([convo("q")], **GEN)
    assert out[0]["text"] == "on time"
    assert server.n_requests == 2
    assert time.monotonic() - t0 < 1.0  # the client gave up on the slow call, it did not wait it out


@pytest.mark.parametrize("bad", ["malformed", "empty_choices", "null_content"])
def test_malformed_response_then_ok(server: FakeOpenAI, bad: str) -> None:
    server.push((bad,), ("ok", "well formed"))
    out = make(server).generate([convo("q")], **GEN)
    assert out == [{"text": "well formed", "n_tokens": 3}]
    assert server.n_requests == 2


def test_persistent_500_raises_after_max_retries_and_keeps_cache(server: FakeOpenAI, tmp_path: Path) -> None:
    be = make(server, tmp_path, max_retries=2)
    done = be.generate([convo("early")], **GEN)
    assert server.n_requests == 1
    server.push(*[("status", 500)] * 10)
    with pytest.raises(TeacherCallError) as ei:
        be.generate([convo("doomed")], **GEN)
    assert server.n_requests == 1 + 3  # max_retries + 1 attempts, exactly
    msg = str(ei.value)
    assert "\n" not in msg
    for part in ("test-model", server.base_url, "InternalServerError", "500", "3 attempts"):
        assert part in msg, (part, msg)
    reloaded = CallCache(tmp_path / "teacher.jsonl")
    assert len(reloaded) == 1
    assert reloaded.get(cache_key("test-model", convo("early"), {**GEN, "attempt": 0})) == done[0]


def test_failure_mid_batch_keeps_finished_results(server: FakeOpenAI, tmp_path: Path) -> None:
    server.push(("ok", "first"), *[("status", 503)] * 2)
    be = make(server, tmp_path, max_retries=1, concurrency=1)
    with pytest.raises(TeacherCallError, match="503"):
        be.generate([convo("one"), convo("two"), convo("three")], **GEN)
    assert server.n_requests == 3  # "three" was never sent
    reloaded = CallCache(tmp_path / "teacher.jsonl")
    assert len(reloaded) == 1
    # the rerun pays only for what is missing
    be2 = make(server, tmp_path)
    out = be2.generate([convo("one"), convo("two"), convo("three")], **GEN)
    assert [r["text"] for r in out] == ["first", "echo: two", "echo: three"]
    assert server.n_requests == 5


def test_concurrent_batch(server: FakeOpenAI, tmp_path: Path) -> None:
    batch = [convo(f"q{i}") for i in range(12)]
    be = make(server, tmp_path, concurrency=4)
    out = be.generate(batch, **GEN)
    assert [r["text"] for r in out] == [f"echo: q{i}" for i in range(12)]
    assert server.n_requests == 12 and len(be.cache) == 12  # type: ignore[arg-type]


def test_concurrent_batch_with_a_failure_keeps_the_rest(server: FakeOpenAI, tmp_path: Path) -> None:
    batch = [convo("q0"), convo("FAIL"), convo("q2"), convo("q3")]
    be = make(server, tmp_path, concurrency=4, max_retries=1)
    with pytest.raises(TeacherCallError, match="500"):
        be.generate(batch, **GEN)
    assert len(CallCache(tmp_path / "teacher.jsonl")) == 3  # the good ones that ran were cached
    n = server.n_requests
    be2 = make(server, tmp_path, max_retries=0)
    with pytest.raises(TeacherCallError):
        be2.generate(batch, **GEN)
    assert server.n_requests == n + 1  # only the failing conversation is asked again


@pytest.mark.parametrize("code", [400, 401, 403, 404])
def test_client_errors_are_not_retried(server: FakeOpenAI, code: int) -> None:
    server.push(("status", code))
    with pytest.raises(TeacherCallError) as ei:
        make(server).generate([convo("q")], **GEN)
    assert server.n_requests == 1
    msg = str(ei.value)
    assert str(code) in msg and "not retried" in msg and "test-model" in msg
    if code == 401:
        assert KEY_ENV in msg  # points at the variable to fix, not its value


def test_key_never_leaks(
    server: FakeOpenAI, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)  # including openai / httpx debug logging
    be = make(server, tmp_path, max_retries=1)
    be.generate([convo("cached")], **GEN)
    server.push(("status", 500, {"X-Note": "x"}), ("status", 502))
    with pytest.raises(TeacherCallError) as e1:
        be.generate([convo("five-hundreds")], **GEN)
    server.push(("echo_auth", 401))  # the server echoes "Bearer sk-test-SECRET123" in its error body
    with pytest.raises(TeacherCallError) as e2:
        be.generate([convo("unauthorised")], **GEN)
    assert server.auth_headers[-1] == f"Bearer {SECRET}"
    out, err = capsys.readouterr()
    texts = {
        "repr": repr(be) + str(be),
        "cache repr": repr(be.cache),
        "exc": " ".join(str(e.value) + repr(e.value) for e in (e1, e2)),
        "traceback": "".join(
            "".join(traceback.format_exception(type(e.value), e.value, e.value.__traceback__))
            for e in (e1, e2)
        ),
        "logs": caplog.text + " ".join(str(r.args) for r in caplog.records),
        "stdout/stderr": out + err,
        "cache file": (tmp_path / "teacher.jsonl").read_text(encoding="utf-8"),
    }
    assert "SECRET123" not in SECRET.replace("SECRET123", "")  # sanity of the probe itself
    for where, text in texts.items():
        assert SECRET not in text and "SECRET123" not in text, f"API key leaked into {where}"
    assert "***" in str(e2.value)  # the echoed credential was scrubbed, the rest of the message kept


def test_missing_env_var_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAGDI_NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(TeacherConfigError, match="MAGDI_NO_SUCH_KEY_VAR"):
        OpenAIChatBackend("m", "http://127.0.0.1:9/v1", "MAGDI_NO_SUCH_KEY_VAR")
    monkeypatch.setenv("MAGDI_NO_SUCH_KEY_VAR", "  ")
    with pytest.raises(TeacherConfigError, match="MAGDI_NO_SUCH_KEY_VAR"):
        OpenAIChatBackend("m", "http://127.0.0.1:9/v1", "MAGDI_NO_SUCH_KEY_VAR")


def test_connection_refused_exhausts_retries() -> None:
    srv = FakeOpenAI()  # bind a port, then close it: nothing listens there any more
    url = srv.base_url
    srv.server_close()
    be = OpenAIChatBackend("m", url, KEY_ENV, max_retries=1, **FAST)  # type: ignore[arg-type]
    with pytest.raises(TeacherCallError) as ei:
        be.generate([convo("q")], **GEN)
    assert "APIConnectionError" in str(ei.value) and "2 attempts" in str(ei.value)
