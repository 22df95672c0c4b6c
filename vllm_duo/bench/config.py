"""Settings of one benchmark run, validated once (no vLLM import)."""

from __future__ import annotations

import dataclasses
import math

from vllm_duo.errors import DuoConfigError
from vllm_duo.settings import KV_CACHE_DTYPES

# Llama-3-8B's attention per layer: 32 query heads over 8 KV heads of size 128.
LLAMA3_8B_ATTENTION = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128}
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclasses.dataclass(frozen=True)
class SyntheticModel:
    """A random-weight Llama whose attention has Llama-3-8B's shape.

    Hidden and MLP widths are smaller than the real model's by default so that, as in
    long-context serving, attention dominates the step on a CPU; ``--hidden-size 4096
    --intermediate-size 14336`` gives the full layer.
    """

    num_layers: int = 2
    hidden_size: int = 1024
    intermediate_size: int = 1024
    vocab_size: int = 1024

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "intermediate_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise DuoConfigError(f"bench: {name}={value!r} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What ``vllm-duo bench`` measures and with which DuoAttention settings."""

    contexts: tuple[int, ...] = (4096, 8192, 16384, 32768, 65536)
    sparsity: float = 0.5
    sink: int = 64
    recent: int = 256
    decode_tokens: int = 32
    concurrency: int = 4
    max_num_batched_tokens: int = 8192
    dtype: str = "bfloat16"
    kv_cache_gib: float = 4.0
    seed: int = 0
    kv_cache_dtype: str = "auto"
    """DUO's KV cache dtype (vLLM's --kv-cache-dtype)."""
    stock_kv_cache_dtype: str = "auto"
    """The stock backend's KV cache dtype."""
    rounds: int = 1
    """Engines per (context, backend), in the order stock, DUO, DUO, stock, ...: each metric is
    the median over rounds, so a machine whose speed drifts during the run hits both sides
    alike."""

    def __post_init__(self) -> None:
        if not self.contexts:
            raise DuoConfigError("bench: --contexts is empty; give e.g. 4096,8192")
        for context in self.contexts:
            if not isinstance(context, int) or context < 2:
                raise DuoConfigError(
                    f"bench: context length {context!r} must be an integer >= 2 (tokens)"
                )
        if list(self.contexts) != sorted(set(self.contexts)):
            raise DuoConfigError(
                f"bench: --contexts {list(self.contexts)} must be increasing without repeats"
            )
        if not (isinstance(self.sparsity, float) and 0.0 <= self.sparsity <= 1.0):
            raise DuoConfigError(f"bench: --sparsity {self.sparsity!r} must be in [0, 1]")
        if self.sink < 0 or self.recent < 1:
            raise DuoConfigError(
                f"bench: --sink {self.sink} must be >= 0 and --recent {self.recent} >= 1"
            )
        if self.decode_tokens < 4:
            raise DuoConfigError(
                f"bench: --decode-tokens {self.decode_tokens} must be >= 4 (the first decode "
                "step is a warm-up and the median needs a few more)"
            )
        if not isinstance(self.rounds, int) or not 1 <= self.rounds <= 10:
            raise DuoConfigError(f"bench: --rounds {self.rounds!r} must be an integer in [1, 10]")
        if self.concurrency < 1:
            raise DuoConfigError(f"bench: --concurrency {self.concurrency} must be >= 1")
        if self.max_num_batched_tokens < 16:
            raise DuoConfigError(
                f"bench: --max-num-batched-tokens {self.max_num_batched_tokens} must be >= 16"
            )
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise DuoConfigError(
                f"bench: --dtype {self.dtype!r} must be bfloat16, float16 or float32"
            )
        if not (math.isfinite(self.kv_cache_gib) and self.kv_cache_gib > 0):
            raise DuoConfigError(f"bench: --kv-cache-gib {self.kv_cache_gib} must be > 0")
        for flag, value in (("--kv-cache-dtype", self.kv_cache_dtype),
                            ("--stock-kv-cache-dtype", self.stock_kv_cache_dtype)):  # fmt: skip
            if value not in KV_CACHE_DTYPES:
                raise DuoConfigError(
                    f"bench: {flag} {value!r} must be one of {', '.join(KV_CACHE_DTYPES)}"
                )

    @property
    def max_model_len(self) -> int:
        """Room for the longest prompt plus its decode tokens."""
        return self.contexts[-1] + self.decode_tokens + 16

    @property
    def kv_cache_bytes(self) -> int:
        return int(self.kv_cache_gib * (1 << 30))

    def kv_element_bytes(self, kv_cache_dtype: str) -> int:
        """Bytes per cached K or V element: the model dtype's for ``auto``, 1 for fp8."""
        return _DTYPE_BYTES[self.dtype] if kv_cache_dtype == "auto" else 1

    @property
    def kv_dtype_gain(self) -> float:
        """How many times fewer bytes DUO's cache dtype stores per element than stock's: it
        multiplies every KV-bytes ideal (capacity, bytes held, bytes read per decode step)."""
        return self.kv_element_bytes(self.stock_kv_cache_dtype) / self.kv_element_bytes(
            self.kv_cache_dtype
        )


def ideal_decode_ratio(context: int, retrieval_fraction: float, sink: int, recent: int) -> float:
    """DESIGN.md section 8: ``L / (r L + (1 - r)(S + W))``, KV bytes read per decode step.

    The same bound holds for KV bytes stored per sequence, hence for capacity.
    """
    streaming = min(context, sink + recent)
    return context / (retrieval_fraction * context + (1 - retrieval_fraction) * streaming)


def ideal_prefill_ratio(context: int, retrieval_fraction: float, sink: int, recent: int) -> float:
    """Attention work of a causal prefill of ``context`` tokens, full over DUO.

    A query at position p scores p + 1 keys on a retrieval head and min(p + 1, S + W)
    on a streaming head; summed over p that is L(L+1)/2 against the streaming sum.
    """
    full = context * (context + 1) / 2
    span = min(context, sink + recent)
    streaming = span * (span + 1) / 2 + (context - span) * span
    return full / (retrieval_fraction * full + (1 - retrieval_fraction) * streaming)
