"""``gatedmoe simulate``: estimation rate of the MLE of a Gaussian MoE, loss vs n."""

from __future__ import annotations

import argparse
import os
import textwrap

import numpy as np

from gatedmoe.cli._common import HELP_FORMAT, UsageError, examples, positive_int, prepare_out
from gatedmoe.cli.fit import add_estimator_options, estimator_params


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="fit MoERegressor to samples of a known MoE over a grid of n; loss vs n, slope",
        formatter_class=HELP_FORMAT,
        epilog=examples(
            "gatedmoe simulate --experts 3 --reps 10 --out runs/sim",
            "gatedmoe simulate --n-min 100 --n-max 1000 --n-points 3 --reps 2   # a quick look",
        ),
        description=textwrap.fill("Draw from a well-separated true Gaussian MoE, fit by EM over a log grid of n "
        "with replications, and report the Voronoi loss vs n, its log-log slope (theory: -1/2) "
        "and the fraction of failed fits. Writes simulate.csv and simulate.png."),
    )
    p.add_argument("--experts", type=positive_int, default=3, help="experts of the true model (default 3)")
    p.add_argument("--fit-experts", type=positive_int, default=None, help="experts to fit, from --experts to --experts + 2 (default: as many as the truth)")
    p.add_argument("--features", type=positive_int, default=1, help="covariate dimension (default 1)")
    p.add_argument("--n-min", type=int, default=100, help="smallest sample size of the grid (default 100)")
    p.add_argument("--n-max", type=int, default=100000, help="largest sample size of the grid (default 100000)")
    p.add_argument("--n-points", type=positive_int, default=7, help="sizes on a log grid (default 7)")
    p.add_argument("--reps", type=positive_int, default=10, help="replications per n (default 10)")
    # Gate options apply to the truth and the fit alike; the rest to the fit.
    add_estimator_options(p)
    p.add_argument("--out", default="simulate_out", help="output folder (default ./simulate_out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gatedmoe.stats import MoETruth, simulate
    from gatedmoe.stats.voronoi import RBAR

    if args.n_min < 2 or args.n_max < args.n_min or args.n_points < 1:
        raise UsageError(f"need 2 <= --n-min <= --n-max and --n-points >= 1, got {args.n_min}, {args.n_max}, {args.n_points}")
    fit_experts = args.fit_experts or args.experts
    # What `simulate` refuses, refused naming the flags (its messages name n_experts and rbar=).
    if fit_experts < args.experts:
        raise UsageError(f"--fit-experts {fit_experts} is fewer than --experts {args.experts}: the losses compare "
                         "every true expert with fitted ones")
    if fit_experts - args.experts + 1 not in RBAR:
        raise UsageError(f"--fit-experts {fit_experts} is more than --experts {args.experts} + {max(RBAR) - 1}: the "
                         f"loss of a true expert fitted by more than {max(RBAR)} experts is not known in closed form")
    if args.n_min < fit_experts:
        raise UsageError(f"--n-min {args.n_min} is fewer than the {fit_experts} experts to fit")
    prepare_out(args.out)
    params = estimator_params(args, min(fit_experts, args.experts))
    truth = MoETruth.well_separated(args.experts, args.features, random_state=args.seed, gate=args.gate, k=args.k,
                                    temperature=args.temperature)
    grid = np.unique(np.round(np.geomspace(args.n_min, args.n_max, args.n_points)).astype(int))
    fit_params = {key: params[key] for key in ("penalty", "alpha", "n_init", "max_iter", "tol") if key in params}
    res = simulate(truth, grid, n_reps=args.reps, n_experts=args.fit_experts, random_state=args.seed,
                   progress=not args.no_progress, **fit_params)
    os.makedirs(args.out, exist_ok=True)
    csv_path, png_path = os.path.join(args.out, "simulate.csv"), os.path.join(args.out, "simulate.png")
    res.to_csv(csv_path)
    res.plot(png_path)
    print(f"{'n':>8} {'mean ' + res.loss_name:>12} {'median':>12} {'failed':>7}")
    for s in res.summary:
        print(f"{s['n']:>8} {s['mean_loss']:>12.4g} {s['median_loss']:>12.4g} {s['failed_fraction']:>7.0%}")
    print(f"log-log slope {res.slope:.3f} (reference {res.reference_slope})")
    print(f"wrote {csv_path} and {png_path}")
    return 0
