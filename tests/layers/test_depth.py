"""Tests of src/gatedmoe/layers/depth.py."""

import pytest
import torch

from gatedmoe import MoE
from gatedmoe.layers import MixtureOfDepths
from helpers import assert_close


def test_top_c_tokens_processed_rest_skip():
    torch.manual_seed(0)
    block = torch.nn.Linear(4, 4)
    mod = MixtureOfDepths(block, 4, capacity=0.5)
    with torch.no_grad():
        mod.router.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    x = torch.randn(1, 6, 4)
    x[0, :, 0] = torch.tensor([0.1, 3.0, -1.0, 2.0, 0.5, 1.0])  # router weight r = x[..., 0]
    y = mod(x)
    chosen = [1, 3, 5]  # C = 3 largest r, in position order
    want = x.clone()
    for t in chosen:
        want[0, t] = x[0, t] + x[0, t, 0] * block(x[0, t])
    assert_close("mod", want.detach(), y.detach())
    r = mod.last_routing.validate()
    assert r.token.tolist() == chosen and r.counts.tolist() == [3]
    y.sum().backward()
    assert mod.router.weight.grad.abs().sum() > 0


def test_with_moe_block_and_batches():
    torch.manual_seed(0)
    mod = MixtureOfDepths(MoE(8, 4, 16, k=2), 8, capacity=0.25)
    y = mod(torch.randn(3, 8, 8))
    assert y.shape == (3, 8, 8)
    assert mod.last_routing.n_assignments == 3 * 2


def test_bad_capacity():
    with pytest.raises(ValueError, match="capacity"):
        MixtureOfDepths(torch.nn.Identity(), 4, capacity=0.0)
