"""The server: pre-imports, then forks one child per accepted request (``Server.serve``).

The parent only imports and waits: it never computes, so a fork copies no half-alive thread pool
(``fork_hazard``), and it refuses a request that a fresh process would run differently (``Server.refusal``).
It forwards each child's exit status to that child's client and stops the child when the client goes away.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from magdi.warm.child import Job
from magdi.warm.client import mark_child
from magdi.warm.protocol import (
    PING,
    RUN,
    STDIO,
    interpreter,
    listen,
    peer_uid,
    recv_header,
    recv_msg,
    send_msg,
)

DEFAULT_PRELOAD = (
    "torch", "transformers", "peft", "accelerate", "mlflow", "mlflow.store.tracking.sqlalchemy_store",
    "torch_geometric", "pandas",
    "magdi.config", "magdi.pipeline", "magdi.student", "magdi.train", "magdi.evaluate", "magdi.tracking",
    "magdi.mag", "magdi.data", "magdi.discussion", "magdi.encoders", "magdi.losses", "magdi.report",
)
# environment variables read by libraries while they are imported (or read once, at a first use that may come
# during the imports: oneDNN's and ATen's kernel caps): a client whose values differ from the server's would get
# the server's behaviour, so such a request falls back to an ordinary process
IMPORT_ENV_PREFIXES = ("PYTHON", "HF_", "HUGGINGFACE", "TRANSFORMERS", "TOKENIZERS", "TORCH", "PYTORCH",
                       "CUDA", "OMP_", "MKL_", "KMP_", "OPENBLAS", "GOTO", "MLFLOW", "LD_", "MALLOC",
                       "ONEDNN_", "DNNL_", "ATEN_")


def native_threads() -> int:
    """Threads of this process as the kernel sees them (Python threads and library threads alike)."""
    return len(os.listdir("/proc/self/task"))


def fork_hazard(max_threads: int) -> str | None:
    """Why forking now could hand the child a broken library state (None: safe as far as we can see).

    A fork copies only the calling thread: a Python thread, a thread pool started since the imports
    (OpenMP/intra-op pools are created by the first torch compute) or an initialised CUDA context would
    be left half-alive in the child.
    """
    if threading.active_count() != 1:
        return f"Python threads are running: {threading.enumerate()}"
    if native_threads() > max_threads:
        return f"{native_threads()} threads, more than the {max_threads} after the imports"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA is initialised"
    return None


def preload(modules: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Import ``modules`` (missing optional libraries are skipped): (imported, skipped -> reason)."""
    done, skipped = [], {}
    for m in modules:
        try:
            importlib.import_module(m)
            done.append(m)
        except ImportError as e:
            if m.startswith("magdi"):
                raise
            skipped[m] = str(e)
    return done, skipped


def _magdi_files() -> dict[str, int]:
    """mtime of each ``magdi`` module file imported here (``magdi.warm``'s own and ``__main__`` included)."""
    import magdi

    root = os.path.dirname(magdi.__file__)
    out = {}
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and f.startswith(root + os.sep):
            with contextlib.suppress(OSError):
                out[f] = os.stat(f).st_mtime_ns
    return out


def _import_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_ENV_PREFIXES)}


def _patched(env: dict[str, str], added: dict[str, str], removed: Sequence[str]) -> dict[str, str]:
    out = {**env, **added}
    for k in removed:
        out.pop(k, None)
    return out


