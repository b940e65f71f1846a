"""`MoEConfig`, the built-parts constructor and the two seams of `MoE`."""

from __future__ import annotations

import copy
import dataclasses
import inspect

import pytest
import torch

from gatedmoe import MoE, MoEConfig, TritonOptions
from gatedmoe.experts import ExpertBank
from gatedmoe.gates import build
from gatedmoe.routing import Routing
from helpers import assert_close


def test_moe_signature_lists_the_config_fields_with_the_same_defaults():
    params = inspect.signature(MoE.__init__).parameters
    fields = {f.name: f for f in dataclasses.fields(MoEConfig)}
    parts = {"self", "experts", "shared"}
    assert set(params) - parts == set(fields)
    for name, f in fields.items():
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            assert params[name].default is inspect.Parameter.empty, name
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if name == "gate_kwargs":
            assert params[name].default is None and default == {}
        elif params[name].default is not inspect.Parameter.empty:
            assert params[name].default == default, name


@pytest.mark.parametrize(
    "field, value",
    [
        ("d_model", 0), ("n_experts", -1), ("d_hidden", 2.5), ("load_balance_weight", -1.0),
        ("load_balance_weight", float("nan")), ("router_z_weight", float("inf")), ("bias_update_rate", -1e-3),
        ("capacity_factor", 0.0), ("capacity_priority", "random"), ("backend", "cuda"), ("n_shared_experts", -1),
    ],
)
def test_bad_values_name_the_argument(field, value):
    kw = {"d_model": 8, "n_experts": 4, "d_hidden": 16, field: value}
    with pytest.raises(ValueError, match=field):
        MoEConfig(**kw)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"gate": "bogus"}, "unknown gate 'bogus'; known gates: .*sigmoid"),
        ({"k": 0}, r"k must satisfy 1 <= k <= n_experts=4, got k=0"),
        ({"k": 5}, r"k must satisfy 1 <= k <= n_experts=4, got k=5"),
        ({"gate": "softmax", "bias_update_rate": 0.1}, "SoftmaxGate is not a token-choice gate"),
        ({"activation": "swigl"}, "unknown activation 'swigl'; known activations: .*swiglu"),
    ],
    ids=["gate", "k0", "k5", "bias-on-dense", "activation"],
)
def test_config_refuses_what_building_the_layer_refuses(settings, match):
    # The same message from the config as from the layer, which used to be the first to see it.
    kw = {"d_model": 8, "n_experts": 4, "d_hidden": 16, **settings}
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kw)
    with pytest.raises(ValueError, match=match):
        MoE(8, 4, 16, **settings)
    with pytest.raises(ValueError, match=match):
        MoEConfig(d_model=8, n_experts=4, d_hidden=16).replace(**settings)


def test_config_takes_the_name_of_a_built_gate_outside_the_registry():
    # A config may describe a built gate (the Hugging Face adapters', a user's Gate class):
    # it is built with MoE.from_config(config, gate=...), so its name is not refused.
    from gatedmoe.gates import SoftmaxGate

    class MyGate(SoftmaxGate):
        registry_name = "my_gate"

    cfg = MoEConfig(d_model=8, n_experts=4, d_hidden=16, gate="my_gate")
    assert MoE.from_config(cfg, gate=MyGate(8, 4)).config == cfg
    # A dense gate ignores k, so k > n_experts is the layer's business only for top-k gates.
    assert MoEConfig(d_model=8, n_experts=4, d_hidden=16, gate="softmax", k=9).k == 9


def test_config_records_the_name_of_a_built_activation_outside_the_registry():
    # A user's Activation may carry any name: the layer built with it records that name,
    # which describes it (the config alone cannot rebuild it, as for a built gate).
    from gatedmoe.experts import Activation

    act = Activation("my_tanh", torch.tanh, glu=False)
    moe = MoE(8, 4, 16, activation=act)
    assert moe.config.activation == "my_tanh" and moe.experts.act is act
    assert MoE.from_config(moe.config, experts=moe.experts).config == moe.config
    moe(torch.randn(5, 8))
    with pytest.raises(ValueError, match="unknown activation 'my_tanh'"):
        MoEConfig(d_model=8, n_experts=4, d_hidden=16, activation="my_tanh")


def test_backend_options_need_a_backend_that_takes_them():
    with pytest.raises(ValueError, match="backend_options"):
        MoEConfig(d_model=8, n_experts=4, d_hidden=16, backend="grouped", backend_options=TritonOptions())
    with pytest.raises(TypeError, match="backend_options"):
        MoEConfig(d_model=8, n_experts=4, d_hidden=16, backend_options={"fp32_scatter": True})


def test_config_is_frozen_and_owns_its_gate_kwargs():
    kw = {"noisy": True}
    cfg = MoEConfig(d_model=8, n_experts=4, d_hidden=16, gate_kwargs=kw)
    kw["noisy"] = False
    assert cfg.gate_kwargs == {"noisy": True}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 3
    assert cfg.replace(k=3).k == 3 and cfg.k == 2
    assert hash(cfg) == hash(cfg.replace())


