"""The CPU sink+window kernels (torch path and the native op of csrc/cpu) against the dense
fp32 reference on awkward shapes."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_duo import cpu_ops
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
    cache[0] = float("nan")  # vLLM's null block: never read
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


IMPLS = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    not cpu_ops.is_available(), reason=f"CPU extension: {cpu_ops.load_error()}"))]  # fmt: skip


def _case(seq_lens, query_lens, group, sink, recent, block_size, dtype, seed, null_middle,
          step_kv=False, impl="torch"):  # fmt: skip
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
    new_keys = torch.cat([k[n - q :] for k, n, q in zip(keys, seq_lens, query_lens)]).to(dtype)
    new_values = torch.cat([v[n - q :] for v, n, q in zip(values, seq_lens, query_lens)])
    new_values = new_values.to(dtype)
    if impl == "native":
        # The native op always reads the step's own positions from new_keys/new_values.
        out = torch.zeros(query.shape[0], 1, group, head_size, dtype=dtype)
        cpu_ops.sink_window_attention(
            query[:, None], k_cache.to(dtype)[:, :, None], v_cache.to(dtype)[:, :, None],
            torch.zeros(1, dtype=torch.long), table, torch.tensor(qsl, dtype=torch.int32),
            torch.tensor(seq_lens, dtype=torch.int32), new_keys[:, None], new_values[:, None],
            sink=sink, recent=recent, scale=head_size**-0.5, out=out,
        )  # fmt: skip
        out = out[:, 0]
    else:
        step = {"new_keys": new_keys, "new_values": new_values} if step_kv else {}
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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("null_middle", [False, True])
def test_mixed_prefill_and_decode(dtype, null_middle, impl):
    _case(seq_lens=[1, 7, 45, 333, 130], query_lens=[1, 7, 1, 29, 1], group=7, sink=5,
          recent=11, block_size=16, dtype=dtype, seed=1, null_middle=null_middle,
          impl=impl)  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_chunk_keys_from_the_step_when_its_blocks_are_null(impl):
    """The bounded cache never allocates chunk blocks that leave the window in the step."""
    _case(seq_lens=[333, 200, 64], query_lens=[129, 1, 64], group=7, sink=5, recent=1,
          block_size=16, dtype=torch.float32, seed=4, null_middle=True, step_kv=True,
          impl=impl)  # fmt: skip
    _case(seq_lens=[333, 90], query_lens=[200, 1], group=3, sink=9, recent=40,
          block_size=32, dtype=torch.float32, seed=5, null_middle=True, step_kv=True,
          impl=impl)  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_sink_zero_and_window_larger_than_sequence(impl):
    _case(seq_lens=[9, 300], query_lens=[9, 1], group=1, sink=0, recent=400, block_size=32,
          dtype=torch.float32, seed=2, null_middle=False, impl=impl)  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=25, deadline=None)
@given(
    seq_lens=st.lists(st.integers(1, 90), min_size=1, max_size=4),
    group=st.integers(1, 7),
    sink=st.integers(0, 9),
    recent=st.integers(1, 23),
    block_size=st.sampled_from([4, 16, 32]),
    data=st.data(),
)
def test_random_shapes(seq_lens, group, sink, recent, block_size, data, impl):
    query_lens = [data.draw(st.integers(1, n)) for n in seq_lens]
    _case(seq_lens, query_lens, group, sink, recent, block_size, torch.float32, seed=3,
          null_middle=True, impl=impl)  # fmt: skip


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


@pytest.mark.skipif(not cpu_ops.is_available(), reason=f"CPU extension: {cpu_ops.load_error()}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_store_and_attention_of_some_heads_of_a_layer(dtype):
    """The op pair the CPU family calls per run: store the step's K/V of R of the layer's
    heads through one strided view, then attend for exactly those heads."""
    layer_heads, group, head_size, block_size, sink, recent = 5, 7, 32, 16, 5, 11
    seq_lens, query_lens = [1, 45, 333, 130], [1, 45, 29, 1]
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 2
    torch.manual_seed(9)
    # Each head's cache in its own region of one buffer (vLLM's layer-major layout).
    buffer = torch.full((layer_heads, num_blocks, block_size, head_size), float("nan"))
    buffer = buffer.to(dtype)
    value_buffer = torch.full_like(buffer, float("nan"))
    # The run: layer heads 1 and 3, whose caches sit two regions apart (a strided view).
    heads = torch.tensor([1, 3])
    key_cache = buffer.permute(1, 2, 0, 3)[:, :, 1::2]
    value_cache = value_buffer.permute(1, 2, 0, 3)[:, :, 1::2]
    assert key_cache.data_ptr() == buffer[1].data_ptr()
    rng = random.Random(3)
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    table = torch.zeros(
        len(seq_lens), max(-(-n // block_size) for n in seq_lens), dtype=torch.int32
    )
    for r, n in enumerate(seq_lens):
        for b in range(-(-n // block_size)):
            table[r, b] = free.pop()
    keys = [torch.randn(n, layer_heads, head_size).to(dtype) for n in seq_lens]
    values = [torch.randn(n, layer_heads, head_size).to(dtype) for n in seq_lens]
    # Older positions are already cached; the step's go through store_kv.
    for r, (n, q) in enumerate(zip(seq_lens, query_lens)):
        for pos in range(n - q):
            block, offset = table[r, pos // block_size], pos % block_size
            key_cache[block, offset] = keys[r][pos, heads]
            value_cache[block, offset] = values[r][pos, heads]
    new_keys = torch.cat([k[n - q :] for k, n, q in zip(keys, seq_lens, query_lens)])
    new_values = torch.cat([v[n - q :] for v, n, q in zip(values, seq_lens, query_lens)])
    slots = torch.cat([
        table[r, torch.arange(n - q, n) // block_size].long() * block_size
        + torch.arange(n - q, n) % block_size
        for r, (n, q) in enumerate(zip(seq_lens, query_lens))
    ])  # fmt: skip
    # A padding slot, and a chunk token mapped to the null block: neither is stored (the
    # op reads the step's own positions from new_keys, never from the cache).
    slots[3] = -1
    slots[7] = 5
    cpu_ops.store_kv(new_keys, new_values, heads, torch.cat([slots, torch.tensor([-1])]),
                     key_cache, value_cache, min_slot=block_size)  # fmt: skip
    assert not torch.isnan(buffer[1]).all(), "stored nothing"
    assert all(torch.isnan(buffer[h]).all() for h in (0, 2, 4)), "wrote another head"
    assert torch.isnan(buffer[:, 0]).all(), "wrote the null block"
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(int(qsl[-1]), layer_heads, group, head_size).to(dtype)
    out = torch.zeros_like(query)
    cpu_ops.sink_window_attention(
        query, key_cache, value_cache, heads, table, qsl, torch.tensor(seq_lens, dtype=torch.int32),
        new_keys, new_values, sink=sink, recent=recent, scale=head_size**-0.5, out=out,
    )  # fmt: skip
    untouched = [h for h in range(layer_heads) if h not in heads.tolist()]
    assert (out[:, untouched] == 0).all()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for r, (n, q) in enumerate(zip(seq_lens, query_lens)):
        for head in heads.tolist():
            full_q = torch.zeros(group, n, head_size)
            full_q[:, n - q :] = query[qsl[r] : qsl[r + 1], head].float().transpose(0, 1)
            want = duo_attention(
                full_q, keys[r][:, head].float()[None], values[r][:, head].float()[None], [True],
                sink=sink, recent=recent, scale=head_size**-0.5,
            )[:, n - q :].transpose(0, 1)  # fmt: skip
            got = out[qsl[r] : qsl[r + 1], head].float()
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
