"""`MoETruth`: a known Gaussian MoE to simulate from (the "true model" of the theory papers)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.utils import check_random_state

from gatedmoe.stats.gating import make_gate

__all__ = ["MoETruth"]


@dataclass(frozen=True)
class MoETruth:
    """True parameters of ``p(y|x) = sum_e g_e(x) N(y; a_e . x + b_e, sigma_e^2)``.

    Arrays: ``gate_coef`` / ``expert_coef`` ``[E, P]``, ``gate_intercept`` /
    ``expert_intercept`` / ``noise_variance`` ``[E]``, all finite (else ``ValueError``
    naming the field), ``noise_variance > 0``; covariates are drawn
    ``x ~ N(0, I_P)``. The same attribute names as a fitted `MoERegressor`, so either can
    be passed to `voronoi_loss`.

    Examples
    --------
    >>> truth = MoETruth.well_separated(n_experts=3, n_features=1)
    >>> X, y, expert = truth.sample(100, random_state=0)
    >>> X.shape, y.shape
    ((100, 1), (100,))
    """

    gate_coef: np.ndarray
    gate_intercept: np.ndarray
    expert_coef: np.ndarray
    expert_intercept: np.ndarray
    noise_variance: np.ndarray
    gate: str = "softmax"
    k: int | None = None
    temperature: float = 1.0

    def __post_init__(self):
        E, P = np.shape(self.gate_coef)
        for name, shape in [("expert_coef", (E, P)), ("gate_intercept", (E,)), ("expert_intercept", (E,)),
                            ("noise_variance", (E,))]:
            if np.shape(getattr(self, name)) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {np.shape(getattr(self, name))}")
        for name in ("gate_coef", "gate_intercept", "expert_coef", "expert_intercept", "noise_variance"):
            # NaN or inf would only surface later, as NaN samples and likelihoods.
            if not np.all(np.isfinite(np.asarray(getattr(self, name), dtype=float))):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)!r}")
        if np.any(np.asarray(self.noise_variance) <= 0):
            raise ValueError("noise_variance must be > 0")
        gate = make_gate(self.gate, E, self.k, self.temperature, warn=True, stacklevel=3)
        # Hold the table's name, so a truth built with a deprecated alias warns once, here.
        object.__setattr__(self, "gate", gate.name)

    # aliases so a truth reads like a fitted estimator
    gate_coef_ = property(lambda self: np.asarray(self.gate_coef, dtype=float))
    gate_intercept_ = property(lambda self: np.asarray(self.gate_intercept, dtype=float))
    expert_coef_ = property(lambda self: np.asarray(self.expert_coef, dtype=float))
    expert_intercept_ = property(lambda self: np.asarray(self.expert_intercept, dtype=float))
    noise_variance_ = property(lambda self: np.asarray(self.noise_variance, dtype=float))

    @property
    def n_experts(self) -> int:
        return int(np.shape(self.gate_coef)[0])

    @property
    def n_features(self) -> int:
        return int(np.shape(self.gate_coef)[1])

    @classmethod
    def well_separated(cls, n_experts: int = 3, n_features: int = 1, random_state=0, gate: str = "softmax",
                       k: int | None = None, temperature: float = 1.0) -> MoETruth:
        """A truth whose experts are easy to tell apart: intercepts 4 noise sd apart, each
        expert the most likely one on its own stretch of the first feature (around
        ``x0 = e - (E-1)/2``), moderate random slopes."""
        if n_experts < 1 or n_features < 1:
            raise ValueError(f"n_experts and n_features must be >= 1, got {n_experts}, {n_features}")
        rng = check_random_state(random_state)
        centre = np.arange(n_experts) - (n_experts - 1) / 2
        gate_coef = np.zeros((n_experts, n_features))
        gate_coef[:, 0] = 3.0 * centre
        if n_features > 1:
            gate_coef[:, 1:] = rng.normal(scale=0.5, size=(n_experts, n_features - 1))
        # Logits 3 (c x - c^2 / 2): expert e has the largest gate around x0 = c_e.
        gate_intercept = -1.5 * centre**2
        gate_coef -= gate_coef[-1]
        gate_intercept -= gate_intercept[-1]
        return cls(
            gate_coef=gate_coef,
            gate_intercept=gate_intercept,
            expert_coef=rng.normal(scale=1.0, size=(n_experts, n_features)),
            expert_intercept=4.0 * centre,
            noise_variance=np.full(n_experts, 0.25),
            gate=gate,
            k=k,
            temperature=temperature,
        )

    def as_estimator(self):
        """A fitted-looking `MoERegressor` holding these parameters (predict, loglik, sample)."""
        from gatedmoe.stats.regressor import MoERegressor

        est = MoERegressor(n_experts=self.n_experts, gate=self.gate, k=self.k, temperature=self.temperature)
        est.gate_coef_, est.gate_intercept_ = self.gate_coef_.copy(), self.gate_intercept_.copy()
        est.expert_coef_, est.expert_intercept_ = self.expert_coef_.copy(), self.expert_intercept_.copy()
        est.noise_variance_ = self.noise_variance_.copy()
        est.n_features_in_, est.n_experts_ = self.n_features, self.n_experts
        est.gate_, est.penalty_ = make_gate(self.gate, self.n_experts, self.k, self.temperature), None
        return est

    def sample(self, n_samples: int, random_state=None):
        """Draw ``x ~ N(0, I)`` and ``y ~ p(y|x)``; returns ``(X [n, P], y [n], expert [n])``."""
        rng = check_random_state(random_state)
        X = rng.standard_normal((int(n_samples), self.n_features))
        y, expert = self.as_estimator().sample(X, random_state=rng)
        return X, y, expert

    def loglik(self, X, y) -> float:
        """Total log-likelihood of ``(X, y)`` under the true parameters."""
        return self.as_estimator().loglik(X, y)
