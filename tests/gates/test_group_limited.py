"""Tests of src/gatedmoe/gates/group_limited.py (and functional.group_limited_topk)."""

import math

import pytest
import torch

from gatedmoe.gates import GroupLimitedGate
from gatedmoe.gates.functional import group_limited_topk
from helpers import assert_close


def _logit(p):
    return math.log(p / (1 - p))


def hf_deepseek_v3_router(logits, bias, k, n_group, topk_group, norm, rsf, mask_value=0.0):
    """Hugging Face DeepseekV3TopkRouter.forward after the linear layer, transcribed
    (transformers 4.x masks dropped groups with 0.0, >= 5.23 with -inf)."""
    E = logits.shape[-1]
    scores = logits.sigmoid()
    choice = scores + bias.unsqueeze(0)
    group_scores = choice.view(-1, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(-1, E)
    choice = choice.masked_fill(~score_mask.bool(), mask_value)
    idx = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
    w = scores.gather(1, idx)
    if norm:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, w * rsf


def _dense(weights, experts, E):
    return torch.zeros(weights.shape[0], E, dtype=weights.dtype).scatter(1, experts, weights)


def test_hand_example_groups_and_scaling():
    # s = [0.9, 0.1 | 0.6, 0.5]: group scores 1.0 and 1.1, so group 1 wins although
    # expert 0 has the best score; weights 2.5 * [0.6, 0.5] / 1.1.
    logits = torch.tensor([[_logit(0.9), _logit(0.1), _logit(0.6), _logit(0.5)]], dtype=torch.float64)
    w, e, s = group_limited_topk(logits, k=2, n_group=2, topk_group=1, scale=2.5)
    assert sorted(e[0].tolist()) == [2, 3]
    got = _dense(w, e, 4)
    want = torch.tensor([[0.0, 0.0, 2.5 * 0.6 / 1.1, 2.5 * 0.5 / 1.1]], dtype=torch.float64)
    assert_close("weights", want, got)
    # A bias of -0.3 on expert 3 flips the group choice (1.0 > 0.8) but never enters a weight.
    bias = torch.tensor([0.0, 0.0, 0.0, -0.3], dtype=torch.float64)
    w, e, _ = group_limited_topk(logits, 2, 2, 1, bias_E=bias, scale=2.5)
    want = torch.tensor([[2.5 * 0.9, 2.5 * 0.1, 0.0, 0.0]], dtype=torch.float64)
    assert_close("biased weights", want, _dense(w, e, 4))
    # Without normalisation: scale * s.
    w, e, _ = group_limited_topk(logits, 2, 2, 1, normalize=False, scale=2.5)
    assert_close("unnormalised", torch.tensor([[0, 0, 1.5, 1.25]], dtype=torch.float64), _dense(w, e, 4))


@pytest.mark.parametrize("E,k,n_group,topk_group", [(8, 2, 4, 2), (16, 4, 4, 3), (12, 3, 3, 1), (8, 8, 2, 2)])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("mask_value", [0.0, float("-inf")])
def test_matches_hugging_face_router(E, k, n_group, topk_group, norm, mask_value):
    g = torch.Generator().manual_seed(E * 100 + k)
    logits = torch.randn(37, E, generator=g, dtype=torch.float64) * 2
    # Biases of both signs, large enough that some kept scores go negative (the mask matters).
    bias = torch.randn(E, generator=g, dtype=torch.float64) * 0.8
    ref_idx, ref_w = hf_deepseek_v3_router(logits, bias, k, n_group, topk_group, norm, 2.5, mask_value)
    fast_w, fast_idx, _ = group_limited_topk(logits, k, n_group, topk_group, bias, norm, 2.5, mask_value)
    assert_close("dense weights", _dense(ref_w, ref_idx, E), _dense(fast_w, fast_idx, E))


def test_default_masks_dropped_groups_with_minus_inf():
    # Biases push every selection score below 0: with -inf only experts of the kept groups
    # are chosen (transformers >= 5.23, torchtitan); masking with 0 picks dropped ones.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8, generator=g, dtype=torch.float64)
    bias = -2.0 - torch.rand(8, generator=g, dtype=torch.float64)
    _, default_idx, _ = group_limited_topk(logits, 3, 4, 2, bias)
    ref_idx, _ = hf_deepseek_v3_router(logits, bias, 3, 4, 2, True, 1.0, float("-inf"))
    assert torch.equal(default_idx.sort(-1).values, ref_idx.sort(-1).values)
    _, zero_idx, _ = group_limited_topk(logits, 3, 4, 2, bias, mask_value=0.0)
    assert not torch.equal(default_idx.sort(-1).values, zero_idx.sort(-1).values)
    gate = GroupLimitedGate(8, 8, k=3, n_group=4, topk_group=2)
    assert gate.mask_value == float("-inf")
    gate.e_score_correction_bias.copy_(bias.float())
    x = torch.randn(64, 8, generator=g)
    r = gate(x)
    ref_idx, ref_w = hf_deepseek_v3_router((x @ gate.weight.detach().T).double(), bias, 3, 4, 2, True, 1.0, float("-inf"))
    assert_close("combine", _dense(ref_w, ref_idx, 8).float(), r.combine_matrix().detach())


def test_gate_routing_and_bias_buffer():
    torch.manual_seed(0)
    gate = GroupLimitedGate(6, 8, k=2, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    gate.e_score_correction_bias.copy_(torch.linspace(-0.1, 0.1, 8))
    x = torch.randn(9, 6)
    r = gate(x).validate()
    logits = x @ gate.weight.detach().T
    ref_idx, ref_w = hf_deepseek_v3_router(logits.double(), gate.e_score_correction_bias.double(), 2, 4, 2, True, 2.5, gate.mask_value)
    assert_close("combine", _dense(ref_w, ref_idx, 8).float(), r.combine_matrix().detach())
    assert "balancer.bias" in dict(gate.named_buffers())
    # update_rate 0: the bias stays as loaded, in training too.
    before = gate.e_score_correction_bias.clone()
    gate.train()
    gate(x)
    assert torch.equal(before, gate.e_score_correction_bias)


def test_bias_update_when_rate_positive():
    torch.manual_seed(0)
    gate = GroupLimitedGate(4, 4, k=1, n_group=2, topk_group=1, bias_update_rate=0.1)
    r = gate(torch.randn(16, 4))
    c = r.counts.float()
    assert_close("bias step", 0.1 * torch.sign(c.mean() - c), gate.e_score_correction_bias)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_group": 3}, "n_group"),
        ({"n_group": 8}, "n_group"),
        ({"n_group": 2, "topk_group": 3}, "topk_group"),
        ({"n_group": 4, "topk_group": 1, "k": 3}, "k="),
        ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
        ({"k": 9}, "k must"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupLimitedGate(4, 8, **kwargs)


def test_group_limited_mask_value_changes_selection_only_for_negative_scores():
    # 4 experts in 2 groups, 1 group kept, k = 2; expert scores s = sigmoid(0) = 0.5.
    # Bias makes group 0 win (top-2 sum) but its expert 1 score negative.
    kw = dict(k=2, n_group=2, topk_group=1)
    zero, inf = GroupLimitedGate(2, 4, mask_value=0.0, **kw), GroupLimitedGate(2, 4, mask_value=float("-inf"), **kw)
    for g in (zero, inf):
        torch.nn.init.zeros_(g.weight)
        g.balancer.bias.copy_(torch.tensor([2.0, -1.0, -0.2, -0.3]))
    x = torch.zeros(1, 2)
    assert zero(x).expert.tolist() == [0, 2]  # masked experts score 0 > -0.5
    assert inf(x).expert.tolist() == [0, 1]  # only the kept group
    with pytest.raises(ValueError, match="mask_value"):
        GroupLimitedGate(2, 4, mask_value=1.0, **kw)
