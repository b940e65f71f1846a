"""The fused top-k routing kernels (`gatedmoe.gates.fused_topk`) against their plain
reference, on CUDA where there is one, else in Triton's interpreter on the CPU: the routing exactly (tokens, experts, counts),
weights, probs and lse within float32 tolerance, and the logits' gradient for random
upstream gradients of all three. Logits are a scaled permutation, so no two scores of a
row tie and the top-k choice is unambiguous."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from gatedmoe.gates import fused_topk as ft  # noqa: E402
from gatedmoe.gates import group_limited as group_module  # noqa: E402
from gatedmoe.gates import registry  # noqa: E402
from gatedmoe.gates import sigmoid as sigmoid_module  # noqa: E402
from gatedmoe.gates import topk as topk_module  # noqa: E402
from gatedmoe.gates import topk_sort as ts  # noqa: E402
from gatedmoe.losses import router_z_loss  # noqa: E402
from helpers import assert_close, poisoned_empty  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # Both modules' buffers: the gate's own and those of the sort it hands its top-k to.
    for module in (ft, ts):
        monkeypatch.setattr(module, "_empty", lambda *shape, device, dtype: poisoned_empty(*shape, dtype=dtype, device=device))


def _distinct_logits(T: int, E: int, spread: float = 6.0) -> torch.Tensor:
    return ((torch.randperm(T * E).reshape(T, E).float() / (T * E) - 0.5) * spread).to(DEVICE)


CASES = [
    # T, E, k, options
    (1, 4, 1, {}),
    (5, 8, 2, {}),
    (63, 12, 3, {"normalize": False}),
    (63, 12, 3, {"bias_E": "random"}),
    (40, 6, 1, {"normalize": False}),
    (33, 16, 4, {"score": "sigmoid"}),
    (33, 16, 4, {"score": "sigmoid", "normalize": False, "scale": 2.5, "bias_E": "random"}),
    (33, 16, 4, {"score": "sigmoid", "n_group": 4, "topk_group": 2, "bias_E": "random", "scale": 2.5}),
    (33, 16, 3, {"score": "sigmoid", "n_group": 4, "topk_group": 2, "bias_E": "random", "mask_value": 0.0}),
    (70, 32, 8, {"score": "sigmoid", "n_group": 8, "topk_group": 3}),
    (70, 40, 6, {"scale": 1.7}),
]


def _options(opts: dict, E: int) -> dict:
    opts = dict(opts)
    if opts.get("bias_E") == "random":
        opts["bias_E"] = torch.randn(E, device=DEVICE) * 0.05
    return opts


@pytest.mark.parametrize("T,E,k,opts", [CASES[1], CASES[7], (300, 16, 4, {})])  # one sort launch, three
def test_inference_takes_the_launches_without_autograd(T, E, k, opts):
    """Without gradients (inference) the same kernels run outside the autograd Function: the
    same routing bit for bit, and no graph recorded."""
    opts = _options(opts, E)
    logits = _distinct_logits(T, E).requires_grad_()
    with_grad = ft.fused_topk(logits, k, **opts)
    assert with_grad.weight.grad_fn is not None
    with torch.no_grad():
        without = ft.fused_topk(logits, k, **opts)
    assert without.weight.grad_fn is None and without.probs.grad_fn is None
    for name in ("token", "expert", "counts", "weight", "probs", "lse"):
        assert torch.equal(getattr(with_grad, name), getattr(without, name)), name


@pytest.mark.parametrize("T,E,k,opts,one", [
    (5, 8, 2, {}, True),
    (63, 12, 3, {"normalize": False}, True),  # 189 assignments, 64 rows a program
    (70, 40, 6, {}, False),  # two routing programs
    (50, 16, 8, {}, False),  # one routing program, but 400 assignments: the sort's three launches
])
def test_decode_sizes_route_and_sort_in_one_launch(T, E, k, opts, one, monkeypatch):
    """Where one program routes every token and the sort is one block (T <= BT, T*k <= 256),
    the routing kernel sorts too: one launch, the same routing as the two-launch path."""
    sorts = []
    monkeypatch.setattr(ft, "_launch_sort", lambda *a: sorts.append(1) or ts._launch_sort(*a))
    opts = _options(opts, E)
    logits = _distinct_logits(T, E)
    fast = ft.fused_topk(logits, k, **opts)
    assert len(sorts) == (0 if one else 1)
    ref = ft.fused_topk_reference(logits, k, **opts)
    for name in ("token", "expert", "counts", "weight", "probs", "lse"):
        assert_close(name, getattr(ref, name), getattr(fast, name))


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("T,E,k", [(5, 8, 2), (300, 16, 4)])  # sorted in the routing kernel, by the sort's
def test_weights_are_rounded_to_weight_dtype_as_stored(T, E, k, weight_dtype):
    """The float32 weights rounded once to ``weight_dtype``: those of the float32 route cast,
    bit for bit (rounding commutes with the sort's permutation), with gradients."""
    logits = _distinct_logits(T, E).requires_grad_()
    f32 = ft.fused_topk(logits, k)
    low = ft.fused_topk(logits, k, weight_dtype=weight_dtype)
    assert low.weight.dtype == weight_dtype
    cast = f32.weight.detach().to(weight_dtype)
    if DEVICE == "cuda":
        assert torch.equal(low.weight, cast)
    else:  # Triton's interpreter truncates a float32 -> bf16 narrowing: within one unit of its last place
        ulp = torch.finfo(weight_dtype).eps * cast.abs().double()
        assert ((low.weight.double() - cast.double()).abs() <= ulp).all()
    for name in ("token", "expert", "counts", "probs", "lse"):
        assert torch.equal(getattr(low, name), getattr(f32, name)), name
    ref = ft.fused_topk_reference(logits, k, weight_dtype=weight_dtype)
    assert ref.weight.dtype == weight_dtype
    g = torch.randn(T * k, device=DEVICE, dtype=weight_dtype)
    (low.weight * g).sum().backward()
    g_fast, logits.grad = logits.grad, None
    (f32.weight * g.float()).sum().backward()
    assert_close("grad logits", logits.grad, g_fast)


@pytest.mark.parametrize("T,E,k,opts", CASES)
def test_fused_topk_matches_reference(T, E, k, opts):
    opts = _options(opts, E)
    ref_logits = _distinct_logits(T, E).requires_grad_()
    fast_logits = ref_logits.detach().clone().requires_grad_()
    ref = ft.fused_topk_reference(ref_logits, k, **opts)
    fast = ft.fused_topk(fast_logits, k, **opts)
    for name in ("token", "expert", "counts"):
        assert_close(name, getattr(ref, name), getattr(fast, name))
    for name in ("weight", "probs", "lse"):
        assert_close(name, getattr(ref, name), getattr(fast, name))
    assert fast.n_tokens == T and fast.logits is fast_logits
    fast.validate()
    g_w, g_p, g_lse = (torch.randn(*shape, device=DEVICE) for shape in ((T * k,), (T, E), (T,)))
    for r in (ref, fast):
        ((r.weight * g_w).sum() + (r.probs * g_p).sum() + (r.lse * g_lse).sum()).backward()
    assert_close("grad logits", ref_logits.grad, fast_logits.grad)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("which", ["weight", "probs", "lse"])
def test_fused_topk_gradient_of_each_output_alone(score, which):
    """Backward with only one output used (the others' gradients are None)."""
    ref_logits = _distinct_logits(21, 10).requires_grad_()
    fast_logits = ref_logits.detach().clone().requires_grad_()
    for logits, fn in ((ref_logits, ft.fused_topk_reference), (fast_logits, ft.fused_topk)):
        r = fn(logits, 3, score=score)
        out = getattr(r, which)
        (out * torch.linspace(-1, 2, out.numel(), device=DEVICE).reshape(out.shape)).sum().backward()
    assert_close("grad logits", ref_logits.grad, fast_logits.grad)


def test_fused_topk_all_tokens_on_one_expert_and_empty_experts():
    bias = torch.zeros(9, device=DEVICE)
    bias[4] = 10.0  # selection only: expert 4 is everyone's first choice, weights unchanged
    logits = _distinct_logits(50, 9)
    ref = ft.fused_topk_reference(logits, 1, normalize=False, bias_E=bias)
    fast = ft.fused_topk(logits, 1, normalize=False, bias_E=bias)
    assert fast.counts.tolist() == [0, 0, 0, 0, 50, 0, 0, 0, 0]
    assert_close("token", ref.token, fast.token)
    assert_close("weight", ref.weight, fast.weight)


def test_fused_topk_group_mask_zero_picks_masked_experts_over_negative_scores():
    """mask_value=0 with every selection score negative: the experts of dropped groups (all
    scored 0, a tie the reference's torch.topk breaks in no stated order) beat the kept ones.
    The fused choice must be a top-k of the masked scores; weights follow from the choice."""
    T, E, k = 20, 16, 3
    logits = _distinct_logits(T, E)
    bias = -2.0 - torch.rand(E, device=DEVICE)
    fast = ft.fused_topk(logits, k, score="sigmoid", n_group=4, topk_group=2, bias_E=bias, mask_value=0.0)
    s = torch.sigmoid(logits)
    c = s + bias
    group = c.view(T, 4, 4).topk(2, -1).values.sum(-1)
    keep = torch.zeros(T, 4, dtype=torch.bool, device=DEVICE).scatter(1, group.topk(2, -1).indices, True)
    masked = c.masked_fill(~keep.repeat_interleave(4, 1), 0.0)
    chosen = torch.zeros(T, E, dtype=torch.bool, device=DEVICE)
    chosen[fast.token, fast.expert] = True
    assert (chosen.sum(1) == k).all()
    assert_close("chosen scores", masked.topk(k, -1).values.sum(-1), (masked * chosen).sum(-1))
    assert (masked[chosen] == 0).all()  # negative kept experts lost to the masked ones
    kept_s = (s * chosen).sum(-1)
    assert_close("weights", (s / kept_s[:, None])[fast.token, fast.expert], fast.weight)


def test_fused_topk_ties_go_to_the_lowest_expert():
    logits = torch.zeros(3, 8, device=DEVICE)
    r = ft.fused_topk(logits, 3)
    assert r.expert.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert r.token.tolist() == [0, 1, 2] * 3


def test_fused_topk_lse_feeds_the_router_z_loss():
    logits = _distinct_logits(12, 8)
    fast = ft.fused_topk(logits, 2)
    assert fast.lse is not None
    expected = torch.logsumexp(logits, -1).pow(2).mean()
    assert_close("z-loss", expected, router_z_loss(fast))


@pytest.mark.parametrize(
    "kw", [{"k": 0}, {"k": 9}, {"score": "tanh"}, {"n_group": 3}, {"n_group": 4, "topk_group": 5}, {"mask_value": 1.0},
           {"weight_dtype": torch.int32}]
)
def test_fused_topk_rejects_bad_arguments(kw):
    args = {"k": 2, **kw}
    k = args.pop("k")
    with pytest.raises(ValueError, match=next(iter(kw))):
        ft.fused_topk(torch.randn(4, 8, device=DEVICE), k, **args)


def test_fused_topk_applies_only_to_cuda_float32():
    assert not ft.fused_topk_applies(torch.randn(4, 8), 2)  # CPU: the gates keep the plain path
    assert not ft.fused_topk_applies(torch.randn(4, 8, dtype=torch.float64, device=DEVICE), 2)
    if DEVICE == "cuda":
        assert ft.fused_topk_applies(torch.randn(4, 8, device=DEVICE), 2)
        assert not ft.fused_topk_applies(torch.randn(4, 24, device=DEVICE), 2, n_group=4)  # groups need E = 2^n


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_fused_topk_at_fine_grained_size_on_cuda(score):
    """T=4096, E=256, k=8 from random normal logits (ties possible, so choices are compared
    row by row and only rows with an unambiguous k-th score must agree)."""
    T, E, k = 4096, 256, 8
    logits = torch.randn(T, E, device=DEVICE) * 2
    ref = ft.fused_topk_reference(logits, k, score=score)
    fast = ft.fused_topk(logits, k, score=score)
    assert_close("counts total", ref.counts.sum(), fast.counts.sum())
    top = logits.topk(k + 1, -1).values
    clear = (top[:, k - 1] - top[:, k]) > 1e-6  # a gap between the k-th and (k+1)-th score
    ref_set = torch.zeros(T, E, dtype=torch.bool, device=DEVICE)
    ref_set[ref.token, ref.expert] = True
    fast_set = torch.zeros_like(ref_set)
    fast_set[fast.token, fast.expert] = True
    assert clear.float().mean() > 0.99
    assert torch.equal(ref_set[clear], fast_set[clear])
    fast.validate()


@pytest.mark.parametrize(
    "gate,kw,module",
    [
        ("topk_softmax", {"k": 3}, topk_module),
        ("topk_softmax", {"k": 1}, topk_module),
        ("sigmoid", {"k": 2, "scale": 2.5, "normalize": False}, sigmoid_module),
        # k = 1: both paths skip the normalisation by default (the gate's effective flag).
        ("sigmoid", {"k": 1, "scale": 2.5}, sigmoid_module),
        ("group_limited", {"k": 1, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5}, group_module),
        ("group_limited", {"k": 3, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5}, group_module),
        # Every kept score negative and k = the 8 masked experts: mask_value=0 picks exactly those.
        ("group_limited", {"k": 8, "n_group": 4, "topk_group": 2, "mask_value": 0.0}, group_module),
    ],
)
def test_gates_route_the_same_through_the_fused_kernels(gate, kw, module, monkeypatch):
    """The gates hand their settings (renormalisation, scale, bias, groups, mask) to the
    fused path correctly: forcing it on the CPU gives the plain path's routing."""
    torch.manual_seed(1)
    g = registry.get(gate)(16, 16, **kw)
    if g.balancer is None:
        g.attach_bias_balancer(1e-3)
    g = g.to(DEVICE).eval()  # eval: the balancer must not move the bias between the two calls
    with torch.no_grad():
        g.balancer.bias.copy_(torch.randn(16) * 0.05 - (1.5 if kw.get("mask_value") == 0.0 else 0.0))
    x = torch.randn(30, 16, device=DEVICE)
    monkeypatch.setattr(module, "fused_topk_applies", lambda *a, **k: False)
    ref = g(x)
    monkeypatch.setattr(module, "fused_topk_applies", lambda *a, **k: True)
    fast = g(x)
    assert fast.lse is not None and ref.lse is None
    for name in ("token", "expert", "counts"):
        assert_close(name, ref.routed.__getattribute__(name), fast.__getattribute__(name))
    assert_close("weight", ref.weight, fast.weight)
    assert_close("probs", ref.probs, fast.probs)


def test_group_limited_gate_with_fused_false_keeps_torch_ops(monkeypatch):
    """``fused=False`` (the HF converter's choice on the bit-exact grouped backend) never enters
    the kernels, even where they would apply; a gate unpickled from before the option existed
    (no ``fused`` in its ``__dict__``) routes as it did then, in the kernels."""
    g = registry.get("group_limited")(16, 16, k=3, n_group=4, topk_group=2, fused=False).to(DEVICE).eval()
    monkeypatch.setattr(group_module, "fused_topk_applies", lambda *a, **k: True)

    def refuse(*a, **k):
        raise AssertionError("the fused kernels ran")

    monkeypatch.setattr(group_module, "fused_topk", refuse)
    x = torch.randn(30, 16, device=DEVICE)
    assert g(x).lse is None and "fused=False" in repr(g)
    del g.__dict__["fused"]  # as unpickled from a gate saved before the option
    assert g.fused is True
    with pytest.raises(AssertionError, match="fused kernels ran"):
        g(x)
    with pytest.raises(TypeError, match="fused"):
        registry.get("group_limited")(16, 16, k=3, fused=1)
