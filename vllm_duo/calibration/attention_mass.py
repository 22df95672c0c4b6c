"""A cheap baseline pattern: heads ranked by the attention their answers pay to far tokens.

For each calibration prompt (the same multi-passkey prompts the gate optimisation uses), the
frozen model runs once with plain causal attention. At the positions that predict the answer
tokens (where the pass keys must be copied from far back), every query head's softmax weights
are split into the part on keys a streaming head keeps (the first S and the last W) and the
rest, the *far* mass. A KV head's score is the far mass of its query heads, averaged over
those positions and prompts; the gate written is the score divided by the largest score, so
ranking by gate is ranking by far mass. Heads that look far when the answer needs it are the
ones that lose most when they stream.

No training: one forward per prompt, about a fifth of a calibration step. Only the scored
query rows ever get a softmax over all keys ([rows x T] per head), so memory stays O(T).

Pure module: torch and transformers, never vLLM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["MASS_ATTENTION", "MassRecorder", "attention_mass_forward", "score_heads"]

MASS_ATTENTION = "duo_attention_mass"
"""The ``attn_implementation`` name the scoring hook is registered under."""

RECORDER_ATTR = "_duo_mass_recorder"


@dataclass
class MassRecorder:
    """What the hook reads (rows to score, S, W) and accumulates (far mass per KV head).

    Attributes:
        sink, recent: S and W of a streaming head.
        num_layers, num_kv_heads: the gate table's shape.
        rows: positions of the query rows to score in the current batch.
        sums: [num_layers, num_kv_heads] summed far mass (float64).
        counts: [num_layers] how many (prompt, row, query head group) means were added.
    """

    sink: int
    recent: int
    num_layers: int
    num_kv_heads: int
    rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    sums: torch.Tensor = field(init=False)
    counts: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.sums = torch.zeros(self.num_layers, self.num_kv_heads, dtype=torch.float64)
        self.counts = torch.zeros(self.num_layers, dtype=torch.float64)

    def scores(self) -> torch.Tensor:
        """Mean far mass per (layer, KV head)."""
        return self.sums / self.counts.clamp(min=1.0)[:, None]


def far_mass(
    query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor, sink: int, recent: int, scale: float
) -> torch.Tensor:
    """Softmax mass that query rows ``rows`` put on keys outside sink + window.

    Args:
        query: [B, Hq, T, D]; key: [B, Hkv, T, D] (Hq a multiple of Hkv).
        rows: [R] query positions.

    Returns:
        [B, Hq, R]: for row p, the summed causal softmax weight on keys j with
        S <= j <= p - W (0 when there are none).
    """
    group = query.shape[1] // key.shape[1]
    keys = key.repeat_interleave(group, dim=1) if group > 1 else key
    scores = torch.matmul(query[:, :, rows].float(), keys.float().transpose(-1, -2)) * scale
    positions = torch.arange(key.shape[-2], device=key.device)
    causal = positions[None, :] <= rows[:, None]  # [R, T]
    probs = F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    far = (positions[None, :] >= sink) & (positions[None, :] <= rows[:, None] - recent)
    return (probs * far).sum(-1)


def attention_mass_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: plain causal attention that records far mass."""
    del attention_mask, dropout, kwargs
    recorder: MassRecorder = getattr(module, RECORDER_ATTR)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    num_q_heads, num_kv_heads = query.shape[1], key.shape[1]
    out = F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scale, enable_gqa=num_q_heads != num_kv_heads
    )
    if recorder.rows.numel():
        mass = far_mass(query, key, recorder.rows, recorder.sink, recorder.recent, scale)
        # [B, Hq, R] -> mean over batch and rows, then over the query heads of each KV head.
        per_kv = mass.mean(dim=(0, 2)).view(num_kv_heads, -1).mean(dim=1)
        layer = int(module.layer_idx)
        recorder.sums[layer] += per_kv.double().cpu()
        recorder.counts[layer] += 1
    return out.transpose(1, 2).contiguous(), None


def _register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(MASS_ATTENTION, attention_mass_forward)
    return MASS_ATTENTION


def score_heads(
    model_dir: Any,
    dataset: Any,
    *,
    prompts: int,
    sink: int,
    recent: int,
    shape: dict[str, int],
    dtype: Any,
    device: str = "cpu",
    progress: bool = False,
    step_seconds: list[list[float]] | None = None,
) -> torch.Tensor:
    """Far-mass gates in [0, 1] for a model, from ``prompts`` calibration prompts.

    Args:
        model_dir: local Hugging Face model directory.
        dataset: a :class:`vllm_duo.calibration.data.PasskeyDataset`; prompt i is
            ``dataset.batch(i, 1)`` (the prompts step i of a calibration would train on).
        prompts: how many prompts to score.
        shape: ``num_layers`` and ``num_kv_heads`` of the model.
        step_seconds: if given, gets ``[prompt_length, seconds]`` of every prompt.

    Returns:
        [num_layers, num_kv_heads] float32 gates: the mean far mass over the largest one.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModel

    model = AutoModel.from_pretrained(
        model_dir, local_files_only=True, dtype=dtype, attn_implementation=_register()
    )
    model.to(device).eval()
    recorder = MassRecorder(sink, recent, shape["num_layers"], shape["num_kv_heads"])
    for module in model.modules():
        if getattr(module, "layer_idx", None) is not None and hasattr(module, "k_proj"):
            setattr(module, RECORDER_ATTR, recorder)
    for step in tqdm(range(prompts), disable=not progress, desc="attention mass"):
        began = time.perf_counter()
        (sample,) = dataset.batch(step, 1)
        ids = torch.tensor([sample.input_ids], dtype=torch.long, device=device)
        recorder.rows = torch.tensor(sample.loss_positions, device=device)
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        if step_seconds is not None:
            step_seconds.append([len(sample.input_ids), round(time.perf_counter() - began, 3)])
    scores = recorder.scores().float()
    return scores / scores.max().clamp(min=1e-12)
