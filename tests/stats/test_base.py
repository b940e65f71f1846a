"""The shared estimator machinery of `gatedmoe.stats._base`: what a fitted model reads after fit."""

import warnings

import numpy as np
import pytest

from gatedmoe.stats import MoEClassifier, MoERegressor
from gatedmoe.stats.gating import make_gate

ESTIMATORS = [MoERegressor, MoEClassifier]


def small_data(n=120, seed=0, classify=False):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    y = np.where(X[:, 0] > 0, 2 * X[:, 1], -1 + X[:, 1]) + 0.3 * rng.normal(size=n)
    return (X, (y > 0).astype(int)) if classify else (X, y)


def summary(model, X, y):
    """Everything a fitted model reports: what its hyper-parameters could change."""
    out = {
        "n_parameters": model.n_parameters(),
        "bic": model.bic(X, y),
        "aic": model.aic(X, y),
        "loglik": model.loglik(X, y),
        "predict": model.predict(X),
        "gate_proba": model.predict_expert_proba(X),
        "posterior": model.predict_expert_proba(X, y),
        "sample": model.sample(X, random_state=0),
        "score": model.score(X, y),
    }
    if hasattr(model, "predict_proba"):
        out["predict_proba"] = model.predict_proba(X)
    return out


def fit_quietly(model, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(X, y)


@pytest.mark.parametrize("Estimator", ESTIMATORS)
@pytest.mark.parametrize("gate,k", [("softmax", None), ("topk_softmax", 2)])
def test_set_params_after_fit_leaves_the_fitted_model_alone(Estimator, gate, k):
    # scikit-learn convention: hyper-parameters describe the next fit; the fitted model is
    # read from the fitted attributes. bic / n_parameters read n_experts=5 of a 3-expert fit.
    X, y = small_data(classify=Estimator is MoEClassifier)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Estimator(n_experts=3, gate=gate, k=k, n_init=1, random_state=0).fit(X, y)
    assert model.n_experts_ == 3
    before = summary(model, X, y)
    model.set_params(n_experts=5)
    after = summary(model, X, y)
    assert model.n_experts_ == 3
    assert after["gate_proba"].shape == after["posterior"].shape == (X.shape[0], 3)
    for name, value in before.items():
        np.testing.assert_array_equal(np.asarray(after[name]), np.asarray(value), err_msg=name)


# (fitted with, then set_params): every hyper-parameter that prediction-time code could read.
CHANGES = [
    (dict(gate="topk_softmax", k=2), dict(k=1)),
    (dict(gate="topk_softmax", k=2), dict(k=3)),
    (dict(gate="topk_softmax", k=2), dict(gate="softmax", k=None)),
    (dict(gate="sigmoid", k=2), dict(k=None)),
    (dict(gate="temperature_softmax", temperature=0.5), dict(temperature=2.0)),
    (dict(gate="softmax"), dict(gate="sigmoid")),
    (dict(gate="softmax"), dict(gate="modified_softmax")),
    (dict(penalty="l1", alpha=0.05), dict(penalty=None, alpha=0.0)),
    (dict(), dict(alpha=0.3, l2=7.0, tol=0.1, max_iter=2, n_init=5, init="random", init_subsample=20,
                  random_state=9, warm_start=True)),
]


@pytest.mark.parametrize("Estimator", ESTIMATORS)
@pytest.mark.parametrize("fitted_with,changed", CHANGES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_set_params_of_any_hyper_parameter_after_fit_leaves_the_fitted_model_alone(Estimator, fitted_with, changed):
    # A fitted model reads the gate (name, k, temperature) and the penalty it was fitted
    # with, not the current hyper-parameters: set_params describes the next fit.
    X, y = small_data(classify=Estimator is MoEClassifier)
    model = fit_quietly(Estimator(n_experts=3, n_init=1, random_state=0, **fitted_with), X, y)
    if "penalty" in changed:
        # The L1 fit has zero coefficients, so its BIC counts fewer parameters than W.size.
        assert np.count_nonzero(model.expert_coef_ == 0) > 0
    before = summary(model, X, y)
    model.set_params(**changed)
    assert all(model.get_params()[name] == value for name, value in changed.items())
    after = summary(model, X, y)
    for name, value in before.items():
        np.testing.assert_array_equal(np.asarray(after[name]), np.asarray(value), err_msg=name)
    # ... and the next fit uses the new values.
    settings = {**model.get_params(), "warm_start": False}
    model = fit_quietly(model.set_params(**settings), X, y)
    assert model.gate_ == make_gate(settings["gate"], 3, settings["k"], settings["temperature"])
    assert model.penalty_ == settings["penalty"]
