"""A fork server ("zygote") that shares the Python start-up of the DVC stages.

Each DVC stage is a fresh ``python stages/<x>.py`` process that spends ~5 s importing torch, transformers,
peft, mlflow, torch-geometric and pandas before it computes anything (reports/benchmark_pipeline.md). The
server imports those once; every stage then runs in a ``fork()`` of it, so it starts with the libraries
already loaded. DVC still runs one command per stage (same deps, params, per-cell re-runs and
``dvc exp run -S``); only the start-up is shared.

    python -m magdi.warm serve --socket DIR/s        # pre-imports, then serves (DIR: 0700, ours)
    MAGDI_WARM_SOCKET=DIR/s dvc repro                 # each stage runs in a fork of the server
    python -m magdi.warm run -- dvc repro             # both: server in a temp dir, stopped afterwards

Client: ``delegate(__file__)`` on the first line of a stage script. If ``MAGDI_WARM_SOCKET`` names a live
server it sends argv, cwd, umask, the whole environment and its fds 0/1/2 (SCM_RIGHTS); the server forks,
the child takes over those fds, cwd, environment and argv and runs the script with ``runpy`` as
``__main__``; the client waits, forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT to the child's process group and
exits with the child's status (a child killed by a signal kills the client with the same signal). Anything
that goes wrong *before* the child started (no variable, no server, stale socket, refusal, protocol error)
makes ``delegate`` return, so the stage runs in-process as if the server did not exist.

Why the rules below:

* Fork safety: the server only imports; it never runs torch compute, opens a DB or starts a Python thread,
  so no OpenMP/intra-op pool exists in the parent (the child sizes it via ``torch.set_num_threads``).
  Native threads some libraries start at load (OpenBLAS of numpy/scipy, pyarrow's jemalloc) register
  ``pthread_atfork`` handlers; the server records their number after the imports and refuses to fork
  (client falls back) if a Python thread exists, the native count grew or CUDA was initialised.
  Pre-imported objects are ``gc.freeze()``-d so the children's collections do not copy their pages, and a
  child ends without the module teardown (``exit_child``), which in a fork copied every inherited page.
* Same code, same import-time settings: a request is refused (client falls back) when a ``magdi`` module
  the server imported changed on disk, when the client's interpreter, venv, flags (-u, -X, -W ...) or
  ``magdi`` package differ, or when an environment variable read at import time (``IMPORT_ENV_PREFIXES``:
  HF_*, TORCH*, OMP_*, PYTHON*, ...) differs from the server's before its imports.
* Security: the socket is 0600 inside a directory only its owner may enter, the peer's uid (SO_PEERCRED)
  must be the server's, and only ``.py`` files under the configured stages directory are run: the
  socket never carries code, only the path of a stage script the client would have run itself.
* Concurrency: every request gets its own child, so concurrent stages (``dvc exp run --jobs``, which run
  in temp copies whose scripts are outside the stages directory and therefore fall back anyway) are safe.
  What a fork does not copy from the client: resource limits, nice value, the controlling terminal.
  Each child reseeds torch's and numpy's global RNGs from the OS like a fresh process (CPython: ``random``).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib
import json
import os
import runpy
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SOCKET_ENV = "MAGDI_WARM_SOCKET"
DEFAULT_PRELOAD = (
    "torch", "transformers", "peft", "accelerate", "mlflow", "mlflow.store.tracking.sqlalchemy_store",
    "torch_geometric", "pandas",
    "magdi.config", "magdi.pipeline", "magdi.student", "magdi.train", "magdi.evaluate", "magdi.tracking",
    "magdi.mag", "magdi.data", "magdi.discussion", "magdi.encoders", "magdi.losses", "magdi.report",
)
# environment variables read by libraries while they are imported: a client whose values differ from the
# server's would get the server's behaviour, so such a request falls back to an ordinary process
IMPORT_ENV_PREFIXES = ("PYTHON", "HF_", "HUGGINGFACE", "TRANSFORMERS", "TOKENIZERS", "TORCH", "PYTORCH",
                       "CUDA", "OMP_", "MKL_", "KMP_", "OPENBLAS", "GOTO", "MLFLOW", "LD_", "MALLOC")
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_RUN, _PING = b"R", b"P"
_MAX_MSG = 1 << 24

_in_child = False  # True in a child forked by the server: delegate() must not delegate again


def in_server_child() -> bool:
    """Whether this process is a stage running in a fork of the warm server."""
    return _in_child


# ----------------------------------------------------------------------------- wire format


def _send_msg(sock: socket.socket, obj: dict) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack("!I", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return buf


def _recv_msg(sock: socket.socket) -> dict:
    (n,) = struct.unpack("!I", _recv_exact(sock, 4))
    if n > _MAX_MSG:
        raise ValueError(f"message of {n} bytes")
    obj = json.loads(_recv_exact(sock, n))
    if not isinstance(obj, dict):
        raise ValueError("message is not an object")
    return obj


def _connect(path: str, timeout: float | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


# ----------------------------------------------------------------------------- client


def _interpreter() -> list:
    """Interpreter, venv and command-line flags (-u, -O, -W, -X ...): a child inherits the server's."""
    return json.loads(json.dumps([os.path.realpath(sys.executable), sys.prefix, list(sys.flags),
                                  sys.warnoptions, sys._xoptions]))


