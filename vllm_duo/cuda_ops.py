"""Python API of the CUDA sink+window decode kernel in ``csrc/`` (extension ``vllm_duo._C``).

The extension holds only torch ops (``torch.ops.vllm_duo.*``), no Python module: it
is found with ``importlib`` and loaded with ``torch.ops.load_library``. On a machine
without it (CPU-only torch, or built with ``VLLM_DUO_SKIP_CUDA_BUILD=1``) this module
still imports; :func:`is_available` is then False and the ops raise a RuntimeError
that says why. Never imports vLLM.

Semantics (DESIGN.md section 3): the decode query of a request at absolute position
``p = seq_len - 1`` attends to the cached keys ``j <= p`` with ``j < sink`` or
``j > p - recent``; only those positions are read, so the work is O(sink + recent)
whatever the context length, and block-table entries outside them (null blocks of
freed middle blocks) are never touched.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["is_available", "load_error", "sink_window_decode", "sink_window_decode_heads"]

_EXTENSION = "vllm_duo._C"
_LIB_ENV = "VLLM_DUO_CUDA_LIB"  # path of a prebuilt op library, used instead of vllm_duo._C
_state: dict[str, object] = {}


def _ops_registered() -> bool:
    ns = getattr(torch.ops, "vllm_duo", None)
    return ns is not None and hasattr(ns, "sink_window_decode")


def _load() -> str | None:
    """Loads the op library once; returns None on success, else the reason it is missing."""
    if "error" in _state:
        return _state["error"]  # type: ignore[return-value]
    error: str | None = None
    if not _ops_registered():
        path = os.environ.get(_LIB_ENV)
        if not path:
            try:
                spec = importlib.util.find_spec(_EXTENSION)
            except (ImportError, ValueError):
                spec = None
            path = spec.origin if spec is not None else None
        if not path:
            error = (
                f"the CUDA extension {_EXTENSION} is not built (it needs a CUDA build of torch "
                "and nvcc at install time, and VLLM_DUO_SKIP_CUDA_BUILD unset)"
            )
        else:
            try:
                torch.ops.load_library(path)
            except (OSError, RuntimeError) as exc:
                error = f"the CUDA extension at {path} failed to load: {exc}"
    if error is None and not _ops_registered():
        error = f"the CUDA extension {_EXTENSION} loaded but registered no vllm_duo ops"
    if error is None:
        _register_fakes()
    _state["error"] = error
    return error


def _register_fakes() -> None:
    """Fake (meta) impls for tracing; only where the library registered no Meta kernel."""
    for name in ("sink_window_decode", "sink_window_decode_heads"):
        qualname = f"vllm_duo::{name}"
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"):
            continue  # the C++ Meta impl (csrc/torch_binding.cpp) already serves FakeTensor

        def _fake(*args, **kwargs):
            return None  # writes ``out`` in place; no new tensors

        torch.library.register_fake(qualname, _fake)


def is_available() -> bool:
    """Whether the CUDA extension is loaded and its ops are registered."""
    return _load() is None


def load_error() -> str | None:
    """Why the extension is unavailable, or None when it is loaded."""
    return _load()


def _require(query: torch.Tensor) -> None:
    if query.device.type != "cuda":
        raise RuntimeError(
            f"vllm_duo.cuda_ops.sink_window_decode needs CUDA tensors, got query on "
            f"{query.device}; on CPU use vllm_duo.kernels.sink_window_torch"
        )
    error = _load()
    if error is not None:
        raise RuntimeError(f"vllm_duo.cuda_ops is unavailable: {error}")


def sink_window_decode(
    query: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    sink: int,
    recent: int,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    out: torch.Tensor | None = None,
    num_splits: int = 0,
) -> torch.Tensor:
    """Decode attention of ONE streaming KV head over its paged sink+window cache.

    Args:
        query: [num_reqs, G, head_size] fp16 | bf16, the G query heads of this KV head,
            one decode token per request; last dim contiguous, 16-byte aligned rows.
        cache: [num_blocks, 1, block_size, 2 * head_size] (or its rows view
            [num_blocks, 2 * block_size, head_size]): in each block, rows
            [0, block_size) hold keys and rows [block_size, 2 * block_size) values.
            fp16 | bf16 like the query, or fp8 e4m3 as uint8 / float8_e4m3fn.
            head_size 64, 128 or 256; block_size 16, 32, 64 or 128.
        block_table: [num_reqs, max_blocks] int32 block ids of this cache.
        seq_lens: [num_reqs] int32 context lengths, the decode token included
            (its key/value must already be in the cache).
        sink, recent: S >= 0 and W >= 1 of the streaming pattern.
        scale: softmax scale.
        k_scale, v_scale: fp8 dequant scales (value = stored * scale); 1.0 otherwise.
        out: optional [num_reqs, G, head_size] output, query's dtype; written in place.
        num_splits: 0 chooses; n > 0 forces the keys into n parts (testing, tuning).

    Returns:
        ``out`` (allocated when None): [num_reqs, G, head_size] in query's dtype.
    """
    _require(query)
    if out is None:
        out = torch.empty_like(query)
    torch.ops.vllm_duo.sink_window_decode(
        query,
        cache,
        block_table,
        seq_lens,
        int(sink),
        int(recent),
        float(scale),
        float(k_scale),
        float(v_scale),
        out,
        int(num_splits),
    )
    return out


def sink_window_decode_heads(
    query: torch.Tensor,
    caches: list[torch.Tensor],
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    sink: int,
    recent: int,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    out: torch.Tensor | None = None,
    num_splits: int = 0,
) -> torch.Tensor:
    """Like :func:`sink_window_decode` for H streaming KV heads in one launch.

    Args:
        query: [num_reqs, H * G, head_size]; query head ``h * G + g`` belongs to KV head h.
        caches: H per-head caches (same shape, dtype and strides), each as in
            :func:`sink_window_decode`; they share ``block_table`` (one KV cache group).
        Others as in :func:`sink_window_decode`; H <= 64.

    Returns:
        ``out``: [num_reqs, H * G, head_size] in query's dtype.
    """
    _require(query)
    if out is None:
        out = torch.empty_like(query)
    torch.ops.vllm_duo.sink_window_decode_heads(
        query,
        list(caches),
        block_table,
        seq_lens,
        int(sink),
        int(recent),
        float(scale),
        float(k_scale),
        float(v_scale),
        out,
        int(num_splits),
    )
    return out