class Server:
    """The pre-imported parent; ``serve`` returns only in a forked child, with the job to run."""

    def __init__(self, socket_path: Path, stages_dir: Path, modules: Sequence[str], verbose: bool = False):
        self.path, self.stages = socket_path, stages_dir.resolve()
        self.verbose = verbose
        start_env = dict(os.environ)
        self.env = _import_env(start_env)  # what clients must match: the server's environment before imports
        t = time.perf_counter()
        self.modules, self.skipped = preload(modules)
        self.preload_s = time.perf_counter() - t
        self.threads = native_threads()  # OpenBLAS/jemalloc pools: fork-aware, but must not grow
        hazard = fork_hazard(self.threads)
        if hazard:
            raise SystemExit(f"magdi.warm: after the imports, {hazard}")
        gc.collect()
        gc.freeze()  # children's collections skip the pre-imported objects (no copy-on-write of them)
        self.files = _magdi_files()
        # variables the imports set (torch sets TORCHINDUCTOR_CACHE_DIR): a fresh process would set them too
        self.env_added = {k: v for k, v in os.environ.items() if start_env.get(k) != v}
        self.env_removed = [k for k in start_env if k not in os.environ]
        import magdi

        self.magdi = os.path.dirname(magdi.__file__)
        self.python = interpreter()
        self.pid = os.getpid()
        self.running: dict[int, socket.socket | None] = {}  # child pid -> its client (None: gone)
        self.stopping = False

    def describe(self) -> dict:
        return {"pid": self.pid, "stages": str(self.stages), "preloaded": self.modules, "skipped": self.skipped,
                "preload_s": round(self.preload_s, 3), "threads": self.threads, "threads_now": native_threads()}

    def refusal(self, req: dict) -> str | None:
        """Why ``req`` must run as an ordinary process instead (None: fork it)."""
        script = Path(str(req.get("script", "")))
        try:
            real = script.resolve(strict=True)
        except OSError:
            return f"no such script {script}"
        if real.suffix != ".py" or not real.is_file() or not real.is_relative_to(self.stages):
            return f"{script} is not a .py file under {self.stages}"
        if req.get("python") != self.python or req.get("magdi") != self.magdi:
            return "the client's interpreter, its flags or the magdi package differ from the server's"
        env = req.get("env")
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            return "bad environment"
        if _import_env(env) != self.env:
            diff = sorted(set(_import_env(env).items()) ^ set(self.env.items()))
            return f"import-time environment differs: {sorted({k for k, _ in diff})}"
        for f, mtime in self.files.items():
            try:
                if os.stat(f).st_mtime_ns != mtime:
                    return f"{f} changed since the server started"
            except OSError:
                return f"{f} is gone"
        return fork_hazard(self.threads)

    def _accept(self, lst: socket.socket) -> Job | None:
        conn, _ = lst.accept()
        fds: list[int] = []
        try:
            conn.settimeout(10)
            uid = peer_uid(conn)
            if uid != os.getuid():
                raise PermissionError(f"peer uid {uid}")
            kind, fds = recv_header(conn)
            if kind == PING:
                send_msg(conn, self.describe())
                raise EOFError
            if kind != RUN or len(fds) != len(STDIO):
                raise ValueError("bad request header")
            req = recv_msg(conn)
            why = self.refusal(req)
            if why:
                send_msg(conn, {"error": why})
                raise EOFError
            job = Job(fds, req["script"], [str(a) for a in req["argv"]], str(req["cwd"]),
                      _patched(req["env"], self.env_added, self.env_removed), int(req["umask"]))
        except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
            if self.verbose and not isinstance(e, EOFError):
                print(f"magdi.warm: dropped a request: {e!r}", file=sys.stderr, flush=True)
            for fd in fds:
                os.close(fd)
            conn.close()
            return None
        for f in (sys.stdout, sys.stderr):
            f.flush()
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            conn.close()
            return job
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        for fd in fds:
            os.close(fd)
        try:
            send_msg(conn, {"pid": pid})
        except OSError:  # the client is gone already
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGTERM)
        self.running[pid] = conn
        if self.verbose:
            print(f"magdi.warm: {pid} runs {job.argv}", file=sys.stderr, flush=True)
        return None

    def _reap(self) -> None:
        while self.running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.running.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):
                    send_msg(conn, {"status": status})
                conn.close()
            if self.verbose:
                print(f"magdi.warm: {pid} exited {os.waitstatus_to_exitcode(status)}", file=sys.stderr,
                      flush=True)

    def serve(self) -> Job | None:
        """Serve until SIGTERM/SIGINT (returns None) or, in a forked child, return its job."""
        lst = listen(self.path)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)

        def stop(_s: int, _f: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGCHLD, lambda _s, _f: None)
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        print(f"magdi.warm: serving {self.path} ({json.dumps(self.describe())})", file=sys.stderr, flush=True)
        job = None
        try:
            while not self.stopping or self.running:
                if self.stopping:  # shutting down: the stages still running are told to stop
                    for pid in self.running:
                        with contextlib.suppress(OSError):
                            os.killpg(pid, signal.SIGTERM)
                conns = {c: pid for pid, c in self.running.items() if c is not None}
                watch = [wake_r, *conns] + ([] if self.stopping else [lst])
                with contextlib.suppress(InterruptedError):
                    ready, _, _ = select.select(watch, [], [], 1.0)
                    for r in ready:
                        if r == wake_r:
                            with contextlib.suppress(BlockingIOError):
                                os.read(wake_r, 512)
                        elif r is lst:
                            job = self._accept(lst)
                            if job is not None:
                                return job
                        elif r in conns:
                            self._client_spoke(r, conns[r])
                self._reap()
            return None
        finally:
            if job is not None:  # the child: drop the server's sockets, pipe and signal handlers
                mark_child()
                signal.set_wakeup_fd(-1)
                # as a fresh interpreter started by DVC, whatever the server inherited (`&` ignores SIGINT)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                for c in self.running.values():
                    if c is not None:
                        c.close()
                self.running = {}
                lst.close()
                os.close(wake_r)
                os.close(wake_w)
            else:
                lst.close()
                with contextlib.suppress(OSError):
                    self.path.unlink()

    def _client_spoke(self, conn: socket.socket, pid: int) -> None:
        """The client sends nothing after its request: readable means it is gone; stop its stage."""
        try:
            data = conn.recv(64)
        except OSError:
            data = b""
        if not data:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGTERM)
            conn.close()
            self.running[pid] = None
