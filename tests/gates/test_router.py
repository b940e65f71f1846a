"""`gatedmoe.gates.router`: the tensor-core router against its float32 reference."""

from __future__ import annotations

import pytest
import torch

from gatedmoe.gates.router import router_logits, router_logits_reference
from helpers import assert_close

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core router runs on CUDA")


def test_reference_is_a_float32_linear():
    x, w = torch.randn(5, 7, dtype=torch.bfloat16), torch.randn(3, 7)
    ref = x.double() @ w.double().t()
    out = router_logits_reference(x, w)
    assert out.dtype == torch.float32
    assert_close("logits", ref.float(), out)


def test_cpu_inputs_take_the_reference():
    x, w = torch.randn(4, 6, dtype=torch.bfloat16), torch.randn(3, 6)
    assert torch.equal(router_logits(x, w), router_logits_reference(x, w))


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 63, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tensor_core_router_matches_the_reference(T, dtype):
    torch.manual_seed(T)
    D, E = 256, 64
    x = torch.randn(T, D, device="cuda", dtype=dtype)
    w32 = torch.randn(E, D, device="cuda") * D**-0.5
    g = torch.randn(T, E, device="cuda")
    ref_x, fast_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    # The reference sees the weight at the precision the fast path multiplies it in.
    ref_w = w32.to(dtype).float().requires_grad_()
    fast_w = w32.clone().requires_grad_()
    ref = router_logits_reference(ref_x, ref_w)
    fast = router_logits(fast_x, fast_w)
    assert fast.dtype == torch.float32
    assert_close("logits", ref, fast, torch.float32)
    (ref * g).sum().backward()
    (fast * g).sum().backward()
    # Gradients multiply g rounded to the input dtype, as a 16-bit layer's backward does.
    assert_close("x.grad", ref_x.grad, fast_x.grad, dtype)
    assert_close("w.grad", ref_w.grad, fast_w.grad, dtype)
    assert fast_w.grad.dtype == torch.float32 and fast_x.grad.dtype == dtype


@cuda
@pytest.mark.gpu
def test_tensor_core_router_without_gradients_is_the_same_product():
    """Inference skips the autograd Function: the same logits bit for bit, no graph."""
    x = torch.randn(9, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(16, 128, device="cuda", requires_grad=True)
    with_grad = router_logits(x, w)
    assert with_grad.grad_fn is not None
    with torch.no_grad():
        without = router_logits(x, w)
    assert without.grad_fn is None and without.dtype == torch.float32
    assert torch.equal(with_grad, without)
