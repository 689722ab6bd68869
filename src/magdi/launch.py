"""Who a process is in a multi-process launch (``accelerate launch``, torchrun, an MPI launcher), in one place.

Only training shards its work across processes (DDP, ``magdi.train.train``); every other stage (download,
prepare_student, build_mags, the evaluations, report) refuses a multi-process launch, because each rank would repeat all of its work (every teacher call, every test question)
and write the same files. Inside training, one definition of "the main process" decides who writes: the
stage's adapter, digest and metrics and the loop's checkpoints both ask accelerate's ``PartialState``.
"""

from __future__ import annotations

import os

# The launcher variables accelerate reads for the number of processes, in its order: torchrun / accelerate launch,
# then Intel MPI / MPICH, Open MPI and MVAPICH (accelerate.utils.environment.get_cpu_distributed_information).
WORLD_SIZE_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes() -> int:
    """How many processes the launcher started (1 for a plain ``python`` or ``dvc repro``), read from the
    environment only: a stage that refuses a multi-process launch must not start a process group to find out."""
    for key in WORLD_SIZE_ENV:
        value = int(os.environ.get(key, -1))
        if value >= 0:  # accelerate's rule (get_int_from_env): the first non-negative value wins
            return value
    return 1


def single_process(stage: str) -> None:
    """Refuse a multi-process launch of a stage that is not training (module docstring says why)."""
    n = launched_processes()
    if n > 1:
        raise RuntimeError(f"{stage} runs as one process, not {n} (world size {n}): run it with `dvc repro` or "
                           f"`python stages/...`; only stages/train.py supports `accelerate launch`")


def is_main_process() -> bool:
    """Whether this process writes a training run's results: rank 0 of a DDP launch, or a plain process.

    accelerate's own answer (``PartialState``, the state the training loop's ``Accelerator`` shares, so the
    stage's writes and the loop's checkpoints cannot disagree), including MPI launchers that set no ``RANK``.
    A launch of N processes that accelerate treats as N independent single processes (torchrun on a machine
    without GPUs and without ``ACCELERATE_USE_CPU=1``) would train N full copies that all write the same files: refused, with
    what to launch instead.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as AcceleratorState reads it
    n = launched_processes()
    if state.num_processes != n:
        import torch

        how = ("launch with `accelerate launch --config_file configs/accelerate_ddp.yaml` (or torchrun)"
               if torch.cuda.is_available() else
               f"for DDP on CPUs set ACCELERATE_USE_CPU=1 (`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node {n} "
               f"stages/train.py ...`)")
        raise RuntimeError(f"the launcher started {n} processes but accelerate runs them as {state.num_processes} "
                           f"({state.distributed_type}): {how}")
    return state.is_main_process
