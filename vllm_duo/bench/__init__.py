"""``vllm-duo bench``: DUO against the stock backend on the same model, prompts and run."""
