"""Passkey accuracy inside vLLM: full attention, DUO, all-streaming and a random pattern.

    .venv/bin/python benchmarks/passkey_eval.py --pattern patterns/SmolLM2-135M-Instruct \
        [--model DIR] [--lengths 1024 2048 3072 4096] [--depths 0.1 0.3 0.5 0.7 0.9] \
        [--sparsity 0.5] [--json out.json] [--png heatmap.png]

Each method runs in its own process (VLLM_DUO_* settings are read once per process):
``full`` is vLLM's stock CPU backend, ``duo`` the pattern at ``--sparsity``, ``streaming``
every head streaming (sparsity 1), ``random`` uniformly random gates at ``--sparsity``.
Prints a table (accuracy per method and length), writes JSON and a heat map per method.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = ("full", "duo", "streaming", "random")


def _worker(request_path: str, result_path: str) -> None:
    """Child process: run one method over all cases with greedy decoding."""
    request = json.loads(Path(request_path).read_text())
    os.environ.update(request["env"])
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_duo.evaluation.passkey import make_case

    tokenizer = AutoTokenizer.from_pretrained(request["model"])
    cases = [
        make_case(tokenizer, length, depth, request["seed"])
        for length in request["lengths"]
        for depth in request["depths"]
    ]
    llm = LLM(model=request["model"], enforce_eager=True, dtype="bfloat16",
              max_model_len=max(request["lengths"]) + 256, kv_cache_memory_bytes=1 << 30,
              attention_backend=request["backend"])  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=12)
    outputs = llm.generate([c.prompt for c in cases], params, use_tqdm=False)
    rows = [
        {"length": c.length, "depth": c.depth, "passkey": c.passkey,
         "answer": o.outputs[0].text, "correct": c.correct(o.outputs[0].text)}
        for c, o in zip(cases, outputs)
    ]  # fmt: skip
    Path(result_path).write_text(json.dumps(rows))


def _random_pattern(reference: Path, directory: Path, seed: int) -> Path:
    import numpy as np

    from vllm_duo.patterns import load_gates

    shape = load_gates(reference).shape
    gates = np.random.default_rng(seed).random(shape)
    directory.mkdir(parents=True, exist_ok=True)
    rows = ["\t".join(f"{g:.6f}" for g in row) for row in gates]
    (directory / "full_attention_heads.tsv").write_text("\n".join(rows) + "\n")
    return directory


def run(args: argparse.Namespace) -> dict[str, list[dict]]:
    work = Path(tempfile.mkdtemp(prefix="passkey-"))
    patterns = {
        "full": (None, "CPU_ATTN"),
        "duo": (str(args.pattern), "DUO"),
        "streaming": (str(args.pattern), "DUO"),
        "random": (str(_random_pattern(args.pattern, work / "random", args.seed)), "DUO"),
    }
    results = {}
    for method in args.methods:
        pattern, backend = patterns[method]
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
        if pattern is not None:
            sparsity = 1.0 if method == "streaming" else args.sparsity
            env.update(VLLM_DUO_PATTERN=pattern, VLLM_DUO_SPARSITY=str(sparsity),
                       VLLM_DUO_SINK=str(args.sink), VLLM_DUO_RECENT=str(args.recent))  # fmt: skip
        request = work / f"{method}.json"
        result = work / f"{method}-result.json"
        request.write_text(json.dumps({
            "model": str(args.model), "backend": backend, "env": env, "seed": args.seed,
            "lengths": args.lengths, "depths": args.depths,
        }))  # fmt: skip
        print(f"[{method}] running ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, __file__, "--worker", str(request), str(result)],
                       check=True, env={**os.environ, **env})  # fmt: skip
        results[method] = json.loads(result.read_text())
    return results


def table(results: dict[str, list[dict]], lengths: list[int]) -> str:
    header = "method      " + "".join(f"{n:>8}" for n in lengths) + "     all"
    lines = [header, "-" * len(header)]
    for method, rows in results.items():
        cells = []
        for n in lengths:
            hits = [r["correct"] for r in rows if r["length"] == n]
            cells.append(f"{100 * sum(hits) / len(hits):7.0f}%")
        total = 100 * sum(r["correct"] for r in rows) / len(rows)
        lines.append(f"{method:<12}" + "".join(cells) + f"{total:7.0f}%")
    return "\n".join(lines)


def heatmap(results: dict[str, list[dict]], lengths, depths, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.2 * len(results), 3.2))
    FigureCanvasAgg(figure)
    for i, (method, rows) in enumerate(results.items()):
        axes = figure.add_subplot(1, len(results), i + 1)
        grid = [[next(float(r["correct"]) for r in rows
                      if r["length"] == n and r["depth"] == d) for n in lengths]
                for d in depths]  # fmt: skip
        axes.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        axes.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
        axes.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        axes.set_title(method)
        axes.set_xlabel("context tokens")
        if i == 0:
            axes.set_ylabel("passkey depth")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--pattern", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 3072, 4096])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--recent", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args()
    if args.model is None:
        from vllm_duo.default_model import prepare_default_model

        args.model = prepare_default_model()
    results = run(args)
    print(table(results, args.lengths))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=1))  # fmt: skip
    if args.png:
        heatmap(results, args.lengths, args.depths, args.png)


if __name__ == "__main__":
    main()
