"""Dispatch benchmark: the experts given a routing, reference vs bare grouped GEMM vs the
dispatch backends ("grouped", "triton"), forward and forward+backward, gated on
correctness against the reference, reported against a dense GEMM ceiling.

Shape legend: T tokens, D model dim, H expert hidden, E experts, K top-k, N = T*K.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gatedmoe.bench.harness import (
    BenchShape,
    balanced_routing,
    dense_ceiling,
    random_routing,
    result_row,
    time_ms,
)
from gatedmoe.dispatch import get_backend, grouped_mm, reference_dispatch
from gatedmoe.dispatch.options import TritonOptions
from gatedmoe.experts.bank import ExpertBank
from gatedmoe.routing import Routing

__all__ = ["bench_dispatch"]


def _bare_grouped(x_sorted_ND: Tensor, routing: Routing, bank: ExpertBank) -> Tensor:
    """The floor a grouped-GEMM MoE can reach: the two grouped products and the activation on
    rows already in expert order (no gather, no weighting, no scatter)."""
    h = grouped_mm(x_sorted_ND, bank.w_in.transpose(-2, -1), routing.offsets)
    return grouped_mm(bank.act(h), bank.w_out.transpose(-2, -1), routing.offsets)


def _passes(fn: Callable[[Tensor], Tensor], inp: Tensor, xg: Tensor, gy: Tensor, bank: ExpertBank) -> list:
    """``(name, closure, flop multiplier)`` for the forward and forward+backward timings."""

    def fwd() -> None:
        with torch.no_grad():
            fn(inp)

    def fwd_bwd() -> None:
        bank.zero_grad(set_to_none=True)
        fn(xg).backward(gy)

    return [("fwd", fwd, 1), ("fwd+bwd", fwd_bwd, 3)]


def bench_dispatch(
    shape: BenchShape,
    *,
    backends: list[str],
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    routing: str = "balanced",
    activation: str = "swiglu",
    warmup: int = 3,
    reps: int = 10,
    check: bool = True,
    ceiling: float | None = None,
    options: TritonOptions | None = None,
) -> list[dict]:
    """Time each backend on one shape; return one row per (backend, pass).

    Backends: "reference" (per-expert loop), "bare_grouped_mm" (two grouped GEMMs on
    pre-sorted rows: the floor), and dispatch backends ("grouped", "triton"), each called
    as ``get_backend(name, device)(x_TD, routing, experts, options=options)``. Before
    timing, every backend's output is checked against the reference on the same inputs
    (relative error norm < 2e-2 in bf16/fp16, 1e-4 in fp32); a failing backend raises.

    Rows (`gatedmoe.bench.harness.result_row`): ``ms`` (median), ``tokens_per_s``,
    ``tflops`` (expert GEMM FLOPs of the routed assignments; x3 for forward+backward),
    ``fraction_of_ceiling`` of ``ceiling`` (measured here when None) and ``extra_mem_gb``
    (CUDA peak above the inputs; NaN on CPU).

    Examples
    --------
    >>> from gatedmoe.bench import BenchShape
    >>> rows = bench_dispatch(BenchShape(64, 16, 32, 4, 2), backends=["grouped"], dtype=torch.float32, reps=1)
    >>> [r["pass"] for r in rows]
    ['fwd', 'fwd+bwd']
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    T, D, H, E, K = shape.tokens, shape.d_model, shape.d_hidden, shape.n_experts, shape.k
    bank = ExpertBank(E, D, H, activation=activation).to(device=device, dtype=dtype)
    x = torch.randn(T, D, device=device, dtype=dtype, generator=gen)
    make = balanced_routing if routing == "balanced" else random_routing
    r = make(T, E, K, device, gen)
    gy = torch.randn(T, D, device=device, dtype=dtype, generator=gen)
    flops_fwd = r.n_assignments * bank.flops_per_token()
    if ceiling is None:
        ceiling = dense_ceiling(device, dtype)

    def fn_for(name: str) -> Callable[[Tensor], Tensor]:
        if name == "reference":
            return lambda xx: reference_dispatch(xx, r, bank)
        if name == "bare_grouped_mm":
            return lambda xx: _bare_grouped(xx.index_select(0, r.token) if xx.shape[0] == T else xx, r, bank)
        backend = get_backend(name, device)
        return lambda xx: backend(xx, r, bank, options=options)

    x_sorted = x.index_select(0, r.token).contiguous()
    ref_y = reference_dispatch(x, r, bank).float() if check else None
    rows = []
    for name in backends:
        fn = fn_for(name)
        inp = x_sorted if name == "bare_grouped_mm" else x
        if check and name not in ("reference", "bare_grouped_mm"):
            y = fn(x).float()
            err = ((y - ref_y).norm() / ref_y.norm()).item()
            tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
            if not err < tol:
                raise RuntimeError(f"backend {name} disagrees with the reference on {shape.label()}: rel err {err:.2e}")
        xg = inp.detach().clone().requires_grad_()
        gyy = gy if name != "bare_grouped_mm" else torch.randn(r.n_assignments, D, device=device, dtype=dtype, generator=gen)

        for pass_name, f, mult in _passes(fn, inp, xg, gyy, bank):
            # Gradients left by the previous backend would count against this one's peak.
            bank.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            ms = time_ms(f, device, warmup, reps)
            # Peak memory above what was allocated before the pass (inputs, weights).
            extra_gb = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else float("nan")
            tflops = mult * flops_fwd / (ms * 1e-3) / 1e12
            rows.append(result_row(shape, name, pass_name, dtype, device, routing, ms, tflops, ceiling, extra_gb))
    return rows
