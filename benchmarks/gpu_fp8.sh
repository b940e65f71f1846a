#!/usr/bin/env bash
# One device call (<= 6 min) for the FP8 path of issue 20: the FP8 benchmark first (the script
# gates each variant on its accuracy against a float32 run before timing it, and writes its
# JSON after every shape), then the FP8 tests on CUDA (kernels bit for bit / against the FP8
# reference, dispatch within FP8's rounding bound).
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_capability())"
timeout 250 python3 benchmarks/fp8.py --out "$OUT/fp8.json" --budget-s 170 2>&1 | tee "$OUT/fp8_bench.txt" \
  | grep -E '^(SUMMARY|machine|ceilings|wrote|Traceback|[A-Za-z]*Error)' | tail -80
timeout 90 python3 -m pytest tests/dispatch/test_fp8.py tests/dispatch/test_fp8_reference.py -q -rfE \
  -p no:cacheprovider 2>&1 | tee "$OUT/fp8_tests.txt" | tail -25
