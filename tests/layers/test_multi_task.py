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
