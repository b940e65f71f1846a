"""Bad input to every layer: one contract (issue 23, items 1 and 6).

Each layer refuses a non-tensor, an integer/bool input and a wrong width with a
TypeError/ValueError naming ``x`` before any work; computes any floating dtype in that
dtype; takes 0 tokens with finite outputs and zero auxiliary losses; reports NaN/inf the
same way (ValueError on the CPU with ``check_inputs``, passed through without it); and
refuses bad constructor arguments naming them.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gatedmoe import MoE, MoEConfig, SharedExperts, aux_loss
from gatedmoe.layers import (
    DeepMoE,
    InputScaledMoE,
    MixtureOfDepths,
    MultiHeadMoE,
    MultiTaskMoE,
    SoftMoE,
    ZeroComputeMoE,
)
from gatedmoe.layers.moe import GatedSharedExperts

D = 8
FEW = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _build(name: str, **kw):
    if name == "MoE":
        return MoE(D, 4, 16, backend="grouped", **kw)
    if name == "SoftMoE":
        return SoftMoE(D, 4, 16, backend="grouped", **kw)
    if name == "MultiHeadMoE":
        return MultiHeadMoE(D, 2, 4, 16, backend="grouped", **kw)
    if name == "MixtureOfDepths":
        return MixtureOfDepths(nn.Linear(D, D), D, capacity=0.5, **kw)
    if name == "MultiTaskMoE":
        kw = {"load_balance_weight": 0.01, "router_z_weight": 0.001, **kw}
        return MultiTaskMoE(D, 4, 16, 2, backend="grouped", **kw)
    if name == "DeepMoE":
        return DeepMoE(D, 4, 16, backend="grouped", **kw)
    raise AssertionError(name)


LAYERS = ["MoE", "SoftMoE", "MultiHeadMoE", "MixtureOfDepths", "MultiTaskMoE", "DeepMoE"]
# Layers whose weights are all their own (MixtureOfDepths runs a user's block as it is).
OWN_WEIGHTS = [n for n in LAYERS if n != "MixtureOfDepths"]


def _outputs(y) -> list[torch.Tensor]:
    return list(y) if isinstance(y, list) else [y]


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("shape", [(0, D), (1, 0, D), (0, 3, D)], ids=["T0", "B1T0", "B0"])
def test_empty_batch_gives_finite_output_and_zero_aux_losses(name, shape):
    m = _build(name)
    x = torch.randn(*shape, requires_grad=True)
    outs = _outputs(m(x))
    for y in outs:
        assert y.shape == x.shape
        assert torch.isfinite(y).all()
    losses = {k: v for mod in m.modules() for k, v in getattr(mod, "aux_losses", {}).items()}
    for k, v in losses.items():
        v = float(v.detach())
        assert math.isfinite(v) and v == 0.0, f"{name} aux loss {k} = {v} on an empty batch"
    total = aux_loss(m) + sum(y.sum() for y in outs)
    assert torch.isfinite(total)
    total.backward()


@pytest.mark.parametrize("name", LAYERS)
@FEW
@given(bad=st.sampled_from([math.nan, math.inf, -math.inf]), pos=st.integers(0, 2 * 3 * D - 1))
def test_nan_or_inf_input_is_refused_on_cpu(name, bad, pos):
    m = _build(name)
    x = torch.randn(2, 3, D)
    x.view(-1)[pos] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        m(x)


@pytest.mark.parametrize("name", LAYERS)
def test_nan_passes_through_with_check_inputs_false(name):
    m = _build(name, check_inputs=False)
    x = torch.randn(2, 3, D)
    x[0, 0, 0] = math.nan
    outs = _outputs(m(x))
    assert not all(torch.isfinite(y).all() for y in outs)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("x", [[[0.0] * D], 3.0, None], ids=["list", "float", "None"])
def test_non_tensor_input_is_a_type_error_naming_x(name, x):
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        _build(name)(x)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_input_is_a_type_error_naming_x(name, dtype):
    x = torch.ones(2, 3, D).to(dtype)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        _build(name)(x)


@pytest.mark.parametrize("name", LAYERS)
@FEW
@given(width=st.integers(0, 20).filter(lambda w: w != D), lead=st.lists(st.integers(1, 3), min_size=0, max_size=2))
def test_wrong_width_is_a_value_error_naming_d_model(name, width, lead):
    x = torch.randn(*lead, width)
    with pytest.raises(ValueError, match=rf"x must have shape .*d_model={D}"):
        _build(name)(x)


@pytest.mark.parametrize("name", ["SoftMoE", "MixtureOfDepths"])
@pytest.mark.parametrize("shape", [(D,), (1, 2, 3, D)])
def test_sequence_layers_refuse_other_ranks(name, shape):
    with pytest.raises(ValueError, match=r"\[B, T, d_model=8\] or \[T, d_model=8\]"):
        _build(name)(torch.randn(*shape))


@pytest.mark.parametrize("name", OWN_WEIGHTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_float_dtypes_are_computed_in_that_dtype(name, dtype):
    m = _build(name)
    x = torch.randn(2, 3, D, dtype=dtype)
    for y in _outputs(m(x)):
        assert y.dtype == dtype
        assert torch.isfinite(y).all()


def test_float64_float32_results_agree():
    m = _build("MultiHeadMoE")
    x = torch.randn(2, 3, D, dtype=torch.float64)
    torch.testing.assert_close(m(x).float(), m(x.float()), atol=1e-5, rtol=1e-4)


def test_mixture_of_depths_refuses_a_block_of_another_dtype_clearly():
    m = _build("MixtureOfDepths")
    with pytest.raises(TypeError, match=r"x has dtype torch\.float64 but block's weights are"):
        m(torch.randn(2, 4, D, dtype=torch.float64))
    m64 = MixtureOfDepths(nn.Linear(D, D).double(), D, capacity=0.5)
    assert m64(torch.randn(2, 4, D, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("name", ["MoE", "MultiHeadMoE", "DeepMoE"])
@pytest.mark.parametrize(
    "token_ids, exc, match",
    [([1, 2, 3], TypeError, "token_ids must be None or an integer"), (torch.zeros(2, 3), TypeError, "integer tensor"),
     (torch.zeros(5, dtype=torch.long), ValueError, "token_ids must have shape")],
    ids=["list", "float", "shape"],
)
def test_bad_token_ids(name, token_ids, exc, match):
    with pytest.raises(exc, match=match):
        _build(name, gate="hash", gate_kwargs={"vocab_size": 10})(torch.randn(2, 3, D), token_ids=token_ids)


def _dispatch_layer(variant: str):
    if variant == "ZeroComputeMoE":
        return ZeroComputeMoE(D, 4, 16, n_zero_experts=1, backend="grouped")
    return {"MoE": MoE, "InputScaledMoE": InputScaledMoE}[variant](D, 4, 16, backend="grouped")


@pytest.mark.parametrize("variant", ["MoE", "ZeroComputeMoE", "InputScaledMoE"])
@pytest.mark.parametrize(
    "x_TD, routing, exc, match",
    [
        (torch.randn(8, D), "routing", ValueError, "x_TD has 8 rows but routing has n_tokens=6"),  # was zero rows
        (torch.randn(4, D), "routing", ValueError, "x_TD has 4 rows but routing has n_tokens=6"),  # was an IndexError
        (torch.randn(6, D), None, TypeError, "routing must be a gatedmoe.Routing, got NoneType"),  # was AttributeError
        (torch.randn(6, D + 1), "routing", ValueError, r"x_TD must have shape \[T, d_model=8\]"),
        (torch.randn(2, 3, D), "routing", ValueError, r"x_TD must have shape \[T, d_model=8\]"),
        (torch.ones(6, D, dtype=torch.long), "routing", TypeError, "x_TD must be a floating-point tensor"),
    ],
    ids=["more-rows", "fewer-rows", "routing-None", "width", "rank", "dtype"],
)
def test_dispatch_seam_checks_x_TD_against_the_routing(variant, x_TD, routing, exc, match):
    layer = _dispatch_layer(variant)
    routed = layer.route(torch.randn(6, D))
    layer.dispatch(torch.randn(6, D), routed)
    with pytest.raises(exc, match=match):
        layer.dispatch(x_TD, routed if routing == "routing" else routing)


# ------------------------------------------------------------------ constructor arguments
BAD_WEIGHTS = [-1.0, math.nan, math.inf, "0.1", True]


@pytest.mark.parametrize("name", ["MoE", "MultiHeadMoE", "MultiTaskMoE", "DeepMoE"])
@pytest.mark.parametrize("field", ["load_balance_weight", "router_z_weight", "bias_update_rate"])
@pytest.mark.parametrize("value", BAD_WEIGHTS, ids=repr)
def test_bad_loss_weights_are_refused_by_every_variant(name, field, value):
    with pytest.raises(ValueError, match=rf"{field} must be a finite float >= 0"):
        _build(name, **{field: value})


@pytest.mark.parametrize(
    "cls, change",
    [(SoftMoE, {"load_balance_weight": 0.5}), (SoftMoE, {"capacity_factor": 1.0}), (SoftMoE, {"n_shared_experts": 1}),
     (MultiTaskMoE, {"capacity_factor": 1.0}), (MultiTaskMoE, {"n_shared_experts": 1})],
    ids=lambda v: v.__name__ if isinstance(v, type) else next(iter(v)),
)
def test_from_config_refuses_settings_a_variant_cannot_honour(cls, change):
    cfg = MoEConfig(d_model=D, n_experts=4, d_hidden=16, **change)
    kw = {"n_tasks": 2} if cls is MultiTaskMoE else {}
    with pytest.raises(ValueError, match=f"cannot honour {next(iter(change))}"):
        cls.from_config(cfg, **kw)


@pytest.mark.parametrize("field, value", [("bias", "no"), ("check_inputs", 1), ("check_inputs", "yes")])
def test_config_booleans_must_be_bool(field, value):
    with pytest.raises(TypeError, match=f"{field} must be True or False"):
        MoEConfig(d_model=D, n_experts=4, d_hidden=16, **{field: value})


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: MoE(0, 4, 16), "d_model must be a positive int"),
        (lambda: MoE(D, 4, 16, k=5), r"k must satisfy 1 <= k <= n_experts=4"),
        (lambda: MoE(D, 4, 16, capacity_factor=math.nan), "capacity_factor must be > 0"),
        (lambda: MoE(D, 4, 16, gate="nope"), "unknown gate 'nope'; known gates"),
        (lambda: SoftMoE(D, 4, 16, slots_per_expert=0), "slots_per_expert must be a positive int"),
        (lambda: MultiHeadMoE(D, 3, 4, 16), "n_heads must be a positive int dividing d_model=8"),
        (lambda: MultiHeadMoE("8", 2, 4, 16), "d_model must be a positive int"),
        (lambda: MultiTaskMoE(D, 4, 16, 0), "n_tasks must be a positive int"),
        (lambda: DeepMoE(D, 4, 16, n_layers=0), "n_layers must be a positive int"),
        (lambda: DeepMoE(D, 4, 16, nonlinearity="tanh"), "nonlinearity must be one of"),
        (lambda: MixtureOfDepths(nn.Linear(D, D), 0), "d_model must be a positive int"),
        (lambda: SharedExperts(0, 16), "d_model must be a positive int"),
        (lambda: GatedSharedExperts(D, -2), "d_hidden must be a positive int"),
        (lambda: MixtureOfDepths(nn.Linear(D, D), D, capacity="half"), r"capacity must be a real number in \(0.0, 1.0\]"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_constructor_value_names_the_argument(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: SoftMoE(D, 4, 16, normalize="yes"), "normalize must be True or False"),
        (lambda: DeepMoE(D, 4, 16, residual=1), "residual must be True or False"),
        (lambda: MixtureOfDepths(lambda x: x, D), "block must be an nn.Module"),
        (lambda: MixtureOfDepths(nn.Linear(D, D), D, check_inputs="no"), "check_inputs must be True or False"),
        (lambda: MoE(D, 4, 16, gate=3), "gate must be a gate name or a gatedmoe.gates.Gate"),
        (lambda: aux_loss([MoE(D, 4, 16)]), "model must be an nn.Module"),
        (lambda: SharedExperts(D, 16, bias="no"), "bias must be True or False"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_constructor_type_names_the_argument(build, match):
    with pytest.raises(TypeError, match=match):
        build()


@FEW
@given(capacity=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True), st.just(math.nan)))
def test_mixture_of_depths_capacity_outside_0_1_is_refused(capacity):
    with pytest.raises(ValueError, match=r"capacity must be a .*\(0.0, 1.0\]"):
        MixtureOfDepths(nn.Linear(D, D), D, capacity=capacity)
