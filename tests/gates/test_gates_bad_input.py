"""Bad input to every registered gate: one contract (issue 23, items 1 and 6).

Every gate takes 0 tokens and leaves finite (zero) auxiliary losses, refuses a forward
input that is not a floating tensor ``[T, d_model]`` naming ``x_TD``, and refuses bad
constructor arguments (NaN, out of range, wrong type) naming them.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gatedmoe import MoE, aux_loss, gates
from gatedmoe.losses import load_balance_loss, router_z_loss

D, E = 8, 4
FEW = settings(max_examples=8, deadline=None)
GATES = gates.names()


def _build(name: str, **kw) -> gates.Gate:
    if name == "hash":
        kw.setdefault("vocab_size", 16)
    return gates.build(name, d_model=D, n_experts=E, **kw)


def _call(g: gates.Gate, x: torch.Tensor):
    if g.uses_token_ids:
        t = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() == 2 else 1
        return g(x, token_ids=torch.zeros(t, dtype=torch.long))
    return g(x)


def _losses(g: gates.Gate, routing) -> dict[str, float]:
    out = {k: float(v.detach()) for k, v in g.gate_losses.items()}
    if routing.probs is not None:
        out["load_balance"] = float(load_balance_loss(routing).detach())
    if routing.logits is not None:
        out["router_z"] = float(router_z_loss(routing).detach())
    return out


def test_every_gate_is_covered():
    assert len(GATES) == 14


@pytest.mark.parametrize("name", GATES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_gives_empty_routing_and_zero_losses(name, training):
    g = _build(name).train(training)
    r = _call(g, torch.randn(0, D))
    r.validate()
    assert (r.n_tokens, r.n_assignments) == (0, 0)
    for k, v in _losses(g, r).items():
        assert math.isfinite(v) and v == 0.0, f"{name}: {k} = {v} on an empty batch"


@pytest.mark.parametrize("name", GATES)
def test_empty_batch_through_the_layer_keeps_the_training_loss_finite(name):
    kw = {"gate_kwargs": {"vocab_size": 16}} if name == "hash" else {}
    moe = MoE(D, E, 16, gate=name, k=1, backend="grouped", **kw)
    x = torch.randn(2, 0, D, requires_grad=True)
    ids = torch.zeros(2, 0, dtype=torch.long) if name == "hash" else None
    loss = moe(x, token_ids=ids).sum() + aux_loss(moe)
    assert torch.isfinite(loss) and float(loss.detach()) == 0.0
    loss.backward()


@pytest.mark.parametrize("name", GATES)
@FEW
@given(t=st.integers(0, 6), training=st.booleans())
def test_any_batch_size_gives_a_valid_routing_and_finite_losses(name, t, training):
    g = _build(name).train(training)
    r = _call(g, torch.randn(t, D))
    r.validate()
    assert r.n_tokens == t
    assert all(math.isfinite(v) for v in _losses(g, r).values())


@pytest.mark.parametrize("name", GATES)
@pytest.mark.parametrize(
    "x, exc, match",
    [
        ([[0.0] * D], TypeError, r"x_TD must be a torch\.Tensor"),
        (torch.ones(3, D, dtype=torch.long), TypeError, "x_TD must be a floating-point tensor"),
        (torch.ones(3, D, dtype=torch.bool), TypeError, "x_TD must be a floating-point tensor"),
        (torch.randn(D), ValueError, r"x_TD must have shape \[T, d_model=8\]"),
        (torch.randn(2, 3, D), ValueError, r"x_TD must have shape \[T, d_model=8\]"),
        (torch.randn(3, D + 1), ValueError, r"x_TD must have shape \[T, d_model=8\]"),
    ],
    ids=["list", "int64", "bool", "1d", "3d", "width"],
)
def test_bad_forward_input_names_x_TD(name, x, exc, match):
    with pytest.raises(exc, match=match):
        _call(_build(name), x)


@pytest.mark.parametrize("name", GATES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_float_dtypes_route(name, dtype):
    r = _call(_build(name), torch.randn(5, D, dtype=dtype))
    r.validate()
    assert r.n_tokens == 5


@pytest.mark.parametrize("name", GATES)
@pytest.mark.parametrize(
    "field, value, exc",
    [("d_model", 0, ValueError), ("d_model", 2.5, ValueError), ("n_experts", 0, ValueError), ("n_experts", True, ValueError)],
)
def test_bad_sizes_are_refused_by_every_gate(name, field, value, exc):
    kw = {"d_model": D, "n_experts": E, field: value}
    if name == "hash":
        kw["vocab_size"] = 16
    with pytest.raises(exc, match=f"{field} must be a positive int"):
        gates.build(name, **kw)


# (gate, argument, bad value, exception): NaN, out-of-range and wrong-type values of each
# gate's own arguments. Every one used to be accepted silently or fail with a raw error.
BAD_ARGUMENTS = [
    ("topk_softmax", "k", 0, ValueError),
    ("topk_softmax", "k", 2.0, TypeError),
    ("topk_softmax", "renormalize", "no", TypeError),
    ("topk_softmax", "noisy", 1, TypeError),
    ("topk_softmax", "w_importance", -0.1, ValueError),
    ("topk_softmax", "w_load", math.nan, ValueError),
    ("softmax", "temperature", math.nan, ValueError),
    ("softmax", "temperature", 0.0, ValueError),
    ("softmax", "temperature", "1", ValueError),
    ("sigmoid", "scale", math.nan, ValueError),
    ("sigmoid", "bias_update_rate", math.nan, ValueError),
    ("sigmoid", "bias_update_rate", -1e-3, ValueError),
    ("sigmoid", "normalize", "yes", TypeError),
    ("switch", "capacity_factor", math.nan, ValueError),
    ("switch", "capacity_factor", "1.25", ValueError),
    ("switch", "eval_capacity_factor", -1.0, ValueError),
    ("switch", "jitter_eps", math.nan, ValueError),
    ("switch", "jitter_eps", 1.0, ValueError),
    ("cosine", "init_temperature", math.nan, ValueError),
    ("cosine", "d_proj", 0, ValueError),
    ("cosine", "renormalize", "yes", TypeError),
    ("temperature_softmax", "tau_start", math.nan, ValueError),
    ("temperature_softmax", "tau_end", -1.0, ValueError),
    ("temperature_softmax", "threshold", math.nan, ValueError),
    ("temperature_softmax", "schedule", "cosine", ValueError),
    ("temperature_softmax", "anneal_steps", -1, ValueError),
    ("temperature_softmax", "noise", "no", TypeError),
    ("modified_softmax", "transform", "relu", ValueError),
    ("modified_softmax", "k", 5, ValueError),
    ("gumbel_softmax", "tau", math.nan, ValueError),
    ("gumbel_softmax", "tau", math.inf, ValueError),
    ("gumbel_softmax", "hard", "yes", TypeError),
    ("gumbel_softmax", "eval_samples", -1, ValueError),
    ("hash", "vocab_size", 0, ValueError),
    ("hash", "seed", -1, ValueError),
    ("expert_choice", "capacity_factor", math.nan, ValueError),
    ("expert_choice", "capacity_factor", 0.0, ValueError),
    ("dselect_k", "gamma", math.nan, ValueError),
    ("dselect_k", "w_entropy", math.nan, ValueError),
    ("dselect_k", "k", 9, ValueError),
    ("top_p", "p", math.nan, ValueError),
    ("top_p", "p", 1.5, ValueError),
    ("top_p", "max_k", 0, ValueError),
    ("top_p", "w_entropy", -1.0, ValueError),
    ("top_p", "renormalize", "no", TypeError),
    ("threshold", "tau_max", math.nan, ValueError),
    ("threshold", "tau_max", 2.0, ValueError),
    ("group_limited", "n_group", 3, ValueError),
    ("group_limited", "topk_group", 2, ValueError),
    ("group_limited", "routed_scaling_factor", math.nan, ValueError),
    ("group_limited", "mask_value", 1.0, ValueError),
    ("group_limited", "normalize", "yes", TypeError),
    ("group_limited", "bias_update_rate", math.nan, ValueError),
]


@pytest.mark.parametrize("name, arg, value, exc", BAD_ARGUMENTS, ids=[f"{g}-{a}-{v!r}" for g, a, v, _ in BAD_ARGUMENTS])
def test_bad_gate_argument_is_refused_naming_it(name, arg, value, exc):
    with pytest.raises(exc, match=arg):
        _build(name, **{arg: value})


def test_every_gate_has_bad_argument_cases():
    covered = {g for g, *_ in BAD_ARGUMENTS}
    assert covered == set(GATES)


@FEW
@given(rate=st.one_of(st.floats(max_value=0.0, exclude_max=True), st.just(math.nan), st.just(math.inf)))
def test_bias_balancer_rate_must_be_finite_and_nonnegative(rate):
    with pytest.raises(ValueError, match="update_rate"):
        gates.BiasBalancer(E, rate)
    with pytest.raises(ValueError, match="update_rate"):
        _build("topk_softmax").attach_bias_balancer(rate)


@pytest.mark.parametrize("ids, exc, match", [
    ([0, 1, 2], TypeError, "token_ids must be an integer torch.Tensor"),
    (torch.zeros(3), TypeError, "token_ids must be an integer tensor"),
    (torch.tensor([0, 1, 99]), ValueError, r"token_ids must lie in \[0, 16\)"),
    (torch.tensor([0, 1]), ValueError, "one id per token"),
    (None, ValueError, "needs token_ids"),
], ids=["list", "float", "range", "count", "missing"])
def test_hash_gate_token_ids(ids, exc, match):
    with pytest.raises(exc, match=match):
        _build("hash")(torch.randn(3, D), token_ids=ids)
