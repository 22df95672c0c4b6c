"""Triton sink+window attention for DuoAttention streaming heads over a paged KV cache.

Two kernels with a checked Python API, pure torch + Triton (never imports vLLM):

* :func:`sink_window_decode_triton`: one query per request (decode), split-K optional.
* :func:`sink_window_prefill_triton`: chunked prefill (and decode rows) in query tiles.

Semantics (DESIGN.md section 3): a query at absolute position ``p`` of a streaming head sees
the cached keys ``j <= p`` with ``j < sink`` or ``j > p - recent``. The kernels enumerate
exactly those positions as a dense logical range (sinks first, then the window) and read
nothing else, so the work per query is O(sink + recent) (prefill: O(sink + recent + tile))
whatever the context length, and block-table entries outside that range (vLLM's null
block 0 for freed middle blocks, or garbage) are never dereferenced.

Devices: CUDA tensors run compiled Triton. CPU tensors run Triton's interpreter (slow, for
tests), which needs ``TRITON_INTERPRET=1`` in the environment before Triton is first
imported: Triton picks interpreter or compiler when ``@triton.jit`` decorates, and its own
library (``tl.zeros``, ``tl.max``...) is decorated at its import. So this module imports
Triton only at the first kernel call and wraps its kernels then, in whichever mode Triton
was imported; without Triton it still imports and :func:`is_available` says why not.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "is_available",
    "is_interpreted",
    "load_error",
    "sink_window_decode_triton",
    "sink_window_prefill_triton",
]

_LOG2E = 1.4426950408889634
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# fp8 e4m3 caches: vLLM stores them as uint8, torch also has a real fp8 dtype.
_FP8_DTYPES = (torch.float8_e4m3fn, torch.uint8)
_MAX_HEAD_SIZE = 256

# Bound by _import_triton() on first use; the kernels resolve ``tl`` from these globals.
triton: Any = None
tl: Any = None
_state: dict[str, Any] = {}
_kernels: dict[bool, dict[str, Any]] = {}
_sm_count: dict[int, int] = {}


def _import_triton() -> str | None:
    """Imports Triton once; returns None, or why it cannot be imported."""
    global triton, tl
    if "error" not in _state:
        try:
            import triton as triton_module
            import triton.language as language
        except ImportError as exc:
            _state["error"] = f"Triton is not installed ({exc}); pip install triton"
        else:
            triton, tl = triton_module, language
            _state["error"] = None
    return _state["error"]


def is_available() -> bool:
    """Whether Triton can be imported (this imports it, fixing its interpreter mode)."""
    return _import_triton() is None


def load_error() -> str | None:
    """Why the kernels cannot run, or None when Triton is importable."""
    return _import_triton()


def is_interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter in this process (imports Triton)."""
    return _import_triton() is None and _interpreted()


def _interpreted() -> bool:
    """Whether Triton was imported in interpreter mode (TRITON_INTERPRET=1 at import).

    Triton decides when it decorates, and its own library (tl.zeros, tl.max, ...) was
    decorated when it was imported, so that moment fixes the mode for the process.
    """
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every Triton 3.x has it
        return False
    return isinstance(tl.zeros, InterpretedFunction)


# --------------------------------------------------------------------------- kernels
#
# Plain functions here; _get_kernels() wraps them for the compiler or the interpreter.
# They use no @jit helpers so that both wrappers see self-contained functions.


