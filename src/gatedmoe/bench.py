"""Dispatch benchmark: reference vs grouped (vs Triton where present), forward and
forward+backward, gated on correctness, reported against a dense GEMM ceiling.

Shape legend: T tokens, D model dim, H expert hidden, E experts, K top-k, N = T*K.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from gatedmoe.dispatch import get_backend, grouped_mm, reference_dispatch
from gatedmoe.dispatch.grouped import _grouped_mm_unsupported
from gatedmoe.experts.bank import ExpertBank
from gatedmoe.routing import Routing

__all__ = ["BenchShape", "SHAPES", "balanced_routing", "random_routing", "bench_dispatch", "dense_ceiling", "machine_info"]


@dataclass(frozen=True)
class BenchShape:
    tokens: int
    d_model: int
    d_hidden: int
    n_experts: int
    k: int

    def label(self) -> str:
        return f"T={self.tokens} d={self.d_model} h={self.d_hidden} E={self.n_experts} k={self.k}"


# The GPU shapes of the foundation issue (Mixtral-like, DeepSeekMoE-like, small, fine-grained),
# and a CPU-sized default.
SHAPES: dict[str, BenchShape] = {
    "mixtral": BenchShape(8192, 4096, 14336, 8, 2),
    "deepseek": BenchShape(16384, 2048, 1408, 64, 6),
    "small": BenchShape(8192, 1024, 4096, 16, 2),
    "finegrained": BenchShape(16384, 2048, 512, 256, 8),
    "cpu": BenchShape(2048, 256, 512, 8, 2),
}


def machine_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    try:
        import os

        info["cpu_threads"] = torch.get_num_threads()
        info["cores"] = os.cpu_count()
    except Exception:  # pragma: no cover
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["fp32_matmul"] = torch.get_float32_matmul_precision()  # "high": TF32 for float32 GEMMs
        try:
            import triton

            info["triton"] = triton.__version__
            from gatedmoe.dispatch.triton import fp32_scatter

            info["triton_fp32_scatter"] = fp32_scatter()
        except ImportError:
            info["triton"] = None
    return info


def balanced_routing(T: int, E: int, K: int, device: torch.device, generator: torch.Generator | None = None) -> Routing:
    """Forced-balanced routing: every expert gets exactly ``T*K/E`` assignments (up to one),
    each token K distinct experts; weights random positive, summing to 1 per token."""
    if K > E:
        raise ValueError(f"k={K} > n_experts={E}")
    base = (torch.arange(T * K, device=device) % E).view(T, K)
    # Rotate each token's experts so the K picks are distinct and all experts get used.
    shift = torch.randint(0, E, (T, 1), device=device, generator=generator)
    experts = (base + shift) % E
    weights = torch.rand(T, K, device=device, generator=generator) + 0.1
    return Routing.from_topk(weights / weights.sum(-1, keepdim=True), experts, E)


def random_routing(T: int, E: int, K: int, device: torch.device, generator: torch.Generator | None = None) -> Routing:
    """Routing of a random linear softmax router (unbalanced, as a fresh router is)."""
    logits = torch.randn(T, E, device=device, generator=generator) * 2
    w, e = torch.topk(torch.softmax(logits, -1), K, -1)
    return Routing.from_topk(w / w.sum(-1, keepdim=True), e, E)


def _time(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def dense_gemm_tflops(m: int, n: int, k: int, device: torch.device, dtype: torch.dtype, warmup: int = 3,
                      reps: int = 10) -> float:
    """Measured TFLOP/s of a dense ``[m, k] @ [k, n]`` product on ``device`` (median time)."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    ms = _time(lambda: a @ b, device, warmup, reps)
    return 2 * m * n * k / (ms * 1e-3) / 1e12


def dense_ceiling(device: torch.device, dtype: torch.dtype, n: int | None = None, warmup: int = 3, reps: int = 10) -> float:
    """Dense GEMM TFLOP/s of an ``n x n x n`` product on this device (8192 on GPU, 1024 on CPU)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    return dense_gemm_tflops(n, n, n, device, dtype, warmup, reps)


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


def _row(shape: BenchShape, backend: str, pass_name: str, dtype: torch.dtype, device: torch.device, routing: str,
         ms: float, tflops: float, ceiling: float, extra_gb: float) -> dict:
    """One result row of `bench_dispatch` / `bench_layer`."""
    return {
        "shape": shape.label(), **asdict(shape), "backend": backend, "pass": pass_name,
        "dtype": str(dtype).removeprefix("torch."), "device": device.type, "routing": routing,
        "ms": ms, "tokens_per_s": shape.tokens / (ms * 1e-3), "tflops": tflops,
        "ceiling_tflops": ceiling, "fraction_of_ceiling": tflops / ceiling, "extra_mem_gb": extra_gb,
    }


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
) -> list[dict]:
    """Time each backend on one shape; return one row per (backend, pass).

    Backends: "reference" (per-expert loop), "bare_grouped_mm" (two grouped GEMMs on
    pre-sorted rows: the floor), and dispatch backends ("grouped", "triton"). Before
    timing, every backend's output is checked against the reference on the same inputs
    (relative error norm < 2e-2 in bf16/fp16, 1e-4 in fp32); a failing backend raises.
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
        return lambda xx: get_backend(name, device)(xx, r, bank)

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
            ms = _time(f, device, warmup, reps)
            # Peak memory above what was allocated before the pass (inputs, weights).
            extra_gb = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else float("nan")
            tflops = mult * flops_fwd / (ms * 1e-3) / 1e12
            rows.append(_row(shape, name, pass_name, dtype, device, routing, ms, tflops, ceiling, extra_gb))
    return rows


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
) -> list[dict]:
    """Time the whole `MoE` layer (gate, routing, auxiliary losses, dispatch), forward and
    forward+backward, per backend; same row format as `bench_dispatch` (routing "gate").

    FLOPs count the expert GEMMs of the assignments the gate made, as in `bench_dispatch`,
    so the gap to the dispatch-only rows is what routing costs.
    """
    from gatedmoe.layers.moe import MoE

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
        moe = MoE(D, E, H, gate=gate, k=K, backend=name, check_inputs=False).to(device=device, dtype=dtype)
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
            ms = _time(f, device, warmup, reps)
            tflops = mult * flops_fwd / (ms * 1e-3) / 1e12
            rows.append(_row(shape, name, pass_name, dtype, device, f"gate:{gate}", ms, tflops, ceiling, float("nan")))
    return rows


def format_rows(rows: list[dict]) -> str:
    """Plain-text table of `bench_dispatch` rows."""
    head = f"{'shape':<40} {'backend':<16} {'pass':<8} {'ms':>9} {'tokens/s':>11} {'TFLOP/s':>8} {'of ceil':>8} {'+mem GB':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['shape']:<40} {r['backend']:<16} {r['pass']:<8} {r['ms']:9.3f} {r['tokens_per_s']:11.0f} "
            f"{r['tflops']:8.2f} {100 * r['fraction_of_ceiling']:7.1f}% {r['extra_mem_gb']:8.2f}"
        )
    return "\n".join(lines)


def grouped_mm_available(device: torch.device, dtype: torch.dtype, d_model: int, d_hidden: int) -> bool:
    """Whether the grouped backend will use torch._grouped_mm (rather than its loop fallback)."""
    a = torch.empty(1, d_model, device=device, dtype=dtype)
    b = torch.empty(1, d_model, d_hidden, device=device, dtype=dtype)
    return _grouped_mm_unsupported(a, b) is None


