"""Benchmarks behind `gatedmoe bench`: programs gated on correctness that print the machine
and report throughput as a fraction of a dense GEMM ceiling measured in the same run.

- `harness`: shapes, routings for benchmarks, the timer, machine info, the dense ceiling;
- `dispatch`: the experts given a routing (reference, bare grouped GEMM, grouped, triton);
- `layer`: the whole `MoE` layer with its router;
- `expert_parallel`: `ExpertParallelMoE` on N ranks;
- `report`: the plain-text tables.

Examples
--------
>>> from gatedmoe.bench import SHAPES, bench_dispatch, format_rows
>>> print(format_rows(bench_dispatch(SHAPES["cpu"], backends=["grouped"])))  # doctest: +SKIP
"""

from __future__ import annotations

from gatedmoe.bench.dispatch import bench_dispatch
from gatedmoe.bench.expert_parallel import run_ep_bench, run_ep_bench_torchrun, under_torchrun
from gatedmoe.bench.harness import (
    GPU_SHAPES,
    SHAPES,
    BenchShape,
    available_memory_bytes,
    balanced_routing,
    dense_ceiling,
    dense_gemm_tflops,
    estimate_memory_bytes,
    machine_info,
    random_routing,
    result_row,
    time_ms,
    time_samples,
)
from gatedmoe.bench.layer import bench_layer
from gatedmoe.bench.report import format_ep_report, format_rows

__all__ = [
    "BenchShape",
    "GPU_SHAPES",
    "SHAPES",
    "balanced_routing",
    "bench_dispatch",
    "bench_layer",
    "dense_ceiling",
    "dense_gemm_tflops",
    "estimate_memory_bytes",
    "available_memory_bytes",
    "format_ep_report",
    "format_rows",
    "machine_info",
    "random_routing",
    "result_row",
    "run_ep_bench",
    "run_ep_bench_torchrun",
    "time_ms",
    "time_samples",
    "under_torchrun",
]
