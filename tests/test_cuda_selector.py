"""DUO on vLLM's CUDA platform: the real selector accepts and refuses it from its declared
capabilities alone, with no platform patch.

vLLM's CPU build ships ``vllm/platforms/cuda.py``; it imports once the missing
``vllm._C_stable_libtorch`` extension is stubbed (only in a subprocess). The worker imports
vllm-duo under the CPU platform (its vLLM imports need the CPU build), then switches vLLM
to the CUDA platform (``vllm.platforms.current_platform = ...``, as vLLM's own platform
resolution would have set it on a GPU machine), registers the plugin there, and asks
``CudaPlatform.get_attn_backend_cls`` about DUO with CUDA-like inputs and a monkeypatched
``get_device_capability``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VALID = "is not valid for this configuration"


def _case(name: str, want: str | None = None, cap=(9, 0), **selector) -> tuple:
    """(name, selector arguments, device capability, what the refusal must say or None)."""
    args = {"head_size": 128, "dtype": "bfloat16", "kv_cache_dtype": "auto", "block_size": 16}
    return name, {**args, **selector}, cap, want


CASES = [
    *[
        _case(f"ok-sm{cap[0]}{cap[1]}-{dtype}-h{head}-b{block}", cap=cap, head_size=head,
              dtype=dtype, block_size=block)
        for cap in ((8, 0), (9, 0))
        for dtype in ("float16", "bfloat16")
        for head, block in ((64, 16), (128, 32), (128, 64), (256, 16), (80, None))
    ],
    _case("ok-float32", dtype="float32", head_size=64, block_size=48),
    _case("sm75", "compute capability not supported: DUO's GPU kernels need compute "
          "capability >= 8.0 (Ampere or newer), got 7.5", cap=(7, 5)),
    _case("block-24", "block_size not supported: DUO's kernels need a block size of a "
          "multiple of 16, got 24", block_size=24),
    _case("block-8", "got 8", block_size=8),
    _case("head-72", "head_size not supported: DUO serves head sizes [32, 64, 80, 96, 112, "
          "128, 160, 192, 224, 256], got 72", head_size=72),
    _case("head-512", "got 512", head_size=512),
    _case("ok-fp8-kv", kv_cache_dtype="fp8"),
    _case("ok-fp8-e4m3-kv", kv_cache_dtype="fp8_e4m3"),
    _case("fp8-e5m2-kv", "kv_cache_dtype not supported: DUO serves kv_cache_dtype ['auto', "
          "'fp8', 'fp8_e4m3'] on this platform, got 'fp8_e5m2'", kv_cache_dtype="fp8_e5m2"),
    _case("mla", "DUO: MLA not supported", use_mla=True),
    _case("sinks", "DUO: attention sinks not supported", has_sink=True),
    _case("sliding-window", "DUO: sliding window not supported", has_sliding_window=True),
    _case("sparse", "DUO: sparse not supported", use_sparse=True),
    _case("encoder", "DUO: attention type encoder_only not supported", attn_type="encoder_only"),
    _case("two-reasons", "got 72', \"kv_cache_dtype not supported", cap=(8, 0), head_size=72,
          kv_cache_dtype="fp8_e5m2"),
]  # fmt: skip

WORKER = r"""
import json, sys, types
# The CPU build lacks this CUDA extension; vllm/platforms/cuda.py only needs it to import.
sys.modules["vllm._C_stable_libtorch"] = types.ModuleType("vllm._C_stable_libtorch")
import torch
import vllm.platforms
from vllm.platforms import cuda
from vllm.platforms.cpu import CpuPlatform
from vllm.platforms.interface import DeviceCapability

import vllm_duo._vllm  # vLLM's CPU build imports everything vllm-duo needs first

cuda_cls = cuda.CudaPlatform
original_choice = cuda_cls.get_attn_backend_cls.__func__
original_cpu_check = CpuPlatform.check_and_update_config.__func__
capability = [DeviceCapability(9, 0)]
cuda_cls.get_device_capability = classmethod(lambda cls, device_id=0: capability[0])
vllm.platforms.current_platform = cuda_cls()

import vllm_duo
vllm_duo.register()
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.attention.selector import AttentionSelectorConfig

