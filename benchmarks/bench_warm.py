"""Benchmark: start-up of a stage as a fresh process vs in a fork of the warm server (``magdi.warm``).

Three commands, each timed from launch to exit of the client process, cold (``MAGDI_WARM_SOCKET`` unset:
a fresh interpreter imports everything) and warm (a server with the default pre-import list answers), the
two taking turns in every repeat so that load from other processes on the machine hits both:

- ``report --help``: a real stage script (``stages/report.py``) that only parses its arguments; the
  floor: interpreter start-up, ``magdi.config``, and for warm the socket round trip and the fork;
- ``imports``: the libraries and modules a training/evaluation stage imports before it computes
  (torch, transformers, peft, mlflow, torch-geometric, ``magdi.pipeline``/``student``/``train``/...);
- ``imports + student``: the same, then ``magdi.student.load_student`` (if ``--student`` exists);
- ``imports + student + MLflow run``: the same, then one MLflow run logging one metric to a SQLite store
  (as ``tracking.mlflow_run`` does in every train/evaluate stage; the DB is created before the timing).

The probe scripts are copied into a temp ``stages/`` directory (the server runs only scripts there) and
run with the repository root as working directory. The server's own start (pre-imports, paid once per
``make repro WARM=1``) is timed too.

    .venv/bin/python benchmarks/bench_warm.py          # -> reports/benchmark_warm.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak import machine_line

from magdi import warm
from magdi.warm.cli import wait_ready

ROOT = Path(__file__).resolve().parents[1]

PROBE = '''"""Bench probe: what a heavy stage pays before its compute."""
from magdi.warm import delegate

delegate(__file__)

import sys

from magdi.config import cli_params  # noqa: F401
from magdi.pipeline import stage_evaluate, stage_train  # noqa: F401

import mlflow  # noqa: F401
import peft  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401

from magdi import encoders, evaluate, student, tracking, train  # noqa: F401

if len(sys.argv) > 1:
    student.load_student(sys.argv[1])
if len(sys.argv) > 2:  # what every train/evaluate stage does: one MLflow run in the project's SQLite store
    mlflow.set_tracking_uri(f"sqlite:///{sys.argv[2]}")
    mlflow.set_experiment("bench_warm")
    with mlflow.start_run():
        mlflow.log_metric("x", 1.0)
'''


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def start_server(sock: str, stages: Path, env: dict[str, str]) -> tuple[subprocess.Popen, float, dict]:
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "magdi.warm", "serve", "--socket", sock, "--stages",
                             str(stages)], env=env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    info = wait_ready(sock, proc, 300)
    if info is None:
        raise SystemExit("the warm server did not start")
    return proc, time.perf_counter() - t, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", type=Path, default=ROOT / "models" / "student")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmark_warm.md")
    a = ap.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != warm.SOCKET_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory(prefix="bench-warm-") as d:
        tmp = Path(d)
        stages = tmp / "stages"
        stages.mkdir()
        shutil.copy(ROOT / "stages" / "report.py", stages / "report.py")
        (stages / "probe.py").write_text(PROBE)
        (tmp / "sock").mkdir(mode=0o700)
        sock = str(tmp / "sock" / "s")
        cases = {"report --help": [str(stages / "report.py"), "--help"], "imports": [str(stages / "probe.py")]}
        if a.student.exists():
            cases["imports + student"] = [str(stages / "probe.py"), str(a.student)]
            db = tmp / "mlflow.db"
            cases["imports + student + MLflow run"] = [str(stages / "probe.py"), str(a.student), str(db)]
            timed([sys.executable, *cases["imports + student + MLflow run"]], env)  # creates the DB, untimed
        proc, server_s, info = start_server(sock, stages, env)
        try:
            times: dict[str, dict[str, list[float]]] = {c: {"cold": [], "warm": []} for c in cases}
            for r in range(a.repeats):
                for case, args in cases.items():
                    order = ("cold", "warm") if r % 2 == 0 else ("warm", "cold")
                    for mode in order:
                        e = {**env, warm.SOCKET_ENV: sock} if mode == "warm" else env
                        times[case][mode].append(timed([sys.executable, *args], e))
            after = warm.ping(sock)
        finally:
            proc.terminate()
            proc.wait(60)
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "server_start_s": server_s,
              "preloaded": info["preloaded"], "skipped": info["skipped"], "server_preload_s": info["preload_s"],
              "threads_after_imports": info["threads"], "threads_after_runs": after and after["threads_now"],
              "repeats": a.repeats, "times": times}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(render(result))
    print(a.out.read_text())
    return 0


def render(r: dict) -> str:
    med = statistics.median
    rows = [f"| {case} | {med(t['cold']):.2f} | {med(t['warm']):.2f} | {med(t['cold']) - med(t['warm']):.2f} | "
            f"{' '.join(f'{x:.2f}' for x in t['cold'])} | {' '.join(f'{x:.2f}' for x in t['warm'])} |"
            for case, t in r["times"].items()]
    skipped = ", ".join(r["skipped"]) or "none"
    return "\n".join([
        "# Stage start-up: fresh process vs fork of the warm server", "", machine_line(),
        "",
        f"`benchmarks/bench_warm.py`, {r['date']}, {r['cpus']} CPUs (shared with other jobs: single timings "
        f"are noisy), Python {r['python']}, {r['repeats']} repeats, cold and warm taking turns.",
        "",
        "| command | cold s (median) | warm s (median) | saved s | cold s (all) | warm s (all) |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"The server itself started in {r['server_start_s']:.2f} s ({r['server_preload_s']:.2f} s of pre-imports;"
        f" once per `make repro WARM=1`). Pre-imported: {', '.join(r['preloaded'])}; not installed: {skipped}.",
        f"Native threads of the server after its imports: {r['threads_after_imports']}; after all runs: "
        f"{r['threads_after_runs']} (no pool was started by the parent).",
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
