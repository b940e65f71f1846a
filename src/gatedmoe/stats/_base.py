"""The EM driver shared by `MoERegressor` and `MoEClassifier`: starts, restarts, re-seeding.

Shape legend as in `gatedmoe.stats.em`: N samples, P features, Q = P + 1, E experts.
"""

from __future__ import annotations

import numbers
import warnings
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import ThreadpoolController

from gatedmoe.stats import em
from gatedmoe.stats.gating import make_gate

INITS = ("kmeans", "random")
# Continuation for sparse gates: widths of the smoothed top-K mask (in logit units) and
# EM iterations at each.
ANNEAL_WIDTHS = (1.0, 0.4, 0.15, 0.05, 0.015, 0.005)
ANNEAL_ITER = 20
# ... then narrower widths (times ANNEAL_SHRINK, down to ANNEAL_MIN_WIDTH) until the smoothed
# and the hard mean log-likelihood at the same parameters differ by at most ANNEAL_GAP (the
# benchmark's slack per sample).
ANNEAL_SHRINK = 0.3
ANNEAL_MIN_WIDTH = 1e-5
ANNEAL_GAP = 1e-5
# Iterations of each EM run in a screening run of a sparse start (`_BaseMoE._sparse_runs`).
SCREEN_ITER = 3
# Jump search after a sparse fit (`_BaseMoE._jump_search`): the trial moves of each gate
# parameter (standardised features, logit units; both signs), coordinate sweeps per round,
# and at most this many rounds of search followed by hard EM.
JUMP_STEPS = 0.5 ** np.arange(1, 9)
JUMP_SWEEPS = 4
JUMP_ROUNDS = 3
PENALTIES = (None, "l1")
# Fewer samples per expert than this is refused at fit (ValueError naming n_experts).
MIN_SAMPLES_PER_EXPERT = 3
# Quasi-Newton fits (`_BaseMoE._quasi_newton`): L-BFGS's default bound on the largest
# gradient entry (per-sample scale; LogisticRegression's default tol is 1e-4 on the same
# quantity; a family may set its own `_QN_GTOL`), and its relative-change bound, set so
# small (LogisticRegression's 64 eps) that the gradient decides: a change in the
# objective below tol left gradients of 1.5e-4 on wine (a stall, not an optimum).
QN_GTOL = 1e-4
QN_FTOL = 64 * np.finfo(float).eps
QN_MAXCOR = 30
_THREADPOOLS = []


def _blas_one_thread():
    """A context limiting BLAS to one thread. The controller (which scans the loaded
    libraries: 1.7 ms, a twentieth of a small classifier fit) is built once per process,
    after numpy's and scipy's BLAS are loaded."""
    if not _THREADPOOLS:
        import scipy.linalg  # noqa: F401
        import scipy.optimize  # noqa: F401

        _THREADPOOLS.append(ThreadpoolController())
    return _THREADPOOLS[0].limit(limits=1, user_api="blas")


@dataclass
class _Run:
    """One EM run: its parameters and what it reached."""

    params: dict
    objective: float
    history: list = field(default_factory=list)
    converged: bool = False
    n_iter: int = 0


def em_converged(history, tol: float) -> bool:
    """Whether EM has converged, from its objective ``history`` (one value per iteration).

    The last change must be below ``tol``, and so must the gain still to come as Aitken's
    extrapolation of the (linearly converging) sequence predicts it (`em_gain_left`). EM
    crawling along a plateau has a rate near 1: small steps, a large predicted gain, so it is
    not declared converged there. A change below ``tol / 1000`` (EM at a fixed point)
    converges at once.
    """
    if len(history) < 2:
        return False
    d1 = history[-1] - history[-2]
    if not abs(d1) < tol:
        return False
    if abs(d1) <= 1e-3 * tol:
        return True
    if len(history) < 3:
        return False
    left = em_gain_left(history)
    return left is not None and left < tol


def _stall(history, tol: float) -> str:
    """Why a run that stopped at max_iter is not converged, for the warning."""
    d1 = abs(history[-1] - history[-2]) if len(history) >= 2 else float("nan")
    if not d1 < tol:
        return f"last change in mean log-likelihood {d1:.3g}, above tol={tol}"
    left = em_gain_left(history)
    if left is None or left == float("inf"):
        return f"last change in mean log-likelihood {d1:.3g}, below tol={tol}, but its steps are not shrinking"
    return (f"last change in mean log-likelihood {d1:.3g}, below tol={tol}, but Aitken's extrapolation "
            f"of the slowing steps puts {left:.3g} more still to come")


