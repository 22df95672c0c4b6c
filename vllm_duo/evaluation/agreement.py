"""Agreement of two runs of one model on the same text: per-position KL and top-1 agreement.

The eval workers return the final hidden state of every position (vLLM's token-embedding
pooling, the final norm's output); the next-token distribution is ``softmax(h @ W.T)`` with
the model's LM head ``W`` (the same product vLLM's sampler starts from). From two runs,
reference (full attention) ``P`` and test (DUO) ``Q``, per position ``p``:

- ``KL(P_p || Q_p) = sum_t P_p(t) (log P_p(t) - log Q_p(t))`` in nats, over the whole
  vocabulary (exact, no top-k truncation);
- top-1 agreement: ``argmax P_p == argmax Q_p``.

Positions before S + W see the same keys in both runs, so their values measure numerical
noise (kernel differences), not DUO; summaries are taken over position bins beyond S + W.

Pure: torch, numpy and safetensors only; never vLLM.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["load_lm_head", "position_bins", "summarise", "token_agreement"]


def load_lm_head(model_dir: Path) -> Any:
    """The LM head weight ``[vocab, hidden]`` (float32) of a local safetensors checkpoint.

    Uses ``lm_head.weight`` when the checkpoint has one, else the input embeddings when the
    config ties them (``tie_word_embeddings``).

    Raises:
        ValueError: no safetensors files, or neither tensor is there.
    """
    import torch
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} has no .safetensors files to read the LM head from")
    names = ["lm_head.weight"]
    if config.get("tie_word_embeddings", False):
        names += ["model.embed_tokens.weight", "embed_tokens.weight"]
    for name in names:
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                if name in handle.keys():  # noqa: SIM118 - safe_open has no __contains__
                    return handle.get_tensor(name).to(torch.float32)
    raise ValueError(f"{model_dir}: no LM head among {', '.join(names)} in {len(files)} file(s)")


def token_agreement(
    reference: Any, test: Any, lm_head: Any, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Per-position KL(reference || test) in nats and top-1 agreement.

    Args:
        reference, test: ``[T, hidden]`` final hidden states of the same tokens.
        lm_head: ``[vocab, hidden]``.
        chunk: positions per matmul (bounds memory at ``chunk x vocab`` floats).

    Returns:
        (kl [T] float64, agree [T] bool).
    """
    import torch

    reference = torch.as_tensor(reference, dtype=torch.float32)
    test = torch.as_tensor(test, dtype=torch.float32)
    if reference.shape != test.shape:
        raise ValueError(f"hidden states differ in shape: {reference.shape} vs {test.shape}")
    kl, agree = [], []
    with torch.no_grad():
        for start in range(0, reference.shape[0], chunk):
            log_p = torch.log_softmax(reference[start : start + chunk] @ lm_head.T, dim=-1)
            log_q = torch.log_softmax(test[start : start + chunk] @ lm_head.T, dim=-1)
            kl.append((log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0.0).double())
            agree.append(log_p.argmax(-1) == log_q.argmax(-1))
    return torch.cat(kl).numpy(), torch.cat(agree).numpy()


def position_bins(edges: Sequence[int], start: int) -> list[tuple[int, int]]:
    """``[(lo, hi), ...]`` position ranges: ``start``..edges[0], edges[0]..edges[1], ...

    Bins end at the given context lengths, so a bin's numbers are those of prompts up to
    that length; bins that would be empty are dropped.
    """
    bins, lo = [], start
    for hi in sorted(set(edges)):
        if hi > lo:
            bins.append((lo, hi))
            lo = hi
    return bins


def summarise(
    kl: np.ndarray, agree: np.ndarray, bins: Sequence[tuple[int, int]]
) -> list[dict[str, float | int]]:
    """Mean, median and 95th-percentile KL and top-1 agreement per position bin.

    ``kl`` and ``agree`` may be ``[windows, T]`` (several texts) or ``[T]``; bins beyond
    ``T`` are skipped.
    """
    kl = np.atleast_2d(kl)
    agree = np.atleast_2d(agree)
    rows = []
    for lo, hi in bins:
        if lo >= kl.shape[1]:
            continue
        values, hits = kl[:, lo:hi].ravel(), agree[:, lo:hi].ravel()
        rows.append(
            {
                "from": int(lo),
                "to": int(min(hi, kl.shape[1])),
                "positions": int(values.size),
                "kl_mean": float(values.mean()),
                "kl_median": float(np.median(values)),
                "kl_p95": float(np.percentile(values, 95)),
                "top1": float(hits.mean()),
            }
        )
    return rows
