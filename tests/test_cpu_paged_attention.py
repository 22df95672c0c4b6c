"""The native CPU attention op of retrieval heads (csrc/cpu/paged_attention_cpu.*), decode
queries and prefill chunks, against the dense fp32 reference on awkward shapes, and on pages
written by vLLM's own CPU cache write."""

from __future__ import annotations

import random

import pytest
import torch

from vllm_duo import cpu_ops
from vllm_duo.reference import duo_attention

pytestmark = pytest.mark.skipif(
    not cpu_ops.is_available(), reason=f"CPU extension: {cpu_ops.load_error()}"
)


def _pages(keys, values, heads, layer_heads, block_size, seed, *, garbage=float("nan")):
    """vLLM's CPU pages of the layer, [num_blocks, layer_heads, block_size, 2 * D]: per block
    and head the keys transposed ([D][block_size]), then the value rows. Requests' blocks are
    randomly permuted; every other slot (unused blocks, tails, block 0) holds ``garbage``."""
    rng = random.Random(seed)
    head_size = keys[0].shape[-1]
    num_blocks = sum(-(-k.shape[1] // block_size) for k in keys) + 3
    cache = torch.full((num_blocks, layer_heads, block_size, 2 * head_size), garbage)
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    max_blocks = max(-(-k.shape[1] // block_size) for k in keys) + 2
    table = torch.zeros(len(keys), max_blocks, dtype=torch.int32)  # null past each sequence
    for r, (k, v) in enumerate(zip(keys, values, strict=True)):
        for b in range(-(-k.shape[1] // block_size)):
            block = free.pop()
            table[r, b] = block
            span = slice(b * block_size, (b + 1) * block_size)
            n = k[:, span].shape[1]
            page = cache[block].view(layer_heads, 2 * block_size * head_size)
            keys_t = page[:, : block_size * head_size].view(layer_heads, head_size, block_size)
            rows = page[:, block_size * head_size :].view(layer_heads, block_size, head_size)
            keys_t[heads, :, :n] = k[:, span].transpose(1, 2)
            rows[heads, :n] = v[:, span]
    return cache, table


def _case(seq_lens, layer_heads, heads, group, head_size, block_size, dtype, seed,
          query_lens=None):  # fmt: skip
    """(op output, fp32 reference) of the queries of ``heads`` of a layer: request r's
    ``query_lens[r]`` (default 1: decode) queries at the last of its ``seq_lens[r]``
    positions."""
    torch.manual_seed(seed)
    run = len(heads)
    query_lens = query_lens or [1] * len(seq_lens)
    keys = [torch.randn(run, n, head_size) for n in seq_lens]
    values = [torch.randn(run, n, head_size) for n in seq_lens]
    layer_cache, table = _pages(keys, values, heads, layer_heads, block_size, seed)
    cache = layer_cache.to(dtype)[:, heads]  # a copy where the heads are not equally spaced
    if len(heads) > 1 and heads == list(range(heads[0], heads[-1] + 1, heads[1] - heads[0])):
        cache = layer_cache.to(dtype)[:, heads[0] :: heads[1] - heads[0]][:, :run]  # a view
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    # Two padding tokens past the requests' queries: never written.
    query = torch.randn(starts[-1] + 2, layer_heads, group, head_size).to(dtype)
    out = torch.full_like(query, float("nan"))
    scale = head_size**-0.5
    cpu_ops.paged_attention(
        query, cache, torch.tensor(heads), table, torch.tensor(starts, dtype=torch.int32),
        torch.tensor(seq_lens, dtype=torch.int32), scale=scale, out=out,
    )  # fmt: skip
    expected = torch.empty(starts[-1], run, group, head_size)
    for r, (length, n) in enumerate(zip(seq_lens, query_lens, strict=True)):
        k = keys[r].to(dtype).float()
        v = values[r].to(dtype).float()
        # Queries at the last n positions; earlier rows of the reference are not compared.
        q = torch.zeros(run * group, length, head_size)
        rows = query[starts[r] : starts[r + 1], heads].float()  # [n, run, group, D]
        q[:, length - n :] = rows.permute(1, 2, 0, 3).reshape(run * group, n, head_size)
        dense = duo_attention(q, k, v, [False] * run, sink=0, recent=1, scale=scale)
        expected[starts[r] : starts[r + 1]] = (
            dense[:, length - n :].view(run, group, n, head_size).permute(2, 0, 1, 3)
        )
    untouched = [h for h in range(layer_heads) if h not in heads]
    assert out[:, untouched].isnan().all() and out[starts[-1] :].isnan().all()
    return out[: starts[-1], heads].float(), expected


TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("seq_lens", "layer_heads", "heads", "group", "head_size", "block_size"),
    [
        ([1, 97, 1500], 5, [0, 2, 3], 7, 64, 32),  # 7 query heads, odd lengths, gaps
        ([4097, 33], 2, [1], 4, 128, 128),  # long context split across parts
        ([700], 3, [0, 1, 2], 9, 80, 16),  # head size 80 (vLLM's vec16), two row groups
        ([129, 1, 2048, 511], 8, [1, 3, 5, 7], 1, 32, 64),  # MHA, every other head
    ],
)
def test_matches_the_fp32_reference(seq_lens, layer_heads, heads, group, head_size,
                                    block_size, dtype):  # fmt: skip
    out, expected = _case(seq_lens, layer_heads, heads, group, head_size, block_size, dtype, 0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("seq_lens", "query_lens", "layer_heads", "heads", "group", "head_size", "block_size"),
    [
        # A mixed step: decodes, a whole prompt, a chunk after a cached prefix, on 7 query
        # heads per KV head (row tiles of 4 + 3), odd lengths.
        ([300, 1, 517, 2000], [1, 1, 517, 333], 3, [0, 2], 7, 64, 32),
        # A prompt longer than a work item (128 rows = 32 positions x 4) and a key chunk.
        ([700, 129], [700, 129], 2, [1], 4, 128, 128),
        # MHA, block 16 (vLLM's vec16), head size 80.
        ([95, 40], [50, 40], 4, [0, 1, 2, 3], 1, 80, 16),
    ],
)
def test_prefill_chunks_match_the_fp32_reference(seq_lens, query_lens, layer_heads, heads,
                                                 group, head_size, block_size, dtype):  # fmt: skip
    out, expected = _case(seq_lens, layer_heads, heads, group, head_size, block_size, dtype, 3,
                          query_lens)  # fmt: skip
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_split_context_is_independent_of_the_thread_count(threads):
    """The parts a decode context is cut into depend on the threads; the result must not
    (beyond fp32 rounding of the combine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, expected = _case([3001, 5], 1, [0], 2, 64, 32, torch.float32, 1)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(("isa", "block_size", "head_size"), [("vec", 32, 64), ("vec16", 16, 80)])
def test_reads_the_pages_vllm_writes(isa, block_size, head_size):
    """Keys and values written by vLLM's cpu_attn_reshape_and_cache, then read by the op:
    the page layout the CPU family relies on (vllm_duo/families/cpu.py::_PAGE_LAYOUT_ISAS)."""
    from vllm_duo._vllm import ops
    from vllm_duo.head_layout import split_pages

    torch.manual_seed(2)
    heads, group, length = 3, 2, 150
    num_blocks = -(-length // block_size) + 2
    cache = torch.zeros(num_blocks, heads, block_size, 2 * head_size, dtype=torch.bfloat16)
    key_pages, value_pages = split_pages(cache)
    table = (torch.randperm(num_blocks - 1)[: -(-length // block_size)] + 1).int()[None]
    positions = torch.arange(length)
    slots = (table[0, positions // block_size] * block_size + positions % block_size).long()
    keys = torch.randn(length, heads, head_size).bfloat16()
    values = torch.randn(length, heads, head_size).bfloat16()
    ops.cpu_attn_reshape_and_cache(keys, values, key_pages, value_pages, slots, isa)
    query = torch.randn(1, heads, group, head_size).bfloat16()
    out = torch.empty_like(query)
    scale = head_size**-0.5
    cpu_ops.paged_attention(
        query, cache, torch.arange(heads), table, torch.tensor([0, 1], dtype=torch.int32),
        torch.tensor([length], dtype=torch.int32), scale=scale, out=out,
    )  # fmt: skip
    q = torch.zeros(heads * group, length, head_size)
    q[:, -1] = query[0].float().reshape(heads * group, head_size)
    dense = duo_attention(q, keys.float().transpose(0, 1), values.float().transpose(0, 1),
                          [False] * heads, sink=0, recent=1, scale=scale)  # fmt: skip
    expected = dense[:, -1].view(heads, group, head_size)
    torch.testing.assert_close(out[0].float(), expected, atol=2e-2, rtol=2e-2)


def _args(**change):
    """Valid arguments of a 2-request, 2-head decode; ``change`` replaces some."""
    cache = torch.randn(4, 2, 16, 64).bfloat16()
    args = {
        "query": torch.randn(2, 2, 3, 32).bfloat16(),
        "cache": cache,
        "heads": torch.tensor([0, 1]),
        "block_table": torch.tensor([[1, 2], [3, 0]], dtype=torch.int32),
        "query_start_loc": torch.tensor([0, 1, 2], dtype=torch.int32),
        "seq_lens": torch.tensor([20, 16], dtype=torch.int32),
    }
    args.update(change)
    out = torch.empty_like(args["query"])
    return args, out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"block_table": torch.tensor([[1, 9], [3, 0]], dtype=torch.int32)},
         r"block_table\[0, 1\] = 9 is outside the cache \(0..3\)"),
        ({"seq_lens": torch.tensor([20, 0], dtype=torch.int32)},
         r"request 1 has 1 queries but seq_lens\[1\] = 0"),
        ({"seq_lens": torch.tensor([40, 1], dtype=torch.int32)},
         r"seq_lens\[0\] = 40 must be at most 32"),
        ({"query_start_loc": torch.tensor([0, 2, 5], dtype=torch.int32)},
         r"query_start_loc must start at 0 and end at most at num_tokens=2"),
        ({"cache": torch.randn(4, 2, 16, 64)},
         r"cache dtype Float must match the query's BFloat16"),
        ({"heads": torch.tensor([0, 2])}, r"heads\[1\] = 2 is not a KV head of the layer \(0..1\)"),
        ({"query": torch.randn(2, 2, 3, 24).bfloat16(), "cache": torch.randn(4, 2, 16, 48)
          .bfloat16()}, r"head_size 24 must be a multiple of 16"),
    ],
)  # fmt: skip
def test_bad_arguments_get_one_clear_error(change, message):
    args, out = _args(**change)
    with pytest.raises(RuntimeError, match=message):
        cpu_ops.paged_attention(**args, scale=0.1, out=out)