def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    stride_qr,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_btr,
    stride_btc,
    stride_or,
    stride_oh,
    stride_od,
    num_q_heads,
    max_blocks,
    sink,
    recent,
    qk_scale,
    v_scale,
    keys_per_split,
    num_splits,
    GROUP: tl.constexpr,
    HEAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KV_FP8: tl.constexpr,
    FP32_DOT: tl.constexpr,
    SPLIT: tl.constexpr,
):
    # Grid (request, KV head, split). The GROUP query heads of the KV head are the rows of
    # one tile (padded to BLOCK_G >= 16 for tl.dot), so each K/V row is loaded once.
    req = tl.program_id(0).to(tl.int64)
    # int64: a run's head stride is a whole layer of the cache, so kv_head * stride can
    # pass 2**31 elements on a large GPU cache (Triton passes strides below 2**31 as i32).
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    seq_len = tl.load(lens_ptr + req)
    # A length past the block table would index outside it: clamp like the CUDA kernel.
    seq_len = tl.minimum(tl.maximum(seq_len, 0), max_blocks * BLOCK_SIZE)
    # Logical key i < n_sink is position i; later ones are win_start + (i - n_sink).
    # j > p - recent with p = seq_len - 1 means j >= seq_len - recent.
    n_sink = tl.minimum(sink, seq_len)
    win_start = tl.maximum(seq_len - recent, sink)
    n_keys = n_sink + tl.maximum(seq_len - win_start, 0)
    begin = split * keys_per_split
    end = tl.minimum(begin + keys_per_split, n_keys)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD
    q_heads = kv_head * GROUP + offs_g
    q = tl.load(
        q_ptr + req * stride_qr + q_heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if FP32_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = bt_ptr + req * stride_btr
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh

    for start in range(begin, end, BLOCK_N):
        idx = start + offs_n
        valid = idx < end
        pos = tl.where(idx < n_sink, idx, win_start + idx - n_sink)
        block = tl.load(bt_row + (pos // BLOCK_SIZE) * stride_btc, mask=valid, other=0)
        block = block.to(tl.int64)
        slot = pos % BLOCK_SIZE
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(
            k_base
            + block[:, None] * stride_kb
            + slot[:, None] * stride_ks
            + offs_d[None, :] * stride_kd,
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            v_base
            + block[:, None] * stride_vb
            + slot[:, None] * stride_vs
            + offs_d[None, :] * stride_vd,
            mask=kv_mask,
            other=0.0,
        )
        if KV_FP8:
            k = k.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            v = v.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        k = k.to(q.dtype)
        v = v.to(q.dtype)
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        # qk_scale folds softmax scale, k_scale and log2(e): exp2 below is the softmax exp.
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        # The tile's first key is valid, so m_new is finite and exp2(-inf - m_new) = 0.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP32_DOT:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    o = acc / l_safe[:, None]
    if SPLIT:
        # Normalised partial and its log2-sum-exp; _merge_kernel combines the splits.
        lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))
        row = (req * num_q_heads + q_heads) * num_splits + split
        tl.store(
            part_out_ptr + row[:, None] * HEAD + offs_d[None, :],
            o,
            mask=g_mask[:, None] & d_mask[None, :],
        )
        tl.store(part_lse_ptr + row, lse, mask=g_mask)
    else:
        o = o * v_scale
        tl.store(
            out_ptr + req * stride_or + q_heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
            o.to(out_ptr.dtype.element_ty),
            mask=g_mask[:, None] & d_mask[None, :],
        )


def _merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    stride_or,
    stride_oh,
    stride_od,
    num_q_heads,
    num_splits,
    v_scale,
    HEAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # Grid (request, query head): weight each split's normalised output by its share of
    # the softmax mass, exp2(lse_i - max lse). Empty splits have lse = -inf, weight 0.
    req = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row0 = (req * num_q_heads + head) * num_splits
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD
    lse = tl.load(part_lse_ptr + row0 + offs_s, mask=s_mask, other=float("-inf"))
    mx = tl.max(lse, 0)
    ref = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(lse - ref)
    parts = tl.load(
        part_out_ptr + (row0 + offs_s)[:, None] * HEAD + offs_d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    total = tl.sum(w, 0)
    o = tl.sum(w[:, None] * parts, 0) / tl.where(total > 0.0, total, 1.0) * v_scale
    tl.store(
        out_ptr + req * stride_or + head * stride_oh + offs_d * stride_od,
        o.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )


def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    nk_ptr,
    nv_ptr,
    bt_ptr,
    qsl_ptr,
    lens_ptr,
    out_ptr,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_nkt,
    stride_nkh,
    stride_nkd,
    stride_nvt,
    stride_nvh,
    stride_nvd,
    stride_btr,
    stride_btc,
    stride_ot,
    stride_oh,
    stride_od,
    # Typed: an untyped 1 becomes a constexpr, and the binary search's loop variable
    # ``hi`` starts from it and then carries tensors.
    num_reqs: tl.int32,
    max_blocks,
    sink,
    recent,
    qk_scale,
    k_scale,
    v_scale,
    GROUP: tl.constexpr,
    HEAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KV_FP8: tl.constexpr,
    FP32_DOT: tl.constexpr,
    HAS_NEW: tl.constexpr,
):
    # Grid (query tile, KV head). Request r owns tiles [qsl[r] // BLOCK_Q + r, ...): that
    # numbering needs no host copy of query_start_loc and gives every request enough
    # tiles (num_tokens // BLOCK_Q + num_reqs in all); surplus tiles exit at once.
    pid = tl.program_id(0)
    # int64: a run's head stride is a whole layer of the cache, so kv_head * stride can
    # pass 2**31 elements on a large GPU cache (Triton passes strides below 2**31 as i32).
    kv_head = tl.program_id(1).to(tl.int64)
    lo: tl.int32 = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    req = lo - 1
    tok_begin = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - tok_begin
    first = (pid - (tok_begin // BLOCK_Q + req)) * BLOCK_Q  # tile's first query in the request
    if first >= q_len:
        return
    seq_len = tl.load(lens_ptr + req)
    ctx_start = seq_len - q_len  # the request's queries are its last q_len positions
    q0 = ctx_start + first
    q_end = tl.minimum(q0 + BLOCK_Q, seq_len)
    # Keys any query of the tile can see: sinks [0, n_sink), then the window
    # [win_start, q_end) of the tile's first query widened by the tile.
    n_sink = tl.minimum(sink, q_end)
    win_start = tl.maximum(q0 - recent + 1, sink)
    n_keys = n_sink + tl.maximum(q_end - win_start, 0)

    # Row r of the tile is query r // BLOCK_G, query head r % BLOCK_G of this KV head.
    rows = tl.arange(0, BLOCK_Q * BLOCK_G)
    row_q = rows // BLOCK_G
    row_g = rows % BLOCK_G
    row_ok = (first + row_q < q_len) & (row_g < GROUP)
    tok = (tok_begin + first + row_q).to(tl.int64)
    q_pos = q0 + row_q
    head = kv_head * GROUP + row_g
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_mask[None, :],
        other=0.0,
    )
    if FP32_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_Q * BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], tl.float32)
    bt_row = bt_ptr + req * stride_btr
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh

    for start in range(0, n_keys, BLOCK_N):
        idx = start + offs_n
        valid = idx < n_keys
        pos = tl.where(idx < n_sink, idx, win_start + idx - n_sink)
        col = pos // BLOCK_SIZE
        if HAS_NEW:
            # This chunk's keys come from the step: their blocks may not exist.
            in_chunk = valid & (pos >= ctx_start)
            from_cache = valid & (pos < ctx_start) & (col < max_blocks)
        else:
            from_cache = valid & (col < max_blocks)
        block = tl.load(bt_row + col * stride_btc, mask=from_cache, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        c_mask = from_cache[:, None] & d_mask[None, :]
        k = tl.load(
            k_base
            + block[:, None] * stride_kb
            + slot[:, None] * stride_ks
            + offs_d[None, :] * stride_kd,
            mask=c_mask,
            other=0.0,
        )
        v = tl.load(
            v_base
            + block[:, None] * stride_vb
            + slot[:, None] * stride_vs
            + offs_d[None, :] * stride_vd,
            mask=c_mask,
            other=0.0,
        )
        if KV_FP8:
            # Dequantise per key: the step's keys (HAS_NEW) are not scaled.
            k = k.to(tl.float8e4nv, bitcast=True).to(tl.float32) * k_scale
            v = v.to(tl.float8e4nv, bitcast=True).to(tl.float32) * v_scale
        if HAS_NEW:
            n_tok = (tok_begin + pos - ctx_start).to(tl.int64)
            n_mask = in_chunk[:, None] & d_mask[None, :]
            k_new = tl.load(
                nk_ptr
                + n_tok[:, None] * stride_nkt
                + kv_head * stride_nkh
                + offs_d[None, :] * stride_nkd,
                mask=n_mask,
                other=0.0,
            )
            v_new = tl.load(
                nv_ptr
                + n_tok[:, None] * stride_nvt
                + kv_head * stride_nvh
                + offs_d[None, :] * stride_nvd,
                mask=n_mask,
                other=0.0,
            )
            k = tl.where(in_chunk[:, None], k_new.to(k.dtype), k)
            v = tl.where(in_chunk[:, None], v_new.to(v.dtype), v)
        k = k.to(q.dtype)
        v = v.to(q.dtype)
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        rel = q_pos[:, None] - pos[None, :]
        seen = valid[None, :] & (rel >= 0) & ((pos[None, :] < sink) | (rel < recent))
        s = tl.where(seen, s * qk_scale, float("-inf"))
        # A row may see nothing in this tile: a finite reference keeps exp2 from NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP32_DOT:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr
        + tok[:, None] * stride_ot
        + head[:, None] * stride_oh
        + offs_d[None, :] * stride_od,
        o.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_mask[None, :],
    )


