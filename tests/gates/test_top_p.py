"""Tests of src/gatedmoe/gates/top_p.py."""

import math

import pytest
import torch

from gatedmoe.gates import TopPGate
from gatedmoe.gates.functional import top_p_mask
from helpers import assert_close

P = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])


@pytest.mark.parametrize("p,kept", [(0.7, [0, 1]), (0.5, [0]), (0.81, [0, 1, 2]), (1.0, [0, 1, 2, 3]), (0.1, [0])])
def test_mask_by_hand(p, kept):
    m = top_p_mask(P, p)
    assert torch.nonzero(m[0]).flatten().tolist() == kept
    assert torch.nonzero(m[1]).flatten().tolist() == [3 - i for i in reversed(kept)]


def _gate(**kw):
    g = TopPGate(4, 4, **kw)
    with torch.no_grad():
        g.weight.copy_(torch.eye(4))
    return g


def test_gate_formula_and_entropy_loss():
    g = _gate(p=0.7, w_entropy=0.5)
    r = g(torch.log(P)).validate()
    assert r.experts_per_token().tolist() == [2, 2]
    assert_close("weights", P * top_p_mask(P, 0.7), r.combine_matrix().detach())
    H = -(P * torch.log(P)).sum(-1).mean()
    assert_close("entropy", 0.5 * H, g.gate_losses["dynamic_entropy"].detach())
    g.renormalize = True
    w = g(torch.log(P)).combine_matrix().detach()
    assert_close("renormalised", torch.tensor([0.625, 0.375]), w[0, :2])


def test_max_k():
    g = _gate(p=1.0, max_k=2)
    assert g(torch.log(P)).experts_per_token().tolist() == [2, 2]
    assert math.isclose(float(top_p_mask(P, 1.0, max_k=3).sum()), 6)


@pytest.mark.parametrize("kw,match", [({"p": 0.0}, "p must"), ({"max_k": 5}, "max_k"), ({"w_entropy": -1}, "w_entropy")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        TopPGate(4, 4, **kw)
