"""Benchmark of the CUDA sink+window decode kernel (csrc/) on one GPU.

Needs torch with CUDA and the built extension (``python -m vllm_duo._build_cuda``);
no vLLM. Run by benchmarks/gpu_check.sh, or alone::

    python benchmarks/bench_decode_kernel.py [--quick] [--json FILE]

What it measures (median over repeated CUDA-graph replays, L2 kept cold by cycling
through enough copies of the inputs that they do not fit in L2):
  1. copy bandwidth (device-to-device, bytes read + written): the ceiling;
  2. streaming decode of one layer's streaming heads (H KV heads x G query heads,
     S=64, W=256) at contexts 8K..128K and batch 1..32, against reading the WHOLE
     context: torch SDPA on contiguous K/V (flash) and the ideal time of its bytes at
     copy bandwidth;
  3. the kernel's own bandwidth on large windows (S+W in the thousands), per group
     size and KV dtype, where it should approach the copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vllm_duo import cuda_ops  # after the path tweak; never imports vllm

COLD_BYTES = 256 << 20  # working set per measurement: several times the 50-60 MB L2
MAX_COPIES = 64


def timed(calls, *, reps: int = 15, use_graph: bool = True) -> float:
    """Median microseconds of one call, each call on its own inputs (``calls`` is a list)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:  # warm-up, also outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    if use_graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in calls:
                fn()
        run = graph.replay
    else:

        def run():
            for fn in calls:
                fn()

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0 / len(calls))
    return statistics.median(samples)


def copies_for(bytes_per_call: int) -> int:
    return max(1, min(MAX_COPIES, math.ceil(COLD_BYTES / max(bytes_per_call, 1))))


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    n = 2 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    src.random_(0, 255)
    us = timed([lambda: dst.copy_(src)], reps=10, use_graph=False)
    return 2 * n / (us * 1e-6) / 1e9


def streaming_inputs(batch, *, H, G, D, bs, sink, recent, seq_len, dtype, kv):
    """Per-head caches holding only the sink and window blocks, like the bounded cache."""
    n_sink = math.ceil(sink / bs) if sink else 0
    first_win = max(seq_len - recent, 0) // bs
    cols = sorted(
        set(range(min(n_sink, math.ceil(seq_len / bs))))
        | set(range(first_win, math.ceil(seq_len / bs)))
    )
    max_blocks = math.ceil(seq_len / bs)
    num_blocks = 1 + batch * len(cols)
    table = torch.zeros(batch, max_blocks, dtype=torch.int32)
    ids = torch.randperm(num_blocks - 1) + 1
    for r in range(batch):
        table[r, cols] = ids[r * len(cols) : (r + 1) * len(cols)].int()
    cache_dtype = torch.uint8 if kv == "fp8" else dtype
    caches = []
    for _ in range(H):
        c = torch.empty(num_blocks, 1, bs, 2 * D, dtype=cache_dtype, device="cuda")
        if kv == "fp8":
            c.copy_(torch.randn(c.shape, device="cuda").to(torch.float8_e4m3fn).view(torch.uint8))
        else:
            c.normal_()
        caches.append(c)
    query = torch.randn(batch, H * G, D, dtype=dtype, device="cuda")
    lens = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    out = torch.empty_like(query)
    read = batch * H * min(seq_len, sink + recent) * 2 * D * (1 if kv == "fp8" else 2)
    return dict(
        query=query,
        caches=caches,
        table=table.cuda(),
        lens=lens,
        out=out,
        bytes=read,
        k_scale=1.0,
        v_scale=1.0,
    )


def time_streaming(
    batch, *, H, G, D=128, bs=16, sink=64, recent=256, seq_len, dtype, kv="same", num_splits=0
):
    per_call = batch * H * min(seq_len, sink + recent) * 2 * D * (1 if kv == "fp8" else 2)
    n = copies_for(per_call)
    sets = [
        streaming_inputs(
            batch,
            H=H,
            G=G,
            D=D,
            bs=bs,
            sink=sink,
            recent=recent,
            seq_len=seq_len,
            dtype=dtype,
            kv=kv,
        )
        for _ in range(n)
    ]

    def call(s):
        return lambda: torch.ops.vllm_duo.sink_window_decode_heads(
            s["query"],
            s["caches"],
            s["table"],
            s["lens"],
            sink,
            recent,
            D**-0.5,
            s["k_scale"],
            s["v_scale"],
            s["out"],
            num_splits,
        )

    us = timed([call(s) for s in sets])
    return us, sets[0]["bytes"]


