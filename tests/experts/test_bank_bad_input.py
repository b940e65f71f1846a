"""Bad input to `ExpertBank` (issue 23, items 1 and 6)."""

from __future__ import annotations

import pytest
import torch

from gatedmoe import ExpertBank


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        ({"n_experts": 0}, ValueError, "n_experts must be a positive int"),
        ({"d_model": 4.0}, ValueError, "d_model must be a positive int"),
        ({"d_hidden": -1}, ValueError, "d_hidden must be a positive int"),
        ({"activation": "nope"}, ValueError, "nope"),
        ({"activation": 3}, TypeError, "activation must be an activation name or an Activation"),
        ({"activation": torch.nn.ReLU()}, TypeError, "activation must be an activation name or an Activation"),
        ({"bias": "yes"}, TypeError, "bias must be True or False"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_constructor_argument_names_it(kw, exc, match):
    args = {"n_experts": 2, "d_model": 4, "d_hidden": 8, **kw}
    with pytest.raises(exc, match=match):
        ExpertBank(**args)


@pytest.mark.parametrize(
    "e, x, exc, match",
    [
        (2, torch.randn(3, 4), ValueError, r"e must be an int in \[0, 1\]"),
        (-1, torch.randn(3, 4), ValueError, r"e must be an int in \[0, 1\]"),
        (0, torch.randn(3, 5), ValueError, r"x_ND must have shape \[N, d_model=4\]"),
        (0, torch.ones(3, 4, dtype=torch.long), TypeError, "x_ND must be a floating-point tensor"),
    ],
    ids=["e-high", "e-negative", "width", "int"],
)
def test_expert_forward_refuses_bad_input(e, x, exc, match):
    with pytest.raises(exc, match=match):
        ExpertBank(2, 4, 8).expert_forward(e, x)


def test_expert_forward_takes_zero_rows():
    assert ExpertBank(2, 4, 8).expert_forward(1, torch.randn(0, 4)).shape == (0, 4)
