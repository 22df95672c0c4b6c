"""DUO inside real vLLM (CPU) against the fp32 reference of DESIGN.md section 3."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    Reference,
    assert_matches_reference,
    assert_one_kernel_call_per_layer,
    run_engine,
    write_pattern,
)

from vllm_duo.patterns import load_gates, select_retrieval
from vllm_duo.testing.tiny_llama import synthetic_prompt_ids

pytestmark = pytest.mark.slow

SINK, RECENT = 4, 16  # S + W = 20, far below the long prompts
VOCAB = 512

# Sparsity 0.5 over 4x2 heads keeps the 4 largest gates: layer 0 keeps both heads,
# layer 1 none, layers 2 and 3 one each (unequal counts, a layer with all and with none).
GQA_GATES = [[0.9, 0.8], [0.1, 0.05], [0.7, 0.2], [0.3, 0.6]]
# MHA, 4x4 heads, threshold 0.5: per-layer counts 4, 0, 1, 2.
MHA_GATES = [
    [0.9, 0.95, 0.6, 0.7],
    [0.1, 0.2, 0.3, 0.0],
    [0.2, 0.55, 0.1, 0.4],
    [0.8, 0.3, 0.45, 0.51],
]


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    return [synthetic_prompt_ids(n, seed + i, VOCAB) for i, n in enumerate(lengths)]


MIXED = [3, 15, 150, 301]  # shorter than S, than S+W, and much longer


def _duo_env(pattern, **extra) -> dict[str, str]:
    env = {"VLLM_DUO_PATTERN": str(pattern), "VLLM_DUO_SINK": str(SINK),
           "VLLM_DUO_RECENT": str(RECENT)}  # fmt: skip
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="module")
def gqa_pattern(tmp_path_factory):
    return write_pattern(tmp_path_factory.mktemp("gqa-pattern"), GQA_GATES)


@pytest.fixture(scope="module")
def gqa_reference(tiny_gqa, gqa_pattern):
    mask = select_retrieval(load_gates(gqa_pattern), sparsity=0.5)
    assert mask.sum(axis=1).tolist() == [2, 0, 1, 1]
    return Reference(tiny_gqa, mask, SINK, RECENT)


def test_gqa_mixed_batch_matches_reference(tmp_path, tiny_gqa, gqa_pattern, gqa_reference):
    prompts = _prompts(MIXED)
    run = run_engine(
        tmp_path, tiny_gqa, prompts, env=_duo_env(gqa_pattern), count_kernel_calls=True
    )
    worst = assert_matches_reference(gqa_reference, prompts, run["outputs"])
    # One write and one attention call per layer and head kind, whatever the head count.
    assert_one_kernel_call_per_layer(run)
    assert "DuoAttention: pattern" in run["log"], "start-up summary line missing"
    assert "Unknown vLLM environment variable" not in run["log"]
    print(f"max |logprob diff| = {worst:.2e}")


def test_gqa_small_chunks_match_reference(tmp_path, tiny_gqa, gqa_pattern, gqa_reference):
    """Chunked prefill far below the prompt length gives the same answer."""
    prompts = _prompts([301, 77], seed=10)
    run = run_engine(
        tmp_path, tiny_gqa, prompts, env=_duo_env(gqa_pattern),
        max_num_batched_tokens=32, max_num_seqs=2, enable_chunked_prefill=True,
    )  # fmt: skip
    assert_matches_reference(gqa_reference, prompts, run["outputs"])


def test_gqa_multiprocess_engine_matches_reference(tmp_path, tiny_gqa, gqa_pattern, gqa_reference):
    """Spawned engine core + worker: DUO survives pickling and plugin reload."""
    prompts = _prompts([40, 200], seed=20)
    env = _duo_env(gqa_pattern, VLLM_ENABLE_V1_MULTIPROCESSING=1)
    run = run_engine(tmp_path, tiny_gqa, prompts, env=env)
    assert_matches_reference(gqa_reference, prompts, run["outputs"])


def test_mha_threshold_pattern_matches_reference(tmp_path, tiny_mha):
    pattern = write_pattern(tmp_path / "mha-pattern", MHA_GATES)
    mask = select_retrieval(load_gates(pattern), threshold=0.5)
    assert mask.sum(axis=1).tolist() == [4, 0, 1, 2]
    prompts = _prompts([9, 60, 280], seed=30)
    env = _duo_env(pattern, VLLM_DUO_THRESHOLD=0.5)
    run = run_engine(
        tmp_path, tiny_mha, prompts, env=env, max_num_batched_tokens=64, count_kernel_calls=True
    )
    assert_matches_reference(Reference(tiny_mha, mask, SINK, RECENT), prompts, run["outputs"])
    assert_one_kernel_call_per_layer(run)


def _max_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for x, y in zip(a["outputs"], b["outputs"]):
        assert x["tokens"] == y["tokens"]
        diff = np.abs(np.array(x["prompt_logprobs"] + x["logprobs"])
                      - np.array(y["prompt_logprobs"] + y["logprobs"]))  # fmt: skip
        worst = max(worst, float(diff.max(initial=0.0)))
    return worst


def test_sparsity_zero_and_wide_window_reproduce_stock(tmp_path, tiny_gqa, gqa_pattern):
    """Sparsity 0, or S+W beyond every sequence, is the stock CPU backend."""
    prompts = _prompts([5, 120, 250], seed=40)
    stock = run_engine(tmp_path, tiny_gqa, prompts, attention_backend="CPU_ATTN")
    zero = run_engine(tmp_path, tiny_gqa, prompts, env=_duo_env(gqa_pattern, VLLM_DUO_SPARSITY=0))
    wide = run_engine(
        tmp_path, tiny_gqa, prompts,
        env={"VLLM_DUO_PATTERN": str(gqa_pattern), "VLLM_DUO_SINK": "64",
             "VLLM_DUO_RECENT": "256"},
    )  # fmt: skip
    assert _max_diff(stock, zero) < 1e-4
    assert _max_diff(stock, wide) < 1e-4


def test_duo_really_changes_attention(tmp_path, tiny_gqa, gqa_pattern):
    """With tiny S and W the streaming heads must change long-prompt outputs."""
    prompts = _prompts([300], seed=50)
    stock = run_engine(tmp_path, tiny_gqa, prompts, attention_backend="CPU_ATTN")
    duo = run_engine(tmp_path, tiny_gqa, prompts, env=_duo_env(gqa_pattern, VLLM_DUO_SPARSITY=1))
    diff = np.abs(
        np.array(stock["outputs"][0]["prompt_logprobs"])
        - np.array(duo["outputs"][0]["prompt_logprobs"])
    )
    # Within S+W the masks agree, past it they must not.
    assert diff[: SINK + RECENT - 2].max() < 1e-4
    assert diff[SINK + RECENT :].max() > 1e-2


def test_bf16_llama3_head_layout(tmp_path, tmp_path_factory):
    """32 query heads over 8 KV heads in bf16 (vLLM's AMX kernel path where available).

    The model's own layers must not ask vLLM's kernel for metadata: it would see 32
    query heads on their one-head cache, a ratio the AMX kernel rejects.
    """
    from vllm_duo.testing.tiny_llama import build_tiny_llama

    model = build_tiny_llama(tmp_path_factory.getbasetemp() / "tiny-32x8", num_layers=2,
                             num_heads=32, num_kv_heads=8, dtype="bfloat16")  # fmt: skip
    pattern = write_pattern(tmp_path / "p", [[0.9, 0.1] * 4, [0.2, 0.8] * 4])
    prompts = _prompts([70, 300], seed=70)
    kwargs = {"dtype": "bfloat16", "prompt_logprobs": False, "max_tokens": 8}
    stock = run_engine(tmp_path, model, prompts, attention_backend="CPU_ATTN", **kwargs)
    zero = run_engine(tmp_path, model, prompts, env=_duo_env(pattern, VLLM_DUO_SPARSITY=0),
                      **kwargs)  # fmt: skip
    half = run_engine(tmp_path, model, prompts, env=_duo_env(pattern), **kwargs)
    assert [o["tokens"] for o in zero["outputs"]] == [o["tokens"] for o in stock["outputs"]]
    assert all(len(o["tokens"]) == 8 for o in half["outputs"])
