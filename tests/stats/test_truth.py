"""MoETruth: validation of its parameters."""

import numpy as np
import pytest

from gatedmoe.stats import MoETruth

FIELDS = ["gate_coef", "gate_intercept", "expert_coef", "expert_intercept", "noise_variance"]


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_truth_refuses_non_finite_parameters_naming_the_field(field, bad):
    # Review: MoETruth accepted NaN / inf in gate_coef (and the other arrays).
    truth = MoETruth.well_separated(2, 1)
    fields = {name: np.array(getattr(truth, name), dtype=float) for name in FIELDS}
    fields[field].flat[0] = bad
    with pytest.raises(ValueError, match=f"{field} must be finite"):
        MoETruth(**fields)
