"""The DUO attention backend for vLLM.

Four parts, in vLLM's order: metadata, metadata builder, backend class with its declared
capabilities, and the impl whose ``forward`` splits a layer's KV heads into retrieval heads
(the whole context, through a paged-attention kernel) and streaming heads (sink + recent
window, O(S+W) per query).

Each KV head of a DUO layer owns a one-head paged cache held by a
:class:`vllm_duo.companion.DuoHeadCache`; ``forward`` reads and writes those, never the
``kv_cache`` argument vLLM hands in. Heads whose caches sit side by side in one cache group
are served together (:mod:`vllm_duo.head_layout`), by a kernel family chosen per device
(:mod:`vllm_duo.families`): one write and one attention call per layer, cache group and
head kind, not one per head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from vllm_duo._vllm import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    CPUAttentionBackend,
    CPUAttentionMetadataBuilder,
    KVCacheLayout,
    KVCacheSpec,
    MultipleOf,
    VllmConfig,
    get_forward_context,
    running_platform,
)
from vllm_duo.errors import DuoConfigError
from vllm_duo.families import KernelFamily, family_name
from vllm_duo.head_layout import HeadCacheRef, HeadRun, plan_runs
from vllm_duo.settings import KV_CACHE_DTYPES, kernels_from_env
from vllm_duo.streaming_cache import DuoStreamingSpec

BACKEND_NAME = "DUO"

# What the GPU kernel family serves (FlashAttention / Triton paged attention, the csrc and
# Triton sink+window kernels): all of them take fp16/bf16, the Triton ones fp32 too (then
# FlashAttention is skipped), head sizes up to 256, blocks of a multiple of 16 tokens.
_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_GPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)
_GPU_BLOCK_SIZE_MULTIPLE = 16
_GPU_MIN_CAPABILITY = (8, 0)
# KV cache dtypes: on CPU those of vLLM's CPU backend (its kernel serves the retrieval heads,
# and the streaming kernels quantise and read every fp8 format it writes); the GPU family's
# Triton and CUDA sink+window kernels read fp8 e4m3 only.
_CPU_KV_CACHE_DTYPES = KV_CACHE_DTYPES
_GPU_KV_CACHE_DTYPES = tuple(d for d in KV_CACHE_DTYPES if d != "fp8_e5m2")


def _device_type() -> str:
    return running_platform().device_type


def _block_sizes(backend: type[AttentionBackend]) -> str:
    sizes = backend.get_supported_kernel_block_sizes()
    return " or ".join(
        f"a multiple of {s.base}" if isinstance(s, MultipleOf) else str(s) for s in sizes
    )


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


# --------------------------------------------------------------------------------------
# 1. Metadata
# --------------------------------------------------------------------------------------
@dataclass
class DuoMetadata:
    """Per-step metadata of one KV cache group of DUO head caches.

    Satisfies :class:`vllm_duo.families.GroupStep`: everything a kernel family reads.
    """

    num_actual_tokens: int
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    """[num_reqs + 1] int32 token offsets, on the device."""
    query_start_loc_host: list[int]
    seq_lens: torch.Tensor
    """[num_reqs] int32 context lengths including this step's tokens, on the device."""
    seq_lens_host: list[int] | None
    """Host copy where it costs no device sync (CPU), else vLLM's host one when exact."""
    block_table: torch.Tensor
    """[num_reqs, max_blocks] block ids of this group's caches."""
    slot_mapping: torch.Tensor
    """[num_tokens] cache slot of each token (-1: padding, write nothing)."""
    num_decodes: int
    """Leading requests with one query (the GPU family has vLLM put decodes first)."""
    num_decode_tokens: int
    isa: str | None
    """Instruction set of vLLM's CPU kernel for this group (CPU family), else None."""
    step_cache: dict[str, Any] = field(default_factory=dict)
    """What every layer of the group would otherwise recompute this step (plans, indices)."""


