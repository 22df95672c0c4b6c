"""Run one vLLM engine in a fresh process and dump what the tests compare.

Usage: python engine_runner.py REQUEST.json RESULT.json

Every engine runs in its own process because ``VLLM_DUO_*`` settings are read
once per process and vLLM's in-process engine keeps global state.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(request_path: str, result_path: str) -> None:
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    os.environ.update(request.get("env", {}))

    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=request["model"], **request["llm_kwargs"])
    startup_s = time.perf_counter() - started
    params = SamplingParams(
        max_tokens=request["max_tokens"],
        temperature=0.0,
        prompt_logprobs=0,
        logprobs=0,
        detokenize=False,
        ignore_eos=True,
    )
    prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
    results = []
    for _ in range(request.get("repeat", 1)):
        outputs = llm.generate(prompts, params, use_tqdm=False)
        results = []
        for ids, out in zip(request["prompts"], outputs):
            completion = out.outputs[0]
            results.append(
                {
                    "prompt_logprobs": [
                        out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))
                    ],
                    "tokens": list(completion.token_ids),
                    "logprobs": [
                        step[token].logprob
                        for step, token in zip(completion.logprobs, completion.token_ids)
                    ],
                    "num_cached_tokens": out.num_cached_tokens,
                }
            )
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump({"startup_s": startup_s, "outputs": results}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
