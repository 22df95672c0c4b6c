"""Runs both backends of ``vllm-duo bench`` and gathers what they measured."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from vllm_duo.bench.config import LLAMA3_8B_ATTENTION, BenchConfig, SyntheticModel
from vllm_duo.errors import DuoConfigError
from vllm_duo.machine import cpu_description
from vllm_duo.patterns import load_gates, select_retrieval
from vllm_duo.settings import ENV_PATTERN, ENV_RECENT, ENV_SINK, ENV_SPARSITY
from vllm_duo.worker_process import read_rows, run_worker

BACKENDS = ("stock", "duo")


def synthetic_model(directory: Path, model: SyntheticModel, config: BenchConfig) -> Path:
    """Builds (or reuses) the random-weight Llama with Llama-3-8B's attention shape."""
    from vllm_duo.testing.tiny_llama import build_tiny_llama

    return build_tiny_llama(
        directory,
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        vocab_size=model.vocab_size,
        max_position_embeddings=max(131072, config.max_model_len),
        dtype=config.dtype,
        **LLAMA3_8B_ATTENTION,
    )


def random_pattern(directory: Path, num_layers: int, num_kv_heads: int, seed: int) -> Path:
    """Upstream-format gates drawn uniformly: which heads stream matters little for speed."""
    directory.mkdir(parents=True, exist_ok=True)
    gates = np.random.default_rng(seed).random((num_layers, num_kv_heads))
    np.savetxt(directory / "full_attention_heads.tsv", gates, delimiter="\t", fmt="%.6f")
    return directory


