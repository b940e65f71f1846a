"""Where the whole layer's time goes on a GPU: the layer per gate (topk_softmax, sigmoid with
bias balancing, group_limited), the router path piece by piece (fused kernels against the plain
path), host syncs, and a kernel profile of one forward+backward of `gatedmoe.MoE`
(topk_softmax, triton, bf16).

    OUT=dir python3 benchmarks/layer_profile.py [--shapes fine256,small] [--reps 20]

Prints one table per shape (median ms of ``--reps`` after warm-up, CUDA events) and writes
$OUT/layer_profile_<shape>.txt with the profiler's kernel table and the host-sync sites.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from gatedmoe import MoE, Routing
from gatedmoe.bench import time_samples
from gatedmoe.gates.functional import topk_softmax
from gatedmoe.gates.fused_topk import fused_topk, fused_topk_reference

SHAPES = {
    "fine256": (16384, 2048, 512, 256, 8),
    "qwen3_30b": (16384, 2048, 768, 128, 8),
    "deepseek16b": (16384, 2048, 1408, 64, 6),
    "small": (8192, 1024, 4096, 16, 2),
    "mixtral": (8192, 4096, 14336, 8, 2),
}


def timed(fn, reps: int, warm: int = 3) -> tuple[float, float, float]:
    """Median, min and max milliseconds (CUDA events)."""
    ts = time_samples(fn, torch.device("cuda"), warm, reps)
    return statistics.median(ts), ts[0], ts[-1]


def sync_sites(fn) -> list[str]:
    """Host syncs in one call of ``fn``: the innermost gatedmoe frame of each sync warning."""
    sites: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        frames = [f for f in traceback.extract_stack() if "gatedmoe" in f.filename]
        where = f"{frames[-1].filename.split('gatedmoe/')[-1]}:{frames[-1].lineno} {frames[-1].line}" if frames else filename
        sites.append(f"{where}  <- {str(message)[:60]}")

    torch.cuda.set_sync_debug_mode("warn")
    old = warnings.showwarning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            fn()
            torch.cuda.synchronize()
    finally:
        warnings.showwarning = old
        torch.cuda.set_sync_debug_mode(0)
    return sites


def profile_shape(name: str, reps: int, out: str, dev: torch.device) -> None:
    """Time, sync-check and profile one shape; print and write its table."""
    T, D, H, E, K = SHAPES[name]
    torch.manual_seed(0)
    x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
    gy = torch.randn_like(x)
    xg = x.clone().requires_grad_()
    lines = [f"== {name}: T={T} D={D} H={H} E={E} K={K}"]
    variants = [("topk_softmax", True, {}), ("topk_softmax", False, {}),
                ("sigmoid", True, {"bias_update_rate": 1e-3}),
                ("group_limited", True, {"bias_update_rate": 1e-3,
                                         "gate_kwargs": {"n_group": min(8, E // 2), "topk_group": min(4, E // 4)}})]
    for gate, check, kw in variants:
        moe = MoE(D, E, H, k=K, gate=gate, backend="triton", check_inputs=check, **kw).to(dev, torch.bfloat16)

        def fb(moe: MoE = moe) -> None:
            moe.zero_grad(set_to_none=True)
            xg.grad = None
            moe(xg).backward(gy)

        def fwd(moe: MoE = moe) -> None:
            with torch.no_grad():
                moe(x)

        # Detached weights: the dispatch alone, without the router's graph (freed by backward).
        routed = moe.route(x)
        r = dataclasses.replace(routed, weight=routed.weight.detach())
        med_fb, lo, hi = timed(fb, reps)
        med_f, flo, fhi = timed(fwd, reps)
        def dispatch_fb(moe: MoE = moe, r: Routing = r) -> None:
            # Fresh gradients each step, as in fb: accumulating them would time extra adds.
            moe.zero_grad(set_to_none=True)
            xg.grad = None
            moe.dispatch(xg, r).backward(gy)

        med_d, dlo, dhi = timed(dispatch_fb, reps)
        lines.append(
            f"layer {gate} check_inputs={check}: fwd {med_f:.3f} ({flo:.3f}-{fhi:.3f})  fwd+bwd {med_fb:.3f} "
            f"({lo:.3f}-{hi:.3f})  dispatch-only fwd+bwd {med_d:.3f} ms"
        )
    w32 = moe.gate.weight.detach().float()
    w16 = w32.to(torch.bfloat16)
    pieces = {
        "router fp32 (x.float() @ W.float())": lambda: F.linear(x.float(), w32),
        "router bf16 in, fp32 out (mm out_dtype)": lambda: torch.mm(x, w16.t(), out_dtype=torch.float32),
        "router bf16 (bf16 out)": lambda: F.linear(x, w16),
    }
    logits = F.linear(x.float(), w32)
    pieces["softmax+topk+renorm"] = lambda: topk_softmax(logits, K, True, None)
    wk, ek, pk = topk_softmax(logits, K, True, None)
    pieces["Routing.from_topk (sort, counts)"] = lambda: Routing.from_topk(wk, ek, E, probs=pk, logits=logits)
    pieces["argsort stable [T*K] int64 keys"] = lambda: torch.argsort(ek.reshape(-1), stable=True)
    pieces["argsort stable [T*K] int16 keys"] = lambda: torch.argsort(ek.reshape(-1).to(torch.int16), stable=True)
    pieces["z-loss logsumexp"] = lambda: torch.logsumexp(logits, -1).pow(2).mean()
    pieces["route unfused, fwd (fused_topk_reference)"] = lambda: fused_topk_reference(logits, K)
    pieces["route fused, fwd (fused_topk)"] = lambda: fused_topk(logits, K)
    lg = logits.clone().requires_grad_()
    gw, gp = torch.randn(T * K, device=dev), torch.randn(T, E, device=dev)

    def route_fb(fn) -> None:
        lg.grad = None
        r = fn(lg, K)
        ((r.weight * gw).sum() + (r.probs * gp).sum() + r.lse.square().mean()).backward()

    pieces["route unfused, fwd+bwd"] = lambda: route_fb(fused_topk_reference)
    pieces["route fused, fwd+bwd"] = lambda: route_fb(fused_topk)
    moe = MoE(D, E, H, k=K, backend="triton").to(dev, torch.bfloat16)
    pieces["route() total (topk_softmax layer)"] = lambda: moe.route(x)
    for label, fn in pieces.items():
        med, lo, hi = timed(fn, reps)
        lines.append(f"  {label:42s} {med:.3f} ms ({lo:.3f}-{hi:.3f})")
    l16 = torch.mm(x, w16.t(), out_dtype=torch.float32)
    e16 = topk_softmax(l16, K, True, None)[1]
    same = (e16.sort(-1).values == ek.sort(-1).values).all(-1).float().mean().item()
    lines.append(f"  rows whose top-{K} set is unchanged with the bf16-input router: {same * 100:.2f}%")
    ref_r, fast_r = fused_topk_reference(logits, K), fused_topk(logits, K)
    sets = []
    for r in (ref_r, fast_r):
        m = torch.zeros(T, E, dtype=torch.bool, device=dev)
        m[r.token, r.expert] = True
        sets.append(m)
    agree = (sets[0] == sets[1]).all(-1).float().mean().item()
    lines.append(f"  rows whose top-{K} set is the same fused and unfused (fp32 logits): {agree * 100:.3f}%")
    moe_c = MoE(D, E, H, k=K, backend="triton", check_inputs=True).to(dev, torch.bfloat16)

    def step() -> None:
        moe_c.zero_grad(set_to_none=True)
        xg.grad = None
        moe_c(xg).backward(gy)

    step()
    for s in sync_sites(step):
        lines.append(f"  sync: {s}")
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    except Exception:
        table = traceback.format_exc()
    with open(os.path.join(out, f"layer_profile_{name}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n\n" + table)
    print("\n".join(lines), flush=True)
    print(table[:6000], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="fine256,small")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    out = os.environ.get("OUT", "/tmp")
    dev = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for name in args.shapes.split(","):
        profile_shape(name, args.reps, out, dev)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
