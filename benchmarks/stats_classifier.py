"""MoEClassifier with defaults against LogisticRegression: cross-validated log-loss and fit time.

    python benchmarks/stats_classifier.py [--folds 5]

Data bundled with scikit-learn (no download): breast cancer, wine, digits reduced to 16
principal components (the PCA is fitted inside each fold). Both models get the same
folds; LogisticRegression is shown plain and after a StandardScaler. Gated on
correctness: every predicted probability must lie in [0, 1] with rows summing to 1.
Imports public names only.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
from cpu_machine import machine  # benchmarks/, beside this script


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
    args = p.parse_args(argv)
    print(f"machine: {machine()}")
    data = {"breast_cancer": load_breast_cancer(return_X_y=True), "wine": load_wine(return_X_y=True),
            "digits_pca16": load_digits(return_X_y=True)}
    models = {
        "MoEClassifier()": lambda: MoEClassifier(random_state=0),
        "LogisticRegression()": lambda: LogisticRegression(max_iter=1000),
        "Scaler+LogisticRegression()": lambda: make_pipeline(StandardScaler(), LogisticRegression()),
    }
    print(f"{'data':<14} {'model':<28} {'log-loss':>9} {'accuracy':>9} {'fit s':>7} {'converged':>9}")
    for name, (X, y) in data.items():
        folds = list(StratifiedKFold(args.folds, shuffle=True, random_state=0).split(X, y))
        for label, make in models.items():
            losses, accs, secs, conv = [], [], [], 0
            for train, test in folds:
                Xtr, Xte = X[train], X[test]
                if name == "digits_pca16":
                    pca = PCA(16, random_state=0).fit(Xtr)
                    Xtr, Xte = pca.transform(Xtr), pca.transform(Xte)
                model = make()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ConvergenceWarning)
                    t0 = time.perf_counter()
                    model.fit(Xtr, y[train])
                    secs.append(time.perf_counter() - t0)
                conv += not any(issubclass(w.category, ConvergenceWarning) for w in caught)
                proba = model.predict_proba(Xte)
                if proba.min() < 0 or proba.max() > 1 or not np.allclose(proba.sum(1), 1, rtol=0, atol=1e-12):
                    print(f"FAILED correctness gate: {name} {label} probabilities outside [0, 1] or not summing to 1")
                    return 1
                losses.append(log_loss(y[test], proba, labels=np.unique(y)))
                accs.append(np.mean(model.predict(Xte) == y[test]))
            print(f"{name:<14} {label:<28} {np.mean(losses):>9.4f} {np.mean(accs):>9.4f} {np.sum(secs):>7.2f} "
                  f"{conv:>5}/{len(folds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
