"""Layer benchmark: the whole `MoE` layer (router, top-k, auxiliary losses, dispatch),
forward and forward+backward per backend, in the rows of `gatedmoe.bench.dispatch`.

Shape legend: T tokens, D model dim, H expert hidden, E experts, K top-k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gatedmoe.bench.harness import BenchShape, dense_ceiling, result_row, time_ms
from gatedmoe.dispatch.options import TritonOptions
from gatedmoe.layers.moe import MoE

__all__ = ["bench_layer"]


def bench_layer(
    shape: BenchShape,
    *,
    backends: list[str],
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    gate: str = "topk_softmax",
    warmup: int = 3,
    reps: int = 10,
    ceiling: float | None = None,
    options: TritonOptions | None = None,
) -> list[dict]:
    """Time the whole `MoE` layer (gate, routing, auxiliary losses, dispatch), forward and
    forward+backward, per backend; same row format as `bench_dispatch` (routing "gate:<name>").

    FLOPs count the expert GEMMs of the assignments the gate made, as in `bench_dispatch`,
    so the gap to the dispatch-only rows is what routing costs. ``options`` is the Triton
    backend's options value, given to the layer of the "triton" backend (and "auto").

    Examples
    --------
    >>> from gatedmoe.bench import BenchShape
    >>> rows = bench_layer(BenchShape(32, 16, 16, 4, 2), backends=["grouped"], dtype=torch.float32, reps=1)
    >>> rows[0]["routing"]
    'gate:topk_softmax'
    """
    device = torch.device(device)
    T, D, H, E, K = shape.tokens, shape.d_model, shape.d_hidden, shape.n_experts, shape.k
    if ceiling is None:
        ceiling = dense_ceiling(device, dtype)
    torch.manual_seed(0)
    x = torch.randn(T, D, device=device, dtype=dtype)
    gy = torch.randn(T, D, device=device, dtype=dtype)
    rows = []
    for name in backends:
        torch.manual_seed(0)
        opts = options if name in ("triton", "auto") else None
        moe = MoE(D, E, H, backend_options=opts, gate=gate, k=K, backend=name, check_inputs=False)
        moe = moe.to(device=device, dtype=dtype)
        xg = x.detach().clone().requires_grad_()
        with torch.no_grad():
            moe(x)
        n_assign = moe.last_routing.n_assignments
        flops_fwd = n_assign * moe.experts.flops_per_token()

        def fwd(moe: MoE = moe) -> None:
            with torch.no_grad():
                moe(x)

        def fwd_bwd(moe: MoE = moe, xg: Tensor = xg) -> None:
            moe.zero_grad(set_to_none=True)
            moe(xg).backward(gy)

        for pass_name, f, mult in (("fwd", fwd, 1), ("fwd+bwd", fwd_bwd, 3)):
            ms = time_ms(f, device, warmup, reps)
            tflops = mult * flops_fwd / (ms * 1e-3) / 1e12
            rows.append(result_row(shape, name, pass_name, dtype, device, f"gate:{gate}", ms, tflops, ceiling,
                                   float("nan")))
    return rows
