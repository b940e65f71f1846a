"""Tests of src/gatedmoe/gates/gumbel.py."""

import pytest
import torch

from gatedmoe.gates import GumbelSoftmaxGate
from helpers import assert_close


def _gate(**kw):
    torch.manual_seed(0)
    return GumbelSoftmaxGate(4, 3, **kw)


def _logits(g, x):
    return (x.double() @ g.linear.weight.detach().double().T + g.linear.bias.detach().double())


def test_eval_is_softmax_over_tau():
    g = _gate(tau=0.5).eval()
    x = torch.randn(5, 4)
    want = torch.softmax(_logits(g, x) / 0.5, -1)
    assert_close("eval soft", want.float(), g(x).combine_matrix().detach())
    g.hard = True
    r = g(x).validate()
    assert torch.equal(r.combine_matrix().argmax(-1), want.argmax(-1)) and bool((r.weight == 1).all())


def test_training_sample_matches_formula():
    g = _gate(tau=0.7).train()
    x = torch.randn(5, 4)
    torch.manual_seed(123)
    got = g(x).combine_matrix().detach()
    torch.manual_seed(123)
    u = torch.rand(5, 3)
    noise = -torch.log(-torch.log(u.double()))
    want = torch.softmax((_logits(g, x) + noise) / 0.7, -1)
    assert_close("gumbel sample", want.float(), got)


def test_hard_straight_through_gradient():
    g = _gate(tau=1.0, hard=True).train()
    x = torch.randn(6, 4)
    torch.manual_seed(5)
    r = g(x)
    assert bool((r.weight.detach() == 1).all()) and r.n_assignments == 6
    r.weight.sum().backward()
    torch.manual_seed(5)
    u = torch.rand(6, 3)
    h = (x @ g.linear.weight.detach().T + g.linear.bias.detach()) - torch.log(-torch.log(u))
    W = g.linear.weight.detach().clone().requires_grad_(True)
    h = (x @ W.T + g.linear.bias.detach()) - torch.log(-torch.log(u))
    y = torch.softmax(h, -1)
    y.gather(-1, y.argmax(-1, keepdim=True)).sum().backward()
    assert_close("straight-through grad", W.grad, g.linear.weight.grad)


def test_monte_carlo_eval():
    g = _gate(eval_samples=20, hard=True).eval()
    r = g(torch.randn(4, 4)).validate()
    assert_close("mc rows sum to 1", torch.ones(4), r.combine_matrix().sum(-1))


@pytest.mark.parametrize("kw,match", [({"tau": 0.0}, "tau"), ({"eval_samples": -1}, "eval_samples")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        GumbelSoftmaxGate(4, 3, **kw)
