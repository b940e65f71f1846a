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


@pytest.mark.parametrize("l2", [0.0, 3.0])
@pytest.mark.parametrize("gate,k", [("softmax", None), ("temperature_softmax", None), ("modified_softmax", None)])
def test_gate_newton_reaches_scipy_optimum(gate, k, l2):
    rng = np.random.default_rng(2)
    Z = em.add_intercept(rng.normal(size=(200, 2)))
    R = rng.dirichlet(np.ones(3), size=200)
    t = 0.5 if gate == "temperature_softmax" else 1.0

    def negq(theta):
        W = np.hstack([theta.reshape(3, 2), np.zeros((3, 1))])
        # The ridge over all three experts' coefficients at its best common shift v.
        B = W[:-1]
        ridge = 0.5 * l2 * ((B - B.mean(axis=1, keepdims=True)) ** 2).sum()
        return -np.sum(R * gate_log_probs(Z @ W, gate, k, t)) + ridge

    ref = minimize(negq, np.zeros(6), method="BFGS", options={"gtol": 1e-10}).x.reshape(3, 2)
    W, q = em.softmax_newton(Z, R, np.zeros((3, 3)), 2, make_gate(gate, 3, k, t), n_steps=30, l2=l2)
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


@pytest.mark.parametrize("gate", ["softmax", "temperature_softmax"])
def test_mixture_of_multinomials_likelihood_and_gradient_match_brute_force(gate):
    from scipy.optimize import approx_fprime

    rng = np.random.default_rng(6)
    N, E, C = 40, 3, 4
    X = rng.normal(size=(N, 2))
    Z = em.add_intercept(X)
    t = 0.7 if gate == "temperature_softmax" else 1.0
    g = make_gate(gate, E, None, t)
    F = g.design(X)
    y = rng.integers(0, C, size=N)
    W, V = rng.normal(size=(F.shape[1], E)), rng.normal(size=(E, 3, C))
    ll, R, gW, gV = em.multinomial_mixture_grad(F, Z, y, W, V, g)
    # Brute force: p(y|x) = sum_e g_e(x) softmax(Z V_e)[y], summed in the probability domain.
    p_exp = np.stack([np.exp(Z @ V[e]) / np.exp(Z @ V[e]).sum(1, keepdims=True) for e in range(E)])
    g_NE = np.exp(F @ W / t) / np.exp(F @ W / t).sum(1, keepdims=True)
    joint = g_NE * p_exp[:, np.arange(N), y].T
    np.testing.assert_allclose(ll, np.log(joint.sum(1)), rtol=1e-12)
    np.testing.assert_allclose(R, joint / joint.sum(1, keepdims=True), rtol=1e-10)

    def total(theta):
        W_, V_ = theta[: W.size].reshape(W.shape), theta[W.size :].reshape(V.shape)
        return em.multinomial_mixture_grad(F, Z, y, W_, V_, g)[0].sum()

    num = approx_fprime(np.r_[W.ravel(), V.ravel()], total, 1e-7)
    np.testing.assert_allclose(np.r_[gW.ravel(), gV.ravel()], num, atol=2e-5)


def test_symmetric_class_ridge_is_the_all_class_penalty_and_ignores_the_reference():
    rng = np.random.default_rng(7)
    C, l2 = 4, 1.7
    V = np.zeros((2, 4, C))
    V[:, :, :-1] = rng.normal(size=(2, 4, C - 1))
    pen = em.multinomial_ridge(V, l2, symmetric=True)
    for e in range(2):
        B = V[e, :-1]
        # LogisticRegression's penalty l2/2 sum_c ||B_c + v||^2 over all C classes, at the
        # shift v that leaves the probabilities unchanged and minimises it.
        best = minimize(lambda v, B=B: 0.5 * l2 * ((B + v[:, None]) ** 2).sum(), np.zeros(3), tol=1e-12).fun
        np.testing.assert_allclose(pen[e], best, rtol=1e-8)
        # Class 0 as the reference instead of the last class: same probabilities, same penalty.
        B0 = B - B[:, :1]
        V0 = np.zeros((1, 4, C))
        V0[0, :-1, :-1] = B0[:, [3, 1, 2]]
        np.testing.assert_allclose(em.multinomial_ridge(V0, l2, symmetric=True)[0], pen[e], rtol=1e-12)
    np.testing.assert_allclose(em.multinomial_ridge(V, l2), 0.5 * l2 * (V[:, :-1, :-1] ** 2).sum(axis=(1, 2)))


