"""What client and server say to each other, and the socket they say it on.

A request is one byte (``RUN`` or ``PING``) carrying the client's fds 0/1/2 as SCM_RIGHTS ancillary data,
then length-prefixed JSON messages (4-byte big-endian length, at most ``MAX_MSG`` bytes, an object each).
The socket lives in a directory only its owner may enter and is itself 0600; the server also checks the
peer's uid (SO_PEERCRED). Both sides describe their interpreter with ``interpreter()``: a child inherits
the server's, so a client whose description differs must run as an ordinary process.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import sys
from pathlib import Path

SOCKET_ENV = "MAGDI_WARM_SOCKET"
RUN, PING = b"R", b"P"
MAX_MSG = 1 << 24
STDIO = [0, 1, 2]


def send_msg(sock: socket.socket, obj: dict) -> None:
    """One JSON object, length-prefixed."""
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


def recv_msg(sock: socket.socket) -> dict:
    """The next JSON object (EOFError: the peer closed; ValueError: not a message of ours)."""
    (n,) = struct.unpack("!I", _recv_exact(sock, 4))
    if n > MAX_MSG:
        raise ValueError(f"message of {n} bytes")
    obj = json.loads(_recv_exact(sock, n))
    if not isinstance(obj, dict):
        raise ValueError("message is not an object")
    return obj


def send_run_header(sock: socket.socket) -> None:
    """``RUN`` with this process's fds 0/1/2 attached (the child takes them over)."""
    socket.send_fds(sock, [RUN], STDIO)


def recv_header(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The request kind and the fds that came with it (the caller closes them)."""
    kind, fds, _, _ = socket.recv_fds(conn, 1, len(STDIO))
    return kind, fds


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end (SO_PEERCRED: pid, uid, gid)."""
    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]


def connect(path: str, timeout: float | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def ping(path: str, timeout: float = 2.0) -> dict | None:
    """The server's description if one answers at ``path``, else None."""
    try:
        with connect(path, timeout) as sock:
            sock.sendall(PING)
            return recv_msg(sock)
    except (OSError, EOFError, ValueError):
        return None


def interpreter() -> list:
    """Interpreter, venv and command-line flags (-u, -O, -W, -X ...): a child inherits the server's."""
    return json.loads(json.dumps([os.path.realpath(sys.executable), sys.prefix, list(sys.flags),
                                  sys.warnoptions, sys._xoptions]))


def check_private_dir(d: Path) -> None:
    st = d.stat()
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise SystemExit(f"magdi.warm: {d} must be owned by uid {os.getuid()} and closed to others (chmod 700)")


def listen(path: Path) -> socket.socket:
    """A listening socket at ``path`` (0600, in a private directory), replacing a stale one left there."""
    check_private_dir(path.parent)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise SystemExit(f"magdi.warm: {path} exists and is not a socket")
        if ping(str(path)) is not None:
            raise SystemExit(f"magdi.warm: a server already answers at {path}")
        path.unlink()  # stale
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        lst.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    lst.listen(64)
    return lst
