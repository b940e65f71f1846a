import pytest
import torch

import gatedmoe
from gatedmoe import MoE, aux_loss
from gatedmoe.dispatch import reference_dispatch
from helpers import assert_close


def test_shapes_and_state_after_forward():
    moe = MoE(16, 4, 32, k=2)
    x = torch.randn(3, 5, 16)
    y = moe(x)
    assert y.shape == x.shape
    assert moe.last_routing.n_tokens == 15 and moe.last_routing.n_assignments == 30
    assert set(moe.aux_losses) == {"load_balance", "router_z"}


def test_layer_equals_reference_dispatch_of_its_routing_with_shared_experts():
    moe = MoE(16, 4, 24, k=3, n_shared_experts=2, d_shared_hidden=8)
    x = torch.randn(10, 16)
    y = moe(x)
    expected = reference_dispatch(x, moe.last_routing, moe.experts) + moe.shared(x)
    assert_close("y", expected, y)
    assert moe.shared.w_out.in_features == 16


def test_autocast_runs_the_experts_in_its_dtype_and_keeps_float32_logits():
    from gatedmoe.gates.router import router_logits_reference

    torch.manual_seed(0)
    moe = MoE(32, 4, 48, k=2, n_shared_experts=1, d_shared_hidden=16)
    x = torch.randn(12, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    routing = moe.last_routing
    # The router multiplies x rounded to bf16, as an autocast linear would, into float32 logits.
    assert routing.logits.dtype == torch.float32
    assert torch.equal(routing.logits, router_logits_reference(x.detach().bfloat16(), moe.gate.weight))
    # The experts and the shared expert run in bf16, so the output is bf16 (an autocast linear's dtype).
    assert y.dtype == torch.bfloat16
    xb = x.detach().bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        shared = moe.shared(x.detach())
    expected = reference_dispatch(xb.float(), routing, moe.experts) + shared.float()
    assert_close("y", expected, y.float(), torch.bfloat16)
    y.float().square().sum().backward()
    for name, p in [("x", x), *moe.named_parameters()]:
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_capacity_drops_and_gradients_flow():
    moe = MoE(8, 4, 16, k=1, capacity_factor=0.5)
    with torch.no_grad():  # send every token to expert 0
        moe.gate.weight.zero_()
        moe.gate.weight[0, 0] = 10.0
    x = torch.randn(16, 8).abs()
    y = moe(x)
    r = moe.last_routing
    assert r.counts.tolist() == [2, 0, 0, 0]  # ceil(0.5 * 16 / 4) = 2 slots
    assert r.n_dropped == 14
    assert torch.all(y[2:] == 0)  # later tokens dropped (position priority)
    (y.sum() + aux_loss(moe)).backward()
    assert moe.gate.weight.grad.abs().sum() > 0


def test_aux_loss_sums_layers_and_weights():
    model = torch.nn.Sequential(MoE(8, 4, 16, load_balance_weight=0.5), MoE(8, 4, 16, router_z_weight=0))
    model(torch.randn(7, 8))
    expected = sum(v for m in model for v in m.aux_losses.values())
    assert "router_z" not in model[1].aux_losses
    assert_close("aux", expected, aux_loss(model))
    assert aux_loss(torch.nn.Linear(2, 2)).item() == 0.0


def test_k_equals_n_experts_and_dense_gate():
    moe = MoE(8, 3, 8, k=3)
    y = moe(torch.randn(5, 8))
    assert moe.last_routing.n_assignments == 15 and y.shape == (5, 8)
    dense = MoE(8, 3, 8, gate="softmax")
    dense(torch.randn(5, 8))
    assert dense.last_routing.n_assignments == 15


@pytest.mark.parametrize("gate", ["topk_softmax", "sigmoid", "softmax"])
def test_backward_reaches_every_parameter(gate):
    moe = MoE(8, 4, 16, gate=gate, k=2, bias=True, n_shared_experts=1)
    y = moe(torch.randn(20, 8))
    (y.pow(2).mean() + aux_loss(moe)).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("gated", [False, True])
def test_shared_experts_compute_in_the_input_dtype(dtype, gated):
    # A float32 layer takes any float input (the routed experts cast their weights to it);
    # the shared experts used to fail with "expected m1 and m2 to have the same dtype".
    import copy

    from gatedmoe.layers.moe import GatedSharedExperts

    torch.manual_seed(0)
    shared = GatedSharedExperts(16, 24, bias=True, gate_bias=True) if gated else None
    moe = MoE(16, 4, 24, k=2, n_shared_experts=1, shared=shared, backend="grouped")
    x = torch.randn(2, 5, 16, dtype=dtype)
    y = moe(x)
    assert y.dtype == dtype
    ref_shared = copy.deepcopy(moe.shared).double()
    ref_x, fast_x = x.double().clone().requires_grad_(), x.clone().requires_grad_()
    ref_y, fast_y = ref_shared(ref_x), moe.shared(fast_x)
    assert fast_y.dtype == dtype
    assert_close("shared", ref_y, fast_y)
    g = torch.randn(ref_y.shape, dtype=torch.float64)
    (ref_y * g).sum().backward()
    (fast_y * g.to(dtype)).sum().backward()
    assert_close("x.grad", ref_x.grad, fast_x.grad)
    # Gradients reach the float32 parameters in their own dtype (float64 ones rounded to it).
    grad_dtype = torch.float32 if dtype == torch.float64 else dtype
    for (name, ref_p), fast_p in zip(ref_shared.named_parameters(), moe.shared.parameters(), strict=True):
        assert fast_p.grad is not None and fast_p.grad.dtype == torch.float32, name
        assert_close(name, ref_p.grad, fast_p.grad, dtype=grad_dtype)


def test_bfloat16_layer_runs():
    moe = MoE(16, 4, 32).bfloat16()
    y = moe(torch.randn(9, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"k": 5}, ValueError, "k must"),
        ({"k": 0}, ValueError, "k must"),
        ({"capacity_factor": 0.0}, ValueError, "capacity_factor"),
        ({"capacity_factor": -1.0}, ValueError, "capacity_factor"),
        ({"gate": "bogus"}, ValueError, "known gates: .*sigmoid"),
        ({"activation": "bogus"}, ValueError, "known activations: .*swiglu"),
        ({"backend": "bogus"}, ValueError, "known backends: .*grouped"),
        ({"n_shared_experts": -1}, ValueError, "n_shared_experts"),
        ({"capacity_priority": "x"}, ValueError, "capacity_priority"),
    ],
)
def test_bad_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MoE(8, 4, 16, **kwargs)