def em_gain_left(history) -> float | None:
    """The gain in the objective still to come, by Aitken's extrapolation of the last three
    values of ``history``: ``l_inf - l_t = d_t a / (1 - a)`` with ``a = d_t / d_{t-1}``
    (Boehning, Dietz, Schaub, Schlattmann & Lindsay 1994; McNicholas et al. 2010); 0.0 where
    the sequence stopped rising, inf where it is not slowing down, None with fewer than
    three values."""
    if len(history) < 3:
        return None
    d1, d0 = history[-1] - history[-2], history[-2] - history[-3]
    if d0 <= 0 or d1 < 0:
        return 0.0
    rate = d1 / d0
    if rate >= 1:
        return float("inf")
    return d1 * rate / (1.0 - rate)


def kmeans_labels(X_NP: np.ndarray, n_clusters: int, rng: np.random.RandomState, n_iter: int = 30) -> np.ndarray:
    """Lloyd's k-means from a k-means++ seeding; cluster labels ``[N]``.

    A few lines of numpy: sklearn's KMeans costs more in thread start-up than the whole
    clustering of a few thousand rows.
    """
    n = X_NP.shape[0]
    centers = [X_NP[rng.randint(n)]]
    d2_N = np.sum((X_NP - centers[0]) ** 2, axis=1)
    for _ in range(1, n_clusters):
        total = d2_N.sum()
        idx = rng.randint(n) if total <= 0 else rng.choice(n, p=d2_N / total)
        centers.append(X_NP[idx])
        d2_N = np.minimum(d2_N, np.sum((X_NP - X_NP[idx]) ** 2, axis=1))
    C_KP = np.array(centers)
    labels = np.zeros(n, dtype=np.int64)
    x2_N1 = (X_NP**2).sum(1)[:, None]
    for it in range(n_iter):
        d_NK = x2_N1 - 2 * X_NP @ C_KP.T + (C_KP**2).sum(1)[None, :]
        new = d_NK.argmin(axis=1)
        if it and np.array_equal(new, labels):
            break
        labels = new
        for c in range(n_clusters):
            members = labels == c
            if members.any():
                C_KP[c] = X_NP[members].mean(axis=0)
    return labels


