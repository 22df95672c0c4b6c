"""Runs of head caches: which heads of a layer one kernel call serves, and their views."""

from __future__ import annotations

import pytest
import torch

from vllm_duo.head_layout import HeadCacheRef, HeadRun, plan_runs, split_pages

BLOCKS, BLOCK_SIZE, HEAD_SIZE = 5, 4, 8
PAGE = BLOCK_SIZE * 2 * HEAD_SIZE


def _buffer(layers: int) -> torch.Tensor:
    """One backing allocation of ``layers`` one-head cache layers, layer-major (LBHNC)."""
    return torch.arange(layers * BLOCKS * PAGE, dtype=torch.float32)


def _layer(buffer: torch.Tensor, index: int) -> torch.Tensor:
    return buffer.as_strided(
        (BLOCKS, 1, BLOCK_SIZE, 2 * HEAD_SIZE), (PAGE, PAGE, 2 * HEAD_SIZE, 1),
        index * BLOCKS * PAGE,
    )  # fmt: skip


def _ref(buffer, index, head, retrieval, group="g0"):
    return HeadCacheRef(f"layer.{index}", group, head, retrieval, _layer(buffer, index))


def test_equally_spaced_heads_of_one_kind_and_group_make_one_run() -> None:
    buffer = _buffer(8)
    # Layer slots 2, 3, 4 hold retrieval heads 5, 1, 3 of the model layer; 6 and 7 streaming.
    refs = [_ref(buffer, 2, 5, True), _ref(buffer, 4, 3, True), _ref(buffer, 3, 1, True),
            _ref(buffer, 6, 0, False, "g1"), _ref(buffer, 7, 2, False, "g1")]  # fmt: skip
    runs = plan_runs(refs)
    assert [(r.retrieval, r.kv_heads, r.metadata_layer) for r in runs] == [
        (True, (5, 1, 3), "layer.2"),  # memory order, not head order
        (False, (0, 2), "layer.6"),
    ]
    for run in runs:
        for i, head in enumerate(run.kv_heads):
            slot = next(r for r in refs if r.local_kv_head == head and r.retrieval == run.retrieval)
            assert torch.equal(run.cache[:, i], slot.cache[:, 0])
            assert run.cache[:, i].data_ptr() == slot.cache.data_ptr()  # a view, not a copy


def test_unequal_gaps_groups_and_kinds_split_runs() -> None:
    buffer = _buffer(10)
    refs = [_ref(buffer, 0, 0, True), _ref(buffer, 1, 1, True), _ref(buffer, 3, 2, True),
            _ref(buffer, 4, 3, True, "other"), _ref(buffer, 5, 4, False)]  # fmt: skip
    runs = plan_runs(refs)
    assert [(r.kv_heads, r.retrieval) for r in runs] == [
        ((0, 1), True),
        ((2,), True),
        ((4,), False),
        ((3,), True),
    ]


@pytest.mark.parametrize(
    ("heads", "head_slice", "head_range"),
    [((3,), slice(3, 4, 1), slice(3, 4, 1)), ((0, 1, 2), slice(0, 3, 1), slice(0, 3, 1)),
     ((0, 2, 4), slice(0, 6, 2), None), ((1, 4), slice(1, 7, 3), None), ((0, 1, 3), None, None),
     ((2, 1), None, None)],
)  # fmt: skip
def test_head_slices(heads, head_slice, head_range) -> None:
    buffer = _buffer(len(heads))
    cache = buffer.as_strided((BLOCKS, len(heads), BLOCK_SIZE, 2 * HEAD_SIZE),
                              (PAGE, BLOCKS * PAGE, 2 * HEAD_SIZE, 1))  # fmt: skip
    run = HeadRun("layer", True, heads, cache)
    assert run.head_slice == head_slice
    assert run.head_range == head_range
    assert run.index.tolist() == list(heads)
    layer = torch.arange(6)
    if head_slice is not None:
        assert layer[head_slice].tolist() == list(heads)


def test_split_pages_gives_keys_then_values_of_each_block() -> None:
    buffer = _buffer(2)
    cache = buffer.as_strided((BLOCKS, 2, BLOCK_SIZE, 2 * HEAD_SIZE),
                              (PAGE, BLOCKS * PAGE, 2 * HEAD_SIZE, 1))  # fmt: skip
    keys, values = split_pages(cache)
    rows = cache.reshape(BLOCKS, 2, 2 * BLOCK_SIZE, HEAD_SIZE)  # copies: the reference
    assert torch.equal(keys, rows[:, :, :BLOCK_SIZE])
    assert torch.equal(values, rows[:, :, BLOCK_SIZE:])
    run = HeadRun("layer", False, (0, 1), cache)
    assert torch.equal(run.keys, keys.transpose(1, 2))
    with pytest.raises(ValueError, match="contiguous"):
        split_pages(cache.transpose(2, 3).contiguous().transpose(2, 3))


def test_bad_shapes_are_refused() -> None:
    buffer = _buffer(2)
    with pytest.raises(ValueError, match="num_blocks, 1, block_size"):
        HeadCacheRef("x", "g", 0, True, buffer.view(2, BLOCKS, BLOCK_SIZE, 2 * HEAD_SIZE))
    with pytest.raises(ValueError, match="one cache view head per KV head"):
        HeadRun("x", True, (0, 1), _layer(buffer, 0))
