"""A fork server ("zygote") that shares the Python start-up of the DVC stages.

Each DVC stage is a fresh ``python stages/<x>.py`` process that spends ~5 s importing torch, transformers,
peft, mlflow, torch-geometric and pandas before it computes anything (reports/benchmark_pipeline.md). The
server imports those once; every stage then runs in a ``fork()`` of it, so it starts with the libraries
already loaded. DVC still runs one command per stage (same deps, params, per-cell re-runs and
``dvc exp run -S``); only the start-up is shared.

    python -m magdi.warm serve --socket DIR/s        # pre-imports, then serves (DIR: 0700, ours)
    MAGDI_WARM_SOCKET=DIR/s dvc repro                 # each stage runs in a fork of the server
    python -m magdi.warm run -- dvc repro             # both: server in a temp dir, stopped afterwards

Client: ``python -m magdi.warm run -- dvc repro`` puts a ``python`` shim first on ``PATH`` (``shim``), so DVC's
``python stages/<x>.py`` calls ``delegate(script)`` before anything else; the stage scripts know nothing of the
server. If ``MAGDI_WARM_SOCKET`` names a live
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

The package, by concern (``delegate`` below imports only ``client`` and ``protocol``: stages import it first):

* ``protocol``: message framing, fd passing (SCM_RIGHTS), the socket and its directory checks, ``ping``;
* ``client``: ``delegate``, signal forwarding to the child, the fall-back to running in-process;
* ``server``: pre-imports, fork hazards, the refusal rules above, fork and reaping;
* ``child``: the forked child becoming the client's process, running the script, ending without teardown;
* ``cli``: ``python -m magdi.warm serve|run`` (``__main__``) and the ``run`` wrapper ``make repro WARM=1`` uses;
* ``shim``: the ``python`` that wrapper puts on ``PATH``: stage scripts go to the server, anything else runs as is.
"""

from magdi.warm.client import delegate, in_server_child
from magdi.warm.protocol import SOCKET_ENV, ping

__all__ = ["SOCKET_ENV", "delegate", "in_server_child", "ping"]
