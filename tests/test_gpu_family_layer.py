"""One layer of the GPU kernel family (``GpuKernels.forward_run``) outside vLLM.

* Host syncs: a layer's forward must only queue device work (DESIGN.md; all host work of a
  step is done in the builder). Every code path of ``forward_run`` (each retrieval kernel:
  FlashAttention, vLLM's Triton unified attention, the project's Triton kernel; each
  decode kernel: csrc, Triton; gathered and sliced head runs) runs with its kernel launches
  stubbed, (1) on CPU tensors under a ``TorchDispatchMode`` that fails on every op that
  needs the host to see device data (``.item()``, ``nonzero``, boolean masks, ...), and
  (2) on meta tensors, which have no data at all, so any host read (``.tolist()``,
  ``.cpu()``, numpy) fails too. Both guards are shown to catch an injected sync.
* Correctness: the same layer (heads of both kinds in strided multi-head cache views,
  decode rows first, a chunk with context, a fresh prompt, null middle blocks holding NaN)
  against the dense fp32 reference: on CPU under Triton's interpreter (in a subprocess,
  since the interpreter must be chosen before Triton is imported), and on a GPU, compiled,
  with ``torch.cuda.set_sync_debug_mode("error")`` (``pytest -k gpu``; skipped without
  CUDA). Never imports vLLM, so it runs on the GPU check machine too.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script by the interpreter subprocess
    sys.path.insert(0, str(ROOT))

from vllm_duo.families import gpu  # noqa: E402
from vllm_duo.head_layout import HeadCacheRef, plan_runs  # noqa: E402
from vllm_duo.kernels import triton_sink_window as duo_triton  # noqa: E402
from vllm_duo.reference import duo_attention  # noqa: E402

SINK, RECENT = 4, 24
# (context already cached, queries this step): two decodes first (as the builder asks vLLM
# to order them), a chunk with context whose window reaches back into the cache, a fresh
# prompt longer than S + W.
REQUESTS = ((70, 1), (5, 1), (40, 20), (0, 33))
LAYOUTS = {"gathered": (0, 2), "sliced": (1, 2)}  # retrieval KV heads of 4
_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@dataclass
class Step:
    """A GroupStep (vllm_duo.families.base) built by hand."""

    num_actual_tokens: int
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    query_start_loc_host: list[int]
    seq_lens: torch.Tensor
    seq_lens_host: list[int] | None
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    num_decodes: int
    num_decode_tokens: int
    isa: str | None = None
    step_cache: dict[str, Any] = field(default_factory=dict)


@dataclass
class Layer:
    runs: tuple
    steps: dict[bool, Step]
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    output: torch.Tensor
    want: torch.Tensor | None


class _Scales:
    _k_scale_float = 1.0
    _v_scale_float = 1.0


def make_layer(
    device: str, dtype: torch.dtype, retrieval: tuple[int, ...], *, H=4, G=2, D=64, bs=16
) -> Layer:
    """A DUO layer's step: per kind one cache allocation holding that kind's one-head
    caches every other layer (as vLLM interleaves the layers of a group), block tables
    with shuffled ids, NaN wherever nothing may be read (null block 0, dropped middle
    blocks of streaming heads, unwritten slots)."""
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    dev = torch.device(device)
    lens = [c + q for c, q in REQUESTS]
    T = sum(q for _, q in REQUESTS)
    full_k = [torch.randn(n, H, D, generator=gen).to(dtype) for n in lens]
    full_v = [torch.randn(n, H, D, generator=gen).to(dtype) for n in lens]
    full_q = [torch.randn(n, H * G, D, generator=gen).to(dtype) for n in lens]
    max_blocks = max(-(-n // bs) for n in lens) + 1
    num_blocks = 1 + len(REQUESTS) * max_blocks
    runs, steps = [], {}
    for kind in (True, False):
        heads = [h for h in range(H) if (h in retrieval) == kind]
        if not heads:
            continue
        ids = list(range(1, num_blocks))
        rng.shuffle(ids)
        table = torch.zeros(len(REQUESTS), max_blocks, dtype=torch.int32)
        slots: list[int] = []
        # Storage [2 * heads + 1 layers, blocks, 1, bs, 2D]; this kind's caches are the odd
        # layers, in KV head order.
        storage = torch.full((2 * len(heads) + 1, num_blocks, 1, bs, 2 * D), math.nan, dtype=dtype)
        for r, ((ctx, _), n) in enumerate(zip(REQUESTS, lens)):
            for col in range(-(-n // bs)):
                first, last = col * bs, min(col * bs + bs, n) - 1
                # Streaming heads drop context blocks no query of the step can see.
                kept = kind or first < SINK or last >= ctx - RECENT + 1
                table[r, col] = ids.pop() if kept else 0
            for pos in range(n):
                block = int(table[r, pos // bs])
                if pos >= ctx:
                    slots.append(block * bs + pos % bs)
                elif block and (kind or pos < SINK or pos >= ctx - RECENT + 1):
                    for i, h in enumerate(heads):
                        # A page is block_size key rows, then block_size value rows.
                        rows = storage[2 * i + 1, block, 0].view(2 * bs, D)
                        rows[pos % bs] = full_k[r][pos, h]
                        rows[bs + pos % bs] = full_v[r][pos, h]
        storage = storage.to(dev)
        refs = [
            HeadCacheRef(layer_name=f"layer.{'full' if kind else 'stream'}{i}", group=kind,
                         local_kv_head=h, retrieval=kind, cache=storage[2 * i + 1])
            for i, h in enumerate(heads)
        ]  # fmt: skip
        runs.extend(plan_runs(refs))
        qsl = [0]
        for _, q in REQUESTS:
            qsl.append(qsl[-1] + q)
        decodes = sum(q == 1 for _, q in REQUESTS)
        steps[kind] = Step(
            num_actual_tokens=T, num_reqs=len(REQUESTS),
            max_query_len=max(q for _, q in REQUESTS), max_seq_len=max(lens),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            query_start_loc_host=qsl,
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev), seq_lens_host=None,
            block_table=table.to(dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            num_decodes=decodes, num_decode_tokens=decodes,
        )  # fmt: skip
    assert len(runs) == 2, [r.kv_heads for r in runs]  # one run per kind: one write each
    query = torch.cat([qs[c:] for qs, (c, _) in zip(full_q, REQUESTS)]).view(T, H, G, D)
    key = torch.cat([ks[c:] for ks, (c, _) in zip(full_k, REQUESTS)])
    value = torch.cat([vs[c:] for vs, (c, _) in zip(full_v, REQUESTS)])
    want = None
    if device != "meta":
        streaming = [h not in retrieval for h in range(H)]
        parts = []
        for (ctx, _), qs, ks, vs in zip(REQUESTS, full_q, full_k, full_v):
            ref = duo_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1),
                                streaming, sink=SINK, recent=RECENT, scale=D**-0.5)  # fmt: skip
            parts.append(ref[:, ctx:].transpose(0, 1))
        want = torch.cat(parts).view(T, H, G, D)
    output = torch.full((T, H, G, D), math.nan, dtype=dtype)
    return Layer(
        tuple(runs), steps, query.to(dev), key.to(dev), value.to(dev), output.to(dev), want
    )


def gpu_kernels(choice: str, device_type: str, dtype: torch.dtype, D: int = 64):
    return gpu.GpuKernels(
        choice=choice, device_type=device_type, scale=D**-0.5, sink=SINK, recent=RECENT,
        kv_cache_dtype="auto", dtype=dtype, head_size=D,
    )  # fmt: skip


def run_layer(kernels, layer: Layer) -> None:
    """What DuoAttentionImpl.forward does for one layer: every run, its group's step."""
    for run in layer.runs:
        kernels.forward_run(run, layer.steps[run.retrieval], layer.query, layer.key,
                            layer.value, layer.output, _Scales())  # fmt: skip


