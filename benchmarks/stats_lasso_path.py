"""The Lasso MoE along a path of alphas (n=200, p=500): independent fits against `l1_path`.

    python benchmarks/stats_lasso_path.py [--n 200] [--p 500] [--alphas 11] [--independent]

Data as in tests/stats/test_lasso.py: the gate on x0, expert 0 uses x1, expert 1 uses x2,
everything else noise. Alphas: 11 values from 0.5 down to 0.005 (geometric). `l1_path`
warm-starts each alpha from the previous fit; ``--independent`` also times one default
fit per alpha (what a user looping over alphas did before). Gated on correctness: at the
smallest alpha with a support of at most 10 coefficients, the large expert coefficients
must be exactly x1 and x2 (one per expert) and the gate's largest coefficient x0.
Imports public names only.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
from cpu_machine import machine  # benchmarks/, beside this script


def draw(n, p, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    g = 1 / (1 + np.exp(-4 * X[:, 0]))
    e = (rng.random(n) < g).astype(int)
    y = np.where(e == 1, 3 * X[:, 1] + 2, -3 * X[:, 2] - 2) + 0.3 * rng.normal(size=n)
    return X, y


def main(argv=None) -> int:
    from sklearn.exceptions import ConvergenceWarning

    from gatedmoe.stats import MoERegressor, l1_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--p", type=int, default=500)
    ap.add_argument("--alphas", type=int, default=11)
    ap.add_argument("--independent", action="store_true")
    args = ap.parse_args(argv)
    print(f"machine: {machine()}")
    X, y = draw(args.n, args.p, 0)
    alphas = np.geomspace(0.5, 0.005, args.alphas)
    t0 = time.perf_counter()
    path = l1_path(X, y, alphas, MoERegressor(n_experts=2, random_state=0))
    t_path = time.perf_counter() - t0
    ok = False
    for model, k in zip(path.models, path.n_nonzero, strict=True):
        coef = model.expert_coef_
        big = {tuple(ix) for ix in np.argwhere(np.abs(coef) > 1.0)}
        if k <= 10 and big in ({(0, 1), (1, 2)}, {(1, 1), (0, 2)}):
            ok = np.argmax(np.abs(model.gate_coef_[0] - model.gate_coef_[1])) == 0
    if not ok:
        print("FAILED correctness gate: no sparse fit on the path finds the true support")
        return 1
    rows = []
    for i, alpha in enumerate(path.alphas):
        row = [alpha, path.n_nonzero[i], path.models[i].lower_bound_, path.converged[i]]
        if args.independent:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                t0 = time.perf_counter()
                m = MoERegressor(n_experts=2, penalty="l1", alpha=float(alpha), random_state=0).fit(X, y)
                row += [time.perf_counter() - t0, m.lower_bound_, np.count_nonzero(m.expert_coef_)
                        + np.count_nonzero(m.gate_coef_)]
        rows.append(row)
    print(f"n={args.n}, p={args.p}; l1_path over {len(alphas)} alphas: {t_path:.2f} s")
    head = f"{'alpha':>8} {'path nnz':>8} {'path objective':>15} {'conv':>5}"
    if args.independent:
        head += f" {'indep s':>8} {'indep objective':>16} {'indep nnz':>9}"
    print(head)
    for r in rows:
        line = f"{r[0]:>8.4f} {r[1]:>8d} {r[2]:>15.4f} {str(r[3]):>5}"
        if args.independent:
            line += f" {r[4]:>8.2f} {r[5]:>16.4f} {r[6]:>9d}"
        print(line)
    if args.independent:
        print(f"independent fits total: {sum(r[4] for r in rows):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
