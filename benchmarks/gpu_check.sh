#!/usr/bin/env bash
# The ONE prepared script for a GPU machine (torch + Triton + nvcc; vLLM and network optional):
#   1. builds the CUDA extension vllm_duo._C in place (csrc/ -> vllm_duo/_C*.so),
#   2. kernel-level GPU tests (pytest -k gpu): the csrc decode kernel, the Triton kernels, and
#      one layer of the GPU kernel family (GpuKernels.forward_run on real strided caches,
#      against the fp32 reference, under torch.cuda.set_sync_debug_mode("error")),
#   3. benchmarks the csrc decode kernel and the Triton decode/prefill kernels,
#   4. when a CUDA build of vLLM imports here: the engine-level reference comparisons on
#      vLLM's CUDA platform (tests/test_gpu_engine.py) and `vllm-duo bench --quick`;
#      otherwise one line says so and those are skipped.
# Prints a summary table last. Logs go to $OUT (the device tool's folder) when set, else
# /tmp/duo-gpu-check.
# Usage: bash benchmarks/gpu_check.sh [--quick]     (about 6-10 minutes on an H200 without
# vLLM; the engine checks and the quick bench add about 5-8 minutes). DUO_GPU_CHECK_NO_BUILD=1
# reuses an extension built before (a rerun).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-/tmp/duo-gpu-check}"
mkdir -p "$LOG_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
unset VLLM_DUO_SKIP_CUDA_BUILD
QUICK="${1:-}"
status=0
SUMMARY=()

# record NAME STATUS SECONDS: one row of the summary table; a failure fails the script.
record() {
  SUMMARY+=("$(printf '%-34s %-8s %5s s' "$1" "$2" "$3")")
  if [ "$2" = FAILED ]; then status=1; fi
}

# step NAME LOG -- COMMAND...: runs COMMAND, tees its output to LOG_DIR/LOG (last 40 lines
# shown), records PASSED/FAILED and the time.
step() {
  local name="$1" log="$2" start rc
  shift 3
  echo "== $name"
  start=$(date +%s)
  "$@" 2>&1 | tee "$LOG_DIR/$log" | tail -40
  rc=${PIPESTATUS[0]}
  record "$name" "$([ "$rc" -eq 0 ] && echo PASSED || echo FAILED)" $(( $(date +%s) - start ))
}

summary() {
  echo
  echo "== summary ($LOG_DIR)"
  printf '%s\n' "${SUMMARY[@]}"
}

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU")'
nvcc --version | tail -2

echo "== build (vllm_duo/_build_cuda.py)"
start=$(date +%s)
if [ "${DUO_GPU_CHECK_NO_BUILD:-}" = 1 ]; then
  # Rerun with the extension built by an earlier run (or check the script without nvcc).
  echo "skipped (DUO_GPU_CHECK_NO_BUILD=1): $(ls vllm_duo/_C*.so 2>/dev/null || echo 'no extension')"
  record "build csrc/" SKIPPED 0
elif ! MAX_JOBS="${MAX_JOBS:-8}" "$PY" -m vllm_duo._build_cuda >"$LOG_DIR/build.log" 2>&1; then
  tail -60 "$LOG_DIR/build.log"
  echo "BUILD FAILED (full log: $LOG_DIR/build.log)"
  record "build csrc/" FAILED $(( $(date +%s) - start ))
  summary
  exit 1
else
  echo "built in $(( $(date +%s) - start )) s: $(ls vllm_duo/_C*.so)"
  grep -E "spill|warning" "$LOG_DIR/build.log" | head -20 || true
  record "build csrc/" PASSED $(( $(date +%s) - start ))
fi

KERNEL_TESTS=(-q --noconftest -p no:cacheprovider)
step "csrc decode kernel tests" pytest.log -- \
  "$PY" -m pytest tests/test_csrc_compile.py -x -k gpu "${KERNEL_TESTS[@]}"
step "Triton kernel tests" pytest_triton.log -- \
  "$PY" -m pytest tests/test_triton_kernels.py -k gpu "${KERNEL_TESTS[@]}"
step "GPU family layer tests" pytest_layer.log -- \
  "$PY" -m pytest tests/test_gpu_family_layer.py -s -k test_gpu_layer "${KERNEL_TESTS[@]}"

# shellcheck disable=SC2086  # QUICK is empty or one flag
step "csrc decode benchmark" bench.log -- \
  "$PY" benchmarks/bench_decode_kernel.py $QUICK --json "$LOG_DIR/bench.json"
# shellcheck disable=SC2086
step "Triton kernel benchmark" bench_triton.log -- \
  "$PY" benchmarks/bench_triton_kernels.py $QUICK --json "$LOG_DIR/bench_triton.json"

# Engine-level checks need a CUDA build of vLLM and vllm-duo installed (its plugin entry
# point is how vLLM's processes load it).
if "$PY" -c '
from vllm.platforms import current_platform
assert current_platform.is_cuda(), f"vLLM runs on {current_platform.device_type}, not CUDA"
' >"$LOG_DIR/vllm_probe.log" 2>&1; then
  if ! "$PY" -c 'import importlib.metadata as m; m.version("vllm-duo")' >/dev/null 2>&1; then
    echo "== installing vllm-duo (editable, no dependencies, no build isolation)"
    "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . \
      >"$LOG_DIR/install.log" 2>&1 || tail -20 "$LOG_DIR/install.log"
  fi
  step "engine vs fp32 reference (CUDA)" pytest_engine.log -- \
    "$PY" -m pytest tests/test_gpu_engine.py -q -s -p no:cacheprovider -rs
  step "vllm-duo bench --quick" bench_quick.log -- \
    "$PY" -m vllm_duo.cli bench --quick --out "$LOG_DIR/bench-quick"
else
  why=$(grep -v '^\s*$' "$LOG_DIR/vllm_probe.log" | tail -1)
  echo "== vLLM engine checks skipped: no CUDA build of vLLM imports here (${why:-unknown})"
  record "engine vs fp32 reference (CUDA)" SKIPPED 0
  record "vllm-duo bench --quick" SKIPPED 0
fi

summary
exit $status
