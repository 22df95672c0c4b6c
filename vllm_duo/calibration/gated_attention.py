"""Gated full/streaming attention for transformers models: the calibration forward pass.

DuoAttention learns one gate ``alpha`` in [0, 1] per (decoder layer, KV head). During
calibration every attention layer outputs, per KV head group,

    out = alpha * full_attention + (1 - alpha) * streaming_attention

where full attention is ordinary causal attention and streaming attention is the sink + window
attention of :func:`vllm_duo.reference.duo_mask` (query p sees keys j <= p with j < S or
j > p - W). Heads whose gate stays high are the retrieval heads.

The hook is a transformers attention function (``AttentionInterface``), so any model whose
attention modules call ``ALL_ATTENTION_FUNCTIONS`` (Llama, Mistral, Qwen2, ...) works without
model changes. Gates live in a :class:`GateHolder` attached to every attention module; the hook
reads the holder of the module it is called for (``module.layer_idx`` picks the row), so several
models can be calibrated in one process.

Memory: full attention goes through ``scaled_dot_product_attention(is_causal=True)`` (a fused
kernel on CPU and GPU, no T x T matrix). Streaming attention is computed in query tiles of
``tile`` rows; a tile attends to the sink keys and the keys of its window only, so no tensor is
larger than O(tile x (S + W + tile)) per head and the saved activations total
O(T x (S + W + tile)) per layer. No T x T mask is ever built.

Pure module: torch only (transformers is imported lazily in :func:`register_attention`); it
never imports vLLM.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "ATTENTION_NAME",
    "HOLDER_ATTR",
    "GateHolder",
    "attach_gates",
    "gated_attention_forward",
    "register_attention",
    "streaming_attention",
]

ATTENTION_NAME = "duo_calibrate"
"""The ``attn_implementation`` name the hook is registered under."""

HOLDER_ATTR = "_duo_gate_holder"
"""Attribute of each attention module that points at its :class:`GateHolder`."""

DEFAULT_TILE = 256


@dataclass
class GateHolder:
    """Mutable state the attention hook reads (one per model being calibrated).

    Attributes:
        gates: [num_layers, num_kv_heads] float tensor (usually a leaf with ``requires_grad``).
        sink: S, sink tokens a streaming head keeps (>= 0).
        recent: W, recent tokens a streaming head keeps, the current one included (>= 1).
        tile: query rows per streaming-attention tile (>= 1).
        full_only: when True the hook returns plain full attention and ignores the gates
            (the frozen teacher pass).
    """

    gates: torch.Tensor
    sink: int
    recent: int
    tile: int = DEFAULT_TILE
    full_only: bool = False

    def __post_init__(self) -> None:
        if self.gates.dim() != 2:
            raise ValueError(f"gates must be [layers, kv_heads], got shape {self.gates.shape}")
        if self.sink < 0 or self.recent < 1 or self.tile < 1:
            raise ValueError(
                f"need sink >= 0, recent >= 1, tile >= 1; got {self.sink}, {self.recent}, "
                f"{self.tile}"
            )

    @contextlib.contextmanager
    def teacher(self) -> Iterator[None]:
        """Within the block the hook computes full attention only (gates ignored)."""
        previous = self.full_only
        self.full_only = True
        try:
            yield
        finally:
            self.full_only = previous


def streaming_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    sink: int,
    recent: int,
    scale: float,
    tile: int = DEFAULT_TILE,
) -> torch.Tensor:
    """Sink + window causal attention of a whole sequence, tiled over queries.

    Query p attends to keys j <= p with ``j < sink`` or ``j > p - recent`` (the mask of
    :func:`vllm_duo.reference.duo_mask`). Positions are 0..T-1 for queries and keys.

    The queries are cut into ``ceil(T / tile)`` tiles; each tile gathers the only keys it can
    see, the S sink keys and the ``W + tile - 1`` keys of its window, and all tiles run as one
    batched SDPA call. The gathered keys and values take ``ceil(T / tile) * (S + W + tile - 1)``
    rows per head (about ``T * (S + W + tile) / tile``), the scores ``T * (S + W + tile)``: no
    T x T tensor, and one gather (a scatter-add in backward) instead of a slice per tile, whose
    backward would allocate a full-length gradient per tile.

    Args:
        query: [B, Hq, T, D].
        key, value: [B, Hkv, T, D] with Hq a multiple of Hkv (GQA: query head h uses KV head
            ``h // (Hq // Hkv)``).
        sink, recent: S >= 0 and W >= 1.
        scale: softmax scale (usually ``D ** -0.5``).
        tile: query rows per tile.

    Returns:
        [B, Hq, T, D] in the query's dtype.
    """
    batch, num_q_heads, seq_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if key.shape[-2] != seq_len:
        raise ValueError(
            f"streaming_attention needs as many keys as queries (a whole sequence), got "
            f"{seq_len} queries and {key.shape[-2]} keys"
        )
    tile = min(tile, seq_len)
    index, visible = _tile_plan(seq_len, sink, recent, tile, str(query.device))
    num_tiles, num_keys = index.shape
    padded = num_tiles * tile
    if padded != seq_len:
        query = F.pad(query, (0, 0, 0, padded - seq_len))
    # [B, Hq, n*tile, D] -> [B*n, Hq, tile, D]
    q = query.view(batch, num_q_heads, num_tiles, tile, head_dim).transpose(1, 2)
    q = q.reshape(batch * num_tiles, num_q_heads, tile, head_dim)
    # [B, Hkv, T, D] gathered at [n, keys] -> [B*n, Hkv, keys, D]
    k = key[:, :, index].transpose(1, 2).reshape(batch * num_tiles, num_kv_heads, num_keys, -1)
    v = value[:, :, index].transpose(1, 2).reshape(batch * num_tiles, num_kv_heads, num_keys, -1)
    mask = visible if batch == 1 else visible.repeat(batch, 1, 1, 1)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=num_q_heads != num_kv_heads
    )
    out = out.view(batch, num_tiles, num_q_heads, tile, -1).transpose(1, 2)
    return out.reshape(batch, num_q_heads, padded, -1)[:, :, :seq_len]


@functools.lru_cache(maxsize=4)
def _tile_plan(
    seq_len: int, sink: int, recent: int, tile: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key indices and visibility of every query tile (the same for every layer: cached).

    Tile t holds queries ``[t * tile, (t + 1) * tile)`` (the last one padded past T). Its keys
    are the sink slots ``0..S-1`` followed by the window slots ``t * tile - W + 1`` ..
    ``(t + 1) * tile - 1``. Slots outside ``[0, T)``, window slots below S (already covered by
    the sink slots) and slots the mask of :func:`vllm_duo.reference.duo_mask` hides are
    invisible; their index is clamped into range. Each padded query row still sees at least
    one real key, so no row is all-masked (which would give NaN).

    Returns:
        (index [n_tiles, S + W + tile - 1] int64 into 0..T-1,
         visible [n_tiles, 1, tile, S + W + tile - 1] bool)
    """
    num_tiles = -(-seq_len // tile)
    starts = torch.arange(num_tiles, device=device)[:, None] * tile
    sink_slots = torch.arange(sink, device=device).expand(num_tiles, sink)
    window_slots = starts - recent + 1 + torch.arange(recent + tile - 1, device=device)
    slots = torch.cat((sink_slots, window_slots), dim=1)  # [n, keys]
    in_window_part = torch.arange(slots.shape[1], device=device) >= sink
    valid = (slots >= 0) & (slots < seq_len) & ~(in_window_part & (slots < sink))
    queries = (starts + torch.arange(tile, device=device))[:, :, None]  # [n, tile, 1]
    keys = slots[:, None, :]  # [n, 1, keys]
    seen = (keys <= queries) & ((keys < sink) | (keys > queries - recent))
    # Padding rows (past T) see every real key of their tile: never an all-masked row, whose
    # NaN would leak into the gradients even though the row itself is dropped.
    visible = valid[:, None, :] & (seen | (queries >= seq_len))
    return slots.clamp(0, seq_len - 1), visible[:, None]


def gated_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: gated mix of full and streaming attention.

    Args:
        module: the attention module; must carry a :class:`GateHolder` in ``HOLDER_ATTR`` and
            its ``layer_idx``.
        query: [B, Hq, T, D] (after RoPE).
        key, value: [B, Hkv, T, D] (after RoPE).
        attention_mask: ignored. transformers builds no mask for a custom attention function,
            and calibration prompts are unpadded, so causality is all there is.
        scaling: softmax scale (defaults to ``D ** -0.5``).
        dropout: must be 0 (calibration is deterministic).

    Returns:
        (out [B, T, Hq, D], None): the layout transformers' attention modules expect.
    """
    del attention_mask, kwargs
    holder: GateHolder | None = getattr(module, HOLDER_ATTR, None)
    if holder is None:
        raise RuntimeError(
            f"attention module {type(module).__name__} has no gate holder: call "
            f"attach_gates(model, holder) before running a '{ATTENTION_NAME}' model"
        )
    if dropout:
        raise RuntimeError(f"calibration attention needs dropout 0, got {dropout}")
    if key.shape[-2] != query.shape[-2]:
        raise RuntimeError(
            f"calibration attention runs whole sequences without a KV cache (use_cache=False); "
            f"got {query.shape[-2]} queries and {key.shape[-2]} keys"
        )
    num_q_heads, num_kv_heads = query.shape[1], key.shape[1]
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    gqa = num_q_heads != num_kv_heads
    full = F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scale, enable_gqa=gqa
    )
    seq_len = query.shape[-2]
    # When every query's keys fit in sink + window, streaming attention equals full attention.
    if holder.full_only or seq_len <= holder.sink + holder.recent:
        mixed = full
    else:
        layer = int(module.layer_idx)
        gates = holder.gates[layer]
        if gates.shape[0] != num_kv_heads:
            raise RuntimeError(
                f"layer {layer} has {num_kv_heads} KV heads but the gate table has "
                f"{gates.shape[0]} columns"
            )
        stream = streaming_attention(
            query,
            key,
            value,
            sink=holder.sink,
            recent=holder.recent,
            scale=scale,
            tile=holder.tile,
        )
        alpha = gates.float().repeat_interleave(num_q_heads // num_kv_heads)
        alpha = alpha.view(1, num_q_heads, 1, 1)
        # Mixed in float32 (alpha promotes it), so a bf16 model's gate gradients are summed
        # in float32 too.
        mixed = (stream + alpha * (full - stream)).to(query.dtype)
    return mixed.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register :func:`gated_attention_forward` with transformers; returns its name.

    Load the model with ``attn_implementation=ATTENTION_NAME``. Idempotent.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, gated_attention_forward)
    return ATTENTION_NAME


def attach_gates(model: torch.nn.Module, holder: GateHolder) -> int:
    """Point every attention module of ``model`` at ``holder``; returns how many.

    Attention modules are recognised by a ``layer_idx`` attribute together with a ``k_proj``
    or ``qkv_proj`` child (the transformers decoder convention).

    Raises:
        ValueError: the number of attention modules or their layer indices do not match the
            gate table's rows.
    """
    found: list[int] = []
    for module in model.modules():
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None or not (hasattr(module, "k_proj") or hasattr(module, "qkv_proj")):
            continue
        setattr(module, HOLDER_ATTR, holder)
        found.append(int(layer_idx))
    num_layers = holder.gates.shape[0]
    if sorted(found) != list(range(num_layers)):
        raise ValueError(
            f"found attention modules for layers {sorted(found)}, expected one for each of "
            f"0..{num_layers - 1}"
        )
    return len(found)
