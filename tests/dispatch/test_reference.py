"""The readable end-to-end reference agrees with the library's parts."""

import torch

from gatedmoe import MoE
from gatedmoe.dispatch import reference_moe
from helpers import assert_close


def test_reference_moe_equals_library_layer():
    moe = MoE(16, n_experts=5, d_hidden=24, k=2, backend="grouped")
    x = torch.randn(30, 16)
    y = moe(x)
    ref_y, ref_losses = reference_moe(x, moe.gate.weight, moe.experts.w_in, moe.experts.w_out, k=2)
    assert_close("y", ref_y, y)
    assert_close("load_balance", ref_losses["load_balance"] * moe.load_balance_weight, moe.aux_losses["load_balance"])
    assert_close("router_z", ref_losses["router_z"] * moe.router_z_weight, moe.aux_losses["router_z"])


def test_load_balance_is_one_for_uniform_router():
    # Zero router: every prob is 1/E, and ties make top-k pick experts 0..k-1, so
    # f = (1/2, 1/2, 0, 0), P = 1/4 each -> E * sum f P = 4 * 1/4 = 1.
    w_in = torch.randn(4, 16, 8)
    w_out = torch.randn(4, 8, 8)
    _, losses = reference_moe(torch.randn(6, 8), torch.zeros(4, 8), w_in, w_out, k=2)
    assert abs(losses["load_balance"].item() - 1.0) < 1e-6
    assert abs(losses["router_z"].item() - torch.log(torch.tensor(4.0)).item() ** 2) < 1e-5
