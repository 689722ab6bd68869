"""CallCache: durable, crash-safe, JSON-only cache of teacher calls."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from magdi.cache import CallCache, cache_key

SRC = Path(__file__).resolve().parents[1] / "src"
MSGS = [{"role": "system", "content": "You are careful."}, {"role": "user", "content": "Is 7 prime?"}]
SAMPLING = {"temperature": 0.7, "top_p": 0.95, "seed": 0, "max_new_tokens": 64, "attempt": 0}


def test_put_get_roundtrip(tmp_path: Path) -> None:
    c = CallCache(tmp_path / "c.jsonl")
    assert len(c) == 0 and c.get("nope") is None and "nope" not in c
    c.put("k1", {"text": "Yes — 7 is prime. ünïcode ✓", "n_tokens": 7})
    assert c.get("k1") == {"text": "Yes — 7 is prime. ünïcode ✓", "n_tokens": 7}
    assert "k1" in c and len(c) == 1
    got = c.get("k1")
    got["text"] = "mutated"  # a returned value is a copy
    assert c.get("k1")["text"].startswith("Yes")


def test_persistence_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "c.jsonl"  # parent dirs are created
    with CallCache(path) as c:
        for i in range(20):
            c.put(f"k{i}", {"text": f"t{i}", "n_tokens": i})
        c.put("k3", {"text": "overwritten", "n_tokens": 99})
    c2 = CallCache(path)
    assert len(c2) == 20
    assert c2.get("k0") == {"text": "t0", "n_tokens": 0}
    assert c2.get("k3") == {"text": "overwritten", "n_tokens": 99}  # last record wins
    # re-putting an identical value does not grow the file
    size = path.stat().st_size
    c2.put("k5", {"text": "t5", "n_tokens": 5})
    assert path.stat().st_size == size


def test_truncated_last_line_is_ignored_and_repaired(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.jsonl"
    with CallCache(path) as c:
        c.put("good", {"text": "ok", "n_tokens": 1})
    full = json.dumps({"k": "torn", "v": {"text": "this line was cut", "n_tokens": 4}})
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(full[: len(full) // 2])  # killed mid-write: half a line, no newline
    with caplog.at_level(logging.WARNING, logger="magdi.cache"):
        c2 = CallCache(path)
    assert len(c2) == 1 and c2.get("good") == {"text": "ok", "n_tokens": 1} and "torn" not in c2
    assert "truncated" in caplog.text
    # the next record must start on a clean line, not be glued onto the torn one
    c2.put("after", {"text": "fine", "n_tokens": 1})
    c2.close()
    c3 = CallCache(path)
    assert len(c3) == 2 and c3.get("after") == {"text": "fine", "n_tokens": 1}
    for line in path.read_text(encoding="utf-8").splitlines():
        json.loads(line)


def test_garbage_lines_and_missing_newline(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "c.jsonl"
    good = json.dumps({"k": "a", "v": {"text": "A", "n_tokens": 1}})
    last = json.dumps({"k": "b", "v": {"text": "B", "n_tokens": 1}})
    path.write_bytes(
        good.encode()
        + b"\n"
        + b"\xff\xfe not json\n"
        + b'{"k": 1, "v": []}\n'
        + b"\n"
        + last.encode()  # no final \n
    )
    with caplog.at_level(logging.WARNING, logger="magdi.cache"):
        c = CallCache(path)
    assert c.get("a") == {"text": "A", "n_tokens": 1}
    assert c.get("b") == {"text": "B", "n_tokens": 1}  # complete record that only lost its newline is kept
    assert len(c) == 2
    c.put("c", {"text": "C", "n_tokens": 1})
    c.close()
    assert CallCache(path).get("c") == {"text": "C", "n_tokens": 1}


def test_rejects_non_json_values(tmp_path: Path) -> None:
    c = CallCache(tmp_path / "c.jsonl")
    with pytest.raises(TypeError):
        c.put("k", "not a dict")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        c.put("k", {"obj": object()})
    with pytest.raises(ValueError):
        c.put("k", {"x": float("nan")})
    assert len(c) == 0
    c.close()
    assert len(CallCache(tmp_path / "c.jsonl")) == 0


def test_concurrent_puts_from_threads(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    c = CallCache(path)
    n_threads, per_thread = 8, 50

    def work(t: int) -> None:
        for i in range(per_thread):
            c.put(f"t{t}-{i}", {"text": f"{t}:{i} " + "x" * (i * 37 % 500), "n_tokens": i})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(c) == n_threads * per_thread
    c.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == n_threads * per_thread
    for line in lines:
        json.loads(line)  # no interleaved / torn lines
    c2 = CallCache(path)
    for t in range(n_threads):
        for i in range(per_thread):
            assert c2.get(f"t{t}-{i}") == {"text": f"{t}:{i} " + "x" * (i * 37 % 500), "n_tokens": i}


def test_two_instances_same_file_do_not_interleave(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    a, b = CallCache(path), CallCache(path)
    for i in range(30):
        a.put(f"a{i}", {"text": "A" * 300, "n_tokens": i})
        b.put(f"b{i}", {"text": "B" * 300, "n_tokens": i})
    a.close()
    b.close()
    assert len(CallCache(path)) == 60


def test_cache_key_stable_and_sensitive() -> None:
    k = cache_key("gpt-x", MSGS, SAMPLING)
    assert len(k) == 64 and int(k, 16) >= 0
    # dict ordering (in sampling and inside messages) does not matter
    reordered_sampling = dict(reversed(list(SAMPLING.items())))
    reordered_msgs = [{"content": m["content"], "role": m["role"]} for m in MSGS]
    assert cache_key("gpt-x", reordered_msgs, reordered_sampling) == k
    # integral float == int
    assert cache_key("m", MSGS, {"temperature": 1.0}) == cache_key("m", MSGS, {"temperature": 1})
    # every ingredient changes the key
    variants = [
        cache_key("gpt-y", MSGS, SAMPLING),
        cache_key("gpt-x", MSGS[:1], SAMPLING),
        cache_key("gpt-x", [MSGS[0], {"role": "user", "content": "Is 9 prime?"}], SAMPLING),
    ]
    for name, value in [
        ("temperature", 0.8),
        ("top_p", 0.9),
        ("seed", 1),
        ("max_new_tokens", 65),
        ("attempt", 1),
    ]:
        variants.append(cache_key("gpt-x", MSGS, {**SAMPLING, name: value}))
    variants.append(cache_key("gpt-x", MSGS, {**SAMPLING, "extra": True}))
    assert k not in variants and len(set(variants)) == len(variants)


def test_cache_key_refuses_credentials() -> None:
    with pytest.raises(ValueError, match="credential"):
        cache_key("m", MSGS, {"api_key": "sk-nope"})


_WRITER = r"""
import sys
from magdi.cache import CallCache
c = CallCache(sys.argv[1])
print("ready", flush=True)
for i in range(1000):
    c.put(f"k{i}", {"text": f"entry {i} " + "z" * (i % 97) * 50, "n_tokens": i, "i": i})
