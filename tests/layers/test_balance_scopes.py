"""`MoE`'s load-balance scopes and step-wise bias balancing, single process (the
multi-rank side is in tests/parallel)."""

from __future__ import annotations

import pytest
import torch

from gatedmoe import MoE, MoEConfig, aux_loss, balance_step
from gatedmoe.gates.balancing import BiasBalancer
from gatedmoe.losses import global_batch_balance_loss, load_balance_loss, sequence_balance_loss


def test_sequence_scope_takes_sequences_from_the_batch_dims():
    torch.manual_seed(0)
    moe = MoE(8, 4, 16, k=2, load_balance_scope="sequence", load_balance_weight=1.0)
    x = torch.randn(3, 5, 8)
    moe(x)
    expected = sequence_balance_loss(moe.last_routing, seq_len=5)
    assert moe.aux_losses["load_balance"].item() == pytest.approx(expected.item())
    assert expected.item() != pytest.approx(load_balance_loss(moe.last_routing).item())
    # A 2-D input is one sequence; route alone too.
    moe(x.reshape(15, 8))
    assert moe.aux_losses["load_balance"].item() == pytest.approx(load_balance_loss(moe.last_routing).item())


def test_global_batch_scope_accumulates_over_micro_batches_until_balance_step():
    torch.manual_seed(0)
    moe = MoE(8, 4, 16, k=2, load_balance_scope="global_batch", load_balance_weight=1.0).train()
    xs = torch.randn(3, 6, 8)
    moe(xs[0])
    c1 = moe.last_routing.counts
    assert moe.aux_losses["load_balance"].item() == pytest.approx(load_balance_loss(moe.last_routing).item())
    moe(xs[1])
    c2 = moe.last_routing.counts
    expected = global_batch_balance_loss(moe.last_routing, c1 + c2)
    assert moe.aux_losses["load_balance"].item() == pytest.approx(expected.item())
    # Evaluation neither reads nor adds to the step's counts.
    with torch.no_grad():
        moe(xs[2])
    assert moe.aux_losses["load_balance"].item() == pytest.approx(load_balance_loss(moe.last_routing).item())
    balance_step(moe)
    moe(xs[2])
    assert moe.aux_losses["load_balance"].item() == pytest.approx(load_balance_loss(moe.last_routing).item())


@pytest.mark.parametrize("gate", ["sigmoid", "topk_softmax"])
def test_bias_update_once_per_step_from_accumulated_counts(gate):
    torch.manual_seed(1)
    moe = MoE(8, 4, 16, k=1, gate=gate, bias_update_rate=0.1, bias_update_every="step").train()
    assert moe.gate.balancer.every == "step"
    counts = torch.zeros(4, dtype=torch.long)
    for x in torch.randn(3, 7, 8):
        (moe(x).sum() + aux_loss(moe)).backward()
        counts += moe.last_routing.counts
        assert not moe.gate.balancer.bias.any()  # nothing moves inside the step
    balance_step(moe)
    expected = BiasBalancer(4, 0.1)
    expected.update(counts)
    assert torch.equal(moe.gate.balancer.bias, expected.bias)
    assert moe.gate.balancer.pending is None
    balance_step(moe)  # an empty step leaves the bias alone
    assert torch.equal(moe.gate.balancer.bias, expected.bias)


def test_per_forward_bias_update_is_still_the_default():
    moe = MoE(8, 4, 16, k=1, gate="sigmoid", bias_update_rate=0.1).train()
    moe(torch.randn(9, 8))
    assert moe.gate.balancer.every == "forward" and moe.gate.balancer.bias.abs().sum() > 0
    before = moe.gate.balancer.bias.clone()
    balance_step(moe)
    assert torch.equal(before, moe.gate.balancer.bias)


@pytest.mark.parametrize(
    "field, value",
    [("load_balance_scope", "batch"), ("load_balance_count", "after"), ("bias_update_every", "epoch")],
)
def test_bad_balance_settings_raise(field, value):
    with pytest.raises(ValueError, match=f"{field} must be one of"):
        MoEConfig(d_model=8, n_experts=4, d_hidden=16, **{field: value})
    with pytest.raises(ValueError, match="every must be one of"):
        BiasBalancer(4, 0.1, every="epoch")
