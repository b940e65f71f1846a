"""Timing of EM for the classical Gaussian MoE (gatedmoe.stats.MoERegressor).

    python benchmarks/stats_em.py [--n 100000] [--repeats 3]

Gated on correctness: each fit must reach at least the true parameters' likelihood and
recover them (permutation-matched error below 0.5, a norm over all parameters) before its
time is reported. Reports the default
fit (n_init starts on a subsample, best refined on all data) and one start on all data
(what flexmix times per start).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from cpu_machine import machine  # benchmarks/, beside this script


def main(argv=None) -> int:
    from gatedmoe.stats import MoERegressor, MoETruth, voronoi_loss

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--dims", type=int, nargs="+", default=[1, 10])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print(f"machine: {machine()}")
    print(f"n={args.n}, K={args.experts}, median of {args.repeats} runs")
    print(f"{'d':>3} {'setting':<28} {'seconds':>8} {'EM iters':>8} {'loglik - truth':>15} {'param error':>12}")
    for d in args.dims:
        truth = MoETruth.well_separated(args.experts, d, random_state=0)
        X, y, _ = truth.sample(args.n, random_state=1)
        ll_truth = truth.loglik(X, y)
        for label, params in [("default (n_init=3)", {}), ("one start, all data", {"n_init": 1, "init_subsample": None})]:
            times = []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                model = MoERegressor(n_experts=args.experts, random_state=r, **params).fit(X, y)
                times.append(time.perf_counter() - t0)
                gap = model.loglik(X, y) - ll_truth
                err = voronoi_loss(model, truth).matched
                if gap < -1e-6 * args.n or err > 0.5:
                    print(f"FAILED correctness gate: d={d} {label} loglik gap {gap:.3g}, error {err:.3g}")
                    return 1
            print(f"{d:>3} {label:<28} {statistics.median(times):>8.2f} {model.n_iter_:>8} {gap:>15.2f} {err:>12.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