def max_error(layer: Layer) -> float:
    assert layer.want is not None
    return float((layer.output.float().cpu() - layer.want).abs().max())


# ------------------------------------------------------------------ no host sync


class HostSyncError(AssertionError):
    pass


_aten = torch.ops.aten
# Ops whose result the host must read (a scalar, or a shape that depends on the data).
_SYNCING = {
    _aten._local_scalar_dense, _aten.nonzero, _aten.nonzero_numpy, _aten.masked_select,
    _aten._unique, _aten._unique2, _aten.unique_dim, _aten.unique_consecutive,
    _aten.equal, _aten.is_nonzero, _aten.bincount, _aten.histc,
}  # fmt: skip
_INDEXING = {_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_}
_REPEATS = {_aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor}


def _positional(args: tuple, func) -> object:
    """``output_size`` when passed positionally (it is the op's last argument)."""
    names = [a.name for a in func._schema.arguments]
    index = names.index("output_size")
    return args[index] if len(args) > index else None


class NoHostSync(TorchDispatchMode):
    """Fails on any op that needs the host to read device data."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _SYNCING:
            raise HostSyncError(f"{func} needs a host sync")
        # Tensor repeats: the output length is their sum, unless output_size is given.
        if func in _REPEATS and kwargs.get("output_size", _positional(args, func)) is None:
            raise HostSyncError(f"{func} without output_size needs a host sync")
        if packet in _INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            for index in indices or ():
                if isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8):
                    raise HostSyncError(f"{func} with a boolean mask needs a host sync")
        return func(*args, **kwargs)


class _Launches:
    """Stand-ins for every kernel launch: record, write nothing."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def fake_triton_kernels(self, device):
        launches = self

        class Kernel:
            def __init__(self, name: str) -> None:
                self.name = name

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.calls.append(f"triton {self.name}")

                return launch

        return {n: Kernel(n) for n in ("decode", "merge", "prefill")}, True

    def record(self, name: str):
        def call(*args, **kwargs):
            self.calls.append(name)
            return kwargs.get("out")

        return call


