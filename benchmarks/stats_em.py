"""Timing of EM for the classical Gaussian MoE (gatedmoe.stats.MoERegressor), and its robustness.

    python benchmarks/stats_em.py [--n 100000] [--repeats 3]
    python benchmarks/stats_em.py --robustness [--n 10000] [--truths 20] [--restarts 20] [--jobs 2]

Timing: gated on correctness: each fit must reach at least the true parameters' likelihood
and recover them (permutation-matched error below 0.5, a norm over all parameters) before
its time is reported. Reports the default fit (n_init starts on a subsample, best refined
on all data) and one start on all data (what flexmix times per start).

Robustness (issue 19, deliverable 2): for each shape (d, K) in d1k3, d10k3, d1k2 and each
random truth ``MoETruth.well_separated(K, d, random_state=t)``, the default fit
(``random_state=t``) against the best of ``--restarts`` single starts
(``n_init=1, random_state=r``) and a fit started at the truth: the default fit *reaches*
the best when its penalised log-likelihood (``lower_bound_ * n``, what the fit maximises)
is at least the best's minus ``--slack`` per sample. Prints reached / truths per shape, the
misses (gap, ``converged_``, iterations) and the default fits' median and total time.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

from cpu_machine import machine  # benchmarks/, beside this script

SHAPES = {"d1k3": (1, 3), "d10k3": (10, 3), "d1k2": (1, 2)}


def robustness_one(job):
    """One truth: the default fit and the best of the restarts (see the module docstring)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    from gatedmoe.stats import MoERegressor, MoETruth

    shape, t, n, restarts = job
    d, K = SHAPES[shape]
    truth = MoETruth.well_separated(K, d, random_state=t)
    X, y, _ = truth.sample(n, random_state=10_000 + t)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0 = time.perf_counter()
        model = MoERegressor(n_experts=K, random_state=t).fit(X, y)
        seconds = time.perf_counter() - t0
        best = truth.as_estimator().set_params(warm_start=True, max_iter=1000).fit(X, y).lower_bound_
        for r in range(restarts):
            best = max(best, MoERegressor(n_experts=K, n_init=1, random_state=r, max_iter=1000).fit(X, y).lower_bound_)
    return {"shape": shape, "truth": t, "seconds": seconds, "gap": n * (model.lower_bound_ - best),
            "converged": bool(model.converged_), "n_iter": int(model.n_iter_)}


def robustness(args) -> int:
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(shape, t, args.n, args.restarts) for shape in args.shapes for t in range(args.truths)]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(robustness_one, jobs))
    print(f"n={args.n}, {args.truths} truths per shape, best of {args.restarts} restarts and the truth start, "
          f"slack {args.slack} per sample")
    print(f"{'shape':<6} {'reached':>8} {'median s':>9} {'total s':>8} {'max iters':>9}  "
          "misses (truth: gap, converged_, n_iter)")
    for shape in args.shapes:
        mine = [r for r in rows if r["shape"] == shape]
        reached = [r["gap"] >= -args.slack * args.n for r in mine]
        misses = ", ".join(f"{r['truth']}: {r['gap']:.2f}, {r['converged']}, {r['n_iter']}"
                           for r, ok in zip(mine, reached, strict=True) if not ok)
        secs = [r["seconds"] for r in mine]
        print(f"{shape:<6} {sum(reached):>4}/{len(mine):<3} {statistics.median(secs):>9.3f} {sum(secs):>8.2f} "
              f"{max(r['n_iter'] for r in mine):>9}  {misses or '-'}")
    return 0


def main(argv=None) -> int:
    from gatedmoe.stats import MoERegressor, MoETruth, voronoi_loss

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="samples (default 100000; 10000 with --robustness)")
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--dims", type=int, nargs="+", default=[1, 10])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--robustness", action="store_true", help="default fit against the best of many restarts")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--truths", type=int, default=20)
    p.add_argument("--restarts", type=int, default=20)
    p.add_argument("--slack", type=float, default=1e-5, help="allowed shortfall per sample")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--default-only", action="store_true", help="time only the default fit (large n)")
    args = p.parse_args(argv)
    print(f"machine: {machine()}")
    if args.robustness:
        args.n = args.n or 10_000
        return robustness(args)
    args.n = args.n or 100_000
    print(f"n={args.n}, K={args.experts}, median of {args.repeats} runs")
    print(f"{'d':>3} {'setting':<28} {'seconds':>8} {'cpu s':>7} {'EM iters':>8} {'loglik - truth':>15} "
          f"{'param error':>12}")
    for d in args.dims:
        truth = MoETruth.well_separated(args.experts, d, random_state=0)
        X, y, _ = truth.sample(args.n, random_state=1)
        ll_truth = truth.loglik(X, y)
        settings = [("default (n_init=3)", {}), ("one start, all data", {"n_init": 1, "init_subsample": None})]
        for label, params in settings[: 1 if args.default_only else None]:
            times, cpus = [], []
            for r in range(args.repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                model = MoERegressor(n_experts=args.experts, random_state=r, **params).fit(X, y)
                times.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
                gap = model.loglik(X, y) - ll_truth
                err = voronoi_loss(model, truth).matched
                if gap < -1e-6 * args.n or err > 0.5:
                    print(f"FAILED correctness gate: d={d} {label} loglik gap {gap:.3g}, error {err:.3g}")
                    return 1
            print(f"{d:>3} {label:<28} {statistics.median(times):>8.2f} {statistics.median(cpus):>7.2f} "
                  f"{model.n_iter_:>8} {gap:>15.2f} {err:>12.4f}")
        del X, y
    # Peak resident memory of this process, data and the sampling included (Linux: KiB).
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
