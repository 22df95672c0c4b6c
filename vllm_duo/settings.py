"""User settings of the DUO attention backend, read from ``VLLM_DUO_*`` environment variables.

Pure module: no vLLM import, so the settings can be validated (and tested) anywhere.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from vllm_duo.errors import DuoConfigError

# vLLM's --kv-cache-dtype values DUO serves on some platform: the model's dtype, or an fp8
# format (which of them a platform takes: DuoAttentionBackend.kv_cache_dtypes).
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")

__all__ = [
    "DEFAULT_KERNELS",
    "DEFAULT_RECENT",
    "DEFAULT_SINK",
    "DEFAULT_SPARSITY",
    "ENV_VARS",
    "KERNEL_CHOICES",
    "MAX_TOKENS",
    "DuoSettings",
    "kernels_from_env",
]

DEFAULT_SPARSITY = 0.5
DEFAULT_SINK = 64
DEFAULT_RECENT = 256
# Token counts end up in int32 kernel arguments and block tables; anything larger is a typo.
MAX_TOKENS = 2**31 - 1

ENV_PATTERN = "VLLM_DUO_PATTERN"
ENV_SPARSITY = "VLLM_DUO_SPARSITY"
ENV_THRESHOLD = "VLLM_DUO_THRESHOLD"
ENV_SINK = "VLLM_DUO_SINK"
ENV_RECENT = "VLLM_DUO_RECENT"
ENV_KERNELS = "VLLM_DUO_KERNELS"

KERNEL_CHOICES: dict[str, str] = {
    "auto": "the platform's fastest kernels that are installed",
    "native": "the platform's native kernels only (vLLM's CPU kernel on CPU; the csrc/ CUDA "
    "decode extension on NVIDIA GPUs, which must then be built)",
    "triton": "Triton kernels for both head kinds (on CPU under TRITON_INTERPRET=1: a test "
    "mode that runs the GPU code path)",
}
DEFAULT_KERNELS = "auto"

ENV_VARS: dict[str, str] = {
    ENV_PATTERN: (
        "DuoAttention head pattern: a bundled pattern name (`vllm-duo patterns list`) or a "
        "directory containing full_attention_heads.tsv; default: the bundled pattern of the model."
    ),
    ENV_SPARSITY: (
        f"Fraction of all KV heads that become streaming heads, a float in [0, 1]; "
        f"default {DEFAULT_SPARSITY} unless {ENV_THRESHOLD} is set."
    ),
    ENV_THRESHOLD: (
        f"Instead of {ENV_SPARSITY}: heads whose gate is >= this float in [0, 1] are retrieval "
        f"heads; default unset."
    ),
    ENV_SINK: f"Sink tokens kept by streaming heads, an integer >= 0; default {DEFAULT_SINK}.",
    ENV_RECENT: (
        f"Recent tokens (including the query itself) kept by streaming heads, an integer >= 1; "
        f"default {DEFAULT_RECENT}."
    ),
    ENV_KERNELS: (
        f"Kernel family: {', '.join(KERNEL_CHOICES)}; default {DEFAULT_KERNELS}. "
        + "; ".join(f"{name}: {meaning}" for name, meaning in KERNEL_CHOICES.items())
        + "."
    ),
}

# ASCII digits only: str.isdigit() would also accept characters such as "²" or Arabic-Indic digits.
_INT_RE = re.compile(r"[0-9]+")
# An ASCII decimal float. float() alone would also accept "0.2_5" (= 0.25) or non-ASCII digits;
# like the counts above, only plain spellings are taken. The same rule reads pattern files.
DECIMAL_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _check_fraction(var: str, value: object, meaning: str) -> float:
    """Validate a float in [0, 1] and return it as a plain float."""
    # bool is an int subclass; True as a sparsity is certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DuoConfigError(
            f"{var}={value!r} is not a number: expected a float in [0, 1] ({meaning})."
        )
    number = float(value)
    if not math.isfinite(number):
        raise DuoConfigError(
            f"{var}={value!r} is not a finite number: expected a float in [0, 1] ({meaning})."
        )
    if not 0.0 <= number <= 1.0:
        raise DuoConfigError(
            f"{var}={value!r} is out of range: expected a float in [0, 1] ({meaning})."
        )
    return number


def _check_count(var: str, value: object, minimum: int, meaning: str) -> int:
    """Validate an integer token count in [minimum, MAX_TOKENS]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DuoConfigError(
            f"{var}={value!r} is not an integer: expected an integer >= {minimum} ({meaning})."
        )
    if not minimum <= value <= MAX_TOKENS:
        raise DuoConfigError(
            f"{var}={value!r} is out of range: expected an integer in [{minimum}, {MAX_TOKENS}] "
            f"({meaning})."
        )
    return int(value)


