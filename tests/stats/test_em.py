"""EM steps against independent oracles (numpy, scipy), and EM monotonicity."""

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.stats import norm

from gatedmoe.stats import em
from gatedmoe.stats.gating import gate_log_probs, make_gate


def test_gaussian_log_density_and_e_step_match_scipy():
    rng = np.random.default_rng(0)
    Z = em.add_intercept(rng.normal(size=(9, 2)))
    y = rng.normal(size=9)
    A, var = rng.normal(size=(3, 4)), rng.random(4) + 0.1
    ld = em.gaussian_log_density(Z, y, A, var)
    np.testing.assert_allclose(ld, norm.logpdf(y[:, None], Z @ A, np.sqrt(var)), rtol=1e-12)
    logg = np.log(rng.dirichlet(np.ones(4), size=9))
    R, ll = em.e_step(logg, ld)
    dens = np.exp(logg) * norm.pdf(y[:, None], Z @ A, np.sqrt(var))
    np.testing.assert_allclose(ll, np.log(dens.sum(1)), rtol=1e-12)
    np.testing.assert_allclose(R, dens / dens.sum(1, keepdims=True), rtol=1e-10)


def test_gaussian_mstep_is_weighted_least_squares():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 3))
    Z, y = em.add_intercept(X), rng.normal(size=50)
    R = rng.dirichlet(np.ones(2), size=50)
    A, var = em.gaussian_mstep(Z, y, R, np.zeros((4, 2)), np.ones(2), var_floor=1e-12)
    for e in range(2):
        w = np.sqrt(R[:, e])
        ref = np.linalg.lstsq(Z * w[:, None], y * w, rcond=None)[0]
        np.testing.assert_allclose(A[:, e], ref, rtol=1e-9)
        np.testing.assert_allclose(var[e], np.sum(R[:, e] * (y - Z @ ref) ** 2) / R[:, e].sum(), rtol=1e-9)


@pytest.mark.parametrize("gate,k", [("softmax", None), ("temperature_softmax", None), ("modified_softmax", None)])
def test_gate_newton_reaches_scipy_optimum(gate, k):
    rng = np.random.default_rng(2)
    Z = em.add_intercept(rng.normal(size=(200, 2)))
    R = rng.dirichlet(np.ones(3), size=200)
    t = 0.5 if gate == "temperature_softmax" else 1.0

    def negq(theta):
        W = np.hstack([theta.reshape(3, 2), np.zeros((3, 1))])
        return -np.sum(R * gate_log_probs(Z @ W, gate, k, t))

    ref = minimize(negq, np.zeros(6), method="BFGS", options={"gtol": 1e-10}).x.reshape(3, 2)
    W, q = em.softmax_newton(Z, R, np.zeros((3, 3)), 2, make_gate(gate, 3, k, t), n_steps=30)
    np.testing.assert_allclose(W[:, :2], ref, atol=1e-5)
    assert W[:, 2].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("gate,k", [("topk_softmax", 2), ("softmax", None), ("sigmoid", None)])
def test_gate_steps_never_lower_q_and_do_improve(gate, k):
    from gatedmoe.stats.gating import expected_log

    rng = np.random.default_rng(3)
    Z = em.add_intercept(rng.normal(size=(100, 2)))
    W0 = rng.normal(scale=3, size=(3, 3))
    logg0 = gate_log_probs(Z @ W0, gate, k)
    # EM targets: responsibilities live on the experts the gate keeps.
    R = rng.dirichlet(np.ones(3), size=100) * np.isfinite(logg0)
    R /= R.sum(1, keepdims=True)
    q0 = expected_log(R, logg0)
    n_free = 3 if gate == "sigmoid" else 2
    step = em.lbfgs_gate if gate == "sigmoid" else em.softmax_newton
    W, q = step(Z, R, W0, n_free, make_gate(gate, 3, k))
    assert q == pytest.approx(expected_log(R, gate_log_probs(Z @ W, gate, k)), rel=1e-12)
    assert q > q0


def test_prox_gradient_solves_lasso():
    from sklearn.linear_model import Lasso

    rng = np.random.default_rng(4)
    X = rng.normal(size=(80, 10))
    y = X[:, 0] * 2 - X[:, 1] + 0.1 * rng.normal(size=80)

    def fg(w):
        r = X @ w - y
        return 0.5 * np.mean(r**2), X.T @ r / 80

    w, _ = em.prox_gradient(fg, np.zeros(10), np.ones(10, dtype=bool), 0.1, 1.0, n_steps=3000)
    ref = Lasso(alpha=0.1, fit_intercept=False, tol=1e-12, max_iter=100000).fit(X, y).coef_
    np.testing.assert_allclose(w, ref, atol=1e-6)


def test_batched_multinomial_newton_matches_per_expert_newton():
    rng = np.random.default_rng(5)
    Z = em.add_intercept(rng.normal(size=(150, 2)))
    y = rng.integers(0, 3, size=150)
    Y = np.eye(3)[y]
    R = rng.dirichlet(np.ones(2), size=150)
    V0 = np.zeros((2, 3, 3))
    V0[:, :, :2] = rng.normal(scale=0.3, size=(2, 3, 2))
    fast = em.multinomial_newton_experts(Z, Y, R, V0)
    for e in range(2):
        ref, _ = em.softmax_newton(Z, R[:, e, None] * Y, V0[e], 2, n_steps=1)
        np.testing.assert_allclose(fast[e], ref, rtol=1e-8, atol=1e-10)