def _stub_launches(monkeypatch, kernels, retrieval: str, decode: str, meta: bool) -> _Launches:
    launches = _Launches()
    if meta:
        # The Triton wrappers refuse meta tensors (CPU or CUDA only): stub them whole.
        stub = type("DuoTriton", (), {})()
        stub.sink_window_decode_triton = launches.record("triton decode")
        stub.sink_window_prefill_triton = launches.record("triton prefill")
        monkeypatch.setattr(gpu, "duo_triton", stub)
    else:
        monkeypatch.setattr(duo_triton, "_get_kernels", launches.fake_triton_kernels)

    def flash_varlen(**kwargs):
        launches.calls.append("flash")
        return torch.empty_like(kwargs["q"])

    monkeypatch.setattr(gpu, "_flash_attn", lambda: (flash_varlen, lambda head_size: 3))
    monkeypatch.setattr(gpu, "_unified_attention", lambda: launches.record("unified"))
    csrc = type("CudaOps", (), {})()
    csrc.sink_window_decode_heads = launches.record("csrc decode")
    monkeypatch.setattr(gpu, "cuda_ops", csrc)
    kernels.retrieval_kernel, kernels.decode_kernel = retrieval, decode
    return launches


PATHS = [
    (gpu.FLASH_ATTN, gpu.CSRC_DECODE),
    (gpu.TRITON_UNIFIED, gpu.TRITON_DECODE),
    (gpu.DUO_TRITON, gpu.TRITON_DECODE),
]


def _interpreted_kernels(monkeypatch, dtype=torch.float32):
    # The constructor checks that CPU tensors would run in Triton's interpreter; the
    # launches are stubbed here, so that does not matter.
    monkeypatch.setattr(duo_triton, "is_interpreted", lambda: True)
    monkeypatch.setattr(duo_triton, "is_available", lambda: True)
    return gpu_kernels("triton", "cpu", dtype)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("paths", PATHS, ids=lambda p: f"{p[0]}+{p[1]}")
def test_forward_run_never_syncs_on_cpu(monkeypatch, paths, layout):
    kernels = _interpreted_kernels(monkeypatch)
    launches = _stub_launches(monkeypatch, kernels, *paths, meta=False)
    layer = make_layer("cpu", torch.float32, LAYOUTS[layout])
    with NoHostSync():
        run_layer(kernels, layer)
    # Every path launched something for each kind, and flash wrote its result back.
    assert len(launches.calls) >= 3, launches.calls


