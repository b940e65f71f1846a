"""Tests of src/gatedmoe/gates/cosine.py."""

import math

import pytest
import torch

from gatedmoe.gates import CosineGate
from helpers import assert_close


def test_cosine_logits_formula():
    torch.manual_seed(0)
    g = CosineGate(6, 4, k=2, d_proj=3, init_temperature=0.5)
    x = torch.randn(5, 6)
    h = x.double() @ g.proj.weight.detach().double().T
    e = g.expert_embeddings.detach().double()
    cos = (h @ e.T) / (h.norm(dim=-1, keepdim=True) * e.norm(dim=-1))
    assert_close("logits", (cos / 0.5).float(), g.router_logits(x).detach())
    r = g(x).validate()
    p = torch.softmax(cos / 0.5, -1)
    top = torch.topk(p, 2, -1)
    want = torch.zeros_like(p).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    assert_close("weights", want.float(), r.combine_matrix().detach())


def test_hand_value_and_temperature_clamp():
    g = CosineGate(2, 2, k=1, d_proj=2, init_temperature=1.0)
    with torch.no_grad():
        g.proj.weight.copy_(torch.eye(2))
        g.expert_embeddings.copy_(torch.tensor([[2.0, 0.0], [0.0, 5.0]]))
    # x = (1, 1): cos = (1/sqrt2, 1/sqrt2) with both experts; x = (3, 0): (1, 0).
    logits = g.router_logits(torch.tensor([[1.0, 1.0], [3.0, 0.0]]))
    assert_close("logits", torch.tensor([[2**-0.5, 2**-0.5], [1.0, 0.0]]), logits.detach())
    with torch.no_grad():
        g.log_inv_temperature.fill_(math.log(1e4))
    assert math.isclose(float(g.temperature.detach()), 0.01, rel_tol=1e-6)


@pytest.mark.parametrize("kw,match", [({"d_proj": 0}, "d_proj"), ({"init_temperature": 0.0}, "init_temperature")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        CosineGate(4, 4, **kw)
