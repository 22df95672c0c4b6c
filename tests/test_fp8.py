"""fp8 KV caches on CPU, kernel level: the bytes vLLM's CPU backend stores, ours, and the
sink+window attention reading them, against the dense fp32 reference on quantised values."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import needs_vllm_cpu_fp8

from vllm_duo import cpu_ops
from vllm_duo.errors import DuoConfigError
from vllm_duo.kernels.fp8 import (
    E4M3,
    E5M2,
    cache_format,
    dequantize,
    quantize_cpu,
    quantize_cuda,
    round_trip,
)
from vllm_duo.kernels.sink_window_torch import sink_window_attention
from vllm_duo.kernels.slots import streaming_key_ranges
from vllm_duo.reference import duo_attention

ops = pytest.importorskip("vllm._custom_ops")

FORMATS = [("fp8", E4M3), ("fp8_e4m3", E4M3), ("fp8_e5m2", E5M2)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# 1.0 (no checkpoint scales), scales that are not powers of two, and one whose float32
# reciprocal differs from the float64 one rounded to float32.
SCALES = [1.0, 0.37, 3.3, 1 / 3, 4.20629523672762]
BS, D = 32, 64


def _values(fmt, dtype: torch.dtype, scale: float, rows: int, seed: int) -> torch.Tensor:
    """Values over the whole range of the format: subnormals, normals, beyond the max, the
    edge cases (signed zeros, infinities, NaN), exactly representable values and the
    float32 neighbours of fp8 grid points (where truncation and rounding part)."""
    torch.manual_seed(seed)
    top = 3.5 if fmt is E4M3 else 5.5
    x = torch.randn(rows, D) * torch.logspace(-8, top, rows)[:, None] * scale
    grid = torch.arange(256, dtype=torch.uint8).view(fmt.dtype).float()
    grid = grid[torch.isfinite(grid)][:D] * scale
    x[1, : grid.numel()] = torch.nextafter(grid, grid * 2)
    x[2, : grid.numel()] = torch.nextafter(grid, grid * 0)
    x[3, : grid.numel()] = grid
    x[0, :8] = torch.tensor([0.0, -0.0, float("nan"), -float("nan"), float("inf"),
                             -float("inf"), 1e30, -1e-30])  # fmt: skip
    if dtype == torch.float16:
        x = x.clamp(-60000, 60000)
    return x.to(dtype)


def _vllm_store(x: torch.Tensor, kv_cache_dtype: str, scale: float, isa: str = "vec"):
    """vLLM's CPU write of ``x`` [T, D] as keys and values of one head: (key bytes per
    block [blocks, BS * D] in vLLM's packed order, value bytes [T, D] in plain rows)."""
    tokens = x.shape[0]
    cache = torch.zeros(tokens // BS + 1, 1, 2 * BS, D, dtype=torch.uint8)
    key_cache, value_cache = cache[:, :, :BS], cache[:, :, BS:]
    ops.cpu_attn_reshape_and_cache(x[:, None], x[:, None], key_cache, value_cache,
                                   torch.arange(BS, BS + tokens), isa, k_scale=scale,
                                   v_scale=scale, kv_cache_dtype=kv_cache_dtype)  # fmt: skip
    keys = key_cache[1:, 0].reshape(-1, BS * D)
    return keys, value_cache[1:, 0].reshape(tokens, D)


@needs_vllm_cpu_fp8
@pytest.mark.parametrize(("kv_cache_dtype", "fmt"), FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_cpu_is_vllms_cpu_write_bit_for_bit(kv_cache_dtype, fmt, dtype):
    for i, scale in enumerate(SCALES):
        x = _values(fmt, dtype, scale, rows=8 * BS, seed=i)
        keys, values = _vllm_store(x, kv_cache_dtype, scale)
        mine = quantize_cpu(x, fmt, scale)
        assert torch.equal(mine, values), (scale, int((mine != values).sum()))
        # Keys use the kernel's packed layout: per block, the same bytes in another order.
        mine_blocks = mine.view(-1, BS * D)
        assert torch.equal(mine_blocks.sort(-1).values, keys.sort(-1).values), scale


@needs_vllm_cpu_fp8
def test_a_wrong_rounding_rule_is_caught():
    """The comparison above has teeth: round-to-nearest (vLLM's CUDA rule) and the
    reciprocal taken in float64 both disagree with vLLM's CPU bytes."""
    x = _values(E4M3, torch.float32, 0.37, rows=4 * BS, seed=1)
    _, values = _vllm_store(x, "fp8", 0.37)
    assert (quantize_cuda(x, E4M3, 0.37) != values).sum() > 100
    scale = 4.20629523672762
    x = _values(E4M3, torch.float32, scale, rows=4 * BS, seed=2)
    _, values = _vllm_store(x, "fp8", scale)
    float64_reciprocal = quantize_cpu(x.double() * (1 / scale), E4M3, 1.0)
    assert (float64_reciprocal != values).sum() > 0


native = pytest.mark.skipif(not cpu_ops.is_available(), reason=f"{cpu_ops.load_error()}")


@needs_vllm_cpu_fp8
@native
@pytest.mark.parametrize(("kv_cache_dtype", "fmt"), FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_store_is_vllms_cpu_write_bit_for_bit(kv_cache_dtype, fmt, dtype):
    """store_kv into R=2 heads of a 3-head layer through a strided view, as the family does."""
    for i, scale in enumerate(SCALES[:3]):
        x = _values(fmt, dtype, scale, rows=4 * BS, seed=10 + i)
        tokens = x.shape[0]
        _, want = _vllm_store(x, kv_cache_dtype, scale)
        layer = torch.stack([x.flip(0), torch.zeros_like(x), x], dim=1)  # heads 0, 1, 2
        buffer = torch.full((2, tokens // BS + 1, BS, D), 0x55, dtype=torch.uint8)
        keys = buffer.permute(1, 2, 0, 3)  # [blocks, BS, R=2, D], strided over heads
        values = torch.full_like(buffer, 0x55).permute(1, 2, 0, 3)
        slots = torch.arange(BS, BS + tokens)
        slots[5] = -1  # padding: not stored
        cpu_ops.store_kv(layer, layer, torch.tensor([2, 0]), slots, keys, values,
                         min_slot=BS, kv_cache_dtype=kv_cache_dtype, k_scale=scale,
                         v_scale=scale)  # fmt: skip
        got = values[1:, :, 0].reshape(tokens, D)
        assert torch.equal(got[:5], want[:5]) and torch.equal(got[6:], want[6:]), scale
        assert (got[5] == 0x55).all(), "a slot below min_slot was written"
        stored_keys = keys[1:, :, 1].reshape(tokens, D)
        flipped = quantize_cpu(x.flip(0), fmt, scale)  # layer head 0, run head 1
        assert torch.equal(stored_keys[6:], flipped[6:]) and (stored_keys[5] == 0x55).all()
        assert (keys[0] == 0x55).all(), "the null block was written"


@needs_vllm_cpu_fp8
@pytest.mark.parametrize(("kv_cache_dtype", "fmt"), [("fp8", E4M3), ("fp8_e5m2", E5M2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vllms_fp8_kernel_is_the_quantising_reference(kv_cache_dtype, fmt, dtype):
    """The reference that engine tests use (dense fp32 over dequantised K/V) is what vLLM's
    own CPU kernel computes on its fp8 cache."""
    torch.manual_seed(0)
    tokens, heads, group, k_scale, v_scale = 300, 2, 3, 0.37, 0.013
    key = (torch.randn(tokens, heads, D) * 0.5).to(dtype)
    value = (torch.randn(tokens, heads, D) * 0.2).to(dtype)
    query = torch.randn(tokens, heads * group, D).to(dtype)
    blocks = tokens // BS + 2
    cache = torch.zeros(blocks, heads, 2 * BS, D, dtype=torch.uint8)
    key_cache, value_cache = cache[:, :, :BS], cache[:, :, BS:]
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache,
                                   torch.arange(BS, BS + tokens), "vec", k_scale=k_scale,
                                   v_scale=v_scale, kv_cache_dtype=kv_cache_dtype)  # fmt: skip
    qsl = torch.tensor([0, tokens], dtype=torch.int32)
    seq_lens = torch.tensor([tokens], dtype=torch.int32)
    schedule = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=heads * group, num_kv_heads=heads, head_dim=D,
        seq_lens=seq_lens, dtype=dtype, query_start_loc=qsl, causal=True,
        sliding_window_size=-1, isa="vec", enable_kv_split=False, kv_cache_dtype=kv_cache_dtype,
    )  # fmt: skip
    out = torch.empty(tokens, heads * group, D, dtype=dtype)
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=out,
        query_start_loc=qsl, seq_lens=seq_lens, scale=D**-0.5, causal=True, alibi_slopes=None,
        sliding_window=-1, block_table=torch.arange(1, blocks, dtype=torch.int32)[None],
        softcap=0, scheduler_metadata=schedule, s_aux=None, k_scale=k_scale, v_scale=v_scale,
        kv_cache_dtype=kv_cache_dtype,
    )  # fmt: skip

    def dense(k, v):
        return duo_attention(query.float().transpose(0, 1), k.transpose(0, 1),
                             v.transpose(0, 1), [False] * heads, sink=0, recent=1,
                             scale=D**-0.5).transpose(0, 1)  # fmt: skip

    want = dense(round_trip(key, fmt, k_scale), round_trip(value, fmt, v_scale))
    tol = 1e-6 if dtype == torch.float32 else 2e-3  # bf16: vLLM rounds P and the output
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)
    unquantised = (out.float() - dense(key.float(), value.float())).abs().max().item()
    assert unquantised > 10 * tol, unquantised


# --------------------------------------------------------------------------------------
# Sink+window attention over fp8 caches (native op and torch path).
# --------------------------------------------------------------------------------------
IMPLS = ["torch", pytest.param("native", marks=native)]


def _fp8_case(seq_lens, query_lens, group, sink, recent, block_size, dtype, kv_cache_dtype,
              k_scale, v_scale, impl, seed):  # fmt: skip
    """Paged one-head fp8 caches with permuted blocks; blocks no query sees are null (id 0,
    filled with NaN bytes 0x7F and max bytes 0x7E); the step's keys come from the step."""
    fmt = cache_format(kv_cache_dtype)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    keys = [(torch.randn(n, D) * 0.7).to(dtype) for n in seq_lens]
    values = [(torch.randn(n, D) * 0.3).to(dtype) for n in seq_lens]
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    key_cache = torch.randint(0, 0x70, (num_blocks, block_size, D), dtype=torch.uint8)
    value_cache = torch.randint(0, 0x70, (num_blocks, block_size, D), dtype=torch.uint8)
    key_cache[0], value_cache[0] = 0x7F, 0x7E
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    table = torch.zeros(len(seq_lens), max(-(-n // block_size) for n in seq_lens),
                        dtype=torch.int32)  # fmt: skip
    for r, (n, q) in enumerate(zip(seq_lens, query_lens)):
        needed = streaming_key_ranges(n - q, n, sink, recent)
        for b in range(-(-n // block_size)):
            lo, hi = b * block_size, min((b + 1) * block_size, n - q)  # cached part only
            if hi <= lo or not any(a < hi and lo < e for a, e in needed):
                continue  # null: never read (the chunk's own keys come from the step)
            table[r, b] = block = free.pop()
            key_cache[block, : hi - lo] = quantize_cpu(keys[r][lo:hi], fmt, k_scale)
            value_cache[block, : hi - lo] = quantize_cpu(values[r][lo:hi], fmt, v_scale)
    queries = [torch.randn(q, group, D).to(dtype) for q in query_lens]
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    query = torch.cat(queries)
    new_keys = torch.cat([k[n - q :] for k, n, q in zip(keys, seq_lens, query_lens)])
    new_values = torch.cat([v[n - q :] for v, n, q in zip(values, seq_lens, query_lens)])
    settings = {"sink": sink, "recent": recent, "scale": D**-0.5, "kv_cache_dtype": kv_cache_dtype,
                "k_scale": k_scale, "v_scale": v_scale}  # fmt: skip
    if impl == "native":
        out = torch.zeros(query.shape[0], 1, group, D, dtype=dtype)
        cpu_ops.sink_window_attention(
            query[:, None], key_cache[:, :, None], value_cache[:, :, None],
            torch.zeros(1, dtype=torch.long), table, torch.tensor(qsl, dtype=torch.int32),
            torch.tensor(seq_lens, dtype=torch.int32), new_keys[:, None], new_values[:, None],
            out=out, **settings,
        )  # fmt: skip
        out = out[:, 0]
    else:
        del settings["kv_cache_dtype"]
        out = sink_window_attention(query, key_cache, value_cache, table, qsl, list(seq_lens),
                                    new_keys=new_keys, new_values=new_values, query_tile=7,
                                    kv_format=fmt, **settings)  # fmt: skip
    worst = {"quantised": 0.0, "plain": 0.0}
    for r, (n, q) in enumerate(zip(seq_lens, query_lens)):
        full_q = torch.zeros(group, n, D)
        full_q[:, n - q :] = queries[r].float().transpose(0, 1)
        got = out[qsl[r] : qsl[r + 1]].float()
        for name, k, v in (
            ("quantised", round_trip(keys[r], fmt, k_scale), round_trip(values[r], fmt, v_scale)),
            ("plain", keys[r].float(), values[r].float()),
        ):
            want = duo_attention(full_q, k[None], v[None], [True], sink=sink, recent=recent,
                                 scale=D**-0.5)[:, n - q :].transpose(0, 1)  # fmt: skip
            worst[name] = max(worst[name], (got - want).abs().max().item())
    return worst


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sink_window_over_fp8_caches_matches_the_quantising_reference(impl, kv_cache_dtype,
                                                                       dtype):  # fmt: skip
    """7 query heads per KV head, odd lengths, decode rows and prefill chunks (one whose
    cached blocks are partly null), scales that are not powers of two."""
    worst = _fp8_case(seq_lens=[1, 7, 45, 333, 130], query_lens=[1, 7, 1, 129, 1], group=7,
                      sink=5, recent=11, block_size=16, dtype=dtype,
                      kv_cache_dtype=kv_cache_dtype, k_scale=0.37, v_scale=0.0131,
                      impl=impl, seed=3)  # fmt: skip
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    assert worst["quantised"] < tol, worst
    # The step's own keys go through the cache's quantisation too: without it (or without
    # dequantising) the result is visibly off.
    assert worst["plain"] > 10 * tol if dtype == torch.float32 else worst["plain"] > 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_sink_window_fp8_default_scales_and_tiny_window(impl):
    worst = _fp8_case(seq_lens=[333, 64], query_lens=[200, 1], group=3, sink=9, recent=1,
                      block_size=32, dtype=torch.float32, kv_cache_dtype="fp8_e4m3",
                      k_scale=1.0, v_scale=1.0, impl=impl, seed=4)  # fmt: skip
    assert worst["quantised"] < 2e-5, worst


# --------------------------------------------------------------------------------------
# Bad input and refusals.
# --------------------------------------------------------------------------------------
def test_cache_format_names_the_allowed_values():
    assert cache_format("auto") is None
    assert cache_format("fp8") is E4M3 and cache_format("fp8_e5m2") is E5M2
    with pytest.raises(ValueError, match=r"'fp8_inc'.*'auto', 'fp8', 'fp8_e4m3', 'fp8_e5m2'"):
        cache_format("fp8_inc")
    with pytest.raises(ValueError, match=r"scale must be a finite number > 0, got 0\.0"):
        quantize_cpu(torch.ones(3), E4M3, 0.0)
    with pytest.raises(TypeError, match="uint8"):
        dequantize(torch.ones(3), E4M3)


@native
def test_native_ops_refuse_bad_fp8_arguments():
    cache = torch.zeros(2, BS, 1, D, dtype=torch.uint8)
    rows = torch.zeros(1, 1, D)
    heads, slots = torch.zeros(1, dtype=torch.long), torch.tensor([BS])

    def store(**kwargs):
        cpu_ops.store_kv(rows, rows, heads, slots, kwargs.pop("cache", cache),
                         kwargs.pop("cache", cache), min_slot=BS, **kwargs)  # fmt: skip

    with pytest.raises(RuntimeError, match="kv_cache_dtype 'fp8_inc' is not supported: auto, "
                       "fp8, fp8_e4m3 or fp8_e5m2"):  # fmt: skip
        store(kv_cache_dtype="fp8_inc")
    with pytest.raises(RuntimeError, match="must be uint8 for an fp8 kv_cache_dtype"):
        store(kv_cache_dtype="fp8", cache=torch.zeros(2, BS, 1, D))
    with pytest.raises(RuntimeError, match="must match the query's Float with kv_cache_dtype"):
        store(kv_cache_dtype="auto")
    with pytest.raises(RuntimeError, match="v_scale must be a finite number > 0, got -1"):
        store(kv_cache_dtype="fp8", v_scale=-1.0)


def test_cpu_family_refuses_fp8_where_vllm_does(monkeypatch):
    """vLLM's CPU attention takes fp8 only on x86 with AVX-512 or AMX, and head sizes that
    are multiples of 32; DUO answers the same, with the flag that fixes it."""
    from vllm_duo.families.cpu import CpuKernels

    common = {"scale": 1.0, "sink": 4, "recent": 16, "dtype": torch.bfloat16}
    with pytest.raises(DuoConfigError, match=r"--kv-cache-dtype fp8 .*head_size=80.*divisible "
                       "by 32.*--kv-cache-dtype auto"):  # fmt: skip
        CpuKernels(kv_cache_dtype="fp8", head_size=80, **common)
    CpuKernels(kv_cache_dtype="auto", head_size=80, **common)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.raises(DuoConfigError, match=r"--kv-cache-dtype fp8_e5m2 .*AVX-512 or AMX"):
        CpuKernels(kv_cache_dtype="fp8_e5m2", head_size=64, **common)
    CpuKernels(kv_cache_dtype="auto", head_size=64, **common)


def test_backend_declares_fp8_per_platform(monkeypatch):
    from vllm_duo import backend

    monkeypatch.setattr(backend, "_device_type", lambda: "cpu")
    assert backend.DuoAttentionBackend.kv_cache_dtypes() == ["auto", "fp8", "fp8_e4m3",
                                                             "fp8_e5m2"]  # fmt: skip
    assert not backend.DuoAttentionBackend.supports_kv_cache_dtype("fp8_inc")
    monkeypatch.setattr(backend, "_device_type", lambda: "cuda")
    assert backend.DuoAttentionBackend.supports_kv_cache_dtype("fp8")
    assert not backend.DuoAttentionBackend.supports_kv_cache_dtype("fp8_e5m2")


def test_gpu_family_refuses_e5m2_naming_the_fix():
    from vllm_duo.families.gpu import GpuKernels
    from vllm_duo.kernels import triton_sink_window

    if not triton_sink_window.is_available():
        pytest.skip(f"Triton: {triton_sink_window.load_error()}")
    with pytest.raises(DuoConfigError, match=r"--kv-cache-dtype fp8_e5m2 .*GPU kernel family "
                       r"reads fp8 e4m3 caches only; use --kv-cache-dtype fp8"):  # fmt: skip
        GpuKernels(choice="triton", device_type="cpu", scale=1.0, sink=4, recent=16,
                   kv_cache_dtype="fp8_e5m2", dtype=torch.bfloat16, head_size=64)  # fmt: skip
