"""``gatedmoe fit data.csv --target COL --experts 3``: fit a classical MoE, print it and its BIC."""

from __future__ import annotations

import argparse
import csv

import numpy as np


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fit",
        help="fit MoERegressor / MoEClassifier to a CSV file; print the model and BIC",
        description="Fit a gated mixture of linear experts by EM to the numeric columns of a CSV "
        "file with a header row; every column but --target is a feature.",
    )
    p.add_argument("data", help="CSV file with a header row")
    p.add_argument("--target", required=True, help="name of the response column")
    p.add_argument("--experts", type=int, default=3, help="number of experts (default 3)")
    p.add_argument("--gate", default="softmax", help="gate (softmax, topk_softmax, temperature_softmax, sigmoid, modified_softmax)")
    p.add_argument("--classify", action="store_true", help="categorical target: MoEClassifier")
    p.add_argument("--n-init", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def read_csv(path: str, target: str):
    """Features ``[N, P]`` float, target column (strings), feature names."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if len(rows) < 2:
        raise SystemExit(f"{path}: needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if target not in header:
        raise SystemExit(f"--target {target!r} is not a column of {path}; columns: {', '.join(header)}")
    t = header.index(target)
    names = [h for i, h in enumerate(header) if i != t]
    try:
        X = np.array([[float(v) for i, v in enumerate(r) if i != t] for r in rows[1:]], dtype=float)
    except ValueError as err:
        raise SystemExit(f"{path}: feature columns must be numeric ({err})") from None
    return X, np.array([r[t] for r in rows[1:]]), names


def run(args: argparse.Namespace) -> int:
    from gatedmoe.stats import MoEClassifier, MoERegressor

    X, y_raw, names = read_csv(args.data, args.target)
    if args.classify:
        model, y = MoEClassifier(n_experts=args.experts, gate=args.gate, n_init=args.n_init, random_state=args.seed), y_raw
    else:
        try:
            y = y_raw.astype(float)
        except ValueError:
            raise SystemExit(f"--target {args.target!r} is not numeric; use --classify for class labels") from None
        model = MoERegressor(n_experts=args.experts, gate=args.gate, n_init=args.n_init, random_state=args.seed)
    model.fit(X, y)
    n = X.shape[0]
    print(f"{type(model).__name__}: {args.experts} experts, gate={args.gate}, n={n}, features={', '.join(names)}")
    print(f"converged={model.converged_} after {model.n_iter_} EM iterations")
    for e in range(args.experts):
        gate = ", ".join(f"{c:+.4g}" for c in model.gate_coef_[e])
        print(f"expert {e}: gate coef [{gate}] intercept {model.gate_intercept_[e]:+.4g}")
        if args.classify:
            for c, label in enumerate(model.classes_):
                coef = ", ".join(f"{v:+.4g}" for v in model.expert_coef_[e, c])
                print(f"    class {label}: coef [{coef}] intercept {model.expert_intercept_[e, c]:+.4g}")
        else:
            coef = ", ".join(f"{v:+.4g}" for v in model.expert_coef_[e])
            print(f"    coef [{coef}] intercept {model.expert_intercept_[e]:+.4g} "
                  f"noise variance {model.noise_variance_[e]:.4g}")
    ll = model.loglik(X, y)
    print(f"log-likelihood {ll:.4f}  parameters {model.n_parameters()}")
    print(f"BIC {model.bic(X, y):.4f}  AIC {model.aic(X, y):.4f}")
    return 0