@pytest.mark.parametrize("paths", PATHS, ids=lambda p: f"{p[0]}+{p[1]}")
def test_forward_run_reads_no_data_on_meta(monkeypatch, paths):
    kernels = _interpreted_kernels(monkeypatch)
    launches = _stub_launches(monkeypatch, kernels, *paths, meta=True)
    layer = make_layer("meta", torch.float32, LAYOUTS["gathered"])
    run_layer(kernels, layer)
    assert len(launches.calls) >= 3, launches.calls


def _with_sync(monkeypatch, how: str) -> None:
    """Injects a host sync into the step's prefill offsets, as a careless edit might."""
    real = gpu._prefill_query_start_loc

    def synced(step):
        if how == "item":
            int(step.seq_lens.max().item())
        elif how == "mask":
            step.slot_mapping[step.slot_mapping >= 0]
        else:
            step.seq_lens.tolist()
        return real(step)

    monkeypatch.setattr(gpu, "_prefill_query_start_loc", synced)


@pytest.mark.parametrize("how", ["item", "mask"])
def test_dispatch_guard_catches_an_injected_sync(monkeypatch, how):
    kernels = _interpreted_kernels(monkeypatch)
    _stub_launches(monkeypatch, kernels, gpu.DUO_TRITON, gpu.TRITON_DECODE, meta=False)
    _with_sync(monkeypatch, how)
    layer = make_layer("cpu", torch.float32, LAYOUTS["gathered"])
    with pytest.raises(HostSyncError), NoHostSync():
        run_layer(kernels, layer)


@pytest.mark.parametrize("how", ["item", "mask", "tolist"])
def test_meta_tensors_catch_an_injected_sync(monkeypatch, how):
    kernels = _interpreted_kernels(monkeypatch)
    _stub_launches(monkeypatch, kernels, gpu.DUO_TRITON, gpu.TRITON_DECODE, meta=True)
    _with_sync(monkeypatch, how)
    layer = make_layer("meta", torch.float32, LAYOUTS["gathered"])
    with pytest.raises((RuntimeError, NotImplementedError)):
        run_layer(kernels, layer)


# ------------------------------------------------------------------ correctness


