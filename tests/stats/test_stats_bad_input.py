"""Bad input, bad parameters and awkward data for the estimators (issue 23, item 4 and 6).

Each test names the issue example it would have caught. Fits are small: this module runs
in a few seconds on CI's two cores.
"""

import time
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning

from gatedmoe.stats import MoEClassifier, MoERegressor, MoETruth, l1_path

ESTIMATORS = [MoERegressor, MoEClassifier]
# Derandomised: the same examples on every CI run.
FAST = settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def small_data(n=120, p=2, seed=0, classify=False):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    y = np.where(X[:, 0] > 0, 2 * X[:, 1], -1 + X[:, 1]) + 0.3 * rng.normal(size=n)
    return (X, (y > 0).astype(int)) if classify else (X, y)


def fit_without_warnings(model, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return model.fit(X, y)


# ------------------------------------------------------------------ defaults converge quietly
def test_docs_example_converges_without_a_warning():
    # docs/stats.md "Use" and the README: three experts on a well-separated truth.
    X, y, _ = MoETruth.well_separated(n_experts=3, n_features=1).sample(10_000, random_state=0)
    model = fit_without_warnings(MoERegressor(n_experts=3, gate="softmax", random_state=0), X, y)
    assert model.converged_


def test_docstring_example_with_a_sharp_gate_converges_without_a_warning():
    # Issue 23: "MoERegressor warns ConvergenceWarning on nearly every default fit". A gate
    # that switches experts exactly at x = 0 has no finite MLE; the default gate ridge
    # keeps it finite and EM converges.
    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, (500, 1))
    y = np.where(X[:, 0] < 0, -2 * X[:, 0], 3 + X[:, 0]) + 0.1 * rng.normal(size=500)
    model = fit_without_warnings(MoERegressor(n_experts=2, random_state=0), X, y)
    assert model.converged_ and model.score(X, y) > 0.95
    assert np.all(np.isfinite(model.gate_coef_))


@pytest.mark.parametrize("d", [1, 5])
def test_standard_settings_converge_without_a_warning(d):
    X, y, _ = MoETruth.well_separated(3, d, random_state=d).sample(1000, random_state=d)
    assert fit_without_warnings(MoERegressor(n_experts=3, random_state=0), X, y).converged_


def test_convergence_warning_says_what_to_change():
    X, y, _ = MoETruth.well_separated(2, 1).sample(500, random_state=0)
    with pytest.warns(ConvergenceWarning, match="max_iter") as caught:
        MoERegressor(n_experts=2, max_iter=2, random_state=0).fit(X, y)
    message = str(caught[0].message)
    assert "max_iter=2" in message and "tol" in message


# ------------------------------------------------------------------ feature scale
@FAST
@given(exponent=st.integers(-8, 8), shift=st.sampled_from([0.0, 1e3, -1e3]))
def test_regressor_is_invariant_to_the_units_of_the_features(exponent, shift):
    # Issue 23: "features scaled by 1e8 fit to R^2 0.14 with only the usual warning".
    X, y, _ = MoETruth.well_separated(2, 2, random_state=0).sample(400, random_state=0)
    ref = MoERegressor(n_experts=2, random_state=0).fit(X, y)
    scale = 10.0**exponent
    # The shift in units of the feature's spread: a shift of 1e6 spreads would leave
    # float64 only ~6 digits of the features themselves (an input limit, not the fit's).
    Xs = (X + shift) * scale
    model = MoERegressor(n_experts=2, random_state=0).fit(Xs, y)
    assert model.score(Xs, y) == pytest.approx(ref.score(X, y), abs=1e-6)
    # Coefficients are reported on the caller's scale: slope per unit of the new feature.
    np.testing.assert_allclose(model.expert_coef_ * scale, ref.expert_coef_, rtol=1e-5, atol=1e-8)


def test_classifier_is_invariant_to_the_units_of_the_features():
    X, y = small_data(200, classify=True)
    ref = MoEClassifier(n_experts=2, random_state=0).fit(X, y)
    model = MoEClassifier(n_experts=2, random_state=0).fit(X * 1e8, y)
    np.testing.assert_allclose(model.predict_proba(X * 1e8), ref.predict_proba(X), atol=1e-6)


# ------------------------------------------------------------------ too many experts
@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_more_experts_than_the_data_supports_is_refused_before_any_work(Estimator):
    # Issue 23: "100 experts on 300 rows: 217 s". Fewer than 3 samples per expert: refused.
    X, y = small_data(300, classify=Estimator is MoEClassifier)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"n_experts=101 .* n_experts <= 100"):
        Estimator(n_experts=101).fit(X, y)
    assert time.perf_counter() - t0 < 1.0


def test_many_experts_on_few_rows_warn_and_finish_quickly():
    # Fewer samples than parameters: allowed (scikit-learn's own checks fit 3 experts to 10
    # rows), but the user is told, and the fit takes seconds, not minutes.
    X, y = small_data(120)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with pytest.warns(UserWarning, match="penalty='l1'"):
            MoERegressor(n_experts=40, n_init=1, random_state=0).fit(X, y)
    assert time.perf_counter() - t0 < 20.0


