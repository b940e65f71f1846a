"""Voronoi losses between a fitted and a true Gaussian MoE (Nguyen, Nguyen & Ho 2023).

"Demystifying Softmax Gating Function in Gaussian Mixture of Experts" (NeurIPS 2023)
measures a fit ``G = sum_i exp(beta0_i) delta_(beta1_i, a_i, b_i, sigma_i)`` against the
truth ``G*`` (k* experts) through the Voronoi cells
``A_j = {i : |theta_i - theta*_j| <= |theta_i - theta*_l| for all l}`` of the fitted atoms
``theta_i = (beta1_i, a_i, b_i, sigma_i)`` (``sigma`` the noise *variance*, as in the
paper), with ``Delta`` the differences inside a cell:

* exact fit (``D1``): ``sum_j |sum_{i in A_j} exp(beta0_i) - exp(beta0*_j)|
  + sum_j sum_{i in A_j} exp(beta0_i) (|Dbeta1| + |Da| + |Db| + |Dsigma|)``;
  the MLE converges at ``n^{-1/2}`` in it.
* over-specified (``D2``): as ``D1``, but inside a cell with ``m = |A_j| > 1`` atoms the
  terms are ``|Dbeta1|^r + |Da|^{r/2} + |Db|^r + |Dsigma|^{r/2}`` with ``r = rbar(m)``,
  ``rbar(2) = 4``, ``rbar(3) = 6`` (larger ``m``: unknown in closed form; pass ``rbar``).

The softmax gate is identifiable only up to a common translation ``(t0, t1)`` of all
``(beta0_i, beta1_i)``; the losses here take the infimum over translations of the fit,
numerically (Nelder-Mead from two starts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment, minimize
from sklearn.base import BaseEstimator, is_classifier
from sklearn.utils.validation import check_is_fitted

__all__ = ["voronoi_loss", "VoronoiLoss", "RBAR"]

# rbar(m): the exponents the paper gives for its system of polynomial equations (m = 2, 3).
RBAR = {1: 1, 2: 4, 3: 6}


@dataclass(frozen=True)
class VoronoiLoss:
    """``d1``: exact-fit loss; ``d2``: over-specified loss (equal to ``d1`` when every cell
    holds one atom); ``matched``: Euclidean norm of the parameter error after the best
    permutation (only when the numbers of experts agree, else None); ``cells``: the
    Voronoi cell (truth index) of each fitted expert."""

    d1: float
    d2: float
    matched: float | None
    cells: tuple


ATOM_ATTRIBUTES = ("gate_coef_", "gate_intercept_", "expert_coef_", "expert_intercept_", "noise_variance_")


def _check_model(m, name):
    """TypeError unless ``m`` is a Gaussian MoE (a `MoETruth` or a `MoERegressor`);
    sklearn's NotFittedError for an unfitted estimator."""
    # The losses are defined for Gaussian experts only; a classifier has no noise variance.
    if isinstance(m, BaseEstimator):
        if is_classifier(m):
            raise TypeError(f"{name} must be a fitted MoERegressor or a MoETruth, got the classifier {type(m).__name__}")
        check_is_fitted(m, "expert_coef_")
    missing = [a for a in ATOM_ATTRIBUTES if not hasattr(m, a)]
    if missing:
        raise TypeError(f"{name} must be a fitted MoERegressor or a MoETruth, got {type(m).__name__} "
                        f"without {', '.join(missing)}")


def _atoms(m):
    return (
        np.asarray(m.gate_coef_, float),
        np.asarray(m.gate_intercept_, float),
        np.asarray(m.expert_coef_, float),
        np.asarray(m.expert_intercept_, float),
        np.asarray(m.noise_variance_, float),
    )


