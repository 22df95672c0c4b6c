"""Which KV heads of a DUO layer one kernel call can serve, and the strided cache view it reads.

Every KV head of a DUO layer owns a one-head paged cache (see :mod:`vllm_duo.companion`).
vLLM lays out all layers of one KV cache group in one backing allocation at a fixed layer
stride, so the caches of heads that sit next to each other in a group are equally spaced in
memory: one strided view ``[num_blocks, heads, block_size, C]`` covers them all, and one call
of a paged-attention kernel (vLLM's, or ours) serves every one of them.

This module finds those *runs* from the tensors themselves (their storage offsets and
strides), so it does not depend on how vLLM orders or groups layers: heads whose caches are
not equally spaced simply start a new run. Pure: torch only, never vLLM.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["HeadCacheRef", "HeadRun", "plan_runs", "split_pages"]


@dataclass(frozen=True)
class HeadCacheRef:
    """What the layout needs to know about one head cache of a layer."""

    layer_name: str
    """vLLM layer name of the head cache (its metadata key)."""
    group: Hashable
    """Identity of its KV cache group: heads of one run must share a block table."""
    local_kv_head: int
    retrieval: bool
    """Attention kind: whole context (True) or sink + window (False)."""
    cache: torch.Tensor
    """[num_blocks, 1, block_size, C] the head's cache view as vLLM bound it."""

    def __post_init__(self) -> None:
        if self.cache.dim() != 4 or self.cache.shape[1] != 1:
            raise ValueError(
                f"{self.layer_name}: a head cache must be [num_blocks, 1, block_size, C], "
                f"got {tuple(self.cache.shape)}"
            )


@dataclass(frozen=True)
class HeadRun:
    """KV heads of one layer that one kernel call serves."""

    metadata_layer: str
    """Layer name whose attention metadata (block table, slots) serves the run."""
    retrieval: bool
    kv_heads: tuple[int, ...]
    """Local KV head indices in cache order (the order of ``cache``'s head axis)."""
    cache: torch.Tensor
    """[num_blocks, len(kv_heads), block_size, C] view over the heads' caches."""
    head_range: slice | None = field(init=False)
    """The heads as a slice when they are consecutive and ascending (no gather needed)."""
    index: torch.Tensor = field(init=False)
    """``kv_heads`` as a long tensor on the cache's device (for gathers and scatters)."""
    key_pages: torch.Tensor = field(init=False)
    """[num_blocks, heads, block_size, D] key half of ``cache`` (vLLM's CPU kernel order)."""
    value_pages: torch.Tensor = field(init=False)
    keys: torch.Tensor = field(init=False)
    """[num_blocks, block_size, heads, D]: ``key_pages`` in the order of the Triton,
    FlashAttention and vllm-duo C++ kernels (made once: views cost time per call)."""
    values: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if not self.kv_heads or len(self.kv_heads) != self.cache.shape[1]:
            raise ValueError(
                f"a run needs one cache view head per KV head: {len(self.kv_heads)} heads, "
                f"cache {tuple(self.cache.shape)}"
            )
        first, count = self.kv_heads[0], len(self.kv_heads)
        consecutive = self.kv_heads == tuple(range(first, first + count))
        # frozen: derived fields are set once here.
        object.__setattr__(self, "head_range", slice(first, first + count) if consecutive else None)
        index = torch.tensor(self.kv_heads, dtype=torch.long, device=self.cache.device)
        object.__setattr__(self, "index", index)
        key_pages, value_pages = split_pages(self.cache)
        object.__setattr__(self, "key_pages", key_pages)
        object.__setattr__(self, "value_pages", value_pages)
        object.__setattr__(self, "keys", key_pages.transpose(1, 2))
        object.__setattr__(self, "values", value_pages.transpose(1, 2))


def _stride_between(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """Elements from ``a``'s first element to ``b``'s, when both view one storage alike."""
    if (
        a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
        or a.dtype != b.dtype
        or a.shape != b.shape
        or a.stride() != b.stride()
    ):
        return None
    return b.storage_offset() - a.storage_offset()


def _run_view(caches: Sequence[torch.Tensor], head_stride: int) -> torch.Tensor:
    first = caches[0]
    size = (first.shape[0], len(caches), first.shape[2], first.shape[3])
    stride = (first.stride(0), head_stride, first.stride(2), first.stride(3))
    return first.as_strided(size, stride, first.storage_offset())


def plan_runs(heads: Sequence[HeadCacheRef]) -> tuple[HeadRun, ...]:
    """Splits a layer's head caches into as few runs as their memory allows.

    Heads join a run when they share a KV cache group and an attention kind and their caches
    are equally spaced in one storage. Runs are ordered by group (first appearance), then
    kind (retrieval first), then memory; within a run heads are in memory order.
    """
    group_order: dict[Hashable, int] = {}
    buckets: dict[tuple[int, bool], list[HeadCacheRef]] = {}
    for head in heads:
        group = group_order.setdefault(head.group, len(group_order))
        buckets.setdefault((group, not head.retrieval), []).append(head)
    runs: list[HeadRun] = []
    for (_, streaming), members in sorted(buckets.items()):
        members = sorted(members, key=lambda h: h.cache.storage_offset())
        start = 0
        while start < len(members):
            end = start + 1
            step = None
            while end < len(members):
                gap = _stride_between(members[end - 1].cache, members[end].cache)
                if gap is None or gap <= 0 or (step is not None and gap != step):
                    break
                step = gap
                end += 1
            chunk = members[start:end]
            head_stride = step if step is not None else chunk[0].cache.stride(1)
            runs.append(
                HeadRun(
                    metadata_layer=chunk[0].layer_name,
                    retrieval=not streaming,
                    kv_heads=tuple(h.local_kv_head for h in chunk),
                    cache=_run_view([h.cache for h in chunk], head_stride),
                )
            )
            start = end
    return tuple(runs)


def split_pages(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value halves of ``[num_blocks, heads, block_size, 2 * D]`` page views.

    A head's page holds ``block_size`` key rows, then ``block_size`` value rows (vLLM's CPU
    layout, which every DUO kernel family shares). Returns two
    ``[num_blocks, heads, block_size, D]`` views; ``.transpose(1, 2)`` gives the
    ``[num_blocks, block_size, heads, D]`` order of the Triton and FlashAttention kernels.
    """
    num_blocks, heads, block_size, packed = cache.shape
    if cache.stride(3) != 1 or cache.stride(2) != packed:
        raise ValueError(
            f"a head's page must be one contiguous [block_size, 2 * head_size] run, got "
            f"shape {tuple(cache.shape)} with strides {cache.stride()}"
        )
    head_size = packed // 2
    rows = cache.as_strided(
        (num_blocks, heads, 2 * block_size, head_size),
        (cache.stride(0), cache.stride(1), head_size, 1),
        cache.storage_offset(),
    )
    return rows[:, :, :block_size], rows[:, :, block_size:]
