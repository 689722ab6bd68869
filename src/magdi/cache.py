"""Crash-safe on-disk cache of teacher calls.

A teacher call costs money and minutes; a run killed at any moment (even ``SIGKILL``) and restarted must
lose nothing that had already come back and must pay for nothing twice.  The cache is one append-only
JSONL file, one record per line::

    {"k": "<sha256 hex>", "v": {"text": "...", "n_tokens": 42}}

* ``put`` writes the whole line with one ``os.write`` on an ``O_APPEND`` descriptor and ``os.fsync``\\ s
  before returning, so a returned ``put`` is durable.
* On open the file is read into a dict.  A torn last line (process killed mid-write) is dropped with a
  warning and cut off the file, so the next record starts on a clean line; an undecodable line elsewhere is
  skipped with a warning.  Nothing in a damaged file makes loading crash.
* A duplicate key (the same call finished twice) is harmless: the last record wins.
* Writers take an exclusive ``flock`` while appending, so several processes may share one file without
  interleaving lines.  Each process only sees the records that existed when it opened the file plus its
  own; a concurrent writer's new records are picked up on the next open.

Only JSON goes in (no pickle), and nothing secret does: keys are hashes of model + messages + sampling
parameters, values are what the model said.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

try:  # POSIX only; on other platforms the in-process lock still serialises this process's writers.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Bump to invalidate every cached call (e.g. if the meaning of a cached value changes).
KEY_SCHEMA = 1

#: Sampling-parameter names that must never reach the cache key (the key is logged and stored).
_FORBIDDEN_SAMPLING = ("api_key", "apikey", "authorization", "secret", "password")


def _normalise(obj: Any) -> Any:
    """Integral floats -> int, so ``temperature=1`` and ``temperature=1.0`` give the same key."""
    if isinstance(obj, bool):
        return obj
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)
    if isinstance(obj, Mapping):
        return {str(k): _normalise(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_normalise(v) for v in obj]
    return obj


def cache_key(model: str, messages: list[dict], sampling: dict) -> str:
    """sha256 of a canonical JSON of ``model``, ``messages`` and ``sampling``.

    Canonical: ``sort_keys``, compact separators, UTF-8, integral floats folded to ints.  Dict ordering never
    changes the key; any change to the model name, a message or a sampling parameter (temperature, top_p,
    seed, max_new_tokens, attempt index, ...) does.
    """
    for name in sampling:
        if any(bad in str(name).lower() for bad in _FORBIDDEN_SAMPLING):
            raise ValueError(
                f"sampling parameter {name!r} looks like a credential; it must not enter a cache key"
            )
    payload = {
        "schema": KEY_SCHEMA,
        "model": model,
        "messages": _normalise(messages),
        "sampling": _normalise(sampling),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make a newly created file's directory entry durable (best effort; not every platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class CallCache:
    """Append-only JSONL cache ``key -> JSON dict``; thread-safe, crash-safe, durable on ``put``."""

    def __init__(self, path: Path | str, earlier_limits: tuple[int, ...] | list[int] = ()):
        self.path = Path(path)
        #: ``max_new_tokens`` values used before (``teachers.earlier_limits``): see :meth:`get_finished`
        self.earlier_limits = tuple(sorted({int(x) for x in earlier_limits}, reverse=True))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._data: dict[str, dict] = {}
        existed = self.path.exists()
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        if not existed:
            _fsync_dir(self.path.parent)
        try:
            self._locked(self._load)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ internals
    def _locked(self, fn: Callable[[int], T]) -> T:
        """Run ``fn`` holding the in-process lock and (POSIX) an exclusive flock on the file."""
        with self._lock:
            fd = self._require_fd()
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                return fn(fd)
            finally:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def _require_fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"cache {self.path} is closed")
        return self._fd

    def _load(self, fd: int) -> None:
        with open(self.path, "rb") as fh:
            raw = fh.read()
        lines = raw.split(b"\n")
        # ``raw`` ends with b"\n" when every record is complete, making the last element b"".
        tail = lines.pop()
        bad = 0
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            rec = self._decode(line)
            if rec is None:
                bad += 1
                log.warning("cache %s: skipping undecodable line %d (%d bytes)", self.path, lineno, len(line))
                continue
            self._data[rec[0]] = rec[1]
        if tail:
            rec = self._decode(tail)
            if rec is not None:
                # A complete record that lost only its newline: keep it, restore the newline.
                self._data[rec[0]] = rec[1]
                self._write_all(fd, b"\n")
                os.fsync(fd)
            else:
                log.warning(
                    "cache %s: ignoring truncated last line (%d bytes; a previous run was killed mid-write)",
                    self.path,
                    len(tail),
                )
                os.ftruncate(fd, len(raw) - len(tail))
                os.fsync(fd)
        if bad:
            log.warning(
                "cache %s: %d undecodable line(s) skipped, %d entries loaded", self.path, bad, len(self._data)
            )

    @staticmethod
    def _decode(line: bytes) -> tuple[str, dict] | None:
        try:
            rec = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        if not (isinstance(rec, dict) and isinstance(rec.get("k"), str) and isinstance(rec.get("v"), dict)):
            return None
        return rec["k"], rec["v"]

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    # ------------------------------------------------------------------ public API
    def get(self, key: str) -> dict | None:
        """The cached value (a copy), or ``None``."""
        with self._lock:
            value = self._data.get(key)
        return None if value is None else copy.deepcopy(value)

    def get_finished(self, key_at: Callable[[int], str], limit: int) -> dict | None:
        """The reply cached for this call at ``limit`` new tokens; failing that, the same call (same model,
        messages and other sampling parameters) cached at an earlier, smaller limit, if that reply ended by
        itself (``n_tokens`` below that limit).

        ``key_at(n)`` is the call's cache key with ``max_new_tokens = n``. A reply that ended before a limit
        is a complete answer under any larger limit too, so raising a teacher's ``max_new_tokens`` pays again
        only for the replies the old limit cut. (Sampled anew, a cut reply's continuation is a different
        sample: only the finished ones are reused.) The largest earlier limit below ``limit`` is tried first.
        """
        hit = self.get(key_at(limit))
        if hit is not None:
            return hit
        for old in self.earlier_limits:
            if old >= limit:
                continue
            hit = self.get(key_at(old))
            n = None if hit is None else hit.get("n_tokens")
            if isinstance(n, int) and not isinstance(n, bool) and n < old:
                return hit
        return None

    def put(self, key: str, value: dict) -> None:
        """Store ``value`` under ``key``; durable on disk (flushed and fsync'ed) when this returns."""
        if not isinstance(key, str) or not key:
            raise TypeError(f"cache key must be a non-empty str, got {type(key).__name__}")
        if not isinstance(value, dict):
            raise TypeError(f"cache value must be a dict, got {type(value).__name__}")
        line = json.dumps({"k": key, "v": value}, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
        data = (line + "\n").encode("ascii")
        stored = json.loads(line)["v"]  # exactly what a reload will see (tuples -> lists, etc.)

        def _append(fd: int) -> None:
            if self._data.get(key) == stored:
                return  # already durable; do not grow the file
            self._write_all(fd, data)
            os.fsync(fd)
            self._data[key] = stored

        self._locked(_append)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> CallCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._data

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._data))

    def __repr__(self) -> str:
        return f"CallCache(path={str(self.path)!r}, entries={len(self)})"
