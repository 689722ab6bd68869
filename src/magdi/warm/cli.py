"""``python -m magdi.warm serve|run``: the server's command line and ``run``, which ``make repro WARM=1`` wraps."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import magdi.warm
from magdi.warm.child import exit_child, run_job
from magdi.warm.protocol import SOCKET_ENV, ping
from magdi.warm.server import DEFAULT_PRELOAD, Server
from magdi.warm.shim import write_shims


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
    with running_server(stages, modules, verbose=verbose) as path, \
            tempfile.TemporaryDirectory(prefix="magdi-shim-") as shims:
        env = dict(os.environ)
        if path:  # stage commands (`python stages/x.py`) find the shim's `python` first (magdi.warm.shim)
            write_shims(shims)
            env[SOCKET_ENV] = path
            env["PATH"] = shims + os.pathsep + env.get("PATH", "")
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
    summary = (magdi.warm.__doc__ or "").split("\n\n")[0]
    ap = argparse.ArgumentParser(prog="python -m magdi.warm", description=summary)
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
