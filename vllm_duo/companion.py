"""One paged KV cache per KV head of a DUO attention layer.

vLLM gives an attention layer one KV cache for all of its heads. DuoAttention
needs different lifetimes per head (all tokens for retrieval heads, sink +
window for streaming heads) and real patterns give every layer a different
number of each, so each KV head gets its own one-head cache layer. All those
pages have the same size, so vLLM's KV cache manager can put them in groups
from one block pool without padding, and the scheduler counts exactly the
heads that exist.

The model's ``Attention`` layer keeps its weights and module; it is marked as
sharing the KV cache of its first head cache (vLLM's cross-layer KV sharing),
so it allocates nothing itself yet still receives attention metadata.
"""

from __future__ import annotations

import torch

from vllm_duo._vllm import (
    Attention,
    AttentionLayerBase,
    AttentionType,
    FullAttentionSpec,
    KVCacheSpec,
    VllmConfig,
    extract_layer_index,
    get_current_vllm_config,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    init_logger,
    running_platform,
)
from vllm_duo.backend import DuoAttentionBackend, DuoAttentionImpl
from vllm_duo.families import make_family
from vllm_duo.model_plan import plan_for
from vllm_duo.settings import ENV_KERNELS, kernels_from_env
from vllm_duo.streaming_cache import DuoStreamingSpec
from vllm_duo.tp_slots import cache_slots, global_kv_head

logger = init_logger("vllm." + __name__)


class DuoHeadCache(AttentionLayerBase):
    """The KV cache of one KV head of a DUO layer (owns no weights)."""

    def __init__(
        self,
        *,
        layer_name: str,
        parent: Attention,
        local_kv_head: int,
        global_kv_head: int,
        retrieval: bool,
        full_context: bool,
    ) -> None:
        self.layer_name = layer_name
        self.local_kv_head = local_kv_head
        self.global_kv_head = global_kv_head
        self.retrieval = retrieval
        """Attention kind: full context, or sink + window."""
        self.full_context = full_context
        """Cache kind: keeps every token (FullAttentionSpec) or sink + window only."""
        # vLLM sizes per-group kernel scratch from a layer's query head count.
        self.num_heads = parent.num_heads // parent.num_kv_heads
        self.num_kv_heads = 1
        self.head_size = parent.head_size
        self.attn_type = AttentionType.DECODER
        self.dtype = parent.kv_cache_torch_dtype
        self.kv_cache = torch.tensor([])
        self.sink = 0
        self.recent = 1

    def get_attn_backend(self) -> type[DuoAttentionBackend]:
        return DuoAttentionBackend

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec:
        block_size = vllm_config.cache_config.block_size
        if self.full_context:
            return FullAttentionSpec(
                block_size=block_size, num_kv_heads=1, head_size=self.head_size, dtype=self.dtype
            )
        return DuoStreamingSpec(
            block_size=block_size,
            num_kv_heads=1,
            head_size=self.head_size,
            dtype=self.dtype,
            sliding_window=self.recent,
            num_sink_tokens=self.sink,
        )

    def __repr__(self) -> str:
        kind = "retrieval" if self.retrieval else "streaming"
        return f"DuoHeadCache({self.layer_name}, {kind})"


def attach_head_caches(layer: Attention) -> None:
    """Give a DUO ``Attention`` layer one :class:`DuoHeadCache` per local KV head."""
    impl = layer.impl
    assert isinstance(impl, DuoAttentionImpl)
    vllm_config = get_current_vllm_config()
    plan = plan_for(vllm_config)
    layer_index = extract_layer_index(layer.layer_name)
    rank = get_tensor_model_parallel_rank()
    world = get_tensor_model_parallel_world_size()
    total = plan.heads.num_kv_heads
    num_local = layer.num_kv_heads
    retrieval = [plan.is_retrieval(layer_index, h) for h in range(total)]
    mine = [global_kv_head(h, num_local, total, rank, world) for h in range(num_local)]
    full_slots, streaming_slots = cache_slots(retrieval, num_local, world)
    retrieval_locals = [local for local, head in enumerate(mine) if retrieval[head]]
    streaming_locals = [local for local, head in enumerate(mine) if not retrieval[head]]
    # Streaming heads fill the sink+window slots first; any left over (this rank
    # has fewer retrieval heads than another) take the remaining full slots.
    slot_heads = {
        True: retrieval_locals + streaming_locals[streaming_slots:],
        False: streaming_locals[:streaming_slots],
    }
    forward_context = vllm_config.compilation_config.static_forward_context
    head_caches: list[DuoHeadCache] = []
    for full_slot in (True, False):
        for slot, local in enumerate(slot_heads[full_slot]):
            # Names are per slot, not per head, so every rank declares the same layers.
            name = f"{layer.layer_name}.duo_{'full' if full_slot else 'stream'}{slot}"
            cache = DuoHeadCache(
                layer_name=name,
                parent=layer,
                local_kv_head=local,
                global_kv_head=mine[local],
                retrieval=retrieval[mine[local]],
                full_context=full_slot,
            )
            cache.sink = plan.settings.sink
            cache.recent = plan.settings.recent
            if name in forward_context:
                raise ValueError(f"Duplicate layer name: {name}")
            forward_context[name] = cache
            head_caches.append(cache)
    assert len(head_caches) == num_local == full_slots + streaming_slots
    impl.head_caches = tuple(head_caches)
    choice = kernels_from_env()
    impl.kernels = make_family(
        choice, running_platform().device_type, scale=impl.scale, sink=plan.settings.sink,
        recent=plan.settings.recent, kv_cache_dtype=impl.kv_cache_dtype, dtype=impl.dtype,
        head_size=impl.head_size, block_size=vllm_config.cache_config.block_size,
        any_streaming=plan.heads.num_streaming > 0,
    )  # fmt: skip
    logger.info_once(
        "DuoAttention kernels (%s=%s): %s", ENV_KERNELS, choice, impl.kernels.describe()
    )
    # The layer allocates nothing itself; sharing its first head cache makes
    # vLLM skip its KV spec and still hand it attention metadata each step.
    layer.kv_sharing_target_layer_name = head_caches[0].layer_name
