"""The GPU kernel family inside real vLLM, on CPU under Triton's interpreter.

``VLLM_DUO_KERNELS=triton`` with ``TRITON_INTERPRET=1`` runs the GPU family's Python path
(head runs over strided cache views, indexed writes, decode-first batches, block tables,
the Triton decode and prefill kernels) inside vLLM's CPU build. Every case of the CPU
family's engine tests is covered against the same fp32 reference, merged into few engine
runs because the interpreter is slow (~40-60 s an engine on 2 cores).
"""

from __future__ import annotations

import pytest
from conftest import (
    Reference,
    assert_matches_reference,
    assert_one_gpu_launch_per_run,
    run_engine,
    write_pattern,
)
from test_engine_semantics import GQA_GATES, MHA_GATES, RECENT, SINK, VOCAB

from vllm_duo.patterns import load_gates, select_retrieval
from vllm_duo.testing.tiny_llama import synthetic_prompt_ids

pytestmark = pytest.mark.slow

TRITON = {"VLLM_DUO_KERNELS": "triton", "TRITON_INTERPRET": "1"}
KERNELS_LINE = (
    "DuoAttention kernels (VLLM_DUO_KERNELS=triton): retrieval heads: vllm-duo Triton "
    "(no window), one call per layer and cache group; streaming heads: vllm-duo Triton decode"
)


def _env(pattern, sink: int = SINK, recent: int = RECENT, **extra) -> dict[str, str]:
    env = {"VLLM_DUO_PATTERN": str(pattern), "VLLM_DUO_SINK": str(sink),
           "VLLM_DUO_RECENT": str(recent), **TRITON}  # fmt: skip
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    return [synthetic_prompt_ids(n, seed + i, VOCAB) for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def gqa_pattern(tmp_path_factory):
    return write_pattern(tmp_path_factory.mktemp("gqa-pattern"), GQA_GATES)


def _gqa_reference(model, pattern, sink: int = SINK, recent: int = RECENT) -> Reference:
    mask = select_retrieval(load_gates(pattern), sparsity=0.5)
    assert mask.sum(axis=1).tolist() == [2, 0, 1, 1]
    return Reference(model, mask, sink, recent)


def test_gqa_chunks_sharing_steps_match_reference(tmp_path, tiny_gqa, gqa_pattern):
    """GQA, per-layer retrieval counts 2,0,1,1, 32-token chunks that share steps with
    decodes of other requests, prompts shorter than S, than S+W and much longer."""
    prompts = _prompts([3, 15, 150, 301], seed=0)
    run = run_engine(
        tmp_path, tiny_gqa, prompts, env=_env(gqa_pattern), count_kernel_calls="gpu",
        max_num_batched_tokens=32, max_num_seqs=4, enable_chunked_prefill=True,
    )  # fmt: skip
    worst = assert_matches_reference(_gqa_reference(tiny_gqa, gqa_pattern), prompts,
                                     run["outputs"])  # fmt: skip
    assert KERNELS_LINE in run["log"], "start-up line naming the kernels missing"
    forwards = assert_one_gpu_launch_per_run(run)
    records = [record for runs in forwards for record in runs]
    # One run served both KV heads of layer 0 (one write, one launch for both).
    assert any(r["heads"] == 2 for r in records), records[:8]
    # Decode rows and prefill chunks shared a step: both kernels in one run's forward.
    assert any(r.get("decode") and r.get("prefill") for r in records)
    print(f"max |logprob diff| = {worst:.2e}, {len(forwards)} layer forwards")


def test_gqa_prefix_hits_and_preemption_match_reference(tmp_path, tiny_gqa, gqa_pattern):
    """Prefix caching on: three requests sharing a 160-token prefix one after the other
    (the third hits the cache), then three long requests at once in a cache too small for
    them: some are preempted while prefilling or decoding, and recomputed."""
    sink, recent = 8, 40
    prefix = synthetic_prompt_ids(160, 20, VOCAB)
    shared = [prefix + synthetic_prompt_ids(37 + 9 * i, 30 + i, VOCAB) for i in range(3)]
    prompts = shared + _prompts([380, 420, 460], seed=40)
    # 1 MB hold 30 blocks of 32 tokens (a block is one page of every head cache of a
    # group): a prefix request takes ~11 (less than half of the pool, so its windows stay
    # cacheable), a long one ~21. 128-token chunks admit the next long request while the
    # previous one still grows.
    run = run_engine(
        tmp_path, tiny_gqa, prompts, env=_env(gqa_pattern, sink, recent), probe=True,
        enable_prefix_caching=True, prompt_logprobs=False, block_size=32, max_tokens=8,
        max_model_len=512, kv_cache_memory_bytes=1_000_000, max_num_batched_tokens=128,
        max_num_seqs=4, enable_chunked_prefill=True, batches=[[0], [1], [2], [3, 4, 5]],
    )  # fmt: skip
    hits = [out["num_cached_tokens"] for out in run["outputs"]]
    print("cached tokens per request:", hits, "preemptions:", run["preemptions"])
    assert hits[0] == 0 and hits[2] >= 128
    assert run["preemptions"] > 0
    worst = assert_matches_reference(_gqa_reference(tiny_gqa, gqa_pattern, sink, recent),
                                     prompts, run["outputs"])  # fmt: skip
    print(f"max |logprob diff| = {worst:.2e}")


def test_mha_unequal_heads_match_reference(tmp_path, tiny_mha):
    """MHA, threshold pattern with per-layer counts 4,0,1,2; layer 3's retrieval heads
    (0 and 3) are not adjacent, so their outputs are gathered and scattered."""
    pattern = write_pattern(tmp_path / "mha-pattern", MHA_GATES)
    mask = select_retrieval(load_gates(pattern), threshold=0.5)
    assert mask.sum(axis=1).tolist() == [4, 0, 1, 2]
    prompts = _prompts([9, 60, 280], seed=30)
    run = run_engine(
        tmp_path, tiny_mha, prompts, env=_env(pattern, VLLM_DUO_THRESHOLD=0.5),
        max_num_batched_tokens=64, count_kernel_calls="gpu",
    )  # fmt: skip
    worst = assert_matches_reference(Reference(tiny_mha, mask, SINK, RECENT), prompts,
                                     run["outputs"])  # fmt: skip
    print(f"max |logprob diff| = {worst:.2e}")
    records = [record for runs in assert_one_gpu_launch_per_run(run) for record in runs]
    assert any(r["retrieval"] and r["heads"] == 4 for r in records)


def test_tp2_multiprocess_matches_reference(tmp_path, tiny_gqa, gqa_pattern):
    """tensor_parallel_size=2 with spawned engine core and workers. Layers 2 and 3 give one
    rank a retrieval head and the other none, so that rank's streaming head sits in a
    full-context slot (and a full-context cache group) and must still see sink + window."""
    prompts = _prompts([12, 90, 170], seed=60)
    env = _env(gqa_pattern, VLLM_ENABLE_V1_MULTIPROCESSING=1, VLLM_CPU_OMP_THREADS_BIND="0|1")
    run = run_engine(tmp_path, tiny_gqa, prompts, env=env, tensor_parallel_size=2)
    assert "stores 1 of its 4 head caches per rank with full context" in run["log"]
    assert KERNELS_LINE in run["log"]
    worst = assert_matches_reference(_gqa_reference(tiny_gqa, gqa_pattern), prompts,
                                     run["outputs"])  # fmt: skip
    print(f"max |logprob diff| = {worst:.2e}")
