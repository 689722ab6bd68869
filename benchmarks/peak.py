"""The machine's measured matmul peak (fp32 and bf16), the yardstick for achieved FLOP/s in the benchmarks.

FLOPs of an ``n × n`` by ``n × n`` matmul are counted as ``2 n³`` (one multiply and one add per term).
The peak is the best of a few repeats, the dtypes taking turns so that load from other processes hits both.
"""

from __future__ import annotations

import time

import torch


def matmul_peak(n: int = 2048, repeats: int = 3, threads: int | None = None) -> dict[str, float]:
    """Best GFLOP/s of an ``n × n`` matmul in fp32 and in bf16 with ``threads`` torch threads."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        mats = {dt: (torch.randn(n, n, generator=g).to(dt), torch.randn(n, n, generator=g).to(dt))
                for dt in (torch.float32, torch.bfloat16)}
        best = {dt: float("inf") for dt in mats}
        for a, b in mats.values():  # warm-up (allocations, kernel selection)
            a @ b
        for _ in range(repeats):
            for dt, (a, b) in mats.items():
                t0 = time.perf_counter()
                a @ b
                best[dt] = min(best[dt], time.perf_counter() - t0)
        flops = 2 * n**3
        return {"float32": flops / best[torch.float32] / 1e9, "bfloat16": flops / best[torch.bfloat16] / 1e9,
                "n": n, "threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(old)


def cpu_flags() -> dict[str, bool]:
    """Whether the CPU advertises the AVX-512 BF16 / AMX instructions that make bf16 matmuls fast."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return {k: k in flags for k in ("avx512f", "avx512_bf16", "amx_bf16")}


def machine_line() -> str:
    """The line every benchmark report carries under its title: the CPU class its timings belong to."""
    from magdi.precision import capabilities, cpu_class

    return (f"CPU class: **{cpu_class(capabilities())}** (`python -m magdi precision`); compare timings within one "
            "class only.")