print("done", flush=True)
"""


def _expected(i: int) -> dict:
    return {"text": f"entry {i} " + "z" * (i % 97) * 50, "n_tokens": i, "i": i}


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")
def test_sigkill_mid_run_keeps_only_complete_entries(tmp_path: Path) -> None:
    path = tmp_path / "killed.jsonl"
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    c = CallCache(path)
    n = len(c)
    assert n > 0
    keys = [json.loads(line)["k"] for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(keys) == len(set(keys)) == n  # nothing duplicated, nothing corrupt left in the file
    # entries are written in order, so what survived is exactly a prefix k0..k{n-1}
    assert set(c) == {f"k{i}" for i in range(n)}
    for i in range(n):
        assert c.get(f"k{i}") == _expected(i)
    # a restart resumes cleanly on top of whatever survived
    for i in range(n, min(n + 5, 1000)):
        c.put(f"k{i}", _expected(i))
    c.close()
    assert len(CallCache(path)) == min(n + 5, 1000)


def test_get_finished_reuses_replies_that_ended_before_an_earlier_limit(tmp_path: Path) -> None:
    """Raising max_new_tokens: a reply that ended before the old limit is reused, a cut one is not."""
    msgs = [{"role": "user", "content": "q"}]

    def key_at(n: int) -> str:
        return cache_key("m", msgs, {"temperature": 0.5, "max_new_tokens": n, "seed": 1})

    with CallCache(tmp_path / "c.jsonl", earlier_limits=[64, 384, 384]) as c:
        assert c.earlier_limits == (384, 64)  # largest first, once each
        assert c.get_finished(key_at, 768) is None  # nothing cached
        c.put(key_at(64), {"text": "short", "n_tokens": 10})
        assert c.get_finished(key_at, 768) == {"text": "short", "n_tokens": 10}  # ended at 10 < 64
        c.put(key_at(384), {"text": "cut", "n_tokens": 384})  # reached the old limit: cut, not reused...
        assert c.get_finished(key_at, 768) == {"text": "short", "n_tokens": 10}  # ...so the 64 one answers
        c.put(key_at(384), {"text": "ended", "n_tokens": 383})
        assert c.get_finished(key_at, 768)["text"] == "ended"  # the largest earlier limit first
        assert c.get_finished(key_at, 384)["text"] == "ended"  # exact hit
        assert c.get_finished(key_at, 32) is None  # earlier limits above the asked one never count
        c.put(key_at(768), {"text": "new", "n_tokens": 700})
        assert c.get_finished(key_at, 768)["text"] == "new"  # an exact hit wins
    with CallCache(tmp_path / "c.jsonl") as c:  # without earlier_limits only exact keys hit
        assert c.get_finished(key_at, 1000) is None
        c.put(key_at(500), {"text": "x", "n_tokens": True})  # not a count: never taken as finished
    with CallCache(tmp_path / "c.jsonl", earlier_limits=[500]) as c:
        assert c.get_finished(key_at, 1000) is None
