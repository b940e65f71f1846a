"""Tests of src/gatedmoe/layers/deep.py."""

import pytest
import torch

from gatedmoe import aux_loss
from gatedmoe.layers import DeepMoE
from helpers import assert_close


def test_stacked_formula_and_losses():
    torch.manual_seed(0)
    m = DeepMoE(8, n_experts=4, d_hidden=16, n_layers=2, gate="topk_softmax", k=2)
    x = torch.randn(5, 8)
    y = m(x)
    l1, l2 = m.layers
    assert_close("deep", l2(torch.relu(l1(x))).detach(), y.detach())
    assert set(l1.aux_losses) == set(l2.aux_losses) == {"load_balance", "router_z"}
    (y.sum() + aux_loss(m)).backward()
    assert l1.gate.weight.grad.abs().sum() > 0 and l2.gate.weight.grad.abs().sum() > 0


def test_residual_and_token_ids():
    torch.manual_seed(0)
    m = DeepMoE(8, 4, 16, n_layers=3, nonlinearity=None, residual=True, gate="hash")
    x = torch.randn(2, 3, 8)
    ids = torch.arange(6).reshape(2, 3)
    z = x
    for layer in m.layers:
        z = z + layer(z, token_ids=ids)
    assert_close("residual", z.detach(), m(x, token_ids=ids).detach())


@pytest.mark.parametrize("kw,match", [({"n_layers": 0}, "n_layers"), ({"nonlinearity": "tanh"}, "nonlinearity")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        DeepMoE(8, 4, 16, **kw)


def test_every_layer_carries_the_config():
    from gatedmoe import MoEConfig

    cfg = MoEConfig(d_model=8, n_experts=4, d_hidden=16, gate="sigmoid", k=1, capacity_factor=1.5)
    m = DeepMoE.from_config(cfg, n_layers=3, residual=True)
    assert m.config == cfg and len(m.layers) == 3 and all(layer.config == cfg for layer in m.layers)
    assert m.residual and m(torch.randn(4, 8)).shape == (4, 8)
    kw = DeepMoE(8, 4, 16, gate="sigmoid", k=1, capacity_factor=1.5)
    assert kw.config == cfg and all(layer.config == cfg for layer in kw.layers)
