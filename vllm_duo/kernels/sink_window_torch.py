"""Sink+window attention over a paged cache, in plain PyTorch (the CPU path).

Work per query is O(sink + recent), not O(context): decode rows gather exactly
the sink and window slots; prefill rows are cut into query tiles and each tile
gathers only the keys its queries can see.
"""

from __future__ import annotations

import torch

from vllm_duo.kernels.slots import streaming_key_ranges

_NEG_INF = float("-inf")


def _gather(cache: torch.Tensor, block_row: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of ``cache`` [num_blocks, block_size, D] at token ``positions``."""
    block_size = cache.shape[1]
    blocks = block_row[torch.div(positions, block_size, rounding_mode="floor")]
    return cache[blocks.long(), positions % block_size]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [..., G, Tq, D], k/v [..., Tk, D], mask [..., Tq, Tk] -> [..., G, Tq, D] in fp32."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2).unsqueeze(-3)) * scale
    scores = scores.masked_fill(~mask.unsqueeze(-3), _NEG_INF)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float().unsqueeze(-3))


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
) -> torch.Tensor:
    """Attention of one streaming KV head over its paged cache.

    Args:
        query: [num_tokens, G, D], the G query heads that share this KV head.
        key_cache, value_cache: [num_blocks, block_size, D], plain row layout;
            the current step's keys/values must already be written.
        block_table: [num_reqs, max_blocks] block ids of this head's cache group.
        query_start_loc: num_reqs + 1 token offsets of each request's queries.
        seq_lens: num_reqs context lengths including the scheduled queries.
        sink, recent: S and W of the streaming pattern (recent >= 1).
        scale: softmax scale.
        new_keys, new_values: [num_tokens, D] keys/values of this step's tokens. When
            given they are read for positions of the current chunk instead of the cache,
            whose blocks for chunk tokens that leave the window within the step may not
            exist (the bounded cache never allocates them).
        query_tile: prefill queries handled per gather.

    Returns:
        [num_tokens, G, D] in ``query.dtype``; rows past ``query_start_loc[-1]``
        are zero.
    """
    num_tokens, num_q, head_dim = query.shape
    out = torch.zeros(num_tokens, num_q, head_dim, dtype=torch.float32, device=query.device)
    num_reqs = len(seq_lens)
    decode_rows = [r for r in range(num_reqs) if query_start_loc[r + 1] - query_start_loc[r] == 1]
    if decode_rows:
        _decode(
            out,
            query,
            key_cache,
            value_cache,
            block_table,
            query_start_loc,
            seq_lens,
            decode_rows,
            sink,
            recent,
            scale,
            new_keys,
            new_values,
        )
    for r in range(num_reqs):
        start, end = query_start_loc[r], query_start_loc[r + 1]
        if end - start <= 1:
            continue
        context_start = seq_lens[r] - (end - start)
        for tile in range(start, end, query_tile):
            tile_end = min(tile + query_tile, end)
            first_pos = context_start + (tile - start)
            last_pos = first_pos + (tile_end - tile)
            key_pos = torch.cat(
                [
                    torch.arange(a, b, device=query.device)
                    for a, b in streaming_key_ranges(first_pos, last_pos, sink, recent)
                ]
            )
            q_pos = torch.arange(first_pos, last_pos, device=query.device)
            rel = q_pos[:, None] - key_pos[None, :]
            mask = (rel >= 0) & ((key_pos[None, :] < sink) | (rel < recent))
            if new_keys is None:
                k = _gather(key_cache, block_table[r], key_pos)
                v = _gather(value_cache, block_table[r], key_pos)
            else:
                k, v = _gather_mixed(
                    key_cache,
                    value_cache,
                    new_keys,
                    new_values,
                    block_table[r],
                    key_pos,
                    context_start,
                    start,
                )
            q = query[tile:tile_end].transpose(0, 1)  # [G, Tq, D]
            out[tile:tile_end] = _attend(q, k, v, mask, scale).transpose(0, 1)
    return out.to(query.dtype)


def _gather_mixed(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    block_row: torch.Tensor,
    positions: torch.Tensor,
    context_start: int,
    first_token: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values at ``positions``: older ones from the cache, this chunk's from the step."""
    in_chunk = positions >= context_start
    rows = first_token + positions[in_chunk] - context_start
    old = positions[~in_chunk]
    k = torch.cat([_gather(key_cache, block_row, old), new_keys[rows].to(key_cache.dtype)])
    v = torch.cat([_gather(value_cache, block_row, old), new_values[rows].to(value_cache.dtype)])
    # Ranges are sorted and the chunk is their tail, so the order is unchanged.
    return k, v


def _decode(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: list[int],
    seq_lens: list[int],
    rows: list[int],
    sink: int,
    recent: int,
    scale: float,
    new_keys: torch.Tensor | None,
    new_values: torch.Tensor | None,
) -> None:
    """All single-query rows at once: each gathers exactly sink + recent slots."""
    device = query.device
    lens = torch.tensor([seq_lens[r] for r in rows], device=device)[:, None]
    sink_pos = torch.arange(sink, device=device)[None, :].expand(len(rows), sink)
    window_pos = lens - recent + torch.arange(recent, device=device)[None, :]
    positions = torch.cat([sink_pos, window_pos], dim=1)
    valid = torch.cat([sink_pos < lens, window_pos >= sink], dim=1) & (positions >= 0)
    positions = torch.where(valid, positions, torch.zeros_like(positions))
    block_size = key_cache.shape[1]
    tables = block_table[rows]
    blocks = torch.gather(tables, 1, torch.div(positions, block_size, rounding_mode="floor"))
    offsets = positions % block_size
    k = key_cache[blocks.long(), offsets]  # [R, S+W, D]
    v = value_cache[blocks.long(), offsets]
    token_idx = [query_start_loc[r] for r in rows]
    if new_keys is not None:
        # The query's own key comes from the step: with W = 1 its block may not exist.
        own = (positions == lens - 1) & valid
        step_k = new_keys[token_idx].to(k.dtype)[:, None, :]
        step_v = new_values[token_idx].to(v.dtype)[:, None, :]
        k = torch.where(own[..., None], step_k, k)
        v = torch.where(own[..., None], step_v, v)
    q = query[token_idx].unsqueeze(2)  # [R, G, 1, D]
    attended = _attend(q, k, v, valid.unsqueeze(1), scale)  # [R, G, 1, D]
    out[token_idx] = attended.squeeze(2)
