"""Reference DuoAttention in plain PyTorch + transformers (fp32, dense masks).

This is the independent oracle the tests hold the vLLM backend to: no paging,
no kernels, just the mask of DESIGN.md section 3 applied to a whole sequence.
With an fp8 KV cache (:class:`KVQuantisation`) every key and value is first replaced
by what the cache holds for it, exactly as vLLM quantises it, since that is all any
kernel (vLLM's or DUO's) can read. It never imports vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vllm_duo.kernels.fp8 import Fp8Format, round_trip

_REGISTERED_NAME = "duo_reference"


def duo_mask(
    query_positions: torch.Tensor, key_len: int, *, streaming: bool, sink: int, recent: int
) -> torch.Tensor:
    """Boolean visibility [num_queries, key_len] for one head.

    Retrieval heads see every key ``j <= p``; streaming heads additionally need
    ``j < sink`` or ``j > p - recent``.
    """
    keys = torch.arange(key_len, device=query_positions.device)[None, :]
    queries = query_positions[:, None]
    visible = keys <= queries
    if streaming:
        visible &= (keys < sink) | (keys > queries - recent)
    return visible


def duo_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    streaming_kv_heads: Sequence[bool],
    *,
    sink: int,
    recent: int,
    scale: float,
) -> torch.Tensor:
    """Dense DuoAttention of one sequence, computed in fp32.

    Args:
        query: [num_q_heads, T, D] at positions 0..T-1.
        key, value: [num_kv_heads, T, D].
        streaming_kv_heads: per KV head, True for a streaming head.

    Returns:
        [num_q_heads, T, D] in fp32.
    """
    num_q_heads, seq_len, _ = query.shape
    num_kv_heads = key.shape[0]
    group = num_q_heads // num_kv_heads
    positions = torch.arange(seq_len, device=query.device)
    out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    for kv_head in range(num_kv_heads):
        mask = duo_mask(
            positions,
            seq_len,
            streaming=bool(streaming_kv_heads[kv_head]),
            sink=sink,
            recent=recent,
        )
        k = key[kv_head].float()
        v = value[kv_head].float()
        q = query[kv_head * group : (kv_head + 1) * group].float()
        scores = torch.matmul(q, k.T) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        out[kv_head * group : (kv_head + 1) * group] = torch.softmax(scores, dim=-1) @ v
    return out


@dataclass(frozen=True)
class KVQuantisation:
    """An fp8 KV cache: keys and values as vLLM stores and reads them back."""

    fmt: Fp8Format
    k_scales: Sequence[float]
    """Per decoder layer (vLLM's per-layer ``k_scale``; 1.0 without checkpoint scales)."""
    v_scales: Sequence[float]
    platform: str = "cpu"
    """Whose quantisation rule: ``cpu`` (truncation) or ``cuda`` (round to nearest)."""

    def apply(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(key, value) of ``layer`` as the cache holds them, in float32."""
        return (
            round_trip(key, self.fmt, self.k_scales[layer], platform=self.platform),
            round_trip(value, self.fmt, self.v_scales[layer], platform=self.platform),
        )


class ReferencePattern:
    """The per-layer streaming mask the HF attention hook reads (mutable holder)."""

    streaming: np.ndarray | None = None
    sink: int = 0
    recent: int = 1
    kv_quantisation: KVQuantisation | None = None


def _hf_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers attention hook: [B, H, T, D] inputs, [B, T, H, D] output."""
    del attention_mask, dropout, kwargs
    pattern = ReferencePattern.streaming
    if pattern is None:
        raise RuntimeError("set reference pattern first: use_reference_pattern(...)")
    if ReferencePattern.kv_quantisation is not None:
        key, value = ReferencePattern.kv_quantisation.apply(module.layer_idx, key, value)
    outputs = [
        duo_attention(
            query[b],
            key[b],
            value[b],
            pattern[module.layer_idx],
            sink=ReferencePattern.sink,
            recent=ReferencePattern.recent,
            scale=scaling,
        )
        for b in range(query.shape[0])
    ]
    out = torch.stack(outputs).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def use_reference_pattern(
    retrieval_mask: np.ndarray,
    *,
    sink: int,
    recent: int,
    kv_quantisation: KVQuantisation | None = None,
) -> str:
    """Install the DuoAttention reference for transformers models.

    Returns the ``attn_implementation`` name to load the model with. Only one
    pattern (and KV quantisation) is active per process: the reference runs one
    model at a time.
    """
    from transformers import AttentionInterface

    ReferencePattern.streaming = ~np.asarray(retrieval_mask, dtype=bool)
    ReferencePattern.sink = sink
    ReferencePattern.recent = recent
    ReferencePattern.kv_quantisation = kv_quantisation
    AttentionInterface.register(_REGISTERED_NAME, _hf_attention)
    return _REGISTERED_NAME


@torch.no_grad()
def reference_logprobs(model, token_ids: Sequence[int]) -> torch.Tensor:
    """Log-probabilities [T, vocab] in fp32 of ``model`` over one sequence."""
    ids = torch.tensor([list(token_ids)])
    logits = model(input_ids=ids).logits[0].float()
    return torch.log_softmax(logits, dim=-1)