def _interpreted_case(layout: str) -> float:
    kernels = gpu_kernels("triton", "cpu", torch.float32)
    layer = make_layer("cpu", torch.float32, LAYOUTS[layout])
    run_layer(kernels, layer)
    return max_error(layer)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layer_matches_reference_interpreted(layout):
    """fp32 on CPU under Triton's interpreter, in a fresh process (see the docstring)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, __file__, "--interpreted", layout], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    error = json.loads(proc.stdout.strip().splitlines()[-1])["max_error"]
    print(f"{layout}: max |out - ref| = {error:.2e}")
    assert error < _TOL[torch.float32]


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("choice", ["auto", "triton"])
def test_gpu_layer_matches_reference_without_sync(choice, dtype, layout):
    """Compiled on a GPU: ``auto`` takes the csrc decode kernel where it is built."""
    kernels = gpu_kernels(choice, "cuda", dtype)
    warm = make_layer("cuda", dtype, LAYOUTS[layout])
    run_layer(kernels, warm)  # compiles the Triton kernels; may load modules
    layer = make_layer("cuda", dtype, LAYOUTS[layout])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_layer(kernels, layer)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    error = max_error(layer)
    print(f"{choice} ({kernels.decode_kernel}) {dtype} {layout}: max |out - ref| = {error:.2e}")
    assert error < _TOL[dtype]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--interpreted":
    print(json.dumps({"max_error": _interpreted_case(sys.argv[2])}))


# ------------------------------------------------------------------ kernel choice


B16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
FA, UNIFIED, CSRC, TRITON = gpu.FLASH_ATTN, gpu.TRITON_UNIFIED, gpu.CSRC_DECODE, gpu.TRITON_DECODE


@pytest.mark.parametrize(
    ("choice", "dtype", "head_size", "block_size", "flash", "csrc", "want"),
    [
        ("auto", BF16, 128, 16, True, True, (FA, CSRC)),
        ("auto", B16, 64, 32, False, True, (UNIFIED, CSRC)),
        # FlashAttention and the csrc kernel take fp16/bf16 only.
        ("auto", F32, 128, 16, True, True, (UNIFIED, TRITON)),
        # csrc serves head sizes 64/128/256 and blocks of 16..128 tokens; FlashAttention any
        # multiple of 8 up to 256.
        ("auto", BF16, 96, 16, True, True, (FA, TRITON)),
        ("auto", BF16, 128, 48, True, True, (FA, TRITON)),
        ("auto", BF16, 128, 16, True, False, (FA, TRITON)),
        ("triton", BF16, 128, 16, True, True, (UNIFIED, TRITON)),
        ("native", BF16, 128, 16, True, True, (FA, CSRC)),
        ("native", BF16, 96, 16, True, True, "head size 96"),
        ("native", BF16, 128, 48, True, True, "block size 48"),
        ("native", BF16, 128, 16, True, False, "pip install -e '.[cuda]'"),
    ],
)  # fmt: skip
def test_cuda_kernel_choice(monkeypatch, choice, dtype, head_size, block_size, flash, csrc, want):
    monkeypatch.setattr(gpu, "_flash_attn", lambda: ("varlen", "version") if flash else None)
    monkeypatch.setattr(gpu, "_unified_attention", lambda: "unified")
    monkeypatch.setattr(gpu.cuda_ops, "is_available", lambda: csrc)
    monkeypatch.setattr(gpu.cuda_ops, "load_error", lambda: None if csrc else "not built")
    kwargs = {"dtype": dtype, "head_size": head_size, "block_size": block_size}
    if isinstance(want, str):
        with pytest.raises(gpu.DuoConfigError, match="VLLM_DUO_KERNELS=native") as error:
            gpu.pick_kernels(choice, "cuda", **kwargs)
        assert want in str(error.value)
    else:
        assert gpu.pick_kernels(choice, "cuda", **kwargs) == want


@pytest.mark.parametrize("choice", ["auto", "native"])
def test_cpu_runs_the_gpu_family_only_with_triton(choice):
    with pytest.raises(gpu.DuoConfigError, match="only 'triton'"):
        gpu.pick_kernels(choice, "cpu", dtype=torch.float32, head_size=64)


@pytest.mark.parametrize(("head_stride", "want"), [(2**20, "unified"), (2**31, "triton")])
def test_unified_attention_only_with_int32_head_offsets(monkeypatch, head_stride, want):
    """vLLM's Triton unified attention computes ``kv_head * stride`` in int32: a run whose
    head stride (a whole cache layer) passes 2**31 elements goes to the project's kernel."""
    from vllm_duo.head_layout import HeadRun

    kernels = _interpreted_kernels(monkeypatch)
    launches = _stub_launches(monkeypatch, kernels, gpu.TRITON_UNIFIED, gpu.TRITON_DECODE,
                              meta=True)  # fmt: skip
    layer = make_layer("meta", torch.float32, LAYOUTS["gathered"])
    run = next(r for r in layer.runs if r.retrieval)
    stride = list(run.cache.stride())
    stride[1] = head_stride
    wide = run.cache.as_strided(run.cache.shape, stride, run.cache.storage_offset())
    wide_run = HeadRun(run.metadata_layer, True, run.kv_heads, wide)
    kernels.forward_run(wide_run, layer.steps[True], layer.query, layer.key, layer.value,
                        layer.output, _Scales())  # fmt: skip
    assert launches.calls and all(call.startswith(want) for call in launches.calls)


def test_triton_on_cpu_without_the_interpreter_is_refused_clearly():
    """VLLM_DUO_KERNELS=triton on CPU needs TRITON_INTERPRET=1 at process start."""
    code = (
        "import torch\n"
        "from vllm_duo.errors import DuoConfigError\n"
        "from vllm_duo.families.gpu import GpuKernels\n"
        "try:\n"
        "    GpuKernels(choice='triton', device_type='cpu', scale=1.0, sink=4, recent=8,\n"
        "               kv_cache_dtype='auto', dtype=torch.float32, head_size=64)\n"
        "except DuoConfigError as exc:\n"
        "    print(exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "set TRITON_INTERPRET=1 in the environment before starting vLLM" in proc.stdout
