"""Kernel-level profile of one backend's forward+backward on one GPU shape (torch.profiler).

    OUT=dir python3 benchmarks/profile_triton.py [--shape mixtral] [--backend triton]

Prints the CUDA kernels sorted by total time and writes $OUT/profile_<backend>_<shape>.txt.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from gatedmoe.bench import SHAPES, balanced_routing
from gatedmoe.dispatch import get_backend
from gatedmoe.experts import ExpertBank
from gatedmoe.layers.moe import MoE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="mixtral", choices=list(SHAPES))
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layer", action="store_true", help="profile the whole MoE layer (gate and routing too)")
    ap.add_argument("--sort", default=None, help="profiler sort key (default: host time with --layer, else CUDA time)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    s = SHAPES[args.shape]
    r = balanced_routing(s.tokens, s.n_experts, s.k, dev, torch.Generator(device=dev).manual_seed(0))
    bank = ExpertBank(s.n_experts, s.d_model, s.d_hidden).to(dev, torch.bfloat16)
    x = torch.randn(s.tokens, s.d_model, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(s.tokens, s.d_model, device=dev, dtype=torch.bfloat16)
    fn = get_backend(args.backend, dev)
    moe = MoE(s.d_model, s.n_experts, s.d_hidden, k=s.k, backend=args.backend, check_inputs=False).to(dev, torch.bfloat16)

    def step() -> None:
        if args.layer:
            moe.zero_grad(set_to_none=True)
            moe(x).backward(gy)
            return
        bank.zero_grad(set_to_none=True)
        fn(x, r, bank).backward(gy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    sort = args.sort or ("cpu_time_total" if args.layer else "cuda_time_total")
    table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70)
    print(table)
    out = os.environ.get("OUT", "/tmp/out")
    with open(os.path.join(out, f"profile_{args.backend}_{args.shape}{'_layer' if args.layer else ''}.txt"), "w") as f:
        f.write(table)


if __name__ == "__main__":
    main()
