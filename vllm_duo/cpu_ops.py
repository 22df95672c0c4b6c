"""Python API of the CPU kernels in ``csrc/cpu/`` (extension ``vllm_duo._cpu_C``).

The extension holds only torch ops (``torch.ops.vllm_duo_cpu.*``); it is found with
``importlib`` and loaded with ``torch.ops.load_library``. Without it (not built: see
:mod:`vllm_duo._build_cpu`) this module still imports, :func:`is_available` is False and
the CPU kernel family uses :mod:`vllm_duo.kernels.sink_window_torch` instead. Never imports
vLLM.

Semantics: DESIGN.md section 3, as :mod:`vllm_duo.kernels.sink_window_torch`. fp8 caches
(``kv_cache_dtype`` fp8 / fp8_e4m3 / fp8_e5m2) hold bytes quantised exactly as vLLM's CPU
backend quantises them (:func:`vllm_duo.kernels.fp8.quantize_cpu`), with per-tensor scales.
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = [
    "is_available",
    "load_error",
    "paged_attention",
    "sink_window_attention",
    "store_kv",
]

_EXTENSION = "vllm_duo._cpu_C"
_state: dict[str, str | None] = {}


def _registered() -> bool:
    namespace = getattr(torch.ops, "vllm_duo_cpu", None)
    return namespace is not None and all(
        hasattr(namespace, op) for op in ("sink_window_attention", "paged_attention")
    )


def load_error() -> str | None:
    """Why the extension is unavailable, or None once it is loaded (loads it once)."""
    if "error" not in _state:
        error = None
        if not _registered():
            try:
                spec = importlib.util.find_spec(_EXTENSION)
            except (ImportError, ValueError):
                spec = None
            if spec is None or spec.origin is None:
                error = (
                    f"the CPU extension {_EXTENSION} is not built "
                    "(python -m vllm_duo._build_cpu, which make venv runs)"
                )
            else:
                try:
                    torch.ops.load_library(spec.origin)
                except (OSError, RuntimeError) as exc:
                    error = f"the CPU extension at {spec.origin} failed to load: {exc}"
        if error is None and not _registered():
            error = f"the CPU extension {_EXTENSION} loaded but registered no ops"
        _state["error"] = error
    return _state["error"]


def is_available() -> bool:
    """Whether the CPU extension is loaded and its ops are registered."""
    return load_error() is None


def _require() -> None:
    error = load_error()
    if error is not None:
        raise RuntimeError(f"vllm_duo.cpu_ops is unavailable: {error}")


def sink_window_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    heads: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    *,
    sink: int,
    recent: int,
    scale: float,
    out: torch.Tensor,
    kv_cache_dtype: str = "auto",
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Sink+window attention of some KV heads of a layer, decode rows and prefill chunks.

    Args:
        query: [num_tokens, num_kv_heads, G, head_size], the layer's queries; any strides
            with a contiguous last dim.
        key_cache, value_cache: [num_blocks, block_size, R, head_size] the R heads' caches
            (one strided view over R one-head caches): the query's dtype, or uint8 bytes
            for an fp8 ``kv_cache_dtype``.
        heads: [R] int64, the layer's KV head of each cache head.
        block_table: [num_reqs, max_blocks] int32; only entries of visible cached
            positions are read (others may be null or garbage).
        query_start_loc: [num_reqs + 1] int32 token offsets, starting at 0.
        seq_lens: [num_reqs] int32 context lengths including this step's queries, which
            are the last positions of each request.
        new_keys, new_values: [num_tokens, num_kv_heads, head_size], this step's keys and
            values: positions of the step are read from them, never from the cache (with
            an fp8 cache through the store's quantisation, so they read as cached ones).
        sink, recent: S >= 0 and W >= 1.
        scale: softmax scale.
        out: [num_tokens, num_kv_heads, G, head_size]; the R heads' rows are written.
        kv_cache_dtype: vLLM's ``--kv-cache-dtype``: ``auto``, ``fp8``, ``fp8_e4m3`` or
            ``fp8_e5m2``.
        k_scale, v_scale: the layer's fp8 scales (a byte b stands for fp8(b) * scale).

    Returns:
        ``out``.
    """
    _require()
    torch.ops.vllm_duo_cpu.sink_window_attention(
        query, key_cache, value_cache, heads, block_table, query_start_loc, seq_lens,
        new_keys, new_values, int(sink), int(recent), float(scale), out, kv_cache_dtype,
        float(k_scale), float(v_scale),
    )  # fmt: skip
    return out


def store_kv(
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    heads: torch.Tensor,
    slot_mapping: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    *,
    min_slot: int,
    kv_cache_dtype: str = "auto",
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Writes the step's keys/values of R heads into their cache slots, in one call.

    Args:
        new_keys, new_values: [num_tokens, num_kv_heads, head_size].
        heads: [R] int64, the layer's KV head of each cache head.
        slot_mapping: [>= num_tokens] int64 cache slot per token; tokens whose slot is
            below ``min_slot`` are not stored (-1 padding; vLLM's null block 0 of chunk
            tokens that leave a streaming window within the step).
        key_cache, value_cache: [num_blocks, block_size, R, head_size], written in place:
            the keys' dtype, or uint8 for an fp8 ``kv_cache_dtype``.
        min_slot: the first slot that is stored.
        kv_cache_dtype: ``auto`` (copy) or ``fp8`` / ``fp8_e4m3`` / ``fp8_e5m2`` (quantise
            as vLLM's CPU backend does, with ``k_scale`` / ``v_scale``).
    """
    _require()
    torch.ops.vllm_duo_cpu.store_kv(
        new_keys, new_values, heads, slot_mapping, key_cache, value_cache, int(min_slot),
        kv_cache_dtype, float(k_scale), float(v_scale),
    )  # fmt: skip


def paged_attention(
    query: torch.Tensor,
    cache: torch.Tensor,
    heads: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Causal full-context attention of some KV heads of a layer over vLLM's CPU pages.

    Decode queries and prefill chunks alike: request r's queries are the last of its
    ``seq_lens[r]`` positions, and each attends to every position up to its own, all of
    them in the cache (vLLM's ``cpu_attn_reshape_and_cache`` wrote this step's keys).

    Args:
        query: [num_tokens, num_kv_heads, G, head_size], the layer's queries; any strides
            with a contiguous last dim.
        cache: [num_blocks, R, block_size, 2 * head_size] pages of the R heads in the layout
            of vLLM's ``vec``/``vec16`` CPU kernels: block_size * head_size keys stored
            transposed, then block_size value rows; the query's dtype.
        heads: [R] int64, the layer's KV head of each cache head.
        block_table: [num_reqs, max_blocks] int32; the blocks of every position of a
            request with queries are read.
        query_start_loc: [num_reqs + 1] int32 token offsets, starting at 0.
        seq_lens: [num_reqs] int32 context lengths including this step's queries.
        scale: softmax scale.
        out: [num_tokens, num_kv_heads, G, head_size]; rows of the R heads of the
            requests' tokens are written.

    Returns:
        ``out``.
    """
    _require()
    torch.ops.vllm_duo_cpu.paged_attention(
        query, cache, heads, block_table, query_start_loc, seq_lens, float(scale), out
    )
    return out
