import pytest
import torch

from gatedmoe.data import load_tabular
from gatedmoe.models import TabularMLP, TabularMoE, train_tabular


def test_tabular_moe_shapes_and_bad_input():
    m = TabularMoE(5, 3, n_experts=4, gate="topk_softmax", k=2)
    assert m(torch.randn(7, 5)).shape == (7, 3)
    total, active = m.n_params()
    assert active < total
    with pytest.raises(ValueError, match="n_features"):
        m(torch.randn(7, 4))
    with pytest.raises(ValueError, match="n_outputs"):
        TabularMoE(5, 0)


def test_mlp_matching_is_closest_width():
    m = TabularMLP.matching(13, 3, n_params=40_000)
    n = m.n_params()[0]
    wider = TabularMLP(13, 3, width=m.width + 1).n_params()[0]
    narrower = TabularMLP(13, 3, width=m.width - 1).n_params()[0]
    assert abs(n - 40_000) <= min(abs(wider - 40_000), abs(narrower - 40_000))
    with pytest.raises(ValueError, match="n_params"):
        TabularMLP.matching(13, 3, n_params=0)


def test_train_tabular_classification_and_regression():
    wine = load_tabular("wine")
    m = train_tabular(TabularMoE(13, 3, d_model=16, d_hidden=16), wine.split(), "classification", steps=60,
                      batch_size=32, eval_every=30, progress=False)
    assert m["val_accuracy"] > 0.8  # 3 classes, chance is ~0.4
    assert m["routing"]["layers"] and m["routing_stats"] is not None
    assert m["params"] == m["active_params"]  # dense Gumbel-softmax: every expert is active
    diabetes = load_tabular("diabetes")
    r = train_tabular(TabularMLP(10, 1, width=16), diabetes.split(), "regression", steps=30, progress=False)
    assert set(r) >= {"val_rmse", "val_r2"} and r["routing_stats"] is None
    with pytest.raises(ValueError, match="task"):
        train_tabular(TabularMLP(10, 1), diabetes.split(), "ranking", steps=1)


def test_tabular_moe_carries_its_moe_config():
    from gatedmoe import MoEConfig

    cfg = MoEConfig(d_model=16, n_experts=3, d_hidden=8, gate="sigmoid", k=1, capacity_factor=1.0)
    m = TabularMoE(5, 2, moe=cfg)
    assert m.moe.config == cfg and m.proj.out_features == 16
    assert m(torch.randn(4, 5)).shape == (4, 2)
    flat = TabularMoE(5, 2, d_model=16, n_experts=8, gate="softmax")
    assert flat.moe.config == TabularMoE.default_moe.replace(d_model=16, n_experts=8, gate="softmax")
    assert TabularMoE(5, 2).moe.config == TabularMoE.default_moe
    with pytest.raises(ValueError, match="not both"):
        TabularMoE(5, 2, moe=cfg, k=2)
    with pytest.raises(ValueError, match="d_model"):
        TabularMoE(5, 2, d_model=0)


def test_train_tabular_closes_each_step_for_step_wise_balancing():
    """The trainer calls `gatedmoe.balance_step` after each optimizer step: a step-wise
    bias moves, and global-batch counts never outlive their step."""
    from gatedmoe import MoE

    wine = load_tabular("wine")
    model = TabularMoE(13, 3, d_model=16, d_hidden=16, gate="sigmoid", k=1, bias_update_rate=0.01,
                       bias_update_every="step", load_balance_scope="global_batch")
    train_tabular(model, wine.split(), "classification", steps=3, batch_size=16, eval_every=3, progress=False)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    assert moe.gate.balancer.bias.abs().sum() > 0 and moe.gate.balancer.pending is None
    assert moe._step_counts is None
