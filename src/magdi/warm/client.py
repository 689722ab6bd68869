"""The stage side: ``delegate(__file__)`` hands the stage to a warm server, or returns to run it in-process.

Imported first by every stage script, so it imports only the standard library pieces it needs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys

from magdi.warm.protocol import SOCKET_ENV, connect, interpreter, recv_msg, send_msg, send_run_header

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

_in_child = False  # True in a child forked by the server: delegate() must not delegate again


def in_server_child() -> bool:
    """Whether this process is a stage running in a fork of the warm server."""
    return _in_child


def mark_child() -> None:
    """Called in a freshly forked child by the server: from now on ``delegate`` returns at once."""
    global _in_child
    _in_child = True


def _request(script: str) -> dict:
    umask = os.umask(0o022)
    os.umask(umask)
    import magdi

    return {"script": os.path.abspath(script), "argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ),
            "umask": umask, "python": interpreter(),
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
        sock = connect(path, timeout=30)
    except OSError:
        return
    with sock:
        try:
            send_run_header(sock)
            send_msg(sock, _request(script))
            reply = recv_msg(sock)
        except (OSError, EOFError, ValueError):
            return
        if "pid" not in reply:
            print(f"magdi.warm: the server declined ({reply.get('error', reply)}); running in-process",
                  file=sys.stderr, flush=True)
            return
        code = _wait_child(sock, int(reply["pid"]))
    exit_with(code)


def _wait_child(sock: socket.socket, pid: int) -> int:
    """The child's exit code (negative: killed by that signal); our signals go to its process group."""

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signum)

    for s in FORWARDED_SIGNALS:
        signal.signal(s, forward)
    sock.settimeout(None)
    try:
        status = int(recv_msg(sock)["status"])
    except (OSError, EOFError, ValueError, KeyError) as e:
        print(f"magdi.warm: lost the server while stage pid {pid} ran ({e!r})", file=sys.stderr, flush=True)
        return 1
    return os.waitstatus_to_exitcode(status)


def exit_with(code: int) -> None:
    """Flush stdio and end now with ``code``; a negative code is that signal, re-raised on ourselves so the
    parent sees the same death (``128 + signal`` if its default action does not end the process)."""
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code)