_SPARSITY_MEANING = "fraction of KV heads that become streaming heads"
_THRESHOLD_MEANING = "heads with gate >= threshold become retrieval heads"
_SINK_MEANING = "sink tokens kept by streaming heads; 0 disables sinks"
_RECENT_MEANING = "recent tokens kept by streaming heads; a query always sees itself"


def _parse_fraction(var: str, raw: str, meaning: str) -> float:
    try:
        number = float(raw.strip())
        # Spelled-out nan/inf pass on to the "not finite" error below; other text that float()
        # takes but a plain decimal is not ("0.2_5", non-ASCII digits) is not a number here.
        if math.isfinite(number) and not DECIMAL_RE.fullmatch(raw.strip()):
            raise ValueError(raw)
    except ValueError:
        raise DuoConfigError(
            f"{var}={raw!r} is not a number: expected a float in [0, 1] ({meaning}); "
            f"example: {var}=0.5."
        ) from None
    if not math.isfinite(number):
        raise DuoConfigError(
            f"{var}={raw!r} is not a finite number: expected a float in [0, 1] ({meaning})."
        )
    if not 0.0 <= number <= 1.0:
        raise DuoConfigError(
            f"{var}={raw!r} is out of range: expected a float in [0, 1] ({meaning})."
        )
    return number


def _parse_count(var: str, raw: str, minimum: int, meaning: str) -> int:
    text = raw.strip()
    if not _INT_RE.fullmatch(text):
        raise DuoConfigError(
            f"{var}={raw!r} is not a base-10 integer: expected digits only, an integer >= "
            f"{minimum} ({meaning}); example: {var}=64."
        )
    number = int(text)
    if not minimum <= number <= MAX_TOKENS:
        raise DuoConfigError(
            f"{var}={raw!r} is out of range: expected an integer in [{minimum}, {MAX_TOKENS}] "
            f"({meaning})."
        )
    return number


