"""csrc/: the CUDA sink+window decode kernel, its C launcher, its torch binding and the CPU op.

Without a GPU (CI, this machine):
  * nvcc compiles every csrc/*.cu for sm_80 AND sm_90 with torch's extension flags,
    and no kernel spills registers (skipped without nvcc);
  * g++ -fsyntax-only accepts torch_binding.cpp against the installed torch headers,
    with and without its CUDA part (skipped without g++ or headers);
  * the C launcher's argument rules and split planning, through ctypes on a shared
    library linked from that object (no CUDA call happens before validation);
  * vllm_duo.cuda_ops imports, reports itself unavailable and refuses CPU tensors;
  * g++ builds csrc/cpu for AVX2 and for AVX-512 (x86-64 only), and the attention loop of
    each keeps its vectors in registers.
With a GPU and the extension built (``pytest -k gpu``): the kernel against an fp32
reference on awkward shapes, fp16 / bf16 / fp8, torch.compile and CUDA graphs.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from vllm_duo import cuda_ops

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
ARCHS = ("80", "90")
# AVX2 and AVX-512 machines: each builds the CPU op for its own vector width only.
CPU_MARCHES = ("x86-64-v3", "x86-64-v4")
OBJDUMP = shutil.which("objdump")


def _find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _find_nvcc()
CUDA_INCLUDE = Path(NVCC).resolve().parent.parent / "include" if NVCC else None


def _torch_nvcc_flags() -> list[str]:
    from torch.utils import cpp_extension

    return list(cpp_extension.COMMON_NVCC_FLAGS)


def _torch_includes() -> list[str]:
    from torch.utils import cpp_extension

    return [p for p in cpp_extension.include_paths() if Path(p).is_dir()]


def _cxx_std() -> str:
    """The -std torch's own extension builds use (c++20 since torch 2.10, else c++17)."""
    from torch.utils import cpp_extension

    return "-std=c++20" if "c++20" in Path(cpp_extension.__file__).read_text() else "-std=c++17"


# ---------------------------------------------------------------- one build per session


