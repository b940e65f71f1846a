"""Tests of src/gatedmoe/layers/soft_moe.py."""

import pytest
import torch

from gatedmoe.layers import SoftMoE
from helpers import assert_close


def _manual(m, x_BTD):
    out = []
    for x in x_BTD.double():
        L = x @ m.phi.detach().double()
        if m.normalize:
            L = m.scale.detach().double() * (
                torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(m.phi.detach().double(), dim=0)
            )
        Dw, Cw = torch.softmax(L, 0), torch.softmax(L, 1)
        slots = Dw.T @ x
        S = m.slots_per_expert
        ys = torch.stack([m.experts.double().expert_forward(j // S, slots[j : j + 1])[0] for j in range(slots.shape[0])])
        m.experts.float()
        out.append(Cw @ ys)
    return torch.stack(out)


@pytest.mark.parametrize("S,normalize", [(1, False), (2, True)])
def test_formula(S, normalize):
    torch.manual_seed(0)
    m = SoftMoE(8, 3, 16, slots_per_expert=S, normalize=normalize, backend="grouped")
    x = torch.randn(2, 5, 8)
    assert_close("soft moe", _manual(m, x).float(), m(x).detach(), scale=5)  # two softmaxes and two GEMMs in float32
    # Dispatch columns sum to 1 over tokens, combine rows to 1 over slots.
    assert_close("dispatch", torch.ones(2, 3 * S), m.last_dispatch.sum(1))
    assert_close("combine", torch.ones(2, 5), m.last_combine.sum(2))


def test_backward_and_2d_input():
    torch.manual_seed(0)
    m = SoftMoE(8, 4, 16)
    x = torch.randn(6, 8, requires_grad=True)
    m(x).pow(2).sum().backward()
    assert m.phi.grad.abs().sum() > 0 and m.experts.w_in.grad.abs().sum() > 0 and x.grad is not None


def test_bad_arguments():
    with pytest.raises(ValueError, match="slots_per_expert"):
        SoftMoE(8, 4, 16, slots_per_expert=0)
    with pytest.raises(ValueError, match="x must"):
        SoftMoE(8, 4, 16)(torch.randn(2, 3, 7))


def test_from_config_carries_the_settings_it_honours(monkeypatch):
    from gatedmoe import MoEConfig, TritonOptions

    cfg = MoEConfig(d_model=8, n_experts=3, d_hidden=16, activation="gelu", bias=True, backend="grouped")
    m = SoftMoE.from_config(cfg, slots_per_expert=2, normalize=True)
    assert m.config == cfg and (m.slots_per_expert, m.normalize) == (2, True)
    assert (m.experts.act.name, m.experts.has_bias, m.backend) == ("gelu", True, "grouped")
    with pytest.raises(ValueError, match="NaN"):
        m(torch.full((2, 3, 8), float("nan")))
    # Like every layer (issue 23: NaN reported the same way everywhere), checked by default.
    assert SoftMoE(8, 3, 16).config.check_inputs

    seen = []

    def spy(x_TD, routing, experts, options=None):
        seen.append(options)
        return torch.zeros_like(x_TD)

    import gatedmoe.layers.soft_moe as module

    monkeypatch.setattr(module, "get_backend", lambda name, device: spy)
    opts = TritonOptions(fp32_scatter=True)
    SoftMoE.from_config(cfg.replace(backend="auto", backend_options=opts))(torch.randn(2, 3, 8))
    assert seen == [opts]


@pytest.mark.parametrize("field, value", [("gate", "sigmoid"), ("k", 1), ("load_balance_weight", 0.1),
                                          ("capacity_factor", 1.0), ("n_shared_experts", 1),
                                          ("gate_kwargs", {"noisy": True}), ("bias_update_rate", 1e-3)])
def test_from_config_refuses_settings_it_cannot_honour(field, value):
    from gatedmoe import MoEConfig

    with pytest.raises(ValueError, match=field):
        SoftMoE.from_config(MoEConfig(d_model=8, n_experts=3, d_hidden=16, **{field: value}))
    with pytest.raises(TypeError, match="MoEConfig"):
        SoftMoE.from_config({"d_model": 8})
