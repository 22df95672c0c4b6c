"""Kernel families of the DUO backend: one per device kind, one picked per process.

- :mod:`vllm_duo.families.cpu`: the C++ paged attention (or vLLM's CPU kernel) + the C++ or
  torch sink+window.
- :mod:`vllm_duo.families.gpu`: FlashAttention / Triton paged attention + the csrc CUDA or
  Triton sink+window kernels; also runs on CPU under Triton's interpreter (tests).

``VLLM_DUO_KERNELS`` chooses: ``auto`` and ``native`` take the platform's own family,
``triton`` takes the GPU family with Triton kernels only.
"""

from __future__ import annotations

import torch

from vllm_duo.families.base import GroupStep, KernelFamily, KVScales

__all__ = ["GroupStep", "KVScales", "KernelFamily", "family_name", "make_family"]


def family_name(choice: str, device_type: str) -> str:
    """``cpu`` or ``gpu``: which family serves ``VLLM_DUO_KERNELS=choice`` on this device."""
    return "cpu" if device_type == "cpu" and choice != "triton" else "gpu"


def make_family(
    choice: str,
    device_type: str,
    *,
    scale: float,
    sink: int,
    recent: int,
    kv_cache_dtype: str,
    dtype: torch.dtype,
    head_size: int,
    block_size: int | None = None,
    any_streaming: bool = True,
) -> KernelFamily:
    """The kernel family for this process; raises DuoConfigError with the reason if none fits.

    ``any_streaming``: whether the model has streaming heads at all; without them the CPU
    family runs vLLM's own kernel, so sparsity 0 reproduces the stock backend bit for bit.
    """
    if family_name(choice, device_type) == "cpu":
        from vllm_duo.families.cpu import CpuKernels

        return CpuKernels(
            scale=scale, sink=sink, recent=recent, kv_cache_dtype=kv_cache_dtype, dtype=dtype,
            head_size=head_size, require_native=choice == "native",
            stock_retrieval_kernel=not any_streaming,
        )  # fmt: skip
    from vllm_duo.families.gpu import GpuKernels

    return GpuKernels(
        choice=choice, device_type=device_type, scale=scale, sink=sink, recent=recent,
        kv_cache_dtype=kv_cache_dtype, dtype=dtype, head_size=head_size,
        block_size=block_size,
    )  # fmt: skip
