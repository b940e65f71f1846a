"""The shared argument and input checks of `gatedmoe.validation`."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gatedmoe.validation import (
    boolean,
    check_finite,
    check_input,
    int_in,
    one_of,
    positive_int,
    real_in,
)


@settings(max_examples=20, deadline=None)
@given(v=st.one_of(st.floats(allow_nan=True), st.integers(-3, 3), st.text(max_size=2), st.booleans(), st.none()))
def test_real_in_accepts_exactly_finite_reals_in_range(v):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= 1
    if ok:
        assert real_in("p", v, 0.0, 1.0, lo_open=True) == float(v)
    else:
        with pytest.raises(ValueError, match=r"p must be a .*\(0.0, 1.0\]"):
            real_in("p", v, 0.0, 1.0, lo_open=True)


def test_messages_name_the_argument_and_range():
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        positive_int("n", 0)
    with pytest.raises(ValueError, match=r"e must be an int in \[0, 3\], got 4"):
        int_in("e", 4, 0, 3)
    with pytest.raises(TypeError, match="flag must be True or False, got 'no'"):
        boolean("flag", "no")
    with pytest.raises(ValueError, match=r"mode must be one of \['a', 'b'\], got 'c'"):
        one_of("mode", "c", ("a", "b"))
    with pytest.raises(ValueError, match="rate must be a finite number >= 0.0, got inf"):
        real_in("rate", math.inf, 0.0)


def test_check_input_and_check_finite():
    x = torch.randn(2, 4)
    assert check_input(x, 4, "L") is x
    with pytest.raises(TypeError, match="L: x must be a torch.Tensor"):
        check_input(x.tolist(), 4, "L")
    with pytest.raises(ValueError, match=r"L: x must have shape \[T, d_model=4\]"):
        check_input(x[0], 4, "L", ndims=(2,), shape_text="[T, d_model]")
    check_finite(x, "L")
    x[0, 0] = math.inf
    with pytest.raises(ValueError, match="L: x contains NaN or inf"):
        check_finite(x, "L")
