"""The gates of the statistical MoE literature: one table entry per gate, numpy float64.

Every gate maps gate scores (logits) ``l = beta . z(x) + beta0`` of shape ``[N, E]`` to
weights ``g(x)`` on the simplex. ``z(x) = x`` except for ``"modified_softmax"``.
Shape legend: N samples, P features, Q = P + 1, E experts.

=======================  ==================================================================
name (deep registry)     g_e(x)
=======================  ==================================================================
``softmax``              ``exp(l_e) / sum_j exp(l_j)`` (Jordan & Jacobs 1994; Nguyen, Nguyen
                         & Ho 2023, "Demystifying softmax gating function in Gaussian MoE")
``temperature_softmax``  ``softmax(l / tau)_e`` with a fixed temperature ``tau`` (Nguyen et
                         al. 2024, "Is temperature sample efficient for softmax Gaussian MoE?")
``topk_softmax``         ``softmax(TopK(l, K))_e``: logits outside the K largest are set to
                         ``-inf`` (Nguyen, Akbarian, Yan & Ho 2024, "Statistical perspective
                         of top-K sparse softmax gating MoE"; the same as Shazeer et al. 2017)
``sigmoid``              ``s_e / sum_j s_j`` with ``s = sigmoid(l)``, optionally over the top K
                         (Nguyen et al. 2024, "Sigmoid gating is more sample efficient than
                         softmax gating"; normalised as in DeepSeek-V3 so that ``p(y|x)`` is
                         a density: the paper's unnormalised weights define a regression
                         function, not a mixture likelihood)
``modified_softmax``     ``softmax(beta . tanh(x) + beta0)_e`` (Nguyen, Akbarian, Nguyen & Ho
                         2024, "A general theory for softmax gating multinomial logistic MoE":
                         a bounded transform of the input before the gate)
=======================  ==================================================================

The names are those of `gatedmoe.gates.names()`; the older ``"topk"`` and
``"temperature"`` are aliases that emit a ``FutureWarning`` where a user passes them.

Softmax-family gates are invariant to adding one vector to every expert's parameters, so
the fitted parameters fix the last expert's gate at zero; the normalised sigmoid gate is
not, and all its experts' parameters are free.

The math is numpy only (no torch): the estimators must not load the deep stack. That it
gives the same numbers as `gatedmoe.gates.functional` is a test
(``tests/stats/test_gating.py``).

>>> import numpy as np
>>> g = make_gate("topk_softmax", n_experts=3, k=2)
>>> np.exp(g.log_probs(np.array([[0.0, 1.0, 2.0]]))).round(3)
array([[0.   , 0.269, 0.731]])
"""

from __future__ import annotations

import numbers
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
from scipy.special import expit, log_expit

from gatedmoe.stats import em
from gatedmoe.stats.em import expected_log, log_softmax_rows, logsumexp_rows, row_sum

__all__ = [
    "GATES",
    "GATE_ALIASES",
    "StatsGate",
    "SoftmaxGate",
    "TemperatureSoftmaxGate",
    "TopKSoftmaxGate",
    "SigmoidGate",
    "ModifiedSoftmaxGate",
    "make_gate",
    "check_gate",
    "gate_features",
    "gate_log_probs",
    "gate_probs",
    "gate_logit_grad",
    "n_free_gate_experts",
    # numeric helpers, re-exported from em for older callers
    "expected_log",
    "log_softmax_rows",
    "logsumexp_rows",
    "row_sum",
]


SIGMOID_START_SCALES = (0.5, 1.0, 2.0)
SIGMOID_START_SHIFTS = (-4.0, -2.0, 0.0, 2.0, 4.0, 8.0, 16.0)


def _topk_mask(scores_NE: np.ndarray, k: int) -> np.ndarray:
    # Ties are broken towards the lower index, as torch.topk does on CPU for equal values.
    order_NE = np.argsort(-scores_NE, axis=1, kind="stable")
    mask_NE = np.zeros(scores_NE.shape, dtype=bool)
    np.put_along_axis(mask_NE, order_NE[:, :k], True, axis=1)
    return mask_NE


