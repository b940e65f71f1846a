"""FP8 expert GEMMs (issue 20): our FP8 Triton path against our bf16 Triton path and a
``torch._scaled_grouped_mm`` (row-wise FP8) pipeline, with the dense bf16 and FP8 GEMM
ceilings measured in the same run. One GPU call, a few minutes:

    python3 benchmarks/fp8.py --out $OUT/fp8.json [--shapes mixtral,deepseek,finegrained]
    python3 benchmarks/fp8.py --dry-run --out /tmp/fp8_dry.json   # CPU, Triton's interpreter

Per shape (exactly balanced routing: every expert T*K/E rows, a multiple of 16 as the FP8
grouped GEMM wants; the bank in bf16):

* accuracy first, on the benchmark's own inputs: relative error norm of y, dL/dx,
  dL/dweight, dL/dW_in, dL/dW_out of every variant against a float32 run of the Triton
  kernels (IEEE products) on the same bf16 values; a variant whose errors exceed its bound
  (FP8: the bound of `tests/dispatch/test_fp8.py`; bf16: 1.5e-2) is not timed. Again on
  inputs with outlier channels (1% of x's channels 1000x: "error_outliers"), untimed, where
  tile and row scales differ;
* forward (no autograd) and forward+backward times: CUDA events around each call with a
  synchronize, ``--warmup`` calls, ``--reps`` timed calls in each of ``--rounds`` rounds
  that interleave the variants; median, and min / max as the spread. FP8 variants reuse
  their cached FP8 weights (as micro-batches of one step do); the per-step weight
  quantisation is timed on its own ("quantize_weights_ms");
* TFLOP/s (forward 6 N D H flops, forward+backward 18 N D H) and that as a fraction of
  the dense ceilings: bf16 ``a @ b`` and FP8 ``torch._scaled_mm`` at 8192^3 (with and
  without fast accumulation);
* CUDA time per kernel over one forward+backward of "bf16" and "fp8_block" (torch.profiler).

Variants: "bf16" (`TritonOptions()`), "fp8_block" (`FP8Recipe(scaling="blockwise")`: 1x128 / 128x128 scales,
e4m3 gradients), "fp8_block_e5m2" (e5m2 gradients), "fp8_row" (row-wise scales, the default recipe),
"fp8_block_no_tma" and "fp8_block_glu_bm128" (config alternatives, as `TritonOptions.configs`),
"sgmm_row" (gather, our row quantisation kernel, ``torch._scaled_grouped_mm`` with fast
accumulation, SwiGLU in torch, weighted ``index_add``; backward: the two
data-gradient GEMMs with ``torch._scaled_grouped_mm`` on row-quantised operands, weight
gradients with ``torch._grouped_mm`` in bf16, as our path; weights quantised once per step
like ours), and "sgmm_gemms" (the four ``_scaled_grouped_mm`` calls of that pipeline alone,
no weight gradients, its TFLOP/s over those 12 N D H flops: the floor of any pipeline built
on it). JSON written after every shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

DRY = "--dry-run" in sys.argv
if DRY:  # before Triton is imported: run the kernels in its CPU interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from gatedmoe import ExpertBank, Routing  # noqa: E402
from gatedmoe.bench import SHAPES, BenchShape, dense_ceiling, machine_info, time_samples  # noqa: E402
from gatedmoe.dispatch import FP8Recipe, TritonOptions, get_backend  # noqa: E402

FP8_SHAPES = ("mixtral", "deepseek", "finegrained")
VARIANT_NAMES = ("bf16", "fp8_block", "fp8_block_e5m2", "fp8_row", "fp8_block_no_tma", "fp8_block_glu_bm128", "sgmm_row")
U = {"e4m3": 2.0**-4, "e5m2": 2.0**-3}
# (e4m3, gradient-format) quantisations on each quantity's path: `tests/dispatch/test_fp8.py`.
PATHS = {"y": (4, 0), "dx": (4, 2), "dweight": (3, 1), "dW_in": (3, 1), "dW_out": (2, 0)}
NAMES = list(PATHS)


def _bound(name: str, grad_format: str | None) -> float:
    if grad_format is None:
        return 1.5e-2  # bf16: the tests' bf16 tolerance
    n4, ng = PATHS[name]
    return 1.5 * math.sqrt(n4 * U["e4m3"] ** 2 + ng * U[grad_format] ** 2)


def exact_balanced_routing(T: int, E: int, K: int, device: torch.device, g: torch.Generator) -> Routing:
    """Token t takes experts tK .. tK+K-1 (mod E): distinct, and every expert exactly T*K/E rows
    (when E divides T*K); weights random positive, summing to 1 per token."""
    experts = (torch.arange(T * K, device=device) % E).view(T, K)
    weights = torch.rand(T, K, device=device, generator=g) + 0.1
    return Routing.from_topk(weights / weights.sum(-1, keepdim=True), experts, E)


# ---------------------------------------------------------------- the _scaled_grouped_mm pipeline
def _sgmm_available(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs CUDA"
    if not hasattr(torch, "_scaled_grouped_mm"):
        return f"torch {torch.__version__} has no torch._scaled_grouped_mm"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return "torch._scaled_grouped_mm row-wise FP8 runs on sm90 only"
    return None


def _sgmm(a_q, a_s, b_t, b_s, offs):
    """``a [M, K] @ b_t[e] ([K, N], column-major)`` per row group, bf16 out, scales
    ``a_s [M]``, ``b_s [E, N]`` (dequantisation factors)."""
    return torch._scaled_grouped_mm(a_q, b_t, a_s, b_s, offs, out_dtype=torch.bfloat16, use_fast_accum=True)


class _SgmmLinear(torch.autograd.Function):
    """``y = x @ W[e]^T`` per row group with row-wise FP8 operands; dL/dx in FP8 with W
    quantised along its other axis, dL/dW in bf16 (``torch._grouped_mm``)."""

    @staticmethod
    def forward(ctx, x, w, offs, qw):
        from gatedmoe.dispatch.triton.fp8_ops import quantize_rows

        xq, xs = quantize_rows(x, "e4m3", None)
        ctx.save_for_backward(x, offs)
        ctx.qw, ctx.w = qw, w
        return _sgmm(xq, xs.squeeze(1), qw.q.transpose(1, 2), qw.s.squeeze(2), offs)

    @staticmethod
    def backward(ctx, gy):
        from gatedmoe.dispatch.triton.fp8_ops import quantize_rows

        x, offs = ctx.saved_tensors
        gq, gs = quantize_rows(gy.contiguous(), "e4m3", None)
        gx = _sgmm(gq, gs.squeeze(1), ctx.qw.qt.transpose(1, 2), ctx.qw.st.squeeze(2), offs)
        gw = torch._grouped_mm(gy.t(), x, offs=offs)  # [E, N, K] = W's layout
        return gx, gw.to(ctx.w.dtype), None, None


def sgmm_pipeline(x_TD, r: Routing, bank: ExpertBank) -> torch.Tensor:
    from gatedmoe.dispatch.triton.fp8_ops import quantized_weight

    recipe = FP8Recipe(scaling="rowwise")
    offs = torch.cumsum(r.counts, 0, dtype=torch.int32)
    H = bank.w_out.shape[-1]
    xs = x_TD.index_select(0, r.token)
    h = _SgmmLinear.apply(xs, bank.w_in, offs, quantized_weight(bank.w_in, recipe, True))
    a = torch.nn.functional.silu(h[:, :H]) * h[:, H:]
    o = _SgmmLinear.apply(a, bank.w_out, offs, quantized_weight(bank.w_out, recipe, True))
    o = o * r.weight.unsqueeze(-1).to(o.dtype)
    return torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device).index_add(0, r.token, o.float()).to(
        x_TD.dtype)


def sgmm_gemms_only(shape: BenchShape, r: Routing, bank: ExpertBank, device: torch.device):
    """The four FP8 GEMMs of `sgmm_pipeline`'s forward+backward on prepared operands."""
    from gatedmoe.dispatch.triton.fp8_ops import quantize_rows, quantized_weight

    recipe = FP8Recipe(scaling="rowwise")
    N, D, H = r.token.numel(), shape.d_model, shape.d_hidden
    offs = torch.cumsum(r.counts, 0, dtype=torch.int32)
    wi, wo = quantized_weight(bank.w_in, recipe, True), quantized_weight(bank.w_out, recipe, True)
    xq, xs = quantize_rows(torch.randn(N, D, device=device, dtype=torch.bfloat16), "e4m3", None)
    aq, as_ = quantize_rows(torch.randn(N, H, device=device, dtype=torch.bfloat16), "e4m3", None)
    hq, hs = quantize_rows(torch.randn(N, 2 * H, device=device, dtype=torch.bfloat16), "e4m3", None)
    fwd = [(xq, xs, wi.q.transpose(1, 2), wi.s), (aq, as_, wo.q.transpose(1, 2), wo.s)]
    bwd = [(xq, xs, wo.qt.transpose(1, 2), wo.st), (hq, hs, wi.qt.transpose(1, 2), wi.st)]

    def run(ops):
        for a, a_s, b, b_s in ops:
            _sgmm(a, a_s.squeeze(1), b, b_s.squeeze(2), offs)

    return (lambda: run(fwd)), (lambda: run(fwd + bwd))