def _request(script: str) -> dict:
    umask = os.umask(0o022)
    os.umask(umask)
    import magdi

    return {"script": os.path.abspath(script), "argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ),
            "umask": umask, "python": _interpreter(),
            "magdi": os.path.dirname(magdi.__file__)}


def delegate(script: str) -> None:
    """Run the calling stage script in a fork of the warm server and exit with its status, if one is up.

    Returns (and the caller runs in-process) when ``MAGDI_WARM_SOCKET`` is unset, nothing listens there,
    or the server refuses or fails before the child started. Never returns once the child started.
    """
    path = os.environ.get(SOCKET_ENV)
    if _in_child or not path:
        return
    try:
        sock = _connect(path, timeout=30)
    except OSError:
        return
    with sock:
        try:
            socket.send_fds(sock, [_RUN], [0, 1, 2])
            _send_msg(sock, _request(script))
            reply = _recv_msg(sock)
        except (OSError, EOFError, ValueError):
            return
        if "pid" not in reply:
            print(f"magdi.warm: the server declined ({reply.get('error', reply)}); running in-process",
                  file=sys.stderr, flush=True)
            return
        code = _wait_child(sock, int(reply["pid"]))
    _exit_with(code)


def _wait_child(sock: socket.socket, pid: int) -> int:
    """The child's exit code (negative: killed by that signal); our signals go to its process group."""

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signum)

    for s in FORWARDED_SIGNALS:
        signal.signal(s, forward)
    sock.settimeout(None)
    try:
        status = int(_recv_msg(sock)["status"])
    except (OSError, EOFError, ValueError, KeyError) as e:
        print(f"magdi.warm: lost the server while stage pid {pid} ran ({e!r})", file=sys.stderr, flush=True)
        return 1
    return os.waitstatus_to_exitcode(status)


def _exit_with(code: int) -> None:
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code)


def ping(path: str, timeout: float = 2.0) -> dict | None:
    """The server's description if one answers at ``path``, else None."""
    try:
        with _connect(path, timeout) as sock:
            sock.sendall(_PING)
            return _recv_msg(sock)
    except (OSError, EOFError, ValueError):
        return None


# ----------------------------------------------------------------------------- server


@dataclass
class Job:
    """What the child needs from the accepted request."""

    fds: list[int]
    script: str
    argv: list[str]
    cwd: str
    env: dict[str, str]
    umask: int


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


def _check_private_dir(d: Path) -> None:
    st = d.stat()
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise SystemExit(f"magdi.warm: {d} must be owned by uid {os.getuid()} and closed to others (chmod 700)")


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
        self.python = _interpreter()
        self.pid = os.getpid()
        self.running: dict[int, socket.socket | None] = {}  # child pid -> its client (None: gone)
        self.stopping = False

    def describe(self) -> dict:
        return {"pid": self.pid, "stages": str(self.stages), "preloaded": self.modules, "skipped": self.skipped,
                "preload_s": round(self.preload_s, 3), "threads": self.threads, "threads_now": native_threads()}

    def _bind(self) -> socket.socket:
        _check_private_dir(self.path.parent)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise SystemExit(f"magdi.warm: {self.path} exists and is not a socket")
            if ping(str(self.path)) is not None:
                raise SystemExit(f"magdi.warm: a server already answers at {self.path}")
            self.path.unlink()  # stale
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            lst.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        lst.listen(64)
        return lst

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
            uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            if uid != os.getuid():
                raise PermissionError(f"peer uid {uid}")
            kind, fds, _, _ = socket.recv_fds(conn, 1, 3)
            if kind == _PING:
                _send_msg(conn, self.describe())
                raise EOFError
            if kind != _RUN or len(fds) != 3:
                raise ValueError("bad request header")
            req = _recv_msg(conn)
            why = self.refusal(req)
            if why:
                _send_msg(conn, {"error": why})
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
            _send_msg(conn, {"pid": pid})
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
                    _send_msg(conn, {"status": status})
                conn.close()
            if self.verbose:
                print(f"magdi.warm: {pid} exited {os.waitstatus_to_exitcode(status)}", file=sys.stderr,
                      flush=True)

    def serve(self) -> Job | None:
        """Serve until SIGTERM/SIGINT (returns None) or, in a forked child, return its job."""
        lst = self._bind()
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
                _mark_child()
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


def _mark_child() -> None:
    global _in_child
    _in_child = True


def _reseed() -> None:
    """Fresh RNG seeds from the OS, as a fresh process gets them (CPython reseeds ``random`` itself)."""
    if (torch := sys.modules.get("torch")) is not None:
        torch.seed()
    if (np := sys.modules.get("numpy")) is not None:
        np.random.seed()


