"""The DUO attention backend for vLLM (CPU platform).

Four parts, in vLLM's order: metadata, metadata builder, backend class with
its declared capabilities, and the impl whose ``forward`` splits a layer's KV
heads into retrieval heads (vLLM's own CPU paged-attention kernel over the
full context) and streaming heads (sink + recent window, O(S+W) per query).

Each KV head of a DUO layer owns a one-head paged cache held by a
:class:`vllm_duo.companion.DuoHeadCache`; ``forward`` reads and writes those,
never the ``kv_cache`` argument vLLM hands in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from vllm_duo._vllm import (
    Attention,
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayerBase,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    CPUAttentionBackend,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
    KVCacheLayout,
    KVCacheSpec,
    MultipleOf,
    VllmConfig,
    current_platform,
    get_forward_context,
    get_layers_from_vllm_config,
    ops,
)
from vllm_duo.errors import DuoConfigError
from vllm_duo.kernels.sink_window_torch import (
    StreamingPlan,
    plan_streaming,
    sink_window_attention_heads,
)
from vllm_duo.streaming_cache import DuoStreamingSpec

if TYPE_CHECKING:
    from vllm_duo.companion import DuoHeadCache

BACKEND_NAME = "DUO"


# --------------------------------------------------------------------------------------
# 1. Metadata
# --------------------------------------------------------------------------------------
@dataclass
class DuoMetadata:
    """Per-step metadata of one KV cache group of DUO head caches."""

    num_actual_tokens: int
    query_start_loc_host: list[int]
    """num_reqs + 1 token offsets, on the host (the streaming path loops over requests)."""
    seq_lens_host: list[int]
    block_table: torch.Tensor
    """[num_reqs, max_blocks] block ids of this group's caches."""
    slot_mapping: torch.Tensor
    """[num_tokens] cache slot of each token (-1: padding, write nothing)."""
    retrieval: CPUAttentionMetadata | None
    """What vLLM's CPU kernel needs, sized for this group's heads; None for streaming groups."""
    isa: str
    """Instruction set vLLM's CPU kernel packs retrieval caches for."""
    step_cache: dict[str, Any] = field(default_factory=dict)
    """What every layer of the group would otherwise recompute this step (streaming plan)."""


