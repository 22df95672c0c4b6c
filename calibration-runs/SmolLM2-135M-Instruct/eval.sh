#!/usr/bin/env bash
# The evaluation that decides which pattern ships as patterns/SmolLM2-135M-Instruct: the
# default `vllm-duo eval` (held-out family, 1K-8K, 10 depths, sweep 0.25-0.9, agreement on
# Opticks) of a pattern against full attention, all-streaming, a random pattern and the
# attention-mass baseline (../SmolLM2-135M-Instruct-attention-mass).
#
#   eval.sh bundled     # the pattern shipped today           -> docs/results/eval_smollm2_bundled
#   eval.sh calibrated  # this folder's gates (after run.sh)  -> docs/results/eval_smollm2
#   eval.sh shared      # only the jobs both share (full, streaming, random, baseline)
#   eval.sh save        # keep the finished jobs' answers in eval-jobs/ (to commit)
#
# float32: on CPUs without AVX-512 vLLM's bf16 matrix products have no fast path (a bf16 run
# takes about 2.5 times as long there); the numbers are those of the same model in float32.
# Both runs write to one work folder, so the second reuses the jobs they share (full,
# streaming, random, baseline) and only runs its own pattern. The run spans sessions: the
# answers of finished jobs are kept in eval-jobs/ here (`eval.sh save`) and put back into the
# work folder first, where `vllm-duo eval` reuses them when their request is the same.
set -euo pipefail
source "$(dirname "$0")/common.sh"
work="${VLLM_DUO_EVAL_WORK:-$root/.cache/eval-smollm2}"
mkdir -p "$work/work" "$here/eval-jobs"
if [ "${1:-}" = save ]; then
    # A job is finished when its answers match its request's prompt count (eval checks again).
    for request in "$work"/work/*-generate.request.json; do
        [ -e "$request" ] || continue
        answers="${request%.request.json}.jsonl"
        want=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["prompts"]))' "$request")
        have=$(grep -c '"kind": "answer"' "$answers" 2>/dev/null || true)
        [ "$want" = "$have" ] && cp "$request" "$answers" "$here/eval-jobs/"
    done
    ls "$here/eval-jobs"
    exit 0
fi
cp -n "$here"/eval-jobs/* "$work/work/" 2>/dev/null || true
methods=full,duo,streaming,random,baseline
parts=()
case "${1:-}" in
    bundled) pattern=patterns/SmolLM2-135M-Instruct; dest=docs/results/eval_smollm2_bundled ;;
    calibrated) pattern="$here"; dest=docs/results/eval_smollm2 ;;
    # The jobs that do not depend on the pattern under test (the random one takes only the
    # shape of --pattern), run while the calibration is still going.
    shared) pattern=patterns/SmolLM2-135M-Instruct; dest=; methods=full,streaming,random,baseline
        parts=(--parts niah,sweep) ;;
    *) echo "usage: $0 bundled|calibrated|shared|save" >&2; exit 2 ;;
esac
.venv/bin/vllm-duo eval "$model" --pattern "$pattern" --methods "$methods" \
    --baseline calibration-runs/SmolLM2-135M-Instruct-attention-mass \
    --dtype float32 --out "$work" "${parts[@]}"
[ -n "$dest" ] || exit 0
mkdir -p "$dest"
cp "$work"/eval.json "$work"/*.png "$dest"/
