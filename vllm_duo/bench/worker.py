"""One backend's half of ``vllm-duo bench``, run in its own process.

Usage: ``python -m vllm_duo.bench.worker REQUEST.json RESULTS.jsonl``

A fresh process per backend because ``VLLM_DUO_*`` settings are read once per process
and the in-process engine keeps global state. The engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so every ``step()`` is timed directly and the
scheduler's block pool can be read. One JSON line per context length is appended to
RESULTS as soon as it is measured, so the parent can show progress and a crash keeps
what was done.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from typing import Any

_STEP_LIMIT = 100_000  # a run that has not finished by then is broken, not slow


def _prompt(context: int, vocab_size: int, salt: int) -> list[int]:
    """Deterministic random token ids; ``salt`` keeps prompts of a run apart in the cache."""
    rng = random.Random(context * 1_000_003 + salt)
    first = 10 + salt % (vocab_size - 10)
    return [first] + [rng.randrange(10, vocab_size) for _ in range(context - 1)]


class _Engine:
    """A thin timer around vLLM's in-process engine."""

    def __init__(self, llm: Any) -> None:
        from vllm import SamplingParams

        self.engine = llm.llm_engine
        self.scheduler = self.engine.engine_core.engine_core.scheduler
        self.sampling = SamplingParams
        # Every group's tensor aliases the same bytes from offset 0 (one shared block pool).
        self.pool_bytes = max(t.size for t in self.scheduler.kv_cache_config.kv_cache_tensors)
        self._next_id = 0
        self.cached_tokens: dict[str, int] = {}
        """Prompt tokens each request found in the prefix cache."""

    def params(self, max_tokens: int) -> Any:
        return self.sampling(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False
        )

    def add(self, prompt: list[int], max_tokens: int) -> str:
        request_id = f"bench-{self._next_id}"
        self._next_id += 1
        self.engine.add_request(request_id, {"prompt_token_ids": prompt}, self.params(max_tokens))
        return request_id

    def run(self) -> list[dict[str, Any]]:
        """Steps until idle; per step: seconds, tokens out per request, KV bytes in use."""
        steps = []
        produced: dict[str, int] = {}
        for _ in range(_STEP_LIMIT):
            if not self.engine.has_unfinished_requests():
                return steps
            started = time.perf_counter()
            outputs = self.engine.step()
            seconds = time.perf_counter() - started
            finished = False
            for out in outputs:
                produced[out.request_id] = len(out.outputs[0].token_ids)
                self.cached_tokens[out.request_id] = out.num_cached_tokens or 0
                finished |= out.finished
            steps.append(
                {
                    "seconds": seconds,
                    "produced": dict(produced),
                    "kv_bytes": self.scheduler.kv_cache_manager.usage * self.pool_bytes,
                    "any_finished": finished,
                }
            )
        raise RuntimeError(f"the engine did not finish within {_STEP_LIMIT} steps")

    def max_concurrency(self, context: int) -> float:
        """vLLM's own 'maximum concurrency' figure for requests of ``context`` tokens."""
        import copy

        from vllm_duo._vllm import get_max_concurrency_for_kv_cache_config

        config = copy.copy(self.engine.vllm_config)
        model_config = copy.copy(config.model_config)
        model_config.max_model_len = context
        object.__setattr__(config, "model_config", model_config)
        return float(
            get_max_concurrency_for_kv_cache_config(config, self.scheduler.kv_cache_config)
        )


def _single(engine: _Engine, context: int, decode_tokens: int, vocab: int) -> dict[str, Any]:
    """One request alone: prefill time, decode time per token, KV bytes per token held."""
    request_id = engine.add(_prompt(context, vocab, salt=1), decode_tokens + 1)
    steps = engine.run()
    first_token = next(i for i, s in enumerate(steps) if s["produced"].get(request_id, 0) >= 1)
    prefill_s = sum(s["seconds"] for s in steps[: first_token + 1])
    # The first decode step still frees what the last prefill chunk left behind: skip it.
    decode = [s["seconds"] for s in steps[first_token + 2 :]]
    held = [s["kv_bytes"] for s in steps[first_token + 1 :] if not s["any_finished"]]
    return {
        "prefill_s": prefill_s,
        "prefill_steps": first_token + 1,
        "decode_s_per_token": statistics.median(decode),
        "decode_samples": len(decode),
        # Bytes held at the last step before the request finished, per context token.
        "kv_bytes_per_token": held[-1] / (context + decode_tokens) if held else float("nan"),
    }


def _concurrent(
    engine: _Engine, context: int, decode_tokens: int, concurrency: int, vocab: int
) -> dict[str, Any]:
    """``concurrency`` requests decoding together.

    They share the prompt of :func:`_single`, which the prefix cache still holds, so
    their prefill is (nearly) free and the steps measured are decode steps.
    """
    prompt = _prompt(context, vocab, salt=1)
    ids = [engine.add(prompt, decode_tokens + 1) for _ in range(concurrency)]
    steps = engine.run()
    all_started = next(
        i for i, s in enumerate(steps) if all(s["produced"].get(r, 0) >= 1 for r in ids)
    )
    steady = [s for s in steps[all_started + 1 :] if not s["any_finished"]]
    tokens = len(steady) * concurrency
    seconds = sum(s["seconds"] for s in steady)
    return {
        "throughput_tok_s": tokens / seconds if seconds else float("nan"),
        "throughput_steps": len(steady),
        "throughput_prefix_hit_tokens": min(engine.cached_tokens.get(r, 0) for r in ids),
    }


def main(request_path: str, results_path: str) -> None:
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)

    from vllm import LLM

    started = time.perf_counter()
    llm = LLM(model=request["model"], **request["llm_kwargs"])
    engine = _Engine(llm)
    header = {"kind": "engine", "startup_s": time.perf_counter() - started,
              "pool_bytes": engine.pool_bytes}  # fmt: skip
    with open(results_path, "a", encoding="utf-8") as out:
        out.write(json.dumps(header) + "\n")
    vocab, decode_tokens = request["vocab_size"], request["decode_tokens"]
    # A short warm-up so the first measured length does not pay one-off costs.
    engine.add(_prompt(64, vocab, salt=3), 4)
    engine.run()
    for context in request["contexts"]:
        row: dict[str, Any] = {"kind": "context", "context": context}
        row.update(_single(engine, context, decode_tokens, vocab))
        row.update(_concurrent(engine, context, decode_tokens, request["concurrency"], vocab))
        row["max_concurrency"] = engine.max_concurrency(context)
        with open(results_path, "a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