class _BaseMoE(BaseEstimator, metaclass=ABCMeta):
    """Shared machinery; subclasses define the expert family through the abstract hooks
    below (as `sklearn.mixture._base.BaseMixture` does).

    ``params`` is a dict of float64 arrays: ``"W"`` the gate ``[Q_gate, E]`` plus the
    family's expert parameters. ``data`` is ``(F, Z, y)``: the gate design
    ``[N, Q_gate]``, the expert design ``[N, Q]`` and the encoded response. The gate (a
    `gatedmoe.stats.gating.StatsGate`) is passed to every EM step explicitly.
    """

    def __init__(
        self,
        n_experts=3,
        gate="softmax",
        k=None,
        temperature=1.0,
        penalty=None,
        alpha=0.0,
        n_init=3,
        max_iter=100,
        tol=1e-6,
        init="kmeans",
        init_subsample=5000,
        random_state=None,
        warm_start=False,
    ):
        self.n_experts = n_experts
        self.gate = gate
        self.k = k
        self.temperature = temperature
        self.penalty = penalty
        self.alpha = alpha
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.init = init
        self.init_subsample = init_subsample
        self.random_state = random_state
        self.warm_start = warm_start

    # ----------------------------------------------------------------- validation
    def _check_nonnegative(self, name):
        """ValueError unless the parameter ``name`` is a finite real number >= 0 (not a
        bool, NaN or infinity: an infinite penalty or tolerance gave NaN models)."""
        v = getattr(self, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (v >= 0 and np.isfinite(v)):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")

    def _check_params(self):
        def integer(name, low):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")

        integer("n_experts", 1)
        integer("n_init", 1)
        integer("max_iter", 1)
        # A deprecated gate name warns here, at fit (scikit-learn: validation at fit);
        # stacklevel points at the caller of fit().
        self._gate = make_gate(self.gate, self.n_experts, self.k, self.temperature, warn=True, stacklevel=5)
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {self.penalty!r}")
        self._check_nonnegative("alpha")
        if self.alpha != 0 and self.penalty != "l1":
            # Ignored silently, it would fit an unpenalised model the user did not ask for. A
            # warning, not an error: scikit-learn's check_regressors_train sets alpha=0.01 on
            # any regressor that has an alpha and expects the default fit to work.
            # stacklevel: _fit_em_single_thread, _fit_em, fit, then the caller of fit.
            warnings.warn(f"alpha={self.alpha!r} is used only with penalty='l1' and is ignored with "
                          f"penalty={self.penalty!r}", UserWarning, stacklevel=5)
        self._check_nonnegative("tol")
        if self.init not in self._INITS:
            raise ValueError(f"init must be one of {self._INITS}, got {self.init!r}")
        if self.init_subsample is not None and (
            isinstance(self.init_subsample, bool)
            or not isinstance(self.init_subsample, numbers.Integral)
            or self.init_subsample < 10
        ):
            raise ValueError(f"init_subsample must be None or an integer >= 10, got {self.init_subsample!r}")
        self._alpha = float(self.alpha) if self.penalty == "l1" else 0.0

    # ----------------------------------------------------------------- family hooks
    @abstractmethod
    def _kmeans_target(self, y):
        """Response features ``[N, C]`` that k-means clusters on together with ``x``."""

    @abstractmethod
    def _encode_y_predict(self, y, n):
        """Validate and encode ``y`` of ``n`` samples as ``fit`` does (after fit)."""

    @abstractmethod
    def _empty_params(self, Q, QF):
        """Starting parameters: ``"W"`` ``[QF, E]`` zeros and the experts' blocks."""

    @abstractmethod
    def _expert_log_density(self, Z, y, params):
        """``log p_e(y_n | x_n)`` ``[N, E]``."""

    @abstractmethod
    def _expert_mstep(self, Z, y, R, params, state):
        """Experts' M-step from responsibilities ``R`` ``[N, E]``: a dict of new blocks."""

    @abstractmethod
    def _expert_l1(self, params):
        """The experts' L1 penalty term (per-sample scale, without ``alpha``)."""

    @abstractmethod
    def _experts_coincide(self, data, params, e, f):
        """Whether experts ``e`` and ``f`` describe the same conditional distribution."""

    def _warn_support(self, n_samples, n_features):
        """Warn (before any work) when the experts have more parameters than the data."""

    @abstractmethod
    def _set_fitted(self, params):
        """Store ``params`` as the fitted attributes (ending in ``_``)."""

    @abstractmethod
    def _params_from_fitted(self):
        """The fitted attributes as a ``params`` dict."""

    @abstractmethod
    def _n_expert_parameters(self):
        """Free expert parameters counted by `bic` / `aic`."""

    # ----------------------------------------------------------------- gate pieces
    def _gate_mstep(self, gate, F, R, W, state, n_steps=1, log_expert=None):
        n_free = gate.n_free(self.n_experts)
        if n_free == 0:
            return W
        if self._alpha > 0:
            W, state["gate_L"] = em.l1_gate(
                F, R, W, n_free, gate, self._alpha, F.shape[0], state["gate_L"], n_steps=5 * n_steps
            )
            return W
        return gate.mstep(F, R, W, n_steps=n_steps, log_expert_NE=log_expert, l2=self._gate_l2(gate))

    def _gate_ridge(self):
        """Ridge on the gate's coefficients, total log-likelihood scale, standardised features."""
        return 0.0

    def _gate_l2(self, gate):
        """The gate ridge that applies to ``gate``: none for a top-1 gate (its likelihood is
        invariant to the scale of ``W``, so a ridge would only shrink it towards 0) or an L1 fit."""
        if self._alpha > 0 or (getattr(gate, "base", None) or gate).k == 1:
            return 0.0
        return self._gate_ridge()

    def _expert_ridge(self, params):
        """A family's fixed L2 penalty on its experts, total scale (none here)."""
        return 0.0

    def _ridge(self, params, n, gate):
        """All fixed L2 penalties on the per-sample scale."""
        pen = self._expert_ridge(params) + em.gate_ridge(params["W"], gate.n_free(self.n_experts), self._gate_l2(gate))
        return pen / n

    # ----------------------------------------------------------------- feature scale
    # The values of `init` this family accepts.
    _INITS = INITS
    # L-BFGS's gradient bound for `_lbfgs_run`.
    _QN_GTOL = QN_GTOL
    # (key, axis) of every parameter block whose axis runs over the design [x, 1].
    _DESIGN_AXES = (("W", 0),)
    def _quasi_newton(self, gate):
        """After how many EM iterations EM hands over to L-BFGS on the observed objective
        (see `_lbfgs_run`), or None for never (the default); a family that hands over
        defines `_objective_grad`."""
        return None

    def _objective_grad(self, data, params, gate):
        """The penalised mean log-likelihood and its gradient: ``(value, {key: grad})``
        (the gradient of every block, free or not); needed by `_quasi_newton` families."""
        raise NotImplementedError

    def _free_blocks(self, params, gate):
        """``{key: boolean mask}`` of the parameters L-BFGS moves."""
        W = np.zeros(params["W"].shape, dtype=bool)
        W[:, : gate.n_free(self.n_experts)] = True
        return {"W": W}

    def _lower_bounds(self, params):
        """``{key: lower bound}`` for L-BFGS (e.g. a variance floor); none by default."""
        return {}

    def _standardise(self, X):
        """Standardise the columns of ``X`` (kept for `_rescale`): the ridge, the L1 penalty,
        k-means and the gate's Newton steps then see comparable coefficients whatever the
        units of the features. Not for ``gate="modified_softmax"``, whose ``tanh(x)`` is
        defined on the features' own scale."""
        return self._standardised_design(X)[:, :-1]

    def _standardised_design(self, X):
        """``[standardise(X), 1]`` ``[N, Q]`` written into one new array (at n = 1e7 every
        extra copy of ``X`` is 0.8 GB per 10 features)."""
        n, p = X.shape
        self._shift, self._scale = np.zeros(p), np.ones(p)
        Z = np.empty((n, p + 1))
        Z[:, -1] = 1.0
        Z[:, :-1] = X
        if self._gate.name == "modified_softmax":
            return Z
        self._shift = X.mean(axis=0)
        Z[:, :-1] -= self._shift
        scale = np.sqrt(np.einsum("np,np->p", Z[:, :-1], Z[:, :-1]) / n)
        self._scale = np.where(scale > 1e-12 * (1.0 + np.abs(self._shift)), scale, 1.0)
        Z[:, :-1] /= self._scale
        return Z

    def _rescale(self, params, to_original):
        """Map parameters between standardised and original features: a linear term
        ``b . (x - m) / s + c`` is ``(b / s) . x + c - (b / s) . m``."""
        out = dict(params)
        for key, axis in self._DESIGN_AXES:
            A = np.moveaxis(params[key], axis, 0).copy()
            scale = self._scale.reshape((-1,) + (1,) * (A.ndim - 1))
            if to_original:
                A[:-1] /= scale
                A[-1] -= np.tensordot(self._shift, A[:-1], axes=1)
            else:
                A[-1] += np.tensordot(self._shift, A[:-1], axes=1)
                A[:-1] *= scale
            out[key] = np.moveaxis(A, 0, axis)
        return out

    def _start_params_from_fitted(self):
        """The previous fit as the parameters EM works with (a warm start), standardised."""
        return self._rescale(self._params_from_fitted(), to_original=False)

    def _l1_norm(self, params):
        if self._alpha == 0:
            return 0.0
        return float(np.abs(params["W"][:-1]).sum() + self._expert_l1(params))

    # ----------------------------------------------------------------- EM
    def _objective(self, data, params, gate):
        """E-step: responsibilities ``R`` ``[N, E]``, per-sample log-likelihoods ``ll_N`` and
        the penalised mean log-likelihood.

        Over blocks of `em.ESTEP_CHUNK` rows: every operation is row-wise, so the result is
        the whole-array one, but the [N, E] temporaries (logits, gate and expert
        log-densities, the joint) are block-sized and reused by the allocator instead of
        fresh arrays whose first touch page-faults (at N = 1e7 most of a fit's time was
        system time); only ``R`` and ``ll_N`` are N-sized.
        """
        F, Z, y = data
        n = F.shape[0]
        W = params["W"]
        if n <= em.ESTEP_CHUNK:
            R, ll_N = em.e_step(gate.log_probs(F @ W), self._expert_log_density(Z, y, params))
        else:
            R, ll_N = np.empty((n, W.shape[1])), np.empty(n)
            for lo in range(0, n, em.ESTEP_CHUNK):
                sl = slice(lo, lo + em.ESTEP_CHUNK)
                R[sl], ll_N[sl] = em.e_step(gate.log_probs(F[sl] @ W), self._expert_log_density(Z[sl], y[sl], params))
        return R, ll_N, float(ll_N.mean()) - self._alpha * self._l1_norm(params) - self._ridge(params, n, gate)

    def _mstep(self, data, R, params, state, gate, n_steps=1):
        F, Z, y = data
        new = dict(params)
        new.update(self._expert_mstep(Z, y, R, params, state))
        log_expert = None
        if gate.observed_step() and self._alpha == 0:
            # Sparse gate: step on the observed likelihood with the new experts (see
            # em.softmax_newton); still never lowers the likelihood.
            log_expert = self._expert_log_density(Z, y, new)
        new["W"] = self._gate_mstep(gate, F, R, params["W"], state, n_steps=n_steps, log_expert=log_expert)
        return new

    def _params_from_resp(self, data, R, state, W=None, gate=None):
        F, Z, _ = data
        gate = gate or self._gate
        params = self._empty_params(Z.shape[1], F.shape[1])
        if W is None:
            # First gate of a start: from W = 0 every logit ties and a top-K would drop
            # the same experts everywhere; fit the dense gate to the start's clusters.
            gate = gate.dense_starts()[0]
        else:
            params["W"] = W
        return self._mstep(data, R, params, state, gate, n_steps=5)

    def _em(self, data, params, state, gate=None, max_iter=None):
        gate = gate or self._gate
        max_iter = max_iter or self.max_iter
        quasi = self._quasi_newton(gate)
        R, ll_N, obj = self._objective(data, params, gate)
        history = [obj]
        converged = False
        n_iter = 0
        for n_iter in range(1, (max_iter if quasi is None else min(max_iter, quasi)) + 1):  # noqa: B007
            params = self._mstep(data, R, params, state, gate)
            R, ll_N, obj = self._objective(data, params, gate)
            history.append(obj)
            if em_converged(history, self.tol):
                converged = True
                break
        if quasi is not None and not converged and n_iter < max_iter:
            params, more, converged = self._lbfgs_run(data, params, gate, max_iter - n_iter)
            R, ll_N, obj = self._objective(data, params, gate)
            if more:
                # L-BFGS's last value, recomputed by the E-step that gives R.
                history += [*more[:-1], obj]
            n_iter += len(more)
        run = _Run(params, obj, history, converged, n_iter)
        run.R, run.ll_N = R, ll_N
        return run

    def _lbfgs_run(self, data, params, gate, max_iter):
        """L-BFGS on the penalised observed log-likelihood from ``params`` (the free blocks
        of `_free_blocks`; gradient from `_objective_grad`).

        EM converges linearly, at a rate set by the missing information: a gate or an
        expert that fades out of the mixture makes it crawl for hundreds of iterations
        (breast cancer: 310), and its Newton M-steps for many classes are costly. A
        quasi-Newton method on the likelihood itself converges superlinearly; it takes over
        after the family's EM iterations (`_quasi_newton`: 0 for the classifier, 30 for the
        regressor), the EM/quasi-Newton hybrid of Jamshidian & Jennrich (1997). Its line
        search only accepts steps that raise the objective, so the recorded history stays
        monotone. Returns ``(params, history, converged)``: one objective per L-BFGS
        iteration; converged when the largest gradient entry is below ``_QN_GTOL``, or
        L-BFGS stopped in its line search (rounding at the optimum) with `em_converged`
        true on the history.
        """
        from scipy.optimize import minimize

        masks = self._free_blocks(params, gate)
        keys = sorted(masks)

        def unflat(theta):
            out, i = dict(params), 0
            for k in keys:
                block = params[k].copy()
                m = int(masks[k].sum())
                block[masks[k]] = theta[i : i + m]
                out[k] = block
                i += m
            return out

        def fun(theta):
            value, grads = self._objective_grad(data, unflat(theta), gate)
            if not np.isfinite(value):
                return np.inf, np.zeros_like(theta)
            return -value, -np.concatenate([grads[k][masks[k]] for k in keys])

        history = []
        theta0 = np.concatenate([params[k][masks[k]] for k in keys])
        lower = self._lower_bounds(params)
        bounds = None
        if lower:
            low = np.concatenate([np.broadcast_to(lower.get(k, -np.inf), params[k].shape)[masks[k]] for k in keys])
            bounds = [(lo if np.isfinite(lo) else None, None) for lo in low]
            theta0 = np.maximum(theta0, low)
        res = minimize(fun, theta0, jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": max_iter, "ftol": QN_FTOL, "gtol": self._QN_GTOL, "maxcor": QN_MAXCOR},
                       callback=lambda intermediate_result: history.append(-float(intermediate_result.fun)))
        if not (np.all(np.isfinite(res.x)) and -res.fun >= -fun(theta0)[0]):
            return params, [], False
        converged = res.status == 0 or (res.status == 2 and em_converged(history, self.tol))
        return unflat(res.x), history, converged

    def _degenerate_expert(self, data, run):
        """An expert to re-seed: one with almost no weight, or a duplicate of another."""
        R = run.R
        n = R.shape[0]
        weight_E = R.sum(axis=0)
        if self.n_experts == 1 or n < 2 * self.n_experts:
            return None
        tiny = np.flatnonzero(weight_E < max(1.0, 1e-3 * n))
        if tiny.size:
            return int(tiny[0])
        for e in range(self.n_experts):
            for f in range(e + 1, self.n_experts):
                if self._experts_coincide(data, run.params, e, f):
                    return f if weight_E[f] <= weight_E[e] else e
        return None

    def _reseed(self, data, run, e, state, gate):
        """Give expert ``e`` the worst-explained samples and restart EM from there."""
        R = run.R.copy()
        n = R.shape[0]
        m = max(n // self.n_experts, min(n, data[1].shape[1] + 2))
        worst = np.argsort(run.ll_N)[:m]
        R[:, e] = 0.0
        R /= np.maximum(R.sum(axis=1, keepdims=True), 1e-300)
        R[worst] = 0.0
        R[worst, e] = 1.0
        return self._em(data, self._params_from_resp(data, R, state, W=run.params["W"], gate=gate), state, gate)

    def _sparse_runs(self, data, params, state, widths, short=False):
        """Hard top-K EM from ``params`` and from the end of a continuation over the
        smoothed gate's ``widths``; the better run. ``short``: the screening run of
        `_sparse_starts` (every other width, each EM capped at `SCREEN_ITER` iterations)."""
        gate = self._gate
        cap = SCREEN_ITER if short else None
        hard = self._em(data, params, state, gate, max_iter=cap)
        for width in widths[::2] if short else widths:
            smooth = self._em(data, params, state, gate.smoothed(width), max_iter=cap or ANNEAL_ITER)
            params = smooth.params
        annealed = self._em(data, params, state, gate, max_iter=cap)
        best = annealed if annealed.objective > hard.objective else hard
        # The smoothed likelihood approximates the hard one only when few samples lie within
        # a width of a selection boundary: at n = 1e5 the end of the schedule was still 62
        # units from the hard likelihood at the same parameters, and hard EM from there
        # ended 62 units short of the truth-started fit. Keep narrowing until they agree,
        # and run hard EM from there too (a third candidate: from the end of the fixed
        # schedule hard EM was sometimes the better, top-2 sigmoid at n = 1e5).
        narrowed = False
        while (not short and width > ANNEAL_MIN_WIDTH
               and abs(smooth.objective - self._objective(data, params, gate)[2]) > ANNEAL_GAP):
            width *= ANNEAL_SHRINK
            smooth = self._em(data, params, state, gate.smoothed(width), max_iter=ANNEAL_ITER)
            params, narrowed = smooth.params, True
        if narrowed:
            cand = self._em(data, params, state, gate)
            if cand.objective > best.objective:
                best = cand
        return best

    def _sparse_starts(self, data, params, state):
        """Starting points of a sparse fit from one start's ``params``: EM with each of the
        gate's dense counterparts (`StatsGate.dense_starts`), mapped onto the sparse gate
        (`StatsGate.from_dense`). A top-K gate gives zero responsibility to the experts it
        drops, so EM alone can never move an expert into a region it is dropped from, and
        the hard gate's likelihood is piecewise constant in the selection: the dense gate
        comes first, then a continuation shrinks a smoothed top-K mask towards the hard one."""
        gate = self._gate
        out = []
        for dense in gate.dense_starts():
            start = self._em(data, params, state, dense).params
            log_expert = self._expert_log_density(data[1], data[2], start)
            out += [dict(start, W=W) for W in gate.from_dense(start["W"], data[0], dense, log_expert)]
        return out

    def _jump_search(self, data, run, state):
        """Move a sparse gate's selection boundaries past the likelihood's jumps.

        The hard top-K likelihood is discontinuous in the gate (`em.coordinate_gate_search`):
        EM stops at the first jump that would lower it. Rounds of a coordinate search on
        the gate (experts fixed), then (``k > 1``) L-BFGS on the gate restricted to moves
        that keep every selection boundary in place (`em.pinned_gate_ascent`: at large n
        the walls are so dense that no other step gets far), each round followed by hard
        EM from its result, until a round gains less than ``tol`` per sample. Every step
        is monotone, so the run returned is never worse than ``run``.
        """
        gate = self._gate
        if not gate.sparse or self._alpha > 0:
            return run
        F, Z, y = data
        n = F.shape[0]
        n_free = gate.n_free(self.n_experts)
        for _ in range(JUMP_ROUNDS):
            log_expert = self._expert_log_density(Z, y, run.params)
            W, _ = em.coordinate_gate_search(F, run.params["W"], n_free, gate, log_expert, JUMP_STEPS,
                                             l2=self._gate_l2(gate), min_gain=self.tol * n, max_sweeps=JUMP_SWEEPS)
            if gate.k > 1:
                # Top-1 has no smooth part (its weights are 0 or 1), so nothing to climb.
                W, _ = em.pinned_gate_ascent(F, W, n_free, gate, log_expert, l2=self._gate_l2(gate))
            cand = self._em(data, dict(run.params, W=W), state, gate)
            gain = cand.objective - run.objective
            if gain > 0:
                run = cand
            if not gain > self.tol:
                break
        return run

    def _fit_start(self, data, params, state, sparse_start=False):
        """One start: EM (for a sparse gate, ``params`` is one of `_sparse_starts` and runs
        `_sparse_runs`), then up to two re-seedings of a degenerate expert."""
        gate = self._gate
        if sparse_start:
            run = self._sparse_runs(data, params, state, ANNEAL_WIDTHS)
        else:
            run = self._em(data, params, state, gate)
        for _ in range(2):
            e = self._degenerate_expert(data, run)
            if e is None:
                break
            cand = self._reseed(data, run, e, state, gate)
            if not cand.objective > run.objective:
                break
            run = cand
        return run

    def _refine(self, data, params, state):
        """Refine a subsample's best start on all data."""
        if self._gate.sparse:
            # The selection boundary of a sparse gate moves only under the smoothed gate:
            # repeat the narrow end of the continuation on all data.
            return self._sparse_runs(data, params, state, ANNEAL_WIDTHS[-3:])
        return self._fit_start(data, params, state)

    def _initial_resp(self, X, y_feat, rng, y_weighted=False):
        n = X.shape[0]
        E = self.n_experts
        if self.init == "random":
            return rng.dirichlet(np.ones(E), size=n)
        joint = np.hstack([X, y_feat])
        scale = joint.std(axis=0)
        joint = (joint - joint.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
        if y_weighted:
            # Give the response as much weight as all features together: with many features
            # (p >> n above all) distances in x alone are noise and the clusters meaningless.
            joint[:, X.shape[1]:] *= np.sqrt(max(X.shape[1], 1) / y_feat.shape[1])
        labels = kmeans_labels(joint, E, rng)
        R = np.zeros((n, E))
        R[np.arange(n), labels] = 1.0
        return R

    def _start_params(self, data, rng, start, state):
        """Parameters of start number ``start``: an M-step from the clusters of `init`."""
        # Penalised fits (meant for p >> n) alternate plain and response-weighted k-means:
        # with many features only the weighted one finds the experts.
        weighted = self._alpha > 0 and start % 2 == 1
        R0 = self._initial_resp(data[1][:, :-1], self._kmeans_target(data[2]), rng, y_weighted=weighted)
        return self._params_from_resp(data, R0, state)

    def _fit_em(self, X, y):
        """Validate, run all starts, keep the best; set the fitted attributes."""
        # EM's products are tall and thin ([N, P+1] with small P): one BLAS thread is as
        # fast, and on a busy machine idle-spinning BLAS threads made fits 3-4x slower.
        with _blas_one_thread():
            return self._fit_em_single_thread(X, y)

    def _fit_em_single_thread(self, X, y):
        self._check_params()
        # The expert design [x, 1] on standardised features; X becomes a view of it.
        Z = self._standardised_design(X)
        X = Z[:, :-1]
        n = X.shape[0]
        if n < self.n_experts:
            raise ValueError(
                f"n_samples={n} is fewer than n_experts={self.n_experts}: a mixture needs at least "
                "one sample per expert"
            )
        need = MIN_SAMPLES_PER_EXPERT * self.n_experts
        if n < need:
            # Far more experts than the data supports runs EM for minutes (100 experts on
            # 300 rows: 217 s) to fit noise; refuse it before any work.
            raise ValueError(
                f"n_experts={self.n_experts} is more than n_samples={n} can support: a mixture needs "
                f"at least {MIN_SAMPLES_PER_EXPERT} samples per expert ({need} here). Use n_experts <= "
                f"{max(1, n // MIN_SAMPLES_PER_EXPERT)}, or choose it with gatedmoe.stats.select_n_experts"
            )
        self._warn_support(n, X.shape[1])
        rng = check_random_state(self.random_state)
        # Gates whose features are x itself share the experts' design (one array, not two).
        F = Z if self._gate.features_are_x else self._gate.design(X)
        data = (F, Z, y)
        state = self._new_state()
        if self.warm_start and self._warm_start_fits(X):
            best = self._jump_search(data, self._em(data, self._start_params_from_fitted(), state), state)
        else:
            sub = None
            if self.init_subsample is not None and n > self.init_subsample:
                sub = np.sort(rng.choice(n, self.init_subsample, replace=False))
            sdata = data if sub is None else (F[sub], Z[sub], y[sub])
            best = None
            if self._gate.sparse:
                # Short runs first (Biernacki, Celeux & Govaert 2003): every start's
                # starting points are screened by a capped run, and only the best is run in
                # full; the pipelines' likelihoods differ by 5-100 units between basins
                # (a plateau of the sigmoid's exponential regime), which a short run shows.
                cands = [c for start in range(self.n_init)
                         for c in self._sparse_starts(sdata, self._start_params(sdata, rng, start, state), state)]
                scores = [self._sparse_runs(sdata, c, state, ANNEAL_WIDTHS, short=True).objective for c in cands]
                best = self._fit_start(sdata, cands[int(np.argmax(scores))], state, sparse_start=True)
            for start in range(0 if self._gate.sparse else self.n_init):
                run = self._fit_start(sdata, self._start_params(sdata, rng, start, state), state)
                if best is None or run.objective > best.objective:
                    best = run
            if sub is not None:
                best = self._refine(data, best.params, state)
            best = self._jump_search(data, best, state)
        if not best.converged:
            warnings.warn(
                f"EM did not converge in max_iter={self.max_iter} iterations ({_stall(best.history, self.tol)}). "
                "Increase max_iter, loosen tol, standardise the features, or try fewer experts "
                "(a separable gate or a redundant expert makes EM crawl).",
                ConvergenceWarning,
                stacklevel=3,
            )
        self._set_fitted(best.params)
        # Everything read after fit (predict, loglik, bic, sample) reads the settings fitted
        # with: the number of experts, the gate (its name, k and temperature) and the penalty.
        # Never the hyper-parameters, which describe the next fit: `set_params` may have
        # changed them without a refit.
        self.n_experts_, self.gate_, self.penalty_ = self.n_experts, self._gate, self.penalty
        if self._gate.k == 1:
            # Top-1: g is the indicator of the largest logit, unchanged when W is scaled by
            # any c > 0 (the continuation would otherwise leave an arbitrary, large scale).
            c = max(float(np.abs(self._gate_W()).max()), 1e-300)
            self.gate_coef_, self.gate_intercept_ = self.gate_coef_ / c, self.gate_intercept_ / c
        self.converged_ = best.converged
        self.n_iter_ = best.n_iter
        self.lower_bound_ = best.objective
        self.log_likelihood_history_ = np.asarray(best.history)
        return self

    def _warm_start_fits(self, X):
        """Whether a previous fit exists whose parameter shapes match this data."""
        if not hasattr(self, "expert_intercept_"):
            return False
        params = self._params_from_fitted()
        empty = self._empty_params(X.shape[1] + 1, self._gate.design(X[:1]).shape[1])
        return all(params[key].shape == empty[key].shape for key in empty)

    def _new_state(self):
        return {"gate_L": 1.0, "expert_L": np.ones(self.n_experts)}

    # ----------------------------------------------------------------- public helpers
    def _gate_W(self):
        return np.vstack([self.gate_coef_.T, self.gate_intercept_[None, :]])

    def _gate_proba(self, X):
        gate = self.gate_
        return gate.probs(gate.design(X) @ self._gate_W())

    def _validated(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return X

    def _log_joint(self, X, y):
        """``log g_e(x) + log p_e(y|x)`` ``[N, E]`` on validated inputs."""
        params = self._params_from_fitted()
        gate = self.gate_
        logg = gate.log_probs(gate.design(X) @ params["W"])
        return logg + self._expert_log_density(em.add_intercept(X), y, params)

    def predict_expert_proba(self, X, y=None):
        """Gate probabilities ``g(x)`` ``[N, E]``, or with ``y`` the posterior
        ``p(expert | x, y)`` (the EM responsibilities)."""
        X = self._validated(X)
        if y is None:
            return self._gate_proba(X)
        y = self._encode_y_predict(y, X.shape[0])
        R, _ = em.e_step(np.zeros((X.shape[0], self.n_experts_)), self._log_joint(X, y))
        return R

    def loglik(self, X, y):
        """Total log-likelihood ``sum_n log p(y_n | x_n)`` under the fitted model (float)."""
        X = self._validated(X)
        y = self._encode_y_predict(y, X.shape[0])
        from scipy.special import logsumexp

        return float(logsumexp(self._log_joint(X, y), axis=1).sum())

    def n_parameters(self):
        """Free parameters counted by `bic`/`aic` (non-zero coefficients under ``penalty="l1"``)."""
        check_is_fitted(self)
        W = self._gate_W()[:, : self.gate_.n_free(self.n_experts_)]
        n_gate = int(np.count_nonzero(W[:-1])) + W.shape[1] if self.penalty_ == "l1" else W.size
        return n_gate + self._n_expert_parameters()

    def bic(self, X, y):
        """Bayesian information criterion ``-2 loglik + n_params log n`` (lower is better)."""
        n = np.asarray(X).shape[0] if hasattr(X, "shape") else len(X)
        return -2.0 * self.loglik(X, y) + self.n_parameters() * np.log(n)

    def aic(self, X, y):
        """Akaike information criterion ``-2 loglik + 2 n_params`` (lower is better)."""
        return -2.0 * self.loglik(X, y) + 2.0 * self.n_parameters()

    def _sample_experts(self, X, rng):
        g = self._gate_proba(X)
        u = rng.random_sample((X.shape[0], 1))
        return np.minimum((g.cumsum(axis=1) < u).sum(axis=1), self.n_experts_ - 1)
