# Sourced by run.sh and eval.sh: this folder, the repository root as the working directory,
# and the default model (prepared if missing), so both scripts use the same model directory.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
model="$HOME/.cache/vllm-duo/models/SmolLM2-135M-Instruct"
[ -d "$model" ] || .venv/bin/python -m vllm_duo.default_model