class _Job:
    """One compiler run in a background thread (the runs are independent)."""

    def __init__(self, name: str, cmd: list[str]):
        self.name, self.cmd = name, cmd
        self.output, self.returncode, self.seconds = "", None, 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        proc = subprocess.run(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output, self.returncode = proc.stdout, proc.returncode
        self.seconds = time.monotonic() - start

    def wait(self) -> _Job:
        self._thread.join()
        return self

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Starts every compile at once (they are independent), waits, reports the times."""
    out = tmp_path_factory.mktemp("csrc_build")
    jobs: dict[str, _Job] = {}
    if NVCC is not None:
        for cu in CU_FILES:
            cmd = [
                NVCC,
                "-c",
                "-std=c++17",
                "-O2",
                "--threads=2",
                "-Xcompiler",
                "-fPIC",
                "-Xptxas",
                "-v",
                *_torch_nvcc_flags(),
                f"-I{CSRC}",
            ]
            for arch in ARCHS:
                cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
            cmd += [str(cu), "-o", str(out / (cu.stem + ".o"))]
            jobs[cu.name] = _Job(cu.name, cmd)
    gxx = shutil.which("g++")
    includes = _torch_includes()
    if gxx and includes:
        base = [gxx, "-fsyntax-only", _cxx_std(), "-Wall", "-Wextra", f"-I{CSRC}"]
        base += [f"-isystem{p}" for p in includes]
        jobs["binding"] = _Job("binding", [*base, str(CSRC / "torch_binding.cpp")])
        if CUDA_INCLUDE is not None and (CUDA_INCLUDE / "cuda_runtime_api.h").exists():
            cuda = [
                "-DDUO_WITH_CUDA",
                "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
                f"-isystem{CUDA_INCLUDE}",
            ]
            jobs["binding+cuda"] = _Job(
                "binding+cuda", [*base, *cuda, str(CSRC / "torch_binding.cpp")]
            )
    if gxx and includes and OBJDUMP is not None and platform.machine() == "x86_64":
        # The C++ op of csrc/cpu as the extension builds it, once per vector width.
        from vllm_duo import _build_cpu

        flags = [f for f in _build_cpu._flags() if not f.startswith("-m")]
        for march in CPU_MARCHES:
            cmd = [gxx, *flags, f"-march={march}", "-fPIC", *(f"-I{p}" for p in includes)]
            for name in _build_cpu.SOURCES:
                stem = Path(name).stem
                obj = out / f"{stem}-{march}.o"
                source = str(_build_cpu.CSRC / name)
                jobs[f"{stem}-{march}"] = _Job(
                    f"{stem}-{march}", [*cmd, "-c", source, "-o", str(obj)]
                )
    for job in jobs.values():
        job.wait()
    report = ", ".join(f"{j.name} {j.seconds:.1f}s" for j in jobs.values())
    print(f"\ncsrc compile times: {report}", file=sys.stderr)
    return out, jobs


def _job(builds, name: str) -> _Job:
    _, jobs = builds
    if name not in jobs:
        pytest.skip(f"{name}: compiler or headers not available here")
    job = jobs[name]
    assert job.ok, f"{' '.join(job.cmd)}\n{job.output[-6000:]}"
    return job


# ---------------------------------------------------------------- (a) nvcc


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("cu", [p.name for p in CU_FILES])
def test_nvcc_compiles_for_sm80_and_sm90(builds, cu):
    job = _job(builds, cu)
    out, _ = builds
    assert (out / (Path(cu).stem + ".o")).stat().st_size > 0
    for arch in ARCHS:
        assert f"for 'sm_{arch}'" in job.output, f"no sm_{arch} code for {cu}"
    warnings = [line for line in job.output.splitlines() if "warning" in line.lower()]
    assert not warnings, "\n".join(warnings)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("cu", [p.name for p in CU_FILES])
def test_kernels_do_not_spill(builds, cu):
    job = _job(builds, cu)
    spills = [
        line
        for line in job.output.splitlines()
        if re.search(r"[1-9]\d* bytes spill (stores|loads)", line)
        or re.search(r"[1-9]\d* bytes stack frame", line)
    ]
    assert not spills, "\n".join(spills)


# ---------------------------------------------------------------- (b) g++ syntax


def test_binding_syntax_without_cuda(builds):
    job = _job(builds, "binding")
    ours = [line for line in job.output.splitlines() if f"{CSRC}/" in line]
    assert not ours, job.output


def test_binding_syntax_with_cuda(builds):
    job = _job(builds, "binding+cuda")
    ours = [line for line in job.output.splitlines() if f"{CSRC}/" in line]
    assert not ours, job.output


# ---------------------------------------------------------------- (e) the launcher via ctypes

MAX_KV_HEADS = 64
F16, BF16, E4M3 = 0, 1, 2


class DuoDecodeArgs(ctypes.Structure):
    """Mirror of csrc/duo_decode_args.h (checked against duo_decode_args_size())."""

    _fields_ = [
        ("query", ctypes.c_void_p),
        ("q_stride_req", ctypes.c_int64),
        ("q_stride_head", ctypes.c_int64),
        ("out", ctypes.c_void_p),
        ("o_stride_req", ctypes.c_int64),
        ("o_stride_head", ctypes.c_int64),
        ("caches", ctypes.c_void_p * MAX_KV_HEADS),
        ("cache_block_stride", ctypes.c_int64),
        ("block_table", ctypes.c_void_p),
        ("bt_stride", ctypes.c_int64),
        ("max_blocks", ctypes.c_int),
        ("seq_lens", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p),
        ("workspace_bytes", ctypes.c_size_t),
        ("num_reqs", ctypes.c_int),
        ("num_kv_heads", ctypes.c_int),
        ("group", ctypes.c_int),
        ("head_size", ctypes.c_int),
        ("block_size", ctypes.c_int),
        ("sink", ctypes.c_int),
        ("recent", ctypes.c_int),
        ("scale", ctypes.c_float),
        ("k_scale", ctypes.c_float),
        ("v_scale", ctypes.c_float),
        ("q_dtype", ctypes.c_int),
        ("kv_dtype", ctypes.c_int),
        ("num_splits", ctypes.c_int),
        ("num_sms", ctypes.c_int),
    ]


class DuoDecodePlan(ctypes.Structure):
    _fields_ = [
        ("num_splits", ctypes.c_int),
        ("keys_per_split", ctypes.c_int),
        ("group_tile", ctypes.c_int),
        ("group_tiles", ctypes.c_int),
        ("workspace_bytes", ctypes.c_size_t),
    ]


@pytest.fixture(scope="module")
def launcher(builds):
    """csrc/sink_window_decode.cu as a shared library (linked from the session's object)."""
    if NVCC is None:
        pytest.skip("nvcc not found")
    _job(builds, "sink_window_decode.cu")
    out, _ = builds
    lib_path = out / "libduo_decode.so"
    link = subprocess.run(
        [NVCC, "-shared", str(out / "sink_window_decode.o"), "-o", str(lib_path)],
        capture_output=True,
        text=True,
    )
    assert link.returncode == 0, link.stderr
    lib = ctypes.CDLL(str(lib_path))
    lib.duo_decode_args_size.restype = ctypes.c_size_t
    lib.duo_dtype_name.restype = ctypes.c_char_p
    for fn in (lib.duo_sink_window_decode_plan, lib.duo_sink_window_decode):
        fn.restype = ctypes.c_int
    return lib


def _args(**overrides) -> DuoDecodeArgs:
    a = DuoDecodeArgs()
    fields = dict(
        q_stride_req=7 * 128,
        q_stride_head=128,
        o_stride_req=7 * 128,
        o_stride_head=128,
        cache_block_stride=2 * 16 * 128,
        bt_stride=40,
        max_blocks=40,
        num_reqs=3,
        num_kv_heads=1,
        group=7,
        head_size=128,
        block_size=16,
        sink=64,
        recent=256,
        scale=0.088,
        k_scale=1.0,
        v_scale=1.0,
        q_dtype=BF16,
        kv_dtype=BF16,
        num_splits=0,
        num_sms=132,
    )
    fields.update(overrides)
    for name, value in fields.items():
        setattr(a, name, value)
    return a


def _plan(lib, a: DuoDecodeArgs) -> tuple[int, DuoDecodePlan, str]:
    plan = DuoDecodePlan()
    err = ctypes.create_string_buffer(512)
    status = lib.duo_sink_window_decode_plan(ctypes.byref(a), ctypes.byref(plan), err, 512)
    return status, plan, err.value.decode()


def test_launcher_struct_matches_header(launcher):
    assert launcher.duo_decode_args_size() == ctypes.sizeof(DuoDecodeArgs)
    assert launcher.duo_dtype_name(E4M3) == b"fp8_e4m3"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (dict(head_size=96), "head_size=96 is not supported: expected one of 64, 128, 256"),
        (dict(block_size=24), "block_size=24 is not supported: expected one of 16, 32, 64, 128"),
        (dict(group=0), "group=0 is not supported"),
        (dict(sink=-1), "sink=-1 is not supported"),
        (dict(recent=0), "recent=0 is not supported"),
        (dict(num_kv_heads=65), "num_kv_heads=65 is not supported"),
        (dict(q_dtype=E4M3), "q_dtype=fp8_e4m3 is not supported: expected float16 or bfloat16"),
        (dict(q_dtype=F16, kv_dtype=BF16), "kv_dtype=bfloat16 with q_dtype=float16"),
        (dict(kv_dtype=7), "kv_dtype=unknown is not supported"),
        (dict(k_scale=0.0), "k_scale=0 is not supported"),
        (dict(scale=float("nan")), "scale=nan is not supported"),
        (dict(cache_block_stride=100), "cache_block_stride=100 is too small"),
        (dict(q_stride_head=100), "query strides (896, 100) are not supported"),
        (dict(bt_stride=10), "bt_stride=10 is too small"),
        (dict(num_splits=-1), "num_splits=-1 is not supported"),
    ],
)
def test_launcher_names_the_broken_rule(launcher, override, message):
    status, _, err = _plan(launcher, _args(**override))
    assert status == 1
    assert message in err
    # The launch path applies the same rules before touching the GPU.
    buf = ctypes.create_string_buffer(512)
    a = _args(**override)
    assert launcher.duo_sink_window_decode(ctypes.byref(a), None, buf, 512) == 1
    assert message in buf.value.decode()


