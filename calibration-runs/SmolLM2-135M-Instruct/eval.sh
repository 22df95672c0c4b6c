#!/usr/bin/env bash
# The evaluation that decides which pattern ships as patterns/SmolLM2-135M-Instruct: the
# default `vllm-duo eval` (held-out family, 1K-8K, 10 depths, sweep 0.25-0.9, agreement on
# Opticks) of a pattern against full attention, all-streaming, a random pattern and the
# attention-mass baseline (../SmolLM2-135M-Instruct-attention-mass).
#
#   eval.sh bundled     # the pattern shipped today           -> docs/results/eval_smollm2_bundled
#   eval.sh calibrated  # this folder's gates (after run.sh)  -> docs/results/eval_smollm2
#
# float32: on CPUs without AVX-512 vLLM's bf16 matrix products have no fast path (a bf16 run
# takes about 2.5 times as long there); the numbers are those of the same model in float32.
# Both runs write to one work folder, so the second reuses the jobs they share (full,
# streaming, random, baseline) and only runs its own pattern.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
model="$HOME/.cache/vllm-duo/models/SmolLM2-135M-Instruct"
[ -d "$model" ] || .venv/bin/python -m vllm_duo.default_model
case "${1:-}" in
    bundled) pattern=patterns/SmolLM2-135M-Instruct; dest=docs/results/eval_smollm2_bundled ;;
    calibrated) pattern="$here"; dest=docs/results/eval_smollm2 ;;
    *) echo "usage: $0 bundled|calibrated" >&2; exit 2 ;;
esac
work="${VLLM_DUO_EVAL_WORK:-$root/.cache/eval-smollm2}"
.venv/bin/vllm-duo eval "$model" --pattern "$pattern" \
    --baseline calibration-runs/SmolLM2-135M-Instruct-attention-mass \
    --dtype float32 --out "$work"
mkdir -p "$dest"
cp "$work"/eval.json "$work"/*.png "$dest"/
