"""DUO on vLLM's CUDA platform, end to end (skipped unless a CUDA build of vLLM runs here).

``benchmarks/gpu_check.sh`` runs this file on a GPU machine that has vLLM. The same cases as
the CPU engine tests, with the GPU family's real kernels:

* fp32 against the fp32 reference (retrieval heads: vLLM's Triton unified attention, since
  FlashAttention takes no fp32; streaming heads: the Triton kernels);
* bf16 with ``VLLM_DUO_KERNELS=auto`` (FlashAttention for retrieval heads, the csrc decode
  kernel where it is built): sparsity 0 against vLLM's own FlashAttention backend, and
  sparsity 0.5 teacher-forced against the fp32 DUO run;
* piecewise CUDA graphs (compiled model, attention eager between the captured pieces)
  against eager mode;
* tensor_parallel_size=2 where two GPUs exist.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import Reference, assert_matches_reference, run_engine, write_pattern
from test_engine_semantics import GQA_GATES, RECENT, SINK, VOCAB

from vllm_duo.patterns import load_gates, select_retrieval
from vllm_duo.testing.tiny_llama import synthetic_prompt_ids


def _cuda_vllm() -> str | None:
    """Why the CUDA engine tests cannot run here, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    try:
        from vllm.platforms import current_platform
    except ImportError as exc:
        return f"vLLM is not importable ({exc})"
    if not current_platform.is_cuda():
        return f"vLLM runs on {current_platform.device_type}, not CUDA"
    return None


_REASON = _cuda_vllm()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]

GPU_KWARGS = {"gpu_memory_utilization": 0.2, "kv_cache_memory_bytes": 256 << 20}