def test_launcher_checks_pointers_before_cuda(launcher):
    buf = ctypes.create_string_buffer(512)
    a = _args()
    assert launcher.duo_sink_window_decode(ctypes.byref(a), None, buf, 512) == 1
    assert buf.value.decode() == "query is NULL"
    # Misaligned query (a fake address: nothing is dereferenced on the host).
    a = _args(query=0x1008, out=0x2000, block_table=0x3000, seq_lens=0x4000)
    assert launcher.duo_sink_window_decode(ctypes.byref(a), None, buf, 512) == 1
    assert "query must be 16-byte aligned" in buf.value.decode()
    a = _args(query=0x1000, out=0x2000, block_table=0x3000, seq_lens=0x4000)
    assert launcher.duo_sink_window_decode(ctypes.byref(a), None, buf, 512) == 1
    assert "caches[0] is NULL" in buf.value.decode()
    a.caches[0] = 0x10000
    a.num_splits = 4  # needs a workspace
    assert launcher.duo_sink_window_decode(ctypes.byref(a), None, buf, 512) == 1
    assert "workspace is NULL" in buf.value.decode()


def test_launcher_truncates_long_messages(launcher):
    buf = ctypes.create_string_buffer(16)
    status, _, _ = _plan(launcher, _args(head_size=96))
    a = _args(head_size=96)
    assert launcher.duo_sink_window_decode_plan(ctypes.byref(a), None, buf, 16) == status == 1
    assert len(buf.value) == 15


