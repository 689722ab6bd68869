"""The forked child: become the client's process, run its stage script, end like an interpreter would."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import runpy
import signal
import sys
import threading
from dataclasses import dataclass

from magdi.warm.client import exit_with


@dataclass
class Job:
    """What the child needs from the accepted request."""

    fds: list[int]
    script: str
    argv: list[str]
    cwd: str
    env: dict[str, str]
    umask: int


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
            tb = tb.tb_next  # drop the frames of this package and runpy
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
    exit_with(code)
