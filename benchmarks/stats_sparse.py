"""Sparse gates (top-K softmax, top-K sigmoid): do default fits reach the truth-start fit?

    python benchmarks/stats_sparse.py [--n 1000 10000] [--seeds 3] [--first-seed 0] [--jobs 2] [--json out.json]

For each gate, k, number of experts K, dimension d, n and seed: draw from
``MoETruth.well_separated(K, d, gate=..., k=...)``, fit ``MoERegressor`` with defaults, and
fit again started at the truth (``truth.as_estimator()`` refitted with ``warm_start``). A
default fit *reaches* the truth start when its log-likelihood is at least the truth
start's minus ``--slack`` per sample. Prints the success rate, the worst gaps (in
log-likelihood units), how many fits report ``converged_`` while missing, the largest
gate coefficient and the fit times (wall and process CPU seconds: the machine is shared).
Imports public names only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
from cpu_machine import machine  # benchmarks/, beside this script


def one(job):
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    from gatedmoe.stats import MoERegressor, MoETruth

    gate, k, K, d, n, seed = job
    truth = MoETruth.well_separated(K, d, random_state=seed, gate=gate, k=k)
    X, y, _ = truth.sample(n, random_state=1000 + seed)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0, c0 = time.perf_counter(), time.process_time()
        model = MoERegressor(n_experts=K, gate=gate, k=k, random_state=seed).fit(X, y)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        start = truth.as_estimator().set_params(warm_start=True, max_iter=500).fit(X, y)
        start_seconds = time.perf_counter() - t0
    ll, ll_start, ll_truth = model.loglik(X, y), start.loglik(X, y), truth.loglik(X, y)
    return {
        "gate": gate, "k": k, "K": K, "d": d, "n": n, "seed": seed, "seconds": seconds,
        "cpu_seconds": cpu_seconds, "start_seconds": start_seconds,
        "gap": ll - max(ll_start, ll_truth), "converged": bool(model.converged_), "n_iter": int(model.n_iter_),
        "max_gate_coef": float(np.max(np.abs(model.gate_coef_))),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--dims", type=int, nargs="+", default=[1, 10])
    p.add_argument("--experts", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--gates", nargs="+", default=["topk_softmax", "sigmoid"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds run from here (default 0)")
    p.add_argument("--slack", type=float, default=1e-5, help="allowed shortfall per sample (default 1e-5)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    # Smallest n first; the JSON is rewritten as each fit ends, so a long run that is
    # stopped keeps what it measured.
    jobs = sorted(((g, k, K, d, n, s) for g, k, K, d, n, s in itertools.product(
        args.gates, args.ks, args.experts, args.dims, args.n,
        range(args.first_seed, args.first_seed + args.seeds)) if k < K), key=lambda j: j[4])
    print(f"machine: {machine()}; {len(jobs)} fits, {args.jobs} processes", flush=True)
    rows = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for fut in as_completed([pool.submit(one, j) for j in jobs]):
            rows.append(fut.result())
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump({"machine": machine(), "args": vars(args), "complete": len(rows) == len(jobs),
                               "rows": rows}, fh, indent=1)
    print(f"{'gate':<13} {'k':>2} {'n':>7} {'reached':>8} {'worst gap':>10} {'conv&miss':>9} "
          f"{'max|coef|':>10} {'median s':>8} {'max s':>7} {'median CPU s':>12}")
    for (gate, k, n), grp in itertools.groupby(sorted(rows, key=lambda r: (r["gate"], r["k"], r["n"])),
                                               key=lambda r: (r["gate"], r["k"], r["n"])):
        grp = list(grp)
        ok = [r["gap"] >= -args.slack * r["n"] for r in grp]
        bad_conv = sum(r["converged"] and not o for r, o in zip(grp, ok, strict=True))
        print(f"{gate:<13} {k:>2} {n:>7} {sum(ok):>4}/{len(ok):<3} {min(r['gap'] for r in grp):>10.2f} "
              f"{bad_conv:>9} {max(r['max_gate_coef'] for r in grp):>10.3g} "
              f"{statistics.median(r['seconds'] for r in grp):>8.2f} {max(r['seconds'] for r in grp):>7.2f} "
              f"{statistics.median(r['cpu_seconds'] for r in grp):>12.2f}")
    ok_all = sum(r["gap"] >= -args.slack * r["n"] for r in rows)
    print(f"total reached {ok_all}/{len(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
