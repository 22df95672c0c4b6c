"""Streaming heads' bounded KV cache, as vLLM's scheduler sees it."""

from __future__ import annotations

import math
import re

import pytest
from conftest import Reference, assert_matches_reference, run_engine, write_pattern

from vllm_duo.patterns import load_gates, select_retrieval
from vllm_duo.testing.tiny_llama import build_tiny_llama, synthetic_prompt_ids

pytestmark = pytest.mark.slow

GATES = [[0.9, 0.8], [0.1, 0.05], [0.7, 0.2], [0.3, 0.6]]  # counts 2, 0, 1, 1


def _env(pattern, sink: int, recent: int) -> dict[str, str]:
    return {"VLLM_DUO_PATTERN": str(pattern), "VLLM_DUO_SINK": str(sink),
            "VLLM_DUO_RECENT": str(recent)}  # fmt: skip


@pytest.fixture(scope="module")
def pattern(tmp_path_factory):
    return write_pattern(tmp_path_factory.mktemp("pattern"), GATES)


def _reference(model, pattern, sink, recent) -> Reference:
    mask = select_retrieval(load_gates(pattern), sparsity=0.5)
    return Reference(model, mask, sink, recent)


def test_streaming_group_blocks_stay_bounded_in_long_decode(tmp_path, tiny_gqa, pattern):
    sink, recent, block_size = 40, 70, 32
    prompts = [synthetic_prompt_ids(300, 1, 512), synthetic_prompt_ids(90, 2, 512)]
    bound = math.ceil(sink / block_size) + math.ceil(recent / block_size) + 1
    common = {"env": _env(pattern, sink, recent), "max_tokens": 160, "block_size": block_size,
              "probe": True}  # fmt: skip
    strict = run_engine(tmp_path, tiny_gqa, prompts, enable_prefix_caching=False, **common)
    cached = run_engine(tmp_path, tiny_gqa, prompts, enable_prefix_caching=True, **common)
    series = cached["streaming_decode_series"]
    print("bound", bound, "strict max", strict["max_streaming_blocks_decode"],
          "with prefix caching, first decode steps", series[:5], "max after 2 steps",
          max(series[2:]))  # fmt: skip
    assert strict["num_streaming_groups"] >= 1 and strict["num_full_groups"] >= 1
    assert 0 < strict["max_streaming_blocks_decode"] <= bound
    # With prefix caching and a mostly free pool, a prefill chunk's out-of-window blocks
    # are also stored (to be prefix-cached) and freed once that step is processed.
    assert max(series[2:]) <= bound
    # Retrieval heads keep everything: 460 tokens need 15 blocks.
    assert strict["max_full_blocks"] >= math.ceil(460 / block_size)
    reference = _reference(tiny_gqa, pattern, sink, recent)
    assert_matches_reference(reference, prompts, strict["outputs"])
    assert_matches_reference(reference, prompts, cached["outputs"])


def _concurrency(log: str, tokens: int) -> float:
    match = re.search(rf"Maximum concurrency for {tokens:,} tokens per request: ([\d.]+)x", log)
    assert match, f"no capacity line in:\n{log[-2000:]}"
    return float(match.group(1))


def test_vllm_capacity_grows_as_predicted(tmp_path, tmp_path_factory, pattern):
    """vLLM's own 'Maximum concurrency' figure, DUO against stock, at 8192 tokens."""
    model = build_tiny_llama(tmp_path_factory.getbasetemp() / "tiny-8k",
                             max_position_embeddings=8192)  # fmt: skip
    n, sink, recent = 8192, 64, 256
    kwargs = {"max_model_len": n, "kv_cache_memory_bytes": 96 << 20, "max_tokens": 1}
    stock = run_engine(tmp_path, model, [[7, 8]], attention_backend="CPU_ATTN", **kwargs)
    duo = run_engine(tmp_path, model, [[7, 8]], env=_env(pattern, sink, recent), **kwargs)
    r = 0.5
    ideal = n / (r * n + (1 - r) * (sink + recent))
    measured = _concurrency(duo["log"], n) / _concurrency(stock["log"], n)
    print(f"capacity ratio {measured:.3f} vs ideal {ideal:.3f} ({measured / ideal:.3f} of ideal)")
    assert measured >= 0.9 * ideal


def test_load_that_does_not_fit_stock_fits_duo(tmp_path, tiny_gqa, pattern):
    prompts = [synthetic_prompt_ids(1900, 10 + i, 512) for i in range(3)]
    kwargs = {"max_model_len": 2048, "kv_cache_memory_bytes": 11 << 20, "max_tokens": 40,
              "probe": True, "prompt_logprobs": False, "max_num_batched_tokens": 2048}  # fmt: skip
    stock = run_engine(tmp_path, tiny_gqa, prompts, attention_backend="CPU_ATTN", **kwargs)
    duo = run_engine(tmp_path, tiny_gqa, prompts, env=_env(pattern, 64, 256), **kwargs)
    summary = {name: (run["max_running"], run["preemptions"]) for name, run in
               (("stock", stock), ("duo", duo))}  # fmt: skip
    print("max running, preemptions:", summary)
    assert stock["max_running"] < 3 or stock["preemptions"] > 0
    assert duo["max_running"] == 3 and duo["preemptions"] == 0


def test_prefix_caching_on_and_off_agree_and_hit(tmp_path, tiny_gqa, pattern):
    sink, recent = 8, 40
    prefix = synthetic_prompt_ids(600, 20, 512)
    prompts = [prefix + synthetic_prompt_ids(37 + 9 * i, 30 + i, 512) for i in range(3)]
    common = {"env": _env(pattern, sink, recent), "prompt_logprobs": False,
              "sequential": True, "block_size": 32, "max_tokens": 8}  # fmt: skip
    cached = run_engine(tmp_path, tiny_gqa, prompts, enable_prefix_caching=True, **common)
    plain = run_engine(tmp_path, tiny_gqa, prompts, enable_prefix_caching=False, **common)
    hits = [out["num_cached_tokens"] for out in cached["outputs"]]
    print("cached tokens per request:", hits)
    # Like vLLM's sliding-window groups (prefix_cache_retention_interval=0), streaming
    # windows are kept at shared-prefix junctions once a second request reveals one,
    # so the third request onwards hits the 600-token prefix.
    assert hits[0] == 0 and hits[2] >= 512
    for a, b in zip(cached["outputs"], plain["outputs"]):
        assert a["tokens"] == b["tokens"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-4
    assert_matches_reference(_reference(tiny_gqa, pattern, sink, recent), prompts,
                             cached["outputs"])  # fmt: skip


def test_preemption_keeps_outputs(tmp_path, tiny_gqa, pattern):
    sink, recent = 8, 40
    prompts = [synthetic_prompt_ids(250 + 31 * i, 40 + i, 512) for i in range(4)]
    common = {"env": _env(pattern, sink, recent), "max_tokens": 60, "block_size": 32,
              "max_model_len": 512, "probe": True}  # fmt: skip
    roomy = run_engine(tmp_path, tiny_gqa, prompts, **common)
    tight = run_engine(tmp_path, tiny_gqa, prompts, kv_cache_memory_bytes=1_000_000, **common)
    print("preemptions:", tight["preemptions"], "max running:", tight["max_running"])
    assert tight["preemptions"] > 0
    for a, b in zip(roomy["outputs"], tight["outputs"]):
        assert a["tokens"] == b["tokens"]
    assert_matches_reference(_reference(tiny_gqa, pattern, sink, recent), prompts,
                             tight["outputs"])  # fmt: skip
