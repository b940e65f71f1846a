"""Tests of src/gatedmoe/gates/dselect_k.py (and the DSelect-k functions)."""

import math

import pytest
import torch

from gatedmoe.gates import DSelectKGate
from gatedmoe.gates.functional import binary_codes, dselect_k_weights, smooth_step
from helpers import assert_close


def test_smooth_step_by_hand():
    t = torch.tensor([-1.0, -0.5, 0.0, 0.25, 0.5, 2.0], dtype=torch.float64)
    # gamma = 1: S(1/4) = -2/64 + 3/8 + 1/2 = 0.84375.
    want = torch.tensor([0.0, 0.0, 0.5, 0.84375, 1.0, 1.0], dtype=torch.float64)
    assert_close("S", want, smooth_step(t, 1.0))


def test_binary_codes():
    assert binary_codes(4).int().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert binary_codes(3).int().tolist() == [[0, 0], [0, 1], [1, 0]]
    assert binary_codes(1).shape == (1, 1)


def test_weights_by_hand():
    # Saturated z = (+1, -1): S = (1, 0) selects code 10 = expert 2; z = (0, 0): uniform 1/4.
    z = torch.tensor([[[1.0, -1.0], [0.0, 0.0]]], dtype=torch.float64)
    alpha = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)  # softmax = (3/4, 1/4)
    w, r = dselect_k_weights(z, alpha, 4)
    assert_close("selector 0", torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64), r[0, 0])
    assert_close("selector 1", torch.full((4,), 0.25, dtype=torch.float64), r[0, 1])
    want = torch.tensor([[1 / 16, 1 / 16, 3 / 4 + 1 / 16, 1 / 16]], dtype=torch.float64)
    assert_close("weights", want, w)


def test_converged_gate_routes_exactly_k():
    g = DSelectKGate(3, 8, k=2)
    with torch.no_grad():
        g.z_proj.weight.zero_()
        g.z_proj.bias.copy_(torch.tensor([5.0, -5.0, 5.0, -5.0, -5.0, 5.0]))  # codes 101=5, 001=1
        g.w_proj.weight.zero_()
        g.w_proj.bias.zero_()
    r = g(torch.randn(4, 3)).validate()
    assert r.counts.tolist() == [0, 4, 0, 0, 0, 4, 0, 0]
    assert_close("half each", torch.full((8,), 0.5), r.weight.detach())


def test_losses():
    torch.manual_seed(0)
    g = DSelectKGate(3, 4, k=2, w_entropy=0.1).train()
    x = torch.randn(5, 3)
    g(x)
    z = (x @ g.z_proj.weight.detach().T + g.z_proj.bias.detach()).view(5, 2, 2)
    alpha = x @ g.w_proj.weight.detach().T + g.w_proj.bias.detach()
    _, r = dselect_k_weights(z, alpha, 4)
    assert_close("entropy", 0.1 * -(r * torch.log(r + 1e-6)).sum(), g.gate_losses["dselect_entropy"].detach())
    assert "dselect_reachable" not in g.gate_losses
    g3 = DSelectKGate(3, 3, k=1).train()
    g3(x)
    assert g3.gate_losses["dselect_reachable"] >= 0
    g3.eval()
    g3(x)
    assert g3.gate_losses == {}


@pytest.mark.parametrize("kw,match", [({"gamma": 0.0}, "gamma"), ({"w_entropy": -1.0}, "w_entropy"), ({"k": 5}, "k must")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        DSelectKGate(3, 4, **kw)
