"""Tests of src/gatedmoe/gates/switch.py."""

import math

import pytest
import torch

from gatedmoe.gates import SwitchGate
from helpers import assert_close


def _gate(**kw):
    g = SwitchGate(2, 2, **kw)
    with torch.no_grad():
        g.weight.copy_(torch.eye(2))
    return g


def test_top1_weight_and_position_dropping():
    # logits = x; tokens 0, 2, 3 prefer expert 0, token 1 expert 1; C = ceil(1.0 * 4 / 2) = 2
    # so expert 0 keeps tokens 0 and 2 and drops token 3 (later position).
    g = _gate(capacity_factor=1.0).eval()
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 0.0], [3.0, 0.0]])
    r = g(x).validate()
    assert r.token.tolist() == [0, 2, 1]
    assert r.expert.tolist() == [0, 0, 1]
    assert r.n_dropped == 1
    want = torch.tensor([math.e / (math.e + 1), math.e**2 / (math.e**2 + 1), math.e**2 / (math.e**2 + 1)])
    assert_close("weights", want, r.weight.detach())


def test_no_capacity_keeps_all_and_eval_capacity_factor():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 0.0], [3.0, 0.0]])
    assert _gate(capacity_factor=None).eval()(x).n_assignments == 4
    g = _gate(capacity_factor=1.0, eval_capacity_factor=2.0)
    assert g.eval().capacity(4) == 4 and g.train().capacity(4) == 2


def test_jitter_only_in_training():
    torch.manual_seed(0)
    g = SwitchGate(4, 3, capacity_factor=None, jitter_eps=0.5)
    x = torch.randn(6, 4)
    g.eval()
    assert torch.equal(g(x).weight, g(x).weight)
    g.train()
    w1, w2 = g(x).logits, g(x).logits
    assert not torch.equal(w1, w2)
    # Multiplicative jitter in [1 - eps, 1 + eps] bounds each logit's change.
    clean = x @ g.weight.detach().T
    bound = 0.5 * (x.abs() @ g.weight.detach().abs().T)
    assert bool(((w1.detach() - clean).abs() <= bound + 1e-6).all())


@pytest.mark.parametrize("kw,match", [({"capacity_factor": 0.0}, "capacity_factor"), ({"jitter_eps": 1.5}, "jitter_eps")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        SwitchGate(4, 2, **kw)