def test_bad_input():
    moe = MoE(8, 4, 16)
    with pytest.raises(ValueError, match="d_model=8"):
        moe(torch.randn(3, 7))
    with pytest.raises(TypeError, match="floating"):
        moe(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        moe([[0.0] * 8])
    with pytest.raises(ValueError, match="NaN"):
        moe(torch.full((2, 8), float("nan")))


def test_bad_sizes():
    with pytest.raises(ValueError, match="d_hidden"):
        MoE(8, 4, 0)
    with pytest.raises(ValueError, match="n_experts"):
        MoE(8, 0, 4)


def test_public_names():
    assert gatedmoe.Routing is not None and callable(gatedmoe.aux_loss)


def test_state_dict_round_trip_keeps_bias_buffer(tmp_path):
    from safetensors.torch import load_file, save_file

    moe = MoE(8, 4, 16, gate="sigmoid", gate_kwargs={"bias_update_rate": 0.1})
    moe.train()
    moe(torch.randn(12, 8))
    path = tmp_path / "m.safetensors"
    save_file(moe.state_dict(), str(path))
    other = MoE(8, 4, 16, gate="sigmoid", gate_kwargs={"bias_update_rate": 0.1})
    other.load_state_dict(load_file(str(path)))
    assert torch.equal(other.gate.balancer.bias, moe.gate.balancer.bias)
    assert moe.gate.balancer.bias.abs().sum() > 0
