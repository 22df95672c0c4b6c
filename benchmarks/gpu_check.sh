#!/usr/bin/env bash
# The ONE prepared script for a GPU machine (torch + nvcc, no vLLM, no network needed):
#   1. builds the CUDA extension vllm_duo._C in place (csrc/ -> vllm_duo/_C*.so),
#   2. runs the GPU tests of tests/test_csrc_compile.py and tests/test_triton_kernels.py
#      (pytest -k gpu),
#   3. benchmarks the sink+window decode kernel (benchmarks/bench_decode_kernel.py) and the
#      Triton decode/prefill kernels (benchmarks/bench_triton_kernels.py).
# Logs go to $OUT (the device tool's folder) when set, else /tmp/duo-gpu-check.
# Usage: bash benchmarks/gpu_check.sh [--quick]     (about 5-8 minutes on an H200)
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-/tmp/duo-gpu-check}"
mkdir -p "$LOG_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
unset VLLM_DUO_SKIP_CUDA_BUILD
QUICK="${1:-}"
status=0

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")'
nvcc --version | tail -2

echo "== build (vllm_duo/_build_cuda.py)"
start=$(date +%s)
if ! MAX_JOBS="${MAX_JOBS:-8}" "$PY" -m vllm_duo._build_cuda >"$LOG_DIR/build.log" 2>&1; then
  tail -60 "$LOG_DIR/build.log"
  echo "BUILD FAILED (full log: $LOG_DIR/build.log)"
  exit 1
fi
echo "built in $(( $(date +%s) - start )) s: $(ls vllm_duo/_C*.so)"
grep -E "spill|warning" "$LOG_DIR/build.log" | head -20 || true

echo "== GPU tests"
start=$(date +%s)
"$PY" -m pytest tests/test_csrc_compile.py -k gpu -q -x --noconftest -p no:cacheprovider \
  2>&1 | tee "$LOG_DIR/pytest.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "tests took $(( $(date +%s) - start )) s"

echo "== Triton GPU tests"
start=$(date +%s)
"$PY" -m pytest tests/test_triton_kernels.py -k gpu -q --noconftest -p no:cacheprovider \
  2>&1 | tee "$LOG_DIR/pytest_triton.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "Triton tests took $(( $(date +%s) - start )) s"

echo "== benchmark"
"$PY" benchmarks/bench_decode_kernel.py $QUICK --json "$LOG_DIR/bench.json" \
  2>&1 | tee "$LOG_DIR/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== Triton benchmark"
"$PY" benchmarks/bench_triton_kernels.py $QUICK --json "$LOG_DIR/bench_triton.json" \
  2>&1 | tee "$LOG_DIR/bench_triton.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
