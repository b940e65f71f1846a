"""Tests of src/gatedmoe/gates/modified_softmax.py."""

import pytest
import torch

from gatedmoe.gates import ModifiedSoftmaxGate
from helpers import assert_close


def _manual(g, x, M):
    W, b = g.linear.weight.detach().double(), g.linear.bias.detach().double()
    return torch.softmax(M(x.double()) @ W.T + b, -1)


@pytest.mark.parametrize("transform", ["tanh", "l2norm", "layernorm", "learned"])
def test_formula(transform):
    torch.manual_seed(0)
    g = ModifiedSoftmaxGate(5, 3, transform=transform)
    x = torch.randn(4, 5) * 3

    def M(z):
        if transform == "tanh":
            return torch.tanh(z)
        if transform == "l2norm":
            return z / z.norm(dim=-1, keepdim=True)
        if transform == "layernorm":
            mu, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
            return (z - mu) / torch.sqrt(var + 1e-5)
        A, c = g.input_map.weight.detach().double(), g.input_map.bias.detach().double()
        return torch.tanh(z @ A.T + c)

    r = g(x).validate()
    assert r.n_assignments == 12
    assert_close("weights", _manual(g, x, M).float(), r.combine_matrix().detach())


def test_hand_value_tanh():
    g = ModifiedSoftmaxGate(1, 2, transform="tanh")
    with torch.no_grad():
        g.linear.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        g.linear.bias.zero_()
    # M(x) = tanh(100) ~ 1: logits (1, -1), g_0 = 1 / (1 + e^-2), bounded whatever x.
    w = g(torch.tensor([[100.0]])).combine_matrix()[0, 0].item()
    assert abs(w - 1 / (1 + torch.exp(torch.tensor(-2.0)).item())) < 1e-6


def test_topk_option():
    torch.manual_seed(0)
    g = ModifiedSoftmaxGate(5, 4, k=2)
    r = g(torch.randn(3, 5)).validate()
    assert r.experts_per_token().tolist() == [2, 2, 2]
    assert_close("sum to one", torch.ones(3), r.combine_matrix().sum(-1).detach())


@pytest.mark.parametrize("kw,match", [({"transform": "cube"}, "transform"), ({"k": 5}, "k must")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        ModifiedSoftmaxGate(4, 4, **kw)