def _get_kernels(device: torch.device) -> tuple[dict[str, Any], bool]:
    """The kernels for ``device`` and whether they run in Triton's interpreter.

    They are wrapped on first use, not decorated at import: which wrapper works depends on
    how Triton was imported (see :func:`_interpreted`), which may happen after this module.
    """
    error = _import_triton()
    if error is not None:
        raise RuntimeError(f"vllm_duo.kernels.triton_sink_window is unavailable: {error}")
    interpret = _interpreted()
    if device.type == "cpu" and not interpret:
        raise RuntimeError(
            "CPU tensors run in Triton's interpreter, which needs TRITON_INTERPRET=1 in the "
            "environment before triton is first imported (this process imported it without); "
            "on CPU without it use vllm_duo.kernels.sink_window_torch"
        )
    if interpret not in _kernels:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            wrap = InterpretedFunction
        else:
            wrap = triton.jit
        _kernels[interpret] = {
            "decode": wrap(_decode_kernel),
            "merge": wrap(_merge_kernel),
            "prefill": wrap(_prefill_kernel),
        }
    return _kernels[interpret], interpret


# --------------------------------------------------------------------------- checks


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _check_tensor(name: str, t: object, dims: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dims, got shape {tuple(t.shape)}")
    return t


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return value


def _check_device(query: torch.Tensor) -> None:
    if query.device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"device: tensors must be on CPU (Triton interpreter) or CUDA, got {query.device}"
        )


