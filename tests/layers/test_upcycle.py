"""Upcycling a dense feed-forward into an `MoE`: the same output at step 0 (coarse and
fine-grained), copies and noise, bad arguments."""

from __future__ import annotations

import pytest
import torch

from gatedmoe.layers.moe import SharedExperts
from gatedmoe.layers.upcycle import upcycle
from helpers import assert_close


def _dense(activation: str = "swiglu", bias: bool = False, H: int = 24) -> SharedExperts:
    torch.manual_seed(0)
    dense = SharedExperts(12, H, activation, bias=bias)
    if bias:
        with torch.no_grad():
            torch.nn.init.normal_(dense.w_in.bias)
            torch.nn.init.normal_(dense.w_out.bias)
    return dense


@pytest.mark.parametrize(
    "activation, bias, E, k, G, gate",
    [
        ("swiglu", False, 8, 2, 1, "topk_softmax"),
        ("gelu", True, 4, 3, 1, "topk_softmax"),
        ("swiglu", False, 8, 2, 2, "topk_softmax"),  # fine-grained: 2 segments x 4 replicas
        ("reglu", True, 6, 3, 3, "topk_softmax"),
        ("swiglu", False, 8, 4, 2, "sigmoid"),  # k = 2 replicas of every segment
    ],
)
def test_upcycled_layer_reproduces_the_dense_output_at_step_0(activation, bias, E, k, G, gate):
    dense = _dense(activation, bias)
    moe = upcycle(dense, E, k=k, granularity=G, gate=gate)
    assert moe.n_experts == E and moe.experts.d_hidden == 24 // G
    x = torch.randn(2, 9, 12)
    assert_close("y", dense(x), moe(x))
    # Every token used every segment, through k / G replicas.
    segments = moe.last_routing.expert % G
    assert torch.bincount(segments, minlength=G).tolist() == [18 * k // G] * G


def test_copies_and_noise():
    dense = _dense()
    moe = upcycle(dense, 4, k=2)
    for e in range(4):
        assert torch.equal(moe.experts.w_in[e], dense.w_in.weight)
        assert torch.equal(moe.experts.w_out[e], dense.w_out.weight)
    noisy = upcycle(dense, 4, k=2, noise=0.01, generator=torch.Generator().manual_seed(0))
    diff = (noisy.experts.w_in - dense.w_in.weight).detach()
    assert 0 < float(diff.std() / dense.w_in.weight.detach().std()) < 0.02
    assert not torch.equal(noisy.experts.w_in[0], noisy.experts.w_in[1])


def test_fine_grained_router_rows_are_shared_within_a_replica():
    moe = upcycle(_dense(), 8, k=2, granularity=2)
    w = moe.gate.weight
    assert torch.equal(w[0], w[1]) and torch.equal(w[6], w[7]) and not torch.equal(w[0], w[2])
    # w_out of a segment is scaled by G; segment g of replica r is expert r * G + g.
    assert torch.equal(moe.experts.w_out[3], 2 * _dense().w_out.weight[:, 12:])


def test_bad_upcycling_arguments():
    dense = _dense()
    with pytest.raises(ValueError, match="does not reproduce the dense output"):
        upcycle(dense, 4, k=1)  # top-1 softmax weight is p_max, not 1
    assert upcycle(dense, 4, k=1, gate_kwargs={"renormalize": True}).k == 1
    with pytest.raises(ValueError, match="not divisible by granularity=5"):
        upcycle(dense, 10, k=5, granularity=5)
    with pytest.raises(ValueError, match="k=3 must be a multiple"):
        upcycle(dense, 4, k=3, granularity=2)
    with pytest.raises(ValueError, match="n_experts=6 is not a multiple"):
        upcycle(dense, 6, k=4, granularity=4)
    with pytest.raises(TypeError, match="SharedExperts"):
        upcycle(torch.nn.Linear(2, 2), 4)
