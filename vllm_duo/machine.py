"""The machine a measurement ran on, in one line: CPU model, core count and vector flags.

Results on CPUs differ by instruction set (vLLM's CPU attention has an AMX path and an
AVX-512 path; without AVX-512 its bf16 matrix products have no fast path), so every
benchmark, evaluation and calibration record names the flags. Pure: never imports vLLM.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The instruction sets that decide which CPU kernels run, most capable first.
CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """E.g. 'AMD EPYC 9B14, 2 CPUs, flags avx512_bf16 avx512f avx2'."""
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    present = [flag for flag in CPU_FLAGS if flag in flags] or ["none of " + "/".join(CPU_FLAGS)]
    return f"{model}, {os.cpu_count()} CPUs, flags {' '.join(present)}"
