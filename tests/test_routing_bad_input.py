"""Bad input to the `Routing` constructors and the auxiliary losses (issue 23, items 1 and 6)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gatedmoe import Routing
from gatedmoe.losses import load_balance_loss, router_z_loss

FEW = settings(max_examples=10, deadline=None)
LONG = torch.long


def _ok(n: int = 3):
    return torch.zeros(n, dtype=LONG), torch.zeros(n, dtype=LONG), torch.ones(n)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("token", torch.zeros(3), "token must be an integer tensor"),
        ("expert", torch.zeros(3), "expert must be an integer tensor"),
        ("expert", torch.zeros(3, dtype=torch.bool), "expert must be an integer tensor"),
        ("weight", torch.ones(3, dtype=LONG), "weight must be a floating-point tensor"),
        ("token", [0, 0, 0], "token must be an integer torch.Tensor"),
        ("weight", None, "weight must be a floating-point torch.Tensor"),
    ],
    ids=["float-token", "float-expert", "bool-expert", "int-weight", "list-token", "none-weight"],
)
def test_from_assignments_refuses_wrong_kinds(field, value, match):
    token, expert, weight = _ok()
    kw = {"token": token, "expert": expert, "weight": weight, field: value}
    with pytest.raises(TypeError, match=match):
        Routing.from_assignments(**kw, n_experts=2, n_tokens=3)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"n_experts": 0}, "n_experts must be an int >= 1"),
        ({"n_experts": 2.0}, "n_experts must be an int >= 1"),
        ({"n_tokens": -1}, "n_tokens must be an int >= 0"),
        ({"n_tokens": 1.5}, "n_tokens must be an int >= 0"),
        ({"n_tokens": 0}, r"token ids must lie in \[0, n_tokens=0\)"),
        ({"probs": torch.rand(2, 2)}, r"probs must be None or a tensor \[n_tokens, n_experts\]=\(3, 2\)"),
        ({"logits": torch.rand(3, 5)}, r"logits must be None or a tensor"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_from_assignments_refuses_bad_values(kw, match):
    token, expert, weight = _ok()
    args = {"n_experts": 2, "n_tokens": 3, **kw}
    with pytest.raises(ValueError, match=match):
        Routing.from_assignments(token, expert, weight, **args)


@FEW
@given(bad=st.one_of(st.integers(-5, -1), st.integers(4, 9)))
def test_token_ids_out_of_range_are_refused(bad):
    token, expert, weight = _ok()
    token[1] = bad
    with pytest.raises(ValueError, match="token ids must lie in"):
        Routing.from_assignments(token, expert, weight, n_experts=2, n_tokens=4)


@FEW
@given(bad=st.one_of(st.integers(-5, -1), st.integers(3, 9)))
def test_expert_ids_out_of_range_are_refused(bad):
    with pytest.raises(ValueError, match="expert ids must lie in"):
        Routing.from_topk(torch.rand(2, 1), torch.tensor([[0], [bad]]), n_experts=3)


@pytest.mark.parametrize(
    "weights, experts, exc, match",
    [
        (torch.rand(3, 2), torch.zeros(3, 2), TypeError, "experts_TK must be an integer tensor"),
        (torch.ones(3, 2, dtype=LONG), torch.zeros(3, 2, dtype=LONG), TypeError, "weights_TK must be a floating"),
        ([[1.0]], torch.zeros(1, 1, dtype=LONG), TypeError, "weights_TK must be a floating-point torch.Tensor"),
        (torch.rand(6), torch.zeros(6, dtype=LONG), ValueError, r"must both have shape \[T, K\]"),
    ],
    ids=["float-experts", "int-weights", "list-weights", "1d"],
)
def test_from_topk_refuses_bad_input(weights, experts, exc, match):
    with pytest.raises(exc, match=match):
        Routing.from_topk(weights, experts, n_experts=2)


def _empty_routing(with_probs: bool = True) -> Routing:
    probs = torch.zeros(0, 3, requires_grad=True)
    return Routing.from_topk(
        torch.zeros(0, 2), torch.zeros(0, 2, dtype=LONG), 3, probs=probs if with_probs else None, logits=probs
    )


def test_losses_of_an_empty_batch_are_zero_and_differentiable():
    r = _empty_routing()
    for loss in (load_balance_loss(r), router_z_loss(r)):
        assert math.isfinite(float(loss.detach())) and float(loss.detach()) == 0.0
        loss.backward()


@pytest.mark.parametrize("fn", [load_balance_loss, router_z_loss])
def test_losses_refuse_what_is_not_a_routing(fn):
    with pytest.raises(TypeError, match="routing must be a gatedmoe.Routing"):
        fn({"probs": torch.rand(2, 2)})


@FEW
@given(t=st.integers(0, 5), k=st.integers(1, 3))
def test_losses_are_finite_for_any_batch_size(t, k):
    logits = torch.randn(t, 3)
    w, e = torch.softmax(logits, -1).topk(k, -1)
    r = Routing.from_topk(w, e, 3, probs=torch.softmax(logits, -1), logits=logits)
    assert math.isfinite(float(load_balance_loss(r))) and math.isfinite(float(router_z_loss(r)))