@dataclass(frozen=True)
class StatsGate(ABC):
    """One gate of the table, bound to its options.

    ``k``: experts kept per input (None: all); ``temperature``: the fixed temperature.
    Subclasses set ``name`` and override the math; only gates with ``takes_k`` /
    ``takes_temperature`` accept those options (`make_gate` checks).
    """

    k: int | None = None
    temperature: float = 1.0

    name: ClassVar[str] = ""
    takes_k: ClassVar[bool] = False
    # Without k the gate would silently be another gate (top-K of all = softmax).
    requires_k: ClassVar[bool] = False
    takes_temperature: ClassVar[bool] = False

    # ---------------------------------------------------------------- features
    def features(self, X_NP: np.ndarray) -> np.ndarray:
        """The gate's input ``z(x)`` ``[N, P]``."""
        return X_NP

    @property
    def features_are_x(self) -> bool:
        """Whether `features` is the identity (the gate's design is then the experts')."""
        return type(self).features is StatsGate.features

    def design(self, X_NP: np.ndarray) -> np.ndarray:
        """``[z(x), 1]`` ``[N, Q]``: logits are ``design(X) @ W_QE``."""
        return em.add_intercept(self.features(X_NP))

    # ---------------------------------------------------------------- probabilities
    @abstractmethod
    def log_probs(self, logits_NE: np.ndarray) -> np.ndarray:
        """``log g(x)`` ``[N, E]`` float64; ``-inf`` for experts a top-K drops."""

    def probs(self, logits_NE: np.ndarray) -> np.ndarray:
        """``g(x)`` ``[N, E]`` float64, rows on the simplex."""
        return np.exp(self.log_probs(logits_NE))

    @abstractmethod
    def logit_grad(self, logits_NE: np.ndarray, targets_NE: np.ndarray) -> tuple[float, np.ndarray]:
        """Value and gradient in the logits of ``Q(l) = sum_ne t_ne log g_ne(l)``.

        ``targets_NE`` are non-negative (EM responsibilities, or weighted one-hot labels);
        entries where ``g = 0`` (dropped by a top-K) must have zero target. A top-K
        selection is held fixed in the gradient (it is piecewise constant).
        Returns ``(Q, dQ/dl [N, E])``.
        """

    # ---------------------------------------------------------------- parameters
    def n_free(self, n_experts: int) -> int:
        """Experts whose gate parameters are free (softmax family: the last is fixed at 0)."""
        return n_experts - 1

    @property
    def sparse(self) -> bool:
        """Whether the gate drops experts (a top-K with K below the number of experts)."""
        return self.k is not None

    def dense(self) -> StatsGate:
        """The same gate keeping every expert (what a sparse fit starts from)."""
        return replace(self, k=None)

    def dense_starts(self) -> tuple[StatsGate, ...]:
        """Dense gates a sparse fit starts from (each followed by the continuation)."""
        return (self.dense(),)

    def from_dense(self, W_QE: np.ndarray, F_NQ: np.ndarray, dense: StatsGate, log_expert_NE=None) -> list:
        """Starting gate parameters for this gate from a fit of the dense start ``dense``
        (a list: each is refined, the best kept); ``log_expert_NE`` ``[N, E]``, the dense
        fit's expert log-densities, lets a gate choose among mappings."""
        return [W_QE]

    def smoothed(self, width: float) -> StatsGate:
        """A dense, differentiable stand-in for a sparse gate: its top-K mask replaced by
        ``sigmoid((l_e - t(x)) / width)`` (see `SmoothedTopKGate`); the hard gate as
        ``width -> 0``."""
        return SmoothedTopKGate(k=None, base=self, width=float(width))

    # The gate's unnormalised log-scores ``a(l)`` (``g = softmax(a)`` over the kept
    # experts) and their elementwise derivative; used by the smoothed top-K.
    def log_scores(self, logits_NE: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"gate {self.name!r} has no top-K form")

    def dlog_scores(self, logits_NE: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"gate {self.name!r} has no top-K form")

    # ---------------------------------------------------------------- M-step
    def mstep(self, F_NQ, R_NE, W_QE, n_steps=1, log_expert_NE=None, l2=0.0) -> np.ndarray:
        """Gate M-step: increase ``sum_ne r_ne log g_ne(F W)`` from ``W_QE`` (never lower it).

        ``log_expert_NE`` (used by gates whose ``Q`` cannot move a top-K selection) asks
        for a step on the observed likelihood with the experts fixed instead; ``l2`` a
        ridge on the coefficients (softmax family). Returns the new ``W_QE``; the columns
        past ``n_free`` stay as they are.
        """
        n_free = self.n_free(W_QE.shape[1])
        if n_free == 0:
            return W_QE
        return em.softmax_newton(F_NQ, R_NE, W_QE, n_free, self, n_steps=n_steps, log_expert_NE=log_expert_NE,
                                 l2=l2)[0]

    def observed_step(self) -> bool:
        """Whether the M-step should climb the observed likelihood (see `mstep`)."""
        return False