# --------------------------------------------------------------------------------------
# 2. Metadata builder
# --------------------------------------------------------------------------------------
class DuoMetadataBuilder(AttentionMetadataBuilder[DuoMetadata]):
    """Wraps vLLM's CPU builder: retrieval heads use its scheduler metadata as is."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(
        self,
        kv_cache_spec: KVCacheSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._cpu = CPUAttentionMetadataBuilder(kv_cache_spec, layer_names, vllm_config, device)
        # vLLM's kernel runs only on retrieval head caches. A group holding none (a
        # streaming group, or only the model's own Attention layers, which share a head
        # cache just to receive metadata) skips its per-step scheduling, which would
        # also reject the model layers' query-heads-per-KV-head ratio. When the model's
        # layers land in the same group (equal query-head counts, e.g. one KV head per
        # rank) the metadata fits the head caches, whose ratio it then has.
        layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, layer_names)
        head_caches = [layer for layer in layers.values() if not isinstance(layer, Attention)]
        self._needs_kernel_metadata = bool(head_caches) and not isinstance(
            kv_cache_spec, DuoStreamingSpec
        )

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> DuoMetadata:
        cm = common_attn_metadata
        retrieval = (
            self._cpu.build(common_prefix_len, cm, fast_build)
            if self._needs_kernel_metadata
            else None
        )
        return DuoMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            query_start_loc_host=cm.query_start_loc_cpu[: cm.num_reqs + 1].tolist(),
            seq_lens_host=cm.seq_lens[: cm.num_reqs].tolist(),
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
            retrieval=retrieval,
            isa=self._cpu.isa,
        )


# --------------------------------------------------------------------------------------
# 3. Backend
# --------------------------------------------------------------------------------------
class DuoAttentionBackend(AttentionBackend):
    """DuoAttention: full-context retrieval heads + sink/window streaming heads."""

    # forward() writes K/V itself: each head goes to its own cache, in the layout
    # of the kernel that reads it.
    forward_includes_kv_cache_update: bool = True

    supported_dtypes: ClassVar[list[torch.dtype]] = list(CPUAttentionBackend.supported_dtypes)
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

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
        return CPUAttentionBackend.get_supported_kernel_block_sizes(kv_cache_spec)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return CPUAttentionBackend.get_supported_head_sizes()

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
        if not current_platform.is_cpu():
            raise _refuse("platform", current_platform.device_name, "this release runs on CPU")
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
        if kv_cache_dtype != "auto":
            raise _refuse("kv_cache_dtype", kv_cache_dtype, "only 'auto'")
        unsupported = {k: v for k, v in extra_impl_args.items() if v is not None}
        if unsupported:
            raise _refuse("attention options", sorted(unsupported), "none of these")
        head_sizes = DuoAttentionBackend.get_supported_head_sizes()
        if head_size not in head_sizes:
            raise _refuse("head_size", head_size, f"one of {head_sizes}")
        dtype = torch.get_default_dtype()
        if dtype not in DuoAttentionBackend.supported_dtypes:
            raise _refuse("dtype", str(dtype), "float32, float16 or bfloat16")

        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.num_queries_per_kv = num_heads // num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.sink = 0
        self.recent = 1
        self.head_caches: list[DuoHeadCache] = []
        """One per local KV head, attached right after the layer is built."""

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
        all_metadata = get_forward_context().attn_metadata
        num_tokens = attn_metadata.num_actual_tokens
        group = self.num_queries_per_kv
        # Streaming heads whose caches share a block table are computed together.
        streaming: dict[int, list[DuoHeadCache]] = {}
        for head in self.head_caches:
            metadata: DuoMetadata = all_metadata[head.layer_name]
            if not head.retrieval:
                streaming.setdefault(id(metadata), []).append(head)
                continue
            h = head.local_kv_head
            q = query[:num_tokens, h * group : (h + 1) * group]
            out = self._retrieval(layer, head.kv_cache, q, key[:num_tokens, h : h + 1],
                                  value[:num_tokens, h : h + 1], metadata)  # fmt: skip
            output[:num_tokens, h * group : (h + 1) * group] = out
        for heads in streaming.values():
            self._streaming(heads, all_metadata[heads[0].layer_name], query, key, value, output)
        return output

    def _retrieval(
        self,
        layer: torch.nn.Module,
        cache: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        metadata: DuoMetadata,
    ) -> torch.Tensor:
        """vLLM's CPU kernel over the whole context; returns [tokens, G, D]."""
        num_blocks, _, block_size, _ = cache.shape
        key_cache, value_cache = cache.view(num_blocks, 1, 2 * block_size, -1).chunk(2, dim=2)
        slots = metadata.slot_mapping[: q.shape[0]]
        ops.cpu_attn_reshape_and_cache(
            k, v, key_cache, value_cache, slots, metadata.isa,
            k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )  # fmt: skip
        # The kernel honours strides on its inputs but not on `output`.
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        md = metadata.retrieval
        assert md is not None, "retrieval head scheduled in a streaming cache group"
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=md.query_start_loc, seq_lens=md.seq_lens, scale=self.scale,
            causal=True, alibi_slopes=None, sliding_window=-1, block_table=md.block_table,
            softcap=0, scheduler_metadata=md.scheduler_metadata, s_aux=None,
            k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )  # fmt: skip
        return out

    def _streaming(
        self,
        heads: list[DuoHeadCache],
        metadata: DuoMetadata,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        output: torch.Tensor,
    ) -> None:
        """Sink + recent window of ``heads`` (one block table) into ``output``."""
        num_tokens = metadata.num_actual_tokens
        num_blocks, _, block_size, packed = heads[0].kv_cache.shape
        rows = [h.kv_cache.view(num_blocks, 2 * block_size, packed // 2) for h in heads]
        key_caches = [r[:, :block_size] for r in rows]
        value_caches = [r[:, block_size:] for r in rows]
        stored, blocks, offsets, plan = self._step_plan(metadata, block_size, num_tokens)
        local = [h.local_kv_head for h in heads]
        new_keys = key[:num_tokens, local]  # [T, H, D]
        new_values = value[:num_tokens, local]
        kept_keys, kept_values = new_keys[stored], new_values[stored]
        for i, (k_cache, v_cache) in enumerate(zip(key_caches, value_caches)):
            k_cache[blocks, offsets] = kept_keys[:, i].to(k_cache.dtype)
            v_cache[blocks, offsets] = kept_values[:, i].to(v_cache.dtype)
        group = self.num_queries_per_kv
        q = query[:num_tokens].view(num_tokens, self.num_kv_heads, group, -1)[:, local]
        out = sink_window_attention_heads(
            q, key_caches, value_caches, plan, scale=self.scale,
            new_keys=new_keys, new_values=new_values,
        )  # fmt: skip
        view = output[:num_tokens].view(num_tokens, self.num_kv_heads, group, -1)
        view[:, local] = out

    def _step_plan(
        self, metadata: DuoMetadata, block_size: int, num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, StreamingPlan]:
        """Where this step's K/V go and which slots queries read: once per group and step."""
        memo = metadata.step_cache
        if "plan" not in memo:
            slots = metadata.slot_mapping[:num_tokens]
            # Block 0 is vLLM's null block: chunk tokens that leave the window within
            # this step are mapped there and must not be stored.
            stored = slots >= block_size
            memo["stored"] = stored
            memo["blocks"] = torch.div(slots[stored], block_size, rounding_mode="floor")
            memo["offsets"] = slots[stored] % block_size
            memo["plan"] = plan_streaming(
                metadata.block_table, metadata.query_start_loc_host, metadata.seq_lens_host,
                sink=self.sink, recent=self.recent, block_size=block_size, keys_from_step=True,
            )  # fmt: skip
        return memo["stored"], memo["blocks"], memo["offsets"], memo["plan"]
