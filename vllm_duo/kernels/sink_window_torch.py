"""Sink+window attention over paged caches, in plain PyTorch (the CPU path).

Work per query is O(sink + recent), not O(context). Decode rows gather exactly the
sink and window slots. A prefill chunk is cut into query tiles of ``B`` queries; tile
``i`` scores the sink keys plus the band of ``B + W - 1`` keys ending at its last
query, read as strided views of one contiguous key run, so a whole chunk is a few
batched matmuls instead of a Python loop over tiles.

All streaming heads of a layer are computed together: they share the block table,
so which slots to read is planned once per step (:func:`plan_streaming`) and reused
by every head and every layer of the group.

fp8 caches (bytes, see :mod:`vllm_duo.kernels.fp8`) are dequantised as rows are gathered,
and the step's own keys/values go through the cache's quantisation first, so they read as
they would from the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm_duo.kernels.fp8 import Fp8Format, dequantize, quantize_cpu

# Keys (and values) materialised per batch of prefill tiles stay under this many elements.
_KEY_BUDGET = 1 << 24


@dataclass(frozen=True)
class _Slots:
    """Cache slots to gather: ``cache[blocks, offsets]`` for [num_blocks, block_size, D]."""

    blocks: torch.Tensor
    offsets: torch.Tensor


@dataclass(frozen=True)
class _DecodePlan:
    token_rows: torch.Tensor
    """[R] rows of the single-query requests in the step's token order."""
    slots: _Slots
    """[R, S + W] slots of the sink then window positions of each row."""
    visible: torch.Tensor
    """[R, S + W] False for positions a short sequence does not have."""
    own: torch.Tensor | None
    """[R, S + W] the query's own position, read from the step (None: from the cache)."""


@dataclass(frozen=True)
class _PrefillPlan:
    """One request's chunk of ``num_queries`` queries at positions [first, first + n)."""

    first_row: int
    num_queries: int
    tile: int
    num_tiles: int
    sink_cache: _Slots
    """Slots of the sink positions read from the cache, [S_cache]."""
    sink_step_rows: torch.Tensor
    """Step rows of the sink positions inside the chunk, [S_step]."""
    band_lead: int
    """Zero keys before position 0 at the start of the key run."""
    band_cache: _Slots
    """Slots of the run's positions read from the cache."""
    band_step_rows: torch.Tensor
    """Step rows of the run's positions inside the chunk."""
    band_len: int
    """Length of the (right-padded) key run: num_tiles * tile + recent - 1."""
    mask: torch.Tensor
    """[num_tiles, tile, S_cache + S_step + tile + recent - 1] which keys each query sees:
    the sink keys, then the tile's band."""


@dataclass(frozen=True)
class StreamingPlan:
    """Which cache slots and step rows each query of a step reads; shared by all heads."""

    num_tokens: int
    decode: _DecodePlan | None
    prefill: tuple[_PrefillPlan, ...]


def _slots(block_row: torch.Tensor, positions: torch.Tensor, block_size: int) -> _Slots:
    index = torch.div(positions, block_size, rounding_mode="floor")
    blocks = torch.gather(block_row, -1, index) if block_row.dim() > 1 else block_row[index]
    return _Slots(blocks.long(), positions % block_size)


def plan_streaming(
    block_table: torch.Tensor,
    query_start_loc: Sequence[int],
    seq_lens: Sequence[int],
    *,
    sink: int,
    recent: int,
    block_size: int,
    keys_from_step: bool,
    query_tile: int = 128,
) -> StreamingPlan:
    """Plans the reads of one step for every streaming head of a cache group.

    Args:
        block_table: [num_reqs, max_blocks] block ids of the group.
        query_start_loc: num_reqs + 1 token offsets of each request's queries.
        seq_lens: num_reqs context lengths including the scheduled queries.
        sink, recent: S and W (recent >= 1).
        block_size: tokens per cache block.
        keys_from_step: read keys of the scheduled positions from the step's K/V
            instead of the cache, whose blocks for chunk tokens that leave the window
            within the step may not exist (the bounded cache never allocates them).
        query_tile: prefill queries per tile (B).
    """
    if recent < 1 or sink < 0:
        raise ValueError(f"need sink >= 0 and recent >= 1, got sink={sink}, recent={recent}")
    num_reqs = len(seq_lens)
    decode_reqs = [r for r in range(num_reqs) if query_start_loc[r + 1] - query_start_loc[r] == 1]
    decode = _plan_decode(block_table, query_start_loc, seq_lens, decode_reqs, sink, recent,
                          block_size, keys_from_step) if decode_reqs else None  # fmt: skip
    prefill = []
    for r in range(num_reqs):
        n = query_start_loc[r + 1] - query_start_loc[r]
        if n > 1:
            chunk = _plan_prefill(block_table[r], query_start_loc[r], n, seq_lens[r], sink,
                                  recent, block_size, keys_from_step, query_tile)  # fmt: skip
            prefill.append(chunk)
    return StreamingPlan(query_start_loc[-1], decode, tuple(prefill))


