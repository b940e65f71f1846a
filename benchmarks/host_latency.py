"""Host timeline of one triton forward (small shape): microseconds from the call to each
kernel launch, and how long the GPU then waits.

    OUT=dir python3 benchmarks/host_latency.py [--shape small]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gatedmoe.bench import SHAPES, balanced_routing
from gatedmoe.dispatch import get_backend
from gatedmoe.dispatch.triton import ops
from gatedmoe.experts import ExpertBank

STAMPS: list[tuple[str, float]] = []


def _wrap(name: str, fn):
    def inner(*a, **k):
        STAMPS.append((f"{name} start", time.perf_counter()))
        out = fn(*a, **k)
        STAMPS.append((f"{name} end", time.perf_counter()))
        return out
    return inner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="small")
    args = ap.parse_args()
    dev = torch.device("cuda")
    s = SHAPES[args.shape]
    r = balanced_routing(s.tokens, s.n_experts, s.k, dev, torch.Generator(device=dev).manual_seed(0))
    bank = ExpertBank(s.n_experts, s.d_model, s.d_hidden).to(dev, torch.bfloat16)
    x = torch.randn(s.tokens, s.d_model, device=dev, dtype=torch.bfloat16)
    fn = get_backend("triton", dev)
    for name in ("launch_glu_fwd", "launch_gemm", "kernel_configs", "_scatter_buffer"):
        setattr(ops, name, _wrap(name, getattr(ops, name)))
    runs: dict[str, list[float]] = {}
    for i in range(60):
        torch.cuda.synchronize()
        STAMPS.clear()
        t0 = time.perf_counter()
        with torch.no_grad():
            fn(x, r, bank)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        if i >= 10:
            for name, t in STAMPS + [("return", t1)]:
                runs.setdefault(name, []).append((t - t0) * 1e6)
    for name, v in runs.items():
        print(f"{statistics.median(v):8.1f} us  {name}")


if __name__ == "__main__":
    main()
