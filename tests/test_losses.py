"""`gatedmoe.losses` against hand computations: the three balance scopes and the count
before or after capacity drops."""

from __future__ import annotations

import pytest
import torch

from gatedmoe import MoE
from gatedmoe.losses import (
    expert_fractions,
    global_batch_balance_loss,
    load_balance_loss,
    sequence_balance_loss,
)
from gatedmoe.routing import Routing

# Two sequences of two tokens, E=2, top-1: tokens 0, 2, 3 on expert 0, token 1 on expert 1.
PROBS = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.8, 0.2], [0.9, 0.1]])


def _routing(probs: torch.Tensor = PROBS, grad: bool = False) -> Routing:
    top_p, top_e = probs.max(-1, keepdim=True)
    return Routing.from_topk(top_p, top_e, 2, probs=probs.clone().requires_grad_(grad))


def test_micro_batch_loss_by_hand():
    # f = [3/4, 1/4], P = [0.65, 0.35]: 2 * (0.4875 + 0.0875)
    r = _routing()
    assert float(load_balance_loss(r)) == pytest.approx(1.15)
    assert expert_fractions(r).tolist() == [0.75, 0.25]


def test_sequence_loss_by_hand():
    # seq 0: f = [1/2, 1/2], P = [0.45, 0.55] -> 1.0; seq 1: f = [1, 0], P = [0.85, 0.15] -> 1.7
    r = _routing()
    assert float(sequence_balance_loss(r, seq_len=2)) == pytest.approx(1.35)
    # One sequence: the micro-batch loss.
    assert float(sequence_balance_loss(r, seq_len=4)) == pytest.approx(1.15)
    # DeepSeek-V3 normalises the affinities: scaled probabilities give the same loss.
    scaled = _routing(PROBS * 3.0)
    assert float(sequence_balance_loss(scaled, seq_len=2)) == pytest.approx(1.35)
    with pytest.raises(ValueError, match="multiple of seq_len=3"):
        sequence_balance_loss(r, seq_len=3)


def test_global_batch_loss_by_hand_and_gradient_through_probs_only():
    r = _routing(grad=True)
    # f from the global counts [1, 3]: [0.25, 0.75]; P = [0.65, 0.35]: 2 * (0.1625 + 0.2625)
    loss = global_batch_balance_loss(r, torch.tensor([1, 3]))
    assert float(loss.detach()) == pytest.approx(0.85)
    loss.backward()
    # d/dprobs[t, e] = E * f_e / T
    assert r.probs.grad.tolist() == [[0.125, 0.375]] * 4
    assert float(global_batch_balance_loss(_routing(), torch.tensor([3, 1]))) == pytest.approx(1.15)


def _switch_57_of_64() -> tuple[MoE, torch.Tensor]:
    """Switch layer, E=8, capacity factor 1 (C=8): 57 of 64 tokens on expert 0, one token
    on each other expert."""
    moe = MoE(8, 8, 4, gate="switch", gate_kwargs={"capacity_factor": 1.0, "jitter_eps": 0.0})
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(8))
    expert_of_token = torch.tensor([0] * 57 + list(range(1, 8)))
    return moe, 10.0 * torch.nn.functional.one_hot(expert_of_token, 8).float()


def test_switch_counts_tokens_before_capacity_by_default():
    moe, x = _switch_57_of_64()
    moe(x)
    r = moe.last_routing
    assert r.n_dropped == 49 and r.counts.tolist() == [8] + [1] * 7
    assert float(expert_fractions(r)[0]) == pytest.approx(57 / 64)  # 0.89: the paper's f
    assert float(expert_fractions(r, count="kept")[0]) == pytest.approx(8 / 15)  # 0.53
    P_E = r.probs.detach().mean(0)
    f_E = torch.tensor([57.0] + [1.0] * 7) / 64
    assert moe.aux_losses["load_balance"].item() == pytest.approx(0.01 * 8 * float((f_E * P_E.detach()).sum()), rel=1e-6)
    kept = MoE.from_config(moe.config.replace(load_balance_count="kept"))
    kept.load_state_dict(moe.state_dict())
    kept(x)
    f_kept = torch.tensor([8.0] + [1.0] * 7) / 15
    assert kept.aux_losses["load_balance"].item() == pytest.approx(0.01 * 8 * float((f_kept * P_E.detach()).sum()), rel=1e-6)


def test_layer_capacity_keeps_the_routing_before_the_drop():
    moe = MoE(8, 4, 16, k=1, capacity_factor=0.5)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0] = 1.0
    moe(torch.rand(8, 8) + 0.1)
    r = moe.last_routing
    assert r.counts.tolist() == [1, 0, 0, 0] and r.routed.counts.tolist() == [8, 0, 0, 0]
    assert r.routed.before_capacity is None
