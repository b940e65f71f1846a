"""Tests of src/gatedmoe/gates/threshold.py."""

import pytest
import torch

from gatedmoe.gates import ThresholdGate
from helpers import assert_close


def test_adamole_formula_by_hand():
    g = ThresholdGate(3, 3, tau_max=0.5)
    with torch.no_grad():
        g.weight.copy_(torch.eye(3))
        g.threshold_fn.weight.zero_()
        g.threshold_fn.bias.zero_()  # tau = 0.5 * sigmoid(0) = 0.25
    p = torch.tensor([[0.5, 0.3, 0.2]])
    r = g(torch.log(p)).validate()
    # Fired: 0.5 and 0.3; weights (0.25, 0.05) / 0.3.
    assert_close("weights", torch.tensor([[0.25 / 0.3, 0.05 / 0.3, 0.0]]), r.combine_matrix().detach())


def test_threshold_network_gets_gradient_and_top_expert_fires():
    torch.manual_seed(0)
    g = ThresholdGate(5, 4)
    x = torch.randn(16, 5)
    r = g(x).validate()
    assert bool((r.experts_per_token() >= 1).all())
    (r.weight * torch.arange(r.n_assignments)).sum().backward()
    assert g.threshold_fn.weight.grad.abs().sum() > 0


def test_bad_tau_max():
    with pytest.raises(ValueError, match="tau_max"):
        ThresholdGate(3, 3, tau_max=0.0)
