"""L1-penalised (Lasso MoE) fitting with p >> n: sparse, correct support."""

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from gatedmoe.stats import MoERegressor


def draw(n, seed, p=300):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    # Gate on x0; expert 0 uses x1, expert 1 uses x2; everything else is noise.
    g = 1 / (1 + np.exp(-4 * X[:, 0]))
    e = (rng.random(n) < g).astype(int)
    y = np.where(e == 1, 3 * X[:, 1] + 2, -3 * X[:, 2] - 2) + 0.3 * rng.normal(size=n)
    return X, y


def test_lasso_moe_recovers_the_support_when_p_exceeds_n():
    X, y = draw(120, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = MoERegressor(n_experts=2, penalty="l1", alpha=0.1, random_state=0).fit(X, y)
    coef = model.expert_coef_
    assert np.count_nonzero(coef) <= 20, np.count_nonzero(coef)
    big = {tuple(ix) for ix in np.argwhere(np.abs(coef) > 1.0)}
    assert {(a, b) for a, b in big} in ({(0, 1), (1, 2)}, {(1, 1), (0, 2)})
    gate = model.gate_coef_[0] - model.gate_coef_[1]
    assert np.argmax(np.abs(gate)) == 0
    assert np.count_nonzero(gate) <= 10
    assert model.n_parameters() < 40
    # Without the penalty the same problem is hopeless (p > n per expert): compare on new data.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        plain = MoERegressor(n_experts=2, n_init=1, random_state=0, max_iter=5).fit(X, y)
    X_new, y_new = draw(500, seed=1)
    assert model.loglik(X_new, y_new) / 500 > -2.5
    assert model.loglik(X_new, y_new) > plain.loglik(X_new, y_new) + 500
