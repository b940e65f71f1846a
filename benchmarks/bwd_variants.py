"""The Triton backward's pieces, each beside what it replaces, on the four GPU shapes (one GPU call):

    OUT=dir python3 benchmarks/bwd_variants.py [--shapes mixtral,small]

* ``glu_bwd``: ``ga = gy[token] @ W_out[e]`` with the SwiGLU backward fused into its epilogue,
  under several tile configs, against the plain product plus the elementwise kernel;
* ``wgrad_in`` / ``wgrad_out``: `kernels.wgrad_kernel` reading x / gy rows by token, under
  several configs, against the gathered copy plus ``torch._grouped_mm``;
* end to end: forward+backward of the backend with each combination of the two switches
  (``ops.FUSED_SWIGLU_BWD``, ``ops.TRITON_WGRAD``), gradients checked against the unfused one.

Writes $OUT/bwd_variants.json.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, replace

import torch
from triton.testing import do_bench

from gatedmoe.bench import SHAPES, _time, balanced_routing, dense_ceiling
from gatedmoe.dispatch.triton import ops, triton_dispatch
from gatedmoe.dispatch.triton.ops import KernelConfig, launch_gemm, launch_swiglu_bwd, launch_wgrad
from gatedmoe.experts import ExpertBank

GLU_BWD = [KernelConfig(*c) for c in [(128, 256, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4),
                                      (128, 128, 64, 4, 4), (64, 256, 64, 8, 4), (128, 128, 128, 8, 3)]]
WGRAD = [KernelConfig(*c) for c in [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
                                    (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 128, 8, 3),
                                    (64, 128, 64, 4, 4)]]


def _bench(fn) -> float:
    return do_bench(fn, warmup=5, rep=40, return_mode="median")


def _sweep(fn, configs) -> list[tuple[float, dict]]:
    out = []
    for c in configs:
        try:
            out.append((_bench(lambda c=c: fn(c)), asdict(c)))
        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
            print(f"  {c}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
    return sorted(out, key=lambda t: t[0])


def run_shape(name: str, ceiling: float) -> dict:
    dev, dtype = torch.device("cuda"), torch.bfloat16
    s = SHAPES[name]
    T, D, H, E, K = s.tokens, s.d_model, s.d_hidden, s.n_experts, s.k
    r = balanced_routing(T, E, K, dev, torch.Generator(device=dev).manual_seed(0))
    N = r.n_assignments
    bank = ExpertBank(E, D, H).to(dev, dtype)
    w_in, w_out = bank.w_in.detach(), bank.w_out.detach()
    x = torch.randn(T, D, device=dev, dtype=dtype)
    gy = torch.randn(T, D, device=dev, dtype=dtype)
    h = torch.randn(N, 2 * H, device=dev, dtype=dtype)
    gh = torch.randn(N, 2 * H, device=dev, dtype=dtype)
    wa = torch.randn(N, H, device=dev, dtype=dtype)
    ga = torch.empty(N, H, device=dev, dtype=dtype)
    gw = torch.zeros(N, device=dev)
    offs = r.offsets.to(torch.int32)
    counts, token = r.counts, r.token
    base = ops.kernel_configs(dtype, dev, H)
    pre = base["glu_bwd"].pregather
    gys = gy.index_select(0, token)
    a_in = gys if pre else gy
    res: dict = {"label": s.label(), "pregather_glu_bwd": pre}

    def fused(c: KernelConfig) -> None:
        gw.zero_()
        launch_gemm(a_in, w_out, (D * H, H, 1), wa, token, r.weight, counts, N, D, H, gather=not pre, scale=False,
                    scatter=False, cfg=c, prec="tf32", swiglu_bwd=(h, gh, gw))

    def unfused() -> None:
        launch_gemm(a_in, w_out, (D * H, H, 1), ga, token, r.weight, counts, N, D, H, gather=not pre, scale=False,
                    scatter=False, cfg=base["glu_bwd"], prec="tf32")
        launch_swiglu_bwd(ga, h, r.weight, gh, wa, gw, N, H)

    res["glu_bwd_unfused_ms"] = _bench(unfused)
    res["glu_bwd_fused"] = _sweep(lambda c: fused(replace(c, pregather=pre)), GLU_BWD)
    print(f"{name:12s} glu_bwd unfused {res['glu_bwd_unfused_ms']:.3f} | fused best {res['glu_bwd_fused'][0]}",
          flush=True)

    g_in = torch.empty_like(w_in)
    g_out = torch.empty_like(w_out)
    res["wgrad_in_peer_ms"] = _bench(lambda: torch._grouped_mm(gh.t(), x.index_select(0, token), offs=offs))
    res["wgrad_out_peer_ms"] = _bench(lambda: torch._grouped_mm(gy.index_select(0, token).t(), wa, offs=offs))
    res["wgrad_in"] = _sweep(lambda c: launch_wgrad(gh, x, g_in, token, counts, gather_l=False, gather_r=True, cfg=c,
                                                    prec="tf32"), WGRAD)
    res["wgrad_out"] = _sweep(lambda c: launch_wgrad(gy, wa, g_out, token, counts, gather_l=True, gather_r=False,
                                                     cfg=c, prec="tf32"), WGRAD)
    print(f"{name:12s} wgrad_in peer {res['wgrad_in_peer_ms']:.3f} | best {res['wgrad_in'][0]}", flush=True)
    print(f"{name:12s} wgrad_out peer {res['wgrad_out_peer_ms']:.3f} | best {res['wgrad_out'][0]}", flush=True)
    ref_in = torch._grouped_mm(gh.t(), x.index_select(0, token), offs=offs).float()
    launch_wgrad(gh, x, g_in, token, counts, gather_l=False, gather_r=True, cfg=ops.CONFIGS_BF16["wgrad"], prec="tf32")
    res["wgrad_in_max_rel_err"] = float((g_in.float() - ref_in).abs().max() / ref_in.abs().max())

    # End to end, each combination of the switches, with the best wgrad / fused configs found above.
    ops.CONFIGS_BF16["wgrad"] = KernelConfig(**res["wgrad_in"][0][1])
    xg = x.clone().requires_grad_()
    grads = {}
    flops = 3 * N * bank.flops_per_token()
    res["end_to_end"] = []
    for fuse in (False, True):
        for tw in (False, True):
            ops.FUSED_SWIGLU_BWD, ops.TRITON_WGRAD = fuse, tw
            if fuse:
                ops.CONFIGS_BF16["glu_bwd"] = replace(KernelConfig(**res["glu_bwd_fused"][0][1]),
                                                      pregather=ops.CONFIGS_BF16["glu_bwd"].pregather)

            def step() -> None:
                xg.grad = None
                for p in bank.parameters():
                    p.grad = None
                triton_dispatch(xg, r, bank).backward(gy)

            ms = _time(step, dev, warmup=3, reps=20)
            grads[(fuse, tw)] = [xg.grad.float(), bank.w_in.grad.float(), bank.w_out.grad.float()]
            err = max(float((a - b).abs().max() / b.abs().max())
                      for a, b in zip(grads[(fuse, tw)], grads[(False, False)], strict=True))
            pct = 100 * flops / (ms * 1e-3) / 1e12 / ceiling
            res["end_to_end"].append(dict(fused=fuse, triton_wgrad=tw, ms=ms, pct=pct, max_rel_diff=err))
            print(f"{name:12s} fused={fuse!s:5} triton_wgrad={tw!s:5} fwd+bwd {ms:7.3f} ms {pct:5.1f}%  "
                  f"max rel diff vs unfused {err:.2e}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="finegrained,small,deepseek,mixtral")
    args = ap.parse_args()
    out = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out, exist_ok=True)
    ceiling = dense_ceiling(torch.device("cuda"), torch.bfloat16)
    print(f"{torch.cuda.get_device_name()} ceiling {ceiling:.1f} TFLOP/s", flush=True)
    results = {"ceiling": ceiling, "shapes": {}}
    defaults = (dict(ops.CONFIGS_BF16), ops.FUSED_SWIGLU_BWD, ops.TRITON_WGRAD)
    for name in args.shapes.split(","):
        results["shapes"][name] = run_shape(name, ceiling)
        ops.CONFIGS_BF16.clear()
        ops.CONFIGS_BF16.update(defaults[0])
        ops.FUSED_SWIGLU_BWD, ops.TRITON_WGRAD = defaults[1], defaults[2]
        torch.cuda.empty_cache()
        with open(os.path.join(out, "bwd_variants.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
