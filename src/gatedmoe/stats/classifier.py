"""`MoEClassifier`: a gated mixture of multinomial logistic experts fitted by EM."""

from __future__ import annotations

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d, validate_data

from gatedmoe.stats import em
from gatedmoe.stats._base import INITS, _BaseMoE
from gatedmoe.stats.gating import log_softmax_rows

__all__ = ["MoEClassifier"]

# Newton steps of the one-expert (multinomial logistic regression) fit that starts
# ``init="logistic"`` (it stops earlier once a step gains nothing).
LOGISTIC_START_STEPS = 30


class MoEClassifier(ClassifierMixin, _BaseMoE):
    """Mixture of multinomial logistic experts with a learned gate, by maximum likelihood.

    ``p(y = c | x) = sum_e g_e(x) softmax(V_e [x, 1])_c``; the gate is as in
    `MoERegressor` (default softmax, Jordan & Jacobs 1994; ``"modified_softmax"`` is the gate
    Nguyen et al. 2024 propose for exactly this model).

    Fitting (dense gates with the ridge, the default): from the start, L-BFGS on the
    penalised observed log-likelihood, whose gradient is EM's at the current
    responsibilities (Fisher's identity); EM's responsibilities re-seed an expert that
    ends empty or duplicated. Plain EM crawled where an expert fades out (breast cancer:
    310 iterations) and its Newton M-steps were costly for many classes (digits: 190x
    LogisticRegression's time); see docs/stats.md. Sparse gates, ``penalty="l1"`` or
    ``l2=0``: EM, with one damped Newton step per expert (weighted multinomial logistic
    regression) and one for the gate, or proximal-gradient steps for L1.

    Parameters are those of `MoERegressor`, except for these defaults, and:

    l2 : float, default=1.0
        Ridge on the coefficients (not the intercepts), on the total log-likelihood scale:
        the gate's ridge of `MoERegressor` (``l2``), and ``l2 / n_experts`` on each
        expert's, so that with all experts equal the penalty is ``LogisticRegression``'s for ``C=1/l2``
        (the model then nests ``LogisticRegression``: ``n_experts=1`` is it exactly).
        For three or more classes the experts' ridge covers all C class vectors
        (``sum_c ||B_c - mean_c B||^2``, LogisticRegression's multinomial penalty, which
        does not depend on the reference class); for two, the one binary vector.
        Unpenalised, separable classes have no finite maximum-likelihood estimate.
        ``l2=0`` is the plain MLE; ignored with ``penalty="l1"``.
    init : {"logistic", "kmeans", "random"}, default="logistic"
        ``"logistic"``: every expert starts as the one-expert fit (multinomial logistic
        regression with the ridge ``l2``) and the gate from k-means clusters of ``x`` (a
        different seed per start); EM and L-BFGS localise the experts from there. The
        others as in `MoERegressor` (k-means on ``(x, onehot(y))``).
    n_init : int, default=1
        Starts (the logistic start is deterministic up to the gate's clusters; more starts
        rarely changed the cross-validated log-loss, see BENCHMARKS.md).
    max_iter : int, default=300
        Iterations: EM iterations, or L-BFGS iterations for the quasi-Newton fit.
    tol : float, default=1e-6
        EM's criterion (as in `MoERegressor`). The quasi-Newton fit is converged when the
        largest entry of the per-sample gradient is below 1e-4 (``LogisticRegression``'s
        ``tol``; ``_QN_GTOL``), or when L-BFGS stops in its line search with EM's
        criterion met.

    ``fit`` standardises the features internally (the penalties see standardised
    coefficients, as in a ``StandardScaler`` + ``LogisticRegression`` pipeline) and reports
    the coefficients on the original scale; not for ``gate="modified_softmax"``, whose
    ``tanh(x)`` depends on the scale of ``x``.

    Attributes
    ----------
    classes_ : ndarray (n_classes,)
    n_experts_, gate_, penalty_ : as in `MoERegressor`.
    gate_coef_ : ndarray (n_experts, n_features); gate_intercept_ : ndarray (n_experts,)
    expert_coef_ : ndarray (n_experts, n_classes, n_features)
    expert_intercept_ : ndarray (n_experts, n_classes)
        The last class's parameters are 0 in every expert (identifiability).
    converged_, n_iter_, lower_bound_, log_likelihood_history_ : as in `MoERegressor`.

    Examples
    --------
    >>> import numpy as np
    >>> from gatedmoe.stats import MoEClassifier
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(400, 2))
    >>> y = np.where(X[:, 0] > 0, X[:, 1] > 0, X[:, 1] < 0).astype(int)
    >>> clf = MoEClassifier(n_experts=2, penalty="l1", alpha=1e-3, random_state=0).fit(X, y)
    >>> bool(clf.score(X, y) > 0.9)
    True
    """

    def __init__(
        self,
        n_experts=3,
        gate="softmax",
        k=None,
        temperature=1.0,
        penalty=None,
        alpha=0.0,
        l2=1.0,
        n_init=1,
        max_iter=300,
        tol=1e-6,
        init="logistic",
        init_subsample=5000,
        random_state=None,
        warm_start=False,
    ):
        super().__init__(n_experts=n_experts, gate=gate, k=k, temperature=temperature, penalty=penalty, alpha=alpha,
                         n_init=n_init, max_iter=max_iter, tol=tol, init=init, init_subsample=init_subsample,
                         random_state=random_state, warm_start=warm_start)
        self.l2 = l2

    _DESIGN_AXES = (("W", 0), ("V", 1))
    _INITS = ("logistic", *INITS)

    def _start_params(self, data, rng, start, state):
        if self.init != "logistic":
            return super()._start_params(data, rng, start, state)
        F, Z, codes = data
        n, Q = Z.shape
        if "logistic_V" not in state:
            # One multinomial logistic regression (the model with a single expert) on all
            # of this data, shared by every start.
            # With the ridge the problem is strictly convex: plain Newton with step halving
            # (the trust region, for separable classes, made breast cancer take 17 capped
            # steps instead of 9 to the same optimum).
            C = self.classes_.size
            l2 = float(self.l2)
            V1 = em.multinomial_newton_experts(Z, np.eye(C)[codes], np.ones((n, 1)), np.zeros((1, Q, C)),
                                               l2, self._symmetric_ridge(), n_steps=LOGISTIC_START_STEPS,
                                               max_step=np.inf if l2 > 0 else em.MAX_LOGIT_STEP)
            state["logistic_V"] = V1
        params = self._empty_params(Q, F.shape[1])
        params["V"] = np.repeat(state["logistic_V"], self.n_experts, axis=0)
        # Every expert the same: the mixture is that regression whatever the gate. The gate
        # from k-means clusters of x alone lets EM localise the experts from there.
        R0 = self._initial_resp(Z[:, :-1], np.empty((n, 0)), rng)
        params["W"] = self._gate_mstep(self._gate.dense_starts()[0], F, R0, params["W"], state, n_steps=5)
        return params

    def _quasi_newton(self, gate):
        # A fading expert makes plain EM crawl (breast cancer: 310 iterations) and each of
        # its Newton M-steps for many classes is costly (digits), see docs/stats.md: L-BFGS
        # from the start (0 EM iterations reached at least the likelihood of 1, 2 or 5 on
        # the benchmark data, in less time). Only with the ridge: unpenalised separable
        # classes have no finite MLE, and L-BFGS would only chase the diverging
        # coefficients faster.
        return 0 if not gate.sparse and self._alpha == 0 and self._l2() > 0 else None

    def _free_blocks(self, params, gate):
        V = np.zeros(params["V"].shape, dtype=bool)
        V[:, :, :-1] = True
        return {**super()._free_blocks(params, gate), "V": V}

    def _objective_grad(self, data, params, gate):
        F, Z, codes = data
        n = F.shape[0]
        W, V = params["W"], params["V"]
        ll_N, _, gW, gV = em.multinomial_mixture_grad(F, Z, codes, W, V, gate)
        l2g, l2e = self._gate_l2(gate), self._expert_l2()
        n_free = gate.n_free(self.n_experts)
        # Each ridge is l2/2 <B, B P> and its gradient l2 B P (P symmetric): one product for both.
        penalty = 0.0
        if l2g:
            BP = W[:-1, :n_free] @ em.gate_ridge_matrix(n_free, self.n_experts)
            gW[:-1, :n_free] -= l2g * BP
            penalty += 0.5 * l2g * float(np.vdot(W[:-1, :n_free], BP))
        if l2e:
            BP = V[:, :-1, :-1] @ em.class_ridge_matrix(self.classes_.size, self._symmetric_ridge())
            gV[:, :-1, :-1] -= l2e * BP
            penalty += 0.5 * l2e * float(np.vdot(V[:, :-1, :-1], BP))
        value = float(ll_N.mean()) - penalty / n
        return value, {"W": gW / n, "V": gV / n}

    def fit(self, X, y):
        """Fit by EM. ``X`` ``[N, P]`` numeric, ``y`` ``[N]`` class labels. Returns self."""
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self._check_nonnegative("l2")
        self.classes_, codes = np.unique(y, return_inverse=True)
        if self.classes_.size < 2:
            raise ValueError(f"MoEClassifier needs at least 2 classes in y; got 1 class ({self.classes_[0]!r})")
        return self._fit_em(X, codes)

    # ----------------------------------------------------------------- family hooks
    def _kmeans_target(self, codes):
        return np.eye(self.classes_.size)[codes]

    def _encode_y_predict(self, y, n):
        y = column_or_1d(np.asarray(y), warn=True)
        if y.shape[0] != n:
            raise ValueError(f"y has {y.shape[0]} samples but X has {n}")
        codes = np.searchsorted(self.classes_, y)
        codes = np.clip(codes, 0, self.classes_.size - 1)
        if not np.array_equal(self.classes_[codes], y):
            raise ValueError(f"y contains labels not seen in fit; known classes: {list(self.classes_)}")
        return codes

    def _empty_params(self, Q, QF):
        return {"W": np.zeros((QF, self.n_experts)), "V": np.zeros((self.n_experts, Q, self.classes_.size))}

    def _expert_log_density(self, Z, y, params):
        return em.multinomial_log_density(Z, y, params["V"])

    def _expert_mstep(self, Z, codes, R, params, state):
        Y = np.eye(self.classes_.size)[codes]
        V = em.multinomial_mstep(Z, Y, R, params["V"], self._alpha, Z.shape[0], state["expert_L"],
                                 l2=self._expert_l2(),
                                 symmetric=self._symmetric_ridge())
        return {"V": V}

    def _symmetric_ridge(self):
        # Three or more classes: the ridge over all C class vectors (multinomial
        # LogisticRegression's), not over the C-1 free ones, which would depend on which
        # class is the reference. Two classes: LogisticRegression penalises the one
        # binary coefficient vector, which is the free class's.
        return self.classes_.size >= 3

    def _l2(self):
        return 0.0 if self.penalty == "l1" else float(self.l2)

    def _gate_ridge(self):
        # Unpenalised, the gate overfits small data as the experts do (it can separate the
        # training rows perfectly); the same ridge on its coefficients.
        return self._l2()

    def _expert_ridge(self, params):
        return float(em.multinomial_ridge(params["V"], self._expert_l2(), self._symmetric_ridge()).sum())

    def _expert_l2(self):
        # l2 / n_experts on each expert: with every expert equal to V the experts' ridge
        # is LogisticRegression's l2/2 ||V||^2, so the penalised likelihood contains
        # LogisticRegression's as a special case (each expert sees only part of the data;
        # the full l2 on each over-smoothed them: wine 0.071 against 0.063).
        return self._l2() / self.n_experts

    def _expert_l1(self, params):
        return np.abs(params["V"][:, :-1]).sum()

    def _experts_coincide(self, data, params, e, f):
        Z = data[1]
        pe = np.exp(log_softmax_rows(Z @ params["V"][e]))
        pf = np.exp(log_softmax_rows(Z @ params["V"][f]))
        return 0.5 * np.abs(pe - pf).sum(axis=1).mean() < 1e-2

    def _set_fitted(self, params):
        params = self._rescale(params, to_original=True)
        V = params["V"]
        self.gate_coef_ = params["W"][:-1].T.copy()
        self.gate_intercept_ = params["W"][-1].copy()
        self.expert_coef_ = np.transpose(V[:, :-1, :], (0, 2, 1)).copy()
        self.expert_intercept_ = V[:, -1, :].copy()

    def _params_from_fitted(self):
        V = np.concatenate([np.transpose(self.expert_coef_, (0, 2, 1)), self.expert_intercept_[:, None, :]], axis=1)
        return {"W": self._gate_W(), "V": V}

    def _n_expert_parameters(self):
        if self.penalty_ == "l1":
            return int(np.count_nonzero(self.expert_coef_[:, :-1])) + self.n_experts_ * (self.classes_.size - 1)
        return self.n_experts_ * (self.expert_coef_.shape[2] + 1) * (self.classes_.size - 1)

    # ----------------------------------------------------------------- prediction
    def _expert_proba(self, X):
        """``p_e(c | x)`` ``[E, N, C]``."""
        logits_ENC = np.einsum("np,ecp->enc", X, self.expert_coef_) + self.expert_intercept_[:, None, :]
        return np.exp(logits_ENC - np.logaddexp.reduce(logits_ENC, axis=2, keepdims=True))

    def predict_proba(self, X):
        """``p(y = c | x) = sum_e g_e(x) p_e(c | x)`` ``[N, n_classes]``."""
        X = self._validated(X)
        proba_NC = np.einsum("ne,enc->nc", self._gate_proba(X), self._expert_proba(X))
        # Rounding can leave a row summing to 1 + 1e-16, which sklearn's log_loss refuses.
        proba_NC /= proba_NC.sum(axis=1, keepdims=True)
        return np.clip(proba_NC, 0.0, 1.0)

    def predict(self, X):
        """Most probable class ``[N]``."""
        proba_NC = self.predict_proba(X)
        return self.classes_[np.argmax(proba_NC, axis=1)]

    def sample(self, X, random_state=None):
        """Draw ``y ~ p(y | x)`` for each row of ``X``; returns ``(y [N], expert [N])``."""
        X = self._validated(X)
        rng = check_random_state(random_state)
        expert_N = self._sample_experts(X, rng)
        p_NC = self._expert_proba(X)[expert_N, np.arange(X.shape[0])]
        u = rng.random_sample((X.shape[0], 1))
        codes = np.minimum((p_NC.cumsum(axis=1) < u).sum(axis=1), self.classes_.size - 1)
        return self.classes_[codes], expert_N
