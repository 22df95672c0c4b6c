"""``vllm-duo bench``: DUO against the stock backend (speed, memory, capacity).

The engines run in worker processes (:mod:`vllm_duo.bench`); vLLM is imported there, never here.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vllm_duo.cli.common import add_option, out, parse_token_counts
from vllm_duo.errors import DuoConfigError


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``bench`` subcommand (defaults shown from :class:`BenchConfig`)."""
    import dataclasses

    from vllm_duo.bench.config import BenchConfig, SyntheticModel

    defaults = {f.name: f.default for f in dataclasses.fields(BenchConfig)}
    model_defaults = {f.name: f.default for f in dataclasses.fields(SyntheticModel)}
    bench = commands.add_parser(
        "bench",
        help="measure DUO against the stock backend (speed, memory, capacity)",
        description=(
            "Run the stock attention backend and DUO in the same run, on the same model and "
            "prompts, over context lengths: prefill time, decode time per token, decode "
            "throughput of concurrent requests, KV bytes held per token and vLLM's maximum "
            "concurrency, each as a DUO/stock ratio next to the ideal. Writes a table, "
            "bench.json and bench.png. Default model: a random-weight Llama with "
            "Llama-3-8B's attention (32 query heads, 8 KV heads, head size 128)."
        ),
    )
    contexts = ",".join(f"{c // 1024}K" for c in defaults["contexts"])
    bench.add_argument(
        "--contexts",
        default=contexts,
        metavar="LIST",
        help=f"context lengths, e.g. 4K,8K,32768 (default {contexts})",
    )
    bench.add_argument(
        "--quick", action="store_true", help="a smoke run: contexts 2K,4K and 8 decode tokens"
    )
    bench.add_argument(
        "--out",
        default="bench-results",
        metavar="DIR",
        help="where bench.json, bench.png and logs go (default bench-results)",
    )
    bench.add_argument(
        "--model",
        default=None,
        metavar="MODEL_DIR",
        help="a local model instead of the synthetic one (needs --pattern)",
    )
    bench.add_argument(
        "--pattern",
        default=None,
        metavar="DIR",
        help="pattern directory (default: random gates for the synthetic model)",
    )
    bench.add_argument("--no-plot", action="store_true", help="skip bench.png")
    options: list[tuple[str, type, str, str, dict]] = [
        ("sparsity", float, "S", "fraction of streaming heads", defaults),
        ("sink", int, "S", "sink tokens", defaults),
        ("recent", int, "W", "recent-window tokens", defaults),
        ("decode_tokens", int, "N", "tokens decoded per request", defaults),
        ("concurrency", int, "B", "requests decoding together for throughput", defaults),
        ("max_num_batched_tokens", int, "T", "prefill chunk (tokens per step)", defaults),
        ("kv_cache_gib", float, "GIB", "KV cache of each engine", defaults),
        ("seed", int, "SEED", "prompt and pattern seed", defaults),
        (
            "rounds",
            int,
            "R",
            "engines per context and backend, ordered stock, DUO, DUO, "
            "stock, ...; each number is the median of the rounds",
            defaults,
        ),
        ("num_layers", int, "N", "synthetic model: layers", model_defaults),
        ("hidden_size", int, "H", "synthetic model: hidden width", model_defaults),
        ("intermediate_size", int, "I", "synthetic model: MLP width", model_defaults),
    ]
    for field, kind, metavar, text, source in options:
        add_option(bench, field, kind, metavar, text, source[field])
    bench.add_argument("--dtype", default=defaults["dtype"],
                       choices=("bfloat16", "float16", "float32"),
                       help=f"model dtype (default {defaults['dtype']})")  # fmt: skip
    for flag, side in (("kv_cache_dtype", "DUO's"), ("stock_kv_cache_dtype", "the stock")):
        bench.add_argument(f"--{flag.replace('_', '-')}", default=defaults[flag],
                           metavar="DTYPE", help=f"{side} KV cache dtype: auto (the model's), "
                           f"fp8, fp8_e4m3 or fp8_e5m2 (default {defaults[flag]})")  # fmt: skip
    bench.set_defaults(handler=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    """``vllm-duo bench``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm_duo.bench import report
    from vllm_duo.bench.config import BenchConfig, SyntheticModel
    from vllm_duo.bench.run import run_bench

    if args.model is not None and args.pattern is None:
        raise DuoConfigError(
            f"--model {args.model} needs --pattern DIR: a pattern made for that model "
            "(random gates are only generated for the synthetic model)."
        )
    contexts = (2048, 4096) if args.quick else parse_token_counts("contexts", args.contexts)
    config = BenchConfig(
        contexts=contexts, sparsity=args.sparsity, sink=args.sink, recent=args.recent,
        decode_tokens=8 if args.quick else args.decode_tokens, concurrency=args.concurrency,
        max_num_batched_tokens=args.max_num_batched_tokens, dtype=args.dtype,
        kv_cache_gib=args.kv_cache_gib, seed=args.seed, kv_cache_dtype=args.kv_cache_dtype,
        stock_kv_cache_dtype=args.stock_kv_cache_dtype, rounds=args.rounds,
    )  # fmt: skip
    model = SyntheticModel(num_layers=args.num_layers, hidden_size=args.hidden_size,
                           intermediate_size=args.intermediate_size)  # fmt: skip
    out_dir = Path(args.out)
    results = run_bench(
        config, out_dir, model=model,
        model_path=Path(args.model) if args.model else None,
        pattern=Path(args.pattern) if args.pattern else None,
    )  # fmt: skip
    meta = results["meta"]
    rows = report.compare(results["stock"], results["duo"],
                          retrieval_fraction=meta["retrieval_fraction"], sink=config.sink,
                          recent=config.recent, kv_dtype_gain=config.kv_dtype_gain)  # fmt: skip
    shape = meta["model_shape"]
    kv = ""
    if (config.kv_cache_dtype, config.stock_kv_cache_dtype) != ("auto", "auto"):
        kv = f", KV cache DUO {config.kv_cache_dtype} / stock {config.stock_kv_cache_dtype}"
    if config.rounds > 1:
        kv += f", median of {config.rounds} rounds"
    width = f", hidden {shape['hidden_size']}, MLP {shape['intermediate_size']}"
    title = (
        f"DUO vs stock, {shape['num_layers']} layers x {shape['num_heads']}q/"
        f"{shape['num_kv_heads']}kv heads (d={shape['head_dim']}){width}, "
        f"sparsity {config.sparsity}, S={config.sink}, W={config.recent}, {config.dtype}{kv}; "
        f"{meta['gpu'] or meta['machine']}, {meta['date']}"
    )
    out(title)
    for line in report.table(rows):
        out(line)
    report.write_json(out_dir / "bench.json", meta, rows)
    out(f"\nwrote {out_dir / 'bench.json'}")
    if not args.no_plot:
        report.plot(out_dir / "bench.png", rows, title)
        out(f"wrote {out_dir / 'bench.png'}")
    return 0
