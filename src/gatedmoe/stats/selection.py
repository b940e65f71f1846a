"""Choosing the number of experts by an information criterion."""

from __future__ import annotations

from dataclasses import dataclass

from sklearn.base import clone

from gatedmoe.stats.regressor import MoERegressor

__all__ = ["select_n_experts", "Selection"]

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

    ``estimator`` (default ``MoERegressor()``) is cloned with each ``n_experts``; pass a
    `MoEClassifier` or set gate / penalty / random_state on it.

    Examples
    --------
    >>> from gatedmoe.stats import MoETruth, select_n_experts
    >>> X, y, _ = MoETruth.well_separated(2, 1).sample(600, random_state=0)
    >>> select_n_experts(X, y, range(1, 4)).n_experts
    2
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    candidates = sorted({int(k) for k in n_experts_range})
    if not candidates or candidates[0] < 1:
        raise ValueError(f"n_experts_range must hold integers >= 1, got {list(n_experts_range)}")
    base = estimator if estimator is not None else MoERegressor(random_state=0)
    scores, models = {}, {}
    for k in candidates:
        model = clone(base).set_params(n_experts=k).fit(X, y)
        scores[k] = float(getattr(model, criterion)(X, y))
        models[k] = model
    best = min(candidates, key=lambda k: (scores[k], k))
    return Selection(best, scores, models[best])
