"""What every kernel family of the DUO backend is given, and what it must do.

A *family* computes the attention of one :class:`~vllm_duo.head_layout.HeadRun` (the KV heads
of one layer that share a cache group and an attention kind) with one write of the step's
keys/values and one attention call. The backend's impl picks one family per process
(``VLLM_DUO_KERNELS``) and hands it each run of each layer; the builder prepares, once per
step and cache group, whatever the family needs on the host (:class:`GroupStep`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from vllm_duo.head_layout import HeadRun


class GroupStep(Protocol):
    """Per-step metadata of one KV cache group, as the backend's builder makes it."""

    num_actual_tokens: int
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    """[num_reqs + 1] int32 token offsets, on the device."""
    query_start_loc_host: list[int]
    seq_lens: torch.Tensor
    """[num_reqs] int32 context lengths including this step's tokens, on the device."""
    seq_lens_host: list[int] | None
    """Host copy where it costs no device sync (None on GPUs without an exact copy)."""
    block_table: torch.Tensor
    """[num_reqs, max_blocks] int32 block ids of the group."""
    slot_mapping: torch.Tensor
    """[num_tokens] cache slot of each token; -1 for padding."""
    num_decodes: int
    """Leading single-query requests (the GPU family asks vLLM to put decodes first)."""
    num_decode_tokens: int
    isa: str | None
    """vLLM's CPU kernel ISA for the group's retrieval caches (CPU family), else None."""
    step_cache: dict[str, Any]
    """Per-step memo shared by every layer of the group (plans, kernel scheduling)."""


class KVScales(Protocol):
    """The attention layer's quantisation scales (vLLM's ``Attention`` module)."""

    _k_scale_float: float
    _v_scale_float: float


class KernelFamily(Protocol):
    """One device's kernels for both head kinds."""

    name: str

    def describe(self) -> str:
        """Which kernels serve retrieval and streaming heads (for the start-up line)."""
        ...

    def forward_run(
        self,
        run: HeadRun,
        step: GroupStep,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        output: torch.Tensor,
        scales: KVScales,
    ) -> None:
        """Writes the run's keys/values of this step and its attention into ``output``.

        Args:
            run: the heads, their cache view [num_blocks, r, block_size, 2 * D].
            step: metadata of the run's cache group.
            query: [num_tokens, num_kv_heads, G, D] the layer's queries.
            key, value: [num_tokens, num_kv_heads, D] the layer's new keys/values.
            output: [num_tokens, num_kv_heads, G, D], the run's heads written in place.
            scales: the layer's K/V quantisation scales.
        """
        ...


def select_heads(tensor: torch.Tensor, run: HeadRun) -> torch.Tensor:
    """``tensor[:, run heads]`` of a [tokens, num_kv_heads, ...] tensor: a view when it can be."""
    heads = run.head_slice
    if heads is not None:
        return tensor[:, heads]
    return tensor.index_select(1, run.index)


def store_heads(output: torch.Tensor, run: HeadRun, values: torch.Tensor) -> None:
    """``output[:, run heads] = values`` for a [tokens, num_kv_heads, ...] output."""
    heads = run.head_slice
    if heads is not None:
        output[:, heads] = values
    else:
        output.index_copy_(1, run.index, values)
