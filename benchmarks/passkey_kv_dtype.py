"""Passkey accuracy of DUO with each KV cache dtype on the default model (SmolLM2-135M).

    .venv/bin/python benchmarks/passkey_kv_dtype.py [--lengths 1024,2048,4096]
        [--depths 0.1,0.3,0.5,0.7,0.9] [--seeds 2] [--sparsity 0.5]
        [--kv-cache-dtypes auto,fp8,fp8_e5m2] [--stock]

One engine per KV cache dtype (bf16 model, the bundled SmolLM2 pattern), every case of the
grid in one batch, greedy decoding; prints correct/total per dtype and length. ``--stock``
adds the stock backend with each dtype, so a drop fp8 causes can be told from one DUO
causes. Cases come from :func:`vllm_duo.evaluation.passkey.make_case`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile


def _run(args: argparse.Namespace, backend: str, kv_cache_dtype: str) -> None:
    """Child process: one engine, all cases, one result line per length."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_duo.default_model import prepare_default_model
    from vllm_duo.evaluation.passkey import make_case

    model = prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(model)
    lengths = [int(n) for n in args.lengths.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    cases = [make_case(tokenizer, n, d, seed=s) for n in lengths for d in depths
             for s in range(args.seeds)]  # fmt: skip
    llm = LLM(model=str(model), dtype="bfloat16", max_model_len=max(lengths) + 64,
              enforce_eager=True, kv_cache_memory_bytes=1 << 30, kv_cache_dtype=kv_cache_dtype,
              attention_backend="DUO" if backend == "duo" else "CPU_ATTN")  # fmt: skip
    prompts = [{"prompt_token_ids": tokenizer.encode(c.prompt, add_special_tokens=False)}
               for c in cases]  # fmt: skip
    params = SamplingParams(max_tokens=8, temperature=0.0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for n in lengths:
        scored = [c.correct(o.outputs[0].text) for c, o in zip(cases, outputs) if c.length == n]
        print(f"RESULT {backend} {kv_cache_dtype} {n} {sum(scored)} {len(scored)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--kv-cache-dtypes", default="auto,fp8,fp8_e5m2")
    parser.add_argument("--stock", action="store_true", help="also the stock backend")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _run(args, *args.child)
        return
    backends = ["duo", "stock"] if args.stock else ["duo"]
    print(f"passkey, SmolLM2-135M-Instruct bf16, DUO sparsity {args.sparsity}; "
          f"lengths {args.lengths}, depths {args.depths}, {args.seeds} seeds")  # fmt: skip
    print(f"{'backend':>8} {'kv cache':>9} {'length':>7} {'correct':>8}")
    for backend in backends:
        for kv_cache_dtype in args.kv_cache_dtypes.split(","):
            tmp = tempfile.mkdtemp(dir="/tmp")  # vLLM's socket paths must stay short
            env = dict(os.environ, VLLM_DUO_SPARSITY=str(args.sparsity),
                       VLLM_ENABLE_V1_MULTIPROCESSING="0", TMPDIR=tmp)  # fmt: skip
            # One process per engine: DUO's settings are read once per process.
            child = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--child", backend, kv_cache_dtype],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            for line in child.stdout.splitlines():
                if line.startswith("RESULT "):
                    _, b, kv, n, ok, total = line.split()
                    print(f"{b:>8} {kv:>9} {n:>7} {ok + '/' + total:>8}", flush=True)


if __name__ == "__main__":
    main()