def _env(pattern, **extra) -> dict[str, str]:
    env = {"VLLM_DUO_PATTERN": str(pattern), "VLLM_DUO_SINK": str(SINK),
           "VLLM_DUO_RECENT": str(RECENT)}  # fmt: skip
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _prompts(lengths, seed: int) -> list[list[int]]:
    return [synthetic_prompt_ids(n, seed + i, VOCAB) for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def pattern(tmp_path_factory):
    return write_pattern(tmp_path_factory.mktemp("gqa-pattern"), GQA_GATES)


@pytest.fixture(scope="module")
def reference(tiny_gqa, pattern):
    return Reference(tiny_gqa, select_retrieval(load_gates(pattern), sparsity=0.5), SINK, RECENT)


def _prompt_logprob_diff(a: dict, b: dict) -> float:
    return max(
        float(np.abs(np.array(x["prompt_logprobs"]) - np.array(y["prompt_logprobs"])).max())
        for x, y in zip(a["outputs"], b["outputs"])
    )


def test_gpu_fp32_matches_reference(tmp_path, tiny_gqa, pattern, reference):
    prompts = _prompts([3, 15, 150, 301], seed=0)
    run = run_engine(tmp_path, tiny_gqa, prompts, env=_env(pattern), max_num_batched_tokens=32,
                     max_num_seqs=4, **GPU_KWARGS)  # fmt: skip
    worst = assert_matches_reference(reference, prompts, run["outputs"])
    line = next(ln for ln in run["log"].splitlines() if "DuoAttention kernels" in ln)
    print(f"fp32: max |logprob diff| {worst:.2e}; {line}")
    assert "vLLM Triton unified attention" in line


def test_gpu_prefix_hits_and_preemption_match_reference(tmp_path, tiny_gqa, pattern):
    sink, recent = 8, 40
    prefix = synthetic_prompt_ids(160, 20, VOCAB)
    prompts = [prefix + synthetic_prompt_ids(37 + 9 * i, 30 + i, VOCAB) for i in range(3)]
    prompts += _prompts([380, 420, 460], seed=40)
    run = run_engine(
        tmp_path, tiny_gqa, prompts, env={**_env(pattern), "VLLM_DUO_SINK": str(sink),
                                          "VLLM_DUO_RECENT": str(recent)},
        probe=True, enable_prefix_caching=True, prompt_logprobs=False, block_size=32,
        max_tokens=8, max_model_len=512, kv_cache_memory_bytes=1_000_000,
        gpu_memory_utilization=0.2, max_num_batched_tokens=128, max_num_seqs=4,
        enable_chunked_prefill=True, batches=[[0], [1], [2], [3, 4, 5]],
    )  # fmt: skip
    hits = [out["num_cached_tokens"] for out in run["outputs"]]
    print("cached tokens per request:", hits, "preemptions:", run["preemptions"])
    assert hits[2] >= 128 and run["preemptions"] > 0
    mask = select_retrieval(load_gates(pattern), sparsity=0.5)
    assert_matches_reference(Reference(tiny_gqa, mask, sink, recent), prompts, run["outputs"])


def test_gpu_bf16_fast_kernels(tmp_path, tiny_gqa, pattern):
    """FlashAttention + csrc (where built) in bf16: sparsity 0 equals vLLM's FlashAttention
    backend; sparsity 0.5 stays within bf16 noise of the fp32 DUO run (teacher-forced)."""
    prompts = _prompts([15, 150, 301], seed=10)
    common = {"dtype": "bfloat16", "max_tokens": 4, **GPU_KWARGS}
    stock = run_engine(tmp_path, tiny_gqa, prompts, attention_backend="FLASH_ATTN", **common)
    zero = run_engine(tmp_path, tiny_gqa, prompts, env=_env(pattern, VLLM_DUO_SPARSITY=0),
                      **common)  # fmt: skip
    half = run_engine(tmp_path, tiny_gqa, prompts, env=_env(pattern), **common)
    fp32 = run_engine(tmp_path, tiny_gqa, prompts, env=_env(pattern), max_tokens=4, **GPU_KWARGS)
    line = next(ln for ln in half["log"].splitlines() if "DuoAttention kernels" in ln)
    print(line)
    assert "vLLM FlashAttention varlen" in line
    stock_vs_zero = _prompt_logprob_diff(stock, zero)
    bf16_vs_fp32 = _prompt_logprob_diff(half, fp32)
    print(f"stock vs DUO sparsity 0: {stock_vs_zero:.2e}; DUO bf16 vs fp32: {bf16_vs_fp32:.2e}")
    assert stock_vs_zero < 2e-2
    assert bf16_vs_fp32 < 0.15


def test_gpu_piecewise_cuda_graphs_match_eager(tmp_path, tiny_gqa, pattern):
    """Compiled model with vLLM's default CUDA-graph mode: DUO declares no full graphs, so
    vLLM captures piecewise graphs around attention, which runs eagerly."""
    prompts = _prompts([9, 150, 260], seed=50)
    common = {"dtype": "bfloat16", "max_tokens": 16, **GPU_KWARGS}
    eager = run_engine(tmp_path, tiny_gqa, prompts, env=_env(pattern), **common)
    graphs = run_engine(tmp_path, tiny_gqa, prompts, env=_env(pattern), enforce_eager=False,
                        **common)  # fmt: skip
    assert "cudagraph_mode=PIECEWISE" in graphs["log"]
    assert [o["tokens"] for o in graphs["outputs"]] == [o["tokens"] for o in eager["outputs"]]
    assert _prompt_logprob_diff(eager, graphs) < 2e-2


def test_gpu_tp2_matches_reference(tmp_path, tiny_gqa, pattern, reference):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("tensor_parallel_size=2 needs two GPUs")
    prompts = _prompts([12, 150, 260], seed=60)
    run = run_engine(tmp_path, tiny_gqa, prompts, tensor_parallel_size=2,
                     env=_env(pattern, VLLM_ENABLE_V1_MULTIPROCESSING=1), **GPU_KWARGS)  # fmt: skip
    assert_matches_reference(reference, prompts, run["outputs"])
