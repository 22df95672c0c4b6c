"""cProfile of decode steps of one backend, in-process: where the time of a step goes.

    .venv/bin/python benchmarks/profile_step.py DUO|CPU_ATTN CONTEXT --model DIR [--pattern DIR]
        [--steps 20] [--sink 64] [--recent 256] [--sparsity 0.5] [--top 40]

Use the synthetic model and pattern that ``vllm-duo bench`` leaves in its --out directory.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backend")
    parser.add_argument("context", type=int)
    parser.add_argument("--model", required=True)
    parser.add_argument("--pattern")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sink", default="64")
    parser.add_argument("--recent", default="256")
    parser.add_argument("--sparsity", default="0.5")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--sort", default="cumulative", help="pstats sort key (tottime, ...)")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if args.pattern:
        os.environ.update(VLLM_DUO_PATTERN=args.pattern, VLLM_DUO_SPARSITY=args.sparsity,
                          VLLM_DUO_SINK=args.sink, VLLM_DUO_RECENT=args.recent)  # fmt: skip

    from vllm import LLM

    from vllm_duo.bench.worker import _Engine, _prompt

    llm = LLM(model=args.model, attention_backend=args.backend, dtype="bfloat16",
              max_model_len=args.context + args.steps + 16, max_num_batched_tokens=8192,
              kv_cache_memory_bytes=2 << 30, enforce_eager=True)  # fmt: skip
    engine = _Engine(llm)
    engine.add(_prompt(args.context, llm.llm_engine.model_config.get_vocab_size(), 1),
               args.steps + 8)  # fmt: skip
    for _ in range(3):  # prefill and the first decode steps are not what is profiled
        engine.engine.step()
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    for _ in range(args.steps):
        engine.engine.step()
    profile.disable()
    print(f"{args.backend} at {args.context:,} tokens: "
          f"{(time.perf_counter() - started) / args.steps * 1000:.1f} ms per decode step "
          "(under the profiler)")  # fmt: skip
    pstats.Stats(profile).sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()
