"""Every registered gate through the MoE layer: forward, backward, routing validity."""

import pytest
import torch

from gatedmoe import MoE, aux_loss, gates

D, E, H = 12, 8, 16

# Non-default knobs a gate needs to show its distinctive path in a tiny layer.
GATE_KWARGS = {
    "group_limited": {"n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5},
    "temperature_softmax": {"threshold": 0.1},
    "switch": {"capacity_factor": 1.0},
    "hash": {"vocab_size": 50},
}


def _layer(name, **kw):
    return MoE(D, E, H, gate=name, k=2, gate_kwargs=GATE_KWARGS.get(name), **kw)


def _run(moe, x, ids):
    return moe(x, token_ids=ids)


def test_names_lists_the_zoo():
    want = {
        "softmax", "topk_softmax", "sigmoid", "switch", "temperature_softmax", "modified_softmax",
        "gumbel_softmax", "hash", "expert_choice", "dselect_k", "top_p", "threshold", "cosine",
        "group_limited",
    }  # fmt: skip
    assert want <= set(gates.names())


@pytest.mark.parametrize("name", gates.names())
@pytest.mark.parametrize("shared", [0, 1])
def test_forward_backward_and_routing(name, shared):
    torch.manual_seed(0)
    moe = _layer(name, n_shared_experts=shared, backend="grouped").train()
    x = torch.randn(2, 7, D, requires_grad=True)
    ids = torch.randint(0, 50, (2, 7))
    y = _run(moe, x, ids)
    assert y.shape == x.shape and torch.isfinite(y).all()
    r = moe.last_routing.validate()
    assert r.n_tokens == 14
    assert torch.equal(r.offsets, torch.cumsum(r.counts, 0))
    assert int(r.offsets[-1]) == r.n_assignments
    assert bool((r.weight >= 0).all()), "gate weights must be non-negative"
    if r.probs is not None:
        assert bool((r.probs >= 0).all())
    (y.pow(2).mean() + aux_loss(moe)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    params = [(n, p) for n, p in moe.gate.named_parameters()]
    for n, p in params:
        assert p.grad is not None, f"{name}: no gradient reached gate parameter {n}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {n}"
    if params:
        assert any(p.grad.abs().sum() > 0 for _, p in params), f"{name}: all router gradients are zero"


@pytest.mark.parametrize("name", gates.names())
def test_eval_forward(name):
    torch.manual_seed(1)
    moe = _layer(name).eval()
    with torch.no_grad():
        y = _run(moe, torch.randn(5, D), torch.arange(5))
    assert y.shape == (5, D)
    moe.last_routing.validate()


def test_unknown_gate_lists_known():
    with pytest.raises(ValueError, match="known gates: .*group_limited"):
        MoE(D, E, H, gate="nope")


def test_token_ids_shape_checked_and_required_for_hash():
    moe = _layer("hash")
    with pytest.raises(ValueError, match="token_ids"):
        moe(torch.randn(2, 3, D), token_ids=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="token_ids"):
        moe(torch.randn(2, 3, D))
    # Gates without token ids ignore them.
    _layer("topk_softmax")(torch.randn(2, 3, D), token_ids=torch.zeros(2, 3, dtype=torch.long))


TOKEN_CHOICE = [n for n in gates.names() if gates.get(n).token_choice]


def test_token_choice_set():
    assert set(TOKEN_CHOICE) == {"topk_softmax", "sigmoid", "switch", "top_p", "cosine", "group_limited"}


@pytest.mark.parametrize("name", TOKEN_CHOICE)
def test_bias_balancing_attaches_to_token_choice_gates(name):
    torch.manual_seed(0)
    moe = _layer(name, bias_update_rate=0.05).train()
    assert moe.gate.balancer is not None and moe.gate.balancer.update_rate == 0.05
    moe(torch.randn(16, D))
    # Before the routing counts are read, the bias was zero; after, it moved by +-rate or 0.
    b = moe.gate.balancer.bias
    assert torch.isclose(b.abs(), torch.tensor(0.05)).logical_or(b == 0).all()
    assert b.abs().sum() > 0
    # A large bias on one expert must pull every token to it (selection only).
    moe.gate.balancer.bias.zero_()
    moe.gate.balancer.bias[3] = 10.0
    moe.eval()
    with torch.no_grad():
        moe(torch.randn(9, D))
    r = moe.last_routing
    # Switch's capacity then cuts expert 3 down to C tokens.
    assert int(r.counts[3]) == (moe.gate.capacity(9) if name == "switch" else 9)


@pytest.mark.parametrize("name", sorted(set(gates.names()) - set(TOKEN_CHOICE)))
def test_bias_balancing_refused_elsewhere(name):
    with pytest.raises(ValueError, match="token-choice"):
        _layer(name, bias_update_rate=0.01)


def test_bias_update_rate_negative():
    with pytest.raises(ValueError, match="bias_update_rate"):
        _layer("topk_softmax", bias_update_rate=-1.0)


@pytest.mark.parametrize("name", ["topk_softmax", "sigmoid", "group_limited"])
def test_single_expert_weight_is_not_normalised_so_the_router_learns(name):
    # Normalising one kept weight fixes it at 1 (times the scale): the router would get no
    # gradient from the task loss. So the default skips it at k = 1, as topk_softmax does.
    torch.manual_seed(0)
    moe = MoE(D, E, H, gate=name, k=1, load_balance_weight=0, router_z_weight=0, backend="grouped")
    flag = "renormalize" if name == "topk_softmax" else "normalize"
    assert getattr(moe.gate, flag) is False
    assert getattr(gates.get(name)(D, E, k=2), flag) is True
    assert getattr(gates.get(name)(D, E, k=1, **{flag: True}), flag) is True  # explicit: as given
    moe(torch.randn(16, D)).square().mean().backward()
    assert not torch.allclose(moe.last_routing.weight, torch.ones(()))
    assert moe.gate.weight.grad.abs().max() > 1e-4
