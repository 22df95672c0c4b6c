"""Build helper for the CPU extension ``vllm_duo._cpu_C`` (sources in ``csrc/cpu/``).

``python -m vllm_duo._build_cpu`` builds it in place (``vllm_duo/_cpu_C*.so``) against the
torch of the running interpreter; ``make venv`` does that after installing vllm-duo, since
pip's isolated build environment has no torch. setup.py also adds it where torch is
importable at build time (``pip install --no-build-isolation``). Without the extension the
CPU kernel family falls back to the pure-torch sink+window path. Never imports vLLM.

The code is compiled for the build machine's instruction set (``-march=native``: the
extension is built where it runs); ``VLLM_DUO_CPU_ARCH_FLAGS`` replaces that flag, e.g.
with ``-mavx2 -mfma`` for a venv that must also run on older CPUs.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

log = logging.getLogger("vllm_duo.build")

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc" / "cpu"
EXTENSION = "vllm_duo._cpu_C"
SOURCES = ("sink_window_cpu.cpp", "paged_attention_cpu.cpp")
ARCH_ENV = "VLLM_DUO_CPU_ARCH_FLAGS"
SKIP_ENV = "VLLM_DUO_SKIP_CPU_BUILD"


def skip_reason() -> str | None:
    """Why the extension cannot be built here, or None."""
    if os.environ.get(SKIP_ENV, "") == "1":
        return f"{SKIP_ENV}=1"
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not importable in the build environment"
    for name in SOURCES:
        if not (CSRC / name).exists():
            return f"source {CSRC / name} is missing (sdist without csrc/?)"
    return None


def _flags() -> list[str]:
    arch = shlex.split(os.environ.get(ARCH_ENV, "-march=native"))
    return ["-O3", *arch, "-fopenmp", "-fno-math-errno", "-std=c++20"]


def cpu_extensions() -> list:
    """[CppExtension('vllm_duo._cpu_C')] when torch is importable, else [] (reason logged)."""
    reason = skip_reason()
    if reason is not None:
        log.warning("vllm-duo: not building the CPU extension %s: %s", EXTENSION, reason)
        return []
    from torch.utils.cpp_extension import CppExtension

    sources = []
    for name in SOURCES:
        path = CSRC / name
        try:  # setuptools prefers paths relative to the project root
            sources.append(str(path.relative_to(Path.cwd())))
        except ValueError:
            sources.append(str(path))
    return [
        CppExtension(
            EXTENSION,
            sources=sources,
            include_dirs=[str(CSRC)],
            extra_compile_args=_flags(),
            extra_link_args=["-fopenmp"],
        )
    ]


def cmdclass() -> dict:
    """{'build_ext': torch's BuildExtension} when the extension is built, else {}."""
    if skip_reason() is not None:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension}


def build_inplace() -> int:
    """Builds vllm_duo/_cpu_C*.so next to the sources (``setup.py build_ext --inplace``)."""
    if skip_reason() is not None:
        log.error("vllm-duo: cannot build %s: %s", EXTENSION, skip_reason())
        return 1
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension

    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        setup(
            name="vllm-duo-cpu-ext",
            ext_modules=cpu_extensions(),
            cmdclass={"build_ext": BuildExtension},
            script_args=["build_ext", "--inplace", "-q"],
        )
    finally:
        os.chdir(cwd)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(build_inplace())