def test_a_built_gate_with_another_k_is_refused_as_another_bias_update_rate_is():
    from gatedmoe.gates import TopKSoftmaxGate

    # It used to give config.k = 3 silently.
    with pytest.raises(ValueError, match=r"k=1 differs from the built gate's k=3"):
        MoE(16, 4, 32, gate=TopKSoftmaxGate(16, 4, k=3), k=1)
    with pytest.raises(ValueError, match="bias_update_rate=0.5 differs"):
        MoE(16, 4, 32, gate=TopKSoftmaxGate(16, 4, k=3).attach_bias_balancer(0.1), bias_update_rate=0.5)
    # The gate's own k, or the default, reads k off the gate.
    assert MoE(16, 4, 32, gate=TopKSoftmaxGate(16, 4, k=3), k=3).config.k == 3
    assert MoE(16, 4, 32, gate=TopKSoftmaxGate(16, 4, k=3)).config.k == 3


def test_from_config_rebuilds_the_same_layer():
    torch.manual_seed(0)
    moe = MoE(8, 4, 16, k=1, n_shared_experts=1, capacity_factor=2.0, gate="sigmoid", bias_update_rate=1e-2)
    again = MoE.from_config(moe.config, gate=moe.gate, experts=moe.experts, shared=moe.shared)
    assert again.config == moe.config
    x = torch.randn(10, 8)
    assert_close("y", moe(x), again(x))


def test_built_parts_are_used_as_they_are():
    torch.manual_seed(0)
    gate = build("topk_softmax", d_model=8, n_experts=4, k=3)
    bank = ExpertBank(4, 8, 16, "gelu")
    moe = MoE(8, 4, 16, gate=gate, experts=bank, activation="gelu")
    assert moe.gate is gate and moe.experts is bank
    assert moe.config.gate == "topk_softmax" and moe.config.k == 3
    assert moe(torch.randn(5, 8)).shape == (5, 8)
    assert moe.last_routing.n_assignments == 15


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"experts": ExpertBank(4, 8, 24)}, "built experts"),
        ({"experts": ExpertBank(4, 8, 16, "gelu")}, "built experts"),
        ({"gate": build("topk_softmax", d_model=8, n_experts=5, k=2)}, "n_experts"),
        ({"shared": torch.nn.Linear(8, 8)}, "n_shared_experts"),
        ({"gate": torch.nn.Linear(8, 4)}, "gate"),
    ],
)
def test_mismatched_parts_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MoE(8, 4, 16, **kwargs)


def test_from_config_refuses_a_gate_the_config_does_not_describe():
    cfg = MoEConfig(d_model=8, n_experts=4, d_hidden=16, gate="sigmoid", k=2)
    with pytest.raises(ValueError, match="gate"):
        MoE.from_config(cfg, gate=build("topk_softmax", d_model=8, n_experts=4, k=2))
    with pytest.raises(TypeError, match="MoEConfig"):
        MoE.from_config({"d_model": 8})


def test_forward_goes_through_the_seams():
    class Doubled(MoE):
        def route(self, x_TD, token_ids=None, **kw) -> Routing:
            self.routed = True
            return super().route(x_TD, token_ids, **kw)

        def dispatch(self, x_TD, routing):
            return 2 * super().dispatch(x_TD, routing)

    torch.manual_seed(0)
    plain = MoE(8, 4, 16)
    doubled = Doubled.from_config(plain.config, gate=plain.gate, experts=plain.experts)
    x = torch.randn(6, 8)
    assert_close("y", 2 * plain(x), doubled(x))
    assert doubled.routed


def test_backend_options_reach_the_backend(monkeypatch):
    seen = []

    def spy(x_TD, routing, experts, options=None):
        seen.append(options)
        return torch.zeros_like(x_TD)

    import gatedmoe.layers.moe as moe_module

    monkeypatch.setattr(moe_module, "get_backend", lambda name, device: spy)
    opts = TritonOptions(fp32_scatter=True)
    MoE(8, 4, 16, backend="auto", backend_options=opts)(torch.randn(3, 8))
    assert seen == [opts]


@pytest.mark.parametrize("scope", ["micro_batch", "sequence", "global_batch"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_forward_records_the_losses_and_routing_route_gives(scope, capacity_factor):
    # forward runs route's steps itself (its losses queued after the experts' kernels): the
    # same routing, the same losses and the same gradients as route() then dispatch().
    torch.manual_seed(0)
    kw = {"load_balance_scope": scope, "router_z_weight": 1e-3, "capacity_factor": capacity_factor}
    layer = MoE(8, 4, 16, k=2, **kw)
    twin = MoE.from_config(layer.config, gate=copy.deepcopy(layer.gate), experts=copy.deepcopy(layer.experts))
    x = torch.randn(2, 5, 8)
    y = layer(x)
    routing = twin.route(x.reshape(-1, 8), seq_len=5)
    y_seams = twin.dispatch(x.reshape(-1, 8), routing).reshape(x.shape)
    assert_close("y", y_seams, y)
    assert sorted(layer.aux_losses) == sorted(twin.aux_losses) == ["load_balance", "router_z"]
    for name in layer.aux_losses:
        assert_close(name, twin.aux_losses[name], layer.aux_losses[name])
    assert torch.equal(layer.last_routing.token, routing.token)
    assert torch.equal(layer.last_routing.expert, routing.expert)
    (y.square().sum() + sum(layer.aux_losses.values())).backward()
    (y_seams.square().sum() + sum(twin.aux_losses.values())).backward()
    for (name, p), q in zip(layer.named_parameters(), twin.parameters(), strict=True):
        assert_close(f"grad {name}", q.grad, p.grad)
