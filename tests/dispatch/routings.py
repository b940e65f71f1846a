"""Random and adversarial routings for dispatch tests."""

from __future__ import annotations

import pytest
import torch

from gatedmoe import Routing


def make_routing(T: int, E: int, K: int, mode: str, logits_TE: torch.Tensor) -> Routing:
    """A top-K routing whose weights are differentiable functions of ``logits_TE``.

    mode: "random" (random experts), "one_expert" (every token's first choice is the last
    expert), "skip_experts" (only even experts used, so odd ones get no tokens), "all"
    (K = E, every expert).
    """
    probs = torch.softmax(logits_TE, -1)
    if mode == "random":
        experts = torch.stack([torch.randperm(E)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    elif mode == "one_expert":
        experts = torch.stack([torch.cat([torch.tensor([E - 1]), torch.randperm(E - 1)[: K - 1]]) for _ in range(T)])
    elif mode == "skip_experts":
        even = torch.arange(0, E, 2)
        experts = torch.stack([even[torch.randperm(len(even))[:K]] for _ in range(T)])
    elif mode == "all":
        experts = torch.arange(E).expand(T, E).clone()
    else:
        raise ValueError(mode)
    experts = experts.to(probs.device)
    weights = probs.gather(-1, experts)
    return Routing.from_topk(weights, experts, E, probs=probs, logits=logits_TE).validate()


def run_with_grads(fn, bank, x, logits, T: int, E: int, K: int, mode: str, gy, *, x_grad: bool = True):
    """``(y, grads)`` of ``fn(x, routing, bank)`` with ``y.backward(gy)``: the routing from
    `make_routing` (seeded, on x's device) over fresh leaves of x and the logits; grads of x
    (when ``x_grad``), the logits and every trainable parameter of ``bank``."""
    x = x.detach().clone().requires_grad_(x_grad)
    logits = logits.detach().clone().requires_grad_()
    torch.manual_seed(1234)
    routing = make_routing(T, E, K, mode, logits).to(x.device)
    bank.zero_grad(set_to_none=True)
    y = fn(x, routing, bank)
    y.backward(gy)
    grads = {"x": x.grad, "logits": logits.grad}
    grads.update({n: p.grad for n, p in bank.named_parameters() if p.requires_grad})
    return y.detach(), grads


def assert_second_backward_refused(dispatch, bank) -> None:
    """``dispatch(x, routing, bank)`` frees its saved activations in the backward, so a
    retained graph cannot be replayed: a second backward must say so (``retain_graph``)
    rather than read freed memory."""
    r = make_routing(9, 3, 2, "random", torch.randn(9, 3)).to(bank.w_in.device)
    x = torch.randn(9, bank.w_in.shape[-1], device=bank.w_in.device, requires_grad=True)
    y = dispatch(x, r, bank)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.sum().backward()
