"""Which float precision runs where: ``auto`` means bf16 only where the device computes it natively.

bf16 halves the training time of the Qwen student and speeds batched decoding on a CPU with AVX512-BF16 or AMX
(reports/benchmark_pipeline.md, benchmark_generation.md), but a CPU without them emulates every bf16 product:
on an AVX2-only AMD EPYC torch's bf16 matmul ran at 0.9 GFLOP/s against 94 in fp32, and a default training
step took 45x longer than in fp32. So the three places that choose a precision (training autocast,
``train.bf16``; the evaluation's decoding, ``student.generation_dtype``; local teachers,
``teachers.agents[].dtype``) default to ``auto``, resolved here once per process from what the machine reports:

- CUDA: bf16 where ``torch.cuda.is_bf16_supported()`` (Ampere and later), else fp32;
- x86-64: bf16 with AVX512-BF16 or AMX (``/proc/cpuinfo`` flags), unless ``ONEDNN_MAX_CPU_ISA`` caps oneDNN
  below them (then torch cannot use them either); fp32 with AVX2 / plain AVX-512;
- aarch64: bf16 where the CPU reports the ``bf16`` feature (Armv8.6 BF16: Graviton 3, Neoverse V1/N2, Apple M2+).

An explicit value is obeyed, with one warning per process when it asks a CPU for bf16 it would emulate. The
resolved dtypes and the CPU class go into every run's metrics (``numerics``), so two runs' numerics compare from
the files alone. Pure functions over a :class:`Capabilities` record: tests fake any machine.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

DtypeName = Literal["float32", "bfloat16", "float16"]
#: what a params key may say: a dtype, or ``auto``
Setting = Literal["auto", "float32", "bfloat16", "float16"]

#: oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) at or above which it uses native bf16 instructions
_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
              "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL")


@dataclass(frozen=True)
class Capabilities:
    """What decides native bf16 on this machine (the inputs of :func:`resolve`; tests build fake ones)."""

    machine: str                                   # platform.machine(): x86_64, AMD64, aarch64, arm64
    cpu_flags: frozenset[str] = field(default_factory=frozenset)  # x86 ``flags`` / arm ``Features`` of /proc/cpuinfo
    cpu_model: str | None = None
    cuda: bool = False
    cuda_bf16: bool = False
    cuda_device: str | None = None
    onednn_max_isa: str | None = None              # ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA as set


@dataclass(frozen=True)
class Resolved:
    """One resolved precision: the dtype name that runs and the one-line reason a user reads."""

    dtype: DtypeName
    reason: str
    setting: str

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"


def _is_x86(machine: str) -> bool:
    return machine.lower() in ("x86_64", "amd64", "i686", "i386", "x86")


def _is_arm(machine: str) -> bool:
    return machine.lower() in ("aarch64", "arm64", "armv8l", "armv9l")


def cpu_class(c: Capabilities) -> str:
    """A short name of the CPU's matrix capability, e.g. ``x86-64 AMX``, ``x86-64 AVX2``, ``aarch64 BF16``:
    what the committed results and benchmark timings are labelled with (compare timings only within one)."""
    f = c.cpu_flags
    if _is_x86(c.machine):
        if "amx_bf16" in f:
            name = "x86-64 AMX"
        elif "avx512_bf16" in f:
            name = "x86-64 AVX512-BF16"
        elif "avx512f" in f:
            name = "x86-64 AVX-512"
        elif "avx2" in f:
            name = "x86-64 AVX2"
        else:
            name = "x86-64"
        return f"{name} (oneDNN capped at {c.onednn_max_isa})" if c.onednn_max_isa else name
    if _is_arm(c.machine):
        return "aarch64 BF16" if "bf16" in f else "aarch64"
    return c.machine or "unknown"


def _onednn_allows_bf16(isa: str | None) -> bool:
    return isa is None or isa.strip().upper() in _BF16_ISAS


def native_bf16(c: Capabilities, device: str = "cpu") -> tuple[bool, str]:
    """(whether ``device`` computes bf16 products natively here, why) -- the rule of the module docstring."""
    if device.startswith("cuda"):
        if not c.cuda:
            return False, "no CUDA device"
        name = c.cuda_device or "the GPU"
        return (True, f"{name} supports bf16") if c.cuda_bf16 else (False, f"{name} has no bf16 support")
    cls = cpu_class(c)
    if _is_x86(c.machine):
        has = bool({"amx_bf16", "avx512_bf16"} & c.cpu_flags)
        if has and not _onednn_allows_bf16(c.onednn_max_isa):
            return False, f"CPU is {cls}: ONEDNN_MAX_CPU_ISA keeps oneDNN off its bf16 instructions"
        if has:
            return True, f"CPU has {cls.removeprefix('x86-64 ')}"
        return False, f"CPU has {cls.removeprefix('x86-64 ') if cls != 'x86-64' else 'no AVX2'}, no native bf16"
    if _is_arm(c.machine):
        return ("bf16" in c.cpu_flags,
                "CPU has the Arm BF16 extension" if "bf16" in c.cpu_flags else "aarch64 CPU without the BF16 extension")
    return False, f"unknown CPU architecture {c.machine!r}"


def resolve(setting: str | bool | None, c: Capabilities, device: str = "cpu", what: str = "train") -> Resolved:
    """``setting`` (``auto``, a dtype name, or the training switch's ``True``/``False``) -> the dtype that runs.

    ``auto``: bf16 where :func:`native_bf16`, else fp32. An explicit bf16 where the device would emulate it runs
    as asked, with one warning per (what, reason) in this process: slow, but the user asked for it."""
    if setting is True:
        setting = "bfloat16"
    elif setting is False or setting is None:
        setting = "float32"
    native, why = native_bf16(c, device)
    if setting == "auto":
        dtype: DtypeName = "bfloat16" if native else "float32"
        return Resolved(dtype, f"{dtype}: {why}", "auto")
    if setting not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"precision setting must be auto, float32, bfloat16 or float16, got {setting!r}")
    if setting == "bfloat16" and not native:
        _warn_once(what, why)
    return Resolved(setting, f"{setting}: set explicitly ({why})", str(setting))  # type: ignore[arg-type]


@functools.cache
def _warn_once(what: str, why: str) -> None:
    warnings.warn(f"{what}: bfloat16 was set explicitly, but {why}: it runs, emulated, much slower than float32 "
                  "(set it to auto to let the machine decide)", RuntimeWarning, stacklevel=3)


def _cpuinfo(path: Path) -> tuple[frozenset[str], str | None]:
    try:
        first = path.read_text(errors="replace").split("\n\n", 1)[0]
    except OSError:
        return frozenset(), None
    fields = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in first.splitlines() if ":" in ln)}
    flags = fields.get("flags") or fields.get("Features") or ""
    return frozenset(flags.split()), fields.get("model name") or fields.get("CPU part")


def _torch_flags() -> frozenset[str]:
    """Where /proc/cpuinfo is missing (macOS, Windows): torch's own cpuinfo probes, x86 only."""
    try:
        import torch

        cpu = torch.cpu
        return frozenset(n for n, probe in (("avx512_bf16", "_is_avx512_bf16_supported"),
                                            ("amx_bf16", "_is_amx_tile_supported"),
                                            ("avx2", "_is_avx2_supported"), ("avx512f", "_is_avx512_supported"))
                         if getattr(cpu, probe, lambda: False)())
    except Exception:  # noqa: BLE001 -- a probe that fails means "not known to be there"
        return frozenset()


def detect(cpuinfo: Path = Path("/proc/cpuinfo"), with_cuda: bool = True) -> Capabilities:
    """This machine's :class:`Capabilities` (cached per process by :func:`capabilities`)."""
    flags, model = _cpuinfo(cpuinfo)
    machine = platform.machine()
    if not flags and _is_x86(machine):
        flags = _torch_flags()
    cuda = cuda_bf16 = False
    device = None
    if with_cuda:
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            cuda_bf16 = bool(torch.cuda.is_bf16_supported())
            device = torch.cuda.get_device_name()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return Capabilities(machine, flags, model, cuda, cuda_bf16, device, isa)


@functools.lru_cache(maxsize=1)
def capabilities() -> Capabilities:
    """This machine, probed once per process: the precision is resolved once, at start-up."""
    return detect()


def train_device() -> str:
    """The device a training run lands on (accelerate's choice: CUDA when there is one, unless told CPU)."""
    import torch

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return "cuda" if torch.cuda.is_available() and not use_cpu else "cpu"


def generation_device() -> str:
    """The device the local generators run on (``magdi.student``: the CPU unless a model is moved)."""
    return "cpu"


def summary(train: str | bool, generate: str | None, teachers: dict[str, str | None],
            c: Capabilities | None = None) -> dict:
    """What ``auto`` and explicit settings resolve to here: ``{"train", "generate", "teachers"}`` dtype names,
    the per-agent teacher dtypes, the reasons and the CPU class (``python -m magdi precision --json``)."""
    c = c or capabilities()
    tr = resolve(train, c, train_device(), "train.bf16")
    gen = resolve(generate or "auto", c, generation_device(), "student.generation_dtype")
    per_agent = {a: resolve(s or gen.setting, c, generation_device(), f"teachers.agents.{a}.dtype")
                 for a, s in teachers.items()}
    teacher_dtypes = sorted({r.dtype for r in per_agent.values()})
    return {"train": tr.dtype, "generate": gen.dtype,
            # one dtype name when the local teachers agree (always, unless set apart per agent); else all of them
            "teachers": ",".join(teacher_dtypes) if teacher_dtypes else gen.dtype,
            "teachers_by_agent": {a: r.dtype for a, r in per_agent.items()},
            "reasons": {"train": tr.reason, "generate": gen.reason,
                        **{f"teacher {a}": r.reason for a, r in per_agent.items()}},
            "cpu_class": cpu_class(c), "capabilities": {**asdict(c), "cpu_flags": sorted(
                f for f in c.cpu_flags if f.startswith(("amx", "avx512_bf16", "avx512f", "avx2", "bf16")))}}
