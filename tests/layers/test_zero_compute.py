"""`ZeroComputeMoE` against its formula ``y_t = sum_{e < E_f} g_te f_e(x_t) + (sum_{e >= E_f}
g_te) x_t + shared(x_t)``, computed by a loop over assignments with
`ExpertBank.expert_forward` (``ref_*``)."""

from __future__ import annotations

import pytest
import torch

from gatedmoe.layers import ZeroComputeMoE
from helpers import assert_close, assert_layer_matches_reference


def _ref(layer: ZeroComputeMoE, x_TD: torch.Tensor) -> torch.Tensor:
    r = layer.gate(x_TD)
    E_f = layer.experts.n_experts
    y = torch.zeros_like(x_TD)
    for t, e, g in zip(r.token.tolist(), r.expert.tolist(), r.weight.unbind(0), strict=True):
        f = layer.experts.expert_forward(e, x_TD[t].unsqueeze(0))[0] if e < E_f else x_TD[t]
        y[t] = y[t] + g * f
    return y + (layer.shared(x_TD) if layer.shared is not None else 0)


@pytest.mark.parametrize("T,D,k,Z,shared", [(1, 24, 1, 1, 0), (63, 24, 2, 2, 1), (17, 40, 3, 3, 0), (17, 40, 2, 0, 0)])
def test_outputs_and_every_gradient_match_the_formula(T, D, k, Z, shared):
    torch.manual_seed(0)
    layer = ZeroComputeMoE(
        D, 6, 16, n_zero_experts=Z, k=k, n_shared_experts=shared, load_balance_weight=0.0, router_z_weight=0.0,
    )  # fmt: skip
    assert layer.experts.n_experts == 6 - Z
    # A part no assignment reached: no gradient in the loop, zeros through the backend.
    assert_layer_matches_reference(layer, _ref, torch.randn(T, D), missing_is_zero=True)


@pytest.mark.parametrize("target", [5, 1])
def test_all_tokens_on_one_expert(target):
    # All on an identity expert (y = g x, the bank idle), or all on one of the bank's.
    torch.manual_seed(0)
    layer = ZeroComputeMoE(8, 6, 16, n_zero_experts=2, k=1, load_balance_weight=0.0, router_z_weight=0.0)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[target] = 1.0
    x = torch.rand(9, 8) + 0.1
    r = layer.gate(x)
    assert r.counts.tolist() == [9 if e == target else 0 for e in range(6)]
    assert_close("output", _ref(layer, x), layer(x))
    if target >= 4:
        assert_close("identity", r.combine_matrix()[:, target : target + 1] * x, layer(x))


def test_bad_n_zero_experts():
    for bad in (-1, 6, 2.0, True):
        with pytest.raises(ValueError, match="n_zero_experts"):
            ZeroComputeMoE(8, 6, 16, n_zero_experts=bad)
