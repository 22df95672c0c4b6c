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

from collections.abc import Sequence

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
)
from vllm_duo.backend import DuoAttentionBackend, DuoAttentionImpl
from vllm_duo.model_plan import plan_for
from vllm_duo.streaming_cache import DuoStreamingSpec

STREAMING_CACHE_BOUNDED = True
"""Streaming heads' caches free tokens outside sink + window (DuoStreamingSpec)."""


class DuoHeadCache(AttentionLayerBase):
    """The KV cache of one KV head of a DUO layer (owns no weights)."""

    def __init__(
        self,
        *,
        layer_name: str,
        parent: Attention,
        local_kv_head: int | None,
        global_kv_head: int | None,
        retrieval: bool,
    ) -> None:
        self.layer_name = layer_name
        self.local_kv_head = local_kv_head
        self.global_kv_head = global_kv_head
        self.retrieval = retrieval
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
        if self.retrieval:
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

    @property
    def is_padding(self) -> bool:
        """A slot that only keeps KV specs equal across tensor-parallel ranks."""
        return self.local_kv_head is None

    def __repr__(self) -> str:
        kind = "retrieval" if self.retrieval else "streaming"
        return f"DuoHeadCache({self.layer_name}, {kind})"


def global_kv_head(local: int, num_local: int, num_total: int, rank: int, world: int) -> int:
    """The model-wide index of a rank's local KV head under tensor parallelism.

    With fewer KV heads than ranks vLLM replicates each head on several ranks.
    """
    if num_total >= world:
        return rank * num_local + local
    return rank * num_total // world


def cache_slots(retrieval: Sequence[bool], num_local: int, world: int) -> tuple[int, int]:
    """(full-cache slots, streaming-cache slots) every rank declares for one layer.

    vLLM needs identical KV cache specs on all tensor-parallel ranks, but ranks
    hold different numbers of retrieval heads. Each rank declares the largest
    count of each kind over all ranks; unused slots are padding.

    Args:
        retrieval: per global KV head of the layer, True for a retrieval head.
        num_local: KV heads per rank.
        world: tensor-parallel size.
    """
    total = len(retrieval)
    counts = []
    for rank in range(world):
        heads = [global_kv_head(h, num_local, total, rank, world) for h in range(num_local)]
        counts.append(sum(retrieval[h] for h in heads))
    return max(counts), max(num_local - c for c in counts)


def tp_padding(plan_heads, num_local: int, world: int) -> tuple[int, int]:
    """(padding slots, real heads) per rank summed over layers, for the log and docs."""
    padded = real = 0
    for layer in range(plan_heads.num_layers):
        retrieval = [h in plan_heads.retrieval[layer] for h in range(plan_heads.num_kv_heads)]
        full, streaming = cache_slots(retrieval, num_local, world)
        padded += full + streaming - num_local
        real += num_local
    return padded, real


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
    by_kind = {
        True: [local for local, head in enumerate(mine) if retrieval[head]],
        False: [local for local, head in enumerate(mine) if not retrieval[head]],
    }
    forward_context = vllm_config.compilation_config.static_forward_context
    impl.sink = plan.settings.sink
    impl.recent = plan.settings.recent
    impl.head_caches = []
    caches: list[DuoHeadCache] = []
    for kind, slots in ((True, full_slots), (False, streaming_slots)):
        for slot in range(slots):
            locals_of_kind = by_kind[kind]
            local = locals_of_kind[slot] if slot < len(locals_of_kind) else None
            # Names are per slot, not per head, so every rank declares the same layers.
            name = f"{layer.layer_name}.duo_{'full' if kind else 'stream'}{slot}"
            cache = DuoHeadCache(
                layer_name=name,
                parent=layer,
                local_kv_head=local,
                global_kv_head=None if local is None else mine[local],
                retrieval=kind,
            )
            cache.sink = plan.settings.sink
            cache.recent = plan.settings.recent
            if name in forward_context:
                raise ValueError(f"Duplicate layer name: {name}")
            forward_context[name] = cache
            caches.append(cache)
            if local is not None:
                impl.head_caches.append(cache)
    # The layer allocates nothing itself; sharing its first head cache makes
    # vLLM skip its KV spec and still hand it attention metadata each step.
    layer.kv_sharing_target_layer_name = caches[0].layer_name
