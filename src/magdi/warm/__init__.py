"""A fork server ("zygote") that shares the Python start-up of the DVC stages (moving to a package)."""

from magdi.warm.server import SOCKET_ENV, delegate, in_server_child, main, ping, wait_ready

__all__ = ["SOCKET_ENV", "delegate", "in_server_child", "main", "ping", "wait_ready"]