@pytest.mark.parametrize("symmetric", [False, True])
def test_multinomial_newton_reaches_the_ridge_optimum(symmetric):
    rng = np.random.default_rng(8)
    N, Q, C = 120, 3, 3
    Z = em.add_intercept(rng.normal(size=(N, Q - 1)))
    y = rng.integers(0, C, size=N)
    Y = np.eye(C)[y]
    r = rng.random(N)
    V = em.multinomial_newton_experts(Z, Y, r[:, None], np.zeros((1, Q, C)), l2=2.0, symmetric=symmetric,
                                      n_steps=50)

    def loss(theta):
        V_ = np.zeros((1, Q, C))
        V_[0, :, :-1] = theta.reshape(Q, C - 1)
        logp = np.log(np.exp(Z @ V_[0]) / np.exp(Z @ V_[0]).sum(1, keepdims=True))
        return -(r * logp[np.arange(N), y]).sum() + em.multinomial_ridge(V_, 2.0, symmetric)[0]

    ref = minimize(loss, np.zeros(Q * (C - 1)), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(V[0, :, :-1].ravel(), ref, atol=1e-6)


def test_mixture_of_gaussians_likelihood_and_gradient_match_brute_force():
    from scipy.optimize import approx_fprime

    rng = np.random.default_rng(9)
    N, E = 50, 3
    X = rng.normal(size=(N, 2))
    Z = em.add_intercept(X)
    g = make_gate("softmax", E)
    F = g.design(X)
    y = rng.normal(size=N)
    W, A, var = rng.normal(size=(3, E)), rng.normal(size=(3, E)), rng.random(E) + 0.3
    ll, R, gW, gA, gvar = em.gaussian_mixture_grad(F, Z, y, W, A, var, g)
    g_NE = np.exp(F @ W) / np.exp(F @ W).sum(1, keepdims=True)
    joint = g_NE * norm.pdf(y[:, None], Z @ A, np.sqrt(var))
    np.testing.assert_allclose(ll, np.log(joint.sum(1)), rtol=1e-12)
    np.testing.assert_allclose(R, joint / joint.sum(1, keepdims=True), rtol=1e-10)

    def total(theta):
        W_, A_, v_ = theta[:9].reshape(3, E), theta[9:18].reshape(3, E), theta[18:]
        return em.gaussian_mixture_grad(F, Z, y, W_, A_, v_, g)[0].sum()

    num = approx_fprime(np.r_[W.ravel(), A.ravel(), var], total, 1e-7)
    np.testing.assert_allclose(np.r_[gW.ravel(), gA.ravel(), gvar], num, rtol=1e-5, atol=2e-5)


def test_gate_ridge_does_not_depend_on_the_reference_expert():
    rng = np.random.default_rng(10)
    W = np.zeros((3, 4))
    W[:, :3] = rng.normal(size=(3, 3))
    pen = em.gate_ridge(W, 3, 2.0)
    for ref in range(3):
        # The same gate with expert `ref` as the reference (its column moved last, at 0).
        order = [e for e in range(4) if e != ref] + [ref]
        W2 = W[:, order] - W[:, [ref]]
        np.testing.assert_allclose(em.gate_ridge(W2, 3, 2.0), pen, rtol=1e-12)
    best = minimize(lambda v: ((W[:-1] + v[:, None]) ** 2).sum(), np.zeros(2), tol=1e-12).fun
    np.testing.assert_allclose(pen, best, rtol=1e-8)
    # No reference column (normalised sigmoid: all four free): the plain ridge.
    np.testing.assert_allclose(em.gate_ridge(W, 4, 2.0), (W[:-1] ** 2).sum())


def test_blocked_gram_products_match_the_whole_array(monkeypatch):
    rng = np.random.default_rng(11)
    Z = em.add_intercept(rng.normal(size=(50, 3)))
    w = rng.random(50)
    np.testing.assert_allclose(em.weighted_gram(Z, w), Z.T @ (Z * w[:, None]), rtol=1e-12)
    R = rng.dirichlet(np.ones(3), size=50)
    y = rng.normal(size=50)
    whole_gate = em.softmax_newton(Z, R, np.zeros((4, 3)), 2, n_steps=3, l2=0.5)[0]
    whole_experts = em.gaussian_mstep(Z, y, R, np.zeros((4, 3)), np.ones(3), 1e-9)
    # Blocks of 7 rows: 50 = 7 * 7 + 1 leaves a one-row block.
    monkeypatch.setattr(em, "GRAM_CHUNK", 7)
    np.testing.assert_allclose(em.weighted_gram(Z, w), Z.T @ (Z * w[:, None]), rtol=1e-12)
    np.testing.assert_allclose(em.softmax_newton(Z, R, np.zeros((4, 3)), 2, n_steps=3, l2=0.5)[0], whole_gate,
                               rtol=1e-10, atol=1e-12)
    for got, want in zip(em.gaussian_mstep(Z, y, R, np.zeros((4, 3)), np.ones(3), 1e-9), whole_experts, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10)


def _observed_ll_N(gate, L_NE, log_expert_NE):
    """Per-sample hard-gate log-likelihood, straight from the gate's log-probabilities."""
    return em.logsumexp_rows(gate.log_probs(L_NE) + log_expert_NE)


@pytest.mark.parametrize("gate,E,k", [("topk_softmax", 3, 1), ("topk_softmax", 4, 2), ("sigmoid", 3, 1),
                                      ("sigmoid", 3, 2), ("sigmoid", 4, 3)])
def test_topk_coordinate_profile_matches_the_gate_moved_one_column(gate, E, k):
    rng = np.random.default_rng(E + k)
    g = make_gate(gate, E, k=k)
    L, le = rng.normal(size=(40, E)) * 2, rng.normal(size=(40, E)) * 3
    f = rng.normal(size=40)
    t = np.array([-1.3, -0.2, 0.0, 0.05, 0.7, 2.5])
    for e in range(E):
        prof = em.topk_coordinate_profile(L, le, e, f[:, None] * t, k, g.log_scores)
        for i, ti in enumerate(t):
            L2 = L.copy()
            L2[:, e] += ti * f
            np.testing.assert_allclose(prof[:, i], _observed_ll_N(g, L2, le), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gate", ["topk_softmax", "sigmoid"])
def test_breakpoint_step_finds_the_best_selection_of_a_top1_gate(gate):
    # Top-1: ll_n = log p_{n, argmax l_n} depends on the selection only, so the likelihood
    # along a coordinate is a step function and the change-point scan must find its
    # maximum over |t| < max_step exactly (brute force: every interval between crossings).
    rng = np.random.default_rng(3)
    g = make_gate(gate, 3, k=1)
    L, le, f = rng.normal(size=(60, 3)), rng.normal(size=(60, 3)) * 2, rng.normal(size=60)
    for e in range(3):
        others = em._topk_others(L, le, e, 1, g.log_scores)
        t = em.topk_breakpoint_step(L, le, e, f, 1, g.log_scores, others, max_step=1.5)
        cross = (others[3] - L[:, e]) / f
        pts = np.sort(np.r_[cross[np.abs(cross) < 1.5], -1.5, 1.5, 0.0])
        mids = np.r_[0.0, 0.5 * (pts[1:] + pts[:-1])]
        mids = mids[np.abs(mids) < 1.5]
        brute = em.topk_coordinate_profile(L, le, e, f[:, None] * mids, 1, g.log_scores).sum(0)
        got = em.topk_coordinate_profile(L, le, e, f[:, None] * np.array([t]), 1, g.log_scores).sum()
        assert abs(t) < 1.5
        assert got == pytest.approx(brute.max(), abs=1e-9)


@pytest.mark.parametrize("gate,k", [("topk_softmax", 2), ("sigmoid", 2), ("sigmoid", 1)])
def test_coordinate_gate_search_never_lowers_and_steps_past_a_jump(gate, k):
    # Experts fixed at a truth's; the gate started off it. The search must return the value
    # it reports (the gate's own likelihood minus the ridge), never below the start, and
    # gain on a start whose selection boundary is misplaced.
    from gatedmoe.stats import MoETruth

    truth = MoETruth.well_separated(3, 1, random_state=0, gate=gate, k=k)
    X, y, _ = truth.sample(2000, random_state=1)
    F = em.add_intercept(X)
    A = np.vstack([truth.expert_coef_.T, truth.expert_intercept_])
    le = em.gaussian_log_density(F, y, A, truth.noise_variance_)
    W_true = np.vstack([truth.gate_coef_.T, truth.gate_intercept_])
    g = make_gate(gate, 3, k=k)
    n_free = g.n_free(3)
    W0 = W_true.copy()
    W0[-1, 0] += 0.8
    l2 = 0.1 if k > 1 else 0.0
    start = _observed_ll_N(g, F @ W0, le).sum() - em.gate_ridge(W0, n_free, l2)
    W, value = em.coordinate_gate_search(F, W0, n_free, g, le, 0.5 ** np.arange(1, 9), l2=l2)
    assert value == pytest.approx(_observed_ll_N(g, F @ W, le).sum() - em.gate_ridge(W, n_free, l2), rel=1e-12)
    assert value > start + 1.0
    assert np.all(W[:, n_free:] == W0[:, n_free:])


@pytest.mark.parametrize("gate", ["sigmoid", "topk_softmax"])
def test_pinned_gate_ascent_climbs_where_every_step_crosses_a_sample(gate):
    # Experts fixed at a truth's; the gate at 3x the true logits: every top-2 selection is
    # the truth's (the order of the logits is), the weights are far off. Plain L-BFGS on
    # the observed likelihood stops at the first sample its steps move across a boundary;
    # the ascent that keeps the boundaries in place climbs to the value L-BFGS reaches from
    # the truth. Its value is the exact one and never below the start.
    from gatedmoe.stats import MoETruth

    truth = MoETruth.well_separated(3, 1, random_state=0, gate=gate, k=2)
    X, y, _ = truth.sample(2000, random_state=1)
    F = em.add_intercept(X)
    A = np.vstack([truth.expert_coef_.T, truth.expert_intercept_])
    le = em.gaussian_log_density(F, y, A, truth.noise_variance_)
    W_true = np.vstack([truth.gate_coef_.T, truth.gate_intercept_])
    g = make_gate(gate, 3, k=2)
    n_free, l2 = g.n_free(3), 0.1

    def value(W):
        return _observed_ll_N(g, F @ W, le).sum() - em.gate_ridge(W, n_free, l2)

    W0 = 3.0 * W_true
    _, plain = em.observed_lbfgs_gate(F, W0, n_free, g, le, maxiter=200, l2=l2)
    _, from_truth = em.observed_lbfgs_gate(F, W_true, n_free, g, le, maxiter=200, l2=l2)
    W, pinned = em.pinned_gate_ascent(F, W0, n_free, g, le, l2=l2)
    assert pinned == pytest.approx(value(W), rel=1e-12)
    assert pinned >= from_truth - 1.0 > plain + 50.0
    assert np.all(W[:, n_free:] == W0[:, n_free:])
    # Started at its own result (or anywhere): never lower.
    assert em.pinned_gate_ascent(F, W, n_free, g, le, l2=l2)[1] >= pinned
