"""One attention layer on CPU, DUO's CPU kernel family against vLLM's stock CPU kernel.

    .venv/bin/python benchmarks/bench_cpu_layer.py [--contexts 4096,8192,32768]
        [--phase decode|prefill|both] [--retrieval 4] [--threads N] [--repeats 20]
        [--kv-cache-dtype auto|fp8|fp8_e4m3|fp8_e5m2] [--stock-retrieval]

What one layer's attention costs per step, without the rest of the model or the engine: stock =
vLLM's ``cpu_attn_reshape_and_cache`` + ``cpu_attention_with_kv_cache`` over all KV heads of the
layer; DUO = the CPU family's ``forward_run`` over the layer's runs (retrieval heads through the
C++ paged attention op, or vLLM's kernel with ``--stock-retrieval``, on a strided view;
streaming heads through the C++ op or the torch path). ``--retrieval 8`` (every head retrieval)
compares the two retrieval kernels alone. Llama-3-8B attention shape (32 query / 8 KV heads,
head size 128), bf16, one request. Each timing is the minimum over ``--repeats`` runs, so a busy
machine inflates it less than a mean would. ``vllm-duo bench`` measures whole engines; this
isolates the layer. ``--kv-cache-dtype`` gives both sides the same KV cache dtype (fp8: one byte
per element).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch


class _Step:
    """The GroupStep of ``requests`` requests over one shared prompt (a prefix-cache hit):
    decode (1 query each) or prefill (the whole context each)."""

    def __init__(self, context: int, queries: int, block_size: int, blocks: torch.Tensor,
                 isa: str, requests: int = 1) -> None:  # fmt: skip
        self.num_actual_tokens = queries * requests
        self.num_reqs = requests
        self.max_query_len = queries
        self.max_seq_len = context
        self.query_start_loc = torch.arange(requests + 1, dtype=torch.int32) * queries
        self.query_start_loc_host = self.query_start_loc.tolist()
        self.seq_lens = torch.full((requests,), context, dtype=torch.int32)
        self.seq_lens_host = self.seq_lens.tolist()
        self.block_table = blocks[None].expand(requests, -1).int().contiguous()
        positions = torch.arange(context - queries, context).repeat(requests)
        self.slot_mapping = (blocks[positions // block_size] * block_size
                             + positions % block_size).long()  # fmt: skip
        self.num_decodes = requests if queries == 1 else 0
        self.num_decode_tokens = self.num_decodes
        self.isa = isa
        self.step_cache: dict = {}


class _Scales:
    _k_scale_float = 1.0
    _v_scale_float = 1.0


def _best(fn, repeats: int) -> float:
    """Least time of ``repeats`` calls: CPU time of this thread when torch runs on one thread
    (what other processes do to the machine then hardly shows), else wall time."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = clock()
        fn()
        best = min(best, clock() - started)
    return best


BLOCK_SIZE = 128


def _random_cache(numel: int, dtype: torch.dtype, fp8: bool) -> torch.Tensor:
    # fp8: bytes of moderate finite values (below 0x70 in both formats).
    return (
        torch.randint(0, 0x70, (numel,), dtype=torch.uint8) if fp8 else torch.randn(numel).to(dtype)
    )


def _runs(context: int, retrieval: list[int], dtype: torch.dtype, fp8: bool, shape):
    """The layer's two runs over one-head caches laid out like vLLM's (one region each)."""
    from vllm_duo.head_layout import HeadRun

    HEADS, HEAD_SIZE = shape.kv_heads, shape.head_size
    num_blocks = context // BLOCK_SIZE + 2
    page = BLOCK_SIZE * 2 * HEAD_SIZE
    buffer = _random_cache(HEADS * num_blocks * page, dtype, fp8)
    streaming = [h for h in range(HEADS) if h not in retrieval]
    runs = []
    for members, is_retrieval in ((retrieval, True), (streaming, False)):
        if not members:
            continue
        gaps = {b - a for a, b in itertools.pairwise(members)} or {1}
        assert len(gaps) == 1, "the benchmark's heads of a kind must be equally spaced"
        cache = buffer.as_strided(
            (num_blocks, len(members), BLOCK_SIZE, 2 * HEAD_SIZE),
            (page, gaps.pop() * num_blocks * page, 2 * HEAD_SIZE, 1),
            members[0] * num_blocks * page,
        )
        runs.append(HeadRun("layer", is_retrieval, tuple(members), cache))
    return runs, num_blocks


