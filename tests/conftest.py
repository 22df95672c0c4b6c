"""Shared fixtures: tiny offline models, engine subprocesses, the fp32 reference."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "engine_runner.py"
ENGINE_TIMEOUT_S = 420


def _tiny(tmp_path_factory, name: str, **kwargs) -> Path:
    from vllm_duo.testing.tiny_llama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.getbasetemp() / name, **kwargs)


@pytest.fixture(scope="session")
def tiny_gqa(tmp_path_factory) -> Path:
    """4 layers, 4 query heads over 2 KV heads, head size 32, fp32."""
    return _tiny(tmp_path_factory, "tiny-gqa", num_layers=4, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="session")
def tiny_mha(tmp_path_factory) -> Path:
    """4 layers, 4 query heads, 4 KV heads (MHA), head size 32, fp32."""
    return _tiny(tmp_path_factory, "tiny-mha", num_layers=4, num_heads=4, num_kv_heads=4, seed=1)


def vllm_cpu_fp8_refusal() -> str | None:
    """Why vLLM's CPU attention refuses an fp8 KV cache on this machine, or None.

    vLLM 0.32 builds its CPU fp8 paths for x86 with AVX-512 or AMX only (an AVX2 CPU gets
    "Unsupported CPU attention configuration" from its store and "requires x86 with AVX-512
    or AMX" from its selector); tests of vLLM's fp8 bytes can only run where it takes them.
    """
    import torch

    from vllm_duo._vllm import cpu_attn_isa

    try:
        cpu_attn_isa(torch.bfloat16, 32, 64, "fp8")
    except NotImplementedError as exc:
        return str(exc)
    return None


_FP8_REFUSAL = vllm_cpu_fp8_refusal()
needs_vllm_cpu_fp8 = pytest.mark.skipif(
    _FP8_REFUSAL is not None,
    reason=f"vLLM's CPU attention takes no fp8 KV cache on this CPU: {_FP8_REFUSAL}",
)


def write_pattern(directory: Path, gates: list[list[float]]) -> Path:
    """An upstream-format pattern directory holding ``gates``."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = ["\t".join(repr(float(g)) for g in row) for row in gates]
    (directory / "full_attention_heads.tsv").write_text("\n".join(rows) + "\n")
    return directory


_SHARED = {}


@pytest.fixture(scope="session", autouse=True)
def _shared_vllm_cache(tmp_path_factory):
    """One VLLM_CACHE_ROOT per session: vLLM caches model inspection there (~13 s a start)."""
    _SHARED["cache"] = tmp_path_factory.mktemp("vllm-cache")
    # vLLM puts ZMQ sockets under TMPDIR; their paths must stay under 107 bytes.
    _SHARED["tmp"] = Path(tempfile.mkdtemp(prefix="vd", dir="/tmp"))
    yield
    shutil.rmtree(_SHARED["tmp"], ignore_errors=True)


def engine_env(tmp_path: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """A clean environment for a vLLM subprocess: temp caches, no stray VLLM_DUO_*."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_DUO_")}
    cache = _SHARED.get("cache") or tmp_path / "vllm-cache"
    cache.mkdir(exist_ok=True)
    base.update(
        TMPDIR=str(_SHARED.get("tmp") or tmp_path),
        VLLM_CACHE_ROOT=str(cache),
        HF_HUB_OFFLINE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        PYTHONUNBUFFERED="1",
    )
    base.update(env or {})
    return base


DEFAULT_LLM_KWARGS = {
    "enforce_eager": True,
    "dtype": "float32",
    "max_model_len": 1024,
    "kv_cache_memory_bytes": 64 << 20,
    "attention_backend": "DUO",
}


def run_engine(
    tmp_path: Path,
    model: Path,
    prompts: list[list[int]],
    *,
    env: dict[str, str] | None = None,
    max_tokens: int = 6,
    expect_failure: bool = False,
    probe: bool = False,
    count_kernel_calls: bool | str = False,
    prompt_logprobs: bool = True,
    sequential: bool = False,
    batches: list[list[int]] | None = None,
    kv_scales: dict[str, list[float]] | None = None,
    capture_attention: bool = False,
    max_concurrency: list[int] | None = None,
    **llm_kwargs,
):
    """Run one engine in a subprocess; returns its outputs, or its log if it must fail.

    ``count_kernel_calls``: True counts the CPU family's kernel calls, ``"gpu"`` the GPU
    family's. ``batches``: prompt indices per ``llm.generate`` call, run in order.
    ``kv_scales``: {"k": [...], "v": [...]} per-layer fp8 KV scales, set after the model
    loads as vLLM sets checkpoint scales (in-process engine). ``capture_attention``: the
    result's "attention" holds every DUO layer forward of the generate calls (query, key,
    value, output, offsets, scales; see engine_runner._AttentionCapture). ``max_concurrency``:
    token counts for which the result's "max_concurrency" holds vLLM's figure.
    """
    tag = f"run{len(list(tmp_path.glob('request-*.json')))}"
    request = tmp_path / f"request-{tag}.json"
    result = tmp_path / f"result-{tag}.json"
    kwargs = {**DEFAULT_LLM_KWARGS, **llm_kwargs}
    request.write_text(
        json.dumps(
            {
                "model": str(model),
                "llm_kwargs": kwargs,
                "prompts": prompts,
                "max_tokens": max_tokens,
                "probe": probe,
                "count_kernel_calls": count_kernel_calls,
                "prompt_logprobs": prompt_logprobs,
                "sequential": sequential,
                "batches": batches,
                "kv_scales": kv_scales,
                "capture_attention": capture_attention,
                "max_concurrency": max_concurrency,
                "env": {},
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, str(RUNNER), str(request), str(result)],
        env=engine_env(tmp_path, env),
        capture_output=True,
        text=True,
        timeout=ENGINE_TIMEOUT_S,
        cwd=tmp_path,
    )
    log = proc.stdout + proc.stderr
    if expect_failure:
        assert proc.returncode != 0, f"engine was expected to fail but ran:\n{log[-3000:]}"
        return log
    assert proc.returncode == 0, f"engine failed (rc={proc.returncode}):\n{log[-6000:]}"
    data = json.loads(result.read_text())
    data["log"] = log
    if capture_attention:
        import torch

        data["attention"] = torch.load(str(result) + ".attention.pt")
    return data


class Reference:
    """The fp32 transformers model with DuoAttention masks (vllm_duo.reference).

    ``kv_quantisation`` (:class:`vllm_duo.reference.KVQuantisation`): keys and values as an
    fp8 KV cache holds them.
    """

    def __init__(
        self,
        model_dir: Path,
        retrieval_mask: np.ndarray,
        sink: int,
        recent: int,
        kv_quantisation=None,
    ):
        import torch
        from transformers import AutoModelForCausalLM

        self._pattern = {"retrieval_mask": retrieval_mask, "sink": sink, "recent": recent,
                         "kv_quantisation": kv_quantisation}  # fmt: skip
        name = self._install()
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, attn_implementation=name, dtype=torch.float32
        )
        self.model.eval()

    def _install(self) -> str:
        from vllm_duo.reference import use_reference_pattern

        mask = self._pattern["retrieval_mask"]
        return use_reference_pattern(mask, **{k: v for k, v in self._pattern.items()
                                              if k != "retrieval_mask"})  # fmt: skip

    def logprobs(self, ids: list[int]):
        from vllm_duo.reference import reference_logprobs

        # The pattern is process-global: another Reference may have installed its own.
        self._install()
        return reference_logprobs(self.model, ids)


def assert_matches_reference(
    reference: Reference, prompts: list[list[int]], outputs: list[dict], atol: float = 1e-3
) -> float:
    """Prompt and decode logprobs agree with the reference; greedy tokens are its argmax.

    Returns the largest absolute logprob difference seen.
    """
    worst = 0.0
    for ids, out in zip(prompts, outputs):
        full = ids + out["tokens"]
        lp = reference.logprobs(full)
        want_prompt = np.array([lp[i - 1, ids[i]].item() for i in range(1, len(ids))])
        got_prompt = np.array(out["prompt_logprobs"]) if out["prompt_logprobs"] else want_prompt
        start = len(ids) - 1
        want_decode = np.array([lp[start + j, t].item() for j, t in enumerate(out["tokens"])])
        got_decode = np.array(out["logprobs"])
        diffs = np.abs(np.concatenate([want_prompt - got_prompt, want_decode - got_decode]))
        worst = max(worst, float(diffs.max(initial=0.0)))
        assert diffs.max(initial=0.0) < atol, (
            f"prompt of {len(ids)} tokens: max |logprob diff| {diffs.max():.2e} >= {atol}"
        )
        for j, token in enumerate(out["tokens"]):
            top = lp[start + j]
            # Greedy must pick the reference's best token, up to exact-tie noise.
            assert top[token] >= top.max() - 1e-4, f"step {j}: {token} is not the argmax"
    return worst


def assert_one_kernel_call_per_layer(run: dict) -> None:
    """Every DUO layer forward made at most one call per head kind (no per-head loop).

    Needs ``run_engine(..., count_kernel_calls=True)`` with the in-process engine and
    cache groups that each hold all heads of a kind (equal retrieval and streaming counts).
    """
    from vllm_duo import cpu_ops

    forwards = run["kernel_calls"]
    assert forwards, "no DUO layer forward was counted"
    # Where the C++ extension is built (make venv builds it), the engine must use it.
    assert all(calls["native"] == cpu_ops.is_available() for calls in forwards)
    for calls in forwards:
        retrieval = 1 if calls["retrieval_heads"] else 0
        streaming = 1 if calls["streaming_heads"] else 0
        assert calls.get("retrieval_attention", 0) == retrieval, calls
        assert calls.get("retrieval_write", 0) == retrieval, calls
        assert calls.get("streaming_attention", 0) == streaming, calls
        assert calls.get("streaming_write", 0) == (streaming if calls["native"] else 0), calls
    if any(calls["native_retrieval"] and calls["isa"] in ("vec", "vec16") for calls in forwards):
        # Retrieval heads on vLLM's vec/vec16 pages use the native attention op.
        assert any(calls.get("paged_attention") for calls in forwards), forwards[:3]


def assert_one_gpu_launch_per_run(run: dict) -> list[list[dict]]:
    """The GPU family wrote each head run's caches once and launched at most one decode
    and one prefill kernel for it, in every DUO layer forward.

    Needs ``run_engine(..., count_kernel_calls="gpu")`` with the in-process engine.
    Returns the per-forward run records.
    """
    forwards = run["kernel_calls"]
    assert forwards, "no DUO layer forward was counted"
    for runs in forwards:
        assert runs, "a DUO layer forward served no head run"
        for record in runs:
            assert record.get("write", 0) == 1, record
            assert record.get("decode", 0) <= 1 and record.get("prefill", 0) <= 1, record
            assert record.get("decode", 0) + record.get("prefill", 0) >= 1, record
    return forwards
