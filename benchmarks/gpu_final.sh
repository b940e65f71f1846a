#!/usr/bin/env bash
# One device call for the session's closing numbers: CUDA tests of the dispatch backends, the
# four GPU shapes with the library's own Triton configs, expert parallelism on one GPU (NCCL),
# Hugging Face blocks original vs patched, and a short LM training run on the GPU.
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
python3 -m pytest tests/dispatch -q -p no:cacheprovider 2>&1 | tail -3
python3 -m gatedmoe.cli bench --shape gpu --backend bare_grouped_mm,grouped,triton --reps 20 \
  --json "$OUT/bench_final.json" 2>&1 | grep -v "^---" | tee "$OUT/bench_final.txt"
python3 -m gatedmoe.cli bench --ep 1 --device cuda --tokens 16384 --d-model 2048 --d-hidden 1408 --experts 8 --k 6 \
  --steps 10 --json "$OUT/ep1.json" 2>&1 | tail -8
python3 benchmarks/hf_patch.py --device cuda --repeats 20 --warmup 3 2>&1 | tail -12
python3 -m gatedmoe.cli train --device cuda --steps 60 --eval-every 30 --no-progress --sample 0 --out /tmp/lm 2>&1 | head -3
