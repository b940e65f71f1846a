"""Voronoi losses on hand-built fits, where the answer is known in closed form."""

import numpy as np
import pytest

from gatedmoe.stats import MoETruth, voronoi_loss
from gatedmoe.stats.voronoi import RBAR


@pytest.fixture
def truth():
    return MoETruth(gate_coef=np.array([[2.0], [0.0]]), gate_intercept=np.array([0.5, 0.0]),
                    expert_coef=np.array([[1.0], [-1.0]]), expert_intercept=np.array([3.0, -3.0]),
                    noise_variance=np.array([0.5, 1.0]))


def moved(truth, **changes):
    fields = dict(gate_coef=truth.gate_coef, gate_intercept=truth.gate_intercept, expert_coef=truth.expert_coef,
                  expert_intercept=truth.expert_intercept, noise_variance=truth.noise_variance)
    fields.update(changes)
    return MoETruth(**fields)


def test_zero_at_truth_and_invariant_to_gate_translation_and_permutation(truth):
    assert voronoi_loss(truth, truth).d1 == pytest.approx(0, abs=1e-6)
    shifted = moved(truth, gate_coef=truth.gate_coef + 0.7, gate_intercept=truth.gate_intercept - 0.3)
    loss = voronoi_loss(shifted, truth)
    assert loss.d1 == pytest.approx(0, abs=1e-5) and loss.matched == pytest.approx(0, abs=1e-9)
    perm = [1, 0]
    swapped = MoETruth(truth.gate_coef[perm], truth.gate_intercept[perm], truth.expert_coef[perm],
                       truth.expert_intercept[perm], truth.noise_variance[perm])
    assert voronoi_loss(swapped, truth).cells == (1, 0)
    assert voronoi_loss(swapped, truth).matched == pytest.approx(0, abs=1e-9)


def test_exact_fit_loss_is_linear_in_the_perturbation(truth):
    eps = 1e-3
    fit = moved(truth, expert_intercept=truth.expert_intercept + np.array([eps, 0.0]))
    # Only expert 0's intercept moves: D1 = exp(beta0_0) * eps (no translation helps).
    assert voronoi_loss(fit, truth).d1 == pytest.approx(np.exp(0.5) * eps, rel=1e-3)
    assert voronoi_loss(fit, truth).matched == pytest.approx(eps, rel=1e-9)


def test_over_specified_cell_uses_rbar_exponents(truth):
    eps = 1e-2
    # Split true expert 0 into two atoms at b0 +- eps, each carrying half its gate mass.
    fit = MoETruth(
        gate_coef=np.array([[2.0], [2.0], [0.0]]),
        gate_intercept=np.array([0.5 - np.log(2), 0.5 - np.log(2), 0.0]),
        expert_coef=np.array([[1.0], [1.0], [-1.0]]),
        expert_intercept=np.array([3.0 + eps, 3.0 - eps, -3.0]),
        noise_variance=np.array([0.5, 0.5, 1.0]),
    )
    loss = voronoi_loss(fit, truth)
    assert sorted(loss.cells) == [0, 0, 1] and loss.matched is None
    # D2: two atoms of mass exp(0.5)/2 each with |Db|^rbar(2) = eps^4; D1: linear terms.
    assert loss.d2 == pytest.approx(np.exp(0.5) * eps ** RBAR[2], rel=1e-2)
    assert loss.d1 == pytest.approx(np.exp(0.5) * eps, rel=1e-2)


def test_unknown_rbar_needs_an_explicit_exponent(truth):
    fit = MoETruth(np.tile(truth.gate_coef[:1], (4, 1)), np.full(4, 0.5 - np.log(4)), np.tile(truth.expert_coef[:1], (4, 1)),
                   np.array([3.0, 3.01, 2.99, 3.02]), np.full(4, 0.5))
    with pytest.raises(ValueError, match="rbar"):
        voronoi_loss(fit, truth)
    assert np.isfinite(voronoi_loss(fit, truth, rbar=lambda m: 2 * m).d2)


def test_unfitted_regressor_raises_not_fitted_error(truth):
    # Review: an unfitted MoERegressor gave AttributeError 'gate_coef_'.
    from sklearn.exceptions import NotFittedError

    from gatedmoe.stats import MoERegressor

    with pytest.raises(NotFittedError):
        voronoi_loss(MoERegressor(), truth)


def test_classifier_or_other_object_raises_type_error_naming_the_argument(truth):
    from gatedmoe.stats import MoEClassifier

    with pytest.raises(TypeError, match="fitted must be .*MoEClassifier"):
        voronoi_loss(MoEClassifier(), truth)
    with pytest.raises(TypeError, match="truth must be .*without"):
        voronoi_loss(truth, object())
