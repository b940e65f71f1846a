"""The foundation gates against their papers' formulas, computed by hand in float64."""

import math

import pytest
import torch

from gatedmoe import MoE, aux_loss, gates
from gatedmoe.gates.topk import cv_squared, noisy_topk_load


def _set_router(g, W):
    with torch.no_grad():
        g.weight.copy_(torch.as_tensor(W, dtype=torch.float32))


def test_registry_lists_and_builds():
    for name in ("softmax", "topk_softmax", "sigmoid"):
        assert name in gates.names()
    g = gates.build("topk_softmax", d_model=4, n_experts=3, k=1)
    assert isinstance(g, gates.TopKSoftmaxGate)


def test_unknown_gate_lists_known():
    with pytest.raises(ValueError, match="known gates: .*topk_softmax"):
        gates.build("nope", d_model=4, n_experts=3)


def test_softmax_gate_formula():
    g = gates.SoftmaxGate(2, 3, temperature=2.0)
    _set_router(g, [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x = torch.tensor([[1.0, 2.0]])
    r = g(x).validate()
    l = [1.0 / 2, 2.0 / 2, 3.0 / 2]
    z = sum(math.exp(v) for v in l)
    expected = [math.exp(v) / z for v in l]
    assert r.expert.tolist() == [0, 1, 2]
    assert r.weight.tolist() == pytest.approx(expected, rel=1e-6)
    assert r.probs[0].tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_softmax_formula(renormalize):
    g = gates.TopKSoftmaxGate(2, 4, k=2, renormalize=renormalize)
    _set_router(g, [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    x = torch.tensor([[0.5, 1.5]])
    r = g(x)
    logits = [0.5, 1.5, 2.0, -0.5]
    z = sum(math.exp(v) for v in logits)
    p = [math.exp(v) / z for v in logits]
    kept = {2: p[2], 1: p[1]}
    if renormalize:
        s = p[1] + p[2]
        kept = {e: v / s for e, v in kept.items()}
    assert r.expert.tolist() == [1, 2]
    assert r.weight.tolist() == pytest.approx([kept[1], kept[2]], rel=1e-6)


def test_topk_renormalize_default_depends_on_k():
    assert gates.TopKSoftmaxGate(4, 4, k=1).renormalize is False
    assert gates.TopKSoftmaxGate(4, 4, k=2).renormalize is True


def test_sigmoid_gate_formula_bias_selects_only():
    g = gates.SigmoidGate(2, 3, k=2, scale=2.5, bias_update_rate=0.1)
    _set_router(g, [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    g.balancer.bias.copy_(torch.tensor([0.0, -1.0, 0.0]))  # pushes expert 1 out of the top 2
    g.eval()
    x = torch.tensor([[1.0, 2.0]])
    r = g(x)
    s = [1 / (1 + math.exp(-v)) for v in (1.0, 2.0, 1.5)]
    # selection on s + b: [0.731, -0.119, 0.818] -> experts 0 and 2; weights from s alone
    assert r.expert.tolist() == [0, 2]
    assert r.weight.tolist() == pytest.approx([2.5 * s[0] / (s[0] + s[2]), 2.5 * s[2] / (s[0] + s[2])], rel=1e-6)


def test_sigmoid_bias_update_rule():
    g = gates.SigmoidGate(4, 3, k=1, bias_update_rate=0.01)
    _set_router(g, torch.tensor([[10.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    g.train()
    g(torch.tensor([[1.0, 0, 0, 0]] * 5))  # every token picks expert 0: counts (5, 0, 0), mean 5/3
    assert g.balancer.bias.tolist() == pytest.approx([-0.01, 0.01, 0.01])
    g.eval()
    before = g.balancer.bias.clone()
    g(torch.randn(5, 4))
    assert torch.equal(before, g.balancer.bias)  # no update outside training


def test_noisy_topk_losses_present_in_training_only():
    g = gates.TopKSoftmaxGate(8, 4, k=2, noisy=True)
    g.train()
    r = g(torch.randn(32, 8))
    assert set(g.gate_losses) == {"importance", "load"}
    (g.gate_losses["importance"] + g.gate_losses["load"]).backward()
    assert g.weight.grad is not None and g.noise_weight.grad is not None
    r.validate()
    g.eval()
    g(torch.randn(4, 8))
    assert g.gate_losses == {}


def test_noisy_topk_load_matches_brute_force():
    # P(x, i) = Phi((clean_i - threshold_i) / std_i); threshold = k-th largest of the others.
    torch.manual_seed(3)
    clean = torch.randn(5, 4, dtype=torch.float64)
    std = torch.rand(5, 4, dtype=torch.float64) + 0.5
    noisy = clean + torch.randn(5, 4, dtype=torch.float64) * std
    k = 2
    expected = torch.zeros(4, dtype=torch.float64)
    for t in range(5):
        for i in range(4):
            others = torch.cat([noisy[t, :i], noisy[t, i + 1 :]])
            thr = torch.sort(others, descending=True).values[k - 1]
            expected[i] += 0.5 * (1 + math.erf(((clean[t, i] - thr) / std[t, i]).item() / math.sqrt(2)))
    torch.testing.assert_close(noisy_topk_load(clean, noisy, std, k), expected)


def _noisy_topk_load_formula(clean, noisy, std, k):
    # The estimator as written before k == E was special-cased (the oracle for k < E).
    E = noisy.shape[-1]
    top_vals = torch.topk(noisy, min(k + 1, E), dim=-1).values
    kth = top_vals[:, k - 1 : k]
    kplus1 = top_vals[:, k : k + 1] if k < E else torch.full_like(kth, -float("inf"))
    threshold = torch.where(noisy >= kth, kplus1, kth)
    return torch.distributions.Normal(0.0, 1.0).cdf((clean - threshold) / std).sum(0)


def _load_inputs(T, E, seed):
    torch.manual_seed(seed)
    clean = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    std = (torch.rand(T, E, dtype=torch.float64) + 0.5).requires_grad_()
    noisy = clean + torch.randn(T, E, dtype=torch.float64) * std
    return clean, noisy, std


@pytest.mark.parametrize("k", [1, 2, 3])
def test_noisy_topk_load_below_n_experts_unchanged(k):
    clean, noisy, std = _load_inputs(7, 4, seed=k)
    ref_load, fast_load = _noisy_topk_load_formula(clean, noisy, std, k), noisy_topk_load(clean, noisy, std, k)
    assert torch.equal(ref_load, fast_load)
    g = torch.randn(4, dtype=torch.float64)
    ref_grads = torch.autograd.grad((ref_load * g).sum(), [clean, std], retain_graph=True)
    fast_grads = torch.autograd.grad((fast_load * g).sum(), [clean, std])
    for ref, fast in zip(ref_grads, fast_grads, strict=True):
        assert torch.equal(ref, fast)


def test_noisy_topk_load_with_k_equal_n_experts_is_one_per_token_with_zero_gradients():
    # Every expert is always chosen: P(x, i) = 1. The -inf threshold used to give NaN gradients.
    clean, noisy, std = _load_inputs(7, 4, seed=0)
    load = noisy_topk_load(clean, noisy, std, k=4)
    assert torch.equal(load, torch.full((4,), 7.0, dtype=torch.float64))
    grads = torch.autograd.grad(load.sum(), [clean, std])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    # In the layer: the noise weight's gradient (through the load loss and the weights) is finite.
    moe = MoE(16, 4, 32, k=4, gate_kwargs={"noisy": True}, backend="grouped")
    (moe(torch.randn(8, 16)).square().mean() + aux_loss(moe)).backward()
    for name, p in moe.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_cv_squared():
    v = torch.tensor([1.0, 2.0, 3.0])
    assert cv_squared(v).item() == pytest.approx((2 / 3) / 4, rel=1e-5)
    assert cv_squared(torch.tensor([5.0])).item() == 0.0


@pytest.mark.parametrize("k", [0, 5, -1])
def test_bad_k(k):
    with pytest.raises(ValueError, match="k must"):
        gates.TopKSoftmaxGate(4, 4, k=k)


def test_router_math_in_float32_for_bf16_input():
    g = gates.TopKSoftmaxGate(8, 4, k=2).bfloat16()
    r = g(torch.randn(6, 8, dtype=torch.bfloat16))
    assert r.weight.dtype == torch.float32 and r.probs.dtype == torch.float32