@dataclass(frozen=True)
class DuoSettings:
    """Validated DUO settings.

    Exactly one of ``sparsity`` and ``threshold`` is set (when neither is given, sparsity
    defaults to 0.5): it decides which KV heads are retrieval heads (see
    :func:`vllm_duo.patterns.select_retrieval`). ``pattern`` is None when the pattern should be
    chosen from the model id. ``sink`` (S) and ``recent`` (W) bound what a
    streaming head sees: keys ``j < S`` and the W most recent keys including the query itself.
    """

    pattern: str | None = None
    sparsity: float | None = None
    threshold: float | None = None
    sink: int = DEFAULT_SINK
    recent: int = DEFAULT_RECENT

    def __post_init__(self) -> None:
        if self.pattern is not None and (
            not isinstance(self.pattern, str) or not self.pattern.strip()
        ):
            raise DuoConfigError(
                f"{ENV_PATTERN}={self.pattern!r} is not a usable pattern: expected a bundled "
                f"pattern name or a directory path, or leave it unset to match the model id."
            )
        if self.sparsity is not None and self.threshold is not None:
            raise DuoConfigError(
                f"{ENV_SPARSITY}={self.sparsity!r} and {ENV_THRESHOLD}={self.threshold!r} are "
                f"both set: they are alternative ways to pick retrieval heads, unset one of them."
            )
        # frozen, so defaults and normalised values go through object.__setattr__; plain
        # floats/ints (not numpy scalars) keep printing and comparing predictable.
        if self.sparsity is None and self.threshold is None:
            object.__setattr__(self, "sparsity", DEFAULT_SPARSITY)
        if self.sparsity is not None:
            value = _check_fraction(ENV_SPARSITY, self.sparsity, _SPARSITY_MEANING)
            object.__setattr__(self, "sparsity", value)
        if self.threshold is not None:
            value = _check_fraction(ENV_THRESHOLD, self.threshold, _THRESHOLD_MEANING)
            object.__setattr__(self, "threshold", value)
        object.__setattr__(self, "sink", _check_count(ENV_SINK, self.sink, 0, _SINK_MEANING))
        object.__setattr__(
            self, "recent", _check_count(ENV_RECENT, self.recent, 1, _RECENT_MEANING)
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DuoSettings:
        """Read and validate the ``VLLM_DUO_*`` variables (default: ``os.environ``).

        An empty (or all-blank) value counts as unset. ``VLLM_DUO_SPARSITY`` defaults to 0.5
        only when ``VLLM_DUO_THRESHOLD`` is unset; setting both is an error.
        """
        source: Mapping[str, str] = os.environ if env is None else env

        def get(name: str) -> str | None:
            raw = source.get(name)
            if raw is None or not raw.strip():
                return None
            return raw

        raw_pattern = get(ENV_PATTERN)
        raw_sparsity = get(ENV_SPARSITY)
        raw_threshold = get(ENV_THRESHOLD)
        raw_sink = get(ENV_SINK)
        raw_recent = get(ENV_RECENT)

        if raw_sparsity is not None and raw_threshold is not None:
            raise DuoConfigError(
                f"{ENV_SPARSITY}={raw_sparsity!r} and {ENV_THRESHOLD}={raw_threshold!r} are both "
                f"set: they are alternative ways to pick retrieval heads, unset one of them."
            )
        threshold = (
            None
            if raw_threshold is None
            else _parse_fraction(ENV_THRESHOLD, raw_threshold, _THRESHOLD_MEANING)
        )
        if raw_sparsity is not None:
            sparsity: float | None = _parse_fraction(ENV_SPARSITY, raw_sparsity, _SPARSITY_MEANING)
        else:
            sparsity = DEFAULT_SPARSITY if threshold is None else None
        sink = (
            DEFAULT_SINK if raw_sink is None else _parse_count(ENV_SINK, raw_sink, 0, _SINK_MEANING)
        )
        recent = (
            DEFAULT_RECENT
            if raw_recent is None
            else _parse_count(ENV_RECENT, raw_recent, 1, _RECENT_MEANING)
        )
        # Surrounding blanks in a path are almost always a quoting accident in a shell script.
        pattern = None if raw_pattern is None else raw_pattern.strip()
        return cls(
            pattern=pattern, sparsity=sparsity, threshold=threshold, sink=sink, recent=recent
        )

    def selection_kwargs(self) -> dict[str, float]:
        """Keyword arguments for :func:`vllm_duo.patterns.select_retrieval`."""
        if self.threshold is not None:
            return {"threshold": self.threshold}
        assert self.sparsity is not None  # guaranteed by __post_init__
        return {"sparsity": self.sparsity}

    def describe(self) -> str:
        """One-line summary for logs, e.g. ``pattern=auto sparsity=0.5 sink=64 recent=256``."""
        pattern = "auto" if self.pattern is None else self.pattern
        if self.threshold is not None:
            selection = f"threshold={self.threshold:g}"
        else:
            selection = f"sparsity={self.sparsity:g}"
        return f"pattern={pattern} {selection} sink={self.sink} recent={self.recent}"


def kernels_from_env(env: Mapping[str, str] | None = None) -> str:
    """The kernel family chosen with ``VLLM_DUO_KERNELS`` (blank or unset: ``auto``)."""
    source: Mapping[str, str] = os.environ if env is None else env
    raw = source.get(ENV_KERNELS)
    if raw is None or not raw.strip():
        return DEFAULT_KERNELS
    choice = raw.strip().lower()
    if choice not in KERNEL_CHOICES:
        raise DuoConfigError(
            f"{ENV_KERNELS}={raw!r} is not a kernel family: expected one of "
            f"{', '.join(KERNEL_CHOICES)} (or leave it unset for {DEFAULT_KERNELS})."
        )
    return choice
