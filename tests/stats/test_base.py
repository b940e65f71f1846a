"""The shared estimator machinery of `gatedmoe.stats._base`: what a fitted model reads after fit."""

import warnings

import numpy as np
import pytest

from gatedmoe.stats import MoEClassifier, MoERegressor

ESTIMATORS = [MoERegressor, MoEClassifier]


def small_data(n=120, seed=0, classify=False):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    y = np.where(X[:, 0] > 0, 2 * X[:, 1], -1 + X[:, 1]) + 0.3 * rng.normal(size=n)
    return (X, (y > 0).astype(int)) if classify else (X, y)


def summary(model, X, y):
    """Everything a fitted model reports that depends on its number of experts."""
    return {
        "n_parameters": model.n_parameters(),
        "bic": model.bic(X, y),
        "aic": model.aic(X, y),
        "loglik": model.loglik(X, y),
        "predict": model.predict(X),
        "gate_proba": model.predict_expert_proba(X),
        "posterior": model.predict_expert_proba(X, y),
        "sample": model.sample(X, random_state=0),
    }


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