def _llm_kwargs(config: BenchConfig, backend: str) -> dict[str, Any]:
    on_gpu = _has_gpu()
    stock = None if on_gpu else "CPU_ATTN"
    duo = backend == "duo"
    return {
        "attention_backend": "DUO" if duo else stock,
        "dtype": config.dtype,
        "max_model_len": config.max_model_len,
        "max_num_batched_tokens": max(config.max_num_batched_tokens, 16),
        "kv_cache_memory_bytes": config.kv_cache_bytes,
        "kv_cache_dtype": config.kv_cache_dtype if duo else config.stock_kv_cache_dtype,
        "enable_prefix_caching": True,
        # Both backends run eagerly: graph capture is not what is being compared.
        "enforce_eager": True,
        "seed": config.seed,
    }


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _worker_env(backend: str, pattern: Path, config: BenchConfig, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_DUO_")}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    if backend == "duo":
        env.update({ENV_PATTERN: str(pattern), ENV_SPARSITY: repr(config.sparsity),
                    ENV_SINK: str(config.sink), ENV_RECENT: str(config.recent)})  # fmt: skip
    return env


def _run_worker(
    backend: str,
    context: int,
    model_path: Path,
    pattern: Path,
    config: BenchConfig,
    vocab_size: int,
    out_dir: Path,
    progress: Any,
    round_index: int = 0,
) -> list[dict[str, Any]]:
    tag = f"{backend}-{context}" + (f"-r{round_index}" if round_index else "")
    results = out_dir / f"{tag}.jsonl"
    results.unlink(missing_ok=True)
    request = out_dir / f"{tag}.request.json"
    request.write_text(
        json.dumps(
            {
                "model": str(model_path),
                "llm_kwargs": _llm_kwargs(config, backend),
                "contexts": [context],
                "decode_tokens": config.decode_tokens,
                "concurrency": config.concurrency,
                "vocab_size": vocab_size,
            }
        )
    )
    log_path = out_dir / f"{tag}.log"
    done = 0

    def poll() -> None:
        nonlocal done
        done = _advance(progress, results, done, backend)

    run_worker(
        "vllm_duo.bench.worker", [str(request), str(results)], log_path=log_path,
        env_for=lambda tmp: _worker_env(backend, pattern, config, tmp), on_poll=poll,
        what=f"{backend} benchmark process",
    )  # fmt: skip
    return read_rows(results)


def _advance(progress: Any, results: Path, done: int, backend: str) -> int:
    rows = [r for r in read_rows(results) if r["kind"] == "context"]
    if progress is not None and len(rows) > done:
        progress.update(len(rows) - done)
        progress.set_postfix_str(f"{backend} {rows[-1]['context']:,} tokens done")
    return len(rows)


def run_bench(
    config: BenchConfig,
    out_dir: Path,
    *,
    model: SyntheticModel | None = None,
    model_path: Path | None = None,
    pattern: Path | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Measures the stock backend, then DUO, on the same model and prompts.

    Returns ``{"meta": ..., "stock": [rows], "duo": [rows]}``; each row holds one context
    length's prefill_s, decode_s_per_token, throughput_tok_s, kv_bytes_per_token and
    max_concurrency.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model or SyntheticModel()
    if model_path is None:
        model_path = synthetic_model(out_dir / "model", model, config)
    model_config = json.loads((model_path / "config.json").read_text())
    num_layers = int(model_config["num_hidden_layers"])
    num_kv_heads = int(model_config.get("num_key_value_heads", model_config["num_attention_heads"]))
    if pattern is None:
        pattern = random_pattern(out_dir / "pattern", num_layers, num_kv_heads, config.seed)
    gates = load_gates(pattern)
    if gates.shape != (num_layers, num_kv_heads):
        raise DuoConfigError(
            f"bench: pattern {pattern} has shape {gates.shape[0]}x{gates.shape[1]} but the model "
            f"has {num_layers} layers x {num_kv_heads} KV heads; pass a pattern made for it"
        )
    retrieval = select_retrieval(gates, sparsity=config.sparsity)
    progress = None
    if show_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(BACKENDS) * len(config.contexts) * config.rounds, desc="bench",
                        unit="ctx")  # fmt: skip
    started = time.time()
    try:
        # One fresh engine per (context, backend, round), the backends alternating (stock,
        # DUO, DUO, stock, ...), so a change in the machine's speed during a long run hits
        # both sides of each ratio alike.
        results: dict[str, list[dict[str, Any]]] = {backend: [] for backend in BACKENDS}
        for context in config.contexts:
            rounds: dict[str, list[list[dict[str, Any]]]] = {b: [] for b in BACKENDS}
            for round_index in range(config.rounds):
                order = BACKENDS if round_index % 2 == 0 else BACKENDS[::-1]
                for backend in order:
                    rounds[backend].append(_run_worker(
                        backend, context, model_path, pattern, config,
                        int(model_config["vocab_size"]), out_dir, progress, round_index,
                    ))  # fmt: skip
            for backend in BACKENDS:
                results[backend] += median_rows(rounds[backend])
    finally:
        if progress is not None:
            progress.close()
    meta = {
        "config": dataclasses.asdict(config),
        "model": str(model_path),
        "model_shape": {
            "num_layers": num_layers,
            "num_kv_heads": num_kv_heads,
            "num_heads": model_config["num_attention_heads"],
            "head_dim": model_config.get("head_dim"),
            "hidden_size": model_config["hidden_size"],
            "intermediate_size": model_config["intermediate_size"],
        },
        "pattern": str(pattern),
        "retrieval_fraction": float(retrieval.mean()),
        "machine": cpu_description(),
        "gpu": _gpu_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "wall_s": time.time() - started,
    }
    meta["startup_s"] = {b: [r["startup_s"] for r in rows if r["kind"] == "engine"]
                         for b, rows in results.items()}  # fmt: skip
    return {
        "meta": meta,
        **{b: [r for r in rows if r["kind"] == "context"] for b, rows in results.items()},
    }


def median_rows(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The rows of one (context, backend) over rounds: each number the median of its rounds.

    ``rounds``: per round, the worker's rows (an engine row, then context rows). One round
    is returned as it is; the merged context row records every round's numbers.
    """
    if len(rounds) == 1:
        return rounds[0]
    merged = []
    for rows in zip(*rounds, strict=True):
        row = dict(rows[0])
        if row["kind"] == "context":
            for key, value in rows[0].items():
                if isinstance(value, float):
                    row[key] = float(np.median([r[key] for r in rows]))
            row["rounds"] = [dict(r) for r in rows]
        merged.append(row)
    return merged


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None
