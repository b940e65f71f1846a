"""Plain-text reports of the benchmark results (what `gatedmoe bench` prints)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["format_rows", "format_ep_report"]


def format_rows(rows: list[dict]) -> str:
    """Plain-text table of `bench_dispatch` / `bench_layer` rows, one line per row."""
    head = f"{'shape':<40} {'backend':<16} {'pass':<8} {'ms':>9} {'tokens/s':>11} {'TFLOP/s':>8} {'of ceil':>8} {'+mem GB':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mem = r["extra_mem_gb"]  # measured on CUDA only (NaN elsewhere)
        lines.append(
            f"{r['shape']:<40} {r['backend']:<16} {r['pass']:<8} {r['ms']:9.3f} {r['tokens_per_s']:11.0f} "
            f"{r['tflops']:8.2f} {100 * r['fraction_of_ceiling']:7.1f}% {'-' if math.isnan(mem) else f'{mem:.2f}':>8}"
        )
    if any(math.isnan(r["extra_mem_gb"]) for r in rows):
        lines.append("+mem GB: peak memory above the inputs, measured on CUDA only ('-')")
    return "\n".join(lines)


def format_ep_report(r: dict[str, Any]) -> str:
    """A few human-readable lines from a `run_ep_bench` summary."""
    check = "ok" if r["check_passed"] else "FAILED"
    return "\n".join([
        f"machine: {r['machine']}",
        f"expert parallel: {r['n_ranks']} ranks ({r['backend']}, {r['device']}, {r['dtype']}), "
        f"T={r['tokens_per_rank']}/rank D={r['d_model']} H={r['d_hidden']} E={r['n_experts']} k={r['k']}",
        f"check vs one process: {check} (max abs err {r['max_abs_err']:.2e})",
        f"step (fwd+bwd): {r['step_ms']:.2f} ms  -> {r['tokens_per_s_per_rank']:.0f} tokens/s per rank",
        f"all-to-all share of step: {100 * r['all_to_all_share']:.1f}% (max over ranks {100 * r['all_to_all_share_max']:.1f}%)",
        f"load imbalance across ranks (max/mean - 1): {r['load_imbalance']:.3f}; last step per rank {r['rank_load_last']}",
        f"experts: {r['expert_tflops_per_rank']:.3f} TFLOP/s per rank = "
        f"{100 * r['fraction_of_ceiling']:.1f}% of dense GEMM ({r['gemm_tflops_ceiling']:.3f} TFLOP/s)",
    ])
