"""Tests of src/gatedmoe/experts/activations.py: the expanded-gating-range family and GPT-OSS's
clamped SwiGLU, DeepSeek-V4's limited SwiGLU and the float32 SwiGLU."""

import math

import pytest
import torch

from gatedmoe import MoE
from gatedmoe.dispatch import grouped_dispatch, reference_dispatch
from gatedmoe.experts import (
    ClampedSwiGLU,
    ExpandedGatedActivation,
    ExpertBank,
    Float32SwiGLU,
    LimitedSwiGLU,
    SoftcappedSwiGLU,
    activation_names,
    get_activation,
)
from gatedmoe.routing import Routing
from helpers import assert_close

X = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0], dtype=torch.float64)
GATES = {
    "xsilu": torch.sigmoid,
    "xgelu": lambda x: 0.5 * (1 + torch.erf(x / math.sqrt(2))),
    "xatlu": lambda x: torch.atan(x) / math.pi + 0.5,
}


@pytest.mark.parametrize("name", sorted(GATES))
def test_formula(name):
    act = get_activation(name).double()
    with torch.no_grad():
        act.alpha.fill_(0.3)
    want = X * (1.6 * GATES[name](X) - 0.3)
    assert_close(name, want, act(X))


def test_alpha_zero_recovers_base_activations():
    assert_close("silu", torch.nn.functional.silu(X), get_activation("xsilu").double()(X))
    assert_close("gelu", torch.nn.functional.gelu(X), get_activation("xgelu").double()(X))
    # ATLU(1) = 1 * (atan(1)/pi + 1/2) = 3/4.
    assert_close("atlu", torch.tensor(0.75, dtype=torch.float64), get_activation("xatlu").double()(torch.tensor(1.0, dtype=torch.float64)))


def test_glu_form_and_gradient():
    act = get_activation("xswiglu")
    assert isinstance(act, ExpandedGatedActivation) and act.glu
    h = torch.randn(4, 6)
    a, b = h.chunk(2, -1)
    assert_close("glu", torch.nn.functional.silu(a) * b, act(h))
    act(h).sum().backward()
    assert act.alpha.grad is not None and act.alpha.grad != 0


def test_each_call_is_a_fresh_module():
    assert get_activation("xgelu") is not get_activation("xgelu")
    assert {"xsilu", "xgelu", "xatlu", "xswiglu", "xgeglu", "xatglu"} <= set(activation_names())


@pytest.mark.parametrize("name", ["xsilu", "xatglu"])
def test_in_expert_bank_and_dispatch(name):
    torch.manual_seed(0)
    bank = ExpertBank(3, 8, 16, activation=name)
    assert "act.alpha" in dict(bank.named_parameters())
    with torch.no_grad():
        bank.act.alpha.fill_(0.2)
    x = torch.randn(5, 8)
    r = Routing.from_topk(torch.rand(5, 2), torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0]]), 3)
    ref = reference_dispatch(x, r, bank)
    ref.sum().backward()
    ref_grad = bank.act.alpha.grad.clone()
    bank.act.alpha.grad = None
    fast = grouped_dispatch(x, r, bank)
    fast.sum().backward()
    assert_close("out", ref, fast)
    assert_close("alpha grad", ref_grad, bank.act.alpha.grad)


def test_moe_with_shared_experts_trains_both_alphas():
    moe = MoE(8, 4, 16, activation="xgeglu", n_shared_experts=1)
    moe(torch.randn(6, 8)).sum().backward()
    assert moe.experts.act.alpha.grad is not None and moe.shared.act.alpha.grad is not None


def test_clamped_swiglu_formula():
    act = ClampedSwiGLU(alpha=1.5, limit=2.0)
    a = torch.tensor([[-3.0, 0.5, 3.0]], dtype=torch.float64)
    b = torch.tensor([[-4.0, 1.0, 2.5]], dtype=torch.float64)
    ac = torch.tensor([[-3.0, 0.5, 2.0]], dtype=torch.float64)  # min(a, 2)
    bc = torch.tensor([[-2.0, 1.0, 2.0]], dtype=torch.float64)  # clamp(b, -2, 2)
    want = (bc + 1) * ac * torch.sigmoid(1.5 * ac)
    assert_close("clamped swiglu", want, act(torch.cat([a, b], -1)))


