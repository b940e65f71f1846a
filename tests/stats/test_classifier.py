"""MoEClassifier: recovery of a known mixture of logistic experts, monotone EM, bad input."""

import pickle
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from gatedmoe.stats import MoEClassifier


def xor_data(n, seed):
    """Two experts, gated by the sign of x0; each a logistic model in x1 of opposite sign."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    gate = 1 / (1 + np.exp(-4 * X[:, 0]))
    expert = (rng.random(n) < gate).astype(int)
    logit = np.where(expert == 1, 3 * X[:, 1], -3 * X[:, 1])
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return X, y, gate, logit


def true_proba(gate, X):
    p1 = 1 / (1 + np.exp(-3 * X[:, 1]))
    return gate * p1 + (1 - gate) * (1 - p1)


def test_recovers_the_conditional_distribution_and_improves_with_n():
    errs = []
    for n in (400, 8000):
        X, y, gate, _ = xor_data(n, 0)
        clf = MoEClassifier(n_experts=2, random_state=0).fit(X, y)
        Xt, _, gt, _ = xor_data(2000, 99)
        errs.append(np.abs(clf.predict_proba(Xt)[:, 1] - true_proba(gt, Xt)).mean())
    assert errs[1] < errs[0] / 2 and errs[1] < 0.05, errs


def test_classifier_em_is_monotone_and_probabilities_sum_to_one():
    X, y, _, _ = xor_data(500, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MoEClassifier(n_experts=3, init="random", n_init=1, max_iter=40, random_state=0).fit(X, y)
    h = clf.log_likelihood_history_
    assert np.all(np.diff(h) >= -1e-12 * np.abs(h[1:]))
    np.testing.assert_allclose(clf.predict_proba(X).sum(1), 1.0, rtol=1e-12)
    # loglik agrees with predict_proba on the observed labels.
    np.testing.assert_allclose(clf.loglik(X, y), np.log(clf.predict_proba(X)[np.arange(500), y]).sum(), rtol=1e-10)
    ys, experts = clf.sample(X, random_state=0)
    assert set(np.unique(ys)) <= {0, 1} and experts.max() < 3


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # 300 rows, tol 1e-6: slow tail
def test_string_labels_l1_pickle_and_bad_input():
    X, y, _, _ = xor_data(300, 2)
    labels = np.array(["no", "yes"])[y]
    clf = MoEClassifier(n_experts=2, penalty="l1", alpha=1e-3, random_state=0).fit(X, labels)
    assert set(clf.predict(X)) <= {"no", "yes"}
    assert clf.expert_coef_.shape == (2, 2, 2) and np.all(clf.expert_coef_[:, -1] == 0)
    again = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(again.predict_proba(X), clf.predict_proba(X))
    with pytest.raises(ValueError, match="at least 2 classes"):
        MoEClassifier().fit(X, np.zeros(300))
    with pytest.raises(ValueError, match="Unknown label type"):
        MoEClassifier().fit(X, np.linspace(0, 1, 300))
    with pytest.raises(ValueError, match="not seen in fit"):
        clf.loglik(X, np.array(["maybe"] * 300))


def test_defaults_match_logistic_regression_and_log_loss_accepts_the_probabilities():
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = load_breast_cancer(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    proba = MoEClassifier(random_state=0).fit(Xtr, ytr).predict_proba(Xte)
    assert proba.min() >= 0 and proba.max() <= 1
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=0, atol=1e-15)
    ref = make_pipeline(StandardScaler(), LogisticRegression()).fit(Xtr, ytr).predict_proba(Xte)
    assert log_loss(yte, proba) <= 1.05 * log_loss(yte, ref) + 0.01, (log_loss(yte, proba), log_loss(yte, ref))


@pytest.mark.parametrize("loader", ["load_breast_cancer", "load_wine"])
def test_default_fit_on_standard_data_converges_without_warnings(loader):
    # Issue 19/23: breast cancer stopped at max_iter=100 with a ConvergenceWarning (an
    # expert fading out of the mixture; plain EM needed 310 iterations).
    import sklearn.datasets

    X, y = getattr(sklearn.datasets, loader)(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clf = MoEClassifier(random_state=0).fit(X, y)
    assert clf.converged_ and clf.n_iter_ < clf.max_iter
    h = clf.log_likelihood_history_
    assert np.all(np.diff(h) >= -1e-12 * np.abs(h[1:]))


@pytest.mark.parametrize("loader", ["load_breast_cancer", "load_wine"])
def test_one_expert_is_logistic_regression(loader):
    # With one expert the model is multinomial logistic regression and the ridge l2=1 is
    # LogisticRegression's C=1: for 3 classes only if the penalty covers all C class
    # vectors (the symmetric ridge), for 2 classes the binary model's one vector.
    import sklearn.datasets
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = getattr(sklearn.datasets, loader)(return_X_y=True)
    ref = make_pipeline(StandardScaler(), LogisticRegression(tol=1e-10, max_iter=10_000)).fit(X, y)
    clf = MoEClassifier(n_experts=1, tol=1e-12, random_state=0).fit(X, y)
    np.testing.assert_allclose(clf.predict_proba(X), ref.predict_proba(X), atol=1e-6)


@pytest.mark.parametrize("loader", ["load_breast_cancer", "load_wine"])
def test_default_fit_ends_at_a_stationary_point_of_the_penalised_likelihood(loader):
    # The quasi-Newton phase must stop where the gradient of the penalised likelihood
    # vanishes (a real optimum), not on a plateau where the objective merely stalls.
    import sklearn.datasets

    from gatedmoe.stats import em

    X, y = getattr(sklearn.datasets, loader)(return_X_y=True)
    clf = MoEClassifier(random_state=0).fit(X, y)
    assert clf.converged_
    Xs = clf._standardise(X)
    data = (clf._gate.design(Xs), em.add_intercept(Xs), np.searchsorted(clf.classes_, y))
    params = clf._rescale(clf._params_from_fitted(), to_original=False)
    value, grads = clf._objective_grad(data, params, clf._gate)
    np.testing.assert_allclose(value, clf.lower_bound_, rtol=1e-9)
    masks = clf._free_blocks(params, clf._gate)
    # L-BFGS stops at a largest gradient entry of QN_GTOL = 1e-4 (LogisticRegression's tol).
    assert max(np.abs(grads[k][masks[k]]).max() for k in masks) <= 1e-4
