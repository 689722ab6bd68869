"""llama.cpp server backend: lazy start, prefill, caching, shutdown, one-line errors (fake server binary)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from magdi.cache import CallCache
from magdi.llama_server import LlamaServer, LlamaServerBackend, LlamaServerError, server_command

FAKE = Path(__file__).with_name("_fake_llama_server.py")
PREFIX = '{"reasoning": "'


@pytest.fixture()
def fake_bin(tmp_path):
    """An executable wrapper so LlamaServer runs the fake exactly as it runs the real binary."""
    b = tmp_path / "llama-server"
    b.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
    b.chmod(0o755)
    return b


def _backend(tmp_path, binary, gguf=None):
    gguf = gguf or tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    server = LlamaServer(str(binary), gguf, tmp_path / "logs" / "server.log", parallel=2, ctx_per_slot=512,
                         threads=1, start_timeout_s=30, extra_args=["--no-repack"])
    return LlamaServerBackend(server, "toy", CallCache(tmp_path / "cache.jsonl"), max_retries=0, timeout_s=10,
                              prefill=PREFIX)


def test_command_is_a_list_bound_to_loopback():
    cmd = server_command("llama-server", Path("a b;rm -rf.gguf"), 8080, 4, 1024, 2)
    assert cmd[:3] == ["llama-server", "--model", "a b;rm -rf.gguf"]  # one argv item: no shell involved
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--ctx-size") + 1] == "4096" and cmd[cmd.index("--parallel") + 1] == "4"
    assert server_command("x", Path("m"), 1, 1, 1, 1, ["--no-repack"])[-1] == "--no-repack"


def test_starts_on_first_miss_prefills_and_stops(tmp_path, fake_bin, monkeypatch):
    log = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(log))
    b = _backend(tmp_path, fake_bin)
    assert not b.server.running
    msgs = [[{"role": "user", "content": "Question one?"}], [{"role": "user", "content": "Question two?"}]]
    out = b.generate(msgs, 0.5, 0.9, 64, 1)
    assert b.server.running
    assert [o["text"] for o in out] == [PREFIX + 'Question one?", "answer": "42", "confidence": 0.9}',
                                        PREFIX + 'Question two?", "answer": "42", "confidence": 0.9}']
    assert out[0]["n_tokens"] == 7
    sent = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(sent) == 2
    assert all(r["messages"][-1] == {"role": "assistant", "content": PREFIX} for r in sent)
    assert {r["seed"] for r in sent} == {1} and {r["max_tokens"] for r in sent} == {64}
    b.close()
    assert not b.server.running


def test_cached_discussion_never_starts_the_server(tmp_path, fake_bin, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(tmp_path / "requests.jsonl"))
    msgs = [[{"role": "user", "content": "Q?"}]]
    b = _backend(tmp_path, fake_bin)
    first = b.generate(msgs, 0.5, 0.9, 64, 1)
    b.close()
    # a fresh backend over the same cache file, with a binary that does not even exist
    b2 = _backend(tmp_path, tmp_path / "no-such-binary")
    assert b2.generate(msgs, 0.5, 0.9, 64, 1) == first
    assert not b2.server.running


def test_missing_binary_is_one_line_naming_make_target(tmp_path):
    b = _backend(tmp_path, tmp_path / "no-such-binary")
    with pytest.raises(LlamaServerError, match=r"not found: .*make llama-server"):
        b.generate([[{"role": "user", "content": "Q?"}]], 0.5, 0.9, 64, 1)


def test_server_that_dies_at_start_names_its_log(tmp_path, fake_bin, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_FAIL", "1")
    b = _backend(tmp_path, fake_bin)
    with pytest.raises(LlamaServerError, match=r"exited with 3; see .*server\.log"):
        b.server.ensure()


def test_missing_gguf_points_to_prepare_stage(tmp_path, fake_bin):
    b = _backend(tmp_path, fake_bin)
    b.server.gguf.unlink()
    with pytest.raises(LlamaServerError, match="prepare_student"):
        b.server.ensure()


def test_prefill_is_added_when_a_server_returns_only_the_continuation(tmp_path, fake_bin, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_NO_ECHO", "1")
    b = _backend(tmp_path, fake_bin)
    out = b.generate([[{"role": "user", "content": "Q?"}]], 0.5, 0.9, 64, 1)
    b.close()
    assert out[0]["text"] == PREFIX + 'Q?", "answer": "42", "confidence": 0.9}'


def test_restarts_register_one_exit_handler(tmp_path, fake_bin, monkeypatch):
    """A server restarted after it stopped (e.g. between build_mags chunks) registers close() at exit once."""
    import atexit

    calls = []
    monkeypatch.setattr(atexit, "register", lambda fn: calls.append(fn))
    b = _backend(tmp_path, fake_bin)
    for _ in range(2):
        b.server.ensure()
        assert b.server.running
        b.server.close()
    assert calls == [b.server.close]
