"""Triton sink+window kernels (vllm_duo/kernels/triton_sink_window.py) vs the dense fp32 reference.

CPU: the kernels run in Triton's interpreter, which needs TRITON_INTERPRET=1 BEFORE triton
is first imported (Triton's own library is decorated at its import). In a full pytest run
vLLM, imported by earlier test modules, has already imported triton in compiled mode, so
every interpreted case runs in ONE worker subprocess (this file run as a script with the
variable set), started by a module fixture for just the cases pytest selected; each case
is still its own test item. Every cache slot the kernels must not read (invisible
positions, the null block 0, freed middle blocks, spare blocks, padding columns) holds
NaN, so a stray read fails the comparison.

GPU (``pytest -k gpu``, skipped without CUDA): the same cases compiled, a long-context
case with automatic splits, CUDA-graph capture, and agreement with the CUDA kernel of
csrc/ when that extension is built.

Also here, in-process: the input rules (each bad input names its rule), import without
Triton, and the clear refusal of CPU tensors when Triton was imported without the
interpreter.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the worker runs this file as a script
    sys.path.insert(0, str(ROOT))

from vllm_duo.kernels import triton_sink_window as tsw  # noqa: E402
from vllm_duo.reference import duo_mask  # noqa: E402

WORKER_TIMEOUT_S = 600
_NAN_FP8 = 0x7F  # e4m3: S.1111.111 is NaN
_WILD_BLOCK = 2**30  # a block id no cache has
_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


# ---------------------------------------------------------------- cases


def build_case(
    seq_lens,
    query_lens,
    *,
    H,
    G,
    D,
    bs,
    sink,
    recent,
    dtype,
    kv="same",
    step_kv=False,
    layout="vllm",
    strided_query=False,
    pad_tokens=0,
    scales=(1.0, 1.0),
    seed=0,
    device="cpu",
):
    """Paged caches holding only what the queries may read; everything else is NaN.

    Block ids are a random permutation (block 0 = null). Block-table columns that hold no
    readable position are null or point at NaN spare blocks; columns past a request's
    blocks are garbage ids of NaN blocks. With ``step_kv`` the chunk's keys are passed
    as new_keys/new_values and their cache slots are NaN (columns holding only chunk
    positions are null), as in the bounded cache.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    R = len(seq_lens)
    cache_dtype = dtype if kv == "same" else torch.float8_e4m3fn
    k_scale, v_scale = scales
    keys = [torch.randn(n, H, D, generator=gen) for n in seq_lens]
    vals = [torch.randn(n, H, D, generator=gen) for n in seq_lens]
    # What the cache holds (rounded, dequantised) and what the step holds (query dtype).
    if kv == "same":
        k_cached = [k.to(dtype).float() for k in keys]
        v_cached = [v.to(dtype).float() for v in vals]
    else:
        k_cached = [(k / k_scale).to(torch.float8_e4m3fn).float() * k_scale for k in keys]
        v_cached = [(v / v_scale).to(torch.float8_e4m3fn).float() * v_scale for v in vals]

    readable = []  # positions the kernel may read from the cache, per request
    for n, q in zip(seq_lens, query_lens):
        ctx = n - q
        # Union over the queries p in [ctx, n) of {j <= p: j < S or j > p - W}.
        seen = set(range(min(sink, n))) | set(range(max(ctx - recent + 1, 0), n)) if q else set()
        if step_kv:
            seen = {j for j in seen if j < ctx}
        readable.append(seen)
    max_blocks = max(max(-(-n // bs) for n in seq_lens), 1) + 2
    cols = sorted({(r, j // bs) for r in range(R) for j in readable[r]})
    spare = 3
    num_blocks = 1 + len(cols) + spare
    ids = list(range(1, num_blocks))
    rng.shuffle(ids)
    spare_ids = ids[len(cols) :]
    # On CPU some unread entries are wild ids far outside the cache: the interpreter would
    # segfault on reading them (the worker reports the case). NaN blocks cover the GPU.
    wild = [_WILD_BLOCK] if device == "cpu" else []
    table = torch.zeros(R, max_blocks, dtype=torch.int32)
    for r in range(R):
        chunk_start = seq_lens[r] - query_lens[r]
        for c in range(max_blocks):
            if c * bs >= seq_lens[r]:
                table[r, c] = rng.choice([*spare_ids, 0, *wild])  # garbage past the sequence
            elif step_kv and c * bs >= chunk_start:
                table[r, c] = (wild or [0])[0]  # the chunk's blocks: never allocated
            else:
                table[r, c] = [0, *spare_ids[:1], *wild][c % (2 + len(wild))]  # freed
    for (r, c), bid in zip(cols, ids):
        table[r, c] = bid

    k_store = torch.full((num_blocks, bs, H, D), float("nan"))
    v_store = torch.full((num_blocks, bs, H, D), float("nan"))
    for r in range(R):
        for j in readable[r]:
            b = table[r, j // bs]
            k_store[b, j % bs] = keys[r][j]
            v_store[b, j % bs] = vals[r][j]
    if kv == "same":
        k_store, v_store = k_store.to(dtype), v_store.to(dtype)
    else:
        nan_k, nan_v = k_store.isnan(), v_store.isnan()
        k_store = (k_store.nan_to_num() / k_scale).to(torch.float8_e4m3fn).view(torch.uint8)
        v_store = (v_store.nan_to_num() / v_scale).to(torch.float8_e4m3fn).view(torch.uint8)
        k_store[nan_k], v_store[nan_v] = _NAN_FP8, _NAN_FP8
        if kv == "fp8":
            k_store, v_store = k_store.view(cache_dtype), v_store.view(cache_dtype)
        # kv == "fp8_u8": vLLM's uint8 storage

    # Views are made on the device: .to() would make a strided view contiguous.
    dev = torch.device(device)
    rows = None
    if layout == "heads_major":  # [H, nb, bs, D] storage seen through a permuted view
        k_cache = k_store.permute(2, 0, 1, 3).contiguous().to(dev).permute(1, 2, 0, 3)
        v_cache = v_store.permute(2, 0, 1, 3).contiguous().to(dev).permute(1, 2, 0, 3)
    elif layout == "csrc":  # csrc/'s per-head cache: rows view [nb, 2*bs, D], keys first
        assert H == 1
        rows = torch.cat([k_store[:, :, 0], v_store[:, :, 0]], dim=1).contiguous().to(dev)
        k_cache, v_cache = rows[:, :bs, None], rows[:, bs:, None]
    else:
        k_cache, v_cache = k_store.to(dev), v_store.to(dev)

    num_tokens = sum(query_lens) + pad_tokens
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    query = torch.randn(num_tokens, H * G, D, generator=gen).to(dtype)
    query_arg = query.to(dev)
    if strided_query:
        wide = torch.full((num_tokens, H * G, 2 * D), float("nan"), dtype=dtype, device=dev)
        wide[:, :, D:] = query_arg
        query_arg = wide[:, :, D:]
    new_k = torch.zeros(num_tokens, H, D, dtype=dtype)
    new_v = torch.zeros(num_tokens, H, D, dtype=dtype)
    want = torch.zeros(num_tokens, H * G, D)
    for r, (n, q) in enumerate(zip(seq_lens, query_lens)):
        ctx = n - q
        k_ref, v_ref = k_cached[r].clone(), v_cached[r].clone()
        if step_kv:
            new_k[qsl[r] : qsl[r + 1]] = keys[r][ctx:].to(dtype)
            new_v[qsl[r] : qsl[r + 1]] = vals[r][ctx:].to(dtype)
            k_ref[ctx:] = keys[r][ctx:].to(dtype).float()
            v_ref[ctx:] = vals[r][ctx:].to(dtype).float()
        if q == 0:
            continue
        # Dense fp32 attention of the scheduled queries under the reference mask.
        mask = duo_mask(torch.arange(ctx, n), n, streaming=True, sink=sink, recent=recent)
        q_rows = query[qsl[r] : qsl[r + 1]].float().view(q, H, G, D).permute(1, 2, 0, 3)
        scores = q_rows @ k_ref.permute(1, 2, 0)[:, None] * D**-0.5  # [H, G, q, n]
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        ref = probs @ v_ref.transpose(0, 1)[:, None]  # [H, G, q, D]
        want[qsl[r] : qsl[r + 1]] = ref.permute(2, 0, 1, 3).reshape(q, H * G, D)

    return dict(
        query=query_arg,
        key_cache=k_cache,
        value_cache=v_cache,
        rows=rows,
        block_table=table.to(dev),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        new_keys=new_k.to(dev) if step_kv else None,
        new_values=new_v.to(dev) if step_kv else None,
        kwargs=dict(sink=sink, recent=recent, scale=D**-0.5),
        scales=dict(k_scale=k_scale, v_scale=v_scale) if kv != "same" else {},
        want=want,
        dtype=dtype,
        num_real_tokens=qsl[-1],
    )


def run_decode(spec: dict, device: str = "cpu") -> None:
    spec = dict(spec)
    splits = spec.pop("num_splits", 0)
    lens = spec.pop("seq_lens")
    c = build_case(lens, [1] * len(lens), device=device, **spec)
    out = tsw.sink_window_decode_triton(
        c["query"], c["key_cache"], c["value_cache"], c["block_table"], c["seq_lens"],
        num_splits=splits, **c["kwargs"], **c["scales"],
    )  # fmt: skip
    _compare(out, c)


def run_prefill(spec: dict, device: str = "cpu") -> None:
    spec = dict(spec)
    lens, qlens = spec.pop("seq_lens"), spec.pop("query_lens")
    c = build_case(lens, qlens, device=device, **spec)
    step = {}
    if c["new_keys"] is not None:
        step = dict(new_keys=c["new_keys"], new_values=c["new_values"])
    out = tsw.sink_window_prefill_triton(
        c["query"], c["key_cache"], c["value_cache"], c["block_table"], c["query_start_loc"],
        c["seq_lens"], **c["kwargs"], **c["scales"], **step,
    )  # fmt: skip
    _compare(out, c)
    assert (out[c["num_real_tokens"] :] == 0).all(), "padding rows must stay zero"


def _compare(out: torch.Tensor, c: dict) -> None:
    assert out.dtype == c["dtype"] and out.shape == c["want"].shape
    got = out.float().cpu()
    assert torch.isfinite(got).all(), "read a NaN slot: invisible key, null or freed block"
    tol = _TOL[c["dtype"]]
    torch.testing.assert_close(got, c["want"], atol=tol, rtol=tol)


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

DECODE_CASES = {
    # seq shorter than S, than S+W, at the boundaries, and long; 7 query heads per KV head
    "f32-D64-bs16-H2-G7-S5-W11": dict(
        seq_lens=[1, 4, 5, 6, 16, 17, 45, 333], H=2, G=7, D=64, bs=16, sink=5, recent=11, dtype=F32
    ),
    "f32-split3-len0": dict(
        seq_lens=[0, 1, 7, 45, 333],
        H=2,
        G=7,
        D=64,
        bs=16,
        sink=5,
        recent=11,
        dtype=F32,
        num_splits=3,
    ),
    "f16-heads_major-D128-bs32-H3-G7-S0-W1": dict(
        seq_lens=[1, 2, 33, 100],
        H=3,
        G=7,
        D=128,
        bs=32,
        sink=0,
        recent=1,
        dtype=F16,
        layout="heads_major",
    ),
    "bf16-strided_q-D64-bs16-H2-G4-S20-W40": dict(
        seq_lens=[19, 20, 21, 59, 60, 61, 250],
        H=2,
        G=4,
        D=64,
        bs=16,
        sink=20,
        recent=40,
        dtype=BF16,
        strided_query=True,
        num_splits=2,
    ),
    "fp8-f16-D128-bs16-H2-G7-S5-W37": dict(
        seq_lens=[3, 42, 43, 300],
        H=2,
        G=7,
        D=128,
        bs=16,
        sink=5,
        recent=37,
        dtype=F16,
        kv="fp8",
        scales=(0.5, 0.25),
        num_splits=2,
    ),
    "fp8u8-bf16-D64-bs32-H3-G1-S3-W70": dict(
        seq_lens=[1, 73, 74, 200],
        H=3,
        G=1,
        D=64,
        bs=32,
        sink=3,
        recent=70,
        dtype=BF16,
        kv="fp8_u8",
        scales=(0.75, 1.5),
    ),
    "csrc_rows-f16-D64-bs16-H1-G7-S4-W30": dict(
        seq_lens=[2, 34, 35, 129],
        H=1,
        G=7,
        D=64,
        bs=16,
        sink=4,
        recent=30,
        dtype=F16,
        layout="csrc",
    ),
}

PREFILL_CASES = {
    # mixed prefill + decode rows, padding tokens after the last request
    "f32-D64-bs16-H2-G7-S5-W11": dict(
        seq_lens=[1, 7, 45, 333, 130],
        query_lens=[1, 7, 1, 29, 1],
        H=2,
        G=7,
        D=64,
        bs=16,
        sink=5,
        recent=11,
        dtype=F32,
        pad_tokens=3,
    ),
    # a request with no queries; S=0, W=1
    "bf16-D128-bs32-H3-G2-S0-W1": dict(
        seq_lens=[9, 50, 90, 64],
        query_lens=[9, 0, 40, 1],
        H=3,
        G=2,
        D=128,
        bs=32,
        sink=0,
        recent=1,
        dtype=BF16,
    ),
    # chunk keys from the step, their blocks null; W=1 and a chunk longer than a tile
    "step-f32-D64-bs16-H2-G7-S5-W1": dict(
        seq_lens=[333, 200, 64],
        query_lens=[129, 1, 64],
        H=2,
        G=7,
        D=64,
        bs=16,
        sink=5,
        recent=1,
        dtype=F32,
        step_kv=True,
    ),
    "step-f16-heads_major-D128-bs32-H2-G3-S9-W40": dict(
        seq_lens=[333, 90, 41],
        query_lens=[200, 1, 41],
        H=2,
        G=3,
        D=128,
        bs=32,
        sink=9,
        recent=40,
        dtype=F16,
        step_kv=True,
        layout="heads_major",
    ),
    "step-fp8-bf16-D64-bs16-H2-G4-S7-W23": dict(
        seq_lens=[150, 60],
        query_lens=[50, 1],
        H=2,
        G=4,
        D=64,
        bs=16,
        sink=7,
        recent=23,
        dtype=BF16,
        kv="fp8",
        scales=(0.5, 2.0),
        step_kv=True,
    ),
    # window longer than the sequence; MHA tiles of 64 queries
    "f32-G1-S3-W400-strided_q": dict(
        seq_lens=[9, 300],
        query_lens=[9, 130],
        H=1,
        G=1,
        D=64,
        bs=32,
        sink=3,
        recent=400,
        dtype=F32,
        strided_query=True,
    ),
}


def _random_cases(count: int, seed: int = 7) -> dict[str, tuple[str, dict]]:
    """Small seeded random shapes (hypothesis-style, but fixed: the worker is one process)."""
    rng = random.Random(seed)
    cases = {}
    for i in range(count):
        kind = ("decode", "prefill")[i % 2]
        seq = [rng.randint(1, 90) for _ in range(rng.randint(1, 4))]
        spec = dict(
            seq_lens=seq,
            H=rng.randint(1, 3),
            G=rng.randint(1, 8),
            D=rng.choice([64, 128]),
            bs=rng.choice([16, 32]),
            sink=rng.randint(0, 9),
            recent=rng.randint(1, 23),
            dtype=rng.choice([F32, F16, BF16]),
            seed=100 + i,
        )
        if kind == "decode":
            spec["num_splits"] = rng.choice([0, 1, 2, 3])
        else:
            spec["query_lens"] = [rng.randint(1, n) for n in seq]
            spec["step_kv"] = rng.random() < 0.5
        cases[f"{kind}-random{i}"] = (kind, spec)
    return cases


CASES = {f"decode-{k}": ("decode", v) for k, v in DECODE_CASES.items()}
CASES.update({f"prefill-{k}": ("prefill", v) for k, v in PREFILL_CASES.items()})
CASES.update(_random_cases(10))


def run_case(case_id: str, device: str = "cpu") -> None:
    kind, spec = CASES[case_id]
    (run_decode if kind == "decode" else run_prefill)(spec, device)


# ---------------------------------------------------------------- CPU (interpreter)


def _worker(out_path: str, case_ids: list[str]) -> int:
    """Runs cases in this (interpreter-mode) process, one JSON line per start and result.

    The start line lets the parent name the case if a wild read kills the process.
    """
    with open(out_path, "a") as log:
        if not (tsw.is_available() and tsw._interpreted()):
            log.write(json.dumps({"fatal": "TRITON_INTERPRET=1 not in effect"}) + "\n")
            return 1
        for case_id in case_ids:
            log.write(json.dumps({"start": case_id}) + "\n")
            log.flush()
            start = time.perf_counter()
            try:
                run_case(case_id)
                error = None
            except Exception:
                error = traceback.format_exc(limit=6)
            seconds = round(time.perf_counter() - start, 2)
            log.write(json.dumps({"case": case_id, "error": error, "seconds": seconds}) + "\n")
            log.flush()
    return 0


@pytest.fixture(scope="module")
def interpreted(request):
    """Results of the selected interpreted cases, from a worker subprocess.

    A case that kills the worker (a read through a wild block id) is recorded as failed
    and a fresh worker runs the cases after it.
    """
    todo = sorted(
        {
            item.callspec.params["case_id"]
            for item in request.session.items
            if getattr(item, "originalname", None) == "test_interpreted_matches_reference"
        }
    )
    results: dict[str, dict] = {}
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in range(len(todo) + 1):
            if not todo:
                break
            log = Path(tmp) / f"worker{attempt}.jsonl"
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", str(log), *todo],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=WORKER_TIMEOUT_S,
            )
            lines = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
            started = None
            for entry in lines:
                if "fatal" in entry:
                    pytest.fail(f"interpreter worker: {entry['fatal']}")
                if "start" in entry:
                    started = entry["start"]
                else:
                    results[entry["case"]] = entry
                    started = None
            if proc.returncode != 0:
                if started is None:
                    pytest.fail(f"interpreter worker failed (rc={proc.returncode}):\n"
                                f"{proc.stderr[-4000:]}")  # fmt: skip
                results[started] = dict(
                    error=f"the worker died (rc={proc.returncode}) in this case: a read "
                    f"outside the cache (wild block id?)\n{proc.stderr[-2000:]}",
                )
            todo = [c for c in todo if c not in results]
    return results


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_interpreted_matches_reference(case_id, interpreted):
    result = interpreted[case_id]
    assert result["error"] is None, result["error"]


def test_cpu_tensors_without_interpreter_are_refused():
    c = build_case([5], [1], H=1, G=1, D=16, bs=16, sink=1, recent=2, dtype=F32)
    args = (c["query"], c["key_cache"], c["value_cache"], c["block_table"], c["seq_lens"])
    if tsw.is_available() and tsw._interpreted():
        pytest.skip("this process imported Triton in interpreter mode")
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1|Triton is not installed"):
        tsw.sink_window_decode_triton(*args, **c["kwargs"])


def test_imports_without_triton_and_without_vllm():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from vllm_duo.kernels import triton_sink_window as t\n"
        "assert 'vllm' not in sys.modules\n"
        "assert not t.is_available() and 'Triton is not installed' in t.load_error()\n"
        "q = torch.zeros(1, 1, 16); c = torch.zeros(2, 16, 1, 16)\n"
        "b = torch.zeros(1, 1, dtype=torch.int32); n = torch.ones(1, dtype=torch.int32)\n"
        "try:\n"
        "    t.sink_window_decode_triton(q, c, c, b, n, sink=0, recent=1, scale=1.0)\n"
        "except RuntimeError as e:\n"
        "    assert 'Triton is not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error without triton')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# ---------------------------------------------------------------- compile for sm_90 (no GPU)

_TRITON_TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.int32: "i32",
    torch.uint8: "u8",
}

# (kernel API, query dtype, cache dtype, D, block size, G, H, sink, recent, splits / new K/V)
COMPILE_CASES = {
    "decode-bf16-split": ("decode", BF16, BF16, 128, 16, 4, 8, 64, 256, 4),
    "decode-f16-fp8-nosplit": ("decode", F16, torch.uint8, 64, 32, 7, 2, 5, 37, 1),
    "decode-f32-G1": ("decode", F32, F32, 128, 16, 1, 4, 0, 1, 1),
    "prefill-bf16-new-1req": ("prefill", BF16, BF16, 128, 16, 4, 8, 64, 256, True),
    "prefill-f16-fp8-S1-W1": ("prefill", F16, torch.uint8, 64, 32, 7, 2, 1, 1, False),
    "prefill-f32-G1-new": ("prefill", F32, F32, 64, 16, 1, 2, 4, 30, True),
}


def _record_launches(monkeypatch, case) -> list:
    """Calls the public API on CPU tensors with launches recorded instead of run."""
    kind, q_dtype, kv_dtype, D, bs, G, H, sink, recent, extra = case
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((self.name, grid, args, kw))

    fake = {name: Recorder(name) for name in ("decode", "merge", "prefill")}
    monkeypatch.setattr(tsw, "_get_kernels", lambda device: (fake, False))
    R = 1 if kind == "prefill" and extra else 3
    query = torch.zeros(R * 5, H * G, D, dtype=q_dtype)
    cache = torch.zeros(9, bs, H, D, dtype=kv_dtype)
    table = torch.zeros(R, 6, dtype=torch.int32)
    lens = torch.full((R,), 40, dtype=torch.int32)
    scales = dict(k_scale=0.5, v_scale=0.25) if kv_dtype == torch.uint8 else {}
    common = dict(sink=sink, recent=recent, scale=D**-0.5, **scales)
    if kind == "decode":
        tsw.sink_window_decode_triton(
            query[:R], cache, cache, table, lens, num_splits=extra, **common
        )
    else:
        qsl = torch.arange(R + 1, dtype=torch.int32) * 5
        new = torch.zeros(R * 5, H, D, dtype=q_dtype) if extra else None
        tsw.sink_window_prefill_triton(
            query, cache, cache, table, qsl, lens, new_keys=new, new_values=new, **common
        )
    return launches


def _signature(fn, args, kwargs):
    """Triton's launch-time view of the arguments: ints equal to 1 become constexprs."""
    signature, constexprs = {}, {}
    for param, value in zip(fn.params, [*args, *(kwargs[n] for n in fn.arg_names[len(args) :])]):
        name = param.name
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif param.annotation_type:
            signature[name] = param.annotation_type
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
    return signature, constexprs


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("name", sorted(COMPILE_CASES))
def test_kernels_compile_for_sm90(name, monkeypatch):
    """Triton's full NVIDIA pipeline (TTIR -> PTX -> cubin with ptxas), no GPU needed."""
    launches = _record_launches(monkeypatch, COMPILE_CASES[name])
    monkeypatch.undo()
    if not tsw.is_available() or tsw._interpreted():
        pytest.skip("needs Triton imported in compiled mode")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # pragma: no cover - Triton internals moved
        pytest.skip(f"this Triton has no ASTSource/GPUTarget: {exc}")
    assert launches
    for kernel, _grid, args, kwargs in launches:
        fn = tsw.triton.jit(getattr(tsw, f"_{kernel}_kernel"))
        kwargs = dict(kwargs)
        options = {"num_warps": kwargs.pop("num_warps")}
        signature, constexprs = _signature(fn, args, kwargs)
        compiled = tsw.triton.compile(
            ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=options
        )
        assert compiled.asm.get("cubin"), f"{kernel}: no cubin"


# ---------------------------------------------------------------- input rules


def _valid(**over):
    """A valid decode call's arguments on CPU, with ``over`` replacing some."""
    args = dict(
        query=torch.zeros(2, 6, 64, dtype=F16),
        key_cache=torch.zeros(5, 16, 2, 64, dtype=F16),
        value_cache=torch.zeros(5, 16, 2, 64, dtype=F16),
        block_table=torch.zeros(2, 4, dtype=torch.int32),
        seq_lens=torch.ones(2, dtype=torch.int32),
        sink=4,
        recent=16,
        scale=0.125,
    )
    args.update(over)
    return args


def _decode(args):
    a = dict(args)
    return tsw.sink_window_decode_triton(
        a.pop("query"), a.pop("key_cache"), a.pop("value_cache"), a.pop("block_table"),
        a.pop("seq_lens"), **a,
    )  # fmt: skip


BAD_DECODE = {
    "query-dims": (dict(query=torch.zeros(2, 6, 64, 1, dtype=F16)), ValueError, "query: expected"),
    "query-dtype": (dict(query=torch.zeros(2, 6, 64, dtype=torch.int32)), TypeError, "query: dt"),
    "query-type": (dict(query=[1.0]), TypeError, "query: expected a torch.Tensor"),
    "cache-shapes": (
        dict(value_cache=torch.zeros(5, 16, 2, 32, dtype=F16)), ValueError, "shapes must match"),
    "cache-dtypes": (
        dict(value_cache=torch.zeros(5, 16, 2, 64, dtype=F32)), TypeError, "dtypes must match"),
    "cache-vs-query-dtype": (
        dict(key_cache=torch.zeros(5, 16, 2, 64, dtype=BF16),
             value_cache=torch.zeros(5, 16, 2, 64, dtype=BF16)), TypeError, "cache dtype"),
    "head-size": (
        dict(key_cache=torch.zeros(5, 16, 2, 32, dtype=F16),
             value_cache=torch.zeros(5, 16, 2, 32, dtype=F16)), ValueError, "head_size"),
    "head-size-range": (
        dict(query=torch.zeros(2, 6, 512, dtype=F16),
             key_cache=torch.zeros(5, 16, 2, 512, dtype=F16),
             value_cache=torch.zeros(5, 16, 2, 512, dtype=F16)), ValueError, "head_size: must be"),
    "kv-heads-divide": (
        dict(key_cache=torch.zeros(5, 16, 4, 64, dtype=F16),
             value_cache=torch.zeros(5, 16, 4, 64, dtype=F16)), ValueError, "num_kv_heads"),
    "block-size": (
        dict(key_cache=torch.zeros(5, 0, 2, 64, dtype=F16),
             value_cache=torch.zeros(5, 0, 2, 64, dtype=F16)), ValueError, "block_size"),
    "table-dtype": (
        dict(block_table=torch.zeros(2, 4, dtype=torch.int64)), TypeError, "block_table: dtype"),
    "table-rows": (
        dict(block_table=torch.zeros(3, 4, dtype=torch.int32)), ValueError, "block_table: shape"),
    "lens-dtype": (dict(seq_lens=torch.ones(2, dtype=torch.int64)), TypeError, "seq_lens: dtype"),
    "lens-shape": (dict(seq_lens=torch.ones(3, dtype=torch.int32)), ValueError, "seq_lens: shape"),
    "sink-negative": (dict(sink=-1), ValueError, "sink: must be >= 0"),
    "sink-type": (dict(sink=2.0), TypeError, "sink: expected an int"),
    "recent-zero": (dict(recent=0), ValueError, "recent: must be >= 1"),
    "scale-nan": (dict(scale=float("nan")), ValueError, "scale: must be a finite"),
    "k-scale-negative": (
        dict(key_cache=torch.zeros(5, 16, 2, 64, dtype=torch.uint8),
             value_cache=torch.zeros(5, 16, 2, 64, dtype=torch.uint8), k_scale=-1.0),
        ValueError, "k_scale: must be a positive"),
    "v-scale-without-fp8": (dict(v_scale=0.5), ValueError, "v_scale: dequant scales apply to fp8"),
    "splits-negative": (dict(num_splits=-1), ValueError, "num_splits: must be >= 0"),
    "out-shape": (dict(out=torch.zeros(2, 6, 32, dtype=F16)), ValueError, "out: must match"),
    "out-overlap": (
        dict(out=torch.zeros(1, 6, 64, dtype=F16).expand(2, 6, 64)), ValueError, "out: strides"),
    "device": (dict(query=torch.zeros(2, 6, 64, dtype=F16, device="meta")), ValueError, "device"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BAD_DECODE))
def test_decode_rejects_bad_input_naming_the_rule(name):
    over, exc, message = BAD_DECODE[name]
    with pytest.raises(exc, match=message):
        _decode(_valid(**over))


def _prefill(**over):
    args = dict(
        query=torch.zeros(5, 6, 64, dtype=F16),
        key_cache=torch.zeros(5, 16, 2, 64, dtype=F16),
        value_cache=torch.zeros(5, 16, 2, 64, dtype=F16),
        block_table=torch.zeros(2, 4, dtype=torch.int32),
        query_start_loc=torch.tensor([0, 4, 5], dtype=torch.int32),
        seq_lens=torch.tensor([4, 9], dtype=torch.int32),
        sink=4,
        recent=16,
        scale=0.125,
    )
    args.update(over)
    a = args
    return tsw.sink_window_prefill_triton(
        a.pop("query"), a.pop("key_cache"), a.pop("value_cache"), a.pop("block_table"),
        a.pop("query_start_loc"), a.pop("seq_lens"), **a,
    )  # fmt: skip


BAD_PREFILL = {
    "qsl-shape": (dict(query_start_loc=torch.tensor([0, 5], dtype=torch.int32)), ValueError,
                  "query_start_loc: shape"),
    "qsl-dtype": (dict(query_start_loc=torch.tensor([0, 4, 5])), TypeError,
                  "query_start_loc: dtype"),
    "new-keys-alone": (dict(new_keys=torch.zeros(5, 2, 64, dtype=F16)), ValueError,
                       "give both or neither"),
    "new-keys-shape": (dict(new_keys=torch.zeros(5, 3, 64, dtype=F16),
                            new_values=torch.zeros(5, 3, 64, dtype=F16)), ValueError,
                       "new_keys: shape"),
    "new-values-dtype": (dict(new_keys=torch.zeros(5, 2, 64, dtype=F16),
                              new_values=torch.zeros(5, 2, 64, dtype=F32)), TypeError,
                         "new_values: dtype"),
    "recent-zero": (dict(recent=0), ValueError, "recent: must be >= 1"),
    "table-rows": (dict(block_table=torch.zeros(1, 4, dtype=torch.int32)), ValueError,
                   "block_table: shape"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BAD_PREFILL))
def test_prefill_rejects_bad_input_naming_the_rule(name):
    over, exc, message = BAD_PREFILL[name]
    with pytest.raises(exc, match=message):
        _prefill(**over)


# ---------------------------------------------------------------- GPU (compiled)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("case_id", sorted(CASES))
def test_gpu_matches_reference(case_id):
    run_case(case_id, device="cuda")


@gpu
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_gpu_long_contexts_auto_splits(dtype):
    """Few requests and long contexts: the automatic split-K path and its merge."""
    run_decode(
        dict(
            seq_lens=[5001, 64, 321, 8000], H=2, G=4, D=128, bs=16, sink=64, recent=256, dtype=dtype
        ),
        device="cuda",
    )
    run_prefill(
        dict(
            seq_lens=[3000, 700],
            query_lens=[1000, 1],
            H=2,
            G=4,
            D=128,
            bs=16,
            sink=64,
            recent=256,
            dtype=dtype,
            step_kv=True,
        ),
        device="cuda",
    )


@gpu
def test_gpu_decode_in_a_cuda_graph():
    c = build_case([5, 200, 1000], [1, 1, 1], H=2, G=4, D=128, bs=16, sink=16, recent=64,
                   dtype=BF16, device="cuda")  # fmt: skip
    args = (c["query"], c["key_cache"], c["value_cache"], c["block_table"], c["seq_lens"])
    for splits in (1, 4):
        out = torch.empty_like(c["query"])
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):  # compile and warm up off the capture
            tsw.sink_window_decode_triton(*args, **c["kwargs"], out=out, num_splits=splits)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            tsw.sink_window_decode_triton(*args, **c["kwargs"], out=out, num_splits=splits)
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        _compare(out, c)


def _cuda_ops_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    from vllm_duo import cuda_ops

    return cuda_ops.is_available()


@gpu
@pytest.mark.skipif(not _cuda_ops_ready(), reason="needs the built CUDA extension vllm_duo._C")
@pytest.mark.parametrize("kv", ["same", "fp8_u8"])
def test_gpu_agrees_with_the_cuda_kernel(kv):
    from vllm_duo import cuda_ops

    c = build_case([3, 150, 151, 2049], [1] * 4, H=1, G=7, D=128, bs=16, sink=20, recent=100,
                   dtype=F16, kv=kv, layout="csrc", scales=(0.5, 0.25) if kv != "same" else
                   (1.0, 1.0), device="cuda")  # fmt: skip
    rows = c["rows"]  # csrc/'s view [num_blocks, 2 * block_size, head_size] of the same bytes
    scales = dict(k_scale=c["scales"].get("k_scale", 1.0), v_scale=c["scales"].get("v_scale", 1.0))
    want = cuda_ops.sink_window_decode(
        c["query"], rows, c["block_table"], c["seq_lens"], **c["kwargs"], **scales
    )
    got = tsw.sink_window_decode_triton(
        c["query"], c["key_cache"], c["value_cache"], c["block_table"], c["seq_lens"],
        **c["kwargs"], **c["scales"],
    )  # fmt: skip
    torch.testing.assert_close(got, want, atol=3e-3, rtol=3e-3)
    _compare(got, c)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--worker":
    sys.exit(_worker(sys.argv[2], sys.argv[3:]))
