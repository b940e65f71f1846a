"""`gatedmoe.interop.hf.adapter` without transformers: the HF softmax top-k gate's fused route
against its plain one, the trusted ids of the HF gates, and the router tap's cast.

The fused kernels run in Triton's interpreter on the CPU (tests/conftest.py), forced on by
patching `fused_topk_applies` as tests/gates/test_fused_topk.py does for the library gates.
Sides are ``ref`` (``fused=False``: torch's ops, bit-identical to transformers) and ``fast``.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gatedmoe import MoE
from gatedmoe.interop.hf import adapter
from gatedmoe.routing import Routing
from helpers import assert_close, poisoned_empty

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def fused_on(monkeypatch):
    """The fused path wherever the gate asks, with poisoned buffers in both kernel modules."""
    pytest.importorskip("triton")
    from gatedmoe.gates import fused_topk as ft
    from gatedmoe.gates import topk_sort as ts

    for module in (ft, ts):
        monkeypatch.setattr(module, "_empty", lambda *shape, device, dtype: poisoned_empty(*shape, dtype=dtype, device=device))
    monkeypatch.setattr(adapter, "fused_topk_applies", lambda *a, **k: True)


def _tie_free_input(gate: adapter.HFTopKSoftmaxGate, T: int, dtype: torch.dtype) -> torch.Tensor:
    """Random tokens whose k-th and (k+1)-th probabilities differ in every row: the one case
    where the two paths may choose differently is an exact tie (bf16 logits tie now and then),
    which the kernels and CUDA's torch.topk give to the lowest expert id and the CPU's
    torch.topk (the side these tests compare on the CPU) does not."""
    k = gate.k
    for _ in range(100):
        x = torch.randn(T, gate.d_model, device=DEVICE, dtype=dtype)
        with torch.no_grad():
            probs = torch.softmax(gate._logits_in_input_dtype(x).float(), -1)
        top = probs.topk(min(k + 1, gate.n_experts), -1).values
        if k == gate.n_experts or bool((top[:, k - 1] > top[:, k]).all()):
            return x
    raise AssertionError("no tie-free input drawn")


CASES = [
    # T, E, k, renormalize, bias, weights_dtype
    (1, 4, 1, False, False, "float32"),
    (5, 8, 2, True, False, "float32"),
    (63, 12, 3, True, True, "input"),
    (40, 60, 4, False, True, "input"),
    (16, 128, 8, True, False, "input"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,k,renormalize,bias,weights_dtype", CASES)
def test_softmax_gate_fused_route_is_the_plain_route(T, E, k, renormalize, bias, weights_dtype, dtype, fused_on):
    """Same tokens, experts and counts exactly; weights in the same dtype and, like probs,
    within float32 rounding (the kernels' softmax is not torch's bit for bit); the same logits;
    the fused route adds ``lse``."""
    g = adapter.HFTopKSoftmaxGate(32, E, k=k, renormalize=renormalize, bias=bias, weights_dtype=weights_dtype)
    with torch.no_grad():
        if bias:
            g.bias.normal_()
    g = g.to(device=DEVICE, dtype=dtype).eval()
    x = _tie_free_input(g, T, dtype)
    g.fused = False
    ref = g(x)
    g.fused = True
    fast = g(x)
    assert ref.lse is None and fast.lse is not None
    for name in ("token", "expert", "counts"):
        assert_close(name, getattr(ref, name), getattr(fast, name))
    assert fast.n_tokens == ref.n_tokens == T
    assert fast.weight.dtype == ref.weight.dtype == (dtype if weights_dtype == "input" else torch.float32)
    assert_close("weight", ref.weight, fast.weight)
    assert fast.probs.dtype == ref.probs.dtype == torch.float32
    assert_close("probs", ref.probs, fast.probs)
    assert torch.equal(ref.logits, fast.logits)
    assert_close("lse", torch.logsumexp(ref.logits, -1), fast.lse)
    assert fast.validate() is fast and g.gate_losses == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused route runs only on CUDA, and the CPU's "
                    "torch.topk breaks ties in another order (measured: not toward the lowest id)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_gate_fused_route_breaks_exact_ties_as_cuda_topk(dtype):
    """Exact ties at the k-th choice (random bf16 routers tie on 0.4-6% of tokens at E=8-128,
    BENCHMARKS.md "Hugging Face models"): CUDA's torch.topk, like the kernels, gives them to
    the lowest expert id, so the fused gate chooses transformers' experts on those tokens too.
    Experts come in triples of equal router rows over small integers (exact products in any
    summation order), so the k-th choice of every token with k=2 ties with a third expert."""
    torch.manual_seed(0)
    g = adapter.HFTopKSoftmaxGate(32, 24, k=2, renormalize=True).cuda()
    with torch.no_grad():
        g.weight.copy_(torch.randint(-2, 3, (8, 32)).float().repeat_interleave(3, 0))
    g = g.to(dtype).eval()
    x = torch.randint(-2, 3, (4096, 32), device="cuda").to(dtype)
    with torch.no_grad():
        g.fused = False
        ref = g(x)
        g.fused = True
        fast = g(x)
    assert fast.lse is not None, "the fused kernels did not run"
    top = torch.softmax(g._logits_in_input_dtype(x).float(), -1).topk(3, -1).values
    assert bool((top[:, 1] == top[:, 2]).float().mean() > 0.5), "the input has too few ties to test"
    for name in ("token", "expert", "counts"):
        assert_close(name, getattr(ref, name), getattr(fast, name))


@pytest.mark.parametrize("renormalize,bias", [(True, True), (False, False)])
def test_softmax_gate_fused_route_has_the_plain_gradients(renormalize, bias, fused_on):
    """Training: the gradients of input, router weight and bias through weights and probs."""
    g = adapter.HFTopKSoftmaxGate(24, 10, k=3, renormalize=renormalize, bias=bias).to(DEVICE)
    with torch.no_grad():
        if bias:
            g.bias.normal_()
    x = _tie_free_input(g, 21, torch.float32)
    g_w, g_p = torch.randn(21 * 3, device=DEVICE), torch.randn(21, 10, device=DEVICE)
    grads = {}
    for fused in (False, True):
        g.fused = fused
        g.zero_grad()
        xi = x.clone().requires_grad_()
        r = g(xi)
        ((r.weight * g_w).sum() + (r.probs * g_p).sum()).backward()
        grads[fused] = {"x": xi.grad, **{name: p.grad for name, p in g.named_parameters()}}
    assert set(grads[True]) == {"x", "weight"} | ({"bias"} if bias else set())
    for name, ref in grads[False].items():
        assert_close(f"grad {name}", ref, grads[True][name])


def test_softmax_gate_keeps_the_plain_route_where_the_kernels_do_not_express_it(fused_on, monkeypatch):
    """softmax_over="topk" (selection on the logits' dtype), fused=False, and a selection-bias
    balancer (the library gate's path) never reach the HF gate's fused call."""
    calls = []
    fused = adapter.fused_topk
    monkeypatch.setattr(adapter, "fused_topk", lambda *a, **k: calls.append(1) or fused(*a, **k))
    x = torch.randn(7, 16, device=DEVICE)
    adapter.HFTopKSoftmaxGate(16, 8, k=2, renormalize=True, softmax_over="topk").to(DEVICE)(x)
    adapter.HFTopKSoftmaxGate(16, 8, k=2, renormalize=True, fused=False).to(DEVICE)(x)
    adapter.HFTopKSoftmaxGate(16, 8, k=2, renormalize=True).attach_bias_balancer().to(DEVICE)(x)
    assert calls == []
    adapter.HFTopKSoftmaxGate(16, 8, k=2, renormalize=True).to(DEVICE)(x)
    assert calls == [1]
    with pytest.raises(TypeError, match="fused"):
        adapter.HFTopKSoftmaxGate(16, 8, k=2, renormalize=True, fused=1)


@pytest.mark.parametrize(
    "gate",
    [
        lambda: adapter.HFTopKSoftmaxGate(16, 8, k=2, renormalize=True, fused=False),
        lambda: adapter.HFTopKSoftmaxGate(16, 8, k=2, renormalize=True, softmax_over="topk", bias=True),
        lambda: adapter.HFSigmoidTopKGate(16, 8, k=2),
    ],
)
def test_hf_gates_hand_their_topk_ids_as_trusted(gate, monkeypatch):
    """Their ids come from torch.topk over E scores: the sort's device-side id check is left out."""
    seen = []
    from_topk = Routing.from_topk.__func__
    monkeypatch.setattr(
        Routing, "from_topk", classmethod(lambda cls, *a, **k: seen.append(k.get("trusted_ids")) or from_topk(cls, *a, **k))
    )
    gate().to(DEVICE)(torch.randn(5, 16, device=DEVICE))
    assert seen == [True]


class _Ops(TorchDispatchMode):
    """Counts the aten ops run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


class _Router(torch.nn.Module):
    """Stands in for a Hugging Face router class (the tap subclasses it)."""

    def forward(self, x):  # pragma: no cover - never called, the tap replaces it
        return x


def _tapped_block(router_logits_dtype: str) -> adapter.HFMoEBlock:
    moe = MoE(16, 4, 32, k=2, load_balance_weight=0.0, router_z_weight=0.0)
    return adapter.HFMoEBlock(moe, family="test", hf_class="Test", router_tap=adapter.router_tap(_Router()),
                              router_logits_dtype=router_logits_dtype).eval()


@pytest.mark.parametrize("router_logits_dtype", ["input", "float32"])
def test_router_tap_casts_only_for_an_observer(router_logits_dtype):
    """A tap without hooks is a call nobody sees: no cast, no call. With a hook (transformers'
    output_router_logits recorder) the hook sees the logits as before: the routing's, in the
    input's dtype or float32."""
    block = _tapped_block(router_logits_dtype)
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    block = block.to(torch.bfloat16)
    with torch.no_grad(), _Ops() as quiet:
        y_quiet = block(x)
    seen = []
    handle = block.router_tap.register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad(), _Ops() as heard:
        y_heard = block(x)
    handle.remove()
    assert torch.equal(y_quiet, y_heard)
    (logits,) = seen
    want = torch.float32 if router_logits_dtype == "float32" else torch.bfloat16
    assert logits.dtype == want and torch.equal(logits, block.moe.last_routing.logits.to(want))
    extra = len(heard.ops) - len(quiet.ops)
    assert extra == (1 if router_logits_dtype == "input" else 0), heard.ops[-10:]


def test_router_tap_is_called_for_global_hooks():
    block = _tapped_block("input")
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.append(out) if m is block.router_tap else None
    )
    try:
        with torch.no_grad():
            block(torch.randn(3, 16))
    finally:
        handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], block.moe.last_routing.logits)


def test_router_tap_is_called_when_its_forward_is_replaced_on_the_instance():
    """transformers' `model_addition_debugger_context` and accelerate's hooks wrap a module by
    assigning ``module.forward`` on the instance, without hooks: the tap still runs for them."""
    block = _tapped_block("input")
    seen = []
    inner = block.router_tap.forward
    block.router_tap.forward = lambda logits: seen.append(logits) or inner(logits)
    with torch.no_grad():
        block(torch.randn(3, 16))
    assert len(seen) == 1 and torch.equal(seen[0], block.moe.last_routing.logits)


def test_softmax_gate_unpickled_from_before_the_fused_option_routes_in_torch_ops(fused_on, monkeypatch):
    """A gate saved before ``fused`` existed has no such attribute: it routes as it did then
    (torch's ops) and prints."""
    g = adapter.HFTopKSoftmaxGate(16, 8, k=2, renormalize=True).to(DEVICE).eval()
    del g.__dict__["fused"]

    def refuse(*a, **k):
        raise AssertionError("the fused kernels ran")

    monkeypatch.setattr(adapter, "fused_topk", refuse)
    assert g.fused is False and "fused=False" in repr(g)
    assert g(torch.randn(5, 16, device=DEVICE)).lse is None
