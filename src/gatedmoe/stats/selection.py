"""Choosing the number of experts by an information criterion."""

from __future__ import annotations

import copy
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning

from gatedmoe.stats.regressor import MoERegressor

__all__ = ["select_n_experts", "Selection", "l1_path", "L1Path"]

CRITERIA = ("bic", "aic")


@dataclass
class Selection:
    """``n_experts`` chosen, ``scores`` (criterion per candidate, lower is better) and the
    fitted ``model`` for the chosen number."""

    n_experts: int
    scores: dict
    model: object


def select_n_experts(X, y, n_experts_range=range(1, 6), criterion="bic", estimator=None) -> Selection:
    """Fit one model per number of experts and keep the lowest ``criterion``.

    ``n_experts_range`` holds the candidate numbers, integers >= 1 (anything else, a
    float or a bool included, is a ``ValueError``). ``estimator`` (default
    ``MoERegressor()``) is cloned with each ``n_experts``; pass a `MoEClassifier` or set
    gate / penalty / random_state on it.

    Examples
    --------
    >>> from gatedmoe.stats import MoETruth, select_n_experts
    >>> X, y, _ = MoETruth.well_separated(2, 1).sample(600, random_state=0)
    >>> select_n_experts(X, y, range(1, 4)).n_experts
    2
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    given = list(n_experts_range)
    # int() would truncate 1.5 to 1 and take True for 1: refuse rather than guess.
    if not given or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 for k in given):
        raise ValueError(f"n_experts_range must hold integers >= 1, got {given}")
    candidates = sorted({int(k) for k in given})
    base = estimator if estimator is not None else MoERegressor(random_state=0)
    scores, models = {}, {}
    for k in candidates:
        model = clone(base).set_params(n_experts=k).fit(X, y)
        scores[k] = float(getattr(model, criterion)(X, y))
        models[k] = model
    best = min(candidates, key=lambda k: (scores[k], k))
    return Selection(best, scores, models[best])


@dataclass
class L1Path:
    """The fits of `l1_path`, one per value of ``alphas`` (in the order fitted, largest
    first): ``models``, and per model the ``bic``, the number of non-zero expert and gate
    coefficients ``n_nonzero`` and ``converged``."""

    alphas: np.ndarray
    models: list
    bic: np.ndarray
    n_nonzero: np.ndarray
    converged: np.ndarray

    @property
    def best(self):
        """The model with the lowest BIC."""
        return self.models[int(np.argmin(self.bic))]


def l1_path(X, y, alphas, estimator=None) -> L1Path:
    """Lasso MoE fits along a decreasing sequence of ``alphas``, each warm-started from the
    previous one (as scikit-learn's ``lasso_path``).

    The first (largest) alpha is fitted from ``estimator``'s own starts (``n_init``);
    every later alpha starts from the previous solution, whose support is nearly the new
    one, so EM needs a few iterations and the experts' coordinate descent sweeps only a
    small working set (see `gatedmoe.stats.em.weighted_lasso`). ``estimator`` (default
    ``MoERegressor(n_experts=2, random_state=0)``) is cloned with ``penalty="l1"``.
    A fit that stops at ``max_iter`` is recorded in ``converged`` (no warning per alpha).

    Examples
    --------
    >>> import numpy as np
    >>> from gatedmoe.stats import MoETruth, l1_path
    >>> X, y, _ = MoETruth.well_separated(2, 5).sample(300, random_state=0)
    >>> path = l1_path(X, y, alphas=[0.3, 0.1, 0.03])
    >>> len(path.models), bool(path.n_nonzero[0] <= path.n_nonzero[-1])
    (3, True)
    """
    alphas = np.asarray(alphas, dtype=np.float64).ravel()
    if alphas.size == 0 or not np.all(np.isfinite(alphas)) or np.any(alphas <= 0):
        raise ValueError(f"alphas must be a non-empty sequence of finite numbers > 0, got {alphas!r}")
    alphas = np.sort(alphas)[::-1]
    if estimator is None:
        from gatedmoe.stats.regressor import MoERegressor

        estimator = MoERegressor(n_experts=2, random_state=0)
    if not isinstance(getattr(estimator, "n_experts", None), numbers.Integral):
        raise TypeError(f"estimator must be a MoERegressor or MoEClassifier, got {estimator!r}")
    model = clone(estimator).set_params(penalty="l1", warm_start=False)
    models, bic, nnz, conv = [], [], [], []
    for i, alpha in enumerate(alphas):
        model.set_params(alpha=float(alpha), warm_start=i > 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X, y)
        models.append(copy.deepcopy(model))
        bic.append(model.bic(X, y))
        nnz.append(int(np.count_nonzero(model.expert_coef_) + np.count_nonzero(model.gate_coef_)))
        conv.append(bool(model.converged_))
    for m in models:
        m.set_params(warm_start=False)
    return L1Path(alphas, models, np.asarray(bic), np.asarray(nnz), np.asarray(conv))
