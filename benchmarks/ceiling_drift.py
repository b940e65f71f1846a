"""How much the dense-GEMM ceiling moves within one run, and with its warm-up (one GPU call):

    OUT=dir python3 benchmarks/ceiling_drift.py

Measures the ceiling as `gatedmoe bench` does (cold card, 3 warm-up products, median of 10),
then with a long warm-up (200 products, median of 50); then, twice over the four GPU shapes,
the triton forward+backward followed at once by the ceiling again (20 warm-up, median of 30).
Writes $OUT/ceiling_drift.json.
"""

from __future__ import annotations

import json
import os

import torch

from gatedmoe.bench import SHAPES, bench_dispatch, dense_ceiling


def main() -> None:
    dev, dtype = torch.device("cuda"), torch.bfloat16
    out = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out, exist_ok=True)
    res = {"cold": dense_ceiling(dev, dtype), "long_warmup": dense_ceiling(dev, dtype, warmup=200, reps=50), "cycles": []}
    print(f"ceiling cold {res['cold']:.1f}, after a long warm-up {res['long_warmup']:.1f} TFLOP/s", flush=True)
    for cycle in range(2):
        for name in ("mixtral", "deepseek", "small", "finegrained"):
            rows = bench_dispatch(SHAPES[name], backends=["triton"], device=dev, reps=20, ceiling=res["cold"])
            after = dense_ceiling(dev, dtype, warmup=20, reps=30)
            fb = next(r for r in rows if r["pass"] == "fwd+bwd")
            rec = dict(cycle=cycle, shape=name, ms=fb["ms"], tflops=fb["tflops"], ceiling_after=after,
                       pct_cold=100 * fb["tflops"] / res["cold"], pct_after=100 * fb["tflops"] / after)
            res["cycles"].append(rec)
            print(f"cycle {cycle} {name:12s} fwd+bwd {fb['ms']:7.3f} ms {fb['tflops']:6.1f} TFLOP/s | ceiling right after "
                  f"{after:6.1f} | {rec['pct_cold']:5.1f}% of cold, {rec['pct_after']:5.1f}% of adjacent", flush=True)
    with open(os.path.join(out, "ceiling_drift.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
