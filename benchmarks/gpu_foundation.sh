#!/usr/bin/env bash
# One device call: GPU correctness of the grouped path, then the foundation's benchmark table.
# Usage (on the lent GPU, from the repo root): OUT=/some/dir bash benchmarks/gpu_foundation.sh
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
python3 -m pytest tests/dispatch -q -x -k cuda -p no:cacheprovider 2>&1 | tail -4
python3 -m gatedmoe.cli bench --shape gpu --reps 20 --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