def _check_index(name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if t.dtype != torch.int32:
        raise TypeError(f"{name}: dtype must be torch.int32, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: shape must be {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: device must match query's ({device}), got {t.device}")


def _check_common(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    num_reqs: int,
    sink: int,
    recent: int,
    scale: float,
    k_scale: float | None,
    v_scale: float | None,
) -> tuple[int, int, int, bool, float, float]:
    """Rules shared by both kernels; returns (num_kv_heads, group, block_size, fp8, ks, vs)."""
    _check_tensor("query", query, 3)
    _check_tensor("key_cache", key_cache, 4)
    _check_tensor("value_cache", value_cache, 4)
    _check_tensor("block_table", block_table, 2)
    _check_device(query)
    if query.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"query: dtype must be float16, bfloat16 or float32, got {query.dtype}")
    _, num_q_heads, head_size = query.shape
    if not 1 <= head_size <= _MAX_HEAD_SIZE:
        raise ValueError(f"head_size: must be in [1, {_MAX_HEAD_SIZE}], got {head_size}")
    if num_q_heads < 1:
        raise ValueError(f"query: num_q_heads must be >= 1, got shape {tuple(query.shape)}")
    if key_cache.shape != value_cache.shape:
        raise ValueError(
            "key_cache and value_cache: shapes must match "
            f"([num_blocks, block_size, num_kv_heads, head_size]), got "
            f"{tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    if key_cache.dtype != value_cache.dtype:
        raise TypeError(
            f"key_cache and value_cache: dtypes must match, got {key_cache.dtype} "
            f"and {value_cache.dtype}"
        )
    num_blocks, block_size, num_kv_heads, cache_head = key_cache.shape
    if cache_head != head_size:
        raise ValueError(
            f"head_size: key_cache has {cache_head} (shape {tuple(key_cache.shape)}), query "
            f"has {head_size}"
        )
    if block_size < 1:
        raise ValueError(f"block_size: key_cache.shape[1] must be >= 1, got {block_size}")
    if num_blocks < 1:
        raise ValueError(f"key_cache: num_blocks must be >= 1, got {num_blocks}")
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: must divide num_q_heads={num_q_heads}, got {num_kv_heads}")
    fp8 = key_cache.dtype in _FP8_DTYPES
    if not fp8 and key_cache.dtype != query.dtype:
        raise TypeError(
            f"cache dtype: must equal query's {query.dtype} or be fp8 e4m3 "
            f"(float8_e4m3fn / uint8), got {key_cache.dtype}"
        )
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        if t.device != query.device:
            raise ValueError(f"{name}: device must match query's ({query.device}), got {t.device}")
    _check_index("block_table", block_table, (num_reqs, block_table.shape[1]), query.device)
    _check_int("sink", sink, 0)
    _check_int("recent", recent, 1)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: must be a finite float, got {scale!r}")
    scales = []
    for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
        if value is None:
            value = 1.0
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a float or None, got {type(value).__name__}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: must be a positive finite float, got {value!r}")
        if not fp8 and value != 1.0:
            raise ValueError(
                f"{name}: dequant scales apply to fp8 caches only; a {key_cache.dtype} cache "
                f"needs 1.0 or None, got {value!r}"
            )
        scales.append(float(value))
    return num_kv_heads, num_q_heads // num_kv_heads, block_size, fp8, scales[0], scales[1]


def _check_out(out: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
    if out is None:
        return None
    _check_tensor("out", out, 3)
    if out.shape != query.shape or out.dtype != query.dtype or out.device != query.device:
        raise ValueError(
            f"out: must match query's shape {tuple(query.shape)}, dtype {query.dtype} and "
            f"device {query.device}, got {tuple(out.shape)} {out.dtype} {out.device}"
        )
    if any(s == 0 for s, n in zip(out.stride(), out.shape) if n > 1):
        raise ValueError(f"out: strides must not be 0 (rows would overlap), got {out.stride()}")
    return out


def _cache_arg(cache: torch.Tensor, fp8: bool) -> torch.Tensor:
    # fp8 reaches the kernel as bytes and is bitcast there: one code path for both dtypes.
    return cache.view(torch.uint8) if fp8 and cache.dtype != torch.uint8 else cache


def _tiles(head_size: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_N): tl.dot needs every dim >= 16; wide heads take fewer keys."""
    block_d = max(16, _pow2(head_size))
    return block_d, 64 if block_d <= 128 else 32


def _auto_splits(device: torch.device, programs: int, max_keys: int, block_n: int) -> int:
    """Splits so that about 2 programs run per SM, each over at least 2 key tiles."""
    if device.type != "cuda" or programs <= 0:
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_count:
        _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    want = -(-2 * _sm_count[index] // programs)
    useful = -(-max_keys // (2 * block_n))
    return max(1, min(want, useful, 32))


# --------------------------------------------------------------------------- API


def sink_window_decode_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    sink: int,
    recent: int,
    scale: float,
    k_scale: float | None = None,
    v_scale: float | None = None,
    out: torch.Tensor | None = None,
    num_splits: int = 0,
) -> torch.Tensor:
    """Decode attention of streaming KV heads over a paged sink+window cache.

    Args:
        query: [num_reqs, num_q_heads, head_size] fp16 | bf16 | fp32, one decode token per
            request; query head ``h * G + g`` belongs to KV head ``h`` (G = num_q_heads /
            num_kv_heads). Any strides.
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size], vLLM's
            CUDA layout, any strides (so a per-head cache such as ``csrc/``'s rows view
            ``[num_blocks, 2 * block_size, head_size]`` works as ``rows[:, :bs, None]`` and
            ``rows[:, bs:, None]``). Query's dtype, or fp8 e4m3 (float8_e4m3fn or uint8
            storage) dequantised as ``stored * k_scale`` / ``stored * v_scale``.
        block_table: [num_reqs, max_blocks] int32 block ids. Only the entries holding
            visible positions are read; others may be null (0) or garbage.
        seq_lens: [num_reqs] int32 context lengths including the decode token, whose
            key/value must already be in the cache. 0 gives a zero output; lengths past
            ``max_blocks * block_size`` are clamped to it.
        sink, recent: S >= 0 and W >= 1: the query at ``p = seq_len - 1`` sees keys
            ``j <= p`` with ``j < S`` or ``j > p - W``.
        scale: softmax scale.
        k_scale, v_scale: per-tensor fp8 dequant scales; None (or 1.0) otherwise.
        out: optional [num_reqs, num_q_heads, head_size] output in query's dtype.
        num_splits: 0 chooses (several only on a GPU with few requests); n > 0 forces the
            visible keys into n parts merged by a second kernel (tests, tuning).

    Returns:
        ``out`` (allocated when None): [num_reqs, num_q_heads, head_size], query's dtype.
    """
    _check_tensor("query", query, 3)
    _check_tensor("seq_lens", seq_lens, 1)
    num_reqs = query.shape[0]
    num_kv_heads, group, block_size, fp8, k_s, v_s = _check_common(
        query, key_cache, value_cache, block_table, num_reqs, sink, recent, scale, k_scale, v_scale
    )
    _check_index("seq_lens", seq_lens, (num_reqs,), query.device)
    _check_int("num_splits", num_splits, 0)
    out = _check_out(out, query)
    kernels, interpret = _get_kernels(query.device)
    if out is None:
        out = torch.empty_like(query)
    if num_reqs == 0:
        return out

    num_q_heads, head_size = query.shape[1], query.shape[2]
    max_blocks = block_table.shape[1]
    block_d, block_n = _tiles(head_size)
    max_keys = min(sink + recent, max_blocks * block_size)
    if num_splits == 0:
        splits = _auto_splits(query.device, num_reqs * num_kv_heads, max_keys, block_n)
        # Whole key tiles per split; drop splits that would start past max_keys.
        per_split = -(-max_keys // splits)
        keys_per_split = max(block_n, -(-per_split // block_n) * block_n)
        splits = max(1, -(-max_keys // keys_per_split))
    else:
        splits = num_splits
        keys_per_split = max(1, -(-max_keys // splits))
    split = splits > 1
    if split:
        rows = num_reqs * num_q_heads * splits
        part_out = torch.empty(rows, head_size, dtype=torch.float32, device=query.device)
        part_lse = torch.empty(rows, dtype=torch.float32, device=query.device)
    else:
        part_out = part_lse = out  # unused: SPLIT=False never touches them

    key_arg, value_arg = _cache_arg(key_cache, fp8), _cache_arg(value_cache, fp8)
    kernels["decode"][(num_reqs, num_kv_heads, splits)](
        query,
        key_arg,
        value_arg,
        block_table,
        seq_lens,
        out,
        part_out,
        part_lse,
        *query.stride(),
        *key_arg.stride(),
        *value_arg.stride(),
        *block_table.stride(),
        *out.stride(),
        num_q_heads,
        max_blocks,
        sink,
        recent,
        float(scale) * k_s * _LOG2E,
        v_s,
        keys_per_split,
        splits,
        GROUP=group,
        HEAD=head_size,
        BLOCK_SIZE=block_size,
        BLOCK_G=max(16, _pow2(group)),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        KV_FP8=fp8,
        FP32_DOT=interpret or query.dtype == torch.float32,
        SPLIT=split,
        num_warps=4,
    )
    if split:
        kernels["merge"][(num_reqs, num_q_heads)](
            part_out,
            part_lse,
            out,
            *out.stride(),
            num_q_heads,
            splits,
            v_s,
            HEAD=head_size,
            BLOCK_D=block_d,
            BLOCK_S=max(2, _pow2(splits)),
            num_warps=4,
        )
    return out


def sink_window_prefill_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    sink: int,
    recent: int,
    scale: float,
    new_keys: torch.Tensor | None = None,
    new_values: torch.Tensor | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunked-prefill attention of streaming KV heads over a paged sink+window cache.

    Request r's queries are tokens ``[qsl[r], qsl[r+1])`` at the LAST ``qsl[r+1] - qsl[r]``
    positions of its ``seq_lens[r]`` context; each sees the sinks and its own window.
    Decode rows (one query) are handled too. Queries are cut into tiles of
    ``max(1, 64 // G')`` tokens (G' = G rounded up to a power of two); a tile reads only
    the sink range and the union of its queries' windows, so the work per query is
    O(sink + recent + tile), not O(context).

    Args:
        query: [num_tokens, num_q_heads, head_size] fp16 | bf16 | fp32, any strides; query
            head ``h * G + g`` belongs to KV head ``h``.
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size] as in
            :func:`sink_window_decode_triton` (query's dtype or fp8 e4m3).
        block_table: [num_reqs, max_blocks] int32 block ids; only entries of positions a
            tile reads from the cache are dereferenced.
        query_start_loc: [num_reqs + 1] int32 token offsets, starting at 0, non-decreasing,
            ending at most at num_tokens.
        seq_lens: [num_reqs] int32 context lengths including the scheduled queries.
        sink, recent: S >= 0 and W >= 1 (see the module docstring).
        scale: softmax scale.
        new_keys, new_values: optional [num_tokens, num_kv_heads, head_size] in query's
            dtype: this step's keys/values, real values (no fp8 scale). When given, keys of
            the current chunk are read from them and never from the cache, whose blocks for
            chunk tokens that leave the window within the step may not exist (null).
            Without them the chunk's keys must already be written to the cache.
        k_scale, v_scale: per-tensor fp8 dequant scales of the cache; None (or 1.0) else.
        out: optional [num_tokens, num_q_heads, head_size] output in query's dtype; rows
            past ``query_start_loc[-1]`` are left as they are.

    Returns:
        ``out`` (zeros allocated when None): [num_tokens, num_q_heads, head_size].
    """
    _check_tensor("query", query, 3)
    _check_tensor("seq_lens", seq_lens, 1)
    _check_tensor("query_start_loc", query_start_loc, 1)
    num_reqs = seq_lens.shape[0]
    num_kv_heads, group, block_size, fp8, k_s, v_s = _check_common(
        query, key_cache, value_cache, block_table, num_reqs, sink, recent, scale, k_scale, v_scale
    )
    _check_index("seq_lens", seq_lens, (num_reqs,), query.device)
    _check_index("query_start_loc", query_start_loc, (num_reqs + 1,), query.device)
    num_tokens, _, head_size = query.shape
    if (new_keys is None) != (new_values is None):
        raise ValueError("new_keys and new_values: give both or neither")
    has_new = new_keys is not None
    if has_new:
        want = (num_tokens, num_kv_heads, head_size)
        for name, t in (("new_keys", new_keys), ("new_values", new_values)):
            _check_tensor(name, t, 3)
            if tuple(t.shape) != want:
                raise ValueError(
                    f"{name}: shape must be [num_tokens, num_kv_heads, head_size] = {want}, "
                    f"got {tuple(t.shape)}"
                )
            if t.dtype != query.dtype:
                raise TypeError(f"{name}: dtype must be query's {query.dtype}, got {t.dtype}")
            if t.device != query.device:
                raise ValueError(
                    f"{name}: device must match query's ({query.device}), got {t.device}"
                )
    out = _check_out(out, query)
    kernels, interpret = _get_kernels(query.device)
    if out is None:
        out = torch.zeros_like(query)
    if num_reqs == 0 or num_tokens == 0:
        return out

    block_g = _pow2(group)
    block_q = max(1, 64 // block_g)
    block_d, block_n = _tiles(head_size)
    key_arg, value_arg = _cache_arg(key_cache, fp8), _cache_arg(value_cache, fp8)
    nk = new_keys if has_new else query  # unused when HAS_NEW is False
    nv = new_values if has_new else query
    kernels["prefill"][(num_tokens // block_q + num_reqs, num_kv_heads)](
        query,
        key_arg,
        value_arg,
        nk,
        nv,
        block_table,
        query_start_loc,
        seq_lens,
        out,
        *query.stride(),
        *key_arg.stride(),
        *value_arg.stride(),
        *nk.stride(),
        *nv.stride(),
        *block_table.stride(),
        *out.stride(),
        num_reqs,
        block_table.shape[1],
        sink,
        recent,
        float(scale) * _LOG2E,
        k_s,
        v_s,
        GROUP=group,
        HEAD=head_size,
        BLOCK_SIZE=block_size,
        BLOCK_G=block_g,
        BLOCK_Q=block_q,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        KV_FP8=fp8,
        FP32_DOT=interpret or query.dtype == torch.float32,
        HAS_NEW=has_new,
        num_warps=4,
    )
    return out