# --------------------------------------------------------------------------------------
# 2. Metadata builder
# --------------------------------------------------------------------------------------
class DuoMetadataBuilder(AttentionMetadataBuilder[DuoMetadata]):
    """One step's metadata per cache group, all host work of the step done here.

    Piecewise CUDA graphs work (attention runs eagerly between the captured pieces); full
    graphs would need persistent metadata buffers and shapes that do not depend on the
    step's mix of decodes and prefills (see docs/design.md), so none are declared.
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(
        self,
        kv_cache_spec: KVCacheSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._host_is_device = device.type == "cpu"
        self._isa: str | None = None
        if family_name(kernels_from_env(), device.type) == "cpu":
            # vLLM's CPU kernel packs retrieval caches for an ISA chosen by its builder.
            if not isinstance(kv_cache_spec, DuoStreamingSpec):
                cpu = CPUAttentionMetadataBuilder(kv_cache_spec, layer_names, vllm_config, device)
                self._isa = cpu.isa
        else:
            # Decode rows first: the GPU family runs them as one decode-kernel launch.
            self.reorder_batch_threshold = 1

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> DuoMetadata:
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        query_start = cm.query_start_loc_cpu[: num_reqs + 1].tolist()
        if self._host_is_device:
            seq_lens_host: list[int] | None = cm.seq_lens[:num_reqs].tolist()
        elif cm.seq_lens_cpu_upper_bound is not None:
            seq_lens_host = cm.seq_lens_cpu_upper_bound[:num_reqs].tolist()
        else:
            seq_lens_host = None
        num_decodes = 0
        while (
            num_decodes < num_reqs and query_start[num_decodes + 1] == query_start[num_decodes] + 1
        ):
            num_decodes += 1
        return DuoMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            num_reqs=num_reqs,
            max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len,
            query_start_loc=cm.query_start_loc[: num_reqs + 1],
            query_start_loc_host=query_start,
            seq_lens=cm.seq_lens[:num_reqs],
            seq_lens_host=seq_lens_host,
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
            num_decodes=num_decodes,
            num_decode_tokens=query_start[num_decodes],
            isa=self._isa,
        )


# --------------------------------------------------------------------------------------
# 3. Backend
# --------------------------------------------------------------------------------------
class DuoAttentionBackend(AttentionBackend):
    """DuoAttention: full-context retrieval heads + sink/window streaming heads.

    The capabilities are those of the kernel family that serves the platform: vLLM's CPU
    kernel on CPU (the CPU platform is let through by a patch, see the ledger), the GPU
    family elsewhere, which vLLM's CUDA selector checks with ``validate_configuration``.
    """

    # forward() writes K/V itself: each head goes to its own cache, in the layout
    # of the kernel that reads it.
    forward_includes_kv_cache_update: bool = True

    supported_dtypes: ClassVar[list[torch.dtype]] = list(_GPU_DTYPES)
    # Every dtype some family serves; supports_kv_cache_dtype answers per platform.
    supported_kv_cache_dtypes: ClassVar[list] = list(_CPU_KV_CACHE_DTYPES)

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[DuoAttentionImpl]:
        return DuoAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[DuoMetadataBuilder]:
        return DuoMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        if _device_type() == "cpu":
            return CPUAttentionBackend.get_supported_kernel_block_sizes(kv_cache_spec)
        return [MultipleOf(_GPU_BLOCK_SIZE_MULTIPLE)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        if _device_type() == "cpu":
            return CPUAttentionBackend.get_supported_head_sizes()
        return list(_GPU_HEAD_SIZES)

    @classmethod
    def supports_dtype(cls, dtype: torch.dtype) -> bool:
        if _device_type() == "cpu":
            return dtype in CPUAttentionBackend.supported_dtypes
        return dtype in cls.supported_dtypes

    @classmethod
    def kv_cache_dtypes(cls) -> list[str]:
        """The ``--kv-cache-dtype`` values DUO serves on this platform."""
        if _device_type() == "cpu":
            return [
                d
                for d in _CPU_KV_CACHE_DTYPES
                if d in CPUAttentionBackend.supported_kv_cache_dtypes
            ]
        return list(_GPU_KV_CACHE_DTYPES)

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        return kv_cache_dtype is None or kv_cache_dtype in cls.kv_cache_dtypes()

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return capability is not None and tuple(capability) >= _GPU_MIN_CAPABILITY

    @classmethod
    def validate_configuration(
        cls,
        head_size: int,
        dtype: torch.dtype,
        kv_cache_dtype: str | None,
        block_size: int | None,
        *args: Any,
        **kwargs: Any,
    ) -> list[str]:
        """vLLM's checks of the declared capabilities, each reason saying what DUO serves.

        vLLM's CUDA selector puts these reasons in its "Selected backend ... is not valid
        for this configuration" error; its own are terse ("head_size not supported"), and
        DUO is shown there as the CUSTOM slot it occupies, so each reason names DUO, the
        value and what is allowed.
        """
        reasons = super().validate_configuration(
            head_size, dtype, kv_cache_dtype, block_size, *args, **kwargs
        )
        capability = kwargs.get("device_capability")
        details = {
            "head_size not supported": (
                f"DUO serves head sizes {cls.get_supported_head_sizes()}, got {head_size}"
            ),
            "dtype not supported": (
                f"DUO serves {_dtype_names(cls._platform_dtypes())}, got "
                f"{str(dtype).removeprefix('torch.')}"
            ),
            "kv_cache_dtype not supported": (
                f"DUO serves kv_cache_dtype {cls.kv_cache_dtypes()} on this platform, got "
                f"{kv_cache_dtype!r}"
            ),
            "block_size not supported": (
                f"DUO's kernels need a block size of {_block_sizes(cls)}, got {block_size}"
            ),
            "compute capability not supported": (
                f"DUO's GPU kernels need compute capability >= "
                f"{'.'.join(map(str, _GPU_MIN_CAPABILITY))} (Ampere or newer), got "
                f"{'.'.join(map(str, tuple(capability))) if capability is not None else None}"
            ),
        }
        return [f"{r}: {details[r]}" if r in details else f"DUO: {r}" for r in reasons]

    @classmethod
    def _platform_dtypes(cls) -> list[torch.dtype]:
        if _device_type() == "cpu":
            return list(CPUAttentionBackend.supported_dtypes)
        return list(cls.supported_dtypes)

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_kv_connector(cls) -> bool:
        # Connectors move whole layers' caches; DUO's per-head bounded caches are not that.
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


# --------------------------------------------------------------------------------------
# 4. Impl
# --------------------------------------------------------------------------------------
def _refuse(what: str, value: object, allowed: str) -> DuoConfigError:
    return DuoConfigError(
        f"--attention-backend DUO cannot serve {what}={value!r}: {allowed}. "
        "Use the stock backend for this model (drop --attention-backend DUO)."
    )


class HeadCache(Protocol):
    """What the impl reads of a :class:`vllm_duo.companion.DuoHeadCache`."""

    layer_name: str
    local_kv_head: int
    retrieval: bool
    kv_cache: torch.Tensor


class DuoAttentionImpl(AttentionImpl[DuoMetadata]):
    """Splits one attention layer's KV heads into retrieval and streaming heads."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra_impl_args: object,
    ) -> None:
        if _device_type() not in ("cpu", "cuda"):
            raise _refuse("platform", running_platform().device_name, "CPU or NVIDIA CUDA")
        if attn_type != AttentionType.DECODER:
            raise _refuse("attention type", str(attn_type), "only decoder self-attention")
        if sliding_window is not None:
            raise _refuse("sliding_window", sliding_window, "only full-attention layers")
        if alibi_slopes is not None:
            raise _refuse("alibi_slopes", "set", "only RoPE/no-position models")
        if logits_soft_cap:
            raise _refuse("logits_soft_cap", logits_soft_cap, "no soft-capping")
        if kv_sharing_target_layer_name is not None:
            raise _refuse(
                "kv_sharing_target_layer_name", kv_sharing_target_layer_name, "no cross-layer KV"
            )
        if not DuoAttentionBackend.supports_kv_cache_dtype(kv_cache_dtype):
            allowed = DuoAttentionBackend.kv_cache_dtypes()
            raise DuoConfigError(
                f"--attention-backend DUO cannot serve kv_cache_dtype={kv_cache_dtype!r} on "
                f"{_device_type()}: one of {allowed}. Pick one of those with --kv-cache-dtype."
            )
        unsupported = {k: v for k, v in extra_impl_args.items() if v is not None}
        if unsupported:
            raise _refuse("attention options", sorted(unsupported), "none of these")
        head_sizes = DuoAttentionBackend.get_supported_head_sizes()
        if head_size not in head_sizes:
            raise _refuse("head_size", head_size, f"one of {head_sizes}")
        dtype = torch.get_default_dtype()
        if not DuoAttentionBackend.supports_dtype(dtype):
            raise _refuse("dtype", str(dtype), "float32, float16 or bfloat16")

        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.num_queries_per_kv = num_heads // num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.dtype = dtype
        self.head_caches: Sequence[HeadCache] = ()
        """One per local KV head, attached right after the layer is built."""
        self.kernels: KernelFamily | None = None
        """Chosen when the head caches are attached (:func:`vllm_duo.companion`)."""
        self._runs: tuple[HeadRun, ...] | None = None
        self._runs_cache_ptr = 0

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: DuoMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DuoAttention of one layer.

        Args:
            layer: the vLLM ``Attention`` module (for its k/v scales).
            query: [num_tokens, num_heads, head_size]
            key, value: [num_tokens, num_kv_heads, head_size]
            kv_cache: unused; each KV head's cache lives on its ``DuoHeadCache``
                with shape [num_blocks, 1, block_size, 2 * head_size].
            attn_metadata: metadata of this layer's group; None while profiling.
            output: [num_tokens, num_heads, head_size], written in place.

        Returns:
            ``output``.
        """
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("DUO does not fuse output quantization")
        if attn_metadata is None:
            return output
        assert self.kernels is not None, "DUO layer used before its head caches were attached"
        all_metadata = get_forward_context().attn_metadata
        num_tokens = attn_metadata.num_actual_tokens
        group = self.num_queries_per_kv
        q = query[:num_tokens].view(num_tokens, self.num_kv_heads, group, self.head_size)
        out = output[:num_tokens].view(num_tokens, self.num_kv_heads, group, self.head_size)
        k, v = key[:num_tokens], value[:num_tokens]
        for run in self._head_runs(all_metadata):
            step = all_metadata[run.metadata_layer]
            self.kernels.forward_run(run, step, q, k, v, out, layer)
        return output

    def _head_runs(self, all_metadata: dict[str, Any]) -> tuple[HeadRun, ...]:
        """The layer's runs, planned once the caches are bound (again if vLLM rebinds them)."""
        pointer = self.head_caches[0].kv_cache.data_ptr()
        if self._runs is None or pointer != self._runs_cache_ptr:
            # Layers of one cache group share one metadata object per step.
            refs = [
                HeadCacheRef(
                    layer_name=head.layer_name,
                    group=id(all_metadata[head.layer_name]),
                    local_kv_head=head.local_kv_head,
                    retrieval=head.retrieval,
                    cache=head.kv_cache,
                )
                for head in self.head_caches
            ]
            self._runs = plan_runs(refs)
            self._runs_cache_ptr = pointer
        return self._runs
