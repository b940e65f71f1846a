"""The whole MoE layer, router included, against SonicMoE's layer in one process: bf16 SwiGLU,
forward (no grad) and forward+backward, per shape; gatedmoe with gate="topk_softmax", "sigmoid"
(bias balancing) and "group_limited" (8 groups, 4 kept, bias balancing; E/2 groups of two, half
kept, below 16 experts), backend triton; gatedmoe's grouped backend ("gm_grouped": topk_softmax
over `torch._grouped_mm`); ScatterMoE's experts behind a top-k softmax router ("scattermoe").
Each layer computes what it computes by default (gatedmoe: router on the tensor cores with
float32 logits, load-balance and z losses, the input check; SonicMoE: its router and its switch
loss; ScatterMoE: no auxiliary loss).

Every implementation is built and compiled first; then ``--rounds`` rounds time each in turn
(median of ``--reps`` steps per round, CUDA events, a sync after each step as the peers'
scripts do). The table gives the median over rounds with [min-max].

On the GPU machine, SonicMoE installed as `../shared/peers/run.sh` installs it (under
/tmp/site) and its compile cache kept between calls (its per-shape autotuning and CuTe
compilation outlast a 10-minute call; QUACK_CACHE_DIR keeps both), ScatterMoE from `.peers`::

    export QUACK_CACHE_DIR=/tmp/qc QUACK_CACHE_AUTOTUNING=1 QUACK_COMPILE_WORKERS=16
    PYTHONPATH=src:.peers:/tmp/site:/tmp/site/nvidia_cutlass_dsl/python_packages \\
        python3 benchmarks/layer_peers.py --shapes fine256 --out $OUT/layer_peers.json

`benchmarks/gpu_peers.sh` does all of it in one device call and hands the cache back in $OUT
(qc.tgz) for the next call to carry in, until SonicMoE's compile for the shapes is done.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
from layer_profile import SHAPES  # benchmarks/, beside this script

from gatedmoe import MoE
from gatedmoe.bench import time_samples

GATES = {"gm_topk_softmax": "topk_softmax", "gm_sigmoid": "sigmoid", "gm_group_limited": "group_limited"}


def build(impl: str, T: int, d: int, h: int, E: int, k: int) -> tuple[torch.nn.Module, Callable]:
    """The layer and a function from x to its output [T, d]."""
    if impl == "sonicmoe":
        from sonicmoe import MoE as SonicMoE
        from sonicmoe.enums import ActivationType

        m = SonicMoE(E, k, d, h, ActivationType.SWIGLU, add_bias=False, std=0.02).cuda().to(torch.bfloat16)
        return m, lambda x: m(x)[0]
    if impl == "scattermoe":
        # ScatterMoE ships experts only: its GLU MLP behind the router every top-k softmax layer
        # has (bf16 linear, float32 softmax, top-k, renormalised), as transformers' Mixtral.
        from scattermoe.mlp import GLUMLP

        m = torch.nn.ModuleDict({"router": torch.nn.Linear(d, E, bias=False),
                                 "experts": GLUMLP(d, h, E, k, activation=torch.nn.SiLU())}).cuda().to(torch.bfloat16)

        def scatter(x: torch.Tensor) -> torch.Tensor:
            w, idx = torch.softmax(m["router"](x).float(), -1).topk(k, -1)
            return m["experts"](x, (w / w.sum(-1, keepdim=True)).to(x.dtype), idx)

        return m, scatter
    if impl == "gm_grouped":  # our plain torch._grouped_mm backend, same layer otherwise
        m = MoE(d, E, h, k=k, gate="topk_softmax", activation="swiglu", backend="grouped").cuda().to(torch.bfloat16)
        return m, m
    gate = GATES[impl]
    kw: dict = {} if gate == "topk_softmax" else {"bias_update_rate": 1e-3}
    if gate == "group_limited":
        # DeepSeek-V3's 8 groups, 4 kept; with fewer than 16 experts (Mixtral's 8), groups of two
        n_group = 8 if E >= 16 else E // 2
        kw["gate_kwargs"] = {"n_group": n_group, "topk_group": max(1, n_group // 2)}
    m = MoE(d, E, h, k=k, gate=gate, activation="swiglu", backend="triton", **kw).cuda().to(torch.bfloat16)
    return m, m


def dense_ceiling(dev: torch.device) -> float:
    """TFLOP/s of one bf16 8192^3 GEMM, median of 20."""
    sq = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    return 2 * 8192**3 / statistics.median(time_samples(lambda: sq @ sq, dev, 3, 20)) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="fine256")
    ap.add_argument("--impls", default="sonicmoe,scattermoe,gm_grouped," + ",".join(GATES))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="layer_peers.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    peak = dense_ceiling(dev)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; dense bf16 ceiling {peak:.0f} TFLOP/s")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "peak_tflops": peak, "rows": []}
    for name in args.shapes.split(","):
        T, d, h, E, k = SHAPES[name]
        flops = 3 * T * k * 3 * 2 * d * h  # forward+backward of the expert GEMMs
        x = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
        gy = torch.randn_like(x)
        steps = {}
        row: dict = {"shape": name, "T_d_h_E_k": [T, d, h, E, k]}
        for impl in args.impls.split(","):
            try:
                m, f = build(impl, T, d, h, E, k)
                xg = x.clone().requires_grad_()

                def fwd(f=f, x=x) -> None:
                    with torch.no_grad():
                        f(x)

                def fwd_bwd(m=m, f=f, xg=xg, gy=gy) -> None:
                    m.zero_grad(set_to_none=True)
                    xg.grad = None
                    f(xg).backward(gy)

                fwd_bwd()  # compiles (SonicMoE: autotunes) before any timing
                fwd()
                torch.cuda.synchronize()
                steps[impl] = (fwd, fwd_bwd)
                row[impl] = {"fwd_ms": [], "fwd_bwd_ms": [], "peak_gib": 0.0}
            except Exception as ex:  # a peer that fails is reported, not fatal
                row[impl] = {"error": repr(ex)[:300]}
                print(name, impl, "FAILED", repr(ex)[:300], flush=True)
        for _ in range(args.rounds):
            for impl, (fwd, fwd_bwd) in steps.items():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                r = row[impl]
                r["fwd_ms"].append(statistics.median(time_samples(fwd, dev, 3, args.reps)))
                r["fwd_bwd_ms"].append(statistics.median(time_samples(fwd_bwd, dev, 3, args.reps)))
                r["peak_gib"] = max(r["peak_gib"], (torch.cuda.max_memory_allocated() - base) / 2**30)
        for impl in steps:
            r = row[impl]
            fb = statistics.median(r["fwd_bwd_ms"])
            r["ceiling_fraction"] = flops / (fb * 1e-3) / 1e12 / peak
            print(f"{name:12s} {impl:18s} fwd {statistics.median(r['fwd_ms']):7.3f} ms "
                  f"[{min(r['fwd_ms']):.3f}-{max(r['fwd_ms']):.3f}]  fwd+bwd {fb:7.3f} ms "
                  f"[{min(r['fwd_bwd_ms']):.3f}-{max(r['fwd_bwd_ms']):.3f}] ({r['ceiling_fraction'] * 100:4.1f}%)  "
                  f"peak {r['peak_gib']:.2f} GiB", flush=True)
        result["rows"].append(row)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
        del steps
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