def _plan_decode(
    block_table: torch.Tensor,
    query_start_loc: Sequence[int],
    seq_lens: Sequence[int],
    reqs: list[int],
    sink: int,
    recent: int,
    block_size: int,
    keys_from_step: bool,
) -> _DecodePlan:
    device = block_table.device
    lens = torch.tensor([seq_lens[r] for r in reqs], device=device)[:, None]
    sink_pos = torch.arange(sink, device=device)[None, :].expand(len(reqs), sink)
    window_pos = lens - recent + torch.arange(recent, device=device)[None, :]
    positions = torch.cat([sink_pos, window_pos], dim=1)
    # Window positions below the sink are the sink's (or do not exist): not twice.
    visible = torch.cat([sink_pos < lens, window_pos >= sink], dim=1) & (positions >= 0)
    positions = torch.where(visible, positions, torch.zeros_like(positions))
    own = ((positions == lens - 1) & visible) if keys_from_step else None
    return _DecodePlan(
        token_rows=torch.tensor([query_start_loc[r] for r in reqs], device=device),
        slots=_slots(block_table[reqs], positions, block_size),
        visible=visible,
        own=own,
    )


def _plan_prefill(
    block_row: torch.Tensor,
    first_row: int,
    n: int,
    seq_len: int,
    sink: int,
    recent: int,
    block_size: int,
    keys_from_step: bool,
    tile: int,
) -> _PrefillPlan:
    device = block_row.device
    first = seq_len - n  # position of the chunk's first query
    end = seq_len
    cached_end = first if keys_from_step else end  # positions below this come from the cache
    tile = max(1, min(tile, n))
    num_tiles = -(-n // tile)

    sink_end = min(sink, end)
    sink_cache_pos = torch.arange(min(sink_end, cached_end), device=device)
    sink_step_pos = torch.arange(min(sink_end, cached_end), sink_end, device=device)

    # Tile i's band starts at base + i * tile, base = first - recent + 1: a query at
    # offset t sees band keys j with t <= j <= t + recent - 1, whatever the tile.
    base = first - recent + 1
    band_len = num_tiles * tile + recent - 1
    lead = max(0, -base)
    run_start = max(0, base)
    band_cache_pos = torch.arange(run_start, cached_end, device=device)
    band_step_pos = torch.arange(max(run_start, cached_end), end, device=device)

    t = torch.arange(tile, device=device)[:, None]
    j = torch.arange(tile + recent - 1, device=device)[None, :]
    in_band = (j >= t) & (j <= t + recent - 1)
    key_pos = base + (torch.arange(num_tiles, device=device) * tile)[:, None] + j  # [tiles, BW]
    # Band keys below the sink are attended through the sink part, not twice.
    band_mask = in_band[None] & (key_pos >= sink)[:, None, :]
    query_pos = first + torch.arange(num_tiles * tile, device=device).view(num_tiles, tile)
    sink_keys = torch.arange(sink_end, device=device)
    sink_mask = sink_keys[None, None, :] <= query_pos[:, :, None]

    return _PrefillPlan(
        first_row=first_row,
        num_queries=n,
        tile=tile,
        num_tiles=num_tiles,
        sink_cache=_slots(block_row, sink_cache_pos, block_size),
        sink_step_rows=first_row + sink_step_pos - first,
        band_lead=lead,
        band_cache=_slots(block_row, band_cache_pos, block_size),
        band_step_rows=first_row + band_step_pos - first,
        band_len=band_len,
        # Built once per step here rather than in every layer's attention call.
        mask=torch.cat([sink_mask, band_mask], dim=-1),
    )


def _gather(
    cache: torch.Tensor, slots: _Slots, read: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """[H, *slots.shape, D] rows of a [num_blocks, block_size, H, D] cache, all heads at once."""
    return read(cache[slots.blocks, slots.offsets]).movedim(-2, 0)


def _step_rows(step: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[H, len(rows), D] rows of the step's [T, H, D] keys or values."""
    return step[rows].transpose(0, 1)


def sink_window_attention_heads(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    plan: StreamingPlan,
    *,
    scale: float,
    new_keys: torch.Tensor | None = None,
    new_values: torch.Tensor | None = None,
    kv_format: Fp8Format | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Attention of H streaming KV heads over their paged caches.

    Scores and softmax run in torch's fused CPU attention (fp32 accumulation), so a
    bf16 model gets bf16-input/fp32-accumulate precision, like vLLM's own kernel.

    Args:
        query: [num_tokens, H, G, D], the G query heads of each of the H KV heads.
        key_cache, value_cache: [num_blocks, block_size, H, D], any strides (one strided
            view over the H heads' caches), sharing ``plan``'s block table; cached positions
            must be written.
        plan: from :func:`plan_streaming` for this step.
        scale: softmax scale.
        new_keys, new_values: [num_tokens, H, D], the step's keys/values; required
            when the plan reads keys from the step.
        kv_format: the fp8 format of uint8 caches quantised by vLLM's CPU rule; None for
            caches in the query's dtype.
        k_scale, v_scale: the fp8 caches' scales.

    Returns:
        [num_tokens, H, G, D] in ``query.dtype``; rows past the scheduled tokens are zero.
    """
    num_tokens, num_heads, group, head_dim = query.shape
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if cache.dim() != 4 or cache.shape[2:] != (num_heads, head_dim):
            raise ValueError(
                f"{name}: must be [num_blocks, block_size, H={num_heads}, D={head_dim}] "
                f"for a query of {num_heads} KV heads, got {tuple(cache.shape)}"
            )
    dtype = query.dtype
    if new_keys is not None and new_keys.dtype != dtype:
        raise TypeError(f"step keys ({new_keys.dtype}) must have the query's dtype ({dtype})")
    if kv_format is None:
        if key_cache.dtype != dtype:
            raise TypeError(f"caches ({key_cache.dtype}) must have the query's dtype ({dtype})")

        def read_keys(rows: torch.Tensor) -> torch.Tensor:
            return rows

        read_values = read_keys
    else:
        if key_cache.dtype != torch.uint8 or value_cache.dtype != torch.uint8:
            raise TypeError(f"fp8 caches must hold uint8 bytes, got {key_cache.dtype}")

        def read_keys(rows: torch.Tensor) -> torch.Tensor:
            return dequantize(rows, kv_format, k_scale, dtype)

        def read_values(rows: torch.Tensor) -> torch.Tensor:
            return dequantize(rows, kv_format, v_scale, dtype)

        # The step's keys/values as the cache would hold them.
        if new_keys is not None and new_values is not None:
            new_keys = read_keys(quantize_cpu(new_keys, kv_format, k_scale))
            new_values = read_values(quantize_cpu(new_values, kv_format, v_scale))
    out = torch.zeros(num_tokens, num_heads, group, head_dim, dtype=dtype, device=query.device)
    caches = (key_cache, value_cache, read_keys, read_values)
    if plan.decode is not None:
        _decode(out, query, *caches, plan.decode, scale, new_keys, new_values)
    for chunk in plan.prefill:
        _prefill(out, query, *caches, chunk, scale, new_keys, new_values)
    return out


def _decode(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    read_keys: Callable[[torch.Tensor], torch.Tensor],
    read_values: Callable[[torch.Tensor], torch.Tensor],
    plan: _DecodePlan,
    scale: float,
    new_keys: torch.Tensor | None,
    new_values: torch.Tensor | None,
) -> None:
    k = _gather(key_cache, plan.slots, read_keys)  # [H, R, S+W, D]
    v = _gather(value_cache, plan.slots, read_values)
    if plan.own is not None:
        # The query's own key comes from the step: with W = 1 its block may not exist.
        assert new_keys is not None and new_values is not None
        own = plan.own[None, :, :, None]
        k = torch.where(own, _step_rows(new_keys, plan.token_rows)[:, :, None], k)
        v = torch.where(own, _step_rows(new_values, plan.token_rows)[:, :, None], v)
    q = query[plan.token_rows].transpose(0, 1)  # [H, R, G, D]
    attended = F.scaled_dot_product_attention(
        q, k, v, attn_mask=plan.visible[None, :, None, :], scale=scale
    )
    out[plan.token_rows] = attended.transpose(0, 1)


def _prefill(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    read_keys: Callable[[torch.Tensor], torch.Tensor],
    read_values: Callable[[torch.Tensor], torch.Tensor],
    plan: _PrefillPlan,
    scale: float,
    new_keys: torch.Tensor | None,
    new_values: torch.Tensor | None,
) -> None:
    _, num_heads, group, head_dim = query.shape
    step_rows = plan.sink_step_rows.numel() + plan.band_step_rows.numel()
    if step_rows and (new_keys is None or new_values is None):
        raise ValueError("this plan reads the chunk's keys from the step: pass new_keys/values")
    dtype = query.dtype

    def keys(cache: torch.Tensor, step: torch.Tensor | None, read):
        sink = [_gather(cache, plan.sink_cache, read)]
        run = torch.zeros(num_heads, plan.band_len, head_dim, dtype=dtype, device=query.device)
        cached = plan.band_cache.blocks.numel()
        run[:, plan.band_lead : plan.band_lead + cached] = _gather(cache, plan.band_cache, read)
        if step is not None:
            sink.append(_step_rows(step, plan.sink_step_rows))
            stepped = plan.band_step_rows.numel()
            start = plan.band_lead + cached
            run[:, start : start + stepped] = _step_rows(step, plan.band_step_rows)
        width = plan.tile + run.shape[1] - plan.num_tiles * plan.tile
        # Tile i's band is run[i * tile : i * tile + width]: overlapping strided views.
        bands = run.as_strided(
            (num_heads, plan.num_tiles, width, head_dim),
            (plan.band_len * head_dim, plan.tile * head_dim, head_dim, 1),
        )
        return torch.cat(sink, dim=1), bands

    sink_k, band_k = keys(key_cache, new_keys, read_keys)
    sink_v, band_v = keys(value_cache, new_values, read_values)
    rows = slice(plan.first_row, plan.first_row + plan.num_queries)
    padded = plan.num_tiles * plan.tile
    q = torch.zeros(padded, num_heads, group, head_dim, dtype=dtype, device=query.device)
    q[: plan.num_queries] = query[rows]
    # [H, tiles, G * tile, D]: a tile's queries of all G query heads are one row block,
    # since they read the same keys.
    q = q.view(plan.num_tiles, plan.tile, num_heads, group, head_dim).permute(2, 0, 3, 1, 4)
    q = q.reshape(num_heads, plan.num_tiles, group * plan.tile, head_dim)
    num_sink, width = sink_k.shape[1], band_k.shape[2]
    step = max(1, _KEY_BUDGET // (num_heads * (num_sink + width) * head_dim))
    result = torch.empty_like(q)
    for start in range(0, plan.num_tiles, step):
        tiles = slice(start, min(start + step, plan.num_tiles))
        n_t = tiles.stop - tiles.start
        sink_part = (num_heads, n_t, num_sink, head_dim)
        k = torch.cat([sink_k[:, None].expand(sink_part), band_k[:, tiles]], dim=2)
        v = torch.cat([sink_v[:, None].expand(sink_part), band_v[:, tiles]], dim=2)
        tile_mask = plan.mask[tiles, None].expand(n_t, group, plan.tile, num_sink + width)
        result[:, tiles] = F.scaled_dot_product_attention(
            q[:, tiles], k, v,
            attn_mask=tile_mask.reshape(1, n_t, group * plan.tile, num_sink + width),
            scale=scale,
        )  # fmt: skip
    # Back to [tokens, H, G, D].
    result = result.view(num_heads, plan.num_tiles, group, plan.tile, head_dim)
    result = result.permute(1, 3, 0, 2, 4).reshape(padded, num_heads, group, head_dim)
    out[rows] = result[: plan.num_queries]


def sink_window_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: list[int],
    seq_lens: list[int],
    *,
    sink: int,
    recent: int,
    scale: float,
    new_keys: torch.Tensor | None = None,
    new_values: torch.Tensor | None = None,
    query_tile: int = 128,
    kv_format: Fp8Format | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Attention of one streaming KV head over its paged cache.

    Args:
        query: [num_tokens, G, D], the G query heads that share this KV head.
        key_cache, value_cache: [num_blocks, block_size, D], plain row layout;
            the current step's keys/values must already be written unless given below.
        block_table: [num_reqs, max_blocks] block ids of this head's cache group.
        query_start_loc: num_reqs + 1 token offsets of each request's queries.
        seq_lens: num_reqs context lengths including the scheduled queries.
        sink, recent: S and W of the streaming pattern (recent >= 1).
        scale: softmax scale.
        new_keys, new_values: [num_tokens, D] keys/values of this step's tokens; when
            given they are read for positions of the current chunk instead of the cache.
        query_tile: prefill queries per tile.
        kv_format, k_scale, v_scale: as :func:`sink_window_attention_heads`.

    Returns:
        [num_tokens, G, D] in ``query.dtype``; rows past ``query_start_loc[-1]`` are zero.
    """
    plan = plan_streaming(
        block_table, query_start_loc, seq_lens, sink=sink, recent=recent,
        block_size=key_cache.shape[1], keys_from_step=new_keys is not None,
        query_tile=query_tile,
    )  # fmt: skip
    step = {}
    if new_keys is not None:
        step = {"new_keys": new_keys[:, None], "new_values": new_values[:, None]}
    out = sink_window_attention_heads(
        query[:, None], key_cache[:, :, None], value_cache[:, :, None], plan, scale=scale,
        kv_format=kv_format, k_scale=k_scale, v_scale=v_scale, **step,
    )  # fmt: skip
    return out[:, 0]
