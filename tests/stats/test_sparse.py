"""Sparse gates (top-K softmax, top-K sigmoid) fitted on data from their own truths, and
the convergence criterion that must not stop on a plateau."""

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from gatedmoe.stats import MoERegressor, MoETruth
from gatedmoe.stats._base import _stall, em_converged, em_gain_left

# (gate, k, K, d, seed); seed 0 of top-2 sigmoid K=4 d=1 missed by 0.47 units before the
# pinned ascent of the jump search (em.pinned_gate_ascent), which is what reaches it.
CASES = [("topk_softmax", 1, 3, 1, 1), ("topk_softmax", 2, 3, 1, 1), ("topk_softmax", 2, 4, 10, 1),
         ("sigmoid", 1, 3, 1, 1), ("sigmoid", 2, 3, 10, 1), ("topk_softmax", 1, 2, 10, 1), ("sigmoid", 2, 4, 1, 0)]


@pytest.mark.parametrize("gate,k,K,d,seed", CASES)
def test_default_fit_reaches_the_fit_started_at_the_truth(gate, k, K, d, seed):
    truth = MoETruth.well_separated(K, d, random_state=seed, gate=gate, k=k)
    X, y, _ = truth.sample(1000, random_state=1000 + seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = MoERegressor(n_experts=K, gate=gate, k=k, random_state=seed).fit(X, y)
        start = truth.as_estimator().set_params(warm_start=True, max_iter=500).fit(X, y)
    best_known = max(start.loglik(X, y), truth.loglik(X, y))
    assert model.loglik(X, y) >= best_known - 1e-5 * 1000, (model.loglik(X, y), best_known)
    assert np.all(np.isfinite(model.gate_coef_)) and np.abs(model.gate_coef_).max() < 1e4
    if k == 1:
        # Top-1 gates are invariant to a positive scale of W: reported with max |W| = 1.
        W = np.vstack([model.gate_coef_.T, model.gate_intercept_])
        assert np.abs(W).max() == pytest.approx(1.0)


def test_convergence_is_not_declared_on_a_plateau():
    # EM crawling: steps 0.99x smaller each time, each below tol, 1e-4 still to gain.
    crawl = list(np.cumsum([1e-6 * 0.99**t for t in range(50)]) - 10.0)
    assert not em_converged(crawl, tol=1e-5)
    # Fast linear convergence: steps halve, the remaining gain is about one step.
    fast = list(np.cumsum([1e-3 * 0.5**t for t in range(20)]) - 10.0)
    assert em_converged(fast, tol=1e-5)
    # A fixed point converges at once; a single step of unknown rate does not.
    assert em_converged([-1.0, -1.0], tol=1e-6)
    assert not em_converged([-1.0, -1.0 + 5e-7], tol=1e-6)


def test_gain_left_is_aitkens_extrapolation():
    # Geometric steps d * a^t: the remaining sum after step t is d a^t * a / (1 - a).
    d, a = 1e-4, 0.9
    hist = list(np.cumsum([d * a**t for t in range(30)]))
    assert em_gain_left(hist) == pytest.approx(d * a**29 * a / (1 - a), rel=1e-6)
    assert em_gain_left(hist[:2]) is None
    assert em_gain_left([0.0, 1.0, 1.5]) == pytest.approx(0.5)  # a = 1/2: one more step's worth
    assert em_gain_left([0.0, 1.0, 0.5]) == 0.0  # falling: nothing left to gain
    assert em_gain_left([0.0, 1.0, 3.0]) == float("inf")  # steps growing


def test_the_warning_says_why_a_small_last_step_is_not_convergence():
    crawl = list(np.cumsum([1e-6 * 0.99**t for t in range(50)]) - 10.0)
    text = _stall(crawl, tol=1e-5)
    assert "below tol=1e-05" in text and "Aitken" in text
    left = float(text.split("puts ")[1].split(" more")[0])
    assert left == pytest.approx(em_gain_left(crawl), rel=1e-2) and left > 1e-5
    assert "above tol" in _stall([0.0, 1.0], tol=1e-6)
    assert "not shrinking" in _stall([0.0, 1e-7, 3e-7], tol=1e-6)
