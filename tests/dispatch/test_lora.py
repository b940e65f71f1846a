"""LoRA on the expert bank: grouped path against the per-expert reference (outputs and
every gradient, base frozen), merge/unmerge, and a plain per-expert nn.Linear oracle."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from routings import make_routing, run_with_grads

from gatedmoe import MoE
from gatedmoe.dispatch import grouped_dispatch, reference_dispatch
from gatedmoe.experts import ExpertBank
from helpers import assert_close

CASES = [
    # T, D, H, E, K, mode, activation, bias, rank
    (1, 16, 32, 4, 1, "random", "swiglu", False, 4),
    (63, 24, 40, 5, 2, "skip_experts", "swiglu", True, 8),
    (40, 16, 24, 4, 2, "one_expert", "gelu", False, 4),
    (17, 20, 12, 3, 3, "all", "geglu", True, 3),  # widths and rank not 16-byte aligned: loop fallback
]


def _bank(E, D, H, activation, bias, rank, dtype) -> ExpertBank:
    torch.manual_seed(0)
    bank = ExpertBank(E, D, H, activation=activation, bias=bias)
    lora = bank.add_lora(rank, alpha=2.0 * rank)
    with torch.no_grad():  # B starts at zero, which would hide a wrong product; 0.1: a trained adapter's size
        lora.B_in.normal_(std=0.1)
        lora.B_out.normal_(std=0.1)
        if bias:
            bank.b_in.normal_()
            bank.b_out.normal_()
    return bank.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("T,D,H,E,K,mode,activation,bias,rank", CASES)
def test_grouped_lora_matches_reference(T, D, H, E, K, mode, activation, bias, rank, dtype):
    bank = _bank(E, D, H, activation, bias, rank, dtype)
    assert sorted(n for n, p in bank.named_parameters() if p.requires_grad) == ["lora.A_in", "lora.A_out", "lora.B_in", "lora.B_out"]
    x, logits, gy = torch.randn(T, D, dtype=dtype), torch.randn(T, E), torch.randn(T, D, dtype=dtype)
    ref_y, ref_g = run_with_grads(reference_dispatch, bank, x, logits, T, E, K, mode, gy)
    fast_y, fast_g = run_with_grads(grouped_dispatch, bank, x, logits, T, E, K, mode, gy)
    assert_close("y", ref_y, fast_y, dtype)
    assert sorted(ref_g) == sorted(fast_g)
    for name in ref_g:
        assert_close(f"grad {name}", ref_g[name], fast_g[name], dtype)


def test_lora_equals_plain_per_expert_linears():
    """Oracle independent of the bank: nn.Linear layers with W + s B A, one per expert."""
    E, D, H, r, s = 3, 8, 12, 2, 1.5
    bank = _bank(E, D, H, "relu", False, r, torch.float64)
    bank.lora.scale = s
    x = torch.randn(10, D, dtype=torch.float64)
    routing = make_routing(10, E, 2, "random", torch.randn(10, E))
    y = grouped_dispatch(x, routing, bank)
    ref = torch.zeros_like(x)
    L = bank.lora
    for t, e, w in zip(routing.token.tolist(), routing.expert.tolist(), routing.weight.tolist(), strict=True):
        w_in = bank.w_in[e] + s * L.B_in[e] @ L.A_in[e]
        w_out = bank.w_out[e] + s * L.B_out[e] @ L.A_out[e]
        ref[t] += w * (w_out @ torch.relu(w_in @ x[t]))
    assert_close("y", ref.detach(), y.detach())


def test_merge_and_unmerge():
    bank = _bank(4, 16, 32, "swiglu", True, 4, torch.float64)
    base = {n: p.detach().clone() for n, p in bank.named_parameters() if not n.startswith("lora.")}
    x = torch.randn(20, 16, dtype=torch.float64)
    routing = make_routing(20, 4, 2, "random", torch.randn(20, 4))
    ref_y = grouped_dispatch(x, routing, bank).detach()
    bank.merge_lora()
    assert bank.active_lora is None and not torch.equal(bank.w_in, base["w_in"])
    assert_close("merged y", ref_y, grouped_dispatch(x, routing, bank).detach())
    assert_close("merged reference y", ref_y, reference_dispatch(x, routing, bank).detach())
    with pytest.raises(ValueError, match="no unmerged"):
        bank.merge_lora()
    bank.unmerge_lora()
    for n, b in base.items():
        assert_close(f"unmerged {n}", b, bank.get_parameter(n).detach())
    assert_close("unmerged y", ref_y, grouped_dispatch(x, routing, bank).detach())
    with pytest.raises(ValueError, match="no merged"):
        bank.unmerge_lora()
    with pytest.raises(ValueError, match="already has LoRA"):
        bank.add_lora(2)


def test_lora_training_step_on_the_layer_moves_adapters_only():
    torch.manual_seed(0)
    moe = MoE(16, 4, 32, k=2)
    moe.experts.add_lora(4)
    for p in moe.gate.parameters():
        p.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in moe.named_parameters()}
    y0 = moe(torch.randn(8, 16))
    opt = torch.optim.SGD([p for p in moe.parameters() if p.requires_grad], lr=0.1)
    (moe(torch.randn(8, 16)).square().mean()).backward()
    opt.step()
    for n, p in moe.named_parameters():
        assert torch.equal(before[n], p.detach()) == (not n.startswith("experts.lora.B")), n
    assert y0.shape == (8, 16)


def test_sharding_keeps_each_experts_adapters():
    from gatedmoe.parallel.expert_parallel import _shard_bank

    bank = _bank(4, 16, 32, "swiglu", True, 4, torch.float32)
    local = _shard_bank(bank, range(2, 4))
    for n, p in local.named_parameters():
        assert torch.equal(p, bank.get_parameter(n)[2:4]), n
        assert p.requires_grad == n.startswith("lora."), n


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton installed")
def test_triton_backend_runs_unmerged_adapters():
    # Fused into the Triton kernels (interpreted on CPU); every gradient and the awkward
    # shapes are in tests/dispatch/test_triton_lora.py.
    from gatedmoe.dispatch import get_backend

    bank = _bank(4, 16, 32, "swiglu", False, 4, torch.float32)
    x = torch.randn(6, 16)
    routing = make_routing(6, 4, 2, "random", torch.randn(6, 4))
    assert_close("y", reference_dispatch(x, routing, bank).detach(), get_backend("triton")(x, routing, bank).detach())