# ------------------------------------------------------------------ parameters
BAD_PARAMS = [
    ("n_experts", 0), ("n_experts", -1), ("n_experts", 2.5), ("n_experts", True), ("n_experts", "3"),
    ("n_init", 0), ("max_iter", 0), ("tol", -1.0), ("tol", float("nan")), ("alpha", -0.1),
    ("alpha", float("nan")), ("l2", -1.0), ("l2", float("nan")), ("l2", True), ("penalty", "l2"),
    ("l2", float("inf")), ("tol", float("inf")), ("temperature", float("inf")),
    ("init", "kmeans++"), ("gate", "softplus"), ("k", 0), ("temperature", 0.0), ("init_subsample", 3),
]


@pytest.mark.parametrize("Estimator", ESTIMATORS)
@pytest.mark.parametrize("name,value", BAD_PARAMS, ids=[f"{n}={v!r}" for n, v in BAD_PARAMS])
def test_bad_parameter_raises_value_error_naming_it(Estimator, name, value):
    X, y = small_data(60, classify=Estimator is MoEClassifier)
    params = {name: value}
    if name == "k":
        params["gate"] = "topk_softmax"
    with pytest.raises(ValueError, match=name):
        Estimator(**params).fit(X, y)


@pytest.mark.parametrize("Estimator", ESTIMATORS)
@pytest.mark.parametrize("alpha", [float("inf"), float("nan")])
def test_infinite_l1_strength_raises_value_error_naming_alpha(Estimator, alpha):
    # Review: alpha=inf with penalty="l1" was accepted and gave a model of NaNs.
    X, y = small_data(60, classify=Estimator is MoEClassifier)
    with pytest.raises(ValueError, match="alpha"):
        Estimator(penalty="l1", alpha=alpha).fit(X, y)


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_alpha_without_the_l1_penalty_warns(Estimator):
    # Review: alpha=0.5 without penalty="l1" was silently ignored (an unpenalised fit). A
    # warning, not an error: sklearn's check_regressors_train sets alpha on any regressor.
    X, y = small_data(60, classify=Estimator is MoEClassifier)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with pytest.warns(UserWarning, match=r"alpha=0\.5 is used only with penalty='l1'") as caught:
            Estimator(alpha=0.5).fit(X, y)
    # Attributed to the caller's fit() line.
    assert caught[0].filename == __file__


@FAST
@given(n_experts=st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), st.text(max_size=3)))
def test_any_non_positive_or_non_integer_n_experts_is_refused(n_experts):
    X, y = small_data(60)
    with pytest.raises(ValueError, match="n_experts"):
        MoERegressor(n_experts=n_experts).fit(X, y)


# ------------------------------------------------------------------ data
@pytest.mark.parametrize("Estimator", ESTIMATORS)
@pytest.mark.parametrize("bad", ["nan_x", "inf_x", "nan_y", "empty", "one_row", "y_short", "x_1d", "text_x"])
def test_bad_data_raises_before_any_work(Estimator, bad):
    classify = Estimator is MoEClassifier
    X, y = small_data(60, classify=classify)
    X = X.astype(object) if bad == "text_x" else X.copy()
    y = y.astype(float)
    if bad == "nan_x":
        X[3, 1] = np.nan
    elif bad == "inf_x":
        X[5, 0] = np.inf
    elif bad == "nan_y":
        y[2] = np.nan
    elif bad == "empty":
        X, y = X[:0], y[:0]
    elif bad == "one_row":
        X, y = X[:1], y[:1]
    elif bad == "y_short":
        y = y[:-1]
    elif bad == "x_1d":
        X = X[:, 0]
    elif bad == "text_x":
        X[0, 0] = "a"
    with pytest.raises((ValueError, TypeError)):
        Estimator().fit(X, y)


@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_predict_with_the_wrong_number_of_features_names_it(Estimator):
    X, y = small_data(60, classify=Estimator is MoEClassifier)
    model = Estimator(n_experts=2, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X, y)
    with pytest.raises(ValueError, match="features"):
        model.predict(np.hstack([X, X]))


def test_classifier_with_one_class_says_so():
    X, _ = small_data(60)
    with pytest.raises(ValueError, match="class"):
        MoEClassifier().fit(X, np.zeros(60, dtype=int))


def test_constant_feature_is_fitted_not_divided_by_zero():
    X, y = small_data(200)
    X = np.hstack([X, np.full((200, 1), 7.0)])
    model = MoERegressor(n_experts=2, random_state=0).fit(X, y)
    assert np.all(np.isfinite(model.expert_coef_)) and np.all(np.isfinite(model.predict(X)))


# ------------------------------------------------------------------ determinism, paths
@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_same_seed_gives_bitwise_identical_fits(Estimator):
    X, y = small_data(200, classify=Estimator is MoEClassifier)
    a = Estimator(n_experts=2, random_state=3).fit(X, y)
    b = Estimator(n_experts=2, random_state=3).fit(X, y)
    assert np.array_equal(a.gate_coef_, b.gate_coef_) and np.array_equal(a.expert_coef_, b.expert_coef_)


@pytest.mark.parametrize("alphas", [[], [0.1, -0.1], [float("nan")], [0.0]])
def test_l1_path_refuses_bad_alphas(alphas):
    X, y = small_data(60)
    with pytest.raises(ValueError, match="alphas"):
        l1_path(X, y, alphas)