def _case(context: int, tokens: int, args: argparse.Namespace, family, isa: str):
    """(stock step, DUO step) of one layer: callables timed by the caller."""
    from vllm_duo._vllm import ops
    from vllm_duo.head_layout import split_pages

    HEADS, GROUP, HEAD_SIZE = args.kv_heads, args.group, args.head_size
    dtype, scale, kv_dtype = torch.bfloat16, HEAD_SIZE**-0.5, args.kv_cache_dtype
    fp8 = kv_dtype != "auto"
    if not 0 <= args.retrieval <= HEADS:
        raise SystemExit(f"--retrieval {args.retrieval}: a layer has 0 to {HEADS} KV heads")
    # Half the heads: every other one, so neither kind is contiguous; any other count: the first
    # ones (each kind must be equally spaced to be one strided view).
    half = 2 * args.retrieval == HEADS
    retrieval = list(range(0, HEADS, 2)) if half else list(range(args.retrieval))
    runs, num_blocks = _runs(context, retrieval, dtype, fp8, args)
    blocks = torch.randperm(num_blocks - 1)[: -(-context // BLOCK_SIZE)] + 1
    step = _Step(context, tokens, BLOCK_SIZE, blocks, isa, args.requests)
    tokens *= args.requests
    query = torch.randn(tokens, HEADS, GROUP, HEAD_SIZE).to(dtype)
    key = torch.randn(tokens, HEADS, HEAD_SIZE).to(dtype)
    value = torch.randn(tokens, HEADS, HEAD_SIZE).to(dtype)
    out = torch.empty_like(query)
    stock_cache = _random_cache(num_blocks * HEADS * BLOCK_SIZE * 2 * HEAD_SIZE, dtype, fp8)
    stock_cache = stock_cache.view(num_blocks, HEADS, BLOCK_SIZE, 2 * HEAD_SIZE)
    key_cache, value_cache = split_pages(stock_cache)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=args.requests, num_heads=HEADS * GROUP, num_kv_heads=HEADS, head_dim=HEAD_SIZE,
        seq_lens=step.seq_lens, dtype=dtype, query_start_loc=step.query_start_loc,
        causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False,
        kv_cache_dtype=kv_dtype,
    )  # fmt: skip
    rows = (tokens, HEADS * GROUP, HEAD_SIZE)

    def stock() -> None:
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache,
                                       step.slot_mapping, isa, kv_cache_dtype=kv_dtype)  # fmt: skip
        ops.cpu_attention_with_kv_cache(
            query=query.view(rows), key_cache=key_cache, value_cache=value_cache,
            output=out.view(rows), query_start_loc=step.query_start_loc, seq_lens=step.seq_lens,
            scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=step.block_table, softcap=0, scheduler_metadata=metadata, s_aux=None,
            kv_cache_dtype=kv_dtype,
        )  # fmt: skip

    def duo() -> None:
        step.step_cache.clear()  # made once per step and shared by layers: counted here
        for run in runs:
            family.forward_run(run, step, query, key, value, out, _Scales())

    return stock, duo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="4096,8192,32768")
    parser.add_argument("--phase", choices=("decode", "prefill", "both"), default="both")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--retrieval", type=int, default=4, help="retrieval heads of the layer")
    parser.add_argument("--requests", type=int, default=1, help="requests sharing the prompt")
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--recent", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--torch-path", action="store_true", help="streaming heads in torch")
    parser.add_argument("--stock-retrieval", action="store_true",
                        help="retrieval heads through vLLM's kernel, not the C++ op")  # fmt: skip
    parser.add_argument("--kv-cache-dtype", default="auto",
                        choices=("auto", "fp8", "fp8_e4m3", "fp8_e5m2"),
                        help="KV cache dtype of both sides")  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from vllm_duo._vllm import cpu_attn_isa
    from vllm_duo.families.cpu import CpuKernels

    # The instruction set vLLM's builder picks for this shape and cache dtype.
    isa = cpu_attn_isa(torch.bfloat16, BLOCK_SIZE, args.head_size, args.kv_cache_dtype)
    family = CpuKernels(scale=args.head_size**-0.5, sink=args.sink, recent=args.recent,
                        kv_cache_dtype=args.kv_cache_dtype, dtype=torch.bfloat16,
                        head_size=args.head_size,
                        stock_retrieval_kernel=args.stock_retrieval)  # fmt: skip
    if args.torch_path:
        family.native = False
    from vllm_duo.machine import cpu_description

    print(f"one layer, {args.kv_heads * args.group}q/{args.kv_heads}kv heads "
          f"d={args.head_size} bf16, KV cache {args.kv_cache_dtype}, {args.retrieval} retrieval "
          f"heads, {args.requests} request(s), "
          f"S={args.sink} W={args.recent}, threads={torch.get_num_threads()}, isa={isa}, "
          f"{cpu_description()}, streaming: "
          f"{'C++ op' if family.native else 'torch'}, retrieval: "
          f"{'C++ op' if family.native_retrieval else 'vLLM kernel'} "
          f"(least of {args.repeats})")  # fmt: skip
    print(f"{'context':>8} {'phase':>8} {'stock ms':>10} {'DUO ms':>10} {'DUO/stock':>10}")
    phases = ("decode", "prefill") if args.phase == "both" else (args.phase,)
    for context in (int(c) for c in args.contexts.split(",")):
        for phase in phases:
            stock, duo = _case(context, 1 if phase == "decode" else context, args, family, isa)
            repeats = args.repeats if phase == "decode" else max(2, args.repeats // 10)
            stock_s, duo_s = _best(stock, repeats), _best(duo, repeats)
            print(f"{context:>8} {phase:>8} {stock_s * 1e3:>10.3f} {duo_s * 1e3:>10.3f} "
                  f"{stock_s / duo_s:>9.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
