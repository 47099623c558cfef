#!/usr/bin/env bash
# Builds (here, with nvcc for sm_90a) and/or runs the MXFP4 GEMV laboratory.
#   bench/gemv_lab/run.sh build   # -> build-lab/gemv_lab (carry build-lab to the device)
#   bench/gemv_lab/run.sh run     # on the device: checks, then timings; log under $OUT (or build-lab/)
#   bench/gemv_lab/run.sh run --quick --v4   # the backend's version 4 only (timings; its checks: gpu_check gemv4_kernel)
#   bench/gemv_lab/run.sh run --quick --v5   # version 5 (wgmma FP8, not in the backend): its checks, then timings vs v4
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-all}" in
  build|all)
    mkdir -p build-lab
    "${NVCC:-/usr/local/cuda/bin/nvcc}" -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -Xptxas -v \
      -Isrc -o build-lab/gemv_lab bench/gemv_lab/gemv_lab.cu src/backend/cuda/cuda_mxfp4_gemv.cu -lcublas 2>&1 | grep -E "error|warning|registers|spill" || true
    ;;&
  run|all)
    out=${OUT:-build-lab}
    nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader || true
    build-lab/gemv_lab "${@:2}" 2>&1 | tee "$out/gemv_lab.log"
    ;;
esac