def _losses(fit, truth, t0, t1, rbar):
    b1, b0, a, b, s = fit
    B1, B0, A, Bb, S = truth
    b1 = b1 + t1
    b0 = b0 + t0
    theta = np.hstack([b1, a, b[:, None], s[:, None]])
    theta_star = np.hstack([B1, A, Bb[:, None], S[:, None]])
    cell = np.argmin(((theta[:, None, :] - theta_star[None, :, :]) ** 2).sum(-1), axis=1)
    w = np.exp(b0)
    # Differences of each fitted atom to the true atom of its cell.
    db1 = np.linalg.norm(b1 - B1[cell], axis=1)
    da = np.linalg.norm(a - A[cell], axis=1)
    db = np.abs(b - Bb[cell])
    ds = np.abs(s - S[cell])
    size = np.bincount(cell, minlength=theta_star.shape[0])
    mass = np.abs(np.bincount(cell, weights=w, minlength=theta_star.shape[0]) - np.exp(B0)).sum()
    linear = w * (db1 + da + db + ds)
    d1 = mass + linear.sum()
    r = np.array([float(rbar(m)) if m > 1 else 1.0 for m in size[cell]])
    slow = w * (db1**r + da ** (r / 2) + db**r + ds ** (r / 2))
    d2 = mass + np.where(size[cell] > 1, slow, linear).sum()
    return d1, d2, tuple(int(c) for c in cell)


def voronoi_loss(fitted, truth, rbar=None) -> VoronoiLoss:
    """Voronoi losses ``D1`` / ``D2`` of ``fitted`` against ``truth`` (and a matched error).

    Parameters
    ----------
    fitted, truth : objects with ``gate_coef_``, ``gate_intercept_``, ``expert_coef_``,
        ``expert_intercept_``, ``noise_variance_`` (a fitted `MoERegressor` or a `MoETruth`).
        An unfitted estimator raises sklearn's ``NotFittedError``; a classifier, or an
        object without these attributes, a ``TypeError``.
    rbar : callable ``m -> r`` or None
        Exponent for cells of ``m`` atoms; default `RBAR` (a ``ValueError`` for ``m > 3``).

    Examples
    --------
    >>> from gatedmoe.stats import MoETruth, voronoi_loss
    >>> t = MoETruth.well_separated(3, 1)
    >>> voronoi_loss(t, t).d1 < 1e-6
    True
    """
    _check_model(fitted, "fitted")
    _check_model(truth, "truth")
    F, T = _atoms(fitted), _atoms(truth)
    if F[0].shape[1] != T[0].shape[1]:
        raise ValueError(f"fitted has {F[0].shape[1]} features but truth has {T[0].shape[1]}")

    def rb(m, searching=False):
        if rbar is not None:
            return rbar(m)
        if m in RBAR:
            return RBAR[m]
        if searching:
            # Only while searching translations: a stand-in exponent; the final cells are checked.
            return 2 * m
        raise ValueError(f"a Voronoi cell holds {m} fitted experts; rbar({m}) is not known in closed form: pass rbar=")

    P = F[0].shape[1]
    starts = [
        np.zeros(P + 1),
        np.concatenate([[np.log(np.exp(T[1]).sum() / np.exp(F[1]).sum())], T[0].mean(0) - F[0].mean(0)]),
    ]
    opts = {"xatol": 1e-7, "fatol": 1e-10, "maxiter": 1000}
    found = []
    for which in (0, 1):
        def objective(t, which=which):
            return _losses(F, T, t[0], t[1:], lambda m: rb(m, searching=True))[which]

        best = min((minimize(objective, s0, method="Nelder-Mead", options=opts) for s0 in starts), key=lambda r: r.fun)
        found.append(_losses(F, T, best.x[0], best.x[1:], rb))
    d1, d2, cells = found[0][0], found[1][1], found[1][2]
    matched = _matched_error(F, T) if F[0].shape[0] == T[0].shape[0] else None
    return VoronoiLoss(float(d1), float(d2), matched, cells)


def _matched_error(F, T):
    """Parameter error after the best permutation; gates compared with the expert matched
    to the truth's last expert as the zero reference (the truth's own gauge)."""
    b1, b0, a, b, s = F
    B1, B0, A, Bb, S = T
    cost = ((np.hstack([a, b[:, None], s[:, None]])[:, None] - np.hstack([A, Bb[:, None], S[:, None]])[None]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    perm = rows[np.argsort(cols)]  # perm[j] = fitted expert matched to true expert j
    ref = perm[-1]
    g1, g0 = b1 - b1[ref], b0 - b0[ref]
    G1, G0 = B1 - B1[-1], B0 - B0[-1]
    diff = np.concatenate([
        (g1[perm] - G1).ravel(), g0[perm] - G0, (a[perm] - A).ravel(), b[perm] - Bb, s[perm] - S
    ])
    return float(np.linalg.norm(diff))
