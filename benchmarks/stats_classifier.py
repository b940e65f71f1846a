"""MoEClassifier with defaults against LogisticRegression: cross-validated log-loss and fit time.

    python benchmarks/stats_classifier.py [--folds 5] [--data wine digits_pca16]

Data bundled with scikit-learn (no download): breast cancer, wine, digits reduced to 16
principal components (the PCA is fitted inside each fold). Both models get the same
folds; LogisticRegression is shown plain and after a StandardScaler. Gated on
correctness: every predicted probability must lie in [0, 1] with rows summing to 1.
Imports public names only.

Timing: every model is fitted once on the first fold before the timed fits (imports and
caches out of the clock), and all fits run with one BLAS thread (`threadpoolctl`), as
MoEClassifier's EM does internally: on the shared 2-core machine multi-threaded BLAS made
LogisticRegression up to 30x slower, which would flatter the ratio. Reported: process CPU
seconds summed over the folds (steadier than wall time on a busy machine) and the ratio to
StandardScaler + LogisticRegression in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
from cpu_machine import machine  # benchmarks/, beside this script
from threadpoolctl import threadpool_limits


def main(argv=None) -> int:
    from sklearn.datasets import load_breast_cancer, load_digits, load_wine
    from sklearn.decomposition import PCA
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from gatedmoe.stats import MoEClassifier

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--data", nargs="+", default=["breast_cancer", "wine", "digits_pca16"])
    args = p.parse_args(argv)
    print(f"machine: {machine()}")
    loaders = {"breast_cancer": load_breast_cancer, "wine": load_wine, "digits_pca16": load_digits}
    data = {name: loaders[name](return_X_y=True) for name in args.data}
    models = {
        "MoEClassifier()": lambda: MoEClassifier(random_state=0),
        "LogisticRegression()": lambda: LogisticRegression(max_iter=1000),
        "Scaler+LogisticRegression()": lambda: make_pipeline(StandardScaler(), LogisticRegression()),
    }
    print(f"{'data':<14} {'model':<28} {'log-loss':>9} {'vs LR':>6} {'accuracy':>9} {'fit cpu s':>9} {'vs LR':>6} "
          f"{'wall s':>7} {'converged':>9}")
    for name, (X, y) in data.items():
        folds = []
        for train, test in StratifiedKFold(args.folds, shuffle=True, random_state=0).split(X, y):
            Xtr, Xte = X[train], X[test]
            if name == "digits_pca16":
                pca = PCA(16, random_state=0).fit(Xtr)
                Xtr, Xte = pca.transform(Xtr), pca.transform(Xte)
            folds.append((Xtr, y[train], Xte, y[test]))
        ref = None
        for label, make in reversed(models.items()):
            losses, accs, secs, walls, conv = [], [], [], [], 0
            with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
                warnings.simplefilter("ignore")
                make().fit(folds[0][0], folds[0][1])
            for Xtr, ytr, Xte, yte in folds:
                model = make()
                with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1, user_api="blas"):
                    warnings.simplefilter("always", ConvergenceWarning)
                    t0, c0 = time.perf_counter(), time.process_time()
                    model.fit(Xtr, ytr)
                    secs.append(time.process_time() - c0)
                    walls.append(time.perf_counter() - t0)
                conv += not any(issubclass(w.category, ConvergenceWarning) for w in caught)
                proba = model.predict_proba(Xte)
                if proba.min() < 0 or proba.max() > 1 or not np.allclose(proba.sum(1), 1, rtol=0, atol=1e-12):
                    print(f"FAILED correctness gate: {name} {label} probabilities outside [0, 1] or not summing to 1")
                    return 1
                losses.append(log_loss(yte, proba, labels=np.unique(y)))
                accs.append(np.mean(model.predict(Xte) == yte))
            if ref is None:
                ref = (np.mean(losses), np.sum(secs))
            print(f"{name:<14} {label:<28} {np.mean(losses):>9.4f} {np.mean(losses) / ref[0]:>6.3f} "
                  f"{np.mean(accs):>9.4f} {np.sum(secs):>9.3f} {np.sum(secs) / ref[1]:>6.1f} {np.sum(walls):>7.3f} "
                  f"{conv:>5}/{len(folds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