def time_full_sdpa(batch, *, H, G, D=128, seq_len, dtype):
    """Whole-context decode on contiguous K/V (flash SDPA): the full-attention cost."""
    per_call = batch * H * seq_len * 2 * D * 2
    n = copies_for(per_call)
    sets = []
    for _ in range(n):
        k = torch.empty(batch, H, seq_len, D, dtype=dtype, device="cuda").normal_()
        v = torch.empty_like(k).normal_()
        q = torch.randn(batch, H, G, D, dtype=dtype, device="cuda")  # G queries per KV head
        sets.append((q, k, v))
    us = timed([lambda s=s: F.scaled_dot_product_attention(*s) for s in sets])
    del sets
    return us, per_call


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode_kernel: no CUDA GPU", file=sys.stderr)
        return 2
    if not cuda_ops.is_available():
        print(f"bench_decode_kernel: {cuda_ops.load_error()}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth()
    print(
        f"device: {name}; torch {torch.__version__}; copy bandwidth {copy_bw:.0f} GB/s "
        "(read + write)",
        flush=True,
    )
    rows = []

    # 2. One layer's streaming heads vs reading the whole context.
    H, G = 8, 4  # e.g. Llama-3-8B: 8 KV heads, 4 query heads each
    contexts = [8192, 32768] if args.quick else [8192, 32768, 131072]
    batches = [1, 32] if args.quick else [1, 4, 16, 32]
    print(
        f"\n== decode of one layer, H={H} KV heads x G={G}, D=128, bf16, S=64, W=256 ==", flush=True
    )
    for ctx in contexts:
        for batch in batches:
            s_us, s_bytes = time_streaming(batch, H=H, G=G, seq_len=ctx, dtype=dtype)
            one_us, _ = time_streaming(batch, H=1, G=G, seq_len=ctx, dtype=dtype)
            f_us, f_bytes = time_full_sdpa(batch, H=H, G=G, seq_len=ctx, dtype=dtype)
            ideal_us = f_bytes / (copy_bw / 2 * 1e9) * 1e6  # read-only bytes at copy speed
            row = dict(
                kind="layer",
                ctx=ctx,
                batch=batch,
                stream_us=s_us,
                stream_1head_us=one_us,
                stream_gbs=s_bytes / (s_us * 1e-6) / 1e9,
                full_sdpa_us=f_us,
                full_ideal_us=ideal_us,
                full_sdpa_gbs=f_bytes / (f_us * 1e-6) / 1e9,
            )
            rows.append(row)
            print(
                f"ctx={ctx:>6} batch={batch:>2}: streaming {s_us:8.1f} us "
                f"({row['stream_gbs']:6.0f} GB/s), 1 head {one_us:6.1f} us | full SDPA "
                f"{f_us:9.1f} us ({row['full_sdpa_gbs']:5.0f} GB/s), ideal {ideal_us:9.1f} us "
                f"| speed-up {f_us / s_us:6.1f}x vs SDPA, {ideal_us / s_us:6.1f}x vs ideal",
                flush=True,
            )
            torch.cuda.empty_cache()

    # 3. The kernel's own bandwidth: long windows, batch 32, all group tiles, fp8 too.
    print("\n== kernel bandwidth: batch 32, H=8, S=64, large W ==", flush=True)
    windows = [4096] if args.quick else [4096, 16384]
    for W in windows:
        for G_ in (1, 4, 8):
            for kv in ("same", "fp8"):
                for splits in (0, 1):
                    us, nbytes = time_streaming(
                        32,
                        H=8,
                        G=G_,
                        recent=W,
                        seq_len=W + 1000,
                        dtype=dtype,
                        kv=kv,
                        num_splits=splits,
                    )
                    gbs = nbytes / (us * 1e-6) / 1e9
                    row = dict(
                        kind="bandwidth",
                        W=W,
                        G=G_,
                        kv=kv,
                        num_splits=splits,
                        us=us,
                        gbs=gbs,
                        frac=gbs / (copy_bw / 2),
                    )
                    rows.append(row)
                    print(
                        f"W={W:>5} G={G_} kv={kv:>4} splits={'auto' if splits == 0 else 1:>4}: "
                        f"{us:8.1f} us {gbs:6.0f} GB/s = {row['frac']:.0%} of copy read "
                        "bandwidth",
                        flush=True,
                    )
                    torch.cuda.empty_cache()

    print(f"\n== summary ({name}, copy {copy_bw:.0f} GB/s r+w) ==")
    print("ctx     batch  stream_us  1head_us  stream_GB/s  fullSDPA_us  ideal_us  x_SDPA  x_ideal")
    for r in rows:
        if r["kind"] == "layer":
            print(
                f"{r['ctx']:<7} {r['batch']:>5} {r['stream_us']:>10.1f} "
                f"{r['stream_1head_us']:>9.1f} {r['stream_gbs']:>12.0f} "
                f"{r['full_sdpa_us']:>12.1f} {r['full_ideal_us']:>9.1f} "
                f"{r['full_sdpa_us'] / r['stream_us']:>7.1f} "
                f"{r['full_ideal_us'] / r['stream_us']:>8.1f}"
            )
    print("W      G  kv    splits     us    GB/s  of_copy_read")
    for r in rows:
        if r["kind"] == "bandwidth":
            splits = "auto" if r["num_splits"] == 0 else "1"
            print(
                f"{r['W']:<6} {r['G']:>1} {r['kv']:>4} {splits:>7}"
                f" {r['us']:>8.1f} {r['gbs']:>7.0f} {r['frac']:>8.0%}"
            )
    if args.json:
        args.json.write_text(json.dumps(dict(device=name, copy_gbs=copy_bw, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
