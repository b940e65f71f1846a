#!/usr/bin/env bash
# One device call of a comparison with SonicMoE, resumable across calls: SonicMoE autotunes and
# compiles its CuTe kernels per shape for longer than a 10-minute call on a fresh machine, so its
# cache (QUACK_CACHE_DIR) goes back in $OUT as qc.tgz at the end of every call, finished or not,
# and comes in from .peers/qc.tgz at the start of the next:
#   cp -r ../shared/peers .peers                          # once (55 MB; the carry limit is 64 MiB)
#   SHAPES=fine256 OUT=$OUT bash benchmarks/gpu_peers.sh  # carry [".peers"]; repeat after
#   cp <files_at>/qc.tgz .peers/qc.tgz                    # until the table prints
# WHAT=layer (default): the whole layer against SonicMoE's (`layer_peers.py`, issue 17).
# WHAT=experts: the peers' experts-given-top-k benchmark (`.peers/bench_experts.py`, IMPLS, one shape).
# WHAT=hf: the training step of a Hugging Face model through transformers' own "sonicmoe"
# experts implementation beside grouped_mm and gatedmoe (`hf_patch.py`, issue 18; FAMILIES).
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD/.peers:/tmp/site:/tmp/site/nvidia_cutlass_dsl/python_packages PYTHONUNBUFFERED=1
export QUACK_CACHE_DIR=/tmp/qc QUACK_CACHE_AUTOTUNING=1 QUACK_COMPILE_WORKERS=16
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/site "$QUACK_CACHE_DIR"
if [ ! -d /tmp/site/sonicmoe ]; then  # as .peers/run.sh installs it
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .peers/wheels/*.whl 2>&1 | tail -2
  tar xJf .peers/wheels/cutlass_cu13.tar.xz -C /tmp/site
fi
[ -f .peers/qc.tgz ] && tar xzf .peers/qc.tgz -C "$QUACK_CACHE_DIR" && echo "compile cache restored: $(du -sh "$QUACK_CACHE_DIR" | cut -f1)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ "${WHAT:-layer}" = experts ]; then  # the peers' experts-given-top-k benchmark, one shape
  OUT=$OUT/experts SHAPES=${SHAPES:-fine256} IMPLS=${IMPLS:-gm_triton,scattermoe,sonicmoe} timeout "${LIMIT:-500}" \
    python3 .peers/bench_experts.py 2>&1 | tee "$OUT/experts.txt" | grep -E " ms |FAILED|ceiling"
elif [ "${WHAT:-layer}" = hf ]; then
  timeout "${LIMIT:-500}" python3 benchmarks/hf_patch.py --preset gpu --modes train --repeats 10 --warmup 3 \
    --implementations grouped_mm sonicmoe --sonicmoe-local --families ${FAMILIES:-qwen3_moe} \
    --out "$OUT/hf_train.json" 2>&1 | tee "$OUT/hf_train.txt" | grep -v "^ *$" | tail -20
else
  timeout "${LIMIT:-500}" python3 benchmarks/layer_peers.py --shapes "${SHAPES:-fine256}" --rounds "${ROUNDS:-3}" \
    --reps 20 --out "$OUT/layer_peers.json" 2>&1 | tee "$OUT/layer_peers.txt" | grep -v "^ *$" | tail -20
fi
tar czf "$OUT/qc.tgz" -C "$QUACK_CACHE_DIR" . && echo "compile cache saved: $(du -sh "$OUT/qc.tgz" | cut -f1)"
