"""Tests of src/gatedmoe/layers/multi_head.py."""

import pytest
import torch

from gatedmoe import aux_loss
from gatedmoe.layers import MultiHeadMoE
from helpers import assert_close


def test_sub_tokens_routed_independently():
    torch.manual_seed(0)
    m = MultiHeadMoE(12, n_heads=3, n_experts=4, d_hidden=8, k=1)
    x = torch.randn(2, 5, 12)
    y = m(x)
    r = m.moe.last_routing.validate()
    assert r.n_tokens == 2 * 5 * 3
    # Formula: merge(concat_h MoE(split_h(head(x)))).
    sub = m.head_proj(x).reshape(2, 5, 3, 4)
    want = m.merge_proj(m.moe(sub).reshape(2, 5, 12))
    assert_close("mh-moe", want.detach(), y.detach())
    (y.sum() + aux_loss(m)).backward()
    assert m.moe.gate.weight.grad is not None and m.head_proj.weight.grad is not None


def test_hash_gate_token_ids_repeat_per_head():
    m = MultiHeadMoE(8, n_heads=2, n_experts=4, d_hidden=8, gate="hash", gate_kwargs={"vocab_size": 20})
    ids = torch.tensor([[3, 4, 3]])
    m(torch.randn(1, 3, 8), token_ids=ids)
    experts = m.moe.last_routing.combine_matrix().argmax(-1).reshape(3, 2)
    assert torch.equal(experts[0], experts[2]) and experts[0, 0] == experts[0, 1]


def test_bad_heads():
    with pytest.raises(ValueError, match="n_heads"):
        MultiHeadMoE(10, n_heads=3, n_experts=4, d_hidden=8)


def test_inner_moe_carries_the_config():
    from gatedmoe import MoEConfig

    cfg = MoEConfig(d_model=4, n_experts=4, d_hidden=8, gate="sigmoid", k=1, capacity_factor=2.0)
    m = MultiHeadMoE.from_config(cfg, n_heads=3)
    assert m.d_model == 12 and m.config == cfg and m.moe.config == cfg
    assert m(torch.randn(2, 5, 12)).shape == (2, 5, 12)
    assert MultiHeadMoE(12, n_heads=3, n_experts=4, d_hidden=8, gate="sigmoid", k=1, capacity_factor=2.0).moe.config == cfg
    with pytest.raises(ValueError, match="n_heads"):
        MultiHeadMoE.from_config(cfg, n_heads=0)