@dataclass(frozen=True)
class SoftmaxGate(StatsGate):
    """``softmax(l)`` (Jordan & Jacobs 1994)."""

    name: ClassVar[str] = "softmax"

    # Softmax-family gates scale the logits by this before the softmax.
    @property
    def logit_scale(self) -> float:
        return 1.0

    def log_scores(self, logits_NE):
        return logits_NE * self.logit_scale

    def dlog_scores(self, logits_NE):
        return np.full(logits_NE.shape, self.logit_scale)

    def log_probs(self, logits_NE):
        logits_NE = np.asarray(logits_NE, dtype=np.float64)
        if self.logit_scale != 1.0:
            logits_NE = logits_NE * self.logit_scale
        if self.k is not None:
            logits_NE = np.where(_topk_mask(logits_NE, self.k), logits_NE, -np.inf)
        return log_softmax_rows(logits_NE)

    def logit_grad(self, logits_NE, targets_NE):
        logg_NE = self.log_probs(logits_NE)
        w_N1 = row_sum(targets_NE)[:, None]
        grad_NE = targets_NE - w_N1 * np.exp(logg_NE)
        if self.logit_scale != 1.0:
            grad_NE = grad_NE * self.logit_scale
        return expected_log(targets_NE, logg_NE), grad_NE


@dataclass(frozen=True)
class TemperatureSoftmaxGate(SoftmaxGate):
    """``softmax(l / temperature)`` with a fixed temperature (Nguyen et al. 2024)."""

    name: ClassVar[str] = "temperature_softmax"
    takes_temperature: ClassVar[bool] = True

    @property
    def logit_scale(self) -> float:
        return 1.0 / self.temperature


@dataclass(frozen=True)
class TopKSoftmaxGate(SoftmaxGate):
    """Softmax over the K largest logits (Nguyen, Akbarian, Yan & Ho 2024)."""

    name: ClassVar[str] = "topk_softmax"
    takes_k: ClassVar[bool] = True
    requires_k: ClassVar[bool] = True

    def dense(self):
        return SoftmaxGate()

    def observed_step(self):
        # A dropped expert has zero responsibility, so Q is -inf as soon as a step changes
        # the selection: the gate climbs the observed likelihood instead.
        return self.k is not None


@dataclass(frozen=True)
class ModifiedSoftmaxGate(SoftmaxGate):
    """``softmax(beta . tanh(x) + beta0)`` (Nguyen, Akbarian, Nguyen & Ho 2024)."""

    name: ClassVar[str] = "modified_softmax"

    def features(self, X_NP):
        return np.tanh(X_NP)


