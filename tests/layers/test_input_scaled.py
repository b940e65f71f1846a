"""`InputScaledMoE` against its formula ``y_t = sum_{e in topk(t)} f_e(g_te x_t) + shared(x_t)``,
computed by a loop over assignments with `ExpertBank.expert_forward` (``ref_*``)."""

from __future__ import annotations

import pytest
import torch

from gatedmoe.gates import SigmoidGate
from gatedmoe.layers import InputScaledMoE
from helpers import assert_close, assert_layer_matches_reference


def _ref(layer: InputScaledMoE, x_TD: torch.Tensor) -> torch.Tensor:
    r = layer.gate(x_TD)
    y = torch.zeros_like(x_TD)
    for t, e, g in zip(r.token.tolist(), r.expert.tolist(), r.weight.unbind(0), strict=True):
        y[t] = y[t] + layer.experts.expert_forward(e, (g * x_TD[t]).unsqueeze(0))[0]
    return y + (layer.shared(x_TD) if layer.shared is not None else 0)


@pytest.mark.parametrize("T,D,k,shared", [(1, 24, 1, 0), (63, 24, 2, 1), (17, 40, 3, 0)])
def test_outputs_and_every_gradient_match_the_formula(T, D, k, shared):
    torch.manual_seed(0)
    layer = InputScaledMoE(
        D, 5, 16, gate=SigmoidGate(D, 5, k=k, normalize=False), n_shared_experts=shared,
        load_balance_weight=0.0, router_z_weight=0.0,
    )  # fmt: skip
    assert_layer_matches_reference(layer, _ref, torch.randn(T, D))


def test_all_tokens_on_one_expert_and_idle_experts():
    torch.manual_seed(0)
    layer = InputScaledMoE(8, 4, 16, gate=SigmoidGate(8, 4, k=1, normalize=False), load_balance_weight=0.0)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[2] = 1.0
    x = torch.rand(9, 8) + 0.1  # every logit of expert 2 is the largest
    assert layer.gate(x).counts.tolist() == [0, 0, 9, 0]
    assert_close("output", _ref(layer, x), layer(x))


def test_differs_from_output_weighting():
    # The point of the variant: f(g x) != g f(x) for a SwiGLU expert.
    torch.manual_seed(0)
    layer = InputScaledMoE(8, 4, 16, gate=SigmoidGate(8, 4, k=1, normalize=False), load_balance_weight=0.0)
    x = torch.randn(5, 8)
    r = layer.gate(x)
    out_weighted = torch.zeros_like(x).index_add(
        0, r.token, torch.stack([layer.experts.expert_forward(e, x[t : t + 1])[0] for t, e in zip(r.token.tolist(), r.expert.tolist(), strict=True)]) * r.weight.unsqueeze(-1)
    )
    assert not torch.allclose(out_weighted, layer(x), atol=1e-4)
