"""Local teachers served by llama.cpp's OpenAI-compatible server, started and stopped by the pipeline.

Why this engine: it runs the packaged GGUF files as they are (4-bit kernels, ~1.1 GB for the 1.5B
teacher instead of ~3 GB dequantised in bf16), and its parallel slots decode several conversations in one
batch (continuous batching). ``benchmarks/bench_teacher_engines.py`` measures it against transformers.

Lifecycle: a :class:`LlamaServer` starts on the first teacher call that misses the cache (a discussion
already in ``teacher_cache/`` never starts it, so a fresh clone replays the committed MAGs without the
binary), listens on 127.0.0.1 only, and is terminated when ``build_mags`` ends (``close``), on interpreter
exit, or by its parent's death (it is in our process group). The binary comes from ``make llama-server``,
built from the llama.cpp sources vendored in PyPI's ``llama-cpp-python`` sdist.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from .backends_openai import OpenAIChatBackend
from .cache import CallCache

log = logging.getLogger(__name__)


class LlamaServerError(RuntimeError):
    """The server could not be found or started (one line, with the log file to read)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(binary: str, gguf: Path, port: int, parallel: int, ctx_per_slot: int, threads: int,
                   extra_args: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The exact command line (a list: no shell ever sees a model path)."""
    return [binary, "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(parallel), "--ctx-size", str(parallel * ctx_per_slot), "--threads", str(threads),
            "--threads-batch", str(threads), "--no-webui", "--jinja", *extra_args]


class LlamaServer:
    """One ``llama-server`` process for one GGUF; ``ensure()`` starts it once, thread-safe."""

    def __init__(self, binary: str, gguf: Path, log_path: Path, parallel: int = 8, ctx_per_slot: int = 4096,
                 threads: int | None = None, start_timeout_s: float = 300.0, extra_args: list[str] | None = None):
        self.binary, self.gguf, self.log_path = binary, Path(gguf), Path(log_path)
        self.parallel, self.ctx_per_slot = parallel, ctx_per_slot
        self.threads = threads or max(1, int(os.environ.get("MAGDI_THREADS", os.cpu_count() or 1)))
        self.start_timeout_s = start_timeout_s
        self.extra_args = list(extra_args or [])
        self.port = free_port()
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._atexit = False  # close() registered once, however often the server is (re)started

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _resolve_binary(self) -> str:
        venv_bin = str(Path(sys.executable).parent)  # `make llama-server` installs it next to python
        found = (shutil.which(self.binary) or shutil.which(self.binary, path=venv_bin)
                 or (self.binary if Path(self.binary).is_file() else None))
        if found is None:
            raise LlamaServerError(
                f"llama-server binary '{self.binary}' not found: teacher calls missing from the cache need it; "
                f"build it with `make llama-server` (teachers.llama_server.binary)")
        return found

    def ensure(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return
            if not self.gguf.exists():
                raise LlamaServerError(f"{self.gguf} missing: run `dvc repro prepare_student` (assembles it)")
            cmd = server_command(self._resolve_binary(), self.gguf, self.port, self.parallel, self.ctx_per_slot,
                                 self.threads, self.extra_args)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            logf = self.log_path.open("ab")
            log.info("starting %s", " ".join(cmd))
            self._proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            logf.close()
            if not self._atexit:
                atexit.register(self.close)
                self._atexit = True
            self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        url = f"http://127.0.0.1:{self.port}/health"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise LlamaServerError(f"llama-server for {self.gguf.name} exited with {self._proc.returncode}; "
                                       f"see {self.log_path}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 (loopback, fixed URL)
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        self.close()
        raise LlamaServerError(f"llama-server for {self.gguf.name} not ready after {self.start_timeout_s:.0f} s; "
                               f"see {self.log_path}")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class LlamaServerBackend(OpenAIChatBackend):
    """The OpenAI backend against a lazily started local server, with an optional prefilled reply start.

    ``prefill`` (e.g. ``{"reasoning": "``) is sent as a trailing assistant message, which llama-server
    continues; the reply must start with it (llama-server returns prefill + continuation; it is added if a
    server returns only the continuation) so parsing sees the whole reply, exactly as the transformers
    backend does with ``RESPONSE_PREFIX``. It is part of the cached messages (the key).
    """

    def __init__(self, server: LlamaServer, model: str, cache: CallCache, max_retries: int, timeout_s: float,
                 prefill: str = ""):
        super().__init__(model, server.base_url, None, timeout_s, max_retries, cache, concurrency=server.parallel)
        self.server, self.prefill = server, prefill

    def complete(self, messages, temperature, top_p, max_new_tokens, seed):
        self.server.ensure()
        return super().complete(messages, temperature, top_p, max_new_tokens, seed)

    def _request(self, messages, temperature, top_p, max_new_tokens, seed):
        out = super()._request(messages, temperature, top_p, max_new_tokens, seed)
        # llama-server returns the prefill followed by its continuation; other servers only the continuation
        if self.prefill and not out["text"].startswith(self.prefill):
            out = {**out, "text": self.prefill + out["text"]}
        return out

    def generate(self, messages_batch, temperature, top_p, max_new_tokens, seed, *, attempt: int = 0):
        if self.prefill:
            messages_batch = [[*m, {"role": "assistant", "content": self.prefill}] for m in messages_batch]
        return super().generate(messages_batch, temperature, top_p, max_new_tokens, seed, attempt=attempt)

    def close(self) -> None:
        super().close()
        self.server.close()