duo = AttentionBackendEnum["DUO"]
results = {}
for name, kwargs, cap in json.loads(sys.argv[1]):
    capability[0] = DeviceCapability(*cap)
    kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    try:
        config = AttentionSelectorConfig(**kwargs)
        results[name] = {"path": cuda_cls.get_attn_backend_cls(duo, config)}
    except ValueError as exc:
        results[name] = {"error": str(exc)}
mark = "_vllm_duo_patched"
results["_patches"] = {
    "cuda_choice_patched": cuda_cls.get_attn_backend_cls.__func__ is not original_choice
        or getattr(cuda_cls.get_attn_backend_cls, mark, False),
    "cpu_choice_patched": bool(getattr(CpuPlatform.get_attn_backend_cls, mark, False)),
    "cuda_check_patched": bool(getattr(cuda_cls.check_and_update_config, mark, False)),
    "cpu_check_patched": CpuPlatform.check_and_update_config.__func__ is not original_cpu_check,
    "device_type": vllm.platforms.current_platform.device_type,
}
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def selector() -> dict:
    cases = [(name, kwargs, cap) for name, kwargs, cap, _ in CASES]
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(cases)], cwd=ROOT, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULTS "))


@pytest.mark.parametrize("name,want", [(c[0], c[3]) for c in CASES], ids=[c[0] for c in CASES])
def test_cuda_selector(selector, name, want):
    result = selector[name]
    if want is None:
        assert result == {"path": "vllm_duo.backend.DuoAttentionBackend"}, result
    else:
        assert "error" in result, f"{name} was accepted: {result}"
        assert VALID in result["error"] and want in result["error"], result["error"]


def test_only_the_cpu_platform_choice_is_patched(selector):
    """CUDA selects DUO unpatched; the CPU platform's choice patch stays on CPU; the early
    settings validation wraps the running platform (CUDA here), not the CPU class."""
    assert selector["_patches"] == {
        "cuda_choice_patched": False,
        "cpu_choice_patched": True,
        "cuda_check_patched": True,
        "cpu_check_patched": False,
        "device_type": "cuda",
    }


def test_gpu_family_never_imports_vllm_at_import():
    """The GPU family, its layout and kernels import without vLLM: the GPU check machine
    (torch, Triton, nvcc, no vLLM) runs them."""
    modules = ["vllm_duo.families.gpu", "vllm_duo.head_layout", "vllm_duo.cuda_ops",
               "vllm_duo.kernels.triton_sink_window"]  # fmt: skip
    code = (
        "import sys\n"
        f"for m in {modules!r}: __import__(m)\n"
        "bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize(
    ("requested", "resolved"),
    [
        ("FULL_AND_PIECEWISE", "PIECEWISE"),  # vLLM's default on CUDA
        ("FULL_DECODE_ONLY", "PIECEWISE"),
        ("PIECEWISE", "PIECEWISE"),
        ("NONE", "NONE"),
        ("FULL", "please try cudagraph_mode=PIECEWISE"),
    ],
)
def test_cuda_graph_modes_resolve_to_piecewise(requested, resolved):
    """DUO's builder declares no full CUDA graphs (AttentionCGSupport.NEVER); vLLM's own
    resolution then captures the compiled pieces between attention calls (DUO's layers
    run through vllm::unified_attention_with_output, one of the splitting ops) and runs
    attention eagerly, or refuses FULL with a hint. Full graphs: see docs/design.md."""
    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode

    from vllm_duo.backend import DuoMetadataBuilder

    config = CompilationConfig(
        mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode[requested]
    )
    config.set_splitting_ops_for_v1(all2all_backend="naive")
    assert "vllm::unified_attention_with_output" in config.splitting_ops
    support = DuoMetadataBuilder.get_cudagraph_support(None, None)
    assert support.name == "NEVER"
    if resolved.startswith("please"):
        with pytest.raises(ValueError, match=resolved):
            config.resolve_cudagraph_mode_and_sizes(support, "DuoAttentionBackend")
    else:
        mode = config.resolve_cudagraph_mode_and_sizes(support, "DuoAttentionBackend")
        assert mode == CUDAGraphMode[resolved]
