"""Measure each Triton kernel of the fused backend under several tile configs, beside the
torch._grouped_mm product doing the same GEMM, on the four GPU shapes; then time the whole
backend end to end with the best configs (passed as ``TritonOptions(configs=...)``) beside
the measured ones of `gatedmoe.dispatch.triton.config`. One GPU call:

    OUT=dir python3 benchmarks/triton_tune.py

Writes $OUT/triton_tune.json (every timing, the best config per kernel and shape) and
prints the best configs; it never changes the tables: copy numbers that hold up into
`config.py` by hand, with where they were measured.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from triton.testing import do_bench

from gatedmoe.bench import SHAPES, balanced_routing, dense_ceiling
from gatedmoe.dispatch import TritonOptions
from gatedmoe.dispatch.triton import triton_dispatch
from gatedmoe.dispatch.triton.config import KernelConfig
from gatedmoe.dispatch.triton.launchers import launch_gemm, launch_glu_fwd, launch_swiglu_bwd
from gatedmoe.experts import ExpertBank

# (BM, BN, BK, warps, stages, group_m, tma, pregather)
K_CONFIGS = {
    "glu": [KernelConfig(*c) for c in [(128, 128, 64, 8, 4, 8, True, False), (128, 64, 64, 8, 4, 8, True, False),
                                         (128, 128, 64, 8, 4, 8, True, True), (128, 128, 64, 8, 3, 8, True, True),
                                         (128, 64, 64, 8, 4, 8, True, True), (128, 64, 64, 4, 4, 8, True, True),
                                         (64, 128, 64, 4, 4, 8, True, True), (128, 128, 64, 8, 4, 16, True, True)]],
    "gemm": [KernelConfig(*c) for c in [(128, 256, 64, 8, 3, 8, True, False), (128, 256, 64, 8, 4, 8, True, False),
                                          (128, 128, 64, 4, 3, 8, False, False), (128, 128, 64, 8, 4, 16, True, False),
                                          (128, 256, 64, 8, 3, 8, True, True), (128, 256, 64, 8, 4, 8, True, True),
                                          (128, 128, 64, 8, 4, 8, True, True), (128, 128, 128, 8, 3, 8, True, True)]],
}


def _best(fn, configs: list[KernelConfig]) -> tuple[float, KernelConfig, list]:
    timings = []
    for c in configs:
        try:
            ms = do_bench(lambda c=c: fn(c), warmup=5, rep=50, return_mode="median")
        except Exception as e:  # e.g. out of shared memory for this config
            print(f"  {c}: failed {type(e).__name__}", flush=True)
            continue
        timings.append((ms, c))
    ms, c = min(timings, key=lambda t: t[0])
    return ms, c, timings


def tune_shape(name: str, ceiling: float) -> dict:
    """Time every kernel config and the grouped_mm peers on one shape; end to end with the best."""
    dev, dtype = torch.device("cuda"), torch.bfloat16
    s = SHAPES[name]
    T, D, H, E, K = s.tokens, s.d_model, s.d_hidden, s.n_experts, s.k
    r = balanced_routing(T, E, K, dev, torch.Generator(device=dev).manual_seed(0))
    N = r.n_assignments
    bank = ExpertBank(E, D, H).to(dev, dtype)
    w_in, w_out = bank.w_in.detach(), bank.w_out.detach()
    x = torch.randn(T, D, device=dev, dtype=dtype)
    gy = torch.randn(T, D, device=dev, dtype=dtype)
    h = torch.empty(N, 2 * H, device=dev, dtype=dtype)
    a = torch.randn(N, H, device=dev, dtype=dtype)
    a2 = torch.empty_like(a)
    gh = torch.randn(N, 2 * H, device=dev, dtype=dtype)
    y32 = torch.zeros(T, D, device=dev)
    gw = torch.zeros(N, device=dev)
    counts = r.counts
    offs = r.offsets.to(torch.int32)
    xs = x.index_select(0, r.token)
    flops = {"glu_fwd": 4 * N * D * H, "gemm_fwd": 2 * N * H * D, "glu_bwd": 2 * N * D * H, "gemm_bwd": 4 * N * H * D}
    gys = gy.index_select(0, r.token)

    def glu_fwd(c: KernelConfig) -> None:
        # The pre-gathered variant pays for its copy here: forward makes it for this GEMM alone.
        if c.pregather:
            launch_glu_fwd(x.index_select(0, r.token), r.token, w_in, h, a, counts, N, D, H, c, "tf32", gathered=True)
        else:
            launch_glu_fwd(x, r.token, w_in, h, a, counts, N, D, H, c, "tf32")

    def glu_bwd(c: KernelConfig) -> None:
        # Backward gathers gy for the W_out gradient anyway, so the copy is not charged here.
        launch_gemm(gys if c.pregather else gy, w_out, (D * H, H, 1), a, r.token, r.weight, counts, N, D, H,
                    gather=not c.pregather, scale=False, scatter=False, cfg=c, prec="tf32")

    kernels = {
        "glu_fwd": glu_fwd,
        "gemm_fwd": lambda c: launch_gemm(a, w_out, (D * H, 1, H), y32, r.token, r.weight, counts, N, H, D,
                                          gather=False, scale=True, scatter=True, cfg=c, prec="tf32"),
        "glu_bwd": glu_bwd,
        "gemm_bwd": lambda c: launch_gemm(gh, w_in, (2 * H * D, D, 1), y32, r.token, r.weight, counts, N, 2 * H, D,
                                          gather=False, scale=False, scatter=True, cfg=c, prec="tf32"),
    }
    peers = {
        "glu_fwd": lambda: torch._grouped_mm(xs, w_in.transpose(-2, -1), offs=offs),
        "gemm_fwd": lambda: torch._grouped_mm(a, w_out.transpose(-2, -1), offs=offs),
        "glu_bwd": lambda: torch._grouped_mm(xs, w_out, offs=offs),
        "gemm_bwd": lambda: torch._grouped_mm(gh, w_in, offs=offs),
        "wgrad_in": lambda: torch._grouped_mm(gh.t(), xs, offs=offs),
        "wgrad_out": lambda: torch._grouped_mm(xs.t(), a, offs=offs),
        "gather_x": lambda: x.index_select(0, r.token),
        "scatter_y": lambda: torch.zeros(T, D, device=dev, dtype=dtype).index_add_(0, r.token, xs),
        "swiglu_bwd_triton": lambda: launch_swiglu_bwd(a, h, r.weight, gh, a2, gw, N, H),
    }
    row = {"label": s.label(), "kernels": {}, "peers_ms": {}}
    for key, fn in peers.items():
        row["peers_ms"][key] = do_bench(fn, warmup=5, rep=50, return_mode="median")
    best = {}
    for key, fn in kernels.items():
        configs = K_CONFIGS["glu" if key == "glu_fwd" else "gemm"]
        if key in ("gemm_fwd", "gemm_bwd"):  # nothing to gather
            configs = [c for c in configs if not c.pregather]
        ms, c, timings = _best(fn, configs)
        best[key] = c
        peer = row["peers_ms"][key]
        row["kernels"][key] = {"best": c.__dict__, "ms": ms, "tflops": flops[key] / ms / 1e9, "peer_ms": peer,
                               "all": [(t, cc.__dict__) for t, cc in timings]}
        print(f"{name:12s} {key:9s} best {c} {ms:.3f} ms {flops[key] / ms / 1e9:.0f} TFLOP/s | grouped_mm {peer:.3f} ms",
              flush=True)
    print(f"{name:12s} peers: " + ", ".join(f"{k} {v:.3f}" for k, v in row["peers_ms"].items()), flush=True)
    print(f"{name:12s} best: TritonOptions(configs={best!r})", flush=True)
    row["end_to_end"] = _end_to_end(x, gy, r, bank, best, 6 * N * D * H, ceiling)
    return row


def _end_to_end(x, gy, r, bank, best: dict[str, KernelConfig], fwd_flops: int, ceiling: float) -> dict:
    """Forward and forward+backward of the backend, measured configs vs ``best``."""
    xg = x.detach().requires_grad_(True)
    out = {}
    for tag, options in (("measured", TritonOptions()), ("tuned", TritonOptions(configs=best))):
        def fwd(options=options):
            with torch.no_grad():
                triton_dispatch(x, r, bank, options=options)

        def fwd_bwd(options=options):
            bank.zero_grad(set_to_none=True)
            triton_dispatch(xg, r, bank, options=options).backward(gy)

        for pass_name, fn, flops in (("fwd", fwd, fwd_flops), ("fwd+bwd", fwd_bwd, 3 * fwd_flops)):
            ms = do_bench(fn, warmup=5, rep=100, return_mode="median")
            out[f"{tag} {pass_name}"] = {"ms": ms, "fraction": flops / ms / 1e9 / ceiling}
            print(f"  {tag:8s} {pass_name:8s} {ms:.3f} ms {flops / ms / 1e9 / ceiling:.1%} of ceiling", flush=True)
    return out


def main() -> None:
    out = os.environ.get("OUT", "/tmp/out")
    ceiling = dense_ceiling(torch.device("cuda"), torch.bfloat16)
    print(f"{torch.cuda.get_device_name()} ceiling {ceiling:.1f} TFLOP/s", flush=True)
    results = {"ceiling": ceiling, "shapes": {}}
    for name in ("mixtral", "deepseek", "small", "finegrained"):
        results["shapes"][name] = tune_shape(name, ceiling)
        torch.cuda.empty_cache()
    with open(os.path.join(out, "triton_tune.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
