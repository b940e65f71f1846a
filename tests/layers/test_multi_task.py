"""Tests of src/gatedmoe/layers/multi_task.py."""

import pytest
import torch

from gatedmoe import aux_loss
from gatedmoe.layers import MultiTaskMoE
from helpers import assert_close


def test_mmoe_formula():
    torch.manual_seed(0)
    m = MultiTaskMoE(6, n_experts=3, d_hidden=8, n_tasks=2, backend="grouped")
    x = torch.randn(4, 6)
    ys = m(x)
    for i, (g, y) in enumerate(zip(m.gates, ys, strict=True)):
        p = torch.softmax(x.double() @ g.weight.detach().double().T, -1)
        f = torch.stack([m.experts.double().expert_forward(e, x.double()) for e in range(3)], 1)
        m.experts.float()
        assert_close(f"task {i}", (p.unsqueeze(-1) * f).sum(1).float(), y.detach(), scale=5)  # float32 GEMMs vs float64
    assert not torch.allclose(ys[0], ys[1])


def test_dselect_k_multi_task_losses_and_gradients():
    torch.manual_seed(0)
    m = MultiTaskMoE(6, n_experts=4, d_hidden=8, n_tasks=3, gate="dselect_k", k=2, load_balance_weight=0.01).train()
    ys = m(torch.randn(5, 6))
    assert {"task0/dselect_entropy", "task2/load_balance"} <= set(m.aux_losses)
    (sum(y.sum() for y in ys) + aux_loss(m)).backward()
    for g in m.gates:
        assert g.z_proj.weight.grad is not None
    assert len(m.last_routings) == 3 and all(r.n_tokens == 5 for r in m.last_routings)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_tasks"):
        MultiTaskMoE(6, 3, 8, n_tasks=0)
    with pytest.raises(ValueError, match="token id"):
        MultiTaskMoE(6, 3, 8, n_tasks=2, gate="hash")


def test_from_config_carries_the_settings_it_honours():
    from gatedmoe import MoEConfig

    cfg = MoEConfig(d_model=6, n_experts=4, d_hidden=8, gate="sigmoid", k=1, activation="gelu", bias=True,
                    backend="grouped", load_balance_weight=0.02, router_z_weight=0.003, bias_update_rate=1e-2)
    m = MultiTaskMoE.from_config(cfg, n_tasks=2)
    assert m.config == cfg and len(m.gates) == 2
    assert (m.experts.act.name, m.experts.has_bias, m.backend) == ("gelu", True, "grouped")
    assert all(g.k == 1 and g.balancer.update_rate == 1e-2 for g in m.gates)
    m(torch.randn(5, 6))
    assert {"task0/load_balance", "task0/router_z", "task1/router_z"} <= set(m.aux_losses)
    with pytest.raises(ValueError, match="NaN"):
        m(torch.full((2, 6), float("nan")))
    # The keyword constructor keeps MMoE's defaults (no router z-loss) and, like every layer
    # (issue 23: NaN reported the same way everywhere), checks its input by default.
    plain = MultiTaskMoE(6, 4, 8, n_tasks=2)
    assert plain.config.router_z_weight == 0 and plain.config.check_inputs and plain.config.gate == "softmax"


@pytest.mark.parametrize("field, value", [("capacity_factor", 1.0), ("n_shared_experts", 1), ("d_shared_hidden", 4),
                                          ("capacity_priority", "score")])
def test_from_config_refuses_settings_it_cannot_honour(field, value):
    from gatedmoe import MoEConfig

    with pytest.raises(ValueError, match=field):
        MultiTaskMoE.from_config(MoEConfig(d_model=6, n_experts=4, d_hidden=8, **{field: value}), n_tasks=2)


def test_backend_options_reach_the_backend(monkeypatch):
    from gatedmoe import MoEConfig, TritonOptions

    seen = []

    def spy(x_TD, routing, experts, options=None):
        seen.append(options)
        return torch.zeros_like(x_TD)

    import gatedmoe.layers.multi_task as module

    monkeypatch.setattr(module, "get_backend", lambda name, device: spy)
    opts = TritonOptions(fp32_scatter=True)
    MultiTaskMoE.from_config(MoEConfig(d_model=6, n_experts=4, d_hidden=8, backend_options=opts), n_tasks=2)(
        torch.randn(3, 6)
    )
    assert seen == [opts, opts]
