"""What every benchmark shares: shapes, forced-balanced and random routings, the timer
(CUDA events on GPU, perf_counter on CPU; warm-up, then the median), the machine, and the
dense GEMM ceiling that throughput is reported against.

Shape legend: T tokens, D model dim, H expert hidden, E experts, K top-k, N = T*K.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from gatedmoe.dispatch.options import TritonOptions
from gatedmoe.routing import Routing

__all__ = [
    "BenchShape",
    "SHAPES",
    "GPU_SHAPES",
    "balanced_routing",
    "random_routing",
    "capture_graph",
    "time_ms",
    "time_samples",
    "dense_gemm_tflops",
    "dense_ceiling",
    "machine_info",
    "result_row",
]


@dataclass(frozen=True)
class BenchShape:
    """One benchmark shape: ``tokens`` (T), ``d_model`` (D), ``d_hidden`` (H),
    ``n_experts`` (E) and ``k`` (K, experts per token).

    Examples
    --------
    >>> BenchShape(64, 16, 32, 4, 2).label()
    'T=64 d=16 h=32 E=4 k=2'
    """

    tokens: int
    d_model: int
    d_hidden: int
    n_experts: int
    k: int

    def label(self) -> str:
        """``"T=.. d=.. h=.. E=.. k=.."``, the row label of the tables."""
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
# What `gatedmoe bench --shape gpu` runs, in table order.
GPU_SHAPES: tuple[str, ...] = ("mixtral", "deepseek", "small", "finegrained")


def machine_info(device: torch.device, options: TritonOptions | None = None) -> dict:
    """The machine a benchmark ran on, as a flat dict: torch, python, CPU and threads; on
    CUDA also the GPU, CUDA version, float32 matmul precision, Triton version and
    ``triton_fp32_scatter`` (from ``options``, default `TritonOptions()`).

    Examples
    --------
    >>> sorted(machine_info(torch.device("cpu")))[:3]
    ['cores', 'cpu', 'cpu_threads']
    """
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    info["cpu_threads"] = torch.get_num_threads()
    info["cores"] = os.cpu_count()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["fp32_matmul"] = torch.get_float32_matmul_precision()  # "high": TF32 for float32 GEMMs
        try:
            import triton

            info["triton"] = triton.__version__
            info["triton_fp32_scatter"] = (options or TritonOptions()).fp32_scatter
        except ImportError:
            info["triton"] = None
    return info


def balanced_routing(T: int, E: int, K: int, device: torch.device, generator: torch.Generator | None = None) -> Routing:
    """Forced-balanced routing: each token takes K distinct consecutive experts (mod E) from a
    uniformly random start, so every expert expects ``T*K/E`` assignments (within sampling
    noise: the starts are random, so the counts are not exactly equal); weights random
    positive, summing to 1 per token.

    Examples
    --------
    >>> balanced_routing(8, 4, 2, torch.device("cpu")).n_assignments
    16
    """
    if K > E:
        raise ValueError(f"k={K} > n_experts={E}")
    base = (torch.arange(T * K, device=device) % E).view(T, K)
    # Rotate each token's experts so the K picks are distinct and all experts get used.
    shift = torch.randint(0, E, (T, 1), device=device, generator=generator)
    experts = (base + shift) % E
    weights = torch.rand(T, K, device=device, generator=generator) + 0.1
    return Routing.from_topk(weights / weights.sum(-1, keepdim=True), experts, E)


def random_routing(T: int, E: int, K: int, device: torch.device, generator: torch.Generator | None = None) -> Routing:
    """Routing of a random linear softmax router (unbalanced, as a fresh router is).

    Examples
    --------
    >>> random_routing(8, 4, 2, torch.device("cpu")).n_assignments
    16
    """
    logits = torch.randn(T, E, device=device, generator=generator) * 2
    w, e = torch.topk(torch.softmax(logits, -1), K, -1)
    return Routing.from_topk(w / w.sum(-1, keepdim=True), e, E)


def time_samples(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn()`` after ``warmup`` untimed ones, sorted.

    On CUDA each call is timed between two CUDA events with a synchronize after it (host
    launch latency before the first kernel counts); on CPU with ``time.perf_counter``.

    Examples
    --------
    >>> len(time_samples(lambda: None, torch.device("cpu"), warmup=1, reps=3))
    3
    """
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
    return sorted(times)


