#!/usr/bin/env bash
# One device call: CUDA tests of the grouped and Triton backends, then the four GPU shapes
# with bare grouped GEMM, grouped and triton. Usage: OUT=dir bash benchmarks/gpu_triton.sh
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest tests/dispatch -q -x -p no:cacheprovider 2>&1 | tail -6 | tee "$OUT/tests.txt"
python3 -m gatedmoe.cli bench --shape gpu --backend bare_grouped_mm,grouped,triton --reps 20 \
  --json "$OUT/bench_triton.json" 2>&1 | tee "$OUT/bench_triton.txt"