def test_plan_splits_few_requests_and_not_many(launcher):
    # One request, one KV head: spread S + W = 320 keys over 10 CTAs of 32 keys.
    status, plan, _ = _plan(launcher, _args(num_reqs=1, group=4))
    assert status == 0
    assert (plan.num_splits, plan.keys_per_split, plan.group_tile, plan.group_tiles) == (
        10,
        32,
        4,
        1,
    )
    assert plan.workspace_bytes == 1 * 4 * 10 * (128 + 1) * 4
    # Enough requests to fill the GPU: no split, no workspace.
    status, plan, _ = _plan(launcher, _args(num_reqs=512, group=7))
    assert status == 0
    assert (plan.num_splits, plan.keys_per_split, plan.group_tile) == (1, 320, 8)
    status, plan, _ = _plan(launcher, _args(num_reqs=512, group=2))
    assert (status, plan.group_tile, plan.group_tiles) == (0, 4, 1)
    assert plan.workspace_bytes == 0
    # G = 16 takes two tiles of 8; forced splits are honoured (whole CTA steps).
    status, plan, _ = _plan(launcher, _args(group=16, num_splits=3, sink=20, recent=100))
    assert status == 0
    assert (plan.num_splits, plan.keys_per_split, plan.group_tiles) == (3, 40, 2)
    # More splits than keys: capped to one CTA step (8 keys at head_size 128) each.
    status, plan, _ = _plan(launcher, _args(num_splits=1000, sink=0, recent=20))
    assert status == 0
    assert (plan.num_splits, plan.keys_per_split) == (3, 8)


def test_plan_covers_all_keys(launcher):
    for sink, recent, head in [(0, 1, 64), (3, 5, 256), (64, 256, 128), (17, 1000, 64)]:
        for forced in (0, 1, 2, 5, 64):
            status, plan, err = _plan(
                launcher,
                _args(
                    sink=sink,
                    recent=recent,
                    head_size=head,
                    num_splits=forced,
                    num_reqs=1,
                    cache_block_stride=2 * 16 * head,
                ),
            )
            assert status == 0, err
            assert plan.num_splits * plan.keys_per_split >= sink + recent
            assert (plan.num_splits - 1) * plan.keys_per_split < sink + recent


# ---------------------------------------------------------------- (c) Python API without GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_ops_unavailable_without_cuda():
    assert cuda_ops.is_available() is False
    assert "not built" in (cuda_ops.load_error() or "") or "failed to load" in (
        cuda_ops.load_error() or ""
    )


