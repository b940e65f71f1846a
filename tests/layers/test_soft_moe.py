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
