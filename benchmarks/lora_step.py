"""One training step of an `MoE` layer with LoRA on its experts against full fine-tuning.

    python3 benchmarks/lora_step.py --out results_lora_step.json                 # GPU
    python3 benchmarks/lora_step.py --device cpu --shapes tiny --ranks 4 \\
        --dtype float32 --reps 3 --out /tmp/lora_step.json                       # smoke run
    TRITON_INTERPRET=1 python3 benchmarks/lora_step.py --device cpu --shapes tiny --ranks 4 \\
        --dtype float32 --backends grouped,triton --warmup 0 --reps 1 --out /tmp/l.json  # + Triton kernels

A step is what a trainer does per micro-batch and optimizer step: ``zero_grad``, forward
of the layer (router, top-k, dispatch) on inputs that need their gradient (as inside a
network), backward of a random upstream gradient, ``AdamW.step``. Rows per shape:

* ``full``: every parameter trains (router and experts), with each backend asked for
  (``grouped``; ``triton`` on CUDA when Triton is installed);
* ``lora r=R``: ``moe.experts.add_lora(R)``; only the adapters train (router and base
  experts frozen), with each backend as well: ``grouped`` runs the adapters as grouped
  products beside the experts', ``triton`` fuses them into its kernels
  (`gatedmoe.dispatch.triton.lora_ops`; the base weights' gradients are skipped).

"vs full" is each row's speed against the first full fine-tuning row (grouped), "vs same"
against full fine-tuning on the same backend.

Before timing, each configuration is checked against `gatedmoe.dispatch.reference_dispatch`
on the benchmark's own first ``--check-tokens`` tokens and the layer's routing: output and
the gradients of the input and of every trainable parameter, relative error norm within
the dtype's bound.
Timing: ``--warmup`` untimed steps, then the median (and min, max) of ``--reps`` steps
(CUDA events on GPU, `gatedmoe.bench.time_samples`). Throughput counts the expert GEMMs a
step needs (forward 1x; backward 2x for trained weights, 1x for frozen ones, whose weight
gradient is skipped; adapters likewise) and is reported against the dense GEMM ceiling
measured in the same run. Peak memory is CUDA's ``max_memory_allocated`` over the timed
steps (null on CPU). Prints the machine and a table; writes everything as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from gatedmoe import MoE
from gatedmoe.bench import SHAPES, BenchShape, dense_ceiling, machine_info, time_samples
from gatedmoe.dispatch import reference_dispatch

BENCH_SHAPES = {**SHAPES, "tiny": BenchShape(256, 64, 96, 8, 2)}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Relative error norm allowed against the reference (which computes in float32).
CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def build(shape: BenchShape, backend: str, rank: int | None, device: torch.device, dtype: torch.dtype) -> MoE:
    """The layer of one row; ``rank`` None for full fine-tuning. Same base weights for every
    row; adapters random (their B non-zero, so every product is live)."""
    torch.manual_seed(0)
    moe = MoE(shape.d_model, shape.n_experts, shape.d_hidden, k=shape.k, backend=backend, check_inputs=False)
    moe = moe.to(device=device, dtype=dtype)
    if rank is not None:
        lora = moe.experts.add_lora(rank)
        for p in moe.gate.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            for p in lora.parameters():
                p.copy_(torch.randn_like(p) * 0.02)
    return moe


def check_against_reference(moe: MoE, x: torch.Tensor, gy: torch.Tensor) -> float:
    """Largest relative error norm of output and trainable gradients (input's included)
    against `gatedmoe.dispatch.reference_dispatch` (float32 loop over experts) on the same
    routing."""
    sides = []
    for fast in (False, True):
        moe.zero_grad(set_to_none=True)
        xg = x.detach().clone().requires_grad_()
        y = moe(xg) if fast else reference_dispatch(xg, moe.route(xg), moe.experts).to(x.dtype)
        y.backward(gy)
        grads = [xg.grad] + [p.grad for p in moe.parameters() if p.requires_grad]
        sides.append([y.detach()] + [g.detach().clone() for g in grads])
    moe.zero_grad(set_to_none=True)
    errs = []
    for r, f in zip(*sides, strict=True):
        r64, f64 = r.double(), f.double()
        errs.append(float((f64 - r64).norm() / r64.norm().clamp_min(1e-30)))
    return max(errs)


def step_flops(moe: MoE, n_assign: int) -> float:
    """Expert GEMM FLOPs of one step (module docstring)."""
    bank = moe.experts
    fwd = n_assign * bank.flops_per_token()
    base_bwd = 2 * fwd if bank.w_in.requires_grad else fwd
    lora = bank.lora
    if lora is None:
        return fwd + base_bwd
    h_in = bank.w_in.shape[1]
    a_fwd = n_assign * 2 * lora.rank * (bank.d_model + h_in + bank.d_hidden + bank.d_model)
    return fwd + base_bwd + 3 * a_fwd


def run_row(shape, label, backend, rank, device, dtype, args, ceiling) -> dict:
    moe = build(shape, backend, rank, device, dtype)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(shape.tokens, shape.d_model, device=device, dtype=dtype, generator=gen)
    gy = torch.randn(shape.tokens, shape.d_model, device=device, dtype=dtype, generator=gen)
    n_check = min(args.check_tokens, shape.tokens)
    err = check_against_reference(moe, x[:n_check], gy[:n_check])
    if not err <= CHECK_TOL[dtype]:
        sys.exit(f"{shape.label()} {label}: relative error {err:.2e} against the reference > {CHECK_TOL[dtype]:.0e}")
    trainable = [p for p in moe.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, foreach=True)
    xg = x.detach().clone().requires_grad_()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        xg.grad = None
        moe(xg).backward(gy)
        opt.step()

    step()  # the optimizer's state exists before the memory peak is reset
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    ts = time_samples(step, device, args.warmup, args.reps)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    ms = statistics.median(ts)
    tflops = step_flops(moe, moe.last_routing.n_assignments) / (ms * 1e-3) / 1e12
    return {
        "shape": shape.label(), "tokens": shape.tokens, "d_model": shape.d_model, "d_hidden": shape.d_hidden,
        "n_experts": shape.n_experts, "k": shape.k, "mode": label, "backend": backend, "rank": rank,
        "dtype": str(dtype).removeprefix("torch."), "ms_median": ms, "ms_min": ts[0], "ms_max": ts[-1],
        "reps": args.reps, "trainable_params": sum(p.numel() for p in trainable), "peak_mib": peak,
        "tflops": tflops, "frac_of_dense": tflops / ceiling, "check_rel_err": err,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--shapes", default="small,deepseek,finegrained,mixtral", help=f"comma list of {','.join(BENCH_SHAPES)}")
    p.add_argument("--ranks", default="8,64", help="LoRA ranks, comma list")
    p.add_argument("--backends", default=None, help="backends of the full and LoRA rows (default grouped, plus triton on CUDA)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--check-tokens", type=int, default=1024, help="tokens of the reference check")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device; pass --device cpu")
    dtype = DTYPES[args.dtype]
    shapes = [s.strip() for s in args.shapes.split(",")]
    unknown = [s for s in shapes if s not in BENCH_SHAPES]
    if unknown:
        p.error(f"unknown shapes {unknown}; known: {', '.join(BENCH_SHAPES)}")
    ranks = [int(r) for r in args.ranks.split(",")]
    if args.backends:
        backends = args.backends.split(",")
    else:
        backends = ["grouped"]
        if device.type == "cuda":
            try:
                import triton  # noqa: F401

                backends.append("triton")
            except ImportError:
                pass
    machine = machine_info(device)
    ceiling = dense_ceiling(device, dtype)
    print("machine:", ", ".join(f"{k}={v}" for k, v in machine.items()))
    print(f"dense GEMM ceiling: {ceiling:.2f} TFLOP/s ({args.dtype})")
    rows = []
    head = f"{'shape':34s} {'mode':10s} {'backend':8s} {'ms':>9s} {'min-max':>17s} {'vs full':>8s} {'vs same':>8s} {'trainable':>11s} {'peak MiB':>9s} {'% dense':>8s}"
    print(head)
    for name in shapes:
        shape = BENCH_SHAPES[name]
        configs = [("full", b, None) for b in backends] + [(f"lora r={r}", b, r) for r in ranks for b in backends]
        shape_rows = [run_row(shape, label, b, r, device, dtype, args, ceiling) for label, b, r in configs]
        base = shape_rows[0]["ms_median"]
        full = {row["backend"]: row["ms_median"] for row in shape_rows if row["rank"] is None}
        for row in shape_rows:
            row["speedup_vs_full_grouped"] = base / row["ms_median"]
            row["speedup_vs_full_same_backend"] = full[row["backend"]] / row["ms_median"]
            print(
                f"{row['shape']:34s} {row['mode']:10s} {row['backend']:8s} {row['ms_median']:9.3f} "
                f"{row['ms_min']:8.3f}-{row['ms_max']:<8.3f} {row['speedup_vs_full_grouped']:7.2f}x {row['speedup_vs_full_same_backend']:7.2f}x "
                f"{row['trainable_params']:11d} {'-' if row['peak_mib'] is None else format(row['peak_mib'], '9.1f'):>9s} "
                f"{100 * row['frac_of_dense']:7.1f}%"
            )
        rows += shape_rows
    with open(args.out, "w") as fh:
        json.dump({"machine": machine, "dense_tflops": ceiling, "args": vars(args), "rows": rows}, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
