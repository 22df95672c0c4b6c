"""Benchmark of the Triton sink+window kernels (vllm_duo/kernels/triton_sink_window.py).

Needs torch with CUDA and Triton; the CUDA extension (csrc/) is optional. No vLLM. Run by
benchmarks/gpu_check.sh, or alone::

    python benchmarks/bench_triton_kernels.py [--quick] [--json FILE]

Same method as bench_decode_kernel.py (its ``timed``: median of CUDA-graph replays over
enough input copies to keep L2 cold). One layer: H=8 KV heads x G=4 query heads, D=128,
bf16, block 16, S=64, W=256.
  1. decode at 8K..128K contexts: Triton streaming vs the CUDA streaming kernel (same
     caches, csrc/'s per-head layout) vs FULL paged attention (the same Triton kernel with
     S >= context over a vLLM-layout cache holding every block) vs torch SDPA on
     contiguous K/V;
  2. prefill of one prompt of 8K..128K tokens: Triton streaming (keys from the step, as
     in the bounded cache) vs full causal attention (torch SDPA, flash).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode_kernel import copies_for, timed  # same timing method as the CUDA bench

from vllm_duo import cuda_ops
from vllm_duo.kernels import triton_sink_window as tsw

H, G, D, BS, SINK, RECENT = 8, 4, 128, 16, 64, 256
DTYPE = torch.bfloat16
FULL_PAGED_MAX_BYTES = 24 << 30  # skip full paged decode beyond this much KV


def streaming_set(batch: int, ctx: int) -> dict:
    """Bounded caches (sink + window blocks only) in csrc/'s per-head rows layout.

    One allocation [H, num_blocks, 2 * BS, D] (keys then values per block) serves both
    kernels: the CUDA op takes the H per-head views, Triton strided [nb, BS, H, D] views.
    """
    n_blocks = math.ceil(ctx / BS)
    cols = sorted(set(range(math.ceil(SINK / BS))) | set(range((ctx - RECENT) // BS, n_blocks)))
    num_blocks = 1 + batch * len(cols)
    table = torch.zeros(batch, n_blocks, dtype=torch.int32)
    ids = torch.randperm(num_blocks - 1) + 1
    for r in range(batch):
        table[r, cols] = ids[r * len(cols) : (r + 1) * len(cols)].int()
    big = torch.empty(H, num_blocks, 2 * BS, D, dtype=DTYPE, device="cuda").normal_()
    return dict(
        query=torch.randn(batch, H * G, D, dtype=DTYPE, device="cuda"),
        heads=[big[h] for h in range(H)],
        keys=big[:, :, :BS].permute(1, 2, 0, 3),
        values=big[:, :, BS:].permute(1, 2, 0, 3),
        table=table.cuda(),
        lens=torch.full((batch,), ctx, dtype=torch.int32, device="cuda"),
        out=torch.empty(batch, H * G, D, dtype=DTYPE, device="cuda"),
    )


def full_paged_set(batch: int, ctx: int) -> dict:
    """A vLLM-layout cache [nb, BS, H, D] holding every block of every request."""
    n_blocks = math.ceil(ctx / BS)
    num_blocks = 1 + batch * n_blocks
    table = (torch.randperm(num_blocks - 1)[: batch * n_blocks] + 1).int().view(batch, n_blocks)
    shape = (num_blocks, BS, H, D)
    return dict(
        query=torch.randn(batch, H * G, D, dtype=DTYPE, device="cuda"),
        keys=torch.empty(shape, dtype=DTYPE, device="cuda").normal_(),
        values=torch.empty(shape, dtype=DTYPE, device="cuda").normal_(),
        table=table.cuda(),
        lens=torch.full((batch,), ctx, dtype=torch.int32, device="cuda"),
        out=torch.empty(batch, H * G, D, dtype=DTYPE, device="cuda"),
    )


def bench_decode(batch: int, ctx: int) -> dict:
    scale = D**-0.5
    row: dict = dict(kind="decode", ctx=ctx, batch=batch)
    stream_bytes = batch * H * min(ctx, SINK + RECENT) * 2 * D * 2
    sets = [streaming_set(batch, ctx) for _ in range(copies_for(stream_bytes))]

    def triton_call(s, sink=SINK, recent=RECENT):
        return lambda: tsw.sink_window_decode_triton(
            s["query"], s["keys"], s["values"], s["table"], s["lens"],
            sink=sink, recent=recent, scale=scale, out=s["out"],
        )  # fmt: skip

    row["triton_us"] = timed([triton_call(s) for s in sets])
    row["triton_gbs"] = stream_bytes / (row["triton_us"] * 1e-6) / 1e9
    if cuda_ops.is_available():

        def cuda_call(s):
            return lambda: torch.ops.vllm_duo.sink_window_decode_heads(
                s["query"], s["heads"], s["table"], s["lens"], SINK, RECENT, scale, 1.0, 1.0,
                s["out"], 0,
            )  # fmt: skip

        row["cuda_us"] = timed([cuda_call(s) for s in sets])
    del sets

    full_bytes = batch * H * ctx * 2 * D * 2
    if full_bytes <= FULL_PAGED_MAX_BYTES:
        full = [full_paged_set(batch, ctx) for _ in range(copies_for(full_bytes))]
        # sink >= ctx: every position is a "sink", i.e. plain causal decode over all blocks.
        row["full_paged_us"] = timed([triton_call(s, sink=ctx, recent=1) for s in full])
        row["full_paged_gbs"] = full_bytes / (row["full_paged_us"] * 1e-6) / 1e9
        del full
        dense = []
        for _ in range(copies_for(full_bytes)):
            k = torch.empty(batch, H, ctx, D, dtype=DTYPE, device="cuda").normal_()
            q = torch.randn(batch, H, G, D, dtype=DTYPE, device="cuda")
            dense.append((q, k, torch.empty_like(k).normal_()))
        row["full_sdpa_us"] = timed([lambda s=s: F.scaled_dot_product_attention(*s) for s in dense])
        del dense
    torch.cuda.empty_cache()
    return row


def bench_prefill(length: int) -> dict:
    scale = D**-0.5
    row: dict = dict(kind="prefill", ctx=length)
    query = torch.randn(length, H * G, D, dtype=DTYPE, device="cuda")
    new_k = torch.randn(length, H, D, dtype=DTYPE, device="cuda")
    new_v = torch.randn(length, H, D, dtype=DTYPE, device="cuda")
    # A fresh prompt: every key comes from the step, the cache holds only the null block.
    cache = torch.zeros(1, BS, H, D, dtype=DTYPE, device="cuda")
    table = torch.zeros(1, math.ceil(length / BS), dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0, length], dtype=torch.int32, device="cuda")
    lens = torch.tensor([length], dtype=torch.int32, device="cuda")
    out = torch.empty_like(query)
    row["triton_us"] = timed(
        [
            lambda: tsw.sink_window_prefill_triton(
                query,
                cache,
                cache,
                table,
                qsl,
                lens,
                sink=SINK,
                recent=RECENT,
                scale=scale,
                new_keys=new_k,
                new_values=new_v,
                out=out,
            )
        ],
        reps=5,
        use_graph=False,
    )
    # Full causal attention, K/V repeated per query head outside the timing (flash SDPA).
    dense = [
        t.view(1, length, H * G, D).transpose(1, 2).contiguous()
        for t in (query, new_k.repeat_interleave(G, dim=1), new_v.repeat_interleave(G, dim=1))
    ]
    row["full_sdpa_us"] = timed(
        [lambda: F.scaled_dot_product_attention(*dense, is_causal=True)], reps=5, use_graph=False
    )
    dense.clear()
    torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_triton_kernels: no CUDA GPU", file=sys.stderr)
        return 2
    if not tsw.is_available():
        print(f"bench_triton_kernels: {tsw.load_error()}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    import triton

    print(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}; CUDA "
          f"kernel {'built' if cuda_ops.is_available() else 'absent'}", flush=True)  # fmt: skip
    contexts = [8192, 131072] if args.quick else [8192, 32768, 131072]
    batches = [1, 32] if args.quick else [1, 8, 32]
    rows = []
    print(f"\n== decode, one layer: H={H} x G={G}, D={D}, bf16, S={SINK}, W={RECENT} ==")
    for ctx in contexts:
        for batch in batches:
            r = bench_decode(batch, ctx)
            rows.append(r)
            print(
                f"ctx={ctx:>6} batch={batch:>2}: triton {r['triton_us']:8.1f} us "
                f"({r['triton_gbs']:5.0f} GB/s) | cuda {r.get('cuda_us', float('nan')):8.1f} us"
                f" | full paged {r.get('full_paged_us', float('nan')):9.1f} us | full SDPA "
                f"{r.get('full_sdpa_us', float('nan')):9.1f} us",
                flush=True,
            )
    print(f"\n== prefill of one prompt: H={H} x G={G}, D={D}, bf16, S={SINK}, W={RECENT} ==")
    for length in contexts:
        r = bench_prefill(length)
        rows.append(r)
        print(
            f"len={length:>6}: triton streaming {r['triton_us'] / 1e3:9.2f} ms | full causal "
            f"SDPA {r['full_sdpa_us'] / 1e3:9.2f} ms | {r['full_sdpa_us'] / r['triton_us']:6.1f}x",
            flush=True,
        )

    print(f"\n== summary ({name}) ==")
    print("decode  ctx     batch  triton_us  cuda_us  full_paged_us  full_sdpa_us  x_paged  x_cuda")
    for r in rows:
        if r["kind"] == "decode":
            paged = r.get("full_paged_us", float("nan"))
            cuda = r.get("cuda_us", float("nan"))
            print(
                f"        {r['ctx']:<7} {r['batch']:>5} {r['triton_us']:>10.1f} {cuda:>8.1f} "
                f"{paged:>14.1f} {r.get('full_sdpa_us', float('nan')):>13.1f} "
                f"{paged / r['triton_us']:>8.1f} {cuda / r['triton_us']:>7.2f}"
            )
    print("prefill len     triton_ms  full_sdpa_ms  speed-up")
    for r in rows:
        if r["kind"] == "prefill":
            print(
                f"        {r['ctx']:<7} {r['triton_us'] / 1e3:>9.2f} "
                f"{r['full_sdpa_us'] / 1e3:>13.2f} {r['full_sdpa_us'] / r['triton_us']:>9.1f}"
            )
    if args.json:
        args.json.write_text(json.dumps(dict(device=name, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
