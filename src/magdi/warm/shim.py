"""``python`` as DVC's stage commands call it under ``make repro WARM=1`` (``magdi.warm.cli.run_command`` puts a
``python`` that runs this module first on ``PATH``): ``python stages/<x>.py ...`` goes to the warm server
(``delegate``); anything else, or a stage the server cannot take, runs as the real interpreter would run it. So the
stage scripts themselves know nothing of the server."""

from __future__ import annotations

import os
import sys

from magdi.warm.client import delegate


def main(argv: list[str]) -> None:
    if argv and argv[0].endswith(".py") and os.path.isfile(argv[0]):
        sys.argv = list(argv)
        delegate(argv[0])  # never returns once the server ran it; returns to fall back
    os.execv(sys.executable, [sys.executable, *argv])


def write_shims(directory: str) -> None:
    """``python`` and ``python3`` in ``directory`` that run this module with the current interpreter."""
    for name in ("python", "python3"):
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"#!/bin/sh\nexec '{sys.executable}' -m magdi.warm.shim \"$@\"\n")
        os.chmod(path, 0o700)


if __name__ == "__main__":
    main(sys.argv[1:])
