"""``gatedmoe fit data.csv --target COL --experts 3``: fit a classical MoE, print it and its BIC."""

from __future__ import annotations

import argparse
import csv
import re
import textwrap

import numpy as np

from gatedmoe.cli._common import (
    HELP_FORMAT,
    UsageError,
    check_file,
    examples,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fit",
        help="fit MoERegressor / MoEClassifier to a CSV file; print the model and BIC",
        formatter_class=HELP_FORMAT,
        epilog=examples(
            "gatedmoe fit data.csv --target y --experts 3",
            "gatedmoe fit data.csv --target label --classify --experts 2",
        ),
        description=textwrap.fill("Fit a gated mixture of linear experts by EM to the numeric columns of a CSV "
        "file with a header row; every column but --target is a feature. Prints the fitted gate and experts, "
        "the log-likelihood, BIC and AIC."),
    )
    p.add_argument("data", help="CSV file with a header row")
    p.add_argument("--target", required=True, help="name of the response column")
    p.add_argument("--experts", type=positive_int, default=3, help="number of experts (default 3)")
    add_estimator_options(p, classify=True)
    p.add_argument("--classify", action="store_true", help="categorical target: MoEClassifier")
    p.add_argument("--l2", type=nonneg_float, default=None,
                   help="with --classify: ridge on the coefficients (default 1, as LogisticRegression's C=1; 0: plain MLE)")
    p.set_defaults(func=run)


def add_estimator_options(p, classify: bool = False) -> None:
    """The estimator options shared by `gatedmoe fit` and `gatedmoe simulate`; ``classify``:
    the command has ``--classify`` (the help then gives the classifier's defaults too)."""
    cls_init, cls_iter = (", 1 for --classify", ", 300 for --classify") if classify else ("", "")
    p.add_argument("--gate", default="softmax",
                   help="gate (default softmax): softmax, topk_softmax (needs --k), temperature_softmax, sigmoid, "
                        "modified_softmax")
    p.add_argument("--k", type=positive_int, default=None,
                   help="experts kept per input by topk_softmax (required) or sigmoid (default: all)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="fixed temperature of temperature_softmax (default 1)")
    p.add_argument("--penalty", choices=["none", "l1"], default="none", help="l1: Lasso MoE (with --alpha; default none)")
    p.add_argument("--alpha", type=nonneg_float, default=0.0, help="L1 strength, per-sample scale (default 0)")
    p.add_argument("--n-init", type=positive_int, default=None,
                   help=f"starts (default: the estimator's, 3 for regression{cls_init})")
    p.add_argument("--max-iter", type=positive_int, default=None,
                   help=f"iterations per start (default: the estimator's, 100 for regression{cls_iter})")
    p.add_argument("--tol", type=nonneg_float, default=1e-6, help="convergence tolerance on the mean log-likelihood (default 1e-6)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default 0)")


def estimator_params(args: argparse.Namespace, n_experts: int) -> dict:
    """Keyword arguments of MoERegressor / MoEClassifier from the options; a bad combination
    exits naming the option (never a silently different model)."""
    from gatedmoe.stats.gating import make_gate

    try:
        make_gate(args.gate, n_experts, args.k, args.temperature)
    except ValueError as err:
        # Name the command-line options, not the estimator's arguments.
        msg = re.sub(r"(?<![-\w'])n_experts=(\d+)", r"--experts \1", str(err))
        msg = re.sub(r"(?<![-\w'])(k|temperature)(?=[ =])", r"--\1", msg)
        raise UsageError(f"--gate {args.gate}: {msg}") from None
    penalty = None if args.penalty == "none" else args.penalty
    if penalty is None and args.alpha:
        raise UsageError(f"--alpha {args.alpha} needs --penalty l1")
    params = dict(n_experts=n_experts, gate=args.gate, k=args.k, temperature=args.temperature, penalty=penalty,
                  alpha=args.alpha, tol=args.tol, random_state=args.seed)
    # Unset: the estimator's own default (they differ between the two estimators).
    params.update({name: getattr(args, name) for name in ("n_init", "max_iter") if getattr(args, name) is not None})
    return params


def read_csv(path: str, target: str):
    """Features ``[N, P]`` float, target column (strings), feature names. A malformed file
    raises `UsageError` naming the file and the line (the header is line 1)."""
    check_file(path, "data file")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise UsageError(f"{path} is not a readable CSV file: {e}") from None
    numbered = [(i + 1, r) for i, r in enumerate(rows) if any(c.strip() for c in r)]
    if len(numbered) < 2:
        raise UsageError(f"{path}: needs a header row and at least one data row")
    header = [h.strip() for h in numbered[0][1]]
    if target not in header:
        raise UsageError(f"--target {target!r} is not a column of {path}; columns: {', '.join(header)}")
    t = header.index(target)
    names = [h for i, h in enumerate(header) if i != t]
    X, y = [], []
    for line, r in numbered[1:]:
        if len(r) != len(header):
            raise UsageError(f"{path}, line {line}: {len(r)} cells, but the header has {len(header)}")
        try:
            X.append([float(v) for i, v in enumerate(r) if i != t])
        except ValueError as err:
            raise UsageError(f"{path}, line {line}: feature columns must be numeric ({err})") from None
        y.append(r[t])
    X = np.array(X, dtype=float).reshape(len(y), len(names))
    if not np.isfinite(X).all():
        line = numbered[1 + int(np.argwhere(~np.isfinite(X))[0, 0])][0]
        raise UsageError(f"{path}, line {line}: features must be finite (nan or inf found)")
    return X, np.array(y), names


def run(args: argparse.Namespace) -> int:
    from gatedmoe.stats import MoEClassifier, MoERegressor

    params = estimator_params(args, args.experts)
    X, y_raw, names = read_csv(args.data, args.target)
    if args.classify:
        l2 = {} if args.l2 is None else {"l2": args.l2}
        model, y = MoEClassifier(**params, **l2), y_raw
    else:
        try:
            y = y_raw.astype(float)
        except ValueError:
            raise UsageError(f"--target {args.target!r} is not numeric; use --classify for class labels") from None
        if args.l2 is not None:
            raise UsageError("--l2 applies to --classify only")
        model = MoERegressor(**params)
    model.fit(X, y)
    n = X.shape[0]
    k = "" if args.k is None else f", k={args.k}"
    print(f"{type(model).__name__}: {args.experts} experts, gate={args.gate}{k}, n={n}, features={', '.join(names)}")
    # n_iter_ counts EM iterations and the L-BFGS ones that finish a crawling fit (all of a
    # default MoEClassifier fit): "EM iterations" would misreport those.
    print(f"converged={model.converged_} after {model.n_iter_} iterations")
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
