"""`MoERegressor`: a gated mixture of Gaussian linear experts fitted by EM."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from gatedmoe.stats import em
from gatedmoe.stats._base import _BaseMoE

__all__ = ["MoERegressor"]

# EM iterations after which a fit that has not converged continues by L-BFGS.
QN_AFTER_EM = 30

# Default ridge on the gate coefficients (standardised features, total log-likelihood scale).
GATE_L2 = 0.1


class MoERegressor(RegressorMixin, _BaseMoE):
    """Mixture of Gaussian linear experts with a learned gate, by maximum likelihood (EM).

    ``p(y | x) = sum_e g_e(x) N(y; a_e . x + b_e, sigma_e^2)`` with the gate ``g`` chosen by
    ``gate`` (see `gatedmoe.stats.gating`; default ``g = softmax(beta_e . x + beta0_e)``,
    Jordan & Jacobs 1994). EM alternates responsibilities, weighted least squares per
    expert and one damped Newton (IRLS) step for the gate (warm-started), and never lowers
    the likelihood.

    Parameters
    ----------
    n_experts : int, default=3
    gate : {"softmax", "topk_softmax", "temperature_softmax", "sigmoid", "modified_softmax"}, default="softmax"
        The names of `gatedmoe.gates.names()`; ``"topk"`` and ``"temperature"`` are
        deprecated aliases (``FutureWarning`` at fit).
    k : int or None, default=None
        Experts kept per input by ``"topk_softmax"`` (required) / ``"sigmoid"`` (None: all).
        Sparse gates start from a dense fit, then shrink a smoothed top-K mask to the hard
        one (continuation), since the hard likelihood hides the selection boundary from
        every gradient (docs/stats.md). Top-1 gate parameters are reported scaled to
        ``max |W| = 1`` (only their direction matters).
    temperature : float, default=1.0
        Fixed temperature of ``gate="temperature_softmax"``: ``g = softmax(l / temperature)``.
    penalty : {None, "l1"}, default=None
        ``"l1"`` maximises ``mean loglik - alpha (sum_e ||beta_e||_1 + ||a_e||_1 / sigma_e)``
        (Lasso MoE, Chamroukhi & Huynh 2019, with the experts' scale-invariant penalty of
        Staedler et al. 2010 so the objective stays bounded; intercepts unpenalised), for
        p >> n.
    alpha : float, default=0.0
        Strength of the L1 penalty, on the per-sample log-likelihood scale; finite. Only
        with ``penalty="l1"`` (a non-zero value without it warns and is ignored).
    l2 : float, default=0.1
        Ridge on the gate's coefficients (not its intercepts; the experts are not
        penalised), on the total log-likelihood scale and the standardised features:
        ``l2/2 sum_e ||beta_e - mean_e beta||^2`` over all experts for the softmax family
        (whose last expert is a reference fixed at 0: the penalty must not depend on which
        expert that is), ``l2/2 sum_e ||beta_e||^2`` for the normalised sigmoid. A gate
        that separates the experts perfectly (a sharp boundary) has no finite
        maximum-likelihood estimate: unpenalised, its coefficients grow without end and
        EM crawls; the ridge keeps them finite at a cost of ``O(1/n)`` per sample.
        ``l2=0`` is the plain MLE; ignored by top-1 gates (scale-free) and ``penalty="l1"``.
    n_init : int, default=3
        Starts; the best likelihood is kept. Each start that ends with a duplicated or
        empty expert is re-seeded on the worst-explained samples (kept if better). With a
        sparse gate (``k``) every start is screened by a short run and only the best is
        run in full, then refined by a search over the selection boundaries and, for
        ``k >= 2``, an ascent that keeps them in place (see docs/stats.md).
    max_iter : int, default=100
    tol : float, default=1e-6
        Converged when the mean log-likelihood changes by less than ``tol`` and the gain
        still to come, extrapolated (Aitken), is below ``tol`` too: a crawl on a plateau
        is not convergence.
    init : {"kmeans", "random"}, default="kmeans"
        Starting responsibilities: k-means on standardised ``(x, y)`` (a different seed per
        start), or random Dirichlet responsibilities (flexmix-like).
    init_subsample : int or None, default=5000
        With more samples than this, all starts run on a random subsample of this size and
        only the best is refined on the full data (None: every start on all data).
    random_state : int, RandomState or None
    warm_start : bool, default=False
        Start from the previous fit's parameters (``n_init`` is then ignored) when their
        shapes fit the new data.

    ``fit`` standardises the features internally (the penalties, k-means and the Newton
    steps see standardised coefficients, so features in any units fit alike) and reports
    every coefficient on the original scale; not for ``gate="modified_softmax"``, whose
    ``tanh(x)`` depends on the scale of ``x``.

    Attributes
    ----------
    n_experts_ : int
        The number of experts fitted; read after fit in place of ``n_experts``, which
        `set_params` may have changed since.
    gate_ : StatsGate
        The gate fitted (`gatedmoe.stats.gating`: its name, ``k`` and ``temperature``);
        read after fit in place of ``gate``, ``k`` and ``temperature``.
    penalty_ : {None, "l1"}
        The penalty fitted; `bic` / `aic` read it in place of ``penalty``.
    gate_coef_ : ndarray (n_experts, n_features); gate_intercept_ : ndarray (n_experts,)
        The last expert's softmax-family gate parameters are 0 (identifiability).
    expert_coef_ : ndarray (n_experts, n_features); expert_intercept_ : ndarray (n_experts,)
    noise_variance_ : ndarray (n_experts,)
    converged_, n_iter_, lower_bound_ : as in `sklearn.mixture.GaussianMixture`;
        ``lower_bound_`` is the best (penalised) mean log-likelihood, ``n_iter_`` the
        iterations of the chosen run on all data (after a subsampled start: the refinement):
        EM's, plus L-BFGS's when it finishes a fit EM has not converged after 30.
    log_likelihood_history_ : ndarray (n_iter_ + 1,), the chosen run's objective per iteration.

    Examples
    --------
    >>> import numpy as np
    >>> from gatedmoe.stats import MoERegressor
    >>> rng = np.random.default_rng(0)
    >>> X = rng.uniform(-2, 2, (500, 1))
    >>> y = np.where(X[:, 0] < 0, -2 * X[:, 0], 3 + X[:, 0]) + 0.1 * rng.normal(size=500)
    >>> model = MoERegressor(n_experts=2, random_state=0).fit(X, y)
    >>> bool(model.score(X, y) > 0.95)
    True
    """

    _DESIGN_AXES = (("W", 0), ("A", 0))

    def __init__(
        self,
        n_experts=3,
        gate="softmax",
        k=None,
        temperature=1.0,
        penalty=None,
        alpha=0.0,
        l2=GATE_L2,
        n_init=3,
        max_iter=100,
        tol=1e-6,
        init="kmeans",
        init_subsample=5000,
        random_state=None,
        warm_start=False,
    ):
        super().__init__(n_experts=n_experts, gate=gate, k=k, temperature=temperature, penalty=penalty, alpha=alpha,
                         n_init=n_init, max_iter=max_iter, tol=tol, init=init, init_subsample=init_subsample,
                         random_state=random_state, warm_start=warm_start)
        self.l2 = l2

    def fit(self, X, y):
        """Fit by EM. ``X`` ``[N, P]`` numeric, ``y`` ``[N]`` numeric. Returns self."""
        X, y = validate_data(self, X, y, y_numeric=True, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        self._check_nonnegative("l2")
        # Relative only: an absolute term (it was + 1e-12) held the noise variance of a response
        # in units of ~1e-7 at that term. The tiny positive value keeps a constant y's floor > 0.
        self._var_floor = max(1e-6 * float(np.var(y)), np.finfo(np.float64).tiny)
        return self._fit_em(X, y)

    def _gate_ridge(self):
        return float(self.l2)

    # Tighter than the classifier's 1e-4: on an extra expert (d1k2 truth, 2 + 1 experts)
    # 1e-4 stopped 0.03 units short of the optimum EM reaches after 3000 iterations;
    # 1e-5 reaches it (85 L-BFGS iterations), 1e-6 gains nothing more.
    _QN_GTOL = 1e-5

    def _quasi_newton(self, gate):
        # EM usually converges here in a few iterations; one that has not after
        # QN_AFTER_EM is crawling (a fading expert, a flat gate direction: the issue-19
        # misses stopped at max_iter or 100 units short), and L-BFGS finishes it. Dense
        # gates with the gate ridge only, as for the classifier.
        if gate.sparse or self._alpha > 0 or self._gate_l2(gate) == 0:
            return None
        return QN_AFTER_EM

    def _free_blocks(self, params, gate):
        return {**super()._free_blocks(params, gate), "A": np.ones(params["A"].shape, dtype=bool),
                "var": np.ones(params["var"].shape, dtype=bool)}

    def _lower_bounds(self, params):
        return {"var": self._var_floor}

    def _objective_grad(self, data, params, gate):
        F, Z, y = data
        n = F.shape[0]
        W = params["W"]
        ll_N, _, gW, gA, gvar = em.gaussian_mixture_grad(F, Z, y, W, params["A"], params["var"], gate)
        l2 = self._gate_l2(gate)
        if l2:
            n_free = gate.n_free(self.n_experts)
            gW[:-1, :n_free] -= l2 * W[:-1, :n_free] @ em.gate_ridge_matrix(n_free, self.n_experts)
        value = float(ll_N.mean()) - self._ridge(params, n, gate)
        return value, {"W": gW / n, "A": gA / n, "var": gvar / n}

    # ----------------------------------------------------------------- family hooks
    def _kmeans_target(self, y):
        return y[:, None]

    def _encode_y_predict(self, y, n):
        y = column_or_1d(np.asarray(y), warn=True)
        if not np.issubdtype(y.dtype, np.number):
            raise TypeError(f"y must be numeric, got dtype {y.dtype}")
        y = y.astype(np.float64)
        if y.shape[0] != n:
            raise ValueError(f"y has {y.shape[0]} samples but X has {n}")
        if not np.all(np.isfinite(y)):
            raise ValueError("y contains NaN or infinity")
        return y

    def _empty_params(self, Q, QF):
        return {
            "W": np.zeros((QF, self.n_experts)),
            "A": np.zeros((Q, self.n_experts)),
            "var": np.ones(self.n_experts),
        }

    def _expert_log_density(self, Z, y, params):
        return em.gaussian_log_density(Z, y, params["A"], params["var"])

    def _expert_mstep(self, Z, y, R, params, state):
        A, var = em.gaussian_mstep(Z, y, R, params["A"], params["var"], self._var_floor, self._alpha, Z.shape[0])
        return {"A": A, "var": var}

    def _expert_l1(self, params):
        return float((np.abs(params["A"][:-1]).sum(axis=0) / np.sqrt(params["var"])).sum())

    def _experts_coincide(self, data, params, e, f):
        Z = data[1]
        A, var = params["A"], params["var"]
        gap = np.mean((Z @ (A[:, e] - A[:, f])) ** 2) / (0.5 * (var[e] + var[f]))
        return gap < 1e-2 and abs(np.log(var[e] / var[f])) < 0.2

    def _warn_support(self, n_samples, n_features):
        q = n_features + 2
        if self._alpha == 0 and n_samples < q * self.n_experts:
            warnings.warn(
                f"{self.n_experts} Gaussian linear experts have n_features + 2 = {q} parameters each, "
                f"more than the {n_samples} samples can determine ({q * self.n_experts} needed): the "
                "experts will interpolate. Use penalty='l1' with alpha > 0, or fewer experts",
                UserWarning,
                stacklevel=5,
            )

    def _set_fitted(self, params):
        params = self._rescale(params, to_original=True)
        self.gate_coef_ = params["W"][:-1].T.copy()
        self.gate_intercept_ = params["W"][-1].copy()
        self.expert_coef_ = params["A"][:-1].T.copy()
        self.expert_intercept_ = params["A"][-1].copy()
        self.noise_variance_ = params["var"].copy()

    def _params_from_fitted(self):
        return {
            "W": self._gate_W(),
            "A": np.vstack([self.expert_coef_.T, self.expert_intercept_[None, :]]),
            "var": self.noise_variance_.copy(),
        }

    def _n_expert_parameters(self):
        if self.penalty_ == "l1":
            return int(np.count_nonzero(self.expert_coef_)) + 2 * self.n_experts_
        return self.expert_coef_.size + 2 * self.n_experts_

    # ----------------------------------------------------------------- prediction
    def predict(self, X):
        """Conditional mean ``E[y | x] = sum_e g_e(x) (a_e . x + b_e)`` ``[N]``."""
        X = self._validated(X)
        means_NE = X @ self.expert_coef_.T + self.expert_intercept_
        return np.sum(self._gate_proba(X) * means_NE, axis=1)

    def sample(self, X, random_state=None):
        """Draw ``y ~ p(y | x)`` for each row of ``X``; returns ``(y [N], expert [N])``."""
        check_is_fitted(self)
        X = self._validated(X)
        rng = check_random_state(random_state)
        expert_N = self._sample_experts(X, rng)
        mean_N = np.sum(X * self.expert_coef_[expert_N], axis=1) + self.expert_intercept_[expert_N]
        y = mean_N + np.sqrt(self.noise_variance_[expert_N]) * rng.standard_normal(X.shape[0])
        return y, expert_N
