"""The bounded KV cache of streaming heads inside vLLM's KV cache manager.

A streaming head needs the first ``S`` tokens (sinks) and the last ``W``
tokens (window) of each sequence and nothing else. ``DuoStreamingSpec`` tells
vLLM so: it is a sliding-window spec that also keeps ``ceil(S / block_size)``
sink blocks. ``DuoStreamingManager`` is vLLM's sliding-window manager with
three changes:

* blocks between the sinks and the window go back to the pool while the
  request runs (the sinks stay);
* blocks of a prefill chunk that fall out of the window before the chunk ends
  are not reserved: the chunk's own keys are read from the forward pass's K/V
  tensors, not the cache, so only what stays has to be stored. While the pool
  is mostly free they are still written (and so prefix-cached, then freed the
  next step), which lets later requests that share only part of a prompt hit
  the cache; under memory pressure they are null;
* prefix-cache hits must include the cached sink blocks.

So a request holds at most ``ceil(S/bs) + ceil(W/bs) + 1`` blocks of a
streaming group while it decodes, and about one more window's worth while a
prefill chunk is in flight; admission and vLLM's capacity figures use that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm_duo._vllm import (
    BlockPool,
    KVCacheBlock,
    KVCacheSpec,
    KVCacheSpecRegistry,
    SlidingWindowManager,
    SlidingWindowSpec,
    cdiv,
    resolve_block_hashes,
)


@dataclass(frozen=True, kw_only=True)
class DuoStreamingSpec(SlidingWindowSpec):
    """KV cache of a streaming head: ``num_sink_tokens`` sinks + ``sliding_window`` recent."""

    num_sink_tokens: int = 0

    @property
    def num_sink_blocks(self) -> int:
        return cdiv(self.num_sink_tokens, self.block_size)

    def max_admission_blocks_per_request(
        self, max_in_flight_tokens: int, max_model_len: int
    ) -> int:
        """Sink blocks + the window before a chunk + the window after it.

        Unlike vLLM's sliding window this does not grow with the chunk size: a
        chunk's blocks that leave the window within the step are never allocated.
        """
        del max_in_flight_tokens
        window_blocks = cdiv(self.sliding_window - 1 + self.extra_retained_tokens, self.block_size)
        bound = self.num_sink_blocks + 2 * (window_blocks + 1)
        return min(bound, cdiv(max_model_len, self.block_size))

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(
            isinstance(spec, DuoStreamingSpec)
            and spec.sliding_window == self.sliding_window
            and spec.num_sink_tokens == self.num_sink_tokens
            for spec in kv_cache_specs.values()
        )


class DuoStreamingManager(SlidingWindowManager):
    """vLLM's sliding-window manager, keeping sink blocks and skipping dead chunk blocks."""

    def __init__(self, kv_cache_spec: DuoStreamingSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.num_sink_blocks = kv_cache_spec.num_sink_blocks
        # Blocks [num_sink_blocks, freed_upto) of a request are already null, so
        # each step only walks the blocks that just left the window.
        self._freed_upto: dict[str, int] = {}
        # Dead chunk blocks are stored (for the prefix cache) only while at least
        # this many blocks stay free afterwards.
        self._spare_floor = self.block_pool.num_gpu_blocks // 2

    def _first_live_block_after(self, num_tokens: int) -> int:
        """Blocks below this index (past the sinks) are dead once ``num_tokens`` are computed."""
        return self.get_num_skipped_tokens(num_tokens) // self.block_size

    def _is_dead(self, index: int, first_live: int) -> bool:
        return self.num_sink_blocks <= index < first_live

    def remove_skipped_blocks(
        self,
        request_id: str,
        processed_computed_tokens: int,
        num_prompt_tokens: int | None = None,
    ) -> None:
        del num_prompt_tokens
        blocks = self.req_to_blocks.get(request_id)
        if not blocks:
            return
        end = min(self._first_live_block_after(processed_computed_tokens), len(blocks))
        start = max(self._freed_upto.get(request_id, 0), self.num_sink_blocks)
        if end <= start:
            return
        freed: list[KVCacheBlock] = []
        # Newest first, like vLLM: blocks freed first are evicted first.
        for i in range(end - 1, start - 1, -1):
            if not blocks[i].is_null:
                freed.append(blocks[i])
                blocks[i] = self._null_block
        self._freed_upto[request_id] = end
        if freed:
            self.block_pool.free_blocks(freed)

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock],
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
        prefill_end: int = 0,
    ) -> int:
        count = super().get_num_blocks_to_allocate(
            request_id, num_tokens, new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, num_tokens_main_model, apply_admission_cap, prefill_end,
        )  # fmt: skip
        # The base counts every new block; dead chunk blocks are never allocated.
        held = len(self.req_to_blocks.get(request_id, ()))
        if request_id not in self.num_cached_block:
            skipped = self.get_num_skipped_tokens(total_computed_tokens) // self.block_size
            held = max(held + len(new_computed_blocks), skipped)
            # Sink blocks of a prefix hit are kept, so they count if evictable.
            sinks = new_computed_blocks[: min(self.num_sink_blocks, skipped)]
            count += self._get_num_evictable_blocks(sinks)
        first_live = self._first_live_block_after(num_tokens_main_model)
        required = cdiv(num_tokens, self.block_size)
        dead = sum(self._is_dead(i, first_live) for i in range(held, required))
        return max(count - dead, 0)

    def add_local_computed_blocks(
        self,
        request_id: str,
        new_computed_blocks: Sequence[KVCacheBlock],
        num_local_computed_tokens: int,
        num_external_computed_tokens: int,
    ) -> None:
        super().add_local_computed_blocks(
            request_id, new_computed_blocks, num_local_computed_tokens,
            num_external_computed_tokens,
        )  # fmt: skip
        blocks = self.req_to_blocks[request_id]
        # The base nulls everything before the window; put the sinks back.
        sinks = []
        for i, block in enumerate(new_computed_blocks[: self.num_sink_blocks]):
            if blocks[i].is_null and not block.is_null:
                blocks[i] = block
                sinks.append(block)
        if sinks and self.enable_caching:
            self.block_pool.touch(sinks)
        skipped = self.get_num_skipped_tokens(
            num_local_computed_tokens + num_external_computed_tokens
        )
        self._freed_upto[request_id] = max(self.num_sink_blocks, skipped // self.block_size)

    def allocate_new_blocks(
        self, request_id: str, num_tokens: int, num_tokens_main_model: int
    ) -> list[KVCacheBlock]:
        blocks = self.req_to_blocks[request_id]
        required = cdiv(num_tokens, self.block_size)
        first_live = self._first_live_block_after(num_tokens_main_model)
        new: list[KVCacheBlock] = []
        # Sinks first, then null placeholders for the dead part of this chunk;
        # the base then allocates the live tail (and any copy-on-write block).
        while len(blocks) < min(required, self.num_sink_blocks):
            block = self.block_pool.get_new_blocks(1)[0]
            blocks.append(block)
            new.append(block)
            if self._record_new_block_ids:
                self.new_block_ids.append(block.block_id)
        first_null = len(blocks)
        dead = 0
        while first_null + dead < required and self._is_dead(first_null + dead, first_live):
            dead += 1
        if dead and self._worth_storing(dead):
            # Nobody is short of memory: store them so the prefix cache keeps
            # windows inside this chunk; they are freed with the next step.
            stored = self.block_pool.get_new_blocks(dead)
            blocks.extend(stored)
            new.extend(stored)
            if self._record_new_block_ids:
                self.new_block_ids.extend(b.block_id for b in stored)
            first_null = len(blocks)
        else:
            placeholders = [self._null_block] * dead
            blocks.extend(placeholders)
            # Returned too: a running request's worker-side block table only appends the
            # ids returned here, so a placeholder left out would shift every later block
            # of the row onto the wrong positions (the tail read as null).
            new.extend(placeholders)
        # Placeholders extend the all-null run only if it reached them.
        if self._freed_upto.get(request_id, self.num_sink_blocks) >= first_null:
            self._freed_upto[request_id] = len(blocks)
        return new + super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)

    def _worth_storing(self, num_blocks: int) -> bool:
        return (
            self.enable_caching
            and self.block_pool.get_num_free_blocks() - num_blocks >= self._spare_floor
        )

    def free(self, request_id: str) -> None:
        self._freed_upto.pop(request_id, None)
        super().free(request_id)

    @classmethod
    def reachable_block_mask(
        cls,
        start_block: int,
        end_block: int,
        alignment_tokens: int | None,
        kv_cache_spec: KVCacheSpec,
        use_eagle: bool,
        retention_interval: int | None = None,
        reachable_boundaries: Sequence[int] = (),
        dcp_world_size: int = 1,
        final_segment_end_block: int | None = None,
    ) -> list[bool] | None:
        """vLLM's sliding-window retention, plus the sink blocks, which every hit needs."""
        mask = super().reachable_block_mask(
            start_block, end_block, alignment_tokens, kv_cache_spec, use_eagle,
            retention_interval, reachable_boundaries, dcp_world_size, final_segment_end_block,
        )  # fmt: skip
        if mask is None:
            return None
        assert isinstance(kv_cache_spec, DuoStreamingSpec)
        for i in range(start_block, min(end_block, kv_cache_spec.num_sink_blocks)):
            mask[i - start_block] = True
        return mask

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes,
        max_length: int,
        kv_cache_group_ids: list[int],
        block_pool: BlockPool,
        kv_cache_spec: KVCacheSpec,
        drop_eagle_block: bool,
        alignment_tokens: int,
        dcp_world_size: int = 1,
        pcp_world_size: int = 1,
    ) -> tuple[tuple[list[KVCacheBlock], ...], int]:
        computed, hit_length = super().find_longest_cache_hit(
            block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec,
            drop_eagle_block, alignment_tokens, dcp_world_size, pcp_world_size,
        )  # fmt: skip
        assert isinstance(kv_cache_spec, DuoStreamingSpec)
        if hit_length == 0:
            return computed, hit_length
        hashes = resolve_block_hashes(
            block_hashes, block_pool.hash_block_size, kv_cache_spec.block_size,
            supports_fine_grained_hash_lookup=cls.supports_fine_grained_hash_lookup,
            alignment_tokens=alignment_tokens,
        )  # fmt: skip
        # A hit is only usable with its sink blocks: attention still reads them.
        for i in range(min(kv_cache_spec.num_sink_blocks, len(computed[0]))):
            if not computed[0][i].is_null:
                continue
            cached = block_pool.get_cached_block(hashes[i], kv_cache_group_ids)
            if cached is None:
                return tuple([] for _ in kv_cache_group_ids), 0
            for blocks, block in zip(computed, cached):
                blocks[i] = block
        return computed, hit_length


def register_streaming_spec() -> None:
    """Teach vLLM's KV cache manager about DuoStreamingSpec (every process)."""
    # Built-ins first: registering ours into an empty registry would stop vLLM
    # from ever registering its own specs.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        DuoStreamingSpec, DuoStreamingManager, uniform_type_base_spec=DuoStreamingSpec
    )
