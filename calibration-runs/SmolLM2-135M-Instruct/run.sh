#!/usr/bin/env bash
# The 1K-8K natural-text re-calibration of the default model's pattern, resumable across
# sessions: run from anywhere; it continues the checkpoint in this folder (or starts one).
# When it reaches --steps (200; planned 240, see README.md here), copy
# full_attention_heads.tsv, config.json and model.json from here to
# patterns/SmolLM2-135M-Instruct/ (after eval.sh shows it holds better than the bundled
# pattern and the attention-mass baseline on the held-out family).
set -euo pipefail
source "$(dirname "$0")/common.sh"
resume=()
[ -f "$here/checkpoint.pt" ] && resume=(--resume)
exec nice -n 19 .venv/bin/vllm-duo calibrate "$model" --out calibration-runs/SmolLM2-135M-Instruct \
    --steps 200 --min-len 1024 --max-len 8192 --length-dist log-uniform \
    --haystack python-reference --passkeys 3 --save-every 5 \
    --model-id HuggingFaceTB/SmolLM2-135M-Instruct "${resume[@]}"
