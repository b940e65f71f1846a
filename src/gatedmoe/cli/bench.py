"""`gatedmoe bench`: time dispatch backends against the reference and a dense GEMM ceiling
(`gatedmoe.bench`); ``--layer`` the whole layer, ``--ep N`` expert parallelism."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from gatedmoe.cli._common import (
    HELP_FORMAT,
    UsageError,
    check_device,
    check_k,
    examples,
    nonneg_int,
    positive_float,
    positive_int,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand to ``sub``."""
    from gatedmoe.bench import SHAPES

    p = sub.add_parser("bench", help="benchmark MoE dispatch backends", description=__doc__, formatter_class=HELP_FORMAT,
                       epilog=examples(
                           "gatedmoe bench --device cpu --tokens 256          # a quick look on a CPU",
                           "gatedmoe bench --shape gpu --backend triton --reps 20",
                           "gatedmoe bench --layer --backend grouped",
                           "gatedmoe bench --ep 2 --device cpu --tokens 256   # expert parallelism, 2 ranks",
                       ))
    p.add_argument("--shape", default=None, help=f"preset: {', '.join(SHAPES)}, or 'gpu' for the four GPU presets "
                   "(default: 'cpu' on CPU, 'gpu' on CUDA)")
    p.add_argument("--tokens", type=positive_int, help="T (overrides the preset)")
    p.add_argument("--d-model", type=positive_int, help="D")
    p.add_argument("--d-hidden", type=positive_int, help="H")
    p.add_argument("--experts", type=positive_int, help="E")
    p.add_argument("--k", type=positive_int, help="experts per token")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default bf16 on CUDA, fp32 on CPU (CPU bf16 GEMMs are emulated and slow)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--max-memory-fraction", type=positive_float, default=0.8,
                   help="refuse a shape whose estimated peak memory exceeds this fraction of the free memory of the "
                        "device (default 0.8; the estimate is printed)")
    p.add_argument("--backend", default="all", help="comma-separated: reference, bare_grouped_mm, grouped, triton; or 'all' (default: all that this "
                        "device runs)")
    p.add_argument("--routing", choices=["balanced", "random"], default="balanced",
                   help="forced-balanced (default; kernel timing independent of a router) or a random router")
    p.add_argument("--reps", type=positive_int, default=None, help="timed repetitions, median reported (default 20 on CUDA, 5 on CPU)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check against the reference")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    p.add_argument("--ep", type=nonneg_int, default=0, metavar="N",
                   help="expert parallelism: spawn N ranks (gloo on CPU, NCCL on CUDA), time an ExpertParallelMoE "
                        "forward+backward, report tokens/s per rank, all-to-all share and load imbalance "
                        "(--tokens is per rank; default 2048 on CPU); under torchrun, runs on its ranks")
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps with --ep (default 10)")
    p.add_argument("--fp32-matmul", choices=["highest", "high", "medium"], default=None,
                   help="torch.set_float32_matmul_precision for the run: the routers compute in float32, and "
                        "'high' lets those GEMMs use TF32 tensor cores (matters with --layer)")
    p.add_argument("--fp32-scatter", action="store_true",
                   help="triton backend: accumulate the scatter-adds (combine, dL/dx) in float32 instead of the "
                        "input dtype (TritonOptions(fp32_scatter=True))")
    p.add_argument("--layer", action="store_true",
                   help="time the whole MoE layer (top-k softmax gate, routing, aux losses, dispatch) per backend "
                        "instead of dispatch alone")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark ``args`` asks for; 0 on success (1 if the EP check fails)."""
    from dataclasses import replace

    from gatedmoe.bench import (
        GPU_SHAPES,
        SHAPES,
        bench_dispatch,
        bench_layer,
        dense_ceiling,
        format_rows,
        machine_info,
    )
    from gatedmoe.dispatch import backend_names
    from gatedmoe.dispatch.options import TritonOptions

    device = check_device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.json is not None:
        _check_json_path(args.json)
    if args.fp32_matmul:
        torch.set_float32_matmul_precision(args.fp32_matmul)
    # None, not TritonOptions(): the backend's own defaults unless the flag asks otherwise.
    options = TritonOptions(fp32_scatter=True) if args.fp32_scatter else None
    if args.ep:
        return _run_ep(args, device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[args.dtype]
    shape_name = args.shape or ("gpu" if device.type == "cuda" else "cpu")
    if shape_name in ("gpu", *GPU_SHAPES) and device.type != "cuda":
        # On a CPU these shapes take 10 minutes and more and tens of GB (issue 23).
        raise UsageError(f"--shape {shape_name} is a GPU preset and this run is on {device.type} "
                         f"({'this machine has no CUDA device' if not torch.cuda.is_available() else 'add --device cuda'}"
                         f"); use --shape cpu, with --tokens/--d-model/--d-hidden/--experts/--k to change its size")
    if shape_name == "gpu":
        shapes = [SHAPES[n] for n in GPU_SHAPES]
    elif shape_name in SHAPES:
        shapes = [SHAPES[shape_name]]
    else:
        raise UsageError(f"unknown --shape {shape_name!r}; known: gpu, {', '.join(SHAPES)}")
    overrides = {k: v for k, v in (("tokens", args.tokens), ("d_model", args.d_model), ("d_hidden", args.d_hidden),
                                   ("n_experts", args.experts), ("k", args.k)) if v is not None}
    shapes = [replace(s, **overrides) for s in shapes]
    for s in shapes:
        check_k(s.k, s.n_experts, "" if args.experts is not None else f"of --shape {shape_name}")
    _check_memory(shapes, dtype, device, args.layer, args.max_memory_fraction)
    dispatch = [b for b in backend_names() if b != "auto"]
    # Backends of the dispatch benchmark alone (no MoE layer runs on them).
    dispatch_only = ("reference", "bare_grouped_mm")
    known = [*dispatch_only, *dispatch]
    # Triton kernels only run compiled on CUDA (on CPU only in the slow interpreter).
    usable = [b for b in known if not (b == "triton" and device.type != "cuda")]
    backends = usable if args.backend == "all" else [b.strip() for b in args.backend.split(",")]
    for b in backends:
        if b not in known:
            raise UsageError(f"unknown backend {b!r}; known: {', '.join(known)}")
    # On a CPU the triton backend falls back to grouped: its rows would time grouped under triton's name.
    if "triton" in backends and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError(f"--backend triton needs a CUDA device (this run is on {device.type}; on a CPU it would time "
                         "the grouped fallback under triton's name); set TRITON_INTERPRET=1 for the slow interpreter")
    asked_dispatch_only = [b for b in backends if b in dispatch_only]
    if args.layer and args.backend != "all" and asked_dispatch_only:
        raise UsageError(f"--layer times the MoE layer, whose backends are {', '.join(dispatch)}; "
                         f"{', '.join(asked_dispatch_only)} time dispatch alone (leave out --layer)")
    reps = args.reps or (20 if device.type == "cuda" else 5)
    info = machine_info(device, options)
    print("machine:", ", ".join(f"{k}={v}" for k, v in info.items()))
    ceiling = dense_ceiling(device, dtype)
    print(f"dense {args.dtype} GEMM ceiling: {ceiling:.2f} TFLOP/s")
    rows = []
    if args.layer:
        backends = [b for b in backends if b not in dispatch_only]
    for s in shapes:
        if args.layer:
            rows += bench_layer(s, backends=backends, dtype=dtype, device=device, reps=reps, ceiling=ceiling,
                                options=options)
        else:
            rows += bench_dispatch(s, backends=backends, dtype=dtype, device=device, routing=args.routing,
                                   reps=reps, check=not args.no_check, ceiling=ceiling, options=options)
    print(format_rows(rows))
    result = {"machine": info, "ceiling_tflops": ceiling, "rows": rows}
    if device.type == "cuda":
        # The ceiling above is a short burst on a card that has not worked yet; GPU clocks drop
        # under sustained load (measured on an H100: 745 cold, 684 after 200 products). The
        # fractions keep the burst ceiling; the sustained one is printed beside it.
        sustained = dense_ceiling(device, dtype, warmup=200, reps=50)
        result["ceiling_sustained_tflops"] = sustained
        print(f"dense {args.dtype} GEMM at the end of the run, after a 200-product warm-up: {sustained:.2f} TFLOP/s "
              f"(the % column is of the {ceiling:.2f} measured first)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


def _check_json_path(path: Path) -> None:
    from gatedmoe.cli._common import prepare_out

    if path.is_dir():
        raise UsageError(f"--json {path} is a folder; give a file name")
    prepare_out(path.parent if str(path.parent) else Path("."), flag=f"--json {path}: folder")


def _check_memory(shapes: list, dtype: torch.dtype, device: torch.device, layer: bool, fraction: float) -> None:
    """Refuse, before allocating, a shape whose estimated peak exceeds ``fraction`` of the free
    memory of ``device``."""
    from gatedmoe.bench import available_memory_bytes, estimate_memory_bytes

    free = available_memory_bytes(device)
    if free is None:
        return
    for s in shapes:
        need = estimate_memory_bytes(s, dtype, layer=layer)
        if need > fraction * free:
            raise UsageError(f"{s.label()} in {str(dtype).removeprefix('torch.')} needs about {need / 2**30:.1f} GiB "
                             f"and {device.type} has {free / 2**30:.1f} GiB free (limit --max-memory-fraction "
                             f"{fraction}); use a smaller --tokens/--d-hidden/--experts or another --shape")


def _run_ep(args: argparse.Namespace, device: torch.device) -> int:
    from gatedmoe.bench import (
        SHAPES,
        format_ep_report,
        run_ep_bench,
        run_ep_bench_torchrun,
        under_torchrun,
    )

    if args.ep < 1:
        raise UsageError(f"--ep must be >= 1, got {args.ep}")
    if args.shape is not None and args.shape not in SHAPES:
        raise UsageError(f"--ep: unknown --shape {args.shape!r}; known: {', '.join(SHAPES)}")
    shape_name = args.shape or ("deepseek" if device.type == "cuda" else "cpu")
    preset = SHAPES[shape_name]
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    kwargs = dict(
        tokens_per_rank=args.tokens or preset.tokens, d_model=args.d_model or preset.d_model,
        d_hidden=args.d_hidden or preset.d_hidden, n_experts=args.experts or preset.n_experts, k=args.k or preset.k,
        dtype=DTYPES[dtype], steps=args.steps,
    )
    experts_from = "" if args.experts else f"of --shape {shape_name}"
    check_k(kwargs["k"], kwargs["n_experts"], experts_from)
    if not under_torchrun() and kwargs["n_experts"] % args.ep:
        where = f" ({experts_from})" if experts_from else ""
        raise UsageError(f"--experts {kwargs['n_experts']}{where} must be divisible by --ep {args.ep}: "
                         "each rank holds the same number of experts")
    if under_torchrun():
        # Every rank runs the benchmark, on the world torchrun made (--ep is not used); rank 0 reports.
        r = run_ep_bench_torchrun(device.type, **kwargs)
        if os.environ["RANK"] != "0":
            return 0 if r["check_passed"] else 1
    else:
        r = run_ep_bench(args.ep, device=device.type, **kwargs)
    print(format_ep_report(r))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=1, default=str))
    return 0 if r["check_passed"] else 1
