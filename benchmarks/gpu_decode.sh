#!/usr/bin/env bash
# One device call for issue 21 (decode path): the CUDA tests of the decode path, then
# benchmarks/decode.py in its two modes. Each step has its own time limit so a slow one leaves
# the others' output; everything lands in $OUT (tables, JSON, the plot).
#   OUT=$OUT bash benchmarks/gpu_decode.sh            # ~5-6 minutes (caps add up to 9)
#   SWEEP=1 OUT=$OUT bash benchmarks/gpu_decode.sh    # + decode config sweep (a second call)
set -uo pipefail
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
if [ "${SWEEP:-0}" = "1" ]; then
  timeout 560 python3 benchmarks/decode.py --sweep --no-graph --reps 20 --tokens 1 8 64 --out "$OUT/decode_sweep.json" 2>&1 \
    | tee "$OUT/decode_sweep.txt" | grep -E "sweep|HBM|\[|Error|error" | head -80
  exit 0
fi
timeout 200 python3 -m pytest tests/dispatch/test_triton_decode_cuda.py -q -p no:cacheprovider 2>&1 \
  | tee "$OUT/tests_decode_cuda.txt" | tail -15
timeout 60 python3 -m pytest tests/dispatch/test_triton_decode.py -q -p no:cacheprovider 2>&1 \
  | tee "$OUT/tests_decode.txt" | tail -5
timeout 160 python3 benchmarks/decode.py --out "$OUT/decode.json" 2>&1 | tee "$OUT/decode.txt" | tail -45
timeout 120 python3 benchmarks/decode.py --mode generate --gen-layers 4 --out "$OUT/generate.json" 2>&1 \
  | tee "$OUT/generate.txt" | tail -14
