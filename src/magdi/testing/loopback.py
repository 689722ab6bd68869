"""Run a stdlib HTTP server on 127.0.0.1 in a background thread for the duration of a test."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from typing import TypeVar

S = TypeVar("S", bound=ThreadingHTTPServer)


@contextmanager
def running(srv: S, poll_interval: float = 0.02) -> Iterator[S]:
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": poll_interval}, daemon=True)
    th.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        th.join(timeout=5)
