"""Every vLLM internal that vllm-duo touches, imported in one place.

vLLM's internal APIs move between releases. Keeping the imports here means a
vLLM upgrade breaks one module, loudly, instead of many quietly. Only the
vLLM-facing modules (``backend``, ``companion``, ``model_plan``, ``patches``,
``registration``) import from here; the algorithm modules never import vLLM.
"""

from __future__ import annotations

import vllm.platforms
from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import (
    PoolerConfig,
    VllmConfig,
    get_current_vllm_config,
    get_layers_from_vllm_config,
)
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.models.utils import extract_layer_index
from vllm.platforms import current_platform
from vllm.platforms.cpu import CpuPlatform
from vllm.platforms.interface import Platform
from vllm.utils.math_utils import cdiv
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa as cpu_attn_isa
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.attention.selector import AttentionSelectorConfig
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import (
    KVCacheBlock,
    get_max_concurrency_for_kv_cache_config,
    resolve_block_hashes,
)
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheLayout,
    KVCacheSpec,
    SlidingWindowSpec,
)
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

__all__ = [
    "Attention",
    "AttentionBackend",
    "AttentionBackendEnum",
    "AttentionCGSupport",
    "AttentionImpl",
    "AttentionLayerBase",
    "AttentionMetadataBuilder",
    "AttentionSelectorConfig",
    "AttentionType",
    "BlockPool",
    "CPUAttentionBackend",
    "CPUAttentionMetadata",
    "CPUAttentionMetadataBuilder",
    "CommonAttentionMetadata",
    "CpuPlatform",
    "FullAttentionSpec",
    "KVCacheBlock",
    "KVCacheLayout",
    "KVCacheSpec",
    "KVCacheSpecRegistry",
    "MultipleOf",
    "PoolerConfig",
    "SlidingWindowManager",
    "SlidingWindowSpec",
    "VllmConfig",
    "cdiv",
    "cpu_attn_isa",
    "current_platform",
    "envs",
    "extract_layer_index",
    "flash_attn_varlen",
    "get_current_vllm_config",
    "get_forward_context",
    "get_layers_from_vllm_config",
    "get_max_concurrency_for_kv_cache_config",
    "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_world_size",
    "init_logger",
    "ops",
    "register_backend",
    "resolve_block_hashes",
    "running_platform",
    "triton_unified_attention",
]


def running_platform() -> Platform:
    """vLLM's current platform, looked up at each call.

    vLLM resolves ``current_platform`` once per process, so in production this equals
    the ``current_platform`` imported above. Looking it up late lets the CUDA selector
    test switch vLLM to its CUDA platform (``vllm.platforms.current_platform = ...``)
    after the CPU build of vLLM has imported everything vllm-duo needs.
    """
    return vllm.platforms.current_platform


def flash_attn_varlen():
    """(vLLM's FlashAttention varlen function, its version picker), or None where vLLM was
    built without it (CPU builds) or no CUDA device is visible."""
    import torch

    try:
        from vllm.v1.attention.backends import fa_utils
    except ImportError:
        return None
    if not torch.cuda.is_available() or not fa_utils.is_flash_attn_varlen_func_available():
        return None
    return fa_utils.flash_attn_varlen_func, fa_utils.get_flash_attn_version


def triton_unified_attention():
    """vLLM's Triton unified paged attention, or None where vLLM runs without Triton (its
    CPU build disables Triton) or no CUDA device is visible."""
    import torch

    try:
        from vllm.triton_utils import HAS_TRITON
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    except ImportError:
        return None
    return unified_attention if HAS_TRITON and torch.cuda.is_available() else None
