"""fp8 KV caches with DUO inside real vLLM (CPU).

Two comparisons (issue 15):

* every DUO attention layer of a real engine, on the query/key/value vLLM computed, against
  the fp32 reference that quantises keys and values exactly as the cache does (same format,
  same per-layer scales): fp32 tight, for retrieval heads (vLLM's own fp8 kernel) and
  streaming heads (DUO's store and sink+window read) alike;
* whole engines: DUO at sparsity 0 against the stock backend with the same fp8 cache.

Why per layer and not per logprob: fp8 rounding truncates to a grid 2^-3 apart, so fp32
noise of 1e-7 between two implementations of the same model (HF against vLLM, or two
attention kernels) moves a few keys to the neighbouring grid point, and the tiny random
model amplifies that: perturbing the reference's weights by 1e-7 (relative) moves its
logprobs by up to 3e-2 (scales 1.0) and 1e-1 (the scales below). Given vLLM's own K/V, the
reference is exact, so the layer check is as tight as fp32 and fails for a wrong rule.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import needs_vllm_cpu_fp8, run_engine, write_pattern

from vllm_duo.kernels.fp8 import E4M3, E5M2
from vllm_duo.patterns import load_gates, select_retrieval
from vllm_duo.reference import KVQuantisation, duo_attention
from vllm_duo.testing.tiny_llama import build_tiny_llama, synthetic_prompt_ids

pytestmark = pytest.mark.slow

SINK, RECENT = 4, 16
VOCAB = 512
# Sparsity 0.5: per-layer retrieval counts 2, 0, 1, 1 (as tests/test_engine_semantics.py).
GATES = [[0.9, 0.8], [0.1, 0.05], [0.7, 0.2], [0.3, 0.6]]
# Per-layer scales as a checkpoint gives them: not powers of two, unequal per layer, some
# small enough that values saturate (|x| / scale > 448).
K_SCALES = [0.37, 0.021, 1.7, 0.0625]
V_SCALES = [0.013, 0.55, 0.09, 2.3]


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    return [synthetic_prompt_ids(n, seed + i, VOCAB) for i, n in enumerate(lengths)]


def _env(pattern, **extra) -> dict[str, str]:
    env = {"VLLM_DUO_PATTERN": str(pattern), "VLLM_DUO_SINK": str(SINK),
           "VLLM_DUO_RECENT": str(RECENT)}  # fmt: skip
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="module")
def pattern(tmp_path_factory):
    return write_pattern(tmp_path_factory.mktemp("fp8-pattern"), GATES)


def _layer_errors(calls: list[dict], retrieval: np.ndarray, quantisation) -> dict[str, float]:
    """Largest |DUO output - reference| per head kind over every captured layer forward.

    The engine ran one request at a time, so each layer's keys/values of a request are the
    concatenation of its steps' (a step starting at position 0 starts a new request).
    """
    history: dict[str, tuple[list, list]] = {}
    worst = {"retrieval": 0.0, "streaming": 0.0}
    for call in calls:
        (seq_len,) = call["seq_lens"]
        first, end = call["query_start_loc"]
        n = end - first
        if seq_len == n:
            history[call["layer"]] = ([], [])
        keys, values = history[call["layer"]]
        keys.append(call["key"].float())
        values.append(call["value"].float())
        k, v = torch.cat(keys), torch.cat(values)  # [seq_len, kv_heads, D]
        assert k.shape[0] == seq_len, "steps of one request must arrive in order"
        layer = int(re.search(r"layers\.(\d+)\.", call["layer"]).group(1))
        if quantisation is not None:
            assert (call["k_scale"], call["v_scale"]) == (
                quantisation.k_scales[layer],
                quantisation.v_scales[layer],
            ), "the engine's layer scales are not the ones the reference uses"
            k, v = quantisation.apply(layer, k, v)
        query = call["query"].float()  # [n, q_heads, D]
        full_query = torch.zeros(query.shape[1], seq_len, query.shape[2])
        full_query[:, seq_len - n :] = query.transpose(0, 1)
        streaming = [not r for r in retrieval[layer]]
        want = duo_attention(
            full_query, k.transpose(0, 1), v.transpose(0, 1), streaming, sink=SINK,
            recent=RECENT, scale=call["scale"],
        )[:, seq_len - n :].transpose(0, 1)  # fmt: skip
        diff = (call["output"].float() - want).abs()  # [n, q_heads, D]
        group = query.shape[1] // k.shape[1]
        for head, is_streaming in enumerate(streaming):
            kind = "streaming" if is_streaming else "retrieval"
            err = diff[:, head * group : (head + 1) * group].max().item()
            worst[kind] = max(worst[kind], err)
    return worst


@pytest.mark.parametrize(
    ("kv_cache_dtype", "fmt", "scales", "family"),
    [
        pytest.param("fp8", E4M3, (K_SCALES, V_SCALES), "cpu", marks=needs_vllm_cpu_fp8),
        pytest.param("fp8_e5m2", E5M2, None, "cpu", marks=needs_vllm_cpu_fp8),
        ("fp8", E4M3, (K_SCALES, V_SCALES), "gpu"),
    ],
    ids=["e4m3-checkpoint-scales", "e5m2-default-scales", "gpu-family-interpreted-e4m3"],
)
def test_every_layer_matches_the_quantising_reference(
    tmp_path, tiny_gqa, pattern, kv_cache_dtype, fmt, scales, family
):
    """Prompts shorter than S + W and longer, chunked prefill (64-token chunks) and decode.

    The GPU family (Triton kernels under Triton's interpreter here) quantises as vLLM's CUDA
    kernels do, rounding to nearest; the CPU family as vLLM's CPU backend, truncating.
    """
    retrieval = select_retrieval(load_gates(pattern), sparsity=0.5)
    env = _env(pattern)
    lengths = [3, 150, 301]
    if family == "gpu":
        env.update(VLLM_DUO_KERNELS="triton", TRITON_INTERPRET="1")
        lengths = [3, 90]  # the interpreter is slow
    prompts = _prompts(lengths, seed=60)
    run = run_engine(
        tmp_path, tiny_gqa, prompts, env=env, kv_cache_dtype=kv_cache_dtype,
        kv_scales=scales and {"k": scales[0], "v": scales[1]}, capture_attention=True,
        sequential=True, max_num_batched_tokens=64, max_tokens=8, prompt_logprobs=False,
    )  # fmt: skip
    k_scales, v_scales = scales or ([1.0] * len(GATES), [1.0] * len(GATES))
    calls = run["attention"]
    assert len(calls) > 4 * len(GATES), "too few layer forwards captured"
    rule, other = ("cuda", "cpu") if family == "gpu" else ("cpu", "cuda")
    exact = _layer_errors(calls, retrieval, KVQuantisation(fmt, k_scales, v_scales, rule))
    # The test fails for a cache that does not quantise, or quantises by the other
    # platform's rule (round to nearest instead of truncation, or the reverse).
    unquantised = _layer_errors(calls, retrieval, None)
    wrong = _layer_errors(calls, retrieval, KVQuantisation(fmt, k_scales, v_scales, other))
    print(f"{kv_cache_dtype} ({family} family): max |out - ref| {exact}; unquantised ref "
          f"{unquantised}; {other}-rule ref {wrong}")  # fmt: skip
    for kind in ("retrieval", "streaming"):
        assert exact[kind] < 2e-5, (kind, exact)
        assert unquantised[kind] > 1e-3 and wrong[kind] > 1e-3, (kind, unquantised, wrong)
    assert "DuoAttention kernels" in run["log"]


@needs_vllm_cpu_fp8
def test_sparsity_zero_equals_stock_with_the_same_fp8_cache(tmp_path, tiny_gqa, pattern):
    prompts = _prompts([5, 120, 250], seed=40)
    kwargs = {"kv_cache_dtype": "fp8", "kv_scales": {"k": K_SCALES, "v": V_SCALES}}
    stock = run_engine(tmp_path, tiny_gqa, prompts, attention_backend="CPU_ATTN", **kwargs)
    zero = run_engine(tmp_path, tiny_gqa, prompts, env=_env(pattern, VLLM_DUO_SPARSITY=0),
                      **kwargs)  # fmt: skip
    worst = 0.0
    for a, b in zip(stock["outputs"], zero["outputs"]):
        assert a["tokens"] == b["tokens"]
        diff = np.abs(np.array(a["prompt_logprobs"] + a["logprobs"])
                      - np.array(b["prompt_logprobs"] + b["logprobs"]))  # fmt: skip
        worst = max(worst, float(diff.max()))
    print(f"max |logprob(DUO sparsity 0) - logprob(stock)| = {worst:.2e}")
    # Both write with vLLM's op and read with vLLM's kernel, head by head: equal.
    assert worst < 1e-5


def _logged_concurrency(log: str, tokens: int) -> float:
    match = re.search(rf"Maximum concurrency for {tokens:,} tokens per request: ([\d.]+)x", log)
    assert match, f"no capacity line in:\n{log[-2000:]}"
    return float(match.group(1))


@needs_vllm_cpu_fp8
def test_capacity_multiplies_fp8_and_duo_savings(tmp_path, tmp_path_factory, pattern):
    """vLLM's maximum concurrency, DUO + fp8 against stock with the default cache dtype, at
    equal KV memory: the two savings multiply (bf16 model: fp8 halves every page)."""
    model = build_tiny_llama(tmp_path_factory.getbasetemp() / "tiny-32k-bf16",
                             max_position_embeddings=32768, dtype="bfloat16")  # fmt: skip
    sink, recent, lengths = 64, 256, [8192, 32768]
    kwargs = {"dtype": "bfloat16", "max_model_len": 32768, "kv_cache_memory_bytes": 192 << 20,
              "max_tokens": 1, "prompt_logprobs": False, "max_concurrency": lengths}  # fmt: skip
    env = {**_env(pattern), "VLLM_DUO_SINK": str(sink), "VLLM_DUO_RECENT": str(recent)}
    stock = run_engine(tmp_path, model, [[7, 8]], attention_backend="CPU_ATTN", **kwargs)
    duo = run_engine(tmp_path, model, [[7, 8]], env=env, kv_cache_dtype="fp8", **kwargs)
    for run in (stock, duo):  # the figure per length is the one vLLM logs
        print(run["max_concurrency"])
        assert abs(run["max_concurrency"]["32768"] - _logged_concurrency(run["log"], 32768)) < 0.01
    retrieval = float(select_retrieval(load_gates(pattern), sparsity=0.5).mean())
    for n in lengths:
        ideal = 2 * n / (retrieval * n + (1 - retrieval) * (sink + recent))  # bf16 -> fp8: 2x
        measured = duo["max_concurrency"][str(n)] / stock["max_concurrency"][str(n)]
        print(f"{n} tokens: DUO+fp8 / stock-auto concurrency {measured:.3f}, ideal "
              f"{ideal:.3f} ({measured / ideal:.3f} of ideal)")  # fmt: skip
        assert measured >= 0.9 * ideal
