"""scikit-learn's own contract tests for both estimators (default parameters)."""

import warnings

import pytest
from sklearn.utils.estimator_checks import check_estimator

from gatedmoe.stats import MoEClassifier, MoERegressor


@pytest.mark.parametrize("estimator", [MoERegressor(), MoEClassifier()], ids=lambda e: type(e).__name__)
def test_check_estimator(estimator):
    with warnings.catch_warnings():
        # EM on the checks' tiny separable data stops at max_iter; that warning is expected.
        warnings.simplefilter("ignore")
        results = check_estimator(estimator, on_fail=None)
    failed = [(r["check_name"], r["exception"]) for r in results if r["status"] == "failed"]
    assert not failed, failed