def run_job(job: Job) -> int:
    """In the forked child: become the client's process, run its stage script as ``__main__``: exit code.

    Exit codes and messages as ``python script.py``: ``SystemExit`` codes (a non-int is printed, code 1),
    an uncaught exception's traceback (from the script's frame on, via ``sys.excepthook``) and code 1,
    ``KeyboardInterrupt``: traceback, then death by SIGINT (``-SIGINT`` here; ``exit_child`` does it).
    """
    os.setpgid(0, 0)
    for target, fd in enumerate(job.fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(job.cwd)
    os.umask(job.umask)
    os.environ.clear()
    os.environ.update(job.env)
    sys.argv = list(job.argv)
    sys.path[0] = os.path.dirname(job.script)
    _reseed()
    # fds 0-2 now are the client's; buffering as a fresh interpreter would choose for them
    unbuffered = bool(job.env.get("PYTHONUNBUFFERED"))
    for f, tty_line in ((sys.stdout, True), (sys.stderr, False)):
        if f is not None:
            f.reconfigure(line_buffering=os.isatty(f.fileno()) if tty_line else True, write_through=unbuffered)
    try:
        runpy.run_path(job.script, run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException as e:  # noqa: BLE001 - what the interpreter would do with it
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != job.script:
            tb = tb.tb_next  # drop the frames of this module and runpy
        sys.excepthook(type(e), e, tb or e.__traceback__)
        return -signal.SIGINT if isinstance(e, KeyboardInterrupt) else 1
    return 0


def exit_child(code: int) -> None:
    """End the child the way the interpreter ends, minus tearing down the modules inherited from the server.

    Non-daemon threads are joined, atexit handlers run (mlflow ends its runs, logging flushes), garbage the
    stage made is collected (closing files it dropped), stdio is flushed; then ``os._exit``. The usual
    module teardown is skipped because in a fork it writes to every inherited page (copy-on-write): it
    took ~2.4 s per stage here. As under ``multiprocessing``'s fork start method, an object still alive at
    exit gets no ``__del__`` (CPython does not promise one at exit either).
    """
    with contextlib.suppress(Exception):
        threading._shutdown()  # type: ignore[attr-defined]  # what Py_Finalize does first
    atexit._run_exitfuncs()
    gc.collect()  # the server's objects are frozen: only the stage's are scanned
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


# ----------------------------------------------------------------------------- wrapper for make


def wait_ready(path: str, proc: subprocess.Popen, timeout: float) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        info = ping(path)
        if info is not None:
            return info
        time.sleep(0.1)
    return None


@contextlib.contextmanager
def running_server(stages: Path, modules: Sequence[str] | None = None, timeout: float = 300,
                   verbose: bool = False) -> Iterator[str | None]:
    """A server in a private temp dir for the duration of the block: yields its socket path (None: failed)."""
    with tempfile.TemporaryDirectory(prefix="magdi-warm-") as d:  # mkdtemp: mode 0700
        path = os.path.join(d, "s")
        cmd = [sys.executable, "-m", "magdi.warm", "serve", "--socket", path, "--stages", str(stages)]
        cmd += ["--preload", *modules] if modules is not None else []
        cmd += ["--verbose"] if verbose else []
        srv = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)  # no terminal Ctrl-C
        try:
            ok = wait_ready(path, srv, timeout)
            if ok is None:
                print("magdi.warm: the server did not start; stages run as ordinary processes", file=sys.stderr)
            yield path if ok else None
        finally:
            srv.terminate()
            try:
                srv.wait(60)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait()


def run_command(cmd: Sequence[str], stages: Path, modules: Sequence[str] | None = None,
                verbose: bool = False) -> int:
    """Run ``cmd`` (e.g. ``dvc repro``) with a warm server; the server is stopped however ``cmd`` ends."""
    with running_server(stages, modules, verbose=verbose) as path:
        env = dict(os.environ)
        if path:
            env[SOCKET_ENV] = path
        proc = subprocess.Popen(list(cmd), env=env)

        def forward(signum: int, _frame: object) -> None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGHUP, forward)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal Ctrl-C reaches cmd itself
        rc = proc.wait()
    return 128 - rc if rc < 0 else rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="pre-import and serve on --socket until SIGTERM")
    s.add_argument("--socket", type=Path, required=True, help="in a directory only you may enter (0700)")
    r = sub.add_parser("run", help="run a command (after --) with a server in a temp dir, then stop it")
    r.add_argument("command", nargs="+")
    for p in (s, r):
        p.add_argument("--stages", type=Path, default=Path("stages"), help="the only scripts it runs")
        p.add_argument("--preload", nargs="*", default=None, help=f"modules (default {' '.join(DEFAULT_PRELOAD)})")
        p.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        return run_command(a.command, a.stages, a.preload, a.verbose)
    server = Server(a.socket, a.stages, DEFAULT_PRELOAD if a.preload is None else a.preload, a.verbose)
    job = server.serve()
    if job is not None:
        exit_child(run_job(job))
    return 0
