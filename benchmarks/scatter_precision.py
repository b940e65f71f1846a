"""The Triton backend's scatter-add buffers: float32 atomics vs the input dtype's (bf16).

    OUT=dir python3 benchmarks/scatter_precision.py [--shapes mixtral,finegrained] [--reps 20] [--rounds 3]

For each GPU shape and each buffer dtype (``TritonOptions(fp32_scatter=...)``, passed per call): forward and forward+backward
time of the triton backend (CUDA events, median, the two modes interleaved over several
rounds so host drift hits both), and the relative error of y, dL/dx, dL/dweight, dL/dW_in
and dL/dW_out against a float32 (IEEE) run of the same kernels on the same bf16 values, with
the grouped backend's error beside them (its combine is a bf16 ``index_add``). Writes
$OUT/scatter_precision.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics

import torch

from gatedmoe.bench import SHAPES, balanced_routing, dense_ceiling, machine_info, time_ms
from gatedmoe.dispatch import TritonOptions, get_backend
from gatedmoe.experts import ExpertBank


def _grads(fn, x, r, bank, gy):
    """Output and gradients of one forward+backward (x, routing weight, W_in, W_out)."""
    x = x.detach().requires_grad_(True)
    weight = r.weight.detach().requires_grad_(True)
    bank.zero_grad(set_to_none=True)
    y = fn(x, dataclasses.replace(r, weight=weight), bank)
    y.backward(gy)
    return [t.detach().float() for t in (y, x.grad, weight.grad, bank.w_in.grad, bank.w_out.grad)]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _shape_row(name: str, dev: torch.device, reps: int, rounds: int, ceiling: float) -> dict:
    """Errors and timings of both scatter precisions on one shape."""
    names = ["y", "dx", "dweight", "dW_in", "dW_out"]
    triton_fn, grouped_fn = get_backend("triton", dev), get_backend("grouped", dev)
    s = SHAPES[name]
    g = torch.Generator(device=dev).manual_seed(0)
    r = balanced_routing(s.tokens, s.n_experts, s.k, dev, g)
    bank = ExpertBank(s.n_experts, s.d_model, s.d_hidden).to(dev, torch.bfloat16)
    x = torch.randn(s.tokens, s.d_model, device=dev, dtype=torch.bfloat16, generator=g)
    gy = torch.randn(s.tokens, s.d_model, device=dev, dtype=torch.bfloat16, generator=g)
    fwd_flops = 6 * r.token.numel() * s.d_model * s.d_hidden  # three N x D x H products

    # Reference: the same kernels on the same (bf16-valued) numbers in float32, IEEE products.
    bank32 = ExpertBank(s.n_experts, s.d_model, s.d_hidden).to(dev, torch.float32)
    bank32.load_state_dict(bank.state_dict())
    ref = _grads(triton_fn, x.float(), r, bank32, gy.float())
    del bank32  # ref (five [..] float32 tensors) stays until the function returns

    def errors(fn) -> dict:
        return {n: _rel(a, b) for n, a, b in zip(names, _grads(fn, x, r, bank, gy), ref, strict=True)}

    row = {"error": {"grouped": errors(grouped_fn)}, "ms": {}}
    for mode in (True, False):
        options = TritonOptions(fp32_scatter=mode)
        row["error"]["fp32" if mode else "bf16"] = errors(lambda *a, o=options: triton_fn(*a, options=o))
    xg = x.detach().requires_grad_(True)

    def fwd(options):
        with torch.no_grad():
            triton_fn(x, r, bank, options=options)

    def fwd_bwd(options):
        bank.zero_grad(set_to_none=True)
        triton_fn(xg, r, bank, options=options).backward(gy)

    times = {k: [] for k in ("fp32 fwd", "bf16 fwd", "fp32 fwd+bwd", "bf16 fwd+bwd")}
    for _ in range(rounds):
        for mode in (True, False):
            options = TritonOptions(fp32_scatter=mode)
            tag = "fp32" if mode else "bf16"
            times[f"{tag} fwd"].append(time_ms(lambda o=options: fwd(o), dev, 3, reps))
            times[f"{tag} fwd+bwd"].append(time_ms(lambda o=options: fwd_bwd(o), dev, 3, reps))
    for k, v in times.items():
        ms = statistics.median(v)
        mult = 1 if k.endswith("fwd") else 3
        row["ms"][k] = {"median": ms, "rounds": v, "fraction": fwd_flops * mult / (ms * 1e-3) / 1e12 / ceiling}
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="mixtral,deepseek,small,finegrained")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device("cuda")
    out_dir = os.environ.get("OUT", "/tmp/out")
    result = {"machine": machine_info(dev), "ceiling_tflops": dense_ceiling(dev, torch.bfloat16), "shapes": {}}
    print(f"ceiling {result['ceiling_tflops']:.1f} TFLOP/s", flush=True)
    for name in args.shapes.split(","):
        row = _shape_row(name, dev, args.reps, args.rounds, result["ceiling_tflops"])
        result["shapes"][name] = row
        print(name, json.dumps(row, indent=1), flush=True)
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "scatter_precision.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