@dataclass(frozen=True)
class SigmoidGate(StatsGate):
    """Normalised sigmoid gate ``s_e / sum_j s_j`` over the kept experts (Nguyen et al. 2024)."""

    name: ClassVar[str] = "sigmoid"
    takes_k: ClassVar[bool] = True

    def log_probs(self, logits_NE):
        logits_NE = np.asarray(logits_NE, dtype=np.float64)
        logs_NE = log_expit(logits_NE)
        if self.k is not None:
            logs_NE = np.where(_topk_mask(logits_NE, self.k), logs_NE, -np.inf)
        return log_softmax_rows(logs_NE)

    def logit_grad(self, logits_NE, targets_NE):
        logg_NE = self.log_probs(logits_NE)
        g_NE = np.exp(logg_NE)
        w_N1 = row_sum(targets_NE)[:, None]
        s_NE = expit(logits_NE)
        if self.k is not None:
            s_NE = np.where(np.isfinite(logg_NE), s_NE, 0.0)
        # d log g_e / d l_j = (1 - s_j) (delta_ej - g_j) on the kept set.
        grad_NE = (1.0 - s_NE) * (targets_NE - w_N1 * g_NE)
        return expected_log(targets_NE, logg_NE), grad_NE

    def n_free(self, n_experts):
        return n_experts

    def log_scores(self, logits_NE):
        return log_expit(logits_NE)

    def dense_starts(self):
        # The dense sigmoid saturates (sigmoid(10) ~ sigmoid(9)), so its logits' order can
        # say little about which experts to keep; softmax weights follow the order of the
        # logits, but put the fit in the unsaturated regime (below). Top-1 needs only the
        # order; top-K (K > 1) starts from both and keeps the better.
        return (SoftmaxGate(),) if self.k == 1 else (SoftmaxGate(), SigmoidGate())

    def from_dense(self, W_QE, F_NQ, dense, log_expert_NE=None):
        if not isinstance(dense, SoftmaxGate):
            return [W_QE]
        # sigmoid(l - c) ~ exp(l - c) when l - c << 0: the normalised sigmoid gate of the
        # shifted logits is (almost) the softmax gate of the logits, the selection the same.
        W_QE = W_QE.copy()
        W_QE[-1] -= (F_NQ @ W_QE).max() + 4.0
        if log_expert_NE is None or self.k == 1:
            return [W_QE]
        # That maps the softmax fit into the sigmoid's exponential regime, where a common
        # shift of the logits barely changes the gate: a plateau EM leaves slowly, although
        # a top-K sigmoid truth often lives in the saturated regime (issue 19: 45 units
        # short). Also start from the scale and shift of the logits that the hard gate's
        # likelihood, experts fixed, prefers (a cheap criterion: one E-step per candidate;
        # the exponential-regime map is one of the candidates).
        best, best_ll = None, logsumexp_rows(self.log_probs(F_NQ @ W_QE) + log_expert_NE).sum()
        for a in SIGMOID_START_SCALES:
            for m in SIGMOID_START_SHIFTS:
                W = a * W_QE
                W[-1] += m - (F_NQ @ W).max()
                ll = logsumexp_rows(self.log_probs(F_NQ @ W) + log_expert_NE).sum()
                if ll > best_ll:
                    best, best_ll = W, ll
        return [W_QE if best is None else best]

    def dlog_scores(self, logits_NE):
        return expit(-logits_NE)

    def mstep(self, F_NQ, R_NE, W_QE, n_steps=1, log_expert_NE=None, l2=0.0):
        n_free = self.n_free(W_QE.shape[1])
        if log_expert_NE is not None:
            return em.observed_lbfgs_gate(F_NQ, W_QE, n_free, self, log_expert_NE, maxiter=10 * n_steps, l2=l2)[0]
        return em.lbfgs_gate(F_NQ, R_NE, W_QE, n_free, self, maxiter=10 * n_steps, l2=l2)[0]

    def observed_step(self):
        # As for the top-K softmax: Q cannot move a selection, the observed likelihood can.
        return self.k is not None


