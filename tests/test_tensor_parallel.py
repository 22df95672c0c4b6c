"""DUO with tensor_parallel_size=2 on CPU gives the TP=1 outputs."""

from __future__ import annotations

import pytest
from conftest import Reference, assert_matches_reference, run_engine, write_pattern

from vllm_duo.patterns import load_gates, select_retrieval
from vllm_duo.testing.tiny_llama import synthetic_prompt_ids

pytestmark = pytest.mark.slow

# Rank 0 holds KV head 0, rank 1 head 1: layer 0 gives both ranks a retrieval head,
# layer 1 none, layers 2 and 3 one rank each, so ranks differ and need padding.
GATES = [[0.9, 0.8], [0.1, 0.05], [0.7, 0.2], [0.3, 0.6]]
SINK, RECENT = 4, 16


def test_tp2_matches_tp1_and_reference(tmp_path, tiny_gqa):
    pattern = write_pattern(tmp_path / "pattern", GATES)
    env = {"VLLM_DUO_PATTERN": str(pattern), "VLLM_DUO_SINK": str(SINK),
           "VLLM_DUO_RECENT": str(RECENT)}  # fmt: skip
    prompts = [synthetic_prompt_ids(n, 60 + n, 512) for n in (12, 150, 260)]
    tp1 = run_engine(tmp_path, tiny_gqa, prompts, env=env)
    tp2 = run_engine(tmp_path, tiny_gqa, prompts, tensor_parallel_size=2,
                     env={**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
                          "VLLM_CPU_OMP_THREADS_BIND": "0|1"})  # fmt: skip
    assert "stores 1 of its 4 head caches per rank with full context" in tp2["log"]
    for a, b in zip(tp1["outputs"], tp2["outputs"]):
        assert a["tokens"] == b["tokens"]
        diffs = [abs(x - y) for x, y in zip(a["prompt_logprobs"] + a["logprobs"],
                                            b["prompt_logprobs"] + b["logprobs"])]  # fmt: skip
        assert max(diffs) < 1e-3
    mask = select_retrieval(load_gates(pattern), sparsity=0.5)
    assert_matches_reference(Reference(tiny_gqa, mask, SINK, RECENT), prompts, tp2["outputs"])
