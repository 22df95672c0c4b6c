"""How a DUO layer's KV heads map onto cache slots under tensor parallelism.

vLLM runs one scheduler for all tensor-parallel ranks, so every rank must declare the same
KV cache layers, yet ranks hold different numbers of retrieval heads per layer. This module
is the arithmetic of that compromise. Pure: no torch, no vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence

from vllm_duo.patterns import HeadPlan

__all__ = ["cache_slots", "global_kv_head", "tp_overflow"]


def global_kv_head(local: int, num_local: int, num_total: int, rank: int, world: int) -> int:
    """The model-wide index of a rank's local KV head under tensor parallelism.

    With fewer KV heads than ranks vLLM replicates each head on several ranks.
    """
    if num_total >= world:
        return rank * num_local + local
    return rank * num_total // world


def cache_slots(retrieval: Sequence[bool], num_local: int, world: int) -> tuple[int, int]:
    """(full-context slots, sink+window slots) every rank declares for one layer.

    vLLM needs identical KV cache specs on all tensor-parallel ranks (one
    scheduler, one block table per group), but ranks hold different numbers of
    retrieval heads. Each rank declares as many full-context slots as the rank
    with the most retrieval heads needs, and the rest as sink+window slots; a
    rank with fewer retrieval heads puts its extra streaming heads in full
    slots, where they keep every token but still attend to sink + window only.
    So no slot is ever unused.

    Args:
        retrieval: per global KV head of the layer, True for a retrieval head.
        num_local: KV heads per rank.
        world: tensor-parallel size.
    """
    counts = _retrieval_per_rank(retrieval, num_local, world)
    return max(counts), num_local - max(counts)


def _retrieval_per_rank(retrieval: Sequence[bool], num_local: int, world: int) -> list[int]:
    total = len(retrieval)
    return [
        sum(retrieval[global_kv_head(h, num_local, total, rank, world)] for h in range(num_local))
        for rank in range(world)
    ]


def tp_overflow(
    plan_heads: HeadPlan, num_local: int, world: int, context_len: int, sink: int, recent: int
) -> tuple[int, float]:
    """(streaming heads per rank stored in full slots, extra KV bytes vs. TP=1).

    Bytes are counted at ``context_len`` tokens per request: a full slot holds
    the whole context, a sink+window slot at most ``sink + recent`` tokens.
    """
    kept = min(context_len, sink + recent)
    overflow = 0
    extra = real = 0.0
    for layer in range(plan_heads.num_layers):
        retrieval = [h in plan_heads.retrieval[layer] for h in range(plan_heads.num_kv_heads)]
        counts = _retrieval_per_rank(retrieval, num_local, world)
        for count in counts:
            overflow += max(counts) - count
            extra += (max(counts) - count) * (context_len - kept)
            real += count * context_len + (num_local - count) * kept
    return overflow // world, extra / real
