"""Build helper for the CUDA extension ``vllm_duo._C`` (sources in ``csrc/``).

Used by setup.py::

    ext_modules=cuda_extensions(), cmdclass=cmdclass()

It builds only where torch is a CUDA build (``torch.version.cuda``), ``nvcc`` exists and
``VLLM_DUO_SKIP_CUDA_BUILD`` is not "1"; otherwise it logs why and returns nothing, so a
CPU install stays pure Python. Self-contained (setup.py may load it by path, before the
package is importable); never imports vLLM.

``python -m vllm_duo._build_cuda`` (or ``python vllm_duo/_build_cuda.py``) builds the
extension in place without going through setup.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

log = logging.getLogger("vllm_duo.build")

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
EXTENSION = "vllm_duo._C"
SKIP_ENV = "VLLM_DUO_SKIP_CUDA_BUILD"

CUDA_SOURCES = ("sink_window_decode.cu",)
CXX_SOURCES = ("torch_binding.cpp",)

# Real machine code for Ampere (A100) and Hopper (H100/H200), PTX for newer GPUs.
GENCODE_FLAGS = (
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
)
# torch's BuildExtension adds its COMMON_NVCC_FLAGS (no half operators / conversions),
# which the kernels are written for; --threads compiles the gencode targets in parallel.
NVCC_FLAGS = ("-O3", "--threads=4")
CXX_FLAGS = ("-O3",)


def skip_reason() -> str | None:
    """Why the extension cannot or should not be built here, or None."""
    if os.environ.get(SKIP_ENV, "") == "1":
        return f"{SKIP_ENV}=1"
    try:
        import torch
    except ImportError:
        return (
            "torch is not importable in the build environment "
            "(use pip install --no-build-isolation to build the CUDA extension)"
        )
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    from torch.utils import cpp_extension

    nvcc = None
    if cpp_extension.CUDA_HOME:
        candidate = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
        nvcc = str(candidate) if candidate.exists() else None
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    for name in (*CUDA_SOURCES, *CXX_SOURCES):
        if not (CSRC / name).exists():
            return f"source {CSRC / name} is missing (sdist without csrc/?)"
    return None


def _source(name: str) -> str:
    path = CSRC / name
    try:  # setuptools prefers paths relative to the project root
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def cuda_extensions() -> list:
    """[CUDAExtension('vllm_duo._C')] when it can be built here, else [] (reason logged)."""
    reason = skip_reason()
    if reason is not None:
        # Unconfigured logging still prints warnings (logging.lastResort), so pip shows it.
        log.warning("vllm-duo: not building the CUDA extension %s: %s", EXTENSION, reason)
        return []
    from torch.utils.cpp_extension import CUDAExtension

    return [
        CUDAExtension(
            EXTENSION,
            sources=[_source(n) for n in (*CXX_SOURCES, *CUDA_SOURCES)],
            include_dirs=[str(CSRC)],
            define_macros=[("DUO_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": list(CXX_FLAGS),
                "nvcc": [*NVCC_FLAGS, *GENCODE_FLAGS],
            },
        )
    ]


def cmdclass() -> dict:
    """{'build_ext': torch's BuildExtension} when the extension is built, else {}."""
    if skip_reason() is not None:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension}


def build_inplace() -> int:
    """Builds vllm_duo/_C*.so next to the sources (like ``setup.py build_ext --inplace``)."""
    exts = cuda_extensions()
    if not exts:
        return 1
    from setuptools import setup

    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        setup(
            name="vllm-duo-cuda-ext",
            ext_modules=cuda_extensions(),  # paths relative to ROOT now
            cmdclass=cmdclass(),
            script_args=["build_ext", "--inplace"],
        )
    finally:
        os.chdir(cwd)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(build_inplace())
