"""Which FP8 rounding costs training quality: a CPU emulation with one switch per rounding.

The GPU run (BENCHMARKS.md "FP8", "Training quality") ended 2.0-4.3% above its float32
baseline. This trains the same kind of model (`train_lm` on Tiny Shakespeare, smaller) on the
CPU with the expert products replaced by an emulation of the FP8 path's arithmetic
(`gatedmoe.dispatch.triton.fp8_reference`'s quantisers: power-of-two scales per 1 x block tile
of an activation row and per block x block block of a weight, round to nearest even), where
each rounding can be switched off:

* ``x``: the tokens before the first product; ``a``: the SwiGLU output before the second;
* ``w``: the weights (in the forward and in the data-gradient products);
* ``gy``: the output gradient before ``gy W_out``; ``gh``: the gradient of h before
  ``gh W_in`` (both in ``--grad-format``).

As in the kernels, the weight gradients come from the unrounded operands and the products
accumulate in float32. Arms: float32 (nothing rounded), fp8 (everything), and fp8 with one
rounding left out, each over ``--seeds``; prints final validation losses and their
difference from float32 on the same seed, writes JSON and a plot:

    python benchmarks/fp8_ablation.py --out results_fp8_ablation_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from gatedmoe import MoE
from gatedmoe.data import load_tinyshakespeare

# The oracle's per-expert loops: the emulation multiplies as `fp8_reference` does.
from gatedmoe.dispatch.triton.fp8_reference import (
    _expert_rows,
    _per_expert,
    dequantize_blocks,
    dequantize_rows,
    quantize_blocks,
    quantize_rows,
)
from gatedmoe.models import LMConfig, train_lm

ROUNDINGS = ("x", "a", "w", "gy", "gh")


def _rows(v: Tensor, fmt: str, block: int) -> Tensor:
    return dequantize_rows(*quantize_rows(v, fmt, block), block).to(v.dtype)


def _blocks(w: Tensor, block: int) -> Tensor:
    return dequantize_blocks(*quantize_blocks(w, "e4m3", block), block).to(w.dtype)


class _Product(torch.autograd.Function):
    """``rows @ w_e^T`` per expert (rows sorted by expert, ``counts`` per expert) with the
    FP8 path's roundings: rows (``q_rows``) and the weight (``q_w``) in the forward, the
    incoming gradient (``q_grad``, in ``fmt``) and the weight in the data-gradient product;
    the weight gradient from the unrounded rows and gradient."""

    @staticmethod
    def forward(ctx, rows, w, counts, q_rows, q_w, q_grad, fmt, block):
        wq = _blocks(w, block) if q_w else w
        rq = _rows(rows, "e4m3", block) if q_rows else rows
        ctx.save_for_backward(rows, wq)
        ctx.counts, ctx.q_grad, ctx.fmt, ctx.block = counts, q_grad, fmt, block
        return _per_expert(rq, wq, counts)

    @staticmethod
    def backward(ctx, g):
        rows, wq = ctx.saved_tensors
        gq = _rows(g, ctx.fmt, ctx.block) if ctx.q_grad else g
        g_rows = _per_expert(gq, wq.transpose(1, 2), ctx.counts)
        g_w = torch.zeros_like(wq)
        for e, (s, t) in enumerate(_expert_rows(ctx.counts)):
            g_w[e] = g[s:t].T @ rows[s:t]
        return g_rows, g_w, None, None, None, None, None, None


def emulated_dispatch(on: frozenset[str], fmt: str, block: int):
    """An `MoE.dispatch` replacement: SwiGLU experts with the roundings in ``on``."""

    def dispatch(self, x_TD: Tensor, routing) -> Tensor:
        bank = self.experts
        counts = routing.counts
        H = bank.w_out.shape[-1]
        # x is rounded per token before the gather (the kernels quantise [T, D], not [N, D]).
        # Straight through: autograd through the float8 cast would round the gradient to
        # unscaled e4m3 (flushing most of it to zero), which the kernels never do.
        x = x_TD + (_rows(x_TD.detach(), "e4m3", block) - x_TD).detach() if "x" in on else x_TD
        h = _Product.apply(x[routing.token], bank.w_in, counts, False, "w" in on, "gh" in on, fmt, block)
        a = F.silu(h[:, :H]) * h[:, H:]
        o = _Product.apply(a, bank.w_out, counts, "a" in on, "w" in on, "gy" in on, fmt, block)
        o = o * routing.weight[:, None].to(o.dtype)
        return torch.zeros_like(x_TD).index_add(0, routing.token, o)

    return dispatch


def arms() -> dict[str, frozenset[str]]:
    out = {"float32": frozenset(), "fp8": frozenset(ROUNDINGS)}
    out.update({f"fp8 without {r}": frozenset(ROUNDINGS) - {r} for r in ROUNDINGS})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block", type=int, default=32, help="scale tile width (the GPU kernels take 128)")
    ap.add_argument("--grad-format", default="e4m3", choices=["e4m3", "e5m2"])
    ap.add_argument("--arms", nargs="*", help="subset of: " + ", ".join(arms()))
    args = ap.parse_args()
    text = load_tinyshakespeare()
    chosen = {k: v for k, v in arms().items() if not args.arms or k in args.arms}
    moe = LMConfig.default_moe.replace(d_model=args.d_model, d_hidden=args.d_hidden, n_experts=args.experts,
                                       k=args.k, backend="grouped")
    runs = []
    for seed in args.seeds:
        for name, on in chosen.items():
            original = MoE.dispatch
            MoE.dispatch = emulated_dispatch(on, args.grad_format, args.block) if on else original
            try:
                t0 = time.perf_counter()
                m = train_lm(text, steps=args.steps, batch_size=args.batch_size, seed=seed, progress=False,
                             eval_every=max(1, args.steps // 10), moe=moe, n_layers=args.layers, seq_len=args.seq_len)
            finally:
                MoE.dispatch = original
            runs.append({"arm": name, "rounded": sorted(on), "seed": seed, "final_val_loss": m["final_val_loss"],
                         "val_loss": m["val_loss"], "seconds": time.perf_counter() - t0})
            print(f"seed {seed} {name:<16} val {m['final_val_loss']:.4f} ({runs[-1]['seconds']:.0f} s)", flush=True)
    base = {r["seed"]: r["final_val_loss"] for r in runs if r["arm"] == "float32"}
    print(f"\n{'arm':<16} " + " ".join(f"seed {s:>2}" for s in args.seeds) + "   mean vs float32")
    summary = {}
    for name in chosen:
        rel = [100 * (r["final_val_loss"] - base[r["seed"]]) / base[r["seed"]] for r in runs
               if r["arm"] == name and r["seed"] in base]
        summary[name] = {"relative_percent": rel, "mean_percent": statistics.mean(rel) if rel else None}
        print(f"{name:<16} " + " ".join(f"{v:+7.2f}%" for v in rel) + f"   {statistics.mean(rel):+.2f}%")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                    "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
