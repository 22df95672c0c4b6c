"""Settings of one ``vllm-duo eval`` run, validated up front (pure: no vLLM).

Every bad value is one :class:`~vllm_duo.errors.DuoConfigError` naming the flag, what is
allowed and how to fix it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from vllm_duo.errors import DuoConfigError
from vllm_duo.evaluation.passkey import FAMILIES
from vllm_duo.settings import KV_CACHE_DTYPES

__all__ = ["METHODS", "PARTS", "EvalConfig", "default_depths", "default_lengths"]

METHODS = ("full", "duo", "streaming", "random", "baseline")
"""full: the stock backend; duo: the pattern; streaming: every head streaming (sparsity 1);
random: uniformly random gates; baseline: a second pattern (``--baseline``) run like duo."""

PARTS = ("niah", "sweep", "agreement")
"""niah: heat maps at --sparsity; sweep: accuracy against sparsity; agreement: KL/top-1."""


def default_lengths(max_context: int, max_tokens: int) -> tuple[int, ...]:
    """1K, 2K, ... up to the model's context; the last one leaves room for the answer."""
    top = max_context - max_tokens
    lengths = [k * 1024 for k in range(1, max_context // 1024 + 1) if k * 1024 < top]
    return (*lengths, top)


def default_depths(count: int) -> tuple[float, ...]:
    """``count`` depths at the centres of equal slices of the haystack (5%, 15%, ... 95%)."""
    return tuple(round((i + 0.5) / count, 4) for i in range(count))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run.

    Attributes:
        model: local Hugging Face model directory.
        pattern: the pattern evaluated as ``duo`` (a directory or .tsv path).
        out: where results, logs and plots go.
        max_context: the model's context (max_position_embeddings); prompts plus answers
            must fit in it.
        lengths: prompt lengths of the heat maps, in tokens.
        depths: needle depths of the heat maps, fractions of the haystack.
        methods: which of :data:`METHODS` to run.
        baseline: the pattern run as ``baseline`` (needs ``baseline`` in ``methods``).
        sparsity: the sparsity of the heat maps and the agreement measurement.
        sparsities: the points of the sparsity sweep.
        sweep_lengths, sweep_depths: the (fewer) cases of each sweep point.
        per_cell: cases per (length, depth) cell (different keys and haystack offsets).
        families: prompt families (:data:`vllm_duo.evaluation.passkey.FAMILIES`) to run.
        parts: which of :data:`PARTS` to run.
        agreement_length: tokens of natural text per agreement window.
        agreement_windows: how many windows (different places in the text).
        sink, recent: S and W of the streaming heads.
        dtype: the engines' dtype.
        kv_cache_dtype: every engine's KV cache dtype (vLLM's ``--kv-cache-dtype``): ``full``
            is then the stock backend with the same cache.
        seed: seeds the cases, the random pattern and the text windows.
        max_tokens: tokens generated per answer (greedy).
    """

    model: Path
    pattern: Path
    out: Path
    max_context: int
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    methods: tuple[str, ...] = ("full", "duo", "streaming", "random")
    baseline: Path | None = None
    sparsity: float = 0.5
    sparsities: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)
    sweep_lengths: tuple[int, ...] = ()
    sweep_depths: tuple[float, ...] = default_depths(5)
    per_cell: int = 1
    families: tuple[str, ...] = ("heldout",)
    parts: tuple[str, ...] = PARTS
    agreement_length: int = 0
    agreement_windows: int = 2
    sink: int = 64
    recent: int = 256
    dtype: str = "bfloat16"
    kv_cache_dtype: str = "auto"
    seed: int = 0
    max_tokens: int = 16

    def __post_init__(self) -> None:
        choices = (("methods", METHODS), ("parts", PARTS), ("families", tuple(FAMILIES)))
        for name, allowed in choices:
            values = getattr(self, name)
            bad = [v for v in values if v not in allowed]
            if not values or bad or len(set(values)) != len(values):
                what = f"{bad[0]!r} is not one of" if bad else "needs distinct values from"
                raise DuoConfigError(
                    f"{_flag(name)}={','.join(values)}: {what} {', '.join(allowed)}; give a "
                    f"comma-separated list, e.g. {_flag(name)}={','.join(allowed[:2])}."
                )
        if ("baseline" in self.methods) != (self.baseline is not None):
            raise DuoConfigError(
                "--baseline DIR and the method 'baseline' go together: pass --baseline with a "
                "pattern directory to compare (it is added to --methods), or drop 'baseline'."
            )
        if "agreement" in self.parts and not {"full", "duo"} <= set(self.methods):
            raise DuoConfigError(
                f"--parts includes agreement, which compares duo with full: keep both in "
                f"--methods (got {','.join(self.methods)}) or drop agreement from --parts."
            )
        for name in ("sparsity",):
            self._fraction(name, getattr(self, name))
        for value in self.sparsities:
            self._fraction("sparsities", value)
        for name in ("depths", "sweep_depths"):
            values = getattr(self, name)
            if not values or sorted(set(values)) != list(values):
                raise DuoConfigError(
                    f"{_flag(name)}: expected distinct increasing fractions, got {values}."
                )
            for value in values:
                self._fraction(name, value)
        room = self.max_context - self.max_tokens
        for name in ("lengths", "sweep_lengths"):
            values = getattr(self, name)
            if (name == "lengths" and not values) or sorted(set(values)) != list(values):
                raise DuoConfigError(
                    f"{_flag(name)}: expected distinct increasing token counts, got {values}."
                )
            for value in values:
                if not 256 <= value <= room:
                    raise DuoConfigError(
                        f"{_flag(name)}: {value} tokens is out of range: a prompt needs at "
                        f"least 256 tokens and at most {room} (the model's context "
                        f"{self.max_context} minus --max-tokens {self.max_tokens})."
                    )
        minimums = {
            "per_cell": 1,
            "agreement_windows": 1,
            "sink": 0,
            "recent": 1,
            "max_tokens": 1,
            "seed": 0,
        }
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise DuoConfigError(
                    f"{_flag(name)}={value!r} is invalid: expected an integer >= {minimum}."
                )
        if "agreement" in self.parts and not (
            self.sink + self.recent < self.agreement_length <= self.max_context
        ):
            raise DuoConfigError(
                f"--agreement-length={self.agreement_length} must exceed --sink + --recent "
                f"({self.sink + self.recent}) and fit the model's context ({self.max_context})."
            )
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise DuoConfigError(
                f"--dtype={self.dtype!r} is invalid: expected bfloat16, float16 or float32."
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise DuoConfigError(
                f"--kv-cache-dtype={self.kv_cache_dtype!r} is invalid: expected one of "
                f"{', '.join(KV_CACHE_DTYPES)}."
            )

    @staticmethod
    def _fraction(name: str, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DuoConfigError(f"{_flag(name)}: {value!r} is not a number in [0, 1].")
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise DuoConfigError(
                f"{_flag(name)}: {value!r} is out of range: expected a fraction in [0, 1]."
            )

    @property
    def sweep_points(self) -> tuple[float, ...]:
        """Sparsities a pattern method runs at: the sweep's and the heat maps' one."""
        points = set(self.sparsities) if "sweep" in self.parts else set()
        if {"niah", "agreement"} & set(self.parts):
            points.add(self.sparsity)
        return tuple(sorted(points))