def capture_graph(fn: Callable[[], object], device: torch.device, warmup: int = 2) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph, after ``warmup`` calls on a side stream (as capture
    requires: lazy initialisation and kernel compilation stay out of the graph); returns the
    graph's replay. Raises what the capture raises (e.g. a host synchronisation inside ``fn``)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls (see `time_samples`).

    Examples
    --------
    >>> time_ms(lambda: None, torch.device("cpu"), warmup=1, reps=3) >= 0
    True
    """
    return statistics.median(time_samples(fn, device, warmup, reps))


def dense_gemm_tflops(m: int, n: int, k: int, device: torch.device, dtype: torch.dtype, warmup: int = 3,
                      reps: int = 10) -> float:
    """Measured TFLOP/s of a dense ``[m, k] @ [k, n]`` product on ``device`` (median time)."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup, reps)
    return 2 * m * n * k / (ms * 1e-3) / 1e12


def dense_ceiling(device: torch.device, dtype: torch.dtype, n: int | None = None, warmup: int = 3, reps: int = 10) -> float:
    """Dense GEMM TFLOP/s of an ``n x n x n`` product on this device (8192 on GPU, 1024 on CPU).

    Examples
    --------
    >>> dense_ceiling(torch.device("cpu"), torch.float32, n=64, warmup=1, reps=2) > 0
    True
    """
    n = n or (8192 if device.type == "cuda" else 1024)
    return dense_gemm_tflops(n, n, n, device, dtype, warmup, reps)


def estimate_memory_bytes(shape: BenchShape, dtype: torch.dtype, *, layer: bool = False) -> int:
    """Rough peak bytes a dispatch (or, ``layer=True``, whole-layer) benchmark of ``shape``
    allocates, forward+backward, before it allocates anything: SwiGLU expert weights and
    their gradients (``6 E D H``), inputs and upstream gradients (``4 T D``), the gathered
    rows and outputs of the N = T K assignments and their gradients (``4 N D``), and the
    hidden activations with theirs (``6 N H``); the layer adds its router (``2 D E``) and
    probabilities (``2 T E``). Within a factor of about 1.5 of the measured peak.

    >>> estimate_memory_bytes(BenchShape(8192, 4096, 14336, 8, 2), torch.float32) / 2**30 > 15
    True
    """
    T, D, H, E, K = shape.tokens, shape.d_model, shape.d_hidden, shape.n_experts, shape.k
    N = T * K
    elems = 6 * E * D * H + 4 * T * D + 4 * N * D + 6 * N * H
    if layer:
        elems += 2 * D * E + 2 * T * E
    size = torch.empty((), dtype=dtype).element_size()
    return int(elems * size)


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: CUDA's free bytes, or the host's MemAvailable (Linux); None
    where it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def result_row(shape: BenchShape, backend: str, pass_name: str, dtype: torch.dtype, device: torch.device, routing: str,
               ms: float, tflops: float, ceiling: float, extra_gb: float) -> dict:
    """One result row of `bench_dispatch` / `bench_layer` (the keys `format_rows` reads)."""
    return {
        "shape": shape.label(), **asdict(shape), "backend": backend, "pass": pass_name,
        "dtype": str(dtype).removeprefix("torch."), "device": device.type, "routing": routing,
        "ms": ms, "tokens_per_s": shape.tokens / (ms * 1e-3), "tflops": tflops,
        "ceiling_tflops": ceiling, "fraction_of_ceiling": tflops / ceiling, "extra_mem_gb": extra_gb,
    }