@dataclass(frozen=True)
class SmoothedTopKGate(StatsGate):
    """A top-K gate with its hard mask smoothed, for continuation (not a user gate).

    ``g_e = m_e exp(a_e) / sum_j m_j exp(a_j)`` with the base gate's log-scores ``a``
    (``l`` for softmax, ``log sigmoid(l)`` for sigmoid) and the soft mask
    ``m_e = sigmoid((l_e - t) / width)``, ``t(x)`` midway between the K-th and the
    (K+1)-th largest logit. Every expert keeps a positive weight, so EM's gate step sees
    (and can move) the selection boundary, which the hard top-K likelihood, piecewise
    constant in the selection, hides from any gradient; as ``width -> 0`` it is the hard
    gate. ``t`` is continuous and piecewise linear in ``l``, so the gradient below is exact
    almost everywhere.
    """

    base: StatsGate | None = None
    width: float = 1.0

    name: ClassVar[str] = "smoothed_topk"

    def features(self, X_NP):
        return self.base.features(X_NP)

    def n_free(self, n_experts):
        return self.base.n_free(n_experts)

    @property
    def sparse(self):
        return False

    def _parts(self, logits_NE):
        logits_NE = np.asarray(logits_NE, dtype=np.float64)
        K = self.base.k
        # Indices of the K-th and (K+1)-th largest logit per row.
        idx_N2 = np.argpartition(-logits_NE, (K - 1, K), axis=1)[:, K - 1 : K + 1]
        t_N = 0.5 * np.take_along_axis(logits_NE, idx_N2, axis=1).sum(axis=1)
        z_NE = (logits_NE - t_N[:, None]) / self.width
        logg_NE = log_softmax_rows(self.base.log_scores(logits_NE) + log_expit(z_NE))
        return logits_NE, idx_N2, z_NE, logg_NE

    def log_probs(self, logits_NE):
        return self._parts(logits_NE)[3]

    def logit_grad(self, logits_NE, targets_NE):
        logits_NE, idx_N2, z_NE, logg_NE = self._parts(logits_NE)
        D_NE = targets_NE - row_sum(targets_NE)[:, None] * np.exp(logg_NE)
        # d (a_i + log m_i) / d l_j = a'_i delta_ij + (1 - m_i) / width (delta_ij - dt/dl_j),
        # dt/dl_j = 1/2 on the two logits that define t.
        dlogm_NE = expit(-z_NE) / self.width
        grad_NE = D_NE * (self.base.dlog_scores(logits_NE) + dlogm_NE)
        half_S_N = 0.5 * row_sum(D_NE * dlogm_NE)
        rows = np.arange(logits_NE.shape[0])
        grad_NE[rows, idx_N2[:, 0]] -= half_S_N
        grad_NE[rows, idx_N2[:, 1]] -= half_S_N
        return expected_log(targets_NE, logg_NE), grad_NE

    def mstep(self, F_NQ, R_NE, W_QE, n_steps=1, log_expert_NE=None, l2=0.0):
        return em.lbfgs_gate(F_NQ, R_NE, W_QE, self.n_free(W_QE.shape[1]), self, maxiter=10 * n_steps, l2=l2)[0]


# The table: canonical name (as in `gatedmoe.gates.names()`) -> entry.
_TABLE: dict[str, type[StatsGate]] = {
    cls.name: cls for cls in (SoftmaxGate, TopKSoftmaxGate, TemperatureSoftmaxGate, SigmoidGate, ModifiedSoftmaxGate)
}
GATES = tuple(_TABLE)
# Old stats-only names, accepted with a FutureWarning.
GATE_ALIASES = {"topk": "topk_softmax", "temperature": "temperature_softmax"}