def test_cuda_ops_refuses_cpu_tensors():
    query = torch.zeros(2, 4, 128, dtype=torch.float16)
    cache = torch.zeros(4, 1, 16, 256, dtype=torch.float16)
    table = torch.zeros(2, 4, dtype=torch.int32)
    lens = torch.ones(2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="needs CUDA tensors, got query on cpu"):
        cuda_ops.sink_window_decode(query, cache, table, lens, sink=4, recent=16, scale=0.1)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        cuda_ops.sink_window_decode_heads(query, [cache], table, lens, sink=4, recent=16, scale=0.1)


def test_cuda_ops_does_not_import_vllm():
    code = "import sys, vllm_duo.cuda_ops as c; c.is_available(); assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------- (d) GPU

gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and cuda_ops.is_available()),
    reason="needs a CUDA GPU and the built extension vllm_duo._C",
)

_NAN_FP8 = 0x7F  # e4m3: S.1111.111 is NaN


def _visible(seq_len: int, sink: int, recent: int) -> list[int]:
    return [j for j in range(seq_len) if j < sink or j > seq_len - 1 - recent]


def _make_case(seq_lens, *, G, D, bs, sink, recent, q_dtype, kv, H=1, seed=0, pad_cols=3):
    """Random paged caches whose every invisible slot (and the null block 0) holds NaN."""
    gen = torch.Generator().manual_seed(seed)
    dev = "cuda"
    R = len(seq_lens)
    max_blocks = max((s + bs - 1) // bs for s in seq_lens) + pad_cols
    needed = sorted(
        {(r, j // bs) for r, s in enumerate(seq_lens) for j in _visible(s, sink, recent)}
    )
    num_blocks = len(needed) + 4
    ids = torch.randperm(num_blocks - 1, generator=gen)[: len(needed)] + 1  # block 0 = null
    table = torch.zeros(R, max_blocks, dtype=torch.int32)
    for (r, col), bid in zip(needed, ids.tolist()):
        table[r, col] = bid
    keys = torch.randn(H, num_blocks, bs, D, generator=gen)
    vals = torch.randn(H, num_blocks, bs, D, generator=gen)
    visible_slots = torch.zeros(num_blocks, bs, dtype=torch.bool)
    for r, s in enumerate(seq_lens):
        for j in _visible(s, sink, recent):
            visible_slots[table[r, j // bs], j % bs] = True
    k_scale, v_scale = (0.5, 0.25) if kv == "fp8" else (1.0, 1.0)
    caches = []
    for h in range(H):
        if kv == "fp8":
            k8 = (keys[h] / k_scale).to(torch.float8_e4m3fn).view(torch.uint8)
            v8 = (vals[h] / v_scale).to(torch.float8_e4m3fn).view(torch.uint8)
            k8[~visible_slots] = _NAN_FP8
            v8[~visible_slots] = _NAN_FP8
            keys[h] = k8.view(torch.float8_e4m3fn).float() * k_scale
            vals[h] = v8.view(torch.float8_e4m3fn).float() * v_scale
            block = torch.cat([k8, v8], dim=1)  # [nb, 2*bs, D]
        else:
            kq = keys[h].to(q_dtype)
            vq = vals[h].to(q_dtype)
            kq[~visible_slots] = float("nan")
            vq[~visible_slots] = float("nan")
            keys[h], vals[h] = kq.float(), vq.float()
            block = torch.cat([kq, vq], dim=1)
        caches.append(block.reshape(num_blocks, 1, bs, 2 * D).contiguous().to(dev))
    query = torch.randn(R, H * G, D, generator=gen).to(q_dtype)
    return dict(
        query=query.to(dev),
        caches=caches,
        table=table.to(dev),
        lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        keys=keys,
        vals=vals,
        table_cpu=table,
        k_scale=k_scale,
        v_scale=v_scale,
    )


def _reference(case, seq_lens, *, G, sink, recent, scale):
    """fp32 sink+window decode straight from DESIGN.md section 3 (no paging tricks)."""
    query = case["query"].float().cpu()
    R, HG, D = query.shape
    out = torch.zeros(R, HG, D)
    table = case["table_cpu"]
    bs = case["keys"].shape[2]
    for r, s in enumerate(seq_lens):
        pos = torch.tensor(_visible(s, sink, recent), dtype=torch.long)
        if len(pos) == 0:
            continue
        blocks = table[r, pos // bs].long()
        for h in range(HG // G):
            k = case["keys"][h, blocks, pos % bs]  # [n, D]
            v = case["vals"][h, blocks, pos % bs]
            q = query[r, h * G : (h + 1) * G]
            p = torch.softmax(q @ k.T * scale, dim=-1)
            out[r, h * G : (h + 1) * G] = p @ v
    return out


_TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}

CASES = [
    # q dtype, kv, D, block, G, S, W, seq lens
    (torch.float16, "same", 128, 16, 7, 20, 100, [1, 7, 19, 20, 21, 119, 120, 121, 5001]),
    (torch.bfloat16, "same", 128, 16, 4, 64, 256, [333, 64, 1, 320, 321, 4097]),
    (torch.bfloat16, "same", 64, 32, 8, 5, 37, [3, 41, 42, 43, 999]),
    (torch.float16, "same", 64, 128, 1, 0, 50, [1, 49, 50, 51, 777]),
    (torch.float16, "same", 256, 64, 2, 13, 1, [1, 13, 14, 15, 300]),
    (torch.bfloat16, "same", 256, 16, 3, 70, 90, [100, 161, 1234]),
    (torch.float16, "fp8", 128, 16, 7, 20, 100, [5, 119, 121, 2001]),
    (torch.bfloat16, "fp8", 128, 32, 4, 64, 256, [63, 400, 3000]),
    (torch.float16, "fp8", 64, 64, 16, 9, 70, [1, 80, 81, 500]),
    (torch.bfloat16, "fp8", 256, 128, 5, 33, 200, [250, 1000]),
]


def _case_id(c):
    q, kv, D, bs, G, S, W, _ = c
    return f"{str(q).split('.')[-1]}-{kv}-D{D}-bs{bs}-G{G}-S{S}-W{W}"


@gpu
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("num_splits", [0, 1, 3])
def test_gpu_matches_reference(case, num_splits):
    q_dtype, kv, D, bs, G, S, W, lens = case
    data = _make_case(lens, G=G, D=D, bs=bs, sink=S, recent=W, q_dtype=q_dtype, kv=kv)
    scale = D**-0.5
    out = cuda_ops.sink_window_decode(
        data["query"],
        data["caches"][0],
        data["table"],
        data["lens"],
        sink=S,
        recent=W,
        scale=scale,
        k_scale=data["k_scale"],
        v_scale=data["v_scale"],
        num_splits=num_splits,
    )
    ref = _reference(data, lens, G=G, sink=S, recent=W, scale=scale)
    assert out.dtype == q_dtype
    assert torch.isfinite(out).all(), "read a NaN slot: an invisible key or the null block"
    torch.testing.assert_close(out.float().cpu(), ref, atol=_TOL[q_dtype], rtol=_TOL[q_dtype])


@gpu
@pytest.mark.parametrize("kv", ["same", "fp8"])
def test_gpu_heads_op_matches_reference(kv):
    lens, G, D, bs, S, W, H = [3, 150, 151, 2049], 7, 128, 16, 20, 100, 3
    data = _make_case(lens, G=G, D=D, bs=bs, sink=S, recent=W, q_dtype=torch.bfloat16, kv=kv, H=H)
    out = cuda_ops.sink_window_decode_heads(
        data["query"],
        data["caches"],
        data["table"],
        data["lens"],
        sink=S,
        recent=W,
        scale=0.1,
        k_scale=data["k_scale"],
        v_scale=data["v_scale"],
    )
    ref = _reference(data, lens, G=G, sink=S, recent=W, scale=0.1)
    torch.testing.assert_close(out.float().cpu(), ref, atol=2e-2, rtol=2e-2)


@gpu
def test_gpu_strided_query_and_rows_view():
    lens, G, D, bs, S, W = [77, 300], 4, 64, 32, 8, 40
    data = _make_case(lens, G=G, D=D, bs=bs, sink=S, recent=W, q_dtype=torch.float16, kv="same")
    big = torch.zeros(len(lens), 3 * G, D, dtype=torch.float16, device="cuda")
    big[:, G : 2 * G] = data["query"]
    query = big[:, G : 2 * G]  # stride (3*G*D, D, 1)
    out_big = torch.zeros_like(big)
    out = out_big[:, G : 2 * G]
    rows = data["caches"][0].view(-1, 2 * bs, D)  # [num_blocks, 2*bs, D]
    cuda_ops.sink_window_decode(
        query, rows, data["table"], data["lens"], sink=S, recent=W, scale=0.125, out=out
    )
    ref = _reference(data, lens, G=G, sink=S, recent=W, scale=0.125)
    torch.testing.assert_close(out.float().cpu(), ref, atol=3e-3, rtol=3e-3)
    assert (out_big[:, :G] == 0).all() and (out_big[:, 2 * G :] == 0).all()


@gpu
def test_gpu_rejects_bad_shapes_with_the_rule():
    q = torch.zeros(2, 4, 96, dtype=torch.float16, device="cuda")
    cache = torch.zeros(4, 1, 16, 192, dtype=torch.float16, device="cuda")
    table = torch.zeros(2, 4, dtype=torch.int32, device="cuda")
    lens = torch.ones(2, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="head_size=96 is not supported"):
        cuda_ops.sink_window_decode(q, cache, table, lens, sink=4, recent=16, scale=0.1)


@gpu
def test_gpu_torch_compile_and_cuda_graph():
    lens, G, D, bs, S, W = [5, 200, 1000], 4, 128, 16, 16, 64
    data = _make_case(lens, G=G, D=D, bs=bs, sink=S, recent=W, q_dtype=torch.bfloat16, kv="same")
    args = (data["query"], data["caches"][0], data["table"], data["lens"])
    ref = cuda_ops.sink_window_decode(*args, sink=S, recent=W, scale=0.1)

    def step(q, cache, table, seq_lens):
        out = torch.empty_like(q)
        torch.ops.vllm_duo.sink_window_decode(q, cache, table, seq_lens, S, W, 0.1, 1.0, 1.0, out)
        return out * 2

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), ref * 2)

    static_out = torch.empty_like(data["query"])
    for num_splits in (0, 1):
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):  # warm-up off the capture
            torch.ops.vllm_duo.sink_window_decode(
                *args, S, W, 0.1, 1.0, 1.0, static_out, num_splits
            )
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            torch.ops.vllm_duo.sink_window_decode(
                *args, S, W, 0.1, 1.0, 1.0, static_out, num_splits
            )
        static_out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, ref, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- (e) the CPU op


def _vector_stack_moves(obj: Path, function: str) -> tuple[int, int]:
    """(vector moves between registers and the stack, all instructions) in the attention
    loop (every function whose name holds ``function``) of an object file."""
    listing = subprocess.run([OBJDUMP, "-d", "--no-show-raw-insn", "-C", str(obj)],
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
    spills = total = 0
    in_loop = False
    for line in listing.splitlines():
        if re.match(r"[0-9a-f]+ <.*>:$", line):  # a function starts
            in_loop = function in line
        elif in_loop and line.strip():
            total += 1
            spills += bool(
                re.search(r"vmov\w*\s.*%[yz]mm.*\(%r[sb]p\)|vmov\w*\s.*\(%r[sb]p\).*%[yz]mm", line)
            )
    return spills, total


@pytest.mark.parametrize("march", CPU_MARCHES)
@pytest.mark.parametrize(
    ("stem", "function"),
    [("sink_window_cpu", "sink_window_tiles"), ("paged_attention_cpu", "paged_attention")],
)
def test_cpu_ops_keep_their_vectors_in_registers_on_avx2_and_avx512(builds, march, stem,
                                                                    function):  # fmt: skip
    """The ops are built with -march=native, so a machine only ever builds one vector width;
    this builds both (AVX2 = v3, AVX-512 = v4) and counts vector moves to and from the
    stack in the attention loops. With 64-byte vectors on AVX2 GCC spilled them constantly
    (2,968 vector stack moves in 37,565 instructions against 117 now; the op ran 12x
    slower); the decode kernel's accumulators spilled when a loop bound was not a
    compile-time constant (twice the time per key)."""
    _job(builds, f"{stem}-{march}")
    out, _ = builds
    spills, total = _vector_stack_moves(out / f"{stem}-{march}.o", function)
    print(f"{stem} -march={march}: {spills} vector stack moves in {total} instructions")
    assert total > 1000, "the attention loop was not found in the object"
    assert spills < 0.02 * total, (spills, total)
