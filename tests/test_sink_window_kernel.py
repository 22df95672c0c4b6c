"""The CPU sink+window kernel against the dense fp32 reference on awkward shapes."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_duo.kernels.sink_window_torch import (
    plan_streaming,
    sink_window_attention,
    sink_window_attention_heads,
)
from vllm_duo.kernels.slots import streaming_key_ranges, streaming_visible
from vllm_duo.reference import duo_attention


def _paged(keys: list[torch.Tensor], block_size: int, num_blocks: int, seed: int):
    """Scatter each request's [L, D] keys into randomly permuted blocks; block 0 is null."""
    rng = random.Random(seed)
    head_size = keys[0].shape[-1]
    cache = torch.randn(num_blocks, block_size, head_size)  # garbage everywhere else
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    max_blocks = max(-(-k.shape[0] // block_size) for k in keys)
    table = torch.zeros(len(keys), max_blocks, dtype=torch.int32)
    for r, k in enumerate(keys):
        for b in range(-(-k.shape[0] // block_size)):
            block = free.pop()
            table[r, b] = block
            chunk = k[b * block_size : (b + 1) * block_size]
            cache[block, : chunk.shape[0]] = chunk
    return cache, table


def _case(seq_lens, query_lens, group, sink, recent, block_size, dtype, seed, null_middle,
          step_kv=False):  # fmt: skip
    torch.manual_seed(seed)
    head_size = 32
    keys = [torch.randn(n, head_size) for n in seq_lens]
    values = [torch.randn(n, head_size) for n in seq_lens]
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    k_cache, table = _paged(keys, block_size, num_blocks, seed)
    v_cache, _ = _paged(values, block_size, num_blocks, seed)
    if null_middle:
        # Blocks wholly outside every query's sink and window may be freed (null).
        for r, n in enumerate(seq_lens):
            first_query = n - query_lens[r]
            for b in range(table.shape[1]):
                lo, hi = b * block_size, (b + 1) * block_size
                needed = any(
                    a < hi and lo < e for a, e in streaming_key_ranges(first_query, n, sink, recent)
                )
                if not needed and lo < n:
                    table[r, b] = 0
    queries = [torch.randn(q, group, head_size) for q in query_lens]
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    query = torch.cat(queries).to(dtype)
    step = {}
    if step_kv:
        step["new_keys"] = torch.cat([k[n - q :] for k, n, q in zip(keys, seq_lens, query_lens)])
        step["new_values"] = torch.cat(
            [v[n - q :] for v, n, q in zip(values, seq_lens, query_lens)]
        )
    out = sink_window_attention(
        query, k_cache.to(dtype), v_cache.to(dtype), table, qsl, list(seq_lens),
        sink=sink, recent=recent, scale=head_size**-0.5, query_tile=7, **step,
    )  # fmt: skip
    for r, n in enumerate(seq_lens):
        q_len = query_lens[r]
        # Dense reference over the whole sequence; compare the scheduled queries.
        full_q = torch.zeros(group, n, head_size)
        full_q[:, n - q_len :] = queries[r].to(dtype).float().transpose(0, 1)
        want = duo_attention(
            full_q, keys[r].to(dtype).float()[None], values[r].to(dtype).float()[None],
            [True], sink=sink, recent=recent, scale=head_size**-0.5,
        )[:, n - q_len :].transpose(0, 1)  # fmt: skip
        got = out[qsl[r] : qsl[r + 1]].float()
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("null_middle", [False, True])
def test_mixed_prefill_and_decode(dtype, null_middle):
    _case(seq_lens=[1, 7, 45, 333, 130], query_lens=[1, 7, 1, 29, 1], group=7, sink=5,
          recent=11, block_size=16, dtype=dtype, seed=1, null_middle=null_middle)  # fmt: skip


def test_chunk_keys_from_the_step_when_its_blocks_are_null():
    """The bounded cache never allocates chunk blocks that leave the window in the step."""
    _case(seq_lens=[333, 200, 64], query_lens=[129, 1, 64], group=7, sink=5, recent=1,
          block_size=16, dtype=torch.float32, seed=4, null_middle=True, step_kv=True)  # fmt: skip
    _case(seq_lens=[333, 90], query_lens=[200, 1], group=3, sink=9, recent=40,
          block_size=32, dtype=torch.float32, seed=5, null_middle=True, step_kv=True)  # fmt: skip


def test_sink_zero_and_window_larger_than_sequence():
    _case(seq_lens=[9, 300], query_lens=[9, 1], group=1, sink=0, recent=400, block_size=32,
          dtype=torch.float32, seed=2, null_middle=False)  # fmt: skip


@settings(max_examples=25, deadline=None)
@given(
    seq_lens=st.lists(st.integers(1, 90), min_size=1, max_size=4),
    group=st.integers(1, 7),
    sink=st.integers(0, 9),
    recent=st.integers(1, 23),
    block_size=st.sampled_from([4, 16, 32]),
    data=st.data(),
)
def test_random_shapes(seq_lens, group, sink, recent, block_size, data):
    query_lens = [data.draw(st.integers(1, n)) for n in seq_lens]
    _case(seq_lens, query_lens, group, sink, recent, block_size, torch.float32, seed=3,
          null_middle=True)  # fmt: skip


@given(st.integers(0, 200), st.integers(1, 40), st.integers(0, 20), st.integers(1, 50))
def test_key_ranges_cover_exactly_the_visible_keys(q_start, q_len, sink, recent):
    q_end = q_start + q_len
    ranges = streaming_key_ranges(q_start, q_end, sink, recent)
    covered = {j for a, b in ranges for j in range(a, b)}
    needed = {j for p in range(q_start, q_end) for j in range(q_end)
              if streaming_visible(p, j, sink, recent)}  # fmt: skip
    assert needed <= covered
    assert len(covered) <= sink + recent + q_len - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_heads_together_equal_each_head_alone(dtype):
    """The backend computes all streaming heads of a layer in one call on one plan."""
    seq_lens, query_lens, group, head_size, block_size = (
        [1, 7, 45, 333, 130],
        [1, 7, 1, 29, 1],
        7,
        32,
        16,
    )
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    torch.manual_seed(7)
    heads = []
    for _ in range(3):
        keys = [torch.randn(n, head_size) for n in seq_lens]
        values = [torch.randn(n, head_size) for n in seq_lens]
        k_cache, table = _paged(keys, block_size, num_blocks, seed=11)  # same table for all
        v_cache, _ = _paged(values, block_size, num_blocks, seed=11)
        step_k = torch.cat([k[n - q :] for k, n, q in zip(keys, seq_lens, query_lens)])
        step_v = torch.cat([v[n - q :] for v, n, q in zip(values, seq_lens, query_lens)])
        heads.append((k_cache.to(dtype), v_cache.to(dtype), step_k.to(dtype), step_v.to(dtype)))
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    query = torch.randn(qsl[-1], 3, group, head_size).to(dtype)
    settings_ = dict(sink=5, recent=11, scale=head_size**-0.5)
    plan = plan_streaming(table, qsl, seq_lens, sink=5, recent=11, block_size=block_size,
                          keys_from_step=True, query_tile=8)  # fmt: skip
    # Each head's cache in its own region of one buffer, as vLLM lays out one-head cache
    # layers: the heads-together view is strided over heads, not contiguous.
    key_cache = torch.stack([h[0] for h in heads]).permute(1, 2, 0, 3)
    value_cache = torch.stack([h[1] for h in heads]).permute(1, 2, 0, 3)
    assert not key_cache.is_contiguous()
    together = sink_window_attention_heads(
        query, key_cache, value_cache, plan, scale=settings_["scale"],
        new_keys=torch.stack([h[2] for h in heads], 1),
        new_values=torch.stack([h[3] for h in heads], 1),
    )  # fmt: skip
    for i, (k_cache, v_cache, step_k, step_v) in enumerate(heads):
        alone = sink_window_attention(query[:, i], k_cache, v_cache, table, qsl, seq_lens,
                                      new_keys=step_k, new_values=step_v, query_tile=5,
                                      **settings_)  # fmt: skip
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(together[:, i].float(), alone.float(), atol=tol, rtol=tol)