def canonical_gate_name(gate, warn: bool = False, stacklevel: int = 2) -> str:
    """The table name of ``gate`` (an alias is mapped, with a ``FutureWarning`` if ``warn``)."""
    if isinstance(gate, str) and gate in _TABLE:
        return gate
    if isinstance(gate, str) and gate in GATE_ALIASES:
        new = GATE_ALIASES[gate]
        if warn:
            # FutureWarning, not DeprecationWarning: the people passing gate= are end users
            # in scripts and notebooks, who never see a DeprecationWarning raised inside a
            # library (scikit-learn deprecates parameter values the same way).
            warnings.warn(
                f"gate={gate!r} is deprecated and will be removed; use gate={new!r} (the name in "
                "gatedmoe.gates.names())",
                FutureWarning,
                stacklevel=stacklevel + 1,
            )
        return new
    known = ", ".join(GATES) + " (deprecated aliases: " + ", ".join(GATE_ALIASES) + ")"
    raise ValueError(f"gate must be one of {known}; got {gate!r}")


def make_gate(gate, n_experts: int, k=None, temperature=1.0, warn: bool = False, stacklevel: int = 2) -> StatsGate:
    """Validate a gate name and its options; return the table entry bound to them.

    ``k`` is used by ``"topk_softmax"`` and ``"sigmoid"`` (``k == n_experts`` is the dense
    gate); ``temperature`` by ``"temperature_softmax"`` (accepted, but must be 1, for the
    other gates). Bad values raise ``ValueError`` naming the argument.
    """
    name = canonical_gate_name(gate, warn=warn, stacklevel=stacklevel + 1)
    cls = _TABLE[name]
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
        np.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not cls.takes_temperature and temperature != 1.0:
        raise ValueError(f"temperature={temperature} only applies to gate='temperature_softmax', got gate={gate!r}")
    if k is None and cls.requires_k:
        raise ValueError(f"gate={gate!r} needs k (experts kept per input, 1 <= k <= n_experts={n_experts})")
    if k is not None:
        if not cls.takes_k:
            raise ValueError(f"k only applies to gate='topk_softmax' or 'sigmoid', got gate={gate!r} with k={k}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n_experts:
            raise ValueError(f"k must be an integer in [1, n_experts={n_experts}], got {k!r}")
        k = None if k == n_experts else int(k)
    return cls(k=k, temperature=float(temperature))


# ------------------------------------------------------------------ string-facing helpers
# Thin functions over the table, for callers (and oracle tests) that hold a gate by name.


def check_gate(gate: str, n_experts: int, k: int | None, temperature: float) -> int | None:
    """Validate a gate name and its options; return the number of kept experts (None = all)."""
    return make_gate(gate, n_experts, k, temperature).k


def _entry(gate: str, k: int | None = None, temperature: float = 1.0) -> StatsGate:
    return _TABLE[canonical_gate_name(gate)](k=k, temperature=temperature)


def n_free_gate_experts(gate: str, n_experts: int) -> int:
    """Experts whose gate parameters are free (softmax family: the last is fixed at 0)."""
    return _entry(gate).n_free(n_experts)


def gate_features(X_NP: np.ndarray, gate: str) -> np.ndarray:
    """The gate's input ``z(x)``: ``tanh(x)`` for ``"modified_softmax"``, else ``x``."""
    return _entry(gate).features(X_NP)


def gate_log_probs(logits_NE: np.ndarray, gate: str, k: int | None = None, temperature: float = 1.0) -> np.ndarray:
    """``log g(x)`` ``[N, E]`` float64 from gate logits; ``-inf`` for experts a top-K drops."""
    return _entry(gate, k, temperature).log_probs(logits_NE)


def gate_probs(logits_NE: np.ndarray, gate: str, k: int | None = None, temperature: float = 1.0) -> np.ndarray:
    """``g(x)`` ``[N, E]`` float64."""
    return _entry(gate, k, temperature).probs(logits_NE)


def gate_logit_grad(
    logits_NE: np.ndarray, targets_NE: np.ndarray, gate: str, k: int | None = None, temperature: float = 1.0
) -> tuple[float, np.ndarray]:
    """Value and gradient in the logits of ``Q(l) = sum_ne t_ne log g_ne(l)`` (see
    `StatsGate.logit_grad`)."""
    return _entry(gate, k, temperature).logit_grad(logits_NE, targets_NE)
