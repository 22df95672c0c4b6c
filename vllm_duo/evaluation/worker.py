"""One method's part of ``vllm-duo eval``, run in its own process.

Usage: ``python -m vllm_duo.evaluation.worker REQUEST.json RESULTS.jsonl``

A fresh process per (method, sparsity) because ``VLLM_DUO_*`` settings are read once per
process and vLLM's in-process engine keeps global state; the parent sets the environment.
Only vLLM's public API is used (``vllm.LLM``). Two modes:

- ``generate``: greedy answers to the given prompts (token ids), a few prompts per call so
  the parent can show progress; one JSON line per answer.
- ``hidden``: the final hidden state of every position of each prompt (token-embedding
  pooling, no normalisation), saved as ``.npy`` files; one JSON line per prompt.

Lines are appended as soon as they exist, so a crash keeps what was done, and a rerun of the
same request answers only the prompts that have no line yet (a torn last line is dropped).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from vllm_duo.worker_process import read_rows


def _append(path: str, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(row) + "\n")


def answered(results_path: str, mode: str) -> set[int]:
    """Indices of the prompts a previous run of this request already answered.

    Rewrites the file without the lines that no longer count (one torn by a kill mid-write,
    a hidden-state row whose ``.npy`` file is gone), so new lines start clean and no index
    appears twice.
    """
    path = Path(results_path)
    if not path.exists():
        return set()
    text = path.read_text(encoding="utf-8")
    rows = [r for r in read_rows(path) if "path" not in r or Path(r["path"]).exists()]
    kept = "".join(json.dumps(r) + "\n" for r in rows)
    if kept != text:
        path.write_text(kept, encoding="utf-8")
    kind = "answer" if mode == "generate" else "hidden"
    return {r["i"] for r in rows if r["kind"] == kind}


def main(request_path: str, results_path: str) -> None:
    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    from vllm import LLM, SamplingParams

    kwargs = dict(request["llm_kwargs"])
    if request["mode"] == "hidden":
        from vllm_duo._vllm import PoolerConfig

        # Every position's final hidden state, as the model computes it before the LM head.
        kwargs.update(
            runner="pooling",
            convert="embed",
            pooler_config=PoolerConfig(
                task="token_embed", tok_pooling_type="ALL", use_activation=False
            ),
        )
    prompts = request["prompts"]
    done = answered(results_path, request["mode"])
    todo = [i for i in range(len(prompts)) if i not in done]
    started = time.perf_counter()
    llm = LLM(model=request["model"], **kwargs)
    _append(results_path, {"kind": "engine", "startup_s": time.perf_counter() - started})
    batch = max(1, int(request.get("batch", 4)))
    params = SamplingParams(temperature=0.0, max_tokens=request.get("max_tokens", 16))
    for first in range(0, len(todo), batch):
        indices = todo[first : first + batch]
        chunk = [{"prompt_token_ids": prompts[i]} for i in indices]
        began = time.perf_counter()
        if request["mode"] == "generate":
            outputs = llm.generate(chunk, params, use_tqdm=False)
            seconds = (time.perf_counter() - began) / len(chunk)
            for index, out in zip(indices, outputs):
                _append(
                    results_path,
                    {
                        "kind": "answer",
                        "i": index,
                        "text": out.outputs[0].text,
                        "seconds": seconds,
                    },
                )
        else:
            import numpy as np

            outputs = llm.encode(chunk, pooling_task="token_embed", use_tqdm=False)
            seconds = (time.perf_counter() - began) / len(chunk)
            for index, out in zip(indices, outputs):
                path = Path(request["hidden_dir"]) / f"{request['tag']}-{index}.npy"
                np.save(path, out.outputs.data.float().numpy())
                _append(
                    results_path,
                    {"kind": "hidden", "i": index, "path": str(path), "seconds": seconds},
                )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