# ---------------------------------------------------------------- measuring
def _grads(fn, x, r, bank, gy):
    """y and the gradients of one forward+backward (x, routing weight, W_in, W_out), float32."""
    x = x.detach().requires_grad_(True)
    weight = r.weight.detach().requires_grad_(True)
    bank.zero_grad(set_to_none=True)
    y = fn(x, dataclasses.replace(r, weight=weight), bank)
    y.backward(gy)
    return [t.detach().float() for t in (y, x.grad, weight.grad, bank.w_in.grad, bank.w_out.grad)]


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _kernel_table(fn, top: int = 14) -> dict[str, float]:
    """CUDA milliseconds per kernel name (summed) over one call of ``fn``, the ``top`` largest
    and the rest as "other"."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if us:
            times[ev.key[:80]] = times.get(ev.key[:80], 0.0) + us / 1e3
    ranked = sorted(times.items(), key=lambda kv: -kv[1])
    out = dict(ranked[:top])
    out["other"] = sum(v for _, v in ranked[top:])
    out["total"] = sum(times.values())
    return out


def _dense_fp8_tflops(device: torch.device, n: int, fast_accum: bool, reps: int) -> float:
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    one = torch.ones((), device=device)

    def mm():
        return torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=fast_accum)

    ms = statistics.median(time_samples(mm, device, 3, reps))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _ceilings(device: torch.device, dry: bool) -> dict:
    if dry:
        return {"bf16": None, "fp8": None, "fp8_fast_accum": None, "note": "dry run: no ceilings on CPU"}
    out = {"bf16": dense_ceiling(device, torch.bfloat16)}
    for key, fast in (("fp8", False), ("fp8_fast_accum", True)):
        try:
            out[key] = _dense_fp8_tflops(device, 8192, fast, 10)
        except RuntimeError as e:  # pragma: no cover - depends on the GPU
            out[key] = None
            out[f"{key}_error"] = str(e)[:300]
    return out


def _variants(block: int, device: torch.device) -> dict:
    """Variant name -> (options or None for the torch pipeline, gradient format or None)."""
    from gatedmoe.dispatch.triton.fp8_config import fp8_kernel_configs

    blockwise = fp8_kernel_configs(device, block)
    no_tma = {name: dataclasses.replace(cfg, tma=False) for name, cfg in blockwise.items()}
    glu_bm128 = {"fp8_glu_fwd": dataclasses.replace(blockwise["fp8_glu_fwd"], BM=128)}
    variants = {
        "bf16": (TritonOptions(), None),
        "fp8_block": (TritonOptions(fp8=FP8Recipe(block=block, scaling="blockwise")), "e4m3"),
        "fp8_block_e5m2": (TritonOptions(fp8=FP8Recipe(block=block, scaling="blockwise", grad_format="e5m2")), "e5m2"),
        "fp8_row": (TritonOptions(fp8=FP8Recipe(block=block, scaling="rowwise")), "e4m3"),
        # Config alternatives of the blockwise path: no TMA; the first GEMM with 128-row tiles.
        "fp8_block_no_tma": (TritonOptions(fp8=FP8Recipe(block=block, scaling="blockwise"), configs=no_tma), "e4m3"),
        "fp8_block_glu_bm128": (TritonOptions(fp8=FP8Recipe(block=block, scaling="blockwise"), configs=glu_bm128), "e4m3"),
        "sgmm_row": (None, "e4m3"),
    }
    assert tuple(variants) == VARIANT_NAMES
    return variants


def shape_row(name: str, shape: BenchShape, device: torch.device, args, ceilings: dict) -> dict:
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    block = 16 if args.dry_run else 128
    g = torch.Generator(device=device).manual_seed(0)
    r = exact_balanced_routing(shape.tokens, shape.n_experts, shape.k, device, g)
    bank = ExpertBank(shape.n_experts, shape.d_model, shape.d_hidden).to(device, dtype)
    x = torch.randn(shape.tokens, shape.d_model, device=device, dtype=dtype, generator=g)
    gy = torch.randn(shape.tokens, shape.d_model, device=device, dtype=dtype, generator=g)
    N = r.token.numel()
    flops = {"fwd": 6 * N * shape.d_model * shape.d_hidden, "fwd+bwd": 18 * N * shape.d_model * shape.d_hidden}
    triton_fn = get_backend("triton", device)
    row: dict = {"shape": shape.label(), "error": {}, "bound": {}, "gate_failed": [], "ms": {}, "tflops": {},
                 "fraction_of_ceiling": {}, "skipped": {}}

    # Reference: the Triton kernels in float32 (IEEE) on the same bf16 values.
    bank32 = ExpertBank(shape.n_experts, shape.d_model, shape.d_hidden).to(device, torch.float32)
    bank32.load_state_dict(bank.state_dict())
    ref = _grads(triton_fn, x.float(), r, bank32, gy.float())
    del bank32

    # Accuracy on activations with outlier channels as LLM activations have (1% of the
    # channels 1000x larger, "massive activations"): where per-tile and per-row scales part
    # ways (with power-of-two scales both keep FP8's relative precision for every value within
    # 2^14.8 of its scale's amax in e4m3; they differ below that). Not timed.
    outlier = torch.ones(shape.d_model, device=device)
    outlier[torch.randperm(shape.d_model, device=device, generator=g)[: max(1, shape.d_model // 100)]] = 1000.0
    x_out = (x.float() * outlier).to(dtype)
    bank32 = ExpertBank(shape.n_experts, shape.d_model, shape.d_hidden).to(device, torch.float32)
    bank32.load_state_dict(bank.state_dict())
    ref_out = _grads(triton_fn, x_out.float(), r, bank32, gy.float())
    del bank32
    row["error_outliers"] = {}

    sgmm_reason = _sgmm_available(device)
    fns = {}
    for vname, (options, fmt) in _variants(block, device).items():
        if vname not in args.variants.split(","):
            continue
        if options is None:
            if sgmm_reason is not None:
                row["skipped"][vname] = sgmm_reason
                continue
            fn = sgmm_pipeline
        else:
            fn = (lambda o: lambda xx, rr, bb: triton_fn(xx, rr, bb, options=o))(options)
        try:
            errs = {n: _rel(a, b) for n, a, b in zip(NAMES, _grads(fn, x, r, bank, gy), ref, strict=True)}
        except Exception as e:  # a compile error or refusal of one variant must not end the run
            row["skipped"][vname] = f"{type(e).__name__}: {str(e)[:400]}"
            continue
        row["error"][vname] = errs
        row["error_outliers"][vname] = {
            n: _rel(a, b) for n, a, b in zip(NAMES, _grads(fn, x_out, r, bank, gy), ref_out, strict=True)}
        row["bound"][vname] = {n: _bound(n, fmt) for n in NAMES}
        if any(errs[n] > row["bound"][vname][n] for n in NAMES):
            row["gate_failed"].append(vname)  # not timed: a wrong answer fast is no result
            continue
        fns[vname] = fn
    del ref, ref_out
    print(name, "errors", json.dumps(row["error"]), "\nwith outliers", json.dumps(row["error_outliers"]), flush=True)

    xg = x.detach().requires_grad_(True)
    passes = {}
    for vname, fn in fns.items():
        def fwd(fn=fn):
            with torch.no_grad():
                fn(x, r, bank)

        def fwd_bwd(fn=fn):
            bank.zero_grad(set_to_none=True)
            fn(xg, r, bank).backward(gy)

        passes[(vname, "fwd")] = fwd
        passes[(vname, "fwd+bwd")] = fwd_bwd
    if sgmm_reason is None:
        try:
            f, fb = sgmm_gemms_only(shape, r, bank, device)
            fb()
            passes[("sgmm_gemms", "fwd")] = f
            passes[("sgmm_gemms", "fwd+bwd")] = fb
        except Exception as e:
            row["skipped"]["sgmm_gemms"] = f"{type(e).__name__}: {str(e)[:400]}"
    samples: dict = {f"{v} {p}": [] for v, p in passes}
    for _ in range(args.rounds):
        for (v, p), fn in passes.items():
            samples[f"{v} {p}"] += time_samples(fn, device, args.warmup, args.reps)
    for key, ts in samples.items():
        ms = statistics.median(ts)
        v, p = key.split(" ")
        # The GEMMs-only floor does no weight gradients: 12 of the 18 N D H of a step.
        work = flops[p] * 2 // 3 if (v, p) == ("sgmm_gemms", "fwd+bwd") else flops[p]
        tf = work / (ms * 1e-3) / 1e12
        row["ms"][key] = {"median": ms, "min": min(ts), "max": max(ts), "n": len(ts)}
        row["tflops"][key] = tf
        if ceilings.get("bf16"):
            row["fraction_of_ceiling"][key] = {c: tf / ceilings[c] for c in ("bf16", "fp8", "fp8_fast_accum")
                                               if ceilings.get(c)}
    for p in ("fwd", "fwd+bwd"):
        base = row["ms"].get(f"bf16 {p}", {}).get("median")
        if base:
            row.setdefault("speedup_vs_bf16", {})[p] = {
                v: base / row["ms"][f"{v} {p}"]["median"] for v, _ in passes if f"{v} {p}" in row["ms"]}

    # Where the time goes: CUDA time per kernel over one forward+backward (torch.profiler).
    if device.type == "cuda" and args.profile:
        row["kernels_ms"] = {}
        for vname in ("bf16", "fp8_block"):
            if (vname, "fwd+bwd") in passes:
                try:
                    row["kernels_ms"][vname] = _kernel_table(passes[(vname, "fwd+bwd")])
                except Exception as e:
                    row["kernels_ms"][vname] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}

    # The per-step cost the cached timings leave out: quantising both weights (and their
    # transposes) once after each optimizer step.
    from gatedmoe.dispatch.triton.fp8_ops import quantize_weight

    for vname in ("fp8_block", "fp8_row"):
        if vname in fns:
            recipe = _variants(block, device)[vname][0].fp8

            def q(recipe=recipe):
                quantize_weight(bank.w_in.detach(), recipe, True)
                quantize_weight(bank.w_out.detach(), recipe, True)

            row.setdefault("quantize_weights_ms", {})[vname] = statistics.median(
                time_samples(q, device, args.warmup, args.reps))
    return row


def _print_summary(name: str, row: dict) -> None:
    """One line per variant's errors, one per timed pass: median ms, spread, speed-up over
    bf16, TFLOP/s."""
    for tag, key in (("error", "error"), ("error (outliers)", "error_outliers")):
        for v, errs in row.get(key, {}).items():
            print(f"SUMMARY {name:12s} {v:22s} {tag:17s} " + " ".join(f"{n}={e:.4f}" for n, e in errs.items()),
                  flush=True)
    for key, t in row.get("ms", {}).items():
        v, p = key.split(" ")
        speed = row.get("speedup_vs_bf16", {}).get(p, {}).get(v)
        print(f"SUMMARY {name:12s} {key:28s} {t['median']:9.3f} ms [{t['min']:.3f}, {t['max']:.3f}]"
              f"  x{speed or float('nan'):.2f} vs bf16  {row['tflops'][key]:7.1f} TFLOP/s", flush=True)
    for v in row.get("gate_failed", []):
        print(f"SUMMARY {name:12s} {v}: accuracy gate failed, not timed: {row['error'][v]}", flush=True)
    for v, why in row.get("skipped", {}).items() if isinstance(row.get("skipped"), dict) else []:
        print(f"SUMMARY {name:12s} {v}: skipped: {why}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(FP8_SHAPES))
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="skip the per-kernel CUDA time table of one forward+backward")
    ap.add_argument("--variants", default=",".join(v for v in VARIANT_NAMES if v != "fp8_block_glu_bm128"),
                    help="comma-separated variants (default: all but fp8_block_glu_bm128, to fit one device call)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip the shapes left once this much time has passed")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, one tiny shape (plumbing only)")
    args = ap.parse_args()
    t0 = time.monotonic()
    if args.dry_run:
        # The interpreter needs the tests' numpy >= 2.4 patch (`tests/dispatch/triton_interpret.py`).
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "dispatch"))
        from triton_interpret import apply

        apply()
        device = torch.device("cpu")
        shapes = {"dry": BenchShape(48, 32, 32, 4, 2)}
        args.warmup, args.reps, args.rounds = 1, 1, 1
    else:
        device = torch.device("cuda")
        shapes = {n: SHAPES[n] for n in args.shapes.split(",")}
    result = {"machine": machine_info(device), "args": vars(args), "ceilings_tflops": _ceilings(device, args.dry_run),
              "sgmm": _sgmm_available(device) or "available", "shapes": {}}
    print("machine", json.dumps(result["machine"]), "\nceilings", json.dumps(result["ceilings_tflops"]), flush=True)
    for name, shape in shapes.items():
        if time.monotonic() - t0 > args.budget_s:
            result["shapes"][name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            continue
        try:
            result["shapes"][name] = shape_row(name, shape, device, args, result["ceilings_tflops"])
        except Exception as e:  # one shape's failure (memory, a kernel) must not lose the others
            import traceback

            result["shapes"][name] = {"skipped": f"{type(e).__name__}: {str(e)[:300]}",
                                      "traceback": traceback.format_exc()[-3000:]}
            print(f"SUMMARY {name:12s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        print(name, json.dumps(result["shapes"][name], indent=1), flush=True)
        if "ms" in result["shapes"][name]:
            _print_summary(name, result["shapes"][name])
        result["elapsed_s"] = time.monotonic() - t0
        Path(args.out).write_text(json.dumps(result, indent=1))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"wrote {args.out} after {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