def test_clamped_swiglu_by_name_in_a_moe():
    assert "clamped_swiglu" in activation_names()
    act = get_activation("clamped_swiglu")
    assert isinstance(act, ClampedSwiGLU) and (act.alpha, act.limit) == (1.702, 7.0)
    assert act is not get_activation("clamped_swiglu")
    moe = MoE(8, 4, 16, activation="clamped_swiglu", bias=True)
    assert isinstance(moe.experts.act, ClampedSwiGLU)
    moe(torch.randn(5, 8)).sum().backward()
    with pytest.raises(ValueError, match="limit"):
        ClampedSwiGLU(limit=0.0)


def test_limited_swiglu_formula():
    a = torch.tensor([[-3.0, 0.5, 3.0]], dtype=torch.float64)
    b = torch.tensor([[-4.0, 1.0, 2.5]], dtype=torch.float64)
    bc = torch.tensor([[-2.0, 1.0, 2.0]], dtype=torch.float64)  # clamp(b, -2, 2)
    ac = torch.tensor([[-3.0, 0.5, 2.0]], dtype=torch.float64)  # min(a, 2)
    silu = torch.nn.functional.silu
    assert_close("clamp the input", silu(ac) * bc, LimitedSwiGLU(limit=2.0)(torch.cat([a, b], -1)))
    # Clamping silu's output instead: silu(3) = 2.86 -> 2, silu(0.5) and silu(-3) kept.
    want = silu(a).clamp(max=2.0) * bc
    assert_close("clamp the output", want, LimitedSwiGLU(limit=0.5 * 4, clamp="output")(torch.cat([a, b], -1)))
    assert_close("no limit", silu(a) * b, LimitedSwiGLU(limit=float("inf"))(torch.cat([a, b], -1)))
    for bad in ({"limit": 0.0}, {"clamp": "both"}):
        with pytest.raises(ValueError):
            LimitedSwiGLU(**bad)


def test_float32_swiglu_rounds_once():
    h = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    a, b = h.float().chunk(2, -1)
    want = (torch.nn.functional.silu(a) * b).bfloat16()
    got = Float32SwiGLU()(h)
    assert got.dtype == torch.bfloat16 and torch.equal(want, got)
    assert_close("float32", get_activation("swiglu")(h.float()), Float32SwiGLU()(h.float()))


def test_softcapped_swiglu_formula():
    h = torch.randn(7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 10
    a, b = h.chunk(2, -1)
    want = 3.0 * torch.tanh(a / 3.0) * torch.sigmoid(a) * (5.0 * torch.tanh(b / 5.0))
    assert_close("softcapped swiglu", want, SoftcappedSwiGLU(gate_cap=3.0, up_cap=5.0)(h))
    assert SoftcappedSwiGLU()(h.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="up_cap"):
        SoftcappedSwiGLU(up_cap=-1.0)


def test_relu2_is_the_squared_relu():
    x = torch.tensor([-2.0, 0.0, 3.0])
    assert torch.equal(get_activation("relu2")(x), torch.tensor([0.0, 0.0, 9.0]))
    assert not get_activation("relu2").glu


def test_module_activations_by_name_in_a_moe():
    named = (("limited_swiglu", LimitedSwiGLU), ("swiglu_float32", Float32SwiGLU), ("softcapped_swiglu", SoftcappedSwiGLU))
    for name, cls in named:
        assert name in activation_names()
        act = get_activation(name)
        assert isinstance(act, cls) and act is not get_activation(name)
        moe = MoE(8, 4, 16, activation=name)
        assert isinstance(moe.experts.act, cls)
        moe(torch.randn(5, 8)).sum().backward()
    assert get_activation("limited_swiglu").limit == 10.0
